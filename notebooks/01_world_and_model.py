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
# # The world and the model
#
# Concept-level explanation methods claim things like "the model looks at the *red
# striped head* to recognise this creature" or "the model relies on the *habitat*".
# On real photographs nobody can check such claims: there is no ground truth for what a
# network uses. This chapter builds a world where there is.
#
# **Concept World** is a procedurally generated set of part-based creatures. Every image
# comes with its class, a segmentation mask for each part (head, body, wings, tail, legs),
# the colour, pattern and size that each part really has, the habitat in the background,
# and a caption whose *style* we planted: a visual description, the class name, a habitat
# fact, a behaviour fact, or a spurious web phrase ("click to enlarge photo of a ...").
# We then train a small CLIP on these image–caption pairs, and every later chapter
# explains *this* model, whose training data we control completely.

# %% tags=["parameters"]
# World
n_classes = 16
resolution = 64
world_seed = 0
attribute_noise = 0.1
habitat_correlation = 0.8
caption_mix = {"visual": 0.55, "class": 0.2, "habitat": 0.1, "behaviour": 0.05, "spurious": 0.1}
# Model: "world" trains the Concept World CLIP; any open_clip name evaluates that model instead
model = "world"
pretrained = None
clip_arch = "ConceptWorld-ViT"
clip_n_train = 20000
clip_steps = 450
clip_batch_size = 128
clip_lr = 1e-3
seed = 0
# Evaluation and output
n_test = 2000
artifacts_dir = "../artifacts"
results_dir = "../book/results"

# %%
import pandas as pd
import seaborn as sns

from conceptlab import plots
from conceptlab.artifacts import ArtifactStore, write_results
from conceptlab.models import TrainConfig, class_text_weights, encode_images, get_clip, topk_accuracy
from conceptlab.world import PARTS, ConceptWorld, WorldConfig

sns.set_theme(style="whitegrid", context="notebook")
world_cfg = WorldConfig(n_classes=n_classes, resolution=resolution, seed=world_seed, attribute_noise=attribute_noise,
                        habitat_correlation=habitat_correlation, caption_mix=caption_mix)
train_cfg = TrainConfig(arch=clip_arch, n_train=clip_n_train, steps=clip_steps, batch_size=clip_batch_size,
                        lr=clip_lr, seed=seed)
world = ConceptWorld(world_cfg)
store = ArtifactStore(artifacts_dir)

# %% [markdown]
# ## The classes
#
# Each class has a typical value for every attribute of every part it has. Some classes
# have no wings or no tail. Each class also has a home habitat and a behaviour, which
# no pixel shows. Any two classes differ in at least three part attributes.

# %%
ontology = pd.DataFrame([{"class": c.name, "habitat": c.habitat, "behaviour": c.behaviour,
                          **{p: " ".join(c.parts[p].values()) if p in c.parts else "—" for p in PARTS}}
                         for c in world.classes])
ontology

# %% [markdown]
# ## A sample, with the ground truth drawn on
#
# Part masks are outlined, one colour per part. Masks record *visible* pixels: a
# head drawn over the body removes those pixels from the body's mask.

# %%
sample = world.sample(n_test, split="test")
fig = plots.sample_grid(sample, world.class_names, n=12)

# %% [markdown]
# Captions come in planted styles. The style of each caption is recorded, so later
# chapters can ask which kinds of text the trained model prefers.

# %%
pd.DataFrame({"caption": sample.captions[:10], "style": sample.caption_styles[:10]})

# %% [markdown]
# ## What the data set contains
#
# Class balance, how often a creature sits in its home habitat (the
# `habitat_correlation` parameter, a shortcut the model may learn), the share of each
# caption style, and how often a part's attribute departs from its class's typical value.

# %%
stats = world.statistics(sample)
fig = plots.dataset_overview(sample, world.class_names)
pd.Series(stats).round(3).to_frame("measured")

# %% [markdown]
# ## Training the CLIP
#
# A small open_clip model (`ConceptWorld-ViT`: 8×8-pixel patches on 64×64 images, four
# vision blocks, three text blocks) is trained with the symmetric contrastive loss on
# freshly sampled captions each step. The model is stored under a hash of every
# parameter above; a rerun with the same parameters loads it instead of training again,
# and an interrupted run resumes from its last checkpoint.

# %%
clip, preprocess, tokenizer, history = get_clip(model, pretrained, store, world_cfg, train_cfg)
if history:
    ax = plots.curve(history, "loss")
    ax.set_title("contrastive loss")
else:
    print(f"Using {model} / {pretrained}: no training curve.")

# %% [markdown]
# ## Zero-shot classification
#
# Classify held-out test images by the nearest class prompt ("a photo of a {class}.").

# %%
features = encode_images(clip, sample.images)
logits = features @ class_text_weights(clip, tokenizer, world.class_names).T
top1, top5 = topk_accuracy(logits, sample.labels, 1), topk_accuracy(logits, sample.labels, 5)
print(f"zero-shot accuracy on {len(sample)} test images: top-1 {top1:.1%}, top-5 {top5:.1%}")
ax = plots.confusion(sample.labels, logits.argmax(1).numpy(), world.class_names)

# %% [markdown]
# ## Why ground truth matters
#
# A high accuracy says nothing about *how* the model decides. The model above could be
# reading the head colour, the wing pattern, or simply the background: with
# `habitat_correlation` at the value above, the habitat alone predicts much of the class.
# A quick probe of that shortcut: accuracy on test images whose creature sits in its
# home habitat versus images where it does not.

# %%
pred = logits.argmax(1).numpy()
home = sample.habitats == world.home_habitats(sample.labels)
shortcut = pd.Series({"home habitat": (pred == sample.labels)[home].mean(),
                      "other habitat": (pred == sample.labels)[~home].mean()}, name="top-1 accuracy")
shortcut.round(3).to_frame()

# %% [markdown]
# The explanation methods in the following chapters each make a claim about what the
# model uses. Here, every such claim can be checked against masks, attributes and
# planted captions, and against counterfactual images that change one factor at a time.

# %%
results = {"zero_shot_top1": top1, "zero_shot_top5": top5, "n_test": len(sample),
           "accuracy_home_habitat": float(shortcut["home habitat"]),
           "accuracy_other_habitat": float(shortcut["other habitat"]),
           "final_train_loss": history[-1]["loss"] if history else None, **stats}
path = write_results(results_dir, "01_world_and_model", results, {
    "world": world_cfg.to_dict(), "train": train_cfg.__dict__, "model": model, "pretrained": pretrained})
print(f"headline numbers written to {path}")
