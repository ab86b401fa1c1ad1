# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LaViSE: explaining CNN filters with words
#
# The earlier chapters explain a vision-language model. LaViSE {cite}`yang2022lavise` turns
# the question around: it uses a *word-embedding space* to explain the individual filters of
# an ordinary CNN classifier, with an open vocabulary that can include words nobody
# annotated.
#
# The recipe: freeze the CNN up to a target layer; multiply that layer's feature map by the
# segmentation mask of an annotated object, pool it, and train a small head to map the result
# onto the object's word embedding with a cosine margin ranking loss. To explain a filter,
# take the images that activate it most, let the filter's own map select what the head reads,
# and read the words nearest to the head's prediction. On real data the "ground truth" for a
# filter is itself an approximation from object annotations. In Concept World every part,
# attribute, habitat and class has an exact mask on every image, so we can check the words
# against what each filter's region really covers, for concepts the head saw in training and
# for concepts it never saw.
#
# **Real data.** `dataset="coco"` explains a torchvision CNN on photographs annotated in the
# COCO format {cite}`lin2014coco` (`data_root`: the images, `annotations`: an instances JSON
# with polygon or RLE masks); the concepts are then the data set's categories and a GloVe
# file {cite}`pennington2014glove` can embed them (`embedding="glove:<file>"`).

# %% tags=["parameters", "hide-cell"]
# Shared by every chapter: defaults live in WorldConfig / TrainConfig (conceptlab.world, conceptlab.models)
world = {}  # Concept World overrides, e.g. {"habitat_correlation": 0.95}
world_clip = {}  # world-CLIP training overrides, e.g. {"steps": 900}
model = "world"  # "world" (the Concept World CLIP) or an open_clip name / "hf-hub:org/repo"
pretrained = None  # open_clip pretrained tag or a local checkpoint file
seed = 0
device = None  # None: CUDA when available, else CPU
checkpoint_seconds = 30.0  # training checkpoints at most this many seconds apart
artifacts_dir = "../artifacts"
results_dir = "../book/results"
# This chapter (declared, with types and ranges, in conceptlab.lavise.PARAMETERS)
dataset = "world"  # "world" or "coco" (then data_root + annotations)
data_root = None  # COCO-format images folder
annotations = None  # COCO instances JSON (polygon or RLE masks)
embedding = "clip"  # "clip", "glove:<file>", "sentence-transformers:<model>" or "random"
concept_template = "{}"
target_model = "world"  # "world" (ResNet-18 trained on the world) or a torchvision architecture
target_weights = None  # local state dict of a torchvision target_model
target_input_size = 224
target_layer = "layer3"
target_init = "trained"  # "random": the same architecture with fresh weights
cnn_n_train = 2000
cnn_steps = 60
cnn_batch_size = 32
cnn_lr = 2e-3
annotation_rate = 0.6
n_explain = 1500
min_pixels = 8
explainer_epochs = 10
explainer_lr = 1e-3
bn_eval = True  # the head's BatchNorm in eval mode while training, as the original code
mask_resize = "area"  # "area" (soft) or "nearest" (the original's hard masks)
masking = "activation"  # "activation" (the paper) or "projection" (the original code's default)
n_eval = 600
act_q = 0.99
n_top = 5
iou_threshold = 0.2
iou_size = 32

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'")
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown

from conceptlab import chapter, lavise, plots
from conceptlab.chapter import show_source
from conceptlab.cnn import cnn_accuracy

ch = chapter.setup("06_lavise", globals(), lavise.PARAMETERS)

# %% tags=["hide-cell"]
run = lavise.setup_run(ch)  # target CNN (trained once, then stored), images, concepts, embeddings
head, history = lavise.train_head(run)
head_original, _ = lavise.train_head(run, **lavise.ORIGINAL_CODE)
features = lavise.eval_features(run)
expl = {m: lavise.explain(run, features, head, masking=m) for m in lavise.MASKINGS}
expl_original = lavise.rescore(expl[masking], features, head_original, run.words,
                               lavise.ORIGINAL_CODE["masking"])

