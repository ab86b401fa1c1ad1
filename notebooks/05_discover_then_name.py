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
# # Discover-then-Name
#
# Discover-then-Name (DN-CBM, ECCV 2024) builds a concept bottleneck without choosing
# the concepts in advance. It **discovers** concepts with a sparse autoencoder (SAE)
# trained on CLIP image embeddings of a large unlabeled corpus, **names** each one with
# the vocabulary word whose CLIP text embedding lies closest to the concept's decoder
# direction, and then trains a sparse linear classifier on the concept strengths, so
# that every decision is a short weighted list of named concepts.
#
# Whether those names are *right* cannot be checked on CC3M. In Concept World it can:
# every image records its class, the colour, pattern and size of each part, and its
# habitat. This chapter runs the method and then asks, for every concept, whether it
# really fires on images that show what its name says.
#
# **Real models and data.** The same notebook runs on any open_clip model and an image
# data set, with any word list as the vocabulary, e.g.
#
# ```
# papermill 05_discover_then_name.ipynb out.ipynb -p model ViT-B-32 -p pretrained openai \
#     -p dataset imagefolder -p data_root /data/my_images -p vocabulary /data/clip_dissect_20k.txt
# papermill 05_discover_then_name.ipynb out.ipynb -p model ViT-B-32 -p pretrained /ckpt/model.pt \
#     -p dataset cub -p data_root /data/CUB_200_2011 -p vocabulary /data/20k.txt
# ```
#
# There the corpus is the data set's own images (or its training split), and the
# ground-truth sections are skipped: a real data set does not say what each image shows.

# %% tags=["parameters"]
# World
n_classes = 16
resolution = 64
world_seed = 0
attribute_noise = 0.1
habitat_correlation = 0.8
caption_mix = {"visual": 0.55, "class": 0.2, "habitat": 0.1, "behaviour": 0.05, "spurious": 0.1}
# Model: "world" trains/loads the Concept World CLIP; any open_clip name (with pretrained tag or path) instead
model = "world"
pretrained = None
clip_arch = "ConceptWorld-ViT"
clip_n_train = 20000
clip_steps = 450
clip_batch_size = 128
clip_lr = 1e-3
seed = 0
# Data: "world", or a real data set ("imagefolder" | "cub") under data_root
dataset = "world"
data_root = None
vocabulary = None  # a word-list file (one word per line, e.g. CLIP-Dissect's 20k.txt); None: the world's words
# DN-CBM
n_corpus = 50000  # unlabeled images the SAE learns from (CC3M's role)
n_probe_train = 5000
n_test = 2000
sae_expansion = 8
sae_l1 = 0.05
sae_lr = 1e-3
sae_batch_size = 1024
sae_epochs = 30
sae_resample_every = 10
probe_lambda = 1e-3
right_auroc = 0.75
# Output
artifacts_dir = "../artifacts"
results_dir = "../book/results"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from conceptlab import dncbm
from conceptlab.artifacts import ArtifactStore, write_results
from conceptlab.data import load_dataset
from conceptlab.models import TrainConfig, class_text_weights, get_clip
from conceptlab.sae import SAEConfig, encode_concepts, load_or_train_sae
from conceptlab.world import ConceptWorld, WorldConfig

sns.set_theme(style="whitegrid", context="notebook")
torch.manual_seed(seed)
world_cfg = WorldConfig(n_classes=n_classes, resolution=resolution, seed=world_seed, attribute_noise=attribute_noise,
                        habitat_correlation=habitat_correlation, caption_mix=caption_mix)
train_cfg = TrainConfig(arch=clip_arch, n_train=clip_n_train, steps=clip_steps, batch_size=clip_batch_size,
                        lr=clip_lr, seed=seed)
sae_cfg = SAEConfig(expansion=sae_expansion, l1=sae_l1, lr=sae_lr, batch_size=sae_batch_size, epochs=sae_epochs,
                    resample_every=sae_resample_every, seed=seed)
store = ArtifactStore(artifacts_dir)
on_world = dataset == "world"
clip, preprocess, tokenizer, _ = get_clip(model, pretrained, store, world_cfg, train_cfg)
model_key = {"train": train_cfg.__dict__} if model == "world" else {"model": model, "pretrained": pretrained}

# %% [markdown]
# ## Discover: embeddings of an unlabeled corpus
#
# The original trains its SAE on CLIP embeddings of the 3.3 million images of CC3M. Here
# the corpus is the world's `corpus` split, which no other chapter uses and whose labels
# the method never sees. The images are rendered, embedded and discarded batch by batch;
# only the embeddings are kept, cached under the world and model parameters.

# %%
if on_world:
    world = ConceptWorld(world_cfg)
    class_names = world.class_names
    corpus = dncbm.world_features(store, world, clip, model_key, n_corpus, "corpus")
    train = dncbm.world_features(store, world, clip, model_key, n_probe_train, "train")
    test = dncbm.world_features(store, world, clip, model_key, n_test, "test")
