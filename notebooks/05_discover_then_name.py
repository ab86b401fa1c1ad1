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
# Discover-then-Name (DN-CBM) {cite}`rao2024dncbm` builds a concept bottleneck without
# choosing the concepts in advance. It **discovers** concepts with a sparse autoencoder
# (SAE) {cite}`bricken2023monosemanticity` trained on CLIP {cite}`radford2021clip` image
# embeddings of a large unlabeled corpus, **names** each one with the vocabulary word whose
# CLIP text embedding lies closest to the concept's decoder direction (the vocabulary of
# CLIP-Dissect {cite}`oikarinen2023clipdissect`), and then trains a sparse linear classifier
# on the concept strengths, so that every decision is a short weighted list of named concepts.
#
# Whether those names are *right* cannot be checked on CC3M. In Concept World it can:
# every image records its class, the colour, pattern and size of each part, and its
# habitat. This chapter runs the method as the original code computes it, and then asks,
# for every concept, whether it really fires on images that show what its name says.
#
# **Real models and data.** The same notebook runs on any open_clip model and an image
# data set, with any word list as the vocabulary, e.g.
#
# ```
# papermill 05_discover_then_name.ipynb out.ipynb -p model ViT-B-32 -p pretrained openai \
#     -p dataset imagefolder -p data_root /data/my_images -p vocabulary /data/clip_dissect_20k.txt
# papermill 05_discover_then_name.ipynb out.ipynb -p model ViT-B-32 -p pretrained /ckpt/model.pt \
#     -p dataset cub -p data_root /data/CUB_200_2011 -p vocabulary /data/20k.txt -p device cuda
# ```
#
# There the corpus is the data set's own images (or its training split), and the
# ground-truth sections are skipped: a real data set does not say what each image shows.
# The SAE and the probes train on the GPU when one is present (`device`).

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
# This chapter (every name below is declared, with its type and range, in dncbm.PARAMETERS)
dataset = "world"  # "world", or a real data set ("imagefolder" | "cub") under data_root
data_root = None
vocabulary = None  # a word-list file, one word per line (CLIP-Dissect's 20k.txt); None: the world's
n_corpus = 8000  # unlabeled images the SAE learns from (CC3M's role)
n_probe_train = 3000
n_test = 2000
sae_expansion = 8
sae_l1 = 3e-5  # on the scale of sae_reconstruction
sae_lr = 5e-4
sae_batch_size = 1024  # the original: 4096 (here: more, smaller steps)
sae_epochs = 30
sae_resample_every = 10
sae_reconstruction = "mean"  # "mean": the original code; "sum": the paper's ||x - x_hat||^2
sae_inputs = "raw"  # "raw": the original's CLIP embeddings; "normalised": L2-normalised
probe_lambda = 0.1  # on the scale of probe_l1
probe_l1 = "mean"  # "mean": nn.L1Loss as in the original code; "sum": ||W||_1
probe_solver = "adam"  # "adam": the original; "fista": the same objective solved to exact zeros
probe_lr = 1e-2
probe_epochs = 200
probe_batch_size = 512
right_auroc = 0.75

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from conceptlab import dncbm, explore, plots
from conceptlab.chapter import fidelity_table, setup, show_source
from conceptlab.sae import SparseAutoencoder, encode_concepts, sae_loss

ch = setup("05_discover_then_name", globals(), dncbm.PARAMETERS)

# %% [markdown]
# ## Discover: embeddings of an unlabeled corpus
#
# The original trains its SAE on CLIP embeddings of the 3.3 million images of CC3M, taken
# after the projection and **not** L2-normalised. Here the corpus is the world's `corpus`
# split, which no other chapter uses and whose labels the method never sees. The images are
# rendered, embedded and discarded batch by batch; only the embeddings are kept, cached
# under the CLIP's content hash and the world's parameters.

