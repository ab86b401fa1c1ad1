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
# # The verdict
#
# Every earlier chapter scored one method against the *designed* features of Concept
# World. That is not yet the truth about the *model*: a trained network need not use the
# features its data was built from {cite}`zhang2023attributionlab`, and a method's failure
# cannot be told from a model that simply does not use what we planted. This chapter asks,
# on one set of models and for every method at once, whether an explanation registers what
# the model uses — and it asks it with measures that *can* register it:
#
# 1. **Planted models.** Small world CLIPs trained where the answer is forced: a *shortcut*
#    world (one habitat per class: the background alone tells the class), a *no-shortcut*
#    world (the habitat independent of the class) and a *blind* world (one part attribute
#    drawn at random in training, so the model cannot use it); several seeds of each.
# 2. **Truth of use, measured** by changing one factor at a time on otherwise identical
#    images, with its own test–retest ceiling.
# 3. **Scores at the granularity a method states.** A map can say *where* (the background or
#    a part), not *which attribute*; a named concept can say "red head". Each conversion is
#    shown with its **oracle** (the truth pushed through it: the ceiling) and its **null**
#    (uninformative input pushed through it: what the conversion alone scores).
# 4. **Three tests**: (a) agreement with the measured reliance, as the gain over the method's
#    own null; (b) two paired tests on the same images — does the explanation move with the
#    planted habitat shortcut, and with the blinded attribute?; (c) the model randomisation
#    check {cite}`adebayo2018sanity`, in the same currency for every method. Intervals come
#    from one bootstrap over seeds and images, so differences are paired.
#
# Before the planted models, the chapter runs the checks that need no ground truth on the
# model under study itself: chapter 1's world CLIP by default, or *your* CLIP and images
# (`model`, `pretrained`, `dataset`, `data_root`). With `planted=False` the chapter stops there:
# the planted-model sections cost minutes and do not depend on the model under study.

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
# This chapter (every name below is declared, with its type and range, in chapters.verdict.PARAMETERS)
planted = True  # False: only the model-only sanity checks (the planted-model sections are skipped)
dataset = "world"  # images of the sanity checks: "world", "imagefolder" or "cub"
data_root = None  # folder of a real data set
conditions = ["shortcut", "no-shortcut", "blind"]
n_seeds = 3
blind_factor = "head colour"
planted_classes = 6
planted_steps = 150
planted_batch_size = 64
planted_n_train = 2000
planted_lr = 0.001
n_images = 256
n_bootstrap = 200
n_permutations = 200
ranking_beta = 0.02
sae_n_corpus = 4096
sae_epochs = 30
probe_lambda = None
deal_steps = 20
lavise_n_train = 1024
lavise_epochs = 5
n_random_models = 2
n_random_images = 64
cascade = [1, 3, 6]

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'"
    )
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from conceptlab import chapters, explainers, plots, reliance, verdict
from conceptlab.chapter import setup, show_source
from conceptlab.chapters import verdict as chapter  # this chapter's code

ch = setup(chapter.NAME, globals(), chapter.PARAMETERS)
r = chapter.Result()

# %% [markdown]
# ## Sanity checks on the model under study
#
# Two checks need no planted model and no ground truth, so they run on any CLIP: the chapter's
# `model` on `n_random_images` images of `dataset`, each explained by its own class text. The
# **model randomisation cascade** {cite}`adebayo2018sanity` re-initialises the top `k` stages of
# the vision tower (`k` from `cascade`, then every stage; the text tower is kept) and compares
# each explainer's maps with the trained model's: Spearman's $\rho$ over the map's pixels, per
# image, averaged, with a bootstrap interval over images. The **null band** is the same
# similarity between the maps of two *different* images: what "no relation" looks like. A map
# that explains the model must fall into it (or below) once the weights are gone. The **input
# null** is the explainer's maps of noise images: if they resemble its maps of real images,
# part of every map comes from the explainer, not from the image. A randomised copy never
# touches the model under study.

# %% tags=["remove-input"]
show_source(verdict.model_only_check)

# %% [markdown]
# By hand: a map against itself scores 1, against its negative −1 (every rank reversed), and
# against a copy with its pixels shuffled about 0 (the shuffled band below).

# %%
toy_map = np.arange(16.0).reshape(1, 4, 4)
verdict.map_similarity(toy_map, toy_map), verdict.map_similarity(toy_map, -toy_map)

# %%
sanity = chapter.sanity(ch, r)
chapter.sanity_figure(r)
plots.table(sanity)

# %% [markdown]
# *What to look for:* each curve should fall from 1 towards the grey band as more stages are
# re-initialised; a curve that stays high explains the explainer, not the weights. The red line,
# the maps of noise images against the real ones, should sit near the band too.

# %% tags=["hide-input"]
Markdown("\n\n".join(chapter.sanity_sentences(r)))