else:
    images = load_dataset(dataset, data_root, split="train" if dataset == "cub" else "test")
    held_out = load_dataset(dataset, data_root, split="test") if dataset == "cub" else None
    sets = dncbm.real_splits(images, n_corpus, n_probe_train, n_test, seed, held_out)
    corpus, train, test = (dncbm.folder_features(store, s, clip, preprocess, model_key) for s in sets)
    class_names = images.class_names
print(f"corpus {tuple(corpus['features'].shape)}, probe train {len(train['labels'])}, test {len(test['labels'])}")

# %% [markdown]
# ## The sparse autoencoder
#
# One hidden layer of `expansion × dim` ReLU units: `z = ReLU(W_enc (x − b_dec) + b_enc)`,
# `x̂ = W_dec z + b_dec`, with unit-norm decoder columns (the concept directions) and the
# loss `‖x − x̂‖² + λ₁‖z‖₁`. Units that stay silent for `resample_every` epochs are
# re-initialised towards inputs the SAE reconstructs badly. The curves show the share of
# variance left unexplained (FVU), the mean number of active concepts per image (L0),
# and the dead units found at each resampling.
#
# Some settings differ from the original (λ₁ 3e-5, lr 5e-4, batch 4096, 200 epochs), and
# all are parameters: world embeddings are L2-normalised 128-d vectors, and with the
# original λ₁ the code is not sparse at all (hundreds of active concepts per image), so
# `sae_l1` is larger; and 200 epochs of large batches would exceed the chapter's time
# budget, so the default takes smaller batches, a larger step and 30 epochs.

# %%
sae, sae_history = load_or_train_sae(store, corpus["features"], {"corpus": len(corpus["features"]), **model_key,
                                                                 "dataset": dataset, "data_root": data_root,
                                                                 "world": world_cfg.to_dict()}, sae_cfg)
hist = pd.DataFrame(sae_history)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for ax, col in zip(axes, ["fvu", "l0", "dead"]):
    sns.lineplot(hist.dropna(subset=[col]), x="epoch", y=col, ax=ax, marker="o" if col == "dead" else None)
    ax.set_title({"fvu": "unexplained variance", "l0": "active concepts per image", "dead": "dead concepts"}[col])
fig.tight_layout()
hist.tail(1)

# %% [markdown]
# ## Name: the nearest word in CLIP's text space
#
# Each concept's decoder direction lives in the image embedding space; CLIP's text
# embeddings live in the same space. The concept is named by the vocabulary word of
# highest cosine similarity. On the world the default vocabulary holds every class,
# part, colour, pattern, size and habitat word, plus distractor words that no image
# shows ("car", "piano", ...); the real path reads a word list such as CLIP-Dissect's 20k.

# %%
words = dncbm.load_vocabulary(vocabulary) if vocabulary else dncbm.world_vocabulary(ConceptWorld(world_cfg))
word_emb = dncbm.embed_vocabulary(clip, tokenizer, words)
names = dncbm.name_concepts(sae.directions, word_emb, words)
strengths = {split: encode_concepts(sae, d["features"]) for split, d in (("train", train), ("test", test))}
print(f"{len(words)} words, {sae.n_concepts} concepts, {names['name'].nunique()} distinct names")
names.assign(fires=(strengths["test"] > 0).float().mean(0).numpy()).sort_values("fires", ascending=False).head(12)

# %% [markdown]
# ## Are the names right?
#
# For each concept, the ground truth says which test images really show its name: a
# class name is true for that class, a habitat for images with that background, a part
# for images where the part is present, a colour, pattern or size for images where *any*
# present part has it. The concept's activation should rank those images above the
# others; we report that AUROC and call a name **right** when it reaches `right_auroc`.
# A name from the distractors, or one whose truth is the same for every image (every
# creature has a head), cannot be checked and counts as not right. The *oracle* column
# is the best AUROC the concept reaches for any checkable word: it separates "the SAE
# found nothing meaningful" from "it found something and the naming missed it".
# Dead concepts never fire on the test images; duplicates have a decoder direction
# nearly identical (cosine ≥ 0.95) to another live concept.
#
# AUROC asks whether a concept fires on *all* images with its word. A narrow concept
# ("red head on a forest background") fires on few of them and scores low although
# every image it fires on is red. The second check is therefore precision: the share of
# a concept's 20 most activating test images that show its name
# (`share_top_images_show_name` counts concepts where it is at least 0.9).

