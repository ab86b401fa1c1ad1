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
# EX2 (*Extract and Explore*) asks which textual features a contrastive VLM relies on. It
# aligns a language model with reinforcement learning so that it writes the descriptions
# of a class that the VLM's text encoder finds closest to the class's images, and then
# inspects those descriptions: are they informative at all, and which kinds of attribute
# (colour, parts, habitat, behaviour ...) do they mention?
#
# On real models the answer cannot be checked. Here the VLM is the Concept World CLIP of
# chapter 1, whose training captions we planted, and the language model is a small GPT-2
# trained on a world "web" corpus of true and false part descriptions, habitat and
# behaviour facts and spurious web phrases. Every description the aligned model writes can
# be labelled against the ground truth, and what the VLM relies on can be measured
# directly with counterfactual images.

# %% tags=["parameters"]
# World and VLM (same defaults as chapter 1, so its CLIP is reused)
n_classes = 16
resolution = 64
world_seed = 0
attribute_noise = 0.1
habitat_correlation = 0.8
caption_mix = {"visual": 0.55, "class": 0.2, "habitat": 0.1, "behaviour": 0.05, "spurious": 0.1}
model = "world"
pretrained = None
clip_arch = "ConceptWorld-ViT"
clip_n_train = 20000
clip_steps = 450
clip_batch_size = 128
clip_lr = 1e-3
seed = 0
# Real images instead of the world: "imagefolder" or "cub" with data_root
dataset = "world"
data_root = None
images_per_class = 256
# A second world VLM, trained on different captions and habitats (world only; None skips it)
second_habitat_correlation = 0.3
second_caption_mix = {"visual": 0.4, "class": 0.2, "habitat": 0.05, "behaviour": 0.05, "spurious": 0.3}
second_clip_steps = 200
# Language model: "world" trains the world GPT-2; otherwise a transformers name or path
lm = "world"
lm_corpus_size = 12000
lm_answer_mix = {"visual_true": 0.3, "visual_false": 0.15, "habitat": 0.15, "behaviour": 0.1, "class": 0.1,
                 "spurious": 0.2}
lm_steps = 800
lora_r = 0
# Alignment (trl GRPO)
grpo_steps = 160
grpo_lr = 3e-4
grpo_beta = 0.2  # the original PPO run started with a KL coefficient of 0.2
num_generations = 8
prompts_per_step = 4
max_new_tokens = 32
# Inspection: "world" (ground truth), a transformers judge name/path, or "openai:<model>@<base_url>"
judge = "world"
judge_api_key_env = "OPENAI_API_KEY"
n_counterfactual = 1024
artifacts_dir = "../artifacts"
results_dir = "../book/results"

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import display

from conceptlab import ex2
from conceptlab.artifacts import ArtifactStore, params_key, write_results
from conceptlab.data import load_dataset
from conceptlab.judges import judge_prompts, make_judge
from conceptlab.models import TrainConfig, get_clip
from conceptlab.textlm import WorldLMConfig, count_parameters, load_lm, world_lm
from conceptlab.world import ConceptWorld, WorldConfig

sns.set_theme(style="whitegrid", context="notebook")
t_start = time.time()
on_world = dataset == "world"
world_cfg = WorldConfig(n_classes=n_classes, resolution=resolution, seed=world_seed, attribute_noise=attribute_noise,
                        habitat_correlation=habitat_correlation, caption_mix=caption_mix)
train_cfg = TrainConfig(arch=clip_arch, n_train=clip_n_train, steps=clip_steps, batch_size=clip_batch_size,
                        lr=clip_lr, seed=seed)
world = ConceptWorld(world_cfg)
store = ArtifactStore(artifacts_dir)
if lm == "world" and not on_world:
    raise ValueError("The world language model only knows Concept World: with real data pass lm=<a transformers "
                     "causal LM name or path>.")

# %% [markdown]
# ## The VLM and its reward
#
# The reward of a description *t* of class *c* is the mean cosine similarity between the
# text embedding f_T(t) and the embeddings of (up to `images_per_class`) images of class c.
# The image embeddings are computed once; since the mean of cosines with unit vectors is
# the dot product with their mean, a batch of descriptions costs one text encoding and one
# row-wise product.