# %% [markdown]
# ## Results at a glance
#
# Recall@k of the ground-truth concepts among the k words nearest to the head's prediction,
# on concepts seen in training and on unseen ones (defined below). The columns: what the paper
# reports on Visual Genome, what the original code's choices compute here (every switch below
# at the original code's value), and this chapter's run.

# %% tags=["remove-input"]
recall = {name: lavise.recall_row(e.scores, e.ground_truth, run.seen)
          for name, e in (("this book", expl[masking]), ("original code", expl_original))}
fidelity = chapter.fidelity_table(lavise.fidelity_rows(recall["this book"], recall["original code"],
                                                       list(recall["this book"])))
fidelity.astype(float).round(3)

# %% [markdown]
# The paper's own recall figures are not on file in this project, so that column is empty
# rather than typed in by hand. Where this run departs from the paper and from the original
# code, switch by switch, and what else differs:

# %% tags=["remove-input"]
ch.differences(lavise.SWITCHES)

# %% tags=["remove-input"]
Markdown("\n".join(f"- {line}" for line in lavise.setting_differences(ch.params)))

# %% [markdown]
# ## The target CNN
#
# By default the CNN to explain is a torchvision ResNet-18 trained to classify world
# creatures. Its stem is adapted to 64×64 images (a 3×3 stride-2 first convolution and no
# max-pool), so `layer3` has an 8×8 map and `layer4` a 4×4 one. The default target layer is
# `layer3`: its 8×8 grid matches the 7×7 grid of the original's `layer4` on 224-pixel
# photographs, while our `layer4` is too coarse for part-sized regions. The CNN trains on the
# GPU when there is one (several with `accelerate launch`), and is stored under its parameters.

# %%
cnn_top1 = None
if dataset == "world":
    cnn_top1 = cnn_accuracy(run.cnn, run.to_input, run.eval_data.batch.images,
                            run.eval_data.batch.labels)
if run.cnn_history:
    ax = plots.curve(run.cnn_history, "accuracy")
    ax.set_title(f"CNN training (test top-1 {cnn_top1:.1%})")
print(f"target CNN {target_model} ({target_init}), test top-1: {cnn_top1}")

# %% [markdown]
# ## Concepts, their masks, seen and unseen
#
# The vocabulary: the five part names, colours, patterns and sizes (mask: the parts that have
# them), part–attribute pairs such as "red head", the six habitats (mask: the background) and
# the class names (mask: the whole creature). An annotation rate splits each group into seen
# concepts, used to train the explainer, and unseen ones, held out to test whether the
# embedding space lets the explainer name what it never saw.

# %%
vocab = pd.DataFrame({"concept": run.names, "group": [c.group for c in run.concepts],
                      "seen": run.seen})
vocab.groupby("group", sort=False)["seen"].agg(concepts="size", seen="sum")

# %% [markdown]
# ## The method on the page
#
# The head is trained with the cosine margin ranking loss (CSMR, margin $m = 1$): for a
# prediction $p$ of a concept with word vector $t$ and every other seen word $w$,
#
# $$L = \sum_{w \neq t} \max\bigl(0,\; m - \cos(p, t) + \cos(p, w)\bigr).$$

# %% tags=["remove-input"]
show_source(lavise.csmr_loss)

# %% [markdown]
# A toy run to check by hand: three orthogonal words. The first prediction points exactly at
# its target, so every hinge is $\max(0, 1 - 1 + 0) = 0$; the second, $(1, 1, 0)$ with target
# word 3, has cosine $1/\sqrt{2}$ with words 1 and 2 and 0 with its target, so it pays
# $2\,(1 + 1/\sqrt{2}) \approx 3.414$; the mean is $\approx 1.707$.

# %%
toy = lavise.csmr_loss(torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0]]), torch.tensor([0, 2]),
                       torch.eye(3))
print(f"CSMR of the toy batch: {toy.item():.4f}")

