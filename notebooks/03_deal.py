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
# DEAL {cite}`li2024deal` fine-tunes a CLIP so that the explanation maps of a class's
# descriptors are **disentangled** (different descriptors light up different pixels) and
# **localized** (together they cover what the class name's map covers), without any part
# annotation, while keeping or improving accuracy (the paper reports +7.6 points of top-1 on
# ImageNet). For an image of class $c$ with
# descriptor maps $h_1, \dots, h_K$ and class-name map $h_c$ (each min–max normalised):
#
# $$L_{sep} = \sum_{i<j} \sum_{p} h_i(p)\, h_j(p), \qquad
#   L_{con} = \sum_{p} \Big(\sum_k h_k(p) - h_c(p)\Big)^2, \qquad
#   L_{spa} = \sum_k \sum_p |h_k(p)|,$$
#
# and $L = L_{ctr} + \lambda_{sep} L_{sep} + \lambda_{con} L_{con} + \lambda_{spa} L_{spa}$,
# where $L_{ctr}$ is CLIP's contrastive loss on the *rich label*
# "{class}. It may contain $d_1, \dots, d_K$". The maps are gradient-weighted attention
# relevance {cite}`chefer2021generic` for a ViT, Grad-CAM {cite}`selvaraju2017gradcam` for
# a ResNet.
#
# This chapter fine-tunes the chapter-1 Concept World CLIP and scores it with DEAL's own
# metrics *and* against the part masks DEAL never sees. The original code departs from
# its paper in places that move the numbers; each such place is a switch here, the
# defaults follow the paper wherever it states a choice (the training length, batch and
# learning rate excepted: the original's ImageNet settings do not fit a chapter, and the
# switch table below lists every departure), and the chapter runs the original code's
# variant beside it.

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
# This chapter (declared with types and ranges in conceptlab.chapters.chapter.PARAMETERS)
dataset = "world"  # "world", or "imagefolder" / "cub" with data_root
data_root = None
train_root = None  # imagefolder: training images (default: data_root)
n_train = 2000
n_test = 400
n_localize = 48  # localizability costs K x 5 forward passes per image and variant
descriptors = "oracle"  # "oracle", a JSON file, "hf:<model>" or "openai:<model>"
fault_rate = 0.0
llm_base_url = None
llm_api_key_env = "OPENAI_API_KEY"
n_concepts = 5
# Fidelity switches (conceptlab.chapter.SWITCHES): paper's method by default
concept_text = "bare"  # "bare" descriptor (original code) or "sentence"
detach_maps = False  # True: the original code's detached maps
contrastive = "per_class"  # "per_image": same-class texts are negatives (original code)
zero_shot_prompts = "bare"  # "bare" class name (original code) or "ensemble"
localizability_headline = "correct"  # or "original_indexing", "original_indexing_pairing"
# DEAL training (the original's ImageNet run: lambda_sep 0.1, lr 5e-7, batch 256, 5000 steps)
lambda_sep = 0.1
lambda_con = 0.01
lambda_spa = 0.0005
deal_lr = 0.0001
deal_batch_size = 16
deal_steps = 40  # per seed (3 seeds x 3 runs fit the chapter budget); 0: evaluate only
deal_seeds = [0, 1, 2]  # training seeds of the loss-term breakdown ([]: skip)
text_augmentation = True
freeze_text = False
eval_mode = True
start_layer = None
deal_checkpoint = None  # a fine-tuned checkpoint (the original's format) evaluated beside the base
# Measurements and ablation ([] switches one off)
compare_lr = [5e-07]
ablation_lambda_sep = [0.0, 0.1]
ablation_lambda_con = [0.01]
ablation_steps = 20
exercise_steps = 20
n_show = 4

# %% tags=["hide-cell"]
import importlib.util

if importlib.util.find_spec("conceptlab") is None:  # outside a checkout (Colab, a hub): install it
    get_ipython().run_line_magic(  # noqa: F821
        "pip", "install -q 'conceptlab @ git+https://github.com/conceptlab/conceptlab'"
    )
from conceptlab import chapters, plots
from conceptlab.chapter import fidelity_table, setup, show_source
from conceptlab.chapters import deal as chapter  # this chapter's code

ch = setup(chapter.NAME, globals(), chapter.PARAMETERS)

