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
# chapter 1, whose training captions we planted, and the language model is a small GPT-2
# trained on a world "web" of true and false part descriptions, habitat and behaviour facts
# and spurious web phrases. Every description can be labelled against the ground truth,
# and what the VLM relies on can be measured directly with counterfactual images.

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
# This chapter (every name below is declared, with its type and range, in ex2.PARAMETERS)
dataset = "world"  # or "imagefolder" / "cub" with data_root
data_root = None
images_per_class = 256
templates = None  # a JSON list of templates (the original's mult_template_v1.json); None: built-in
lm = "world"  # "world" trains the world GPT-2; otherwise a transformers causal LM name or folder
lm_quantization = None  # "8bit" / "4bit" on a GPU (bitsandbytes)
lm_corpus_size = 6000
lm_answer_mix = {"visual_true": 0.3, "visual_false": 0.15, "habitat": 0.15, "behaviour": 0.1,
                 "class": 0.1, "spurious": 0.2}
lm_steps = 400
lora_r = 0
grpo_steps = 60
grpo_lr = 0.0003
grpo_beta = 0.2  # the original PPO run started with a KL coefficient of 0.2
num_generations = 8
prompts_per_step = 4
max_new_tokens = 32
judge = "world"  # "world" (ground truth), a transformers model, or "openai:<model>@<base_url>"
judge_api_key_env = "OPENAI_API_KEY"
judge_min_true = 1
n_counterfactual = 512
second_vlm = False  # True: also align to a second world CLIP trained on other planted rates
second_world = {"habitat_correlation": 0.3,
                "caption_mix": {"visual": 0.4, "class": 0.2, "habitat": 0.05, "behaviour": 0.05,
                                "spurious": 0.3}}
second_world_clip = {"steps": 150}

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab[llm] @ git+https://github.com/conceptlab/conceptlab'")
import time

import pandas as pd
import torch
from IPython.display import display

from conceptlab import chapter, ex2, judges, plots
from conceptlab.reliance import rank_correlation

ch = chapter.setup("04_ex2", globals(), ex2.PARAMETERS)
t_start = time.time()

# %% [markdown]
# ## The method on the page
#
# The reward of a description $t$ of class $c$ is its mean cosine similarity to the images of
# the class, $r(t, c) = \frac{1}{|I_c|} \sum_{x \in I_c} f_T(t) \cdot f_I(x)$ with unit
# embeddings. Because a mean of dot products is the dot product with the mean, the class
# means $\bar f_c$ are computed once and a batch of descriptions costs one text encoding:

# %% tags=["remove-input"]
chapter.show_source(ex2.mean_cosine_reward)

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
chapter.show_source(judges.judge_messages)

# %%
conversation = judges.judge_messages(judges.INFORMATIVE, "zorbil", "click to enlarge a zorbil")
for message in conversation:
    print(f"[{message['role']}] {message['content']}\n")
print(judges.parse_answer('{"explanation": "It names no detail.", "answer": "No"}'))

# %% [markdown]
# ## The VLM, the language model and alignment
#
# The chapter's CLIP gives the reward; the language model answers the 25 queries per class
# (each template followed by a blank line). On the world, the LM is a small GPT-2 trained on
# a "web" corpus whose mix of sentence kinds is `lm_answer_mix`. trl's `GRPOTrainer` then
# samples `num_generations` completions of at most `max_new_tokens` tokens for each of
# `prompts_per_step` queries, scores them with the reward, and pushes up those that beat
# their group's mean, with a KL penalty `grpo_beta` to the pretrained model. Everything is
# cached: a rerun loads the LM, the policy and the descriptions from the store.

