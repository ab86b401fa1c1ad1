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
# # DEAL: disentangling and localizing concept explanations
#
# DEAL (Li, Ma and Peng, ECCV 2024) fine-tunes a CLIP so that the explanation maps of a
# class's descriptors are **disentangled** (different descriptors light up different
# pixels) and **localized** (together they cover what the class name's map covers),
# without any part annotation, while keeping or improving accuracy. For an image of class
# c with descriptor maps h_1..h_K and class map h_c (all min-max normalised):
#
# - separation: `L_sep = Σ_{i<j} Σ_pixels h_i h_j`,
# - consistency: `L_con = Σ_pixels (Σ_k h_k − h_c)²`,
# - sparsity: `L_spa = Σ_k Σ_pixels |h_k|`,
# - prediction: the symmetric contrastive loss with the *rich label*
#   "{class}. It may contain {d_1}, ..., {d_K}",
#
# and `L = L_ctr + λ_sep L_sep + λ_con L_con + λ_spa L_spa`. The paper reports, for
# ViT-B/32 on ImageNet, disentanglability 0.361 → 0.397, localizability 0.633 → 0.673 and
# accuracy 63.2 → 70.8 %. Here we fine-tune the chapter-1 Concept World CLIP briefly and
# score it with DEAL's own metrics *and* against the part masks DEAL never sees.
#
# Two deliberate differences from the original code: localizability inserts whole pixels
# (the original's indexing inserts only part of the first channel; `original_indexing=True`
# restores it, and we report both), and in the contrastive loss repeated classes in a
# batch share one text (the original would treat a same-class text as a negative).
#
# **Real path.** `-p model ViT-B-32 -p pretrained openai` (or a checkpoint path),
# `-p dataset cub -p data_root <CUB_200_2011>` or `-p dataset imagefolder -p data_root
# <folder> -p train_root <folder>`, `-p descriptors <file.json>` (original format; or
# `hf:<model>` / `openai:<model>` as in the previous chapter), and the training
# parameters below (`deal_lr 5e-7 -p deal_batch_size 256 -p deal_steps 5000` are the
# original's ImageNet settings). Ground-truth columns need Concept World.

# %% tags=["parameters"]
# World (keep chapter 1's defaults so its CLIP is reused)
n_classes = 16
resolution = 64
world_seed = 0
attribute_noise = 0.1
habitat_correlation = 0.8
caption_mix = {"visual": 0.55, "class": 0.2, "habitat": 0.1, "behaviour": 0.05, "spurious": 0.1}
# Model: "world" = the chapter-1 CLIP; else an open_clip name with `pretrained` (tag or checkpoint path)
model = "world"
pretrained = None
clip_arch = "ConceptWorld-ViT"
clip_n_train = 20000
clip_steps = 450
clip_batch_size = 128
clip_lr = 1e-3
seed = 0
# Data: "world", or "imagefolder" / "cub" with data_root (and train_root for imagefolder training images)
dataset = "world"
data_root = None
train_root = None
n_train = 4000
n_test = 500
n_localize = 100  # localizability costs K x 5 forward passes per image: first n_localize test images
# Descriptors (see chapter "Descriptors"): "oracle", a JSON file, "hf:<model>" or "openai:<model>"
descriptors = "oracle"
fault_rate = 0.0
llm_base_url = None
llm_api_key_env = "OPENAI_API_KEY"
n_concepts = 5
# DEAL
lambda_sep = 0.05
lambda_con = 0.01
lambda_spa = 0.0005
deal_lr = 1e-4
deal_batch_size = 32
deal_steps = 150
text_augmentation = True
freeze_text = False
eval_mode = False
start_layer = None
# Ablation: a small grid of (lambda_sep, lambda_con), each trained for ablation_steps
ablation_lambda_sep = [0.0, 0.05]
ablation_lambda_con = [0.0, 0.01]
ablation_steps = 80
# Output
artifacts_dir = "../artifacts"
results_dir = "../book/results"

# %%
from dataclasses import asdict

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from conceptlab import plots
from conceptlab.artifacts import ArtifactStore, write_results
from conceptlab.deal import DealConfig, array_batches, deal_clip, evaluate, load_eval_set
from conceptlab.descriptors import get_descriptors
from conceptlab.models import TrainConfig, get_clip
from conceptlab.world import ConceptWorld, WorldConfig

sns.set_theme(style="whitegrid", context="notebook")
torch.manual_seed(seed)
world_cfg = WorldConfig(n_classes=n_classes, resolution=resolution, seed=world_seed, attribute_noise=attribute_noise,
                        habitat_correlation=habitat_correlation, caption_mix=caption_mix)
