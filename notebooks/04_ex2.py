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
# # EX2: what text does the VLM prefer?
#
# EX2 (*Extract and Explore*) {cite}`esfandiarpoor2024ex2` asks which textual features a
# contrastive VLM relies on. It aligns a language model with reinforcement learning so that
# it writes the descriptions of a class that the VLM's text encoder finds closest to the
# class's images, and then inspects those descriptions: are they informative at all, and
# which kinds of attribute (colour, parts, habitat, behaviour ...) do they mention? The paper
# finds that spurious text ("click to enlarge photo of ...") carries a large share of the
# preference, and non-visual attributes such as habitat a large share of the rest.
#
# On real models none of this can be checked. Here the VLM is the Concept World CLIP of
# chapter 1, whose training captions we planted, and the language model is a tiny Llama
# trained on a world "web" of fact sheets and answers (true and a few false part descriptions,
# habitat and behaviour facts, captions and web phrases). The chapter checks each link of the
# mechanism in turn: whether the language model knows the world before any RL; what the VLM's
# reward prefers, and so what alignment should find; whether alignment measurably moves the
# model, on the same samples before and after; and whether EX2 recovers a preference we plant
# in a VLM.

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
# This chapter (every name below is declared, with its type and range, in conceptlab/chapters/ex2.py)
dataset = "world"  # or "imagefolder" / "cub" with data_root
data_root = None
images_per_class = 256
templates = None  # a JSON list of templates (the original's mult_template_v1.json); None: built-in
lm = "world"  # "world" trains the world's tiny Llama; otherwise a transformers causal LM name or folder
lm_quantization = None  # "8bit" / "4bit" on a GPU (bitsandbytes)
lm_corpus_size = 6000
lm_fact_sheets = 40
lm_answer_mix = {
    "visual_true": 0.4,
    "visual_false": 0.03,
    "habitat": 0.15,
    "behaviour": 0.12,
    "class": 0.1,
    "web_seen": 0.1,
    "web_unseen": 0.1,
}
lm_steps = 600
lm_min_true_share = 0.9  # the gate before RL
lora_r = 0
grpo_steps = 80
grpo_lr = 0.0003
grpo_beta = 0.2  # the original PPO run started with a KL coefficient of 0.2
num_generations = 8
prompts_per_step = 4
max_new_tokens = 32
samples_per_query = 2  # fixed samples per query, before and after alignment
null_draws = 3  # further independent draws of the pretrained LM on the same slots: the null
preference_sentences = 32
judge = "world"  # "world" (ground truth), a transformers model, or "openai:<model>@<base_url>"
judge_api_key_env = "OPENAI_API_KEY"
judge_min_true = 1
n_counterfactual = 512
planted = True  # EX2 on chapter 7's planted shortcut and no-shortcut CLIPs
planted_seeds = 3
planted_condition = "shortcut"  # or "habitat-unnamed": captions that never name the habitat (exercise 6)
planted_reward_habitat = None  # habitat correlation of their reward images; None: the world's
planted_n_images = 256  # images measuring their habitat reliance (chapter 7's n_images)
planted_steps = 150  # their recipe is chapter 7's: the same values load the same stored models
planted_batch_size = 64
planted_n_train = 2000
planted_lr = 0.001

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab[llm] @ git+https://github.com/conceptlab/conceptlab'"
    )
import pandas as pd
import torch
from IPython.display import display

from conceptlab import chapters, ex2, judges, plots, textlm
from conceptlab.chapter import fidelity_table, setup, show_source
from conceptlab.chapters import ex2 as chapter  # this chapter's code
from conceptlab.chapters.report import reported_table

ch = setup(chapter.NAME, globals(), chapter.PARAMETERS)
r = chapter.Result()

# %% [markdown]
# ## The method on the page
#
# The reward of a description $t$ of class $c$ is its mean cosine similarity to the images of
# the class, $r(t, c) = \frac{1}{|I_c|} \sum_{x \in I_c} f_T(t) \cdot f_I(x)$ with unit
# embeddings. Because a mean of dot products is the dot product with the mean, the class
# means $\bar f_c$ are computed once and a batch of descriptions costs one text encoding:

# %% tags=["remove-input"]
show_source(ex2.mean_cosine_reward)