# %%
run = ex2.pipeline(ch)
curve = pd.DataFrame(run["curve"])
reward_first, reward_last, window = ex2.reward_rise(run["curve"])
ax = plots.curve(run["curve"], "reward", smooth=window)
ax.set_title("GRPO: mean reward of the sampled completions")
n_templates, n_classes = len(run["templates"]), len(run["class_names"])
print(f"{n_templates * n_classes} queries ({n_templates} templates x {n_classes} classes); "
      f"LM with {sum(p.numel() for p in run['lm'].parameters()):,} parameters")
print(f"mean reward: first {window} steps {reward_first:.4f}, last {window} {reward_last:.4f}")

# %% [markdown]
# ## Descriptions before and after alignment
#
# One description per template per class, sampled with top-p 1 and top-k 0, from the
# pretrained and from the aligned model (both saved as JSON in the artifact store).

# %%
before, after = run["describe"]("before"), run["describe"]("after")
print(f"mean reward: before {before.reward.mean():.4f}, after {after.reward.mean():.4f}")
pick = run["queries"].index[(run["queries"].template_index == 0) & (run["queries"].class_index < 4)]
pd.DataFrame({"class": run["queries"].class_name[pick], "before": before.description[pick],
              "after": after.description[pick]}).style.hide(axis="index")

# %% [markdown]
# ## Inspection
#
# The judge answers the informative question for every description and, for the informative
# ones, the second question: which attribute does it describe? A "no" makes a description
# *spurious*. On the world the ground truth adds one category the judge cannot know:
# a description that states facts about the class, all of them false, is **informative
# but false**, never spurious. The default judge is the ground truth itself.

# %%
truth = ch.world if ch.on_world else None
judge_fn = judges.make_judge(judge, truth, judge_api_key_env, judge_min_true)
labelled = {stage: ex2.inspect(df, judge_fn, truth)
            for stage, df in {"before": before, "after": after}.items()}
shares = pd.DataFrame({stage: ex2.kind_shares(df) for stage, df in labelled.items()})
shares.index.name = "kind of description"
display(shares.round(3).rename(columns=str.capitalize))
attributes = ex2.attribute_table(labelled)
attributes.round(3).rename(columns=str.capitalize)

# %% [markdown]
# Which kinds of description carry the VLM's preference? The mean reward of each kind,
# before and after alignment.

# %%
both = pd.concat([df.assign(stage=stage) for stage, df in labelled.items()], ignore_index=True)
by_kind = both.groupby(["kind", "stage"]).reward.agg(["count", "mean"]).unstack("stage")
by_kind.round(4)

# %% [markdown]
# ## Ground truth: what does the VLM really rely on?
#
# Each test creature is drawn with its class-typical attributes in its home habitat, and
# again with one factor changed (the habitat swapped, or one part recoloured), with the same
# pose and noise. The drop of the true class's logit margin (`logit_drop`) measures the
# VLM's reliance on that factor. EX2 makes a claim about the same factors: how often the
# aligned descriptions state them truly. Do the two agree?

# %%
world_results = {}
if ch.on_world:
    reliance = ex2.cached_reliance(ch, ch.clip(), ch.key()).set_index("factor")
    mentions = pd.DataFrame({k: ex2.factor_mentions(v) for k, v in labelled.items()})
    check = reliance[["reliance", "logit_drop"]].join(mentions.add_prefix("EX2 "))
    check["EX2 gain"] = check["EX2 after"] - check["EX2 before"]
    rho_share = rank_correlation(check.logit_drop, check["EX2 after"])
    rho_gain = rank_correlation(check.logit_drop, check["EX2 gain"])
    world_results = {"spearman_reliance_share": rho_share, "spearman_reliance_gain": rho_gain,
                     "reliance": reliance.reliance.to_dict(),
                     "mention_share_after": mentions["after"].to_dict()}
    print(f"Spearman(logit drop, EX2 share after) = {rho_share}")
    print(f"Spearman(logit drop, EX2 gain) = {rho_gain}")
    display(check.round(3))

# %% [markdown]
# The reward can also be read directly: the mean reward of sentences of each kind, written
# from the ground truth for every class. This is the preference alignment should discover.