train_cfg = TrainConfig(arch=clip_arch, n_train=clip_n_train, steps=clip_steps, batch_size=clip_batch_size,
                        lr=clip_lr, seed=seed)
world = ConceptWorld(world_cfg)
store = ArtifactStore(artifacts_dir)
clip, preprocess, tokenizer, _ = get_clip(model, pretrained, store, world_cfg, train_cfg)
on_world = dataset == "world"
train = load_eval_set(clip, preprocess, n_train, dataset, train_root or data_root, "train", world, seed)
test = load_eval_set(clip, preprocess, n_test, dataset, data_root, "test", world, seed)
ds = get_descriptors(descriptors, test.class_names, store, world if on_world else None, n=max(6, n_concepts),
                     fault_rate=fault_rate, seed=seed, llm_base_url=llm_base_url,
                     llm_api_key_env=llm_api_key_env).first(n_concepts)
part_masks = ds.part_masks(test.class_names, test.labels, test.masks) if on_world else None
print(f"{len(train.labels)} training and {len(test.labels)} test images, {len(test.class_names)} classes, "
      f"{n_concepts} descriptors per class")

# %% [markdown]
# ## Before: the CLIP as trained
#
# DEAL's three numbers: **disentanglability** (the separation loss mapped through
# `1/(1+exp(−10(0.2 − L_sep/100)))`, higher is better), **localizability** (insertion
# fidelity: how fast the descriptor's similarity recovers when the pixels its map ranks
# highest are restored into a blurred image) and **accuracy**. On the world we add the
# ground truth: the **pointing game** and **energy in mask** of each descriptor's map on
# its part, and the mean overlap (soft IoU) of two descriptors' maps when they describe
# the same part versus different parts (true mask overlap: 1 versus 0).

# %%
eval_kwargs = dict(n_concepts=n_concepts, part_masks=part_masks, start_layer=start_layer, n_localize=n_localize)
before, maps_before = evaluate(clip, tokenizer, test.images, test.labels, test.class_names, ds, **eval_kwargs)
pd.Series(before).round(3).to_frame("CLIP")

# %% [markdown]
# ## Fine-tuning with DEAL
#
# Every step explains the K descriptors and the class name of every image in the batch in
# one batched, differentiable pass (see `conceptlab.explain`), adds the three map losses to
# the contrastive loss and takes an Adam step. The run is stored under a hash of all its
# parameters; a rerun loads it, an interrupted run resumes.

# %%
def fine_tune(steps, l_sep, l_con):
    cfg = DealConfig(lambda_sep=l_sep, lambda_con=l_con, lambda_spa=lambda_spa, lr=deal_lr,
                     batch_size=deal_batch_size, steps=steps, n_concepts=n_concepts, start_layer=start_layer,
                     text_augmentation=text_augmentation, freeze_text=freeze_text, eval_mode=eval_mode, seed=seed)
    key = {"model": model, "pretrained": pretrained, "world": world_cfg.to_dict(), "clip": asdict(train_cfg),
           "data": {"dataset": dataset, "root": str(train_root or data_root), "n_train": n_train, "seed": seed}}
    batches = array_batches(train.images, train.labels, deal_batch_size, seed)
    return deal_clip(store, key, clip, tokenizer, test.class_names, ds.descriptors, batches, cfg)


deal_model, history = fine_tune(deal_steps, lambda_sep, lambda_con)

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
for ax, name in zip(axes, ["contrastive", "separation", "consistency", "sparsity"]):
    plots.curve(history, name, smooth=10, ax=ax)
    ax.set_title(name)
fig.tight_layout()

# %% [markdown]
# ## After: CLIP versus DEAL
#
# The table has the paper's shape (disentanglability, localizability, accuracy) with the
# ground-truth columns added. `localizability (original indexing)` repeats the insertion
# metric with the original code's indexing, for comparison with published numbers.
# Localizability uses the first `n_localize` test images, every other column all of them.

# %%
after, maps_after = evaluate(deal_model, tokenizer, test.images, test.labels, test.class_names, ds, **eval_kwargs)
quirk = {name: evaluate(m, tokenizer, test.images, test.labels, test.class_names, ds, original_indexing=True,
                        **eval_kwargs)[0]["localizability"] for name, m in (("CLIP", clip), ("DEAL", deal_model))}
columns = ["disentanglability", "localizability", "top1", "top5", "description_top1", "pointing_game",
           "energy_in_mask", "map_overlap_same_part", "map_overlap_other_part"]
table = pd.DataFrame({"CLIP": before, "DEAL": after}).T.reindex(columns=[c for c in columns if c in before])
table["localizability (original indexing)"] = pd.Series(quirk)
table.round(3)

