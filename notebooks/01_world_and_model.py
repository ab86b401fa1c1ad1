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
# This chapter (declared, with types and ranges, in conceptlab.chapters.chapter.PARAMETERS)
n_test = 2000  # held-out test images
n_reliance = 512  # prototypical test creatures changed one factor at a time
exercise_steps = 150  # training steps of exercise 1's planted CLIPs (chapter 7's models at 150)

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'"
    )
import pandas as pd
import torch

from conceptlab import chapters, explore, models, plots, reliance
from conceptlab.chapter import setup, show_source
from conceptlab.chapters import world_and_model as chapter  # this chapter's code

ch = setup(chapter.NAME, globals(), chapter.PARAMETERS)
r = chapter.Result()

# %% [markdown]
# ## The classes
#
# Each class has a typical value for every attribute of every part it has. Some classes
# have no wings or no tail. Each class also has a home habitat and a behaviour, which
# no pixel shows. Any two classes differ in at least three part attributes.

# %%
print(
    f"{len(ch.world.class_names)} classes: a classifier that guesses is right "
    f"{1 / len(ch.world.class_names):.2%} of the time (chance)."
)
chapter.ontology_table(ch.world)

# %% [markdown]
# ## A sample, with the ground truth drawn on
#
# Part masks are outlined, one colour per part. Masks record *visible* pixels: a
# head drawn over the body removes those pixels from the body's mask.

# %%
chapter.look(ch, r)
fig = plots.sample_grid(r.sample, ch.world.class_names, n=12)

# %% [markdown]
# *What to look for:* each coloured outline should hug the visible pixels of the part its
# colour names (a head drawn over the body cuts a notch out of the body's outline), and a
# class without wings or a tail shows no outline of that colour. These masks are the ground
# truth that later chapters score explanation maps against, so an outline off its part would
# make those scores meaningless.

# %% [markdown]
# Captions come in planted styles. The style of each caption is recorded, so later
# chapters can ask which kinds of text the trained model prefers. A *class* caption is
# one of "a photo of a {class}.", "a {class}." and "a picture of a {class}."; no caption
# is the bare class name.

# %%
pd.DataFrame({"caption": r.sample.captions[:10], "style": r.sample.caption_styles[:10]})

# %% [markdown]
# ## What the data set contains
#
# Class balance, how often a creature sits in its home habitat (the
# `habitat_correlation` parameter, a shortcut the model may learn), the share of each
# caption style, and how often a part's attribute departs from its class's typical value.

# %%
print(
    f"habitat_correlation = {ch.world_cfg.habitat_correlation}: the share of creatures drawn "
    "in their home habitat (the rest get a habitat at random, home included)"
)
fig = plots.dataset_overview(r.sample, ch.world.class_names)
pd.Series(r.statistics).round(3).to_frame("measured")

# %% [markdown]
# *What to look for:* the class bars (left) should be about equal, so that no class wins on
# frequency alone; the habitat bars (middle) follow how many classes call each habitat home,
# because most creatures are drawn at home; the caption-style bars (right) are the planted
# mix whose traces chapter 4 looks for in the model's preferences.

# %% [markdown]
# ## Training the CLIP
#
# A small open_clip model (`ConceptWorld-ViT`: 8×8-pixel patches on 64×64 images, four
# vision blocks, three text blocks) is trained with the symmetric contrastive loss on
# freshly sampled captions each step. The model is stored under a hash of every
# parameter above; a rerun with the same parameters loads it instead of training again,
# and an interrupted run resumes from its last checkpoint.

# %%
chapter.train(ch, r)
if r.history:
    ax = chapter.training_curve(r.history)
else:
    print(f"Using {model} / {pretrained}: no training curve.")

# %% [markdown]
# *What to look for* (only for a model trained here): the running mean of the contrastive loss
# (the solid line over the faint per-step values) should fall steeply at first and then level
# off; a curve still falling steeply at the last step means more steps would still change
# the model.

# %% [markdown]
# ## Zero-shot classification
#
# A class's zero-shot classifier is the normalised mean of its prompts' text embeddings,
# over the prompts below; an image goes to the class whose classifier is nearest.

# %% tags=["remove-input"]
show_source(models.class_text_weights)

# %% tags=["remove-input"]
show_source(models.average_prompts)

# %% [markdown]
# A toy check by hand: two classes, two prompts each, in two dimensions. Class 0's prompts
# point along $(1, 0)$ and $(0, 1)$: their mean $(0.5, 0.5)$ normalised is
# $(0.707, 0.707)$. Class 1's prompts are both $(0, 1)$. The image $x = (1, 0)$ scores
# $0.707$ for class 0 and $0$ for class 1.

# %%
prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
weights = models.average_prompts(prompts)
print(models.CLASS_PROMPTS, weights, torch.tensor([[1.0, 0.0]]) @ weights.T, sep="\n")

# %% [markdown]
# On the held-out test images:

# %%
chapter.classify(ch, r)
print(
    f"zero-shot accuracy on {len(r.sample)} test images:",
    ", ".join(f"{plots.human_label(k)} {v:.1%}" for k, v in r.accuracy.items()),
)
ax = plots.confusion(r.sample.labels, r.logits.argmax(1).numpy(), ch.world.class_names)

# %% [markdown]
# *What to look for:* each row is a true class, split over the predicted classes, so a good
# classifier has a dark diagonal and pale cells elsewhere. The off-diagonal cells that are not
# pale say which classes are taken for which: mistakes between classes that share a home
# habitat (the table of classes above) point to the background, mistakes between classes
# with similar parts point to the parts.

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
plots.table(pd.Series(r.shortcut, name="top-1 accuracy").to_frame())

# %% [markdown]
# ## What the model uses, measured
#
# The probe above mixes creatures and backgrounds. A cleaner measure draws every test
# creature *prototypically* (its class's typical attributes, in its home habitat), then
# draws the very same creatures again with one factor changed — one part's colour,
# pattern or size, or the habitat — and records how much the true class's logit margin
# (its logit minus the best other class's) drops. A factor the model ignores drops by 0.

# %% tags=["remove-input"]
show_source(reliance.intervene)

# %% [markdown]
# The bars are the mean drop over the creatures that have the factor, with 95 % bootstrap
# intervals; the habitat is orange. This *measured reliance* is the yardstick: the later
# chapters' explanation methods each claim what the model uses, and chapter 7 scores them
# against exactly this measurement.

# %%
chapter.measure_reliance(ch, r)
reliance_per_factor = chapter.reliance_table(ch, r)
ax = chapter.reliance_figure(reliance_per_factor)

# %% [markdown]
# *What to look for:* the factors whose bar and interval lie clearly right of the zero line are
# the ones the model uses; an interval that touches 0 marks a factor it ignores. The orange
# habitat bar, ranked among the part factors, says how much the background steers the
# decision: this ranking is what the later chapters' explanations should reproduce.

# %% [markdown]
# ## Explore by hand
#
# Pick a creature, change one part's colour, pattern or size, or move it to another
# habitat, and watch the model's top classes. In the built book this is a static figure:
# a creature of the first class with one part factor set to another value, the factor the
# model relies on most (in the figure above) among the parts that class has; in JupyterLab
# the controls are live.

# %%
clip, _, tokenizer, _ = ch.clip()
change = chapter.explorer_change(ch.world, reliance_per_factor)
explore.world_explorer(ch.world, clip, tokenizer, **change)

# %% [markdown]
# *What to look for:* the same creature as sampled (left) and changed (middle), and for each of
# the model's top classes its probability after the change (blue) beside before it (grey). If
# the model relies on the changed factor, the true class's blue bar is shorter than its grey
# one and other classes gain; bars that barely move mean this one creature does not show the
# average drop measured above.

# %% [markdown]
# The explanation methods in the following chapters each make a claim about what the
# model uses. Here, every such claim can be checked against masks, attributes and
# planted captions, and against counterfactual images that change one factor at a time.

# %% tags=["remove-input"]
chapters.finish(ch, r, chapter)

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Each solution below is computed by running the exercise (click
# to show it); the first row of each is the chapter's own setting (in exercise 1, the
# no-shortcut model).
#
# **1. Plant the shortcut.** Chapter 7 trains small CLIPs on worlds of six classes where the
# answer is forced: in the *shortcut* world every creature sits in its class's home habitat, in
# the *no-shortcut* world the habitat is drawn at random. Both are tested here on no-shortcut
# test images, where a creature is at home only by chance. Predict each model's accuracy at
# home and away from home. Both rows are `exercise_steps`-step planted CLIPs (at the default,
# the very models of chapter 7, trained once for both chapters), so compare them with each
# other, not with the chapter's model.

# %% tags=["hide-cell"]
ch.exercise("planted shortcut", chapter.exercise_train_habitat, condition="shortcut")

# %% [markdown]
# **2. Break the habitat cue at test time.** Without retraining, test the chapter's CLIP on
# images drawn with `habitat_correlation` 0, where the background is drawn at random (a
# creature is at home only by chance). Which number of the shortcut table above does the
# new accuracy approach?

# %% tags=["hide-cell"]
ch.exercise("no home habitats at test time", chapter.exercise_test_habitat, habitat_correlation=0.0)

# %% [markdown]
# **3. One prompt instead of an ensemble.** Zero-shot classification averages the prompts
# "a photo of a {}." and "a {}.". What happens with the bare class name "{}" only? No
# training caption is the bare class name: class captions are "a photo of a {}.", "a {}."
# and "a picture of a {}.", and every other caption style puts the name in a sentence.

# %% tags=["hide-cell"]
ch.exercise("bare class-name prompt", chapter.exercise_prompts, template="{}")