# %%
if ch.on_world:
    preference = ex2.text_preference(run["reward"], ch.world).groupby("kind").reward.mean()
    display(preference.sort_values(ascending=False).round(4).to_frame("mean reward"))

# %% [markdown]
# ## Different VLMs prefer different attributes
#
# With `second_vlm=True`, a second world CLIP is trained on a world where the habitat says
# less about the class and more captions are web phrases (`second_world`, `second_world_clip`),
# and the same pretrained language model is aligned to it with the same settings. Training it
# costs about as much as the rest of the chapter, so the book's run leaves it off; the lesson
# parameters (`notebooks/lesson.yml`) switch it on once its artifacts are built.

# %%
second = None
if ch.on_world and model == "world" and second_vlm:
    bundle_b, key_b = ex2.second_vlm(ch)
    b = ex2.align_to(ch, run, bundle_b, key_b)
    preference_b = ex2.text_preference(b["reward"], ch.world).groupby("kind").reward.mean()
    second = {"labelled": ex2.inspect(b["after"], judge_fn, ch.world), "curve": b["curve"],
              "reliance": ex2.cached_reliance(ch, bundle_b, key_b).set_index("factor"),
              "preference": preference_b}

# %%
if second is not None:
    vlms = {"VLM A (chapter 1)": labelled["after"], "VLM B (second)": second["labelled"]}
    worlds = (ch.world_cfg.to_dict(), key_b["model"]["world"])
    drop = [reliance.logit_drop.habitat, second["reliance"].logit_drop.habitat]
    kinds = {k: [ex2.kind_shares(v)[k] for v in vlms.values()] for k in ("spurious", "false")}
    compare = pd.DataFrame({
        **{f"{k} (planted)": [ex2.planted(w)[k] for w in worlds] for k in ex2.planted(worlds[0])},
        "habitat reliance (logit drop)": drop,
        **{f"EX2 {k} share": v for k, v in kinds.items()},
        "EX2 habitat share": [v.habitat_true.mean() for v in vlms.values()],
        **{f"reward of a {k} sentence": [preference[k], preference_b[k]] for k in preference.index},
    }, index=list(vlms)).T
    compare.round(3)

# %% [markdown]
# ## Results
#
# What the paper reports, what the original code computes, and what this book measures on
# the world, then the differences between this run and the original, from the switches in
# effect.

# %% tags=["hide-input"]
nonvisual = attributes.xs("non-visual", level="group").sum()
results = {"reward_first_window": reward_first, "reward_last_window": reward_last,
           "reward_rise": reward_last - reward_first, "reward_window_steps": window,
           "description_reward_before": float(before.reward.mean()),
           "description_reward_after": float(after.reward.mean()),
           **{f"nonvisual_of_informative_{stage}": float(v) for stage, v in nonvisual.items()},
           "attribute_shares_after": attributes["after"].droplevel(0).to_dict(),
           "judge_yes_after": float((labelled["after"].judge == "yes").mean())}
for kind, stage in shares.stack().index:  # share_<kind>_<stage>; "non-visual" is written nonvisual
    results[f"share_{kind.replace('-', '')}_{stage}"] = float(shares.loc[kind, stage])
if second is not None:
    shift = ex2.attribute_shift(labelled["after"], second["labelled"])
    results["second_vlm"] = {**compare["VLM B (second)"].to_dict(), "attribute_shift": shift}
display(chapter.fidelity_table(ex2.fidelity_rows(results)))
ex2.differences(ch)

# %% [markdown]
# ## Does EX2 find what the VLM relies on?
#
# For each claim, the direction EX2's inspection gives against the direction the ground
# truth gives (planted caption rates, counterfactual reliance).

