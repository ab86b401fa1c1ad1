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
# This chapter
n_test = 2000  # held-out test images
exercise_steps = 100  # training steps of the lesson-sized CLIPs that the exercises train

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'")
import pandas as pd

from conceptlab import chapter, explore, models, plots
from conceptlab.world import PARTS

ch = chapter.setup("01_world_and_model", globals(), {
    "n_test": chapter.Param(2000, int, min=10, help="held-out test images"),
    "exercise_steps": chapter.Param(100, int, min=1, help="steps of the exercises' lesson-sized CLIPs")})
# %% [markdown]
# ## The classes
#
# Each class has a typical value for every attribute of every part it has. Some classes
# have no wings or no tail. Each class also has a home habitat and a behaviour, which
# no pixel shows. Any two classes differ in at least three part attributes.

# %%
ontology = pd.DataFrame([{"class": c.name, "habitat": c.habitat, "behaviour": c.behaviour,
                          **{p: " ".join(c.parts[p].values()) if p in c.parts else "—" for p in PARTS}}
                         for c in ch.world.classes])
ontology

# %% [markdown]
# ## A sample, with the ground truth drawn on
#
# Part masks are outlined, one colour per part. Masks record *visible* pixels: a
# head drawn over the body removes those pixels from the body's mask.

# %%
sample = ch.world.sample(n_test, split="test")
fig = plots.sample_grid(sample, ch.world.class_names, n=12)

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
stats = ch.world.statistics(sample)
fig = plots.dataset_overview(sample, ch.world.class_names)
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
clip, preprocess, tokenizer, history = ch.clip()
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
logits, accuracy = models.zero_shot(clip, tokenizer, sample.images, sample.labels, ch.world.class_names)
print(f"zero-shot accuracy on {len(sample)} test images:",
      ", ".join(f"{plots.human_label(k)} {v:.1%}" for k, v in accuracy.items()))
ax = plots.confusion(sample.labels, logits.argmax(1).numpy(), ch.world.class_names)

# %% [markdown]
# ## Why ground truth matters
#
# A high accuracy says nothing about *how* the model decides. The model above could be
# reading the head colour, the wing pattern, or simply the background: with
# `habitat_correlation` at the value above, most creatures sit in their class's home
# habitat, and a habitat is home to only a few classes, so the background narrows the class
# down before any part is looked at.
# A quick probe of that shortcut: accuracy on test images whose creature sits in its
# home habitat versus images where it does not.

# %%
shortcut = models.habitat_shortcut(logits.argmax(1).numpy(), sample, ch.world)
plots.table(pd.Series(shortcut, name="top-1 accuracy").to_frame())

# %% [markdown]
# ## Explore by hand
#
# Pick a creature, change one part's colour, pattern or size, or move it to another
# habitat, and watch the model's top classes. In the built book this is a static figure of
# the first test creature; in JupyterLab the controls are live.

# %%
explore.world_explorer(ch.world, clip, tokenizer)

# %% [markdown]
# The explanation methods in the following chapters each make a claim about what the
# model uses. Here, every such claim can be checked against masks, attributes and
# planted captions, and against counterfactual images that change one factor at a time.

# %% tags=["remove-input"]
results = {"zero_shot": accuracy, "n_test": len(sample), "habitat_shortcut": shortcut,
           "final_train_loss": history[-1]["loss"] if history else None, "statistics": stats}
ch.finish(results, headline={"zero-shot top-1 (world CLIP)": accuracy["top1"]}, summary=[
    f"The CLIP classifies {len(sample)} held-out creatures with top-1 {accuracy['top1']:.1%}.",
    f"It is right {shortcut['home habitat']:.1%} of the time when the creature is in its home habitat and "
    f"{shortcut['other habitat']:.1%} when it is not: a habitat shortcut the later chapters must detect.",
])

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Each solution below is computed by running the exercise (click
# to show it); the numbers come from lesson-sized CLIPs trained for `exercise_steps` steps,
# so compare the two rows of a solution with each other, not with the chapter's model.
#
# **1. A stronger shortcut.** Train on a world where the creature sits in its home habitat
# 95 % of the time instead of the chapter's rate. Will the gap between home-habitat and
# other-habitat accuracy grow or shrink? And overall accuracy on the chapter's test set?

# %% tags=["hide-cell"]
ch.exercise("stronger shortcut", models.exercise_train_habitat, habitat_correlation=0.95)

# %% [markdown]
# **2. Break the habitat cue at test time.** Without retraining, test the chapter's CLIP on
# images drawn with `habitat_correlation` 0, where the background is drawn at random (a
# creature is at home only by chance). Which number of the shortcut table above does the
# new accuracy approach?

# %% tags=["hide-cell"]
ch.exercise("no home habitats at test time", models.exercise_test_habitat, habitat_correlation=0.0)

# %% [markdown]
# **3. One prompt instead of an ensemble.** Zero-shot classification averages the prompts
# "a photo of a {}." and "a {}.". What happens with the bare class name "{}" only? The model
# was trained on captions, some of which are the bare class name.

# %% tags=["hide-cell"]
ch.exercise("bare class-name prompt", models.exercise_prompts, template="{}")
