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
# for concepts it never saw. The question of the chapter: **does LaViSE name what a filter
# detects, and does it do better than chance on the words it never saw?**
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
# This chapter (declared, with types and ranges, in conceptlab.chapters.lavise.PARAMETERS)
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
n_head_seeds = 3  # explainer heads trained with seeds seed, seed + 1, ...: the interval
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
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'"
    )
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown

from conceptlab import chapters, lavise, plots
from conceptlab.chapter import fidelity_table, setup, show_source
from conceptlab.chapters import lavise as chapter  # this chapter's code
from conceptlab.chapters.report import reported_table

ch = setup(chapter.NAME, globals(), chapter.PARAMETERS)
r = chapter.Result()

# %% tags=["hide-cell"]
chapter.build(ch, r)  # target CNN (trained once, then stored), images, concepts, words, feature maps
chapter.train(ch, r)  # the explainer head, once per head seed (stored)
chapter.explain_all(ch, r)  # every filter, both maskings, every head seed
chapter.references(ch, r)  # original code's switches, random words, dissection, random-weight CNN
table = chapter.recall(ch, r)

# %% [markdown]
# ## Results at a glance
#
# Recall@k is the share of a filter's ground-truth concepts (on one of its top images, the
# concepts whose mask overlaps the filter's region; in full below) among the k words nearest
# to the head's prediction, on concepts seen in training and on unseen ones. Its
# **chance** is exactly $k/K$ for a vocabulary of $K$ concepts: a random ranking puts each
# ground-truth concept among the top k with probability $k/K$. Every recall below stands
# beside that chance and a 95 % interval (bootstrap over the explained filters and over
# `n_head_seeds` explainer heads); "above chance" means the whole interval is above it. The rows
# name the two ways of reading a filter, activation and projection masking (see "The method on
# the page"), and a control: the same explainer on a copy of the CNN with random weights
# (see the references below).

# %% tags=["remove-input"]
reported_table(chapter.headline(ch, r))

# %% [markdown]
# The same recall for the paper, the original code's choices (every switch below at the
# original code's value) and this chapter's run. The paper's recall figures are not on file
# in this project, so that column is empty rather than typed in by hand.

# %% tags=["remove-input"]
fidelity_table(chapter.fidelity_rows(r, masking)).astype(float).round(3)

# %% [markdown]
# Where this run departs from the paper and from the original code, switch by switch (with
# the file and line of the original code {cite}`yang2022lavise`), and what else differs:

# %% tags=["remove-input"]
ch.differences(chapter.SWITCHES)

# %% tags=["remove-input"]
Markdown("\n".join(f"- {line}" for line in chapter.setting_differences(ch.params)))

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
if r.run.cnn_history:
    ax = plots.curve(r.run.cnn_history, "accuracy")
    ax.set_title(f"CNN training (test top-1 {r.cnn_top1:.1%})")
print(f"target CNN {target_model} ({target_init}), test top-1: {r.cnn_top1}")

# %% [markdown]
# *What to look for* (only for a CNN trained here): the running mean of the training-batch
# accuracy should climb far above chance, one over the number of classes, and level off, with
# the test top-1 in the title not far below it. A CNN near chance has learned no filters worth
# naming, and every recall below would explain noise.

# %% [markdown]
# ## Concepts, their masks, seen and unseen
#
# The vocabulary: the five part names, colours, patterns and sizes (mask: the parts that have
# them), part–attribute pairs such as "red head", the six habitats (mask: the background) and
# the class names (mask: the whole creature). An annotation rate splits each group into seen
# concepts, used to train the explainer, and unseen ones, held out to test whether the
# embedding space lets the explainer name what it never saw.

# %%
chapter.vocabulary(r)

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
toy = lavise.csmr_loss(torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0]]), torch.tensor([0, 2]), torch.eye(3))
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
pd.DataFrame(
    {m: lavise.filter_embedding(maps, 0, 2.0, m)[0].numpy() for m in lavise.MASKINGS}, index=["channel 0", "channel 1"]
).round(3)

# %% [markdown]
# Recall, the measure of everything below, on a toy a student can check: two words out of
# $K = 4$ are the ground truth of a pair; the top 1 holds one of them (recall 0.5), the top 3
# both (recall 1.0). Chance at $k = 1$ is $1/4$.

# %%
toy_scores = np.array([[0.9, 0.8, 0.1, 0.0]])
toy_truth = np.array([[True, False, True, False]])
every_concept = np.ones(4, dtype=bool)
{
    **{f"R@{k}": lavise.recall_at_k(toy_scores, toy_truth, every_concept, k) for k in (1, 3)},
    "chance R@1": lavise.chance_recall(1, 4),
}

# %% [markdown]
# ## Training the explainer
#
# Each concept word is embedded by the text encoder of the CLIP of chapter 1 (or GloVe, or a
# sentence-transformers model on the real path). The explainer head (BatchNorm, Dropout 0.1,
# Linear, ReLU, BatchNorm, Dropout, Linear) is trained against the *seen* words only, on
# masked and pooled `layer3` features of training images, with its BatchNorm layers in eval
# mode as in the original code (`bn_eval`). The original uses Adam at lr $10^{-4}$ for epochs
# on Visual Genome; our data set is small, so the book uses `explainer_lr` (see the table
# above) with ReduceLROnPlateau, and the breakdown below shows what the original's rate does.
# The head is trained `n_head_seeds` times (initialisation and batch order); the curves are the
# first seed's.