# %% [markdown]
# To explain a filter, the head reads one vector per top image. The paper masks the feature
# map where the filter fires above its `act_q` quantile ("activation"); the original code's
# default weights every position by the filter's own map divided by its norm ("projection",
# filter attention), so weak activations outside the region count too.

# %% tags=["remove-input"]
show_source(lavise.filter_embedding)

# %% [markdown]
# Toy: a filter fires 4 at one of 16 cells and 1 at another; a second channel is on (1) only
# at that second cell. Activation masking with threshold 2 keeps the first cell alone:
# $(4/16, 0)$. Projection divides the map by $\sqrt{4^2 + 1^2} = \sqrt{17}$ and sees both
# cells: $(17/\sqrt{17}/16,\; 1/\sqrt{17}/16) \approx (0.258, 0.015)$.

# %%
maps = torch.zeros(1, 2, 4, 4)
maps[0, 0, 0, 0], maps[0, 0, 1, 1], maps[0, 1, 1, 1] = 4.0, 1.0, 1.0
pd.DataFrame({m: lavise.filter_embedding(maps, 0, 2.0, m)[0].numpy() for m in lavise.MASKINGS},
             index=["channel 0", "channel 1"]).round(3)

# %% [markdown]
# ## Training the explainer
#
# Each concept word is embedded by the text encoder of the CLIP of chapter 1 (or GloVe, or a
# sentence-transformers model on the real path). The explainer head (BatchNorm, Dropout 0.1,
# Linear, ReLU, BatchNorm, Dropout, Linear) is trained against the *seen* words only, on
# masked and pooled `layer3` features of training images, with its BatchNorm layers in eval
# mode as in the original code (`bn_eval`). The original uses Adam at lr $10^{-4}$ for epochs
# on Visual Genome; our data set is small, so the book uses `explainer_lr` (see the table
# above) with ReduceLROnPlateau.

# %%
ax = plots.curve(history, "val_loss", x="epoch", smooth=1, label="held-out CSMR loss")
plots.curve(history, "loss", x="epoch", smooth=1, ax=ax, label="training CSMR loss")
print(f"{len(run.concepts)} concepts ({run.seen.sum()} seen), embedding dimension "
      f"{run.words.shape[1]}; held-out top-1 among seen words: {history[-1]['val_top1']:.1%}")

# %% [markdown]
# ## Filters, their top images, regions and words
#
# For each filter: the images where it fires most, its region (white outline: the filter's
# map, upsampled, above the `act_q` quantile of its activations over the evaluation set) and
# the two words nearest to the head's prediction. The row label gives the Network Dissection
# concept of the filter {cite}`bau2017netdissect` (the concept whose masks overlap the
# filter's regions best over the whole evaluation set) and its IoU. We show the filters that
# dissection finds most clearly, one per dissection concept.

# %%
dissection = lavise.dissect(features, run.eval_data, expl[masking].thresholds, iou_size=iou_size)
labels = lavise.filter_labels(expl[masking], dissection, run.concepts, run.seen)
shown = (labels.sort_values("dissection IoU", ascending=False)
         .drop_duplicates("dissection concept").head(8))
titles = [f"filter {r['filter']}\n{r['dissection concept']} ({r['dissection IoU']:.2f})"
          for _, r in shown.iterrows()]
fig = lavise.filter_figure(expl[masking], features, run.eval_data, list(shown.index), titles)

# %% [markdown]
# ## Recall of the ground-truth concepts
#
# For every explained filter and each of its top images, the ground truth is the set of
# concepts whose mask has IoU above `iou_threshold` with the filter's region on that image.
# Recall@k is the share of those concepts among the k predicted words, averaged over
# (filter, image) pairs, separately for seen and unseen concepts. Besides both maskings and
# the original code's choices, the references:
#
# * **Network Dissection** ranks concepts by their data-set IoU with the filter. It uses the
#   masks of *all* concepts, unseen ones included, on the evaluation images themselves: an
#   annotation-hungry reference, not a competitor on equal terms (the table shows where it
#   leads and where it does not).
# * **Random embeddings**: the same explainer with random word vectors: seen words can still
#   be learned, unseen ones cannot, because the space carries no meaning.
# * **Chance**: a random ranking of the vocabulary.
#
# A randomly initialised CNN is the subject of an exercise at the end.