# %%
if on_world:
    scores = dncbm.score_names(strengths["test"], names, test, class_names, sae.directions, right_auroc)
    truth_summary = dncbm.summarise_scores(scores)
    display(pd.Series(truth_summary).to_frame("value"))
    live = scores[~scores["dead"]]
    display(live.groupby("kind").agg(concepts=("concept", "size"), right=("right", "mean"),
                                     median_auroc=("auroc", "median"), oracle_auroc=("best_auroc", "median"),
                                     top_precision=("top_precision", "median")).round(3))
else:
    truth_summary = {}
    print("No ground truth on a real data set: names are shown, not scored.")

# %% [markdown]
# Each dot is a live concept: the AUROC of its own name against the best AUROC any
# checkable word reaches. Dots on the diagonal were named as well as possible; dots far
# below it detect something the name does not say.

# %%
if on_world:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sns.scatterplot(live.fillna({"auroc": 0.5}), x="best_auroc", y="auroc", hue="kind", s=18, ax=ax)
    ax.plot([0.5, 1], [0.5, 1], color="grey", lw=1, ls="--")
    ax.set(xlabel="oracle AUROC (best checkable word)", ylabel="AUROC of its own name (0.5 if uncheckable)")
    ax.legend(fontsize=8, bbox_to_anchor=(1, 1))
    display(live.sort_values("fires", ascending=False)[["concept", "name", "auroc", "top_precision", "best_word",
                                                         "best_auroc", "fires"]].head(15).round(3))

# %% [markdown]
# ## The concept bottleneck
#
# A linear probe on the concept strengths of a labelled probe set, with mean
# cross-entropy plus `probe_lambda` times the L1 norm of the weights, which drives most
# weights to exactly zero. Concept strengths are divided by their maximum on the probe's
# training images so that one penalty fits all concepts. For comparison: an unpenalised
# linear probe on the raw CLIP embeddings (the accuracy a bottleneck gives up) and
# zero-shot classification with class-name prompts.

# %%
scale = dncbm.concept_scale(strengths["train"])
z_train, z_test = (strengths[s] / scale for s in ("train", "test"))
probes = {"class": dncbm.fit_probe(z_train, train["labels"], probe_lambda)}
raw = dncbm.fit_probe(train["features"], train["labels"], 0.0)
zero_shot = (test["features"] @ class_text_weights(clip, tokenizer, class_names).T).argmax(1).numpy()
y_test = test["labels"].numpy()
accuracy = pd.DataFrame([
    {"classifier": "DN-CBM (sparse probe on concepts)", "accuracy": probes["class"].score(z_test, y_test),
     "non-zero weights per class": dncbm.nonzero_per_class(probes["class"])},
    {"classifier": "linear probe on CLIP features", "accuracy": raw.score(test["features"], y_test),
     "non-zero weights per class": dncbm.nonzero_per_class(raw)},
    {"classifier": "zero-shot", "accuracy": float((zero_shot == y_test).mean()), "non-zero weights per class": None},
])
accuracy.round(3)

# %% [markdown]
# ## Task agnosticity
#
# The concepts were learned without labels, so the same bottleneck should serve any
# task. On the world a second task is the habitat in the background: a second sparse
# probe on the *same* concept strengths, beside a raw-feature probe for that task. The
# table counts how many concepts each task uses and how many they share.

# %%
if on_world:
    probes["habitat"] = dncbm.fit_probe(z_train, train["habitats"], probe_lambda)
    raw_habitat = dncbm.fit_probe(train["features"], train["habitats"], 0.0)
    used = {task: set(np.flatnonzero((p.coef_ != 0).any(0))) for task, p in probes.items()}
    tasks = pd.DataFrame([{"task": task, "concepts": probes[task].score(z_test, test[key].numpy()),
                           "raw features": r.score(test["features"], test[key].numpy()),
                           "concepts used": len(used[task])}
                          for task, key, r in (("class", "labels", raw), ("habitat", "habitats", raw_habitat))])
    print(f"concepts used by both tasks: {len(used['class'] & used['habitat'])}")
    ax = tasks.melt("task", ["concepts", "raw features"], "probe on", "accuracy").pipe(
        lambda d: sns.barplot(d, x="task", y="accuracy", hue="probe on"))
    ax.set_title("one set of concepts, two tasks")
    display(tasks.round(3))

# %% [markdown]
# ## Meta-clusters of concepts
#
# Concepts that the probes use, clustered by the cosine similarity of their decoder
# directions. Blocks along the diagonal are groups of related concepts; their names
# show whether CLIP's text space agrees with the grouping.

# %%
weight = sum(np.abs(p.coef_).sum(0) for p in probes.values())
top_used = np.argsort(-weight)[:min(40, max(int((weight > 0).sum()), 2))]
dirs = torch.nn.functional.normalize(sae.directions[top_used], dim=-1)
labels = [f"{names['name'][j]} #{j}" for j in top_used]
grid = sns.clustermap(pd.DataFrame((dirs @ dirs.T).numpy(), index=labels, columns=labels), cmap="vlag",
                      center=0, figsize=(9, 9), xticklabels=True, yticklabels=True, dendrogram_ratio=0.12)