# %%
clip, preprocess, clip_tokenizer, _ = get_clip(model, pretrained, store, world_cfg, train_cfg)
if on_world:
    class_names = world.class_names
    class_means = ex2.world_class_embeddings(clip, world, images_per_class)
else:
    images = load_dataset(dataset, data_root, "test")
    class_names = images.class_names
    class_means = ex2.dataset_class_embeddings(clip, preprocess, images, images_per_class)
reward = ex2.CLIPReward(clip, clip_tokenizer, class_means)
vlm_key = {"model": model, "pretrained": pretrained, "dataset": dataset, "data_root": data_root,
           "world": world_cfg.to_dict(), "train": train_cfg.__dict__, "images_per_class": images_per_class}
print(f"{len(class_names)} classes, image embeddings {tuple(class_means.shape)}")

# %% [markdown]
# ## The language model
#
# The world's "web" corpus answers the EX2 queries with sentences of six kinds, mixed as
# `lm_answer_mix` says: true and false part descriptions, habitat and behaviour facts
# (which no pixel shows), class-name captions and web phrases. Some of the web phrases
# appear in the VLM's training captions, some never did. A byte-level BPE tokenizer and a
# small GPT-2 are trained on it and stored under a hash of these parameters.

# %%
queries = ex2.format_queries(class_names)
if lm == "world":
    lm_cfg = WorldLMConfig(n_classes=n_classes, corpus_size=lm_corpus_size, answer_mix=lm_answer_mix,
                           steps=lm_steps, seed=seed)
    base_lm, lm_tokenizer, lm_history = world_lm(store, lm_cfg, ex2.TEMPLATES)
    lm_key = {"lm": "world", **lm_cfg.__dict__}
    print(f"world GPT-2: {count_parameters(base_lm):,} parameters, vocabulary {len(lm_tokenizer)}, "
          f"final pretraining loss {lm_history[-1]['loss']:.3f}")
else:
    base_lm, lm_tokenizer = load_lm(lm)
    lm_key = {"lm": lm}
print(f"{len(queries)} queries ({len(ex2.TEMPLATES)} templates x {len(class_names)} classes), e.g.")
print(repr(queries.prompt[0]), repr(queries.prompt[len(ex2.TEMPLATES) + 3]))

# %% [markdown]
# ## Alignment with GRPO
#
# trl's `GRPOTrainer` samples `num_generations` completions of at most `max_new_tokens`
# tokens for each of `prompts_per_step` queries, scores them with the reward, and pushes up
# the completions that beat their group's mean, with a KL penalty (`grpo_beta`) to the
# frozen pretrained model. (The original used PPO on Mistral-7B with LoRA; trl has replaced
# that API, and GRPO is today's equivalent. `lora_r > 0` trains LoRA adapters instead of the
# whole model, for large language models.)

# %%
align_cfg = ex2.AlignConfig(steps=grpo_steps, lr=grpo_lr, beta=grpo_beta, num_generations=num_generations,
                            prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens, lora_r=lora_r,
                            seed=seed)
t0 = time.time()
policy, _, reward_curve = ex2.aligned_lm(store, {"lm": lm_key, "vlm": vlm_key}, base_lm, lm_tokenizer, reward,
                                         queries, align_cfg)