# %% [markdown]
# A toy run you can check by hand: class 0's images all point along $(1, 0)$; class 1 has two
# images, $(0.6, 0.8)$ and $(-0.6, 0.8)$, whose mean is $(0, 0.8)$. The text $(0.6, 0.8)$ has
# cosines $0.6$ with class 0, and $1$ and $0.28$ with class 1's images: rewards $0.6$ and $0.64$.

# %%
text = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
ex2.mean_cosine_reward(text, class_means=torch.tensor([[1.0, 0.0], [0.0, 0.8]]), class_index=[0, 1])

# %% [markdown]
# The inspection asks a judge, as the original does, in one conversation: a system message,
# one worked example with a JSON answer and a short explanation, then the question.

# %% tags=["remove-input"]
show_source(judges.judge_messages)

# %%
conversation = judges.judge_messages(judges.INFORMATIVE, "zorbil", "click to enlarge a zorbil")
for message in conversation:
    print(f"[{message['role']}] {message['content']}\n")
print(judges.parse_answer('{"explanation": "It names no detail.", "answer": "No"}'))

# %% [markdown]
# ## A language model that knows the world
#
# EX2 can only find what the VLM prefers among the things its language model can say. On the
# world, the language model is a tiny Llama trained on a "web" of two kinds of documents: a fact
# sheet per class (every part with its attributes, the habitat, the behaviour), and answers to
# the EX2 queries mixing sentence kinds in the proportions `lm_answer_mix` (true part
# descriptions, a small stated share of false ones, habitat and behaviour facts, class-name
# captions, and web phrases, some of which the world CLIP saw in its captions and some it never
# saw). Its tokenizer has one token per word, its loss covers the answer only, and its rotary
# positions make a left-padded prompt (as trl batches them) score exactly as an unpadded one.
# One fact sheet:

# %%
chapter.load_models(ch, r)
print(textlm.fact_sheet(ch.world.classes[0]) if ch.on_world else f"LM: {lm}")
print(
    f"{len(r.queries)} queries ({len(r.templates)} templates x {len(r.class_names)} classes); "
    f"LM with {r.n_lm_parameters:,} parameters"
)

# %% [markdown]
# **A gate before RL.** The LM answers every query `samples_per_query` times; these samples are
# also the fixed "before" set of the evaluation. The world judge counts the claims they make
# about their class (a part's attributes, a habitat, a behaviour) and how many are true. As a
# reference, the same descriptions are judged as if they were about a random other class. With
# the world LM the chapter stops here, with a message, unless at least `lm_min_true_share` of the
# claims are true: aligning a model that does not know the world shows nothing about EX2.

# %%
chapter.sample_before(ch, r)
chapter.check_knowledge(ch, r)

# %% [markdown]
# ## The target before the run
#
# What should alignment find? On the world it can be read off the reward directly: for every
# class, `preference_sentences` sentences of each kind, written from the ground truth, and their
# rewards. Each kind's mean is compared with a class-name caption ("a photo of a zorbil."),
# paired per class, with a 95 % interval over classes.

# %%
chapter.target(ch, r)
r.kind_table().round(4) if r.preference is not None else None

# %% [markdown]
# KL-regularised RL has a known optimum: the policy $\pi^*(k) \propto \pi_{ref}(k)\, e^{r_k / \beta}$
# reweights what the pretrained model already writes by the exponentiated reward. GRPO (group
# relative policy optimisation, the RL algorithm of the alignment below) divides rewards by
# their spread within a group of completions for one query, so the reward is measured in that
# unit:

# %% tags=["remove-input"]
show_source(ex2.optimal_mix)

# %% [markdown]
# By hand: two kinds written half the time each, rewards 0 and 0.1, $\beta = 0.1$: the second
# gains a factor $e^{1} \approx 2.72$, so $\pi^* = (1, 2.72) / 3.72 = (0.27, 0.73)$.

# %%
ex2.optimal_mix(pd.Series({"a": 0.5, "b": 0.5}), pd.Series({"a": 0.0, "b": 0.1}), beta=0.1).round(2)

# %% [markdown]
# ## Alignment
#
# trl's `GRPOTrainer` samples `num_generations` completions of at most `max_new_tokens` tokens for
# each of `prompts_per_step` queries, each of another class (classes in turn), scores them with
# the reward and pushes up those that beat their group's mean, with a KL penalty `grpo_beta` to
# the pretrained model and dropout off. The logged reward is relative to each class's mean
# before RL, so that steps with different classes can be compared. Everything is cached.