# %% [markdown]
# **Real path.** `-p model ViT-B-32 -p pretrained <checkpoint or tag>`, `-p dataset cub
# -p data_root <CUB_200_2011>` or `-p dataset imagefolder -p data_root <test folder>
# -p train_root <train folder>` (the same class folders in both: checked before any
# training), `-p descriptors <file.json>` (the original format). The original's ImageNet
# settings are `-p deal_lr 5e-7 -p deal_batch_size 256 -p deal_steps 5000`. To evaluate a
# released DEAL checkpoint beside its base model without training:
# `-p deal_checkpoint <file.pt> -p deal_steps 0 -y '{compare_lr: [], ablation_lambda_sep: []}'`.
# Ground-truth columns (pointing game, energy in mask) need Concept World.

# %% tags=["hide-cell"]
import pandas as pd
import torch
from IPython.display import display

from conceptlab import explain, metrics
from conceptlab.chapters.report import reported_table

pd.set_option("display.max_colwidth", None)  # switch tables in full
r = chapter.Result(data=chapter.load_data(ch))
print(
    f"{len(r.data.train.labels)} training and {len(r.data.test.labels)} test images, "
    f"{len(r.data.test.class_names)} classes (chance {1 / len(r.data.test.class_names):.3f}), "
    f"{n_concepts} descriptors per class"
)

# %% [markdown]
# ## The method on the page
#
# The separation loss, as the package computes it for a batch of $N$ images with $K$ maps
# each (the maps arrive min–max normalised):

# %% tags=["remove-input"]
show_source(metrics.separation_loss)

# %% [markdown]
# Check by hand: two 2×2 maps that share one pixel overlap by $1 \cdot 1 = 1$; the
# other pixels add $1 \cdot 0 + 0 \cdot 0 + 0 \cdot 0$.

# %%
h = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # one image, K = 2 maps
print("L_sep =", metrics.separation_loss(h).item())
print(
    "L_con with class map [[1, 1], [0, 0]]:",
    metrics.consistency_loss(h, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])).item(),
)

# %% [markdown]
# $L_{con}$: the summed maps are $[[2, 1], [0, 0]]$, the class map $[[1, 1], [0, 0]]$, so
# $(2-1)^2 = 1$. The sparsity loss is the one place where the original normalises
# differently: an image's $K$ raw maps share *one* minimum and maximum, and the loss is
# summed (not averaged) over the batch.

# %% tags=["remove-input"]
show_source(metrics.sparsity_loss)

# %%
raw = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[4.0, 4.0], [0.0, 0.0]]]])  # one image, two raw maps
print("L_spa, joint min-max (as coded):", metrics.sparsity_loss(raw).item())
print("L_spa, each map min-max normalised:", explain.minmax(raw).sum().item())

# %% [markdown]
# Jointly, the maximum is 4: $2/4 + 4/4 + 4/4 = 2.5$. Map by map, each map's own
# maximum becomes 1: $1 + 1 + 1 = 3$.
#
# The map itself comes from the relevance rule, applied from `start_layer` to the last
# attention block: $R \leftarrow R + \overline{(\nabla A \odot A)^+}\, R$, starting from the
# identity, with the mean over heads; the map is the class token's row of $R$.

# %% tags=["remove-input"]
show_source(explain.relevance_step)