# %%
agreement = {}
if second is not None:
    diff = compare["VLM B (second)"] - compare["VLM A (chapter 1)"]
    agreement["more planted web captions -> more spurious descriptions"] = bool(
        (diff["EX2 spurious share"] > 0) == (diff["spurious-caption rate (planted)"] > 0))
    agreement["habitat reliance and EX2 habitat share move together"] = bool(
        (diff["EX2 habitat share"] > 0) == (diff["habitat reliance (logit drop)"] > 0))
if ch.on_world:
    agreement[f"Spearman(logit drop, EX2 gain) > 0 (rho {rho_gain if rho_gain is not None else float('nan'):.2f} "
              f"over {len(check)} factors)"] = None if rho_gain is None else rho_gain > 0
pd.Series(agreement, name="EX2 agrees with the ground truth", dtype=object).to_frame()

# %% [markdown]
# ## Reading the results
#
# Where a row above says `False`, EX2's inspection and the ground truth disagree, and the
# world shows why they can:
#
# - The reward is the similarity of a sentence to *all* of a class's images, background
#   included, while the zero-shot decision between classes (what the counterfactuals
#   measure) is made by whatever separates the classes. A sentence kind can therefore earn
#   a high reward without being what decides the class: compare the reward by kind in the
#   preference table above with the logit drops. EX2 reveals which *text* the VLM matches
#   to a class, not which *pixels* decide it.
# - The language model can only write what its corpus taught it, and the KL penalty
#   `grpo_beta` keeps it near that; with a weaker penalty the policy is freer to drift
#   towards whatever the reward favours (try `grpo_beta=0.02`).
# - False descriptions are a category of their own: counted as spurious, they would inflate
#   the paper's headline share on any data where the LM writes confident but wrong details.

# %% tags=["remove-input"]
results.update(world_results, agreement=agreement, chapter_seconds=time.time() - t_start)
aft = shares["after"]
verdicts = [f"{claim}: {'undefined' if ok is None else 'yes' if ok else 'no'}."
            for claim, ok in agreement.items()]
ch.finish(results, headline={"EX2 spurious share (aligned)": aft["spurious"],
                             "EX2 informative-but-false share (aligned)": aft["false"]}, summary=[
    f"In {len(curve)} GRPO steps the mean reward of the sampled completions went from {reward_first:.4f} "
    f"(first {window} steps) to {reward_last:.4f} (last {window}); over all {len(before)} queries the "
    f"descriptions' mean reward went from {before.reward.mean():.4f} before alignment to "
    f"{after.reward.mean():.4f} after ({'up' if after.reward.mean() > before.reward.mean() else 'not up'}).",
    f"After alignment {aft['spurious']:.1%} of the descriptions are spurious, {aft['false']:.1%} "
    f"informative but false, {aft['visual']:.1%} visual and {aft['non-visual']:.1%} non-visual.",
    f"Non-visual attributes make up {nonvisual['after']:.1%} of the informative and true descriptions "
    f"after alignment ({nonvisual['before']:.1%} before).", *verdicts])

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
    display(ch.exercise("stricter judge", ex2.exercise_stricter_judge, judge_min_true=2))

# %% [markdown]
# **2. Less alignment.** Align for a quarter of the GRPO steps. How much of the reward rise
# and of the change in description kinds do the first steps already bring?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    quarter = max(1, grpo_steps // 4)
    display(ch.exercise("fewer GRPO steps", ex2.exercise_grpo_steps, grpo_steps=quarter))

# %% [markdown]
# **3. Shorter descriptions.** Let the aligned policy write at most 8 tokens. Does a shorter
# description carry fewer facts, and more spurious text?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("shorter descriptions", ex2.exercise_description_length, max_new_tokens=8))

# %% [markdown]
# **4. A cheaper reward.** The original averages over 256 images of a class. Estimate the
# reward from 8: how well does it still rank the aligned descriptions?

# %% tags=["hide-cell"]
if ch.on_world:  # the solutions are judged against the world's ground truth
    display(ch.exercise("reward from 8 images", ex2.exercise_images_per_class, images_per_class=8))