# %%
chapter.align(ch, r)
ax = plots.curve(r.curve, "reward", smooth=chapter.reward_rise(r)["window_steps"])
ax.axhline(0, color="grey", ls=":", lw=1)  # each class's mean reward before RL
ax.set_title("GRPO: reward of the sampled completions, relative to the class's pre-RL mean")

# %% [markdown]
# *What to look for:* the running mean (solid) against the dotted line at 0, each class's mean
# reward before RL: a curve that climbs above 0 and stays there means GRPO finds descriptions the
# CLIP scores higher, one that wanders around 0 within the spread of the faint per-step values
# means it does not. Every step scores fresh samples, so the paired comparison on the same
# samples below, not this curve, decides whether alignment moved the model.

# %% [markdown]
# ## Before and after, on the same samples
#
# The aligned policy answers the same (query, sample) slots with the same seed. The gain is the
# mean over slots of the reward after minus before, with a 95 % bootstrap interval over slots.
# One draw of the pretrained LM can be lucky or unlucky, so the null takes `null_draws` further
# independent draws on the same slots and pools them per slot: the first draw against the pooled
# draws is what sampling alone moves, and the aligned LM against them is the gain beyond it.

# %%
chapter.sample_after(ch, r)
display(chapter.gain_table(r).round(4))
ax = chapter.gain_figure(r)

# %% [markdown]
# *What to look for:* alignment has measurably moved the reward when the orange diamond sits to
# the right of every grey dot and the last row's interval excludes 0. A diamond among the dots
# means the gain is the size of the spread between two draws of the same, unaligned LM.

# %%
chapter.examples(r).style.hide(axis="index")

# %% [markdown]
# ## Inspection
#
# The judge answers the informative question for every description and, for the informative
# ones, the second question: which attribute does it describe? A "no" makes a description
# *spurious*; a reply the judge's parser cannot read is *unparsed*. On the world the ground truth
# adds one category the judge cannot know: a description that states facts about the class, all
# of them false, is **informative but false**, never spurious. The default judge is the ground
# truth itself.

# %%
chapter.inspect_both(ch, r)
display(r.shares().round(3).rename(columns=str.capitalize))
r.attributes().round(3).rename(columns=str.capitalize)

# %% [markdown]
# Did the kinds of sentence move the way KL-regularised RL predicts? Each sentence of the
# descriptions before and after, sorted by kind, beside two predictions of the aligned mix. The
# first applies $\pi^*$ to the kinds, with each kind's mean reward from the target above. But the
# VLM scores whole descriptions, and a sentence's reward depends on what else its description
# says (and where: the text tower reads a fixed number of tokens). The second applies $\pi^*$ to
# the descriptions themselves: each of the pretrained LM's descriptions is reweighted by
# $e^{r / \beta}$ within its class (self-normalised importance weights), and its sentences are
# counted with that weight.

# %% tags=["remove-input"]
show_source(ex2.reweighted_kind_shares)

# %%
if ch.on_world:
    display(r.mix(ch).round(3))
    display(pd.DataFrame(chapter.prediction_agreement(r.mix(ch))).T.round(2))

# %% [markdown]
# ## Ground truth: what does the VLM really rely on?
#
# Each test creature is drawn with its class-typical attributes in its home habitat, and
# again with one factor changed (the habitat swapped, or one part recoloured), with the same
# pose and noise. The drop of the true class's logit margin (`logit_drop`) measures the VLM's
# reliance on that factor, beside how often the descriptions state that factor truly. The
# reward measures which *text* the VLM matches to a class's images, background included; the
# counterfactuals measure which *pixels* decide between classes. The two need not agree.

# %%
chapter.ground_truth(ch, r)
r.mentions_against_reliance().round(3) if r.reliance is not None else None

# %% [markdown]
# ## A planted preference
#
# Does EX2 find what a VLM relies on? Chapter 7 plants the answer: two CLIPs of the same recipe
# that differ in one setting of their training images, the habitat. The *shortcut* CLIP saw every
# creature in its class's home habitat, so the habitat alone tells the class; the *no-shortcut*
# CLIP saw the habitat drawn at random. Interventions measure each one's habitat reliance
# (chapter 1's method). The same language model is aligned to each, with the same settings, the
# same reward images (the world's six first classes, `planted_reward_habitat`) and the same
# prompts per class as above. If EX2's descriptions reveal what a VLM relies on, the shortcut
# CLIP's aligned descriptions mention the habitat more.
#
# Each link is checked on its own: the measured reliance (the plant); the reward's preference
# for habitat sentences over a class-name caption, before any RL; the aligned habitat share that
# KL-regularised RL predicts from those rewards; and what alignment did. Each difference comes
# with its interval over seeds and with its null: the same difference after swapping the two
# models' labels at random, per class for the rewards and per slot for the aligned shares
# (`label_swap_band`). The band covers only the sampling within a seed (which slots, which
# classes); the interval over seeds also covers how trained models differ.