# %% [markdown]
# ## Planted models
#
# With `planted=False` this section and every one after it print why they are skipped.
#
# Six classes, because Concept World has six habitats: with one home habitat per class and
# `habitat_correlation` 1, the background decides the class. The world and the CLIP are the
# chapter-1 defaults except for what each condition changes and a shorter, faster training
# (`planted_steps` at learning rate `planted_lr`). Each condition gets `n_seeds` models.

# %%
if chapter.section(ch, "Planted models"):
    display(plots.table(chapter.plant(ch, r)))

# %% [markdown]
# ## Truth of use, by measurement
#
# `intervene` draws each test creature with its class-typical attributes in its home
# habitat, then again with exactly one factor changed (same pose, background phase and
# noise). The reliance of a model on a factor is the mean drop of the true class's
# zero-shot margin $m = z_y - \max_{c \neq y} z_c$ over the images that have the factor:
# $$r_f = \mathbb{E}_x\,[\,m(x) - m(x_{f \leftarrow v'})\,].$$

# %% tags=["remove-input"]
show_source(reliance.intervene)

# %% [markdown]
# A toy check by hand: editing "head pattern" changes exactly one number of each creature's
# attribute table, the head's pattern, and nothing else.

# %%
labels = ch.world.sample(3, "test").labels
typical = ch.world.typical_attributes(labels).copy()
edit = reliance.factor_edit("head pattern", np.random.default_rng(0))
edited, _ = edit(labels, typical.copy(), ch.world.home_habitats(labels))
(edited != typical).sum(axis=(1, 2)), (edited != typical)[:, 4, 1]

# %%
if chapter.section(ch, "Truth of use, by measurement"):
    measured = chapter.measure_truths(ch, r)
    display(plots.table(measured))

# %% [markdown]
# Before any method is judged, the measurement must recover what was planted: every shortcut
# model relies more on the habitat than every no-shortcut model, every blind model relies less
# on the blinded attribute than every no-shortcut model, and every model learned its task (a
# model that learned nothing "relies" on nothing). The measurement's own precision is its
# test–retest agreement: the reliance measured on the even images against the odd ones.

# %%
if chapter.section(ch):
    print(r.recovered, "test–retest rho:", r.retest)
    display(plots.table(r.check))

# %% [markdown]
# ## Scores at the granularity a method states
#
# **Maps** (the CLIP's class map — gradient-weighted relevance {cite}`chefer2021generic` — the
# maps of the class's descriptors, explained as bare text as DEAL does {cite}`li2024deal`, and
# plain gradient × input) are scored per *region*: the background (where the habitat is) and
# each part. The background covers about nine tenths of a creature image, so a raw energy share
# would rank it first for every model; the score is the map's mean value *on* the region (its
# energy divided by the region's area), in units of the map's mean over all images (1: as dense as
# average). The truth per region is the sum of the part's drops.

# %% tags=["remove-input"]
show_source(verdict.map_region_scores)

# %% [markdown]
# By hand: a uniform map scores 1 on every region; a map of the creature's silhouette scores 0
# on the background and the same on every part (the inverse of the creature's share of the image).

# %%
if chapter.section(ch, "Scores at the granularity a method states"):
    toy = r.truths[r.subjects[0].name].base.first(2)
    uniform = verdict.map_region_scores(np.ones((2, 8, 8)), toy)
    silhouette = verdict.map_region_scores(verdict.silhouette_maps(toy), toy)
    print(dict(zip(verdict.REGIONS, uniform[0].round(2))), dict(zip(verdict.REGIONS, silhouette[0].round(2))))

# %% [markdown]
# **Named concepts** (DN-CBM {cite}`rao2024dncbm`: SAE concepts named from the world's
# vocabulary, weighted by the method's own sparse probe — chapter 5's default; LaViSE
# {cite}`yang2022lavise`: the words its head gives the filters the class decision uses) are
# scored per *factor*: "red head" is head colour, "head" is all three head attributes, a
# habitat word is the habitat. A conversion has a prior of its own: words drawn at random from
# a vocabulary with more colour words than size words already favour colour. That is each
# word method's null.

# %% tags=["remove-input"]
show_source(verdict.vocabulary_prior)

# %%
if chapter.section(ch):
    vocabulary = explainers.lavise_vocabulary(r.subjects[0])
    prior = verdict.vocabulary_prior(vocabulary, toy.labels, r.subjects[0].world)
    display(plots.table(pd.Series(np.nanmean(prior, 0), index=reliance.FACTORS, name="LaViSE's vocabulary prior")))

# %% [markdown]
# LaViSE explains CNN filters; on a ResNet world CLIP these are `layer4`'s filters. On a ViT (the
# book's default) we read the channels of the patch tokens entering the last block, through a
# forward hook on that block (public open_clip modules only):

# %% tags=["remove-input"]
show_source(explainers.tower_maps)