# %%
data = dncbm.chapter_features(ch)
corpus, train, test, class_names = data
norms = corpus["features"].norm(dim=-1)
print(f"corpus {tuple(corpus['features'].shape)}, probe train {len(train['labels'])}, "
      f"test {len(test['labels'])}; raw embedding norm {norms.mean():.2f} ± {norms.std():.2f}")

# %% [markdown]
# ## The sparse autoencoder
#
# One hidden layer of $h$ ReLU units (`sae_expansion` times $d$; 8 in the original) over
# $d$-dimensional embeddings $x$:
#
# $$z = \mathrm{ReLU}\big(W_{enc}(x - b_{dec}) + b_{enc}\big), \qquad
#   \hat x = W_{dec}\, z + b_{dec},$$
#
# with unit-norm decoder columns (the concept directions). The paper writes the loss as
# $\lVert x - \hat x\rVert_2^2 + \lambda_1 \lVert z\rVert_1$; the original *code* averages the
# squared error over the $d$ dimensions:
#
# $$L = \frac{1}{d}\sum_{i=1}^{d} (x_i - \hat x_i)^2 + \lambda_1 \sum_{k=1}^{h} |z_k|,$$
#
# averaged over the batch. $\lambda_1 = 3\times10^{-5}$ means what it means only at that
# scale: with the sum, the same $\lambda_1$ would be $d$ times weaker.

# %% tags=["remove-input"]
display(show_source(SparseAutoencoder.encode), show_source(sae_loss))

# %% [markdown]
# A toy run to check by hand: two inputs in two dimensions, three concepts.
# Squared errors $(1, 0)$ and $(0, 9)$ average to $0.5$ and $4.5$, so the reconstruction
# term is $2.5$; the L1 norms $3$ and $0$ average to $1.5$; with $\lambda_1 = 0.5$ the loss
# is $2.5 + 0.75 = 3.25$. And with $W_{enc} = I$, $b = 0$, the code of $x = (1, -2, 3)$ is
# $\mathrm{ReLU}(x) = (1, 0, 3)$.

# %%
x, x_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 1.0]])
z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
print("loss, reconstruction, L1:", [round(v.item(), 4) for v in sae_loss(x, x_hat, z, l1=0.5)])
toy = SparseAutoencoder(3, 3)
with torch.no_grad():
    toy.W_enc.copy_(torch.eye(3)), toy.b_enc.zero_(), toy.b_dec.zero_()
print("z =", toy.encode(torch.tensor([1.0, -2.0, 3.0])).tolist())

# %% [markdown]
# Training: Adam, the decoder's columns kept at unit norm, and units that stay silent for
# `sae_resample_every` epochs re-initialised towards inputs the SAE reconstructs badly. The
# curves show the share of variance left unexplained (FVU), the mean number of active
# concepts per image (L0), and the dead units found at each resampling.

# %%
sae, sae_history = dncbm.chapter_sae(ch, corpus)
hist = pd.DataFrame(sae_history)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
titles = ["unexplained variance (FVU)", "active concepts per image (L0)", "dead concepts"]
for ax, col, title in zip(axes, ["fvu", "l0", "dead"], titles):
    plots.curve(hist.dropna(subset=[col]).to_dict("records"), col, x="epoch", smooth=1, ax=ax)
    ax.set_title(title)
fig.tight_layout()

# %% [markdown]
# ### Does the world need another λ₁?
#
# The original trains for 200 epochs on 3.3 million embeddings; this chapter can afford a
# few hundred steps, with a smaller batch than the original's 4096 so that there are more
# of them. Before departing from $\lambda_1 = 3\times10^{-5}$ we measure what a hundred
# times more sparsity pressure buys on this world: active concepts (L0), unexplained
# variance (FVU), accuracy of the concept probe, and the share of concepts whose name the
# ground truth confirms (defined below).

# %%
l1_table = dncbm.l1_measurement(ch, data)
print(dncbm.l1_verdict(l1_table))
plots.table(l1_table.astype(float).round(3))