# %%
A = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])  # 1 head, 3 tokens
G = torch.tensor([[[[2.0, -1.0, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])  # dS/dA
R = explain.relevance_step(torch.eye(3)[None], A, G)
print("class-token row of R:", R[0, 0].tolist(), "-> map over the two patches:", R[0, 0, 1:].tolist())

# %% [markdown]
# By hand: $G \odot A$ has first row $[1, -0.5, 0]$, clamped to $[1, 0, 0]$; added to
# the identity's first row, $R_{CLS} = [2, 0, 0]$: only the class token's own attention had a
# positive gradient, so neither patch gets relevance.
#
# ## Before: the CLIP, with both concept texts
#
# The original explains the **bare** descriptor ("red striped head"); the sentence form
# "{class}, which has {descriptor}" puts the class name into all $K$ texts. The measures,
# defined once:
#
# - **disentanglability**, DEAL's score $1/(1+e^{-10(0.2 - L_{sep}/100)})$ of the maps'
#   pairwise overlap (higher: less overlap);
# - **localizability** (insertion fidelity): starting from a blurred image, the image's
#   pixels are put back in the order of the map's importance in five steps; how far each
#   step moves the image–descriptor similarity toward the full image's, averaged;
# - **top-1**: zero-shot with the bare class name; **description top-1**: classification
#   by description (chapter 2);
# - on the world, the **pointing game** (does the map's maximum fall on the described part?)
#   and **energy in mask** (the map's share of mass on it), both to be read against the
#   part's share of the image, which is what a uniform map scores;
# - **map overlap, same part / other part**: the soft IoU of two descriptors' maps, for
#   pairs of descriptors whose parts overlap and for pairs whose parts do not (a
#   localized explanation overlaps only in the first case);
# - **n localize**: the images localizability was computed on.
#
# The same CLIP scores differently here than in chapter 2: there a quarter of the
# descriptors are faulty (chapter 2's `fault_rate`) and its maps are scored on its own
# images; here the descriptors are fault-free (`fault_rate` 0) on this chapter's test set.

# %%
r.evals["CLIP"], r.clip_per_image = chapter.evaluate_clip(ch, r.data)
plots.table(pd.DataFrame(r.evals["CLIP"]).T.dropna(axis=1))

# %% [markdown]
# ## Fine-tuning: the paper's losses, and what the original code trains
#
# The paper trains the map losses. The original code builds the maps from *detached*
# attention and gradients (`explainer.py`, `interpret`), so $L_{sep}$, $L_{con}$ and $L_{spa}$
# reach the model with zero gradient and only $L_{ctr}$ on rich labels trains. We run both
# (`detach_maps` False and True), with everything else equal, and a third run that also
# takes the original's contrastive loss (`train.py` treats same-class texts in a batch as
# negatives, image by image; the paper does not say). Each run is stored under a hash of
# all its inputs.

# %%
r.runs = chapter.fine_tune_runs(ch, r.data, progress=True)
for name, (_, history) in r.runs.items():
    if history:
        fig = chapter.plot_losses(history, name)

# %% [markdown]
# *What to look for:* one row of four loss curves per fine-tuning run (none for a
# `deal_checkpoint`, which has no training history), each a faint per-step line under its
# running mean. In the paper's run the
# separation, consistency and sparsity losses are trained and should fall with the contrastive
# one; in the maps-detached run they carry no gradient, so whatever they do there is a side
# effect of the contrastive loss, and a map loss that falls as far there as in the paper's run
# is not being moved by its own term.

# %% tags=["hide-cell"]
r.evals.update({name: chapter.evaluate_both_texts(ch, tuned, r.data) for name, (tuned, _) in r.runs.items()})

# %% [markdown]
# ## Results
#
# The paper's headline, what the original code computes (maps detached, per-image
# contrastive loss; localizability with the original notebook's pixel indexing and
# image/map pairing), and this book's run
# (the paper's method), each as before → after on the model at hand:

# %%
if chapter.PAPER_RUN in r.evals and chapter.DETACHED_RUN in r.evals:
    rows = chapter.fidelity_rows(
        r.evals["CLIP"][concept_text],
        r.evals[chapter.PAPER_RUN][concept_text],
        r.evals[chapter.original_run(r)][concept_text],
        localizability_headline,
    )
    display(plots.table(fidelity_table(rows)))
    display(chapter.switch_steps(r, concept_text))

# %% [markdown]
# The second table goes from this book's run to the original code's one switch at a time,
# each column a literal run. The original's other settings (learning rate, batch, steps)
# are too large for a chapter run; every switch where this run departs from the paper or
# from the original code:

# %%
ch.differences(chapter.switches(ch.params)).astype(str)

# %% [markdown]
# All models, all measures (localizability on the first `n_localize` test images, every
# other column on all of them; top-5 only with more than five classes):

# %%
columns = [
    "disentanglability",
    "localizability",
    "top1",
    "top5",
    "description_top1",
    "pointing_game",
    "energy_in_mask",
    "map_overlap_same_part",
    "map_overlap_other_part",
    "n_localize",
]
table = pd.DataFrame({name: e[concept_text] for name, e in r.evals.items()}).T
plots.table(table[[c for c in columns if c in table]])

# %% [markdown]
# **What chance scores.** Neither of DEAL's own scores comes with a chance level in the
# paper, so the chapter computes one for each, through the same conversion as the score.
# For disentanglability: the CLIP's maps with every map's pixels shuffled (the same values,
# placed at random; maps that overlap *less* than that are disentangled by more than
# their values alone explain). For localizability: uniform random maps (a random order of
# insertion). Each chance comes with its 95 % band over test images. On the world the truth
# goes through the same conversion too: the part masks as maps, the score's ceiling. A
# score of the model's own maps *above* that ceiling means the score rewards something
# other than finding the named part. The summary sets both scores beside these references:

# %%
plots.table(pd.DataFrame(chapter.map_references(r, concept_text)).T.round(3))

# %% [markdown]
# **Localizability three ways.** Correct (whole pixels of the image the map belongs to);
# the original notebook's indexing (it ranks H×W pixels but indexes the flattened C×H×W
# image, so it inserts only part of the first channel); and that indexing together with
# the notebook's pairing (`images.repeat(K, 1, 1, 1)` against image-major maps and texts,
# so most rows insert one image's pixels by another image's map; `exp_localizability.ipynb`).
# The paper's 0.633 → 0.673 was measured the third way.

# %%
loc_cols = [c for c in r.evals["CLIP"][concept_text] if c.startswith("localizability")]
plots.table(pd.DataFrame({name: {c: e[concept_text][c] for c in loc_cols} for name, e in r.evals.items()}).T)

# %% [markdown]
# ## Which loss term does the work? Over seeds
#
# Three runs at `deal_steps`, each over `deal_seeds`: maps detached (only $L_{ctr}$ on rich
# labels trains), $\lambda_{sep} = 0$ ($L_{ctr}$, $L_{con}$ and $L_{spa}$ train) and the
# paper's run (all four). The differences split the whole change into the part of
# $L_{ctr}$, of $L_{con} + L_{spa}$ and of $L_{sep}$, each with a 95 % t interval over
# seeds; a part whose interval holds 0 is not a finding. (`deal_steps` is shorter than a
# single run would be, so that three seeds of three runs fit the chapter's time budget.)

# %%
r.seeds = chapter.seed_runs(ch, r.data, r.evals)
parts = chapter.breakdown(ch, r)
if parts:
    display(plots.table(pd.DataFrame({(m, k): v for m, p in parts.items() for k, v in p.items()}).T))
    fig = chapter.breakdown_figure(ch, r)

# %% [markdown]
# *What to look for* (with `deal_seeds` set): from left to right each column adds loss terms,
# each dot is a seed and the black bar their mean; a step between neighbouring columns that
# is larger than the spread of the dots is what the added term contributes, one within the
# spread is not a finding. The paper's claim needs the last column above the CLIP in
# disentanglability and pointing game, against the grey dotted chance line where there is
# one, without a drop in top-1.
#
# Note what disentanglability can and cannot reward: it rewards pulling a class's
# descriptor maps apart, whatever they describe. The oracle writes one descriptor per part
# first, so most of a class's descriptors describe different parts; but a class with fewer
# parts than descriptors gets a second phrase about a part it already described (a head's
# colour beside the whole head), and there separating the maps is rewarded too. The pointing
# game scores each map against its own part's mask, so it rewards only a map that moves onto
# its part.
#
# ## Does the original learning rate move the world CLIP?
#
# The original's ImageNet run uses lr $5 \cdot 10^{-7}$ for 5000 steps of 256 images. Here
# each learning rate trains `ablation_steps` steps from the same CLIP; the relative change of
# the vision weights and of the scores says whether a learning rate does anything in a
# chapter-sized run.

# %%
r.learning_rates = chapter.learning_rates(ch, r.data, r.evals["CLIP"][concept_text])
plots.table(r.learning_rates)

# %% [markdown]
# ## Ablation: λ_sep and steps
#
# A grid over $\lambda_{sep}$ and $\lambda_{con}$ ($\lambda_{spa}$ fixed), each point trained for
# `ablation_steps` steps with the paper's differentiable maps and every seed of the breakdown
# (`deal_seeds`); the table gives each point's mean and t interval over the seeds. In the figure,
# the top row sets the grid beside the breakdown's runs at `deal_steps` ($\lambda_{sep} = 0$ and
# the chapter's), the bottom row follows the chapter's λ's over steps; every point is a mean over
# seeds with its interval, the dots the seeds. Read it against $\lambda_{sep} = 0$: a gain that
# appears there too does not come from $L_{sep}$.

# %%
r.ablation = chapter.ablation(ch, r.data)
if r.ablation:
    display(plots.table(chapter.ablation_table(r.ablation)))
    fig = chapter.ablation_figure(ch, r)

# %% [markdown]
# *What to look for:* in the top row, each measure at λ_sep = 0 against the chapter's λ_sep and
# against the dashed CLIP line: a gain over the CLIP that is already there at λ_sep = 0 does not
# come from L_sep. In the bottom row, whether the measures keep moving from `ablation_steps` to
# `deal_steps` (a trend still rising suggests that a longer run would move them further). Two
# points whose intervals overlap are not told apart by these seeds. The grey band is
# disentanglability's chance (the CLIP's maps with their pixels shuffled) and the dotted line the
# part masks' own score: a gain that ends inside the band has made the maps as disentangled as
# noise, not as the parts.

# %% [markdown]
# ## The same images before and after
#
# One test image per class (rows), the $K$ descriptors of its class (columns); the first
# grid is the CLIP, then each fine-tuned model. On the world the described part is outlined
# in white: look for maps that move inside the outline after fine-tuning.

# %%
figs = chapter.example_maps(ch, r)
for c in chapter.shown_classes(ch, r):
    print(f"{c}: {r.data.descriptors.descriptors[c]}")

# %% [markdown]
# *What to look for:* a cell against the same cell in the grids below it. If DEAL localises,
# each descriptor's red (most relevant) region moves inside its white outline after fine-tuning
# with the map losses, and the columns of a row light different places; maps that only spread
# apart without moving onto their outlines are disentangled but not localised, which
# disentanglability rewards and the pointing game does not.

# %% [markdown]
# ## Explore
#
# Pick a test image and one of its class's descriptors and compare the maps (live in
# JupyterLab; the book shows the first image).

# %%
chapter.map_explorer(ch, r)

# %% [markdown]
# *What to look for:* the quoted descriptor's map under each model, side by side; the
# fine-tuned columns should concentrate on the part the descriptor names if DEAL localises.
# The book shows one image and one descriptor: an example to look at, not evidence.

# %% [markdown]
# ## Summary

# %%
chapters.finish(ch, r, chapter)

# %% [markdown]
# Every headline number with its 95 % interval (the CLIP's over test images, DEAL's over
# training seeds), chance, and the paper's ImageNet number {cite}`li2024deal` (another
# model and data set: compare the direction of the change, not the values):

# %%
plots.table(reported_table(chapter.headline(ch, r)))

# %% [markdown]
# ## Exercises
#
# Each exercise fine-tunes for `exercise_steps` steps from the same CLIP, once as in this
# chapter and once with one parameter changed, and scores both on 200 test images.
# Predict first, then open the solution.
#
# 1. **The original code's detached maps.** With `detach_maps=True` the map losses carry
#    no gradient. Which numbers move less than in the chapter's run: disentanglability,
#    pointing game, accuracy?

# %% tags=["hide-cell"]
ch.exercise("detached maps", chapter.exercise, detach_maps=True)

# %% [markdown]
# 2. **No separation loss.** Set $\lambda_{sep} = 0$. Does disentanglability still rise? Does
#    the pointing game?

# %% tags=["hide-cell"]
ch.exercise("no separation loss", chapter.exercise, lambda_sep=0.0)

# %% [markdown]
# 3. **The sentence concept text.** Explain and train "{class}, which has {descriptor}"
#    instead of the bare descriptor. The class name is now in every text: predict what
#    happens to disentanglability before you look.

# %% tags=["hide-cell"]
ch.exercise("sentence concept text", chapter.exercise, concept_text="sentence")

# %% [markdown]
# 4. **Worse descriptors.** Raise the oracle's `fault_rate` to 0.5: half the descriptors
#    name a wrong colour, a habitat or a vague phrase. What happens to the pointing game
#    on the descriptors that still name a part?

# %% tags=["hide-cell"]
ch.exercise("faulty descriptors", chapter.exercise, fault_rate=0.5)