# %% [markdown]
# **A reward ranking, kept apart.** EX2 {cite}`esfandiarpoor2024ex2` aligns a language model with
# RL and inspects its descriptions with a judge. Chapter 4 runs that pipeline on this chapter's
# shortcut and no-shortcut models (the habitat test only; its result is in chapter 4 and in the
# book's headline table), so this scoreboard has no EX2 row. It has a **KL-optimal reward ranking**: the policy
# that EX2's objective converges to, $\pi(d \mid c) \propto \exp(R(d, c)/\beta)$, over true
# one-factor sentences written from the world, with EX2's reward $R$. It tests the reward, not EX2.

# %% [markdown]
# ## Every explainer, on every model
#
# The DEAL rows explain a DEAL-tuned copy of each planted model and are scored against *that
# copy's* measured reliance. Two references bracket the scores: the measured reliance itself
# (the ceiling) and noise drawn afresh for each model (chance). Your own explainer enters with
# the same signature, `explainer(subject, batch) -> Explanation`
# (`chapter.rows(ch, r, yours={"mine": explainers.map_method(mine, "...")})`).
# Explanations are kept in the artifact store, keyed by the method's settings, the model (a
# DEAL-tuned or re-initialised copy is another model) and the images, so a rerun that changes only
# how they are scored (`n_bootstrap`, `n_permutations`) loads them; yours are recomputed unless you
# give your method a `config`.

# %%
if chapter.section(ch, "Every explainer, on every model"):
    chapter.tune(ch, r)
    print(list(chapter.rows(ch, r)))
    chapter.explain(ch, r, progress=True)

# %% [markdown]
# ## The tests
#
# (a) is Spearman's $\rho$ between a row's mean scores and the measured reliance, per model, and
# its gain over the same row's null, on one bootstrap over seeds and images:

# %% tags=["remove-input"]
show_source(verdict.agreement)

# %% [markdown]
# (b) compares the same images under two planted models of the same seed: the habitat score
# (shortcut minus no-shortcut model) should rise, the blinded attribute's score (blind minus
# no-shortcut model) should fall. A row *detects* a planted property when the interval of the
# difference excludes 0 in the planted direction; the sign-flip band is what exchangeable
# conditions give. (c) re-initialises the top vision stages and asks whether the explanation
# stays more similar than a shuffled copy of itself; LaViSE counts only stages at or below the
# layer it explains.

# %% tags=["remove-input"]
show_source(verdict.paired_test)

# %%
if chapter.section(ch, "The tests"):
    chapter.score(ch, r)
    cascade_table = chapter.randomise(ch, r)

# %% [markdown]
# ## The scoreboard
#
# *What to look for* in the figure: a bar whose interval clears 0 (the row's own null for (a),
# no difference for the two planted tests (b)); the habitat test should be positive and the
# blindness test negative for a method that sees what was planted.
#
# One row per explainer. (a): $\rho$ with its 95 % interval, the row's null, the gain over it
# (with its interval), the oracle that the row's conversion allows, and the upper end of the
# permutation band. (b): the paired differences and whether each is detected. (c): the mean
# similarity after re-initialisation, the upper end of its band, and whether the explanation
# follows the weights.

# %% tags=["hide-input"]
if chapter.section(ch, "The scoreboard"):
    chapter.scoreboard_figure(r)
    display(plots.table(chapter.scoreboard(r)))

# %% tags=["hide-input"]
if chapter.section(ch):
    display(plots.table(chapter.what_is_explained(r)))

# %% tags=["hide-input"]
if chapter.section(ch):
    display(Markdown("\n\n".join(chapter.conclusion(r))))

# %% [markdown]
# How each row's explanation changes along the cascade (similarity to the trained model's
# explanation; 1 = unchanged; LaViSE's rows start at the first stage that reaches its layer):

# %% tags=["hide-input"]
if chapter.section(ch):
    display(plots.table(cascade_table.set_index(["row", "model", "stages re-initialised"])))

# %% [markdown]
# ## Summary

# %% tags=["hide-input"]
chapters.finish(ch, r, chapter)

# %% [markdown]
# ## Exercises
#
# 1. **Raw shares.** Score the CLIP's class map by its raw energy share instead of the
#    area-normalised one. Predict: does the habitat test's difference keep its sign, and does
#    its interval still exclude 0?

# %% tags=["hide-cell"]
if chapter.section(ch, "Exercises (they use the planted models)"):
    display(ch.exercise("area", chapter.exercise_area, area_normalised=False))

# %% [markdown]
# 2. **How good is good enough?** Add noise to the measured reliance itself and use it as an
#    explainer. Predict the noise level (in units of the reliance's own spread) at which its
#    agreement falls to the level of the best method on the scoreboard.

# %% tags=["hide-cell"]
if chapter.section(ch):
    display(ch.exercise("noisy_truth", chapter.exercise_noisy_truth, noise_level=3.0))

# %% [markdown]
# 3. **Fewer images.** Measure and explain every model on a quarter of the images. Predict
#    how much wider the intervals of the CLIP class map's tests become.

# %% tags=["hide-cell"]
if chapter.section(ch):
    display(ch.exercise("fewer_images", chapter.exercise_fewer_images, n_images=max(8, n_images // 4)))