# %% [markdown]
# ## Name: the nearest word in CLIP's text space
#
# Each concept's decoder direction $p_c$ (a column of $W_{dec}$) lives in the image
# embedding space; CLIP's text embeddings $T(v)$ live in the same space. The concept is
# named by the word of highest cosine similarity, $s_c = \arg\max_v \cos(p_c, T(v))$. On
# the world the default vocabulary holds every class, part, colour, pattern, size and
# habitat word, plus distractor words that no image shows ("car", "piano", ...); the real
# path reads a word list such as CLIP-Dissect's 20k.

# %% tags=["remove-input"]
show_source(dncbm.name_concepts)

# %% [markdown]
# By hand: concept 0 points along the first axis, concept 1 diagonally; "red" is the first
# axis, "blue" the second, "sky" halfway. Cosines: concept 0 gives red 1, blue 0, sky 0.71;
# concept 1 gives red 0.71, blue 0.71, sky 1.

# %%
toy_words = ["red", "blue", "sky"]
toy_text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
dncbm.name_concepts(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), toy_text, toy_words).round(2)

# %%
words = dncbm.vocabulary_words(ch)
clip, _, tokenizer, _ = ch.clip()
word_emb = dncbm.embed_vocabulary(clip, tokenizer, words)
names = dncbm.name_concepts(sae.directions, word_emb, words)
strengths = {s: encode_concepts(sae, dncbm.sae_inputs(d["features"], sae_inputs), device=ch.device)
             for s, d in (("train", train), ("test", test))}
scores = dncbm.score_names(strengths["test"], names, test, class_names, sae.directions,
                           right_auroc) if ch.on_world else None
print(f"{len(words)} words, {sae.n_concepts} concepts, {names['name'].nunique()} distinct names")
fires = (strengths["test"] > 0).float().mean(0).numpy()
plots.table(names.assign(fires=fires).sort_values("fires", ascending=False).head(12).round(3))

# %% [markdown]
# ## The concept bottleneck
#
# A linear probe (no bias, as in the original) on the concept strengths of a labelled
# probe set, trained with Adam on
#
# $$L_{probe} = \mathrm{CE}\big(W z, y\big) + \lambda\, \frac{1}{CK}\sum_{c,k} |W_{ck}|,$$
#
# the mean $|W|$ over $C$ classes and $K$ concepts, as the original's `nn.L1Loss` against
# zeros computes it (the paper writes $\lVert W\rVert_1$, $CK$ times stronger). For
# comparison: the same probe on the raw CLIP embeddings (the accuracy a bottleneck gives
# up) and zero-shot classification with class-name prompts. Sparsity is measured as the
# original does, by *coverage*: how many concepts an image's decision needs to reach 90 % of
# its positive evidence (weight × strength).

# %%
probe = dncbm.fit_probe(strengths["train"], train["labels"], dncbm.probe_config(ch.params),
                        len(class_names), ch.device)
book = dncbm.headline(sae_history, strengths["test"], test["labels"], probe, scores)
base = dncbm.baselines(ch, data)
accuracy = pd.DataFrame([
    {"classifier": "DN-CBM (probe on concepts)", "accuracy": book["accuracy_concept_probe"],
     "concepts per decision (90 %)": book["concepts_per_decision"]},
    {"classifier": "linear probe on CLIP features", "accuracy": base["accuracy_raw_probe"]},
    {"classifier": "zero-shot", "accuracy": base["accuracy_zero_shot"]},
])
plots.table(accuracy.round(3))

# %% [markdown]
# ## Results against the paper
#
# The paper's numbers (CLIP ResNet-50 on ImageNet, its Table 1) beside what the original
# code's settings compute on this world and what this chapter's settings compute. The
# original code's column keeps the chapter's training length; every other setting is the
# original's. The list below it is generated from the switches in effect.

# %%
changes = dncbm.original_changes(ch.params)
original = dncbm.evaluate(ch, data, **changes) if changes else book
rows = dncbm.fidelity_rows({**book, **base}, {**original, **base})
display(plots.table(fidelity_table(rows).astype(float)))
plots.table(ch.differences(dncbm.SWITCHES))

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
# nearly identical (cosine ≥ 0.95) to another live concept. The second check is
# precision: the share of a concept's 20 most activating test images that show its name.