grid.ax_heatmap.tick_params(labelsize=7)

# %% [markdown]
# ## Local explanations
#
# Why did the bottleneck classify *this* image as it did? The contribution of a concept
# is its strength on the image times its weight for the predicted class; the largest
# contributions, with their names, are the explanation.

# %%
pick = [0, 1, 2]
fig, axes = plt.subplots(2 if on_world else 1, len(pick), figsize=(4.2 * len(pick), 6.5 if on_world else 3.2),
                         squeeze=False)
view = world.sample(max(pick) + 1, split="test") if on_world else None
for col, i in enumerate(pick):
    expl = dncbm.local_explanation(z_test[i].numpy(), probes["class"], names["name"].tolist(), k=6)
    pred = class_names[int(probes["class"].predict(z_test[i:i + 1].numpy())[0])]
    if len(expl):
        sns.barplot(x=expl["contribution"], y=[f"{n} #{c}" for n, c in zip(expl["name"], expl["concept"])],
                    ax=axes[-1, col], color="C0")
    else:
        axes[-1, col].text(0.5, 0.5, "no concept contributes", ha="center", transform=axes[-1, col].transAxes)
    axes[-1, col].set(ylabel="", title=f"true {class_names[y_test[i]]}, predicted {pred}")
    if on_world:
        axes[0, col].imshow(view.images[i])
        axes[0, col].set_axis_off()
fig.tight_layout()

# %% [markdown]
# ## Global explanations
#
# A class's largest positive weights: the concepts whose presence argues for it. On the
# world they can be read against the class table of chapter 1.

# %%
glob = dncbm.global_explanation(probes["class"], names["name"].tolist(), class_names, k=4)
table = glob.assign(concept=glob["name"] + " (" + glob["weight"].round(2).astype(str) + ")").pivot(
    index="class", columns="rank", values="concept")
table

# %% [markdown]
# ## What the ground truth says
#
# The numbers below are this run's. Three questions: does the bottleneck cost accuracy
# (concept probe against the raw-feature probe), how many concepts does a class need
# (non-zero weights), and how often is an automatic name right by each of the two
# checks, split into frequent concepts (firing on at least 5% of test images) and
# rare ones.

# %%
if on_world:
    frequent = live["fires"] >= 0.05
    findings = pd.DataFrame({
        "concepts": [int(frequent.sum()), int((~frequent).sum())],
        "named by a class name": [(live[m]["kind"] == "class").mean() for m in (frequent, ~frequent)],
        "right (AUROC)": [live[m]["right"].mean() for m in (frequent, ~frequent)],
        "top images show the name": [(live[m]["top_precision"] >= 0.9).mean() for m in (frequent, ~frequent)],
    }, index=["frequent concepts", "rare concepts"])
    display(findings.round(3))
print(f"concept probe {accuracy['accuracy'][0]:.1%} with {accuracy['non-zero weights per class'][0]:.1f} "
      f"concepts per class; raw-feature probe {accuracy['accuracy'][1]:.1%}; zero-shot {accuracy['accuracy'][2]:.1%}")

# %% [markdown]
# How to read this: a concept that fires often and is named by a class is a class
# detector, and its name can be checked directly. Rare concepts are narrow; for them
# AUROC against a broad word is close to 0.5 even when every image they fire on shows
# that word, which the precision column tells apart. The concept probe needs only a
# handful of named concepts per class. Where the global explanations above list mostly
# class-named concepts, an explanation "it is a zorbil because the *zorbil* concept
# fires" is faithful but says little about *which parts* made the difference.

# %%
results = {"n_corpus": len(corpus["features"]), "n_concepts": sae.n_concepts, "vocabulary_size": len(words),
           "sae_final_fvu": sae_history[-1]["fvu"], "sae_final_l0": sae_history[-1]["l0"],
           "accuracy_concept_probe": float(accuracy["accuracy"][0]),
           "accuracy_raw_probe": float(accuracy["accuracy"][1]),
           "accuracy_zero_shot": float(accuracy["accuracy"][2]),
           "nonzero_weights_per_class": float(accuracy["non-zero weights per class"][0]), **truth_summary}
if on_world:
    results["accuracy_habitat_concept_probe"] = float(tasks["concepts"][1])
write_results(results_dir, "05_discover_then_name", results,
              {"world": world_cfg.to_dict(), "train": train_cfg.__dict__, "sae": sae_cfg.__dict__, "model": model,
               "pretrained": pretrained, "dataset": dataset, "data_root": data_root, "vocabulary": vocabulary,
               "probe_lambda": probe_lambda, "n_probe_train": n_probe_train, "n_test": n_test})
pd.Series(results).to_frame("value")