# %%
random_words, _ = lavise.embed_concepts(run.names, "random", seed=seed)
noise = lavise.rescore(expl[masking], features, lavise.train_head(run, random_words)[0],
                       random_words, masking)
gt = expl[masking].ground_truth
per_filter = np.broadcast_to(dissection[expl[masking].filters][:, None], gt.shape)
table = lavise.recall_table({
    **{f"LaViSE, {m} masking": (expl[m].scores, gt) for m in lavise.MASKINGS},
    "LaViSE, original code's choices": (expl_original.scores, gt),
    "Network Dissection (all annotations)": (per_filter, gt),
    "LaViSE with random embeddings": (noise.scores, gt),
    "chance": (lavise.chance_scores(gt.shape, seed), gt)}, run.seen)
table.round(3)

# %%
long = table.reset_index().melt(id_vars="method", var_name="metric", value_name="recall")
long[["k", "concepts"]] = long["metric"].str.split(" ", expand=True)
g = sns.catplot(data=long, x="k", y="recall", hue="method", col="concepts", kind="bar",
                height=3.2, aspect=1.3)
print(f"{len(expl[masking].filters)} filters explained; (filter, image) pairs with a seen "
      f"ground-truth concept: {int((gt & run.seen).any(-1).sum())}, "
      f"with an unseen one: {int((gt & ~run.seen).any(-1).sum())}")

# %% [markdown]
# Four comparisons carry the chapter's findings, computed from the table:
#
# * **Projection against activation masking**: what the original code's default changes.
# * **What the embedding space buys on unseen concepts**: the explainer's unseen recall minus
#   that of the same head trained on random word vectors, whose unseen recall has nothing
#   to go on (compare it with the chance row); a positive gap is the open-vocabulary
#   generalisation LaViSE is built on.
# * **What it costs on seen concepts**: random vectors are nearly orthogonal, so seen concepts
#   are easy to tell apart; in a semantic space "red", "red body" and "red head" are
#   neighbours, and a positive value here means the meaningful space makes the seen words
#   harder to separate.
# * **Dissection against the explainer**: how far an explainer that sees few annotations stays
#   from a method that uses every mask.

# %%
row = {m: table.loc[f"LaViSE, {m} masking"] for m in lavise.MASKINGS}
book, noise_row = row[masking], table.loc["LaViSE with random embeddings"]
dissection_row = table.loc["Network Dissection (all annotations)"]
findings = pd.Series({
    "R@10 seen: projection - activation": (row["projection"] - row["activation"])["R@10 seen"],
    "R@10 unseen: projection - activation": (row["projection"] - row["activation"])["R@10 unseen"],
    "R@20 unseen: explainer - random embeddings": (book - noise_row)["R@20 unseen"],
    "R@5 seen: random embeddings - explainer": (noise_row - book)["R@5 seen"],
    "R@10 seen: dissection - explainer": (dissection_row - book)["R@10 seen"],
}, name="difference in recall")
findings.round(3).to_frame()

# %% [markdown]
# Which concepts make up the ground truth matters for reading these numbers. A filter's
# region above a high quantile is small, so a habitat, whose mask is the whole background,
# rarely reaches the IoU threshold on a single image, while parts, colours and part–attribute
# pairs of the creature do.

# %%
gt_share = pd.DataFrame({"group": [c.group for c in run.concepts], "seen": run.seen,
                         "ground-truth pairs": gt.reshape(-1, len(run.concepts)).sum(0)})
gt_share.groupby(["group", "seen"])["ground-truth pairs"].sum().unstack().fillna(0).astype(int)

# %% [markdown]
# ## Where the explainer and dissection agree and disagree
#
# Each filter gets one word from the explainer (the nearest word to its mean prediction over
# its top images) and one concept from dissection. Agreement by the group of the dissection
# concept:

# %%
agreement = labels.groupby("dissection group")[["agree", "dissection in explainer top-3"]].mean()
agreement["filters"] = labels.groupby("dissection group").size()
print(f"overall agreement: top-1 {labels['agree'].mean():.1%}, dissection concept in the "
      f"explainer's top 3: {labels['dissection in explainer top-3'].mean():.1%}")
agreement.round(3)

# %% [markdown]
# Dissection answers "which annotated mask does this filter's region overlap most, over the
# whole data set?" and so leans to large, frequent regions. The explainer answers "which word
# does the masked feature vector look like?" on each image, so it may name what the features
# *encode* inside the region (a colour, a class that has it) rather than its outline. Exact
# agreement is therefore a harsh measure; "dissection concept in the explainer's top 3" is
# the fairer one.

# %% tags=["remove-cell"]
results = {"cnn_test_top1": cnn_top1, "n_concepts": len(run.concepts),
           "n_seen": int(run.seen.sum()), "n_filters_explained": len(expl[masking].filters),
           "explainer_val_top1": history[-1]["val_top1"],
           **{f"{m} {c}": float(v) for m, r in table.iterrows() for c, v in r.items()},
           **{f"{who}: {c}": float(v) for who, r in recall.items() for c, v in r.items()},
           "agreement_top1": float(labels["agree"].mean()),
           "agreement_top3": float(labels["dissection in explainer top-3"].mean()),
           **{k: float(v) for k, v in findings.items()}}

# %% tags=["remove-input"]
ch.finish(results, headline={f"{m} masking, R@10 unseen": float(row[m]["R@10 unseen"])
                             for m in lavise.MASKINGS}, summary=[
    f"{len(expl[masking].filters)} filters of {target_layer} explained with {len(run.concepts)} "
    f"concepts, {int(run.seen.sum())} seen in training.",
    f"R@10 seen / unseen: activation masking {row['activation']['R@10 seen']:.3f} / "
    f"{row['activation']['R@10 unseen']:.3f}, projection {row['projection']['R@10 seen']:.3f} / "
    f"{row['projection']['R@10 unseen']:.3f}; original code's choices "
    f"{recall['original code']['R@10 seen']:.3f} / {recall['original code']['R@10 unseen']:.3f}.",
    f"The embedding space adds {findings.iloc[2]:+.3f} to unseen R@20 over random word vectors; "
    f"dissection, with every annotation, is {findings.iloc[4]:+.3f} ahead on seen R@10."])

# %% [markdown]
# ## Exercises
#
# Predict first, then open the solution: it reruns the chapter's explainer with one
# parameter changed (cached, a few seconds each).
#
# 1. **Fewer annotations.** Lower `annotation_rate` from 0.6 to 0.2. What happens to recall on
#    seen and on unseen concepts? Compare unseen recall with the chance row.

# %% tags=["hide-cell"]
ch.exercise("fewer annotations", lavise.exercise, annotation_rate=0.2).round(3)

# %% [markdown]
# 2. **BatchNorm in training mode.** Train the head with `bn_eval=False`, the usual PyTorch
#    behaviour the original code switched off. Does normalising by batch statistics help a
#    head whose inputs are pooled features of very different scales?

# %% tags=["hide-cell"]
ch.exercise("BatchNorm in training mode", lavise.exercise, bn_eval=False).round(3)

# %% [markdown]
# 3. **A random-weight CNN.** Explain the filters of the same ResNet-18 with fresh random
#    weights (`target_init="random"`). Random convolutions still respond to colour and edges:
#    how much of the recall survives?

# %% tags=["hide-cell"]
ch.exercise("random CNN", lavise.exercise, target_init="random").round(3)

# %% [markdown]
# 4. **Bigger regions.** Lower `act_q` from 0.99 to 0.9. Which concept groups can now reach
#    the IoU threshold, and what happens to recall?

# %% tags=["hide-cell"]
ch.exercise("bigger regions", lavise.exercise, act_q=0.9).round(3)