# %%
if ch.on_world:
    truth_summary = dncbm.summarise_scores(scores)
    live = scores[~scores["dead"]]
    display(plots.table(pd.Series(truth_summary).to_frame("value")))
    plots.table(live.groupby("kind").agg(
        concepts=("concept", "size"), right=("right", "mean"), median_auroc=("auroc", "median"),
        oracle_auroc=("best_auroc", "median"), top_precision=("top_precision", "median")).round(3))
else:
    truth_summary = {}
    print("No ground truth on a real data set: names are shown, not scored.")

# %% [markdown]
# Each dot is a live concept: the AUROC of its own name against the best AUROC any
# checkable word reaches. Dots on the diagonal were named as well as possible; dots far
# below it detect something the name does not say.

# %%
if ch.on_world:
    ax = sns.scatterplot(live.fillna({"auroc": 0.5}), x="best_auroc", y="auroc", hue="kind", s=18)
    ax.plot([0.5, 1], [0.5, 1], color="grey", lw=1, ls="--")
    ax.set(xlabel="oracle AUROC (best checkable word)",
           ylabel="AUROC of its own name (0.5 if uncheckable)")
    ax.legend(fontsize=8, bbox_to_anchor=(1, 1))

# %% [markdown]
# ## Explore a concept
#
# Pick a concept (the twenty the probe relies on most): its name, the nearest words in
# CLIP's text space, and the test images on which it fires most. In JupyterLab the menu is
# live; the book shows the first concept.

# %%
if ch.on_world:
    most_used = np.argsort(-np.abs(probe.coef_).sum(0))[:20]
    options = [(f"#{j} {names['name'][j]}", int(j)) for j in most_used]
    def draw(concept: int = options[0][1]):
        return dncbm.concept_view(ch.world, strengths["test"], names, word_emb, words,
                                  sae.directions, concept)

    display(explore.explorer(draw, concept=options))

# %% [markdown]
# ## Task agnosticity
#
# The concepts were learned without labels, so the same bottleneck should serve any
# task. On the world a second task is the habitat in the background: a second probe on
# the *same* concept strengths, beside a raw-feature probe for that task.

# %%
if ch.on_world:
    p_cfg, n_hab = dncbm.probe_config(ch.params), int(train["habitats"].max()) + 1
    habitat = dncbm.fit_probe(strengths["train"], train["habitats"], p_cfg, n_hab, ch.device)
    raw_habitat = dncbm.fit_probe(train["features"], train["habitats"],
                                  dncbm.probe_config(ch.params, 0.0), n_hab, ch.device)
    tasks = pd.DataFrame([
        {"task": "class", "concepts": book["accuracy_concept_probe"],
         "raw features": base["accuracy_raw_probe"]},
        {"task": "habitat", "concepts": habitat.score(strengths["test"], test["habitats"]),
         "raw features": raw_habitat.score(test["features"], test["habitats"])}])
    display(plots.table(tasks.round(3)))

# %% [markdown]
# ## Local explanations
#
# Why did the bottleneck classify *this* image as it did? The contribution of a concept
# is its strength on the image times its weight for the predicted class; the largest
# contributions, with their names, are the explanation.

# %%
fig, axes = plt.subplots(2 if ch.on_world else 1, 3, figsize=(12.6, 6.5 if ch.on_world else 3.2),
                               squeeze=False)
for col, i in enumerate([0, 1, 2]):
    expl = dncbm.local_explanation(strengths["test"][i].numpy(), probe, names["name"].tolist(), k=6)
    pred = class_names[int(probe.predict(strengths["test"][i:i + 1].numpy())[0])]
    labels = [f"{n} #{c}" for n, c in zip(expl["name"], expl["concept"])]
    sns.barplot(x=expl["contribution"], y=labels, ax=axes[-1, col], color="C0")
    true = class_names[int(test["labels"][i])]
    axes[-1, col].set(ylabel="", title=f"true {true}, predicted {pred}")
    if ch.on_world:
        axes[0, col].imshow(ch.world.sample(1, "test", start=i).images[0])
        axes[0, col].set_axis_off()
