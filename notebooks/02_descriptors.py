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
# # Descriptors and explanation maps
#
# Concept-level explanations start from *descriptors*: short phrases that say what a
# class looks like ("red striped head", "long narrow wings"). DEAL (next chapter) asks a
# large language model for them with a few-shot prompt and stores them as
# `{"class": ["descriptor", ...]}`. This chapter builds those descriptors, checks how well
# a CLIP classifies *by description* rather than by class name, and draws the
# *explanation map* of each descriptor: where in the image the model finds it.
#
# On Concept World the descriptors can come from an **oracle** that reads the true part
# attributes of each class, with a chosen share of LLM-like faults, and each descriptor
# is tied to the part it describes, so every map can be scored against that part's mask.
#
# **Real path.** With papermill parameters the same notebook runs any open_clip model on
# real images with LLM-written descriptors:
# `-p model ViT-B-32 -p pretrained openai` (or a checkpoint path), `-p dataset imagefolder|cub
# -p data_root <folder>`, and `-p descriptors <file.json>` (the original format),
# `-p descriptors hf:<transformers model name or folder>` or `-p descriptors openai:<model>
# -p llm_base_url <url>` (key in the environment variable named by `llm_api_key_env`).
# Ground-truth scores need Concept World and are skipped there.

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
# Data: "world", or "imagefolder" / "cub" with data_root
dataset = "world"
data_root = None
# Descriptors: "oracle" (world), a JSON file in the original format, "hf:<model>" or "openai:<model>"
descriptors = "oracle"
llm_base_url = None
llm_api_key_env = "OPENAI_API_KEY"
n_descriptors = 6
fault_rate = 0.25  # oracle: share of faulty descriptors in the maps section
fault_rates = [0.0, 0.25, 0.5, 0.75, 1.0]  # oracle: the descriptor-quality sweep
# Evaluation and output
n_test = 1000
n_explain = 200
start_layer = None  # ViT relevance from this block (None: last block only)
artifacts_dir = "../artifacts"
results_dir = "../book/results"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from conceptlab import plots
from conceptlab.artifacts import ArtifactStore, write_results
from conceptlab.deal import load_eval_set
from conceptlab.descriptors import (
    description_logits,
    descriptor_text_features,
    few_shot_prompt,
    get_descriptors,
    oracle_descriptors,
)
from conceptlab.explain import explain_batches
from conceptlab.metrics import energy_in_mask, pointing_game
from conceptlab.models import TrainConfig, class_text_weights, encode_images, get_clip, topk_accuracy
from conceptlab.world import PARTS, ConceptWorld, WorldConfig

sns.set_theme(style="whitegrid", context="notebook")
torch.manual_seed(seed)
world_cfg = WorldConfig(n_classes=n_classes, resolution=resolution, seed=world_seed, attribute_noise=attribute_noise,
                        habitat_correlation=habitat_correlation, caption_mix=caption_mix)
train_cfg = TrainConfig(arch=clip_arch, n_train=clip_n_train, steps=clip_steps, batch_size=clip_batch_size,
                        lr=clip_lr, seed=seed)
world = ConceptWorld(world_cfg)
store = ArtifactStore(artifacts_dir)
clip, preprocess, tokenizer, _ = get_clip(model, pretrained, store, world_cfg, train_cfg)
test = load_eval_set(clip, preprocess, n_test, dataset, data_root, world=world, seed=seed)
on_world = dataset == "world"
print(f"{len(test.labels)} test images, {len(test.class_names)} classes, model {model} / {pretrained}")

# %% [markdown]
# ## The prompt
#
# The original asks, per class, the question below after two worked examples, and parses
# the bullet list that comes back. The model continues after the final `-`.

# %%
print(few_shot_prompt(test.class_names[0], n_descriptors)[-420:])

# %% [markdown]
# ## The descriptors
#
# On the world the oracle writes one descriptor per visible part, most telling part
# first, then shorter phrases for the same parts. A fault replaces a descriptor with a
# wrong colour, a non-visual fact (habitat, behaviour) or a vague phrase: the kinds of
# mistakes LLM-written lists make. The table shows each descriptor with its part and fault.

# %%
ds = get_descriptors(descriptors, test.class_names, store, world if on_world else None, n=n_descriptors,
                     fault_rate=fault_rate, seed=seed, llm_base_url=llm_base_url, llm_api_key_env=llm_api_key_env)
table = pd.DataFrame([{"class": c, "descriptor": d, "part": p or "—", "fault": f or "—"}
                      for c in test.class_names
                      for d, p, f in zip(ds.descriptors[c], ds.parts[c], ds.faults[c])])
table.head(3 * n_descriptors)

# %% [markdown]
# ## Classification by description
#
# Zero-shot classification compares an image with "a photo of a {class}."; classification
# by description scores a class by the mean similarity of the image with sentences
# "{class}, which has {descriptor}" (the original's sentences). We also score the bare
# descriptors, without the class name, to see how much of the decision the descriptors
# themselves carry. On the world we sweep the fault rate of the oracle to see how much
# descriptor quality matters.

# %%
features = encode_images(clip, test.images)
zero_shot = features @ class_text_weights(clip, tokenizer, test.class_names).T
rows = [{"descriptors": "class name only (zero-shot)", "top-1": topk_accuracy(zero_shot, test.labels, 1),
         "top-5": topk_accuracy(zero_shot, test.labels, 5)}]