# %%
history = r.heads[0][1]
ax = plots.curve(history, "val_loss", x="epoch", smooth=1, label="held-out CSMR loss")
plots.curve(history, "loss", x="epoch", smooth=1, ax=ax, label="training CSMR loss")
print(
    f"{r.n_concepts} concepts ({r.run.seen.sum()} seen), embedding dimension {r.run.words.shape[1]}; "
    f"held-out top-1 among seen words per head seed: {[round(h[-1]['val_top1'], 3) for _, h in r.heads]}"
)

# %% [markdown]
# *What to look for:* both losses should fall and level off; a held-out loss that turns up while
# the training loss keeps falling means the head memorises its training images. Dropout is on
# only in training, so a held-out curve below the training one is no sign of trouble.

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
rows, titles = chapter.shown_filters(r.labels)
fig = chapter.filter_figure(r.expl[masking], r.features, r.run.eval_data, rows, titles)

# %% [markdown]
# *What to look for:* whether the two words above each image name what lies inside its white
# outline, and whether they agree with the row's dissection concept. A filter whose outlines
# land on the same kind of thing in every image, named by the same words, is what LaViSE claims
# to explain; words that change from image to image, or name something outside the outline,
# show the explainer reading something other than the region.

# %% [markdown]
# ## Recall of the ground-truth concepts
#
# For every explained filter and each of its top images, the ground truth is the set of
# concepts whose mask has IoU above `iou_threshold` with the filter's region on that image.
# Recall@k is the share of those concepts among the k predicted words, averaged over
# (filter, image) pairs, separately for seen and unseen concepts. Besides both maskings, the
# references:
#
# * **The original code's choices**, one switch at a time from this book's settings, then all
#   together: what each departure of the code costs or gains.
# * **Network Dissection** ranks concepts by their data-set IoU with the filter. It uses the
#   masks of *all* concepts, unseen ones included, on the evaluation images themselves: an
#   annotation-hungry reference, not a competitor on equal terms.
# * **Random embeddings**: the same explainer with random word vectors: seen words can still
#   be learned, unseen ones cannot, because the space carries no meaning.
# * **A random-weight CNN (control)**: the same explainer, trained and evaluated on a copy of the
#   CNN with fresh random weights. A CNN that learned nothing should be explained worse; if it
#   is not, the recall measures something other than what the trained filters detect.
# * **Chance** $k/K$, and a random ranking that estimates it the same way as the methods.

# %%
table.round(3)

# %% [markdown]
# The figure: recall minus chance for each method and k, with 95 % intervals; a bar whose
# interval crosses zero is at chance.

# %%
fig = chapter.recall_figure(ch, r)

# %% [markdown]
# *What to look for:* in the unseen panel, whether the explainer's bars (the first of each group)
# clear the zero line, chance, by more than their intervals: that is the open-vocabulary claim.
# If the hatched bars of the random-weight CNN beside them reach as high, the recall does not
# depend on what the trained filters learned; Network Dissection, which uses every mask, unseen
# ones included, is a ceiling rather than a rival.

# %% [markdown]
# The comparisons that carry the chapter's findings, each a difference in recall@10 with its
# 95 % interval (paired on the same filters where both methods explain the same ones); a
# difference whose interval holds zero is not a finding.

# %%
chapter.findings(ch, r).round(3)

# %% [markdown]
# Which concepts make up the ground truth matters for reading these numbers. A filter's
# region above a high quantile is small, so a habitat, whose mask is the whole background,
# rarely reaches the IoU threshold on a single image, while parts, colours and part–attribute
# pairs of the creature do.

# %%
chapter.ground_truth_share(ch, r)

# %% [markdown]
# ## Where the explainer and dissection agree and disagree
#
# Each filter gets one word from the explainer (the nearest word to its mean prediction over
# its top images) and one concept from dissection. Agreement by the group of the dissection
# concept:

# %%
chapter.agreement(r).round(3)

# %% [markdown]
# Dissection answers "which annotated mask does this filter's region overlap most, over the
# whole data set?" and so leans to large, frequent regions. The explainer answers "which word
# does the masked feature vector look like?" on each image, so it may name what the features
# *encode* inside the region (a colour, a class that has it) rather than its outline. Exact
# agreement is therefore a harsh measure; "dissection concept in the explainer's top 3" is
# the fairer one.
#
# ## Summary

# %% tags=["remove-input"]
chapters.finish(ch, r, chapter)

# %% [markdown]
# ## Exercises
#
# Predict first, then open the solution: it reruns the chapter's explainer (its first head
# seed) with one parameter changed (cached, a few seconds each; the four exercises share one
# name, so their unchanged row is computed once).
#
# 1. **Fewer annotations.** Lower `annotation_rate` from 0.6 to 0.2. What happens to recall on
#    seen and on unseen concepts? Compare unseen recall with chance, $k/K$.

# %% tags=["hide-cell"]
ch.exercise("explainer recall", chapter.exercise, annotation_rate=0.2).round(3)

# %% [markdown]
# 2. **BatchNorm in training mode.** Train the head with `bn_eval=False`, the usual PyTorch
#    behaviour the original code switched off. Does normalising by batch statistics help a
#    head whose inputs are pooled features of very different scales?

# %% tags=["hide-cell"]
ch.exercise("explainer recall", chapter.exercise, bn_eval=False).round(3)

# %% [markdown]
# 3. **A coarser layer.** Explain `layer4` (a 4×4 map) instead of `layer3`. A filter's region
#    can then only be a few large cells: which concepts can still reach the IoU threshold?

# %% tags=["hide-cell"]
ch.exercise("explainer recall", chapter.exercise, target_layer="layer4").round(3)

# %% [markdown]
# 4. **Bigger regions.** Lower `act_q` from 0.99 to 0.9. Which concept groups can now reach
#    the IoU threshold, and what happens to recall?

# %% tags=["hide-cell"]
ch.exercise("explainer recall", chapter.exercise, act_q=0.9).round(3)