fig.tight_layout()

# %% [markdown]
# ## Global explanations, ranked two ways
#
# The original ranks a class's concepts by their **mean strength on the class's images**
# (each concept's mean over all images subtracted first), without the probe. The probe's
# largest positive weights are the other natural ranking: the concepts whose presence
# argues for the class. When the two agree, the explanation does not depend on the choice.

# %%
by_weight = dncbm.global_explanation(probe, names["name"].tolist(), class_names, k=4)
by_strength = dncbm.global_explanation_by_strength(strengths["test"], test["labels"],
                                                   names["name"].tolist(), class_names, k=4)
rankings = dncbm.rankings_side_by_side(by_weight, by_strength)
print(f"mean shared concepts among the top 4: {rankings['shared concepts'].mean():.2f}")
plots.table(rankings)

# %% [markdown]
# ## What the ground truth says

# %% tags=["remove-input"]
results = {"n_corpus": len(corpus["features"]), "n_concepts": sae.n_concepts,
           "vocabulary_size": len(words), "sae_l1": sae_l1, "sae_final_fvu": sae_history[-1]["fvu"],
           "sae_final_l0": sae_history[-1]["l0"], **base, **truth_summary,
           **dncbm.original_scale(ch.params, corpus["features"].shape[1], probe.coef_.size),
           **{k: v for k, v in book.items() if k not in ("sae_l0", "sae_fvu")},
           "original_code": original,
           "global_rankings_shared_top4": float(rankings["shared concepts"].mean()),
           "l1_measurement": l1_table.astype(float).to_dict(orient="index"),
           "l1_verdict": dncbm.l1_verdict(l1_table)}
ch.finish(results, summary=dncbm.chapter_summary(results, right_auroc),
          headline={"concept-probe accuracy": book["accuracy_concept_probe"],
                    "share of right names": truth_summary.get("share_right")})

# %% [markdown]
# ## Exercises
#
# Each exercise changes one parameter. Predict what moves, then open the solution: its
# numbers come from running the change (cached like every artifact).
#
# 1. **Halve λ₁.** With `sae_l1` halved, do the active concepts per image (L0) go up or
#    down? The unexplained variance (FVU)? The share of right names?

# %% tags=["hide-cell"]
plots.table(ch.exercise("halve_l1", dncbm.exercise_sae, sae_l1=sae_l1 / 2).astype(float).round(3))

# %% [markdown]
# 2. **Half the concepts.** With `sae_expansion` halved (half as many concepts), what
#    happens to dead concepts, L0 and the probe's accuracy?

# %% tags=["hide-cell"]
solution = ch.exercise("expansion", dncbm.exercise_sae, sae_expansion=sae_expansion // 2)
plots.table(solution.astype(float).round(3))

# %% [markdown]
# 3. **The paper's probe penalty.** `probe_l1 = "sum"` puts the paper's $\lVert W\rVert_1$ in
#    place of the code's mean: the same λ is then $CK$ times stronger. Predict accuracy and
#    concepts per decision.

# %% tags=["hide-cell"]
plots.table(ch.exercise("probe_l1", dncbm.exercise_probe, probe_l1="sum").astype(float).round(3))

# %% [markdown]
# 4. **Normalised embeddings.** `sae_inputs = "normalised"` trains the SAE on unit-norm
#    embeddings, as many SAE write-ups do. At the same λ₁, is the code sparser or denser?
#    Why does the scale of the inputs matter for λ₁?

# %% tags=["hide-cell"]
solution = ch.exercise("inputs", dncbm.exercise_sae, sae_inputs="normalised")
plots.table(solution.astype(float).round(3))