# %%
higher_is_better = {c: c != "map_overlap_other_part" for c in table.columns}
verdict = pd.DataFrame({"change": table.loc["DEAL"] - table.loc["CLIP"],
                        "improved": [(table.loc["DEAL", c] > table.loc["CLIP", c]) == higher_is_better[c]
                                     for c in table.columns]})
verdict.round(3)

# %% [markdown]
# The `improved` column is computed, not written by hand: every metric where DEAL did not
# help on this run is marked `False` above, and the text below reads the same table.

# %%
better = [c for c in table.columns if verdict.loc[c, "improved"]]
worse = [c for c in table.columns if not verdict.loc[c, "improved"]]
print("DEAL improved:", ", ".join(better) or "nothing")
print("DEAL did not improve:", ", ".join(worse) or "nothing")

# %% [markdown]
# ## The same images before and after
#
# Rows are test images, columns the K descriptors of the image's class; the first column
# is the image. The top grid is the original CLIP, the bottom one the DEAL model.

# %%
show = 4
titles = [test.class_names[c] for c in test.labels[:show]]
cols = [f"d{j + 1}" for j in range(n_concepts)]
fig = plots.heatmap_grid(test.display[:show], maps_before[:show].numpy(), titles, cols)
fig.suptitle("CLIP", y=1.02)
fig = plots.heatmap_grid(test.display[:show], maps_after[:show].numpy(), titles, cols)
fig.suptitle("DEAL", y=1.02)
for i in range(show):
    print(f"row {i + 1} ({titles[i]}): {ds.descriptors[titles[i]]}")

# %% [markdown]
# ## Ablation: how much does each map loss do?
#
# A small grid over λ_sep and λ_con (λ_spa fixed), each trained for `ablation_steps`
# steps from the same CLIP. The (0, 0) cell is plain contrastive fine-tuning with rich
# labels, the control that separates DEAL's map losses from simply training longer.

# %%
rows = []
for l_sep in ablation_lambda_sep:
    for l_con in ablation_lambda_con:
        tuned, _ = fine_tune(ablation_steps, l_sep, l_con)
        scores, _ = evaluate(tuned, tokenizer, test.images, test.labels, test.class_names, ds, **eval_kwargs)
        rows.append({"lambda_sep": l_sep, "lambda_con": l_con, **scores})
ablation = pd.DataFrame(rows)
ablation[["lambda_sep", "lambda_con"] + [c for c in columns if c in ablation]].round(3)

# %%
shown = [c for c in ("disentanglability", "localizability", "top1", "energy_in_mask") if c in ablation]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2))
for ax, metric in zip(list(axes) if len(shown) > 1 else [axes], shown):
    grid = ablation.pivot(index="lambda_sep", columns="lambda_con", values=metric)
    sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar=False)
    ax.set_title(metric)
fig.tight_layout()

# %% [markdown]
# Read the ablation against the (0, 0) row: a gain that also appears there comes from
# the extra contrastive training on rich labels, not from the map losses. The paper's
# accuracy gain need not carry over: its CLIP was never trained on descriptor-like text,
# while the world CLIP was trained on captions that already name parts and attributes, so
# compare the accuracy columns of all rows, including (0, 0), with the CLIP row above.

# %%
display(pd.DataFrame({"paper (ImageNet, ViT-B/32)": {"disentanglability": "0.361 → 0.397",
                                                      "localizability": "0.633 → 0.673", "top1": "63.2 → 70.8 %"},
                      "this run": {c: f"{table.loc['CLIP', c]:.3f} → {table.loc['DEAL', c]:.3f}"
                                   for c in ("disentanglability", "localizability", "top1")}}))
headline = {f"{metric}_{when}": scores[metric] for when, scores in (("clip", before), ("deal", after))
            for metric in ("disentanglability", "localizability", "top1", "pointing_game", "energy_in_mask")
            if metric in scores}
results = {**headline, "before": before, "after": after, "localizability_original_indexing": quirk,
           "improved": better, "not_improved": worse, "ablation": rows, "final_loss": history[-1]}
write_results(results_dir, "03_deal", results,
              {"world": world_cfg.to_dict(), "model": model, "pretrained": pretrained, "dataset": dataset,
               "descriptors": descriptors, "fault_rate": fault_rate, "deal": {
                   "lambda_sep": lambda_sep, "lambda_con": lambda_con, "lambda_spa": lambda_spa, "lr": deal_lr,
                   "batch_size": deal_batch_size, "steps": deal_steps, "n_concepts": n_concepts,
                   "text_augmentation": text_augmentation, "freeze_text": freeze_text, "eval_mode": eval_mode}})