sweep = [(f"oracle, fault rate {r:.2f}", oracle_descriptors(world, n_descriptors, r, seed)) for r in fault_rates] \
    if on_world and descriptors == "oracle" else [(str(descriptors), ds)]
for name, d in sweep:
    logits = description_logits(features, clip, tokenizer, d.descriptors, test.class_names)
    bare = description_logits(features, clip, tokenizer, d.descriptors, test.class_names, with_class_name=False)
    rows.append({"descriptors": name, "top-1": topk_accuracy(logits, test.labels, 1),
                 "top-5": topk_accuracy(logits, test.labels, 5),
                 "top-1, descriptors only": topk_accuracy(bare, test.labels, 1)})
accuracy = pd.DataFrame(rows).set_index("descriptors")
accuracy.round(3)

# %%
if len(sweep) > 1:
    ax = accuracy.iloc[1:].reset_index().assign(rate=fault_rates).plot(
        x="rate", y=["top-1", "top-5", "top-1, descriptors only"], marker="o", figsize=(6, 3.2))
    for k, style in (("top-1", "--"), ("top-5", ":")):
        ax.axhline(accuracy.iloc[0][k], ls=style, color="grey", label=f"zero-shot {k}")
    ax.set_xlabel("oracle fault rate")
    ax.set_ylabel("accuracy")
    ax.legend()

# %% [markdown]
# With the class name in every sentence, faulty descriptors barely move the accuracy:
# the class name does most of the work, and a wrong colour or a vague phrase is diluted
# by it. The descriptor-only column shows what the descriptors carry on their own, and
# that is where descriptor quality shows.
#
# ## Explanation maps
#
# The map of a descriptor on an image is CLIP's gradient-weighted attention relevance
# (for a ViT; Grad-CAM at `layer4` for a ResNet) for the sentence "{class}, which has
# {descriptor}". Rows are images, columns that image's class descriptors.

# %%
k = min(5, min(len(v) for v in ds.descriptors.values()))
concepts = descriptor_text_features(clip, tokenizer, {c: ds.descriptors[c][:k] for c in test.class_names},
                                    test.class_names, k)
n_maps = min(n_explain, len(test.labels))
maps = explain_batches(clip, test.images[:n_maps], concepts[torch.as_tensor(test.labels[:n_maps])],
                       start_layer=start_layer)
show = 4
fig = plots.heatmap_grid(test.display[:show], maps[:show].numpy(),
                         row_titles=[test.class_names[c] for c in test.labels[:show]],
                         col_titles=[f"descriptor {j + 1}" for j in range(k)])
for i in range(show):
    print(f"row {i + 1}: {ds.descriptors[test.class_names[test.labels[i]]][:k]}")

# %% [markdown]
# ## Do the maps point at the right part?
#
# On the world each part descriptor has a mask. The **pointing game** asks whether the
# map's maximum falls on the part; **energy in mask** is the share of the map's mass on
# it. For reference, the share of the image a part covers is what a uniform map would get.

# %%
if on_world:
    part_masks = ds.first(k).part_masks(test.class_names, test.labels[:n_maps], test.masks[:n_maps])
    hits, energy = pointing_game(maps, part_masks).numpy(), energy_in_mask(maps, part_masks).numpy()
    parts_of = np.array([ds.first(k).parts[test.class_names[c]] for c in test.labels[:n_maps]], dtype=object)
    faults_of = np.array([ds.first(k).faults[test.class_names[c]] for c in test.labels[:n_maps]], dtype=object)
    has_part = parts_of != None  # noqa: E711
    scores = pd.DataFrame({"part": parts_of[has_part], "wrong colour": faults_of[has_part] == "wrong_attribute",
                           "pointing game": hits[has_part], "energy in mask": energy[has_part],
                           "part area": part_masks.mean((-2, -1))[has_part]})
    by_part = scores.groupby("part")[["pointing game", "energy in mask", "part area"]].mean().reindex(
        [p for p in PARTS if p in set(scores["part"])])
    display(by_part.round(3))
    display(scores.groupby("wrong colour")[["pointing game", "energy in mask", "part area"]].mean().round(3))
else:
    by_part, scores = None, None
    print("No part masks for real data: ground-truth map scores need Concept World.")

# %%
if on_world:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    by_part[["energy in mask", "part area"]].plot.bar(ax=ax)
    ax.set_ylabel("share of the map / of the image")
    ax.set_title("energy of each part descriptor's map on its part")

# %% [markdown]
# Where the energy in a part's mask is not far above the part's area, the map is barely
# better than a uniform one at finding that part: the undisentangled, poorly localized
# explanations that DEAL sets out to fix in the next chapter.

# %%
results = {"zero_shot_top1": float(accuracy.iloc[0]["top-1"]), "zero_shot_top5": float(accuracy.iloc[0]["top-5"]),
           "description_accuracy": {name: float(accuracy.loc[name, "top-1"]) for name, _ in sweep},
           "descriptor_only_accuracy": {name: float(accuracy.loc[name, "top-1, descriptors only"])
                                        for name, _ in sweep},
           "n_test": len(test.labels)}
if on_world:
    results.update({"pointing_game": float(scores["pointing game"].mean()),
                    "energy_in_mask": float(scores["energy in mask"].mean()),
                    "part_area": float(scores["part area"].mean())})
write_results(results_dir, "02_descriptors", results,
              {"world": world_cfg.to_dict(), "model": model, "pretrained": pretrained, "dataset": dataset,
               "descriptors": descriptors, "fault_rate": fault_rate, "n_test": n_test})
results