# %%
show_source(chapter.label_swap_band)
chapter.run_planted(ch, r)
if r.planted is not None:
    display(chapter.planted_table(r).round(3))
    chapter.planted_figure(r)

# %% [markdown]
# The reading, generated from the table over the seeds:

# %% tags=["remove-input"]
if r.planted is not None:
    print(chapter.plant_sentence(ch, r))

# %% [markdown]
# How could a CLIP that relies on the habitat reward habitat sentences *less* than one that
# ignores it, if the reading above finds that? One account: EX2's reward is the cosine between a
# description and the class's *mean* image. For the shortcut CLIP the class name already points at
# the habitat (in its training the two never parted), so a habitat sentence adds nothing the
# class name lacks; for the no-shortcut CLIP the habitat is a concept of its own, and where a
# class sits in its home habitat most of the time, the class's mean image carries that habitat.
# Exercise 5 tests the account: it draws the reward's images with the habitat independent of
# the class. Exercise 6 is the positive control: a preference planted in the text, not in the
# images.

# %% [markdown]
# ## Results
#
# The headline numbers with their intervals and references; what the paper reports, what the
# original code computes, and what this book measures; then the differences between this run
# and the original, from the switches in effect.

# %% tags=["hide-input"]
display(reported_table(chapter.headline(ch, r)))
display(fidelity_table(chapter.fidelity_rows(chapter.results(ch, r))))
chapter.differences(ch)

# %% tags=["remove-input"]
chapters.finish(ch, r, chapter)

# %% [markdown]
# ## Exercises
#
# Each exercise changes one thing. Predict what moves, then open the solution: it is
# computed by running the exercise (cached like every artifact).
#
# **1. A stricter judge.** The world judge says "yes" when a description states one true
# fact about the class. Demand two (`judge_min_true=2`). Which shares change, and which
# cannot?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("stricter judge", chapter.exercise_stricter_judge, judge_min_true=2))

# %% [markdown]
# **2. A weaker leash.** Divide the KL coefficient by ten (`grpo_beta`). Does the policy move
# further from what the pretrained model writes, and does the reward gain grow with it?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("weaker KL penalty", chapter.exercise_alignment, grpo_beta=grpo_beta / 10))

# %% [markdown]
# **3. Shorter descriptions.** Let both models write at most 8 tokens. Does a shorter
# description carry fewer facts, and more spurious text?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("shorter descriptions", chapter.exercise_description_length, description_tokens=8))

# %% [markdown]
# **4. A cheaper reward.** The original averages over 256 images of a class. Estimate the
# reward from 8: how well does it still rank the aligned descriptions?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("reward from 8 images", chapter.exercise_images_per_class, reward_images=8))

# %% [markdown]
# **5. Other reward images.** Draw the reward's images with the habitat independent of the class
# (`planted_reward_habitat=0.0`), as the interventions draw theirs. Which way does each VLM's
# habitat reward move, and does the aligned difference now follow the measured reliance?

# %% tags=["hide-cell"]
if ch.on_world and planted:  # the planted CLIPs are world CLIPs
    display(ch.exercise("habitat-independent reward images", chapter.exercise_planted, planted_reward_habitat=0.0))

# %% [markdown]
# **6. A positive control.** The plant above is in the *images*. Plant a preference in the
# *text* instead: a CLIP trained on the no-shortcut world's images whose captions never name the
# habitat (`planted_condition="habitat-unnamed"`: habitat captions 0 instead of 0.2 of the mix,
# the only setting that differs). Its images give the habitat the same use, so the measured
# reliance should not move; its text tower never learnt the habitat words. Does its reward gap
# fall beyond its null, and does alignment lower the habitat share with it? If both do, EX2
# recovers a preference of the reward, and one the classifier's reliance does not share.

# %% tags=["hide-cell"]
if ch.on_world and planted:  # the planted CLIPs are world CLIPs
    display(ch.exercise("habitat never named", chapter.exercise_planted, planted_condition="habitat-unnamed"))