align_seconds = time.time() - t0
curve = pd.DataFrame(reward_curve)
window = max(1, len(curve) // 5)
reward_first, reward_last = curve.reward[:window].mean(), curve.reward[-window:].mean()
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, col in zip(axes, ("reward", "kl")):
    ax.plot(curve.step, curve[col], alpha=0.3)
    ax.plot(curve.step, curve[col].rolling(window, min_periods=1).mean())
    ax.set(xlabel="GRPO step", ylabel=col)
fig.tight_layout()
print(f"mean reward, first {window} steps: {reward_first:.4f}; last {window} steps: {reward_last:.4f} "
      f"(+{reward_last - reward_first:.4f}); alignment took {align_seconds:.0f} s (0 if loaded from the store)")

# %% [markdown]
# ## Descriptions before and after alignment
#
# One description per template per class, sampled with top-p 1 and top-k 0, from the
# pretrained and from the aligned model. Both sets are saved as JSON in the artifact store.

# %%
before = ex2.generate_descriptions(base_lm, lm_tokenizer, queries, max_new_tokens, seed=seed)
after = ex2.generate_descriptions(policy, lm_tokenizer, queries, max_new_tokens, seed=seed)
for df in (before, after):
    df["reward"] = reward.scores(df.description.tolist(), df.class_index.tolist())
out_dir = store.path("ex2_descriptions", {"lm": lm_key, "vlm": vlm_key, "align": align_cfg.__dict__})
ex2.save_descriptions(before, out_dir / "before.json")
ex2.save_descriptions(after, out_dir / "after.json")
print(f"mean reward of the descriptions: before {before.reward.mean():.4f}, after {after.reward.mean():.4f}; "
      f"saved to {out_dir}")
pick = queries.index[(queries.template_index == 0) & (queries.class_index < 4)]
pd.DataFrame({"class": queries.class_name[pick], "before": before.description[pick],
              "after": after.description[pick]}).style.hide(axis="index")

# %% [markdown]
# ## Inspection
#
# EX2 asks a judge, for each (class, description), the original yes/no question: does the
# snippet tell students something specific about the class? A "no" marks the description
# as spurious. On the world the default judge knows the ground truth: it answers "yes" only
# when the snippet states something *true* about the class, and it also sorts each
# description by type (visual parts, habitat, behaviour, or nothing informative) and checks
# every part attribute against the class.

# %%
judge_fn = make_judge(judge, world if on_world else None, judge_api_key_env)
stages = {"before": before, "after": after}
if on_world:
    answers = {k: None if judge == "world" else judge_fn(judge_prompts(v.class_name, v.description))
               for k, v in stages.items()}
    labelled = {k: ex2.inspect_world(v, world, answers[k]) for k, v in stages.items()}
else:
    labelled = {k: v.assign(judge=judge_fn(judge_prompts(v.class_name, v.description))) for k, v in stages.items()}
    for v in labelled.values():
        v["kind"] = np.where(v.judge == "no", "spurious", "informative")
both = pd.concat([v.assign(stage=k) for k, v in labelled.items()], ignore_index=True)
shares = both.groupby("stage").kind.value_counts(normalize=True).unstack(fill_value=0).loc[["before", "after"]]
ax = shares.T.plot.bar(figsize=(8, 3.2), rot=0, ylabel="share of descriptions", title="description types")
shares.round(3)

# %% [markdown]
# Which kinds of description carry the VLM's preference? The reward of each kind before
# and after alignment and, for the visual ones, which parts they name.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
sns.boxplot(data=both, x="kind", y="reward", hue="stage", ax=axes[0])
if on_world:
    mentions = pd.DataFrame({k: ex2.factor_mentions(v) for k, v in labelled.items()})
    mentions.plot.bar(ax=axes[1], rot=30, title="descriptions stating each factor truly")
fig.tight_layout()
both.groupby(["stage", "kind"]).reward.agg(["count", "mean"]).round(4).unstack(0)

# %% [markdown]
# ## Ground truth: what does the VLM really rely on?
#
# On the world, reliance can be measured without any text. Each test creature is drawn with
# its class-typical attributes in its home habitat, and again with one factor changed — the
# habitat swapped, or one part recoloured — with the same pose and noise. The drop in
# zero-shot accuracy (`reliance`) and the drop of the true class's logit margin
# (`logit_drop`, finer: prototypical creatures are nearly always classified correctly)
# measure the VLM's reliance on that factor. EX2's inspection makes a claim about the same
# factors: how often the aligned descriptions state them, and how much alignment raised
# that share (`EX2 gain`). Do the two agree?

# %%
if on_world:
    reliance = ex2.counterfactual_reliance(clip, clip_tokenizer, world, n_counterfactual, seed=seed)
    check = reliance.set_index("factor")[["reliance", "logit_drop"]].join(mentions.rename(columns=lambda c: f"EX2 {c}"))
    check["EX2 gain"] = check["EX2 after"] - check["EX2 before"]
    rho_share = ex2.rank_correlation(check.logit_drop, check["EX2 after"])
    rho_gain = ex2.rank_correlation(check.logit_drop, check["EX2 gain"])
    show = lambda rho: "undefined (one side constant)" if rho is None else f"{rho:.2f}"  # noqa: E731
    print(f"Spearman(logit drop, EX2 share after alignment) = {show(rho_share)}; "
          f"Spearman(logit drop, EX2 gain from alignment) = {show(rho_gain)}, over {len(check)} factors")
    display(check.round(3))

# %% [markdown]
# The reward itself can also be read directly: the mean reward of sentences of each kind,
# written from the ground truth for every class. This is the preference that alignment
# should discover.

# %%
if on_world:
    preference = ex2.text_preference(reward, world).groupby("kind").reward.mean()
    display(preference.sort_values(ascending=False).round(4).to_frame("mean reward"))

# %% [markdown]
# ## Different VLMs prefer different attributes
#
# A second world CLIP is trained on a world where the habitat says less about the class
# (`second_habitat_correlation`) and more captions are web phrases (`second_caption_mix`).
# To fit the time budget it trains for `second_clip_steps` steps instead of `clip_steps`.
# The same pretrained language model is aligned to it with the same settings.

# %%
second = None
if on_world and model == "world" and second_caption_mix is not None:
    world_b = WorldConfig(**{**world_cfg.to_dict(), "habitat_correlation": second_habitat_correlation,
                             "caption_mix": second_caption_mix})
    train_b = TrainConfig(**{**train_cfg.__dict__, "steps": second_clip_steps})
    clip_b, _, tok_b, _ = get_clip("world", None, store, world_b, train_b)
    reward_b = ex2.CLIPReward(clip_b, tok_b, ex2.world_class_embeddings(clip_b, world, images_per_class))
    vlm_b = {**vlm_key, "world": world_b.to_dict(), "train": train_b.__dict__}
    policy_b, _, curve_b = ex2.aligned_lm(store, {"lm": lm_key, "vlm": vlm_b}, base_lm, lm_tokenizer, reward_b,
                                          queries, align_cfg)
    after_b = ex2.generate_descriptions(policy_b, lm_tokenizer, queries, max_new_tokens, seed=seed)
    after_b["reward"] = reward_b.scores(after_b.description.tolist(), after_b.class_index.tolist())
    ex2.save_descriptions(after_b, out_dir / "after_second_vlm.json")
    second = {"labelled": ex2.inspect_world(after_b, world), "curve": pd.DataFrame(curve_b),
              "reliance": ex2.counterfactual_reliance(clip_b, tok_b, world, n_counterfactual, seed=seed),
              "preference": ex2.text_preference(reward_b, world).groupby("kind").reward.mean()}

# %%
if second is not None:
    vlms = {"VLM A (chapter 1)": labelled["after"], "VLM B (second)": second["labelled"]}
    kinds = pd.DataFrame({k: v.kind.value_counts(normalize=True) for k, v in vlms.items()}).fillna(0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    kinds.plot.bar(ax=axes[0], rot=0, ylabel="share of aligned descriptions", title="what each VLM was given")
    axes[1].plot(curve.step, curve.reward.rolling(window, min_periods=1).mean(), label="VLM A")
    axes[1].plot(second["curve"].step, second["curve"].reward.rolling(window, min_periods=1).mean(), label="VLM B")
    axes[1].set(xlabel="GRPO step", ylabel="reward (running mean)")
    axes[1].legend()
    fig.tight_layout()
    compare = pd.DataFrame({
        "spurious-caption rate (planted)": [caption_mix["spurious"] / sum(caption_mix.values()),
                                            second_caption_mix["spurious"] / sum(second_caption_mix.values())],
        "habitat correlation (planted)": [habitat_correlation, second_habitat_correlation],
        "habitat reliance (counterfactual logit drop)": [
            reliance.set_index("factor").logit_drop["habitat"],
            second["reliance"].set_index("factor").logit_drop["habitat"]],
        "EX2 spurious share": [v.kind.eq("spurious").mean() for v in vlms.values()],
        "EX2 habitat share": [v.habitat_true.mean() for v in vlms.values()],
        **{f"reward of a {k} sentence": [preference[k], second["preference"][k]] for k in preference.index},
    }, index=list(vlms)).T
    display(compare.round(3))

# %% [markdown]
# ## Does EX2 find what the VLM relies on?
#
# The checks below compare, for each claim, the direction EX2's inspection gives with the
# direction the ground truth gives (planted caption rates, counterfactual reliance).

# %%
agreement = {}
if second is not None:
    diff = compare["VLM B (second)"] - compare["VLM A (chapter 1)"]
    agreement["spurious: more planted web captions -> more spurious descriptions"] = bool(
        np.sign(diff["EX2 spurious share"]) == np.sign(diff["spurious-caption rate (planted)"]))
    agreement["habitat: counterfactual reliance and EX2 habitat share move together"] = bool(
        np.sign(diff["EX2 habitat share"]) == np.sign(diff["habitat reliance (counterfactual logit drop)"]))
if on_world:
    agreement["factors: Spearman(logit drop, EX2 gain) > 0"] = None if rho_gain is None else rho_gain > 0
pd.Series(agreement, name="EX2 agrees with the ground truth").to_frame()

# %% [markdown]
# ## Reading the results
#
# Where the rows above say `False`, EX2's inspection and the ground truth disagree, and
# the world shows why they can:
#
# - The reward is the similarity of a sentence to *all* of a class's images, background
#   included. A habitat sentence can earn a high reward because habitat captions taught
#   the text encoder what backgrounds look like, while the zero-shot decision between
#   classes (what the counterfactuals measure) may lean on part colours instead. EX2
#   reveals which *text* the VLM matches to a class, not which *pixels* decide it.
# - The language model can only write what its corpus taught it, and the KL penalty keeps
#   it near that. With a weak penalty (try `grpo_beta=0.04`) the policy tends to collapse to
#   the bare class name, which every judge marks as spurious: then the type distribution
#   says more about the optimiser than about the VLM.
# - The second VLM trained for fewer steps (`second_clip_steps`), so part of any difference
#   between the two comes from training length, not only from the planted captions.

# %%
results = {"reward_first_window": float(reward_first), "reward_last_window": float(reward_last),
           "reward_rise": float(reward_last - reward_first), "reward_window_steps": int(window),
           "align_seconds": align_seconds, "description_reward_before": float(before.reward.mean()),
           "description_reward_after": float(after.reward.mean()),
           **{f"share_{k}_{stage}": float(v) for stage in shares.index for k, v in shares.loc[stage].items()},
           "judge_yes_after": float((labelled["after"].judge == "yes").mean()),
           "agreement": agreement, "chapter_seconds": time.time() - t_start}
if on_world:
    results.update(spearman_reliance_share=rho_share, spearman_reliance_gain=rho_gain,
                   reliance=reliance.set_index("factor").reliance.to_dict(),
                   mention_share_after=mentions["after"].to_dict())
if second is not None:
    results["second_vlm"] = {**compare["VLM B (second)"].to_dict(), "first": compare["VLM A (chapter 1)"].to_dict(),
                             "clip_steps": second_clip_steps,
                             "reward_first_window": float(second["curve"].reward[:window].mean()),
                             "reward_last_window": float(second["curve"].reward[-window:].mean())}
write_results(results_dir, "04_ex2", results,
              {"vlm": vlm_key, "lm": lm_key, "align": align_cfg.__dict__, "judge": judge,
               "second": {"habitat_correlation": second_habitat_correlation, "caption_mix": second_caption_mix,
                          "clip_steps": second_clip_steps}, "run_key": params_key([vlm_key, lm_key])})
print(f"chapter wall time {time.time() - t_start:.0f} s")
