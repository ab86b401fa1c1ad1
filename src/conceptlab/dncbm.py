"""Discover-then-Name (DN-CBM): name SAE concepts with CLIP text, probe on them, score the names.

A library, usable on a researcher's own tensors: raw (not L2-normalised) CLIP image embeddings
(:func:`embed_images`, :func:`world_features`, :func:`folder_features`), put on a stated scale
(:func:`feature_scale`) -> a sparse autoencoder (:mod:`conceptlab.sae`) -> a name per concept,
the vocabulary word whose text embedding is closest to the concept's decoder direction
(:func:`name_concepts`) -> a sparse linear probe on concept strengths (:func:`fit_probe` with a
:class:`ProbeConfig`: the original's Adam on cross-entropy plus λ times the *mean* ``|W|``, or FISTA).
On Concept World, :func:`score_names` checks every name against the ground truth,
:func:`name_score_nulls` gives the same scores for concepts that detect nothing, and
:func:`local_truth` checks an image's explanation against what the image shows.
The chapter's parameters and bookkeeping live in :mod:`conceptlab.chapters.dncbm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, safe_torch_load
from .data import ImageSet, load_images
from .models import encode_texts, images_to_tensor
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld

# Words no Concept World image shows: a concept named by one of them is named wrongly.
DISTRACTORS: tuple[str, ...] = (
    "car",
    "house",
    "piano",
    "bicycle",
    "computer",
    "bottle",
    "chair",
    "guitar",
    "bridge",
    "clock",
    "river",
    "mountain",
    "city",
    "road",
    "cloud",
    "fire",
    "metal",
    "wooden",
    "glass",
    "paper",
    "happy",
    "angry",
    "fast",
    "old",
    "young",
    "soft",
    "shiny",
    "round",
    "square",
    "tall",
    "dog",
    "cat",
    "bird",
    "fish",
    "horse",
    "insect",
    "flower",
    "grass",
    "leaf",
    "stone",
    "night",
    "dawn",
    "winter",
    "seeds",
    "herd",
    "nest",
    "mud",
    "photo",
    "wallpaper",
    "download",
)
GROUND_TRUTH_KEYS = ("labels", "present", "attributes", "habitats")
SAE_INPUTS = ("raw", "normalised")
PROBE_L1 = ("mean", "sum")
PROBE_SOLVERS = ("adam", "fista")
FEATURE_SCALES = ("raw", "unit_rms")


# ---------------------------------------------------------------------------- features
@torch.no_grad()
def embed_images(clip: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Raw image embeddings (after the projection, *not* L2-normalised: what the original SAE learns), in
    batches of 64 (see :func:`conceptlab.models.encode_images`)."""
    dev = next(clip.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s : s + batch_size]
        x = images_to_tensor(chunk, clip) if isinstance(chunk, np.ndarray) else chunk
        out.append(clip.encode_image(x.to(dev)).float().cpu())
    return torch.cat(out)


def feature_scale(features: torch.Tensor, mode: str = "raw") -> float:
    """The constant ``c`` the SAE's inputs are multiplied by: 1 for ``"raw"`` (the original); for
    ``"unit_rms"``, ``sqrt(d / mean ||x||^2)``, so that the scaled features have a per-dimension RMS of 1.

    Training on ``c x`` with coefficient ``l1`` is training on ``x`` with ``l1 / c`` (the loss is
    ``c^2`` times the raw one; codes scale by ``c``, directions do not), and a probe on the codes
    with ``lam`` is one on the raw codes with ``lam / c``: :func:`raw_scale_coefficient`. With
    ``"unit_rms"`` a coefficient means the same on every CLIP, whatever its embedding norm.
    """
    if mode not in FEATURE_SCALES:
        raise ValueError(f"feature scale {mode!r} is not one of {FEATURE_SCALES}")
    if mode == "raw":
        return 1.0
    return float((features.shape[1] / features.float().pow(2).sum(-1).mean()).sqrt())


def raw_scale_coefficient(coefficient: float, scale: float) -> float:
    """The sparsity coefficient on the unscaled features that has the same minimiser as
    ``coefficient`` on features multiplied by ``scale`` (SAE λ₁ and probe λ alike)."""
    return coefficient / scale


def sae_inputs(features: torch.Tensor, mode: str, scale: float = 1.0) -> torch.Tensor:
    """The SAE's inputs: the raw embeddings or L2-normalised ones, times ``scale`` (:func:`feature_scale`)."""
    x = F.normalize(features, dim=-1) if mode == "normalised" else features
    return x * scale if scale != 1.0 else x


def world_features(
    store: ArtifactStore,
    world: ConceptWorld,
    clip: torch.nn.Module,
    key: dict,
    n: int,
    split: str,
    batch_size: int = 512,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Raw embeddings of world images ``0..n`` of ``split`` with their ground truth, streamed and cached.

    ``key`` identifies the CLIP by content (``ch.key()``); the cache is keyed by it, the world
    configuration, the split and ``n``. Returns ``features`` plus the ground-truth arrays.
    """

    def build(d: Path) -> None:
        parts: dict[str, list] = {k: [] for k in ("features", *GROUND_TRUTH_KEYS)}
        for batch in tqdm(
            world.stream(n, batch_size, split), total=-(-n // batch_size), disable=not progress, desc=f"embed {split}"
        ):
            parts["features"].append(embed_images(clip, batch.images))
            for k in GROUND_TRUTH_KEYS:
                parts[k].append(torch.from_numpy(np.asarray(getattr(batch, k))))
        atomic_torch_save({k: torch.cat(v) for k, v in parts.items()}, d / "features.pt")

    full_key = {**key, "world": world.config.to_dict(), "split": split, "n": n, "embedding": "raw"}
    return store.get_or_build(
        "dncbm_features", full_key, build, lambda d: safe_torch_load(d / "features.pt", owner="store")
    )


def folder_features(
    store: ArtifactStore,
    images: ImageSet,
    clip: torch.nn.Module,
    preprocess: Callable,
    key: dict,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Raw embeddings and labels of a real image set (the model's own preprocess), cached by the
    CLIP and data set (``key``, content hashes) and the file list."""

    def build(d: Path) -> None:
        feats = []
        for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="embed images"):
            x, _ = load_images(images.paths[s : s + batch_size], preprocess)
            feats.append(embed_images(clip, x, batch_size=batch_size))
        atomic_torch_save({"features": torch.cat(feats), "labels": torch.from_numpy(images.labels)}, d / "features.pt")

    full_key = {**key, "paths": [str(p) for p in images.paths], "embedding": "raw"}
    return store.get_or_build(
        "dncbm_features", full_key, build, lambda d: safe_torch_load(d / "features.pt", owner="store")
    )


def real_splits(
    images: ImageSet, n_corpus: int, n_train: int, n_test: int, seed: int = 0, test_images: ImageSet | None = None
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(corpus, probe train, probe test) of a real data set: the corpus is a seeded subset of all images;
    the probe sets a seeded disjoint split of them, or of ``images`` / ``test_images`` where the data set has one."""
    corpus = images.subset(n_corpus, seed)
    if test_images is not None:
        return corpus, images.subset(n_train, seed), test_images.subset(n_test, seed)
    if len(images) < 4:
        raise ValueError(f"Only {len(images)} images: a probe needs at least 4 (2 to train, 2 to test).")
    order = np.random.default_rng(seed).permutation(len(images))
    n_te = min(n_test, len(images) // 3)

    def pick(idx: np.ndarray) -> ImageSet:
        return ImageSet([images.paths[i] for i in np.sort(idx)], images.labels[np.sort(idx)], images.class_names)

    return corpus, pick(order[n_te:][:n_train]), pick(order[:n_te])


# ---------------------------------------------------------------------------- naming
def world_vocabulary(world: ConceptWorld, distractors: Sequence[str] = DISTRACTORS) -> list[str]:
    """Every class, part, attribute and habitat word of the world, then the distractor words."""
    words = [
        *world.class_names,
        *PARTS,
        *(v for values in ATTRIBUTES.values() for v in values),
        *HABITATS,
        *distractors,
    ]
    return list(dict.fromkeys(words))


def load_vocabulary(path: str | Path) -> list[str]:
    """A word list, one word or phrase per line (CLIP-Dissect's ``20k.txt`` format); blank and ``#`` lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No vocabulary file at {path}: pass a text file with one word per line "
            "(e.g. CLIP-Dissect's data/20k.txt), or vocabulary=None for the world's words."
        )
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ValueError(f"Vocabulary file {path} holds no words: write one word per line.")
    return words


def name_concepts(directions: torch.Tensor, word_embeddings: torch.Tensor, words: Sequence[str]) -> pd.DataFrame:
    """Name each concept by the word whose text embedding has the highest cosine with its decoder direction.

    Returns one row per concept: ``name``, ``similarity`` and the runner-up ``second`` / ``margin``.
    """
    if word_embeddings.shape[0] != len(words):
        raise ValueError(f"{word_embeddings.shape[0]} word embeddings for {len(words)} words.")
    sims = F.normalize(directions.float(), dim=-1) @ F.normalize(word_embeddings.float(), dim=-1).T
    top = sims.topk(min(2, len(words)), dim=1)
    second = top.indices[:, -1]
    return pd.DataFrame(
        {
            "concept": np.arange(len(directions)),
            "name": [words[i] for i in top.indices[:, 0].tolist()],
            "similarity": top.values[:, 0].numpy(),
            "second": [words[i] for i in second.tolist()],
            "margin": (top.values[:, 0] - top.values[:, -1]).numpy(),
        }
    )


def embed_vocabulary(
    clip: torch.nn.Module, tokenizer: Callable, words: Sequence[str], template: str = "{}"
) -> torch.Tensor:
    """(V, D) normalised text embeddings of the vocabulary (each word put into ``template``)."""
    return encode_texts(clip, tokenizer, [template.format(w) for w in words])


# ---------------------------------------------------------------------------- ground truth
def word_truth(word: str, gt: dict[str, torch.Tensor | np.ndarray], class_names: Sequence[str]) -> np.ndarray | None:
    """Which images truly show ``word``: a class name (its class), a habitat (its background), a part
    (the part is present), a colour / pattern / size (some present part has it). None for other words."""
    g = {k: np.asarray(gt[k]) for k in GROUND_TRUTH_KEYS}
    if word in class_names:
        return g["labels"] == list(class_names).index(word)
    if word in HABITATS:
        return g["habitats"] == HABITATS.index(word)
    if word in PARTS:
        return g["present"][:, PARTS.index(word)]
    for k, values in enumerate(ATTRIBUTES.values()):
        if word in values:
            return ((g["attributes"][:, :, k] == values.index(word)) & g["present"]).any(1)
    return None


def auroc_matrix(scores: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """(W, K) AUROC of each of K score columns for each of W boolean truth rows (NaN if a row is constant).

    Mann-Whitney U from average ranks: one rank pass and one matrix product give every
    concept x word AUROC at once, where a loop over ``sklearn.metrics.roc_auc_score`` would
    take minutes for a thousand concepts (the test checks it against sklearn).
    """
    ranks = rankdata(scores, axis=0)
    truths = truths.astype(np.float64)
    n_pos = truths.sum(1, keepdims=True)
    n_neg = truths.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (truths @ ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def score_names(
    activations: torch.Tensor,
    names: pd.DataFrame,
    gt: dict,
    class_names: Sequence[str],
    directions: torch.Tensor,
    right_auroc: float = 0.75,
    duplicate_cosine: float = 0.95,
    top_k: int = 20,
) -> pd.DataFrame:
    """Check every concept's name against the ground truth of the images in ``gt``.

    Columns: ``fires`` (share of images where the concept is active), ``dead`` (never active),
    ``duplicate`` (decoder cosine >= ``duplicate_cosine`` with an earlier live concept),
    ``kind`` of the name (class / habitat / part / colour / pattern / size / no ground truth),
    ``auroc`` of the activation for images that truly show the name, ``right`` (AUROC >=
    ``right_auroc``), ``top_precision`` (share of the concept's ``top_k`` most activating
    images that show its name: high for a narrow concept that AUROC calls wrong because it
    fires on few of the images with that word), and ``best_word`` / ``best_auroc``: the
    checkable word the concept detects best, i.e. what an oracle would have named it.
    """
    acts = activations.numpy()
    fires = (acts > 0).mean(0)
    dead = fires == 0
    cos = F.normalize(directions.float(), dim=-1) @ F.normalize(directions.float(), dim=-1).T
    cos = cos.numpy()
    cos[:, dead] = 0
    duplicate = np.tril(cos >= duplicate_cosine, k=-1).any(1) & ~dead
    vocab, truths = checkable_words(gt, class_names)
    auc = auroc_matrix(acts, truths)  # (words, concepts)
    row = {w: i for i, w in enumerate(vocab)}
    own = np.array([auc[row[n], k] if n in row else np.nan for k, n in enumerate(names["name"])])
    best = np.nanargmax(np.nan_to_num(auc, nan=-1), axis=0)
    kind = [_word_kind(n, class_names) for n in names["name"]]
    top = np.argsort(-acts, axis=0, kind="stable")[:top_k]  # (top_k, concepts) most activating images
    precision = np.array(
        [
            truths[row[n], top[:, k]][acts[top[:, k], k] > 0].mean() if n in row and not dead[k] else np.nan
            for k, n in enumerate(names["name"])
        ]
    )
    return names.assign(
        fires=fires,
        dead=dead,
        duplicate=duplicate,
        kind=kind,
        auroc=own,
        top_precision=precision,
        right=(own >= right_auroc) & ~dead,
        best_word=[vocab[i] for i in best],
        best_auroc=auc[best, np.arange(auc.shape[1])],
    )


def checkable_words(gt: dict, class_names: Sequence[str], constant: bool = False) -> tuple[list[str], np.ndarray]:
    """The world's words with ground truth on the images of ``gt`` and their (words, images) truth;
    words true of every image or of none are left out unless ``constant``."""
    truths = {
        w: t
        for w in world_words(class_names)
        if (t := word_truth(w, gt, class_names)) is not None and (constant or 0 < t.sum() < len(t))
    }
    return list(truths), np.stack(list(truths.values()))


def world_words(class_names: Sequence[str]) -> list[str]:
    """The words with ground truth in a world with these classes."""
    return list(dict.fromkeys([*class_names, *HABITATS, *PARTS, *(v for vs in ATTRIBUTES.values() for v in vs)]))


def _word_kind(word: str, class_names: Sequence[str]) -> str:
    if word in class_names:
        return "class"
    if word in HABITATS:
        return "habitat"
    if word in PARTS:
        return "part"
    for attribute, values in ATTRIBUTES.items():
        if word in values:
            return attribute
    return "no ground truth"


def summarise_scores(scores: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of :func:`score_names`: dead / duplicate counts, share of right names."""
    live = scores[~scores["dead"]]
    checkable = live[live["auroc"].notna()]
    return {
        "concepts": len(scores),
        "dead": int(scores["dead"].sum()),
        "duplicates": int(scores["duplicate"].sum()),
        "distinct_names": int(live["name"].nunique()),
        "share_named_without_ground_truth": float((live["kind"] == "no ground truth").mean()),
        "share_right": float(live["right"].mean()),
        "share_right_of_checkable": float(checkable["right"].mean()) if len(checkable) else float("nan"),
        "median_auroc_of_name": float(checkable["auroc"].median()) if len(checkable) else float("nan"),
        "share_top_images_show_name": float((live["top_precision"] >= 0.9).mean()),
        "share_oracle_detects_something": float((live["best_auroc"] >= 0.75).mean()),
    }


def name_score_nulls(
    activations: torch.Tensor,
    names: pd.DataFrame,
    gt: dict,
    class_names: Sequence[str],
    right_auroc: float = 0.75,
    n_draws: int = 20,
    seed: int = 0,
    top_k: int = 20,
) -> pd.DataFrame:
    """What :func:`summarise_scores`' shares would be by chance, one row per random draw.

    ``share_right``: the live concepts' names shuffled among them (the same names, given at random).
    ``share_oracle_detects_something`` and ``share_top_images_show_name``: the images' ground truth
    shuffled against the activations (concepts that detect nothing, each still taking the best of
    every checkable word: a best-of-many AUROC is well above 0.5 by chance).
    """
    acts = np.asarray(activations, dtype=np.float64)
    live = (acts > 0).any(0)
    acts, own_names = acts[:, live], np.asarray(names["name"])[live]
    vocab, truths = checkable_words(gt, class_names)
    truths = truths.astype(float)
    row = {w: i for i, w in enumerate(vocab)}
    ranks = rankdata(acts, axis=0)
    top = np.argsort(-acts, axis=0, kind="stable")[:top_k].T  # (concepts, top_k)
    active = np.take_along_axis(acts.T, top, axis=1) > 0
    rng = np.random.default_rng(seed)
    n_pos = truths.sum(1, keepdims=True)
    n_neg = truths.shape[1] - n_pos
    auc = (truths @ ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    draws = []
    for _ in range(n_draws):
        shuffled = rng.permutation(own_names)
        own = np.array([auc[row[n], k] if n in row else np.nan for k, n in enumerate(shuffled)])
        perm_truths = truths[:, rng.permutation(truths.shape[1])]
        perm_auc = (perm_truths @ ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        rows = np.array([row.get(n, -1) for n in own_names])
        hits = np.take_along_axis(perm_truths[np.clip(rows, 0, None)], top, axis=1)
        with np.errstate(invalid="ignore"):
            precision = np.where(rows >= 0, (hits * active).sum(1) / active.sum(1), np.nan)
        draws.append(
            {
                "share_right": float(np.mean(np.nan_to_num(own, nan=0.0) >= right_auroc)),
                "share_oracle_detects_something": float(np.mean(perm_auc.max(0) >= right_auroc)),
                "share_top_images_show_name": float(np.mean(np.nan_to_num(precision) >= 0.9)),
            }
        )
    return pd.DataFrame(draws)


# ---------------------------------------------------------------------------- concept bottleneck
@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe; defaults are the original's README command (Adam, lr 1e-2, batch 512,
    200 epochs, no bias, cross-entropy + 0.1 x mean ``|W|``)."""

    lam: float = 0.1
    l1: str = "mean"  # "mean": nn.L1Loss against zeros, as coded; "sum": ||W||_1, as written
    solver: str = "adam"  # "adam": the original; "fista": proximal gradient, exact zeros
    lr: float = 1e-2
    epochs: int = 200
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.l1 not in PROBE_L1 or self.solver not in PROBE_SOLVERS or self.lam < 0:
            raise ValueError(f"Bad ProbeConfig: l1 in {PROBE_L1}, solver in {PROBE_SOLVERS}, lam >= 0; got {self}.")


def probe_l1_term(weight: torch.Tensor, l1: str = "mean") -> torch.Tensor:
    """The probe's sparsity term: mean ``|W|`` over all classes x concepts (the code's ``nn.L1Loss``
    against zeros) or the sum (the paper's ``||W||_1``)."""
    return weight.abs().mean() if l1 == "mean" else weight.abs().sum()


def probe_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, lam: float, l1: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (batch mean) plus ``lam`` times :func:`probe_l1_term`."""
    return F.cross_entropy(logits, labels) + lam * probe_l1_term(weight, l1)


class LinearProbe:
    """A trained bias-free linear classifier: ``coef_`` is (classes, inputs), as in scikit-learn."""

    def __init__(self, coef: np.ndarray) -> None:
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.classes_ = np.arange(len(self.coef_))

    def decision_function(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef_.T

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.decision_function(x).argmax(1)

    def score(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


def fit_probe(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    cfg: ProbeConfig | float = ProbeConfig(),
    n_classes: int | None = None,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """A bias-free linear probe minimising ``cross-entropy + cfg.lam * L1(W)`` on ``device``.

    A number for ``cfg`` is a coefficient on the summed ``||W||_1``, solved by FISTA (500 iterations).
    """
    if not isinstance(cfg, ProbeConfig):
        cfg = ProbeConfig(lam=float(cfg), l1="sum", solver="fista", epochs=500)
    return fit_probes([x], y, [cfg], n_classes, device)[0]


def fit_probes(
    xs: Sequence[np.ndarray | torch.Tensor],
    y: np.ndarray | torch.Tensor,
    cfgs: Sequence[ProbeConfig],
    n_classes: int | None = None,
    device: str | torch.device | None = None,
) -> list[LinearProbe]:
    """One probe per ``(xs[i], cfgs[i])``, all on the labels ``y`` (a sweep: several λ, or several SAEs'
    strengths). Adam probes whose settings differ only in λ train together, as one stacked weight: Adam
    is element-wise, so each probe follows its own fit step for step, at the cost of one loop."""
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    dev = torch.device(device or "cpu")
    inputs = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in xs]
    weights: list[torch.Tensor | None] = [None] * len(inputs)
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.solver == "adam":
            groups.setdefault((replace(cfg, lam=0.0), inputs[i].shape), []).append(i)
        else:
            weights[i] = _fit_fista(inputs[i].to(dev), y.to(dev), n_classes, cfg)
    for members in groups.values():
        stacked = torch.stack([inputs[i] for i in members]).to(dev)
        fitted = _fit_adam(stacked, y.to(dev), n_classes, [cfgs[i] for i in members])
        for i, w in zip(members, fitted):
            weights[i] = w
    return [LinearProbe(w.cpu().double().numpy()) for w in weights]


def _fit_adam(xs: torch.Tensor, y: torch.Tensor, n_classes: int, cfgs: Sequence[ProbeConfig]) -> torch.Tensor:
    """The original's loop for ``K`` probes at once (``xs``: (K, N, D); weights: (K, classes, D)): a
    bias-free linear layer (``nn.Linear``'s initialisation), Adam, shuffled minibatches, ``epochs`` epochs.

    The gradient of :func:`probe_loss` is written out (softmax minus one-hot for the cross-entropy, the
    sign of ``W`` for the L1 term, as autograd computes them) and handed to ``torch.optim.Adam``: on a
    probe this small autograd's per-step overhead was four fifths of the time, and the sweeps fit a dozen.
    """
    cfg = cfgs[0]
    torch.manual_seed(cfg.seed)
    init = nn.Linear(xs.shape[2], n_classes, bias=False).weight.detach()
    weight = init.expand(len(cfgs), -1, -1).clone().to(xs.device).requires_grad_()
    opt = torch.optim.Adam([weight], lr=cfg.lr)
    l1_scale = torch.tensor([c.lam / init.numel() if c.l1 == "mean" else c.lam for c in cfgs], device=xs.device)
    l1_scale = l1_scale.view(-1, 1, 1)
    onehot = F.one_hot(y, n_classes).to(xs.dtype)
    for epoch in range(cfg.epochs):
        order = torch.randperm(xs.shape[1], generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        for idx in order.to(xs.device).split(cfg.batch_size):
            with torch.no_grad():
                batch = xs[:, idx]
                residual = (torch.softmax(batch @ weight.transpose(1, 2), dim=2) - onehot[idx]) / len(idx)
                weight.grad = residual.transpose(1, 2) @ batch + l1_scale * torch.sign(weight)
            opt.step()
    return weight.detach()


def _fit_fista(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: ProbeConfig) -> torch.Tensor:
    """The same objective, full batch, by FISTA (accelerated proximal gradient, step ``1/L``).

    The soft-threshold step sets weights to exactly zero, which Adam on the same loss does not.
    Written here because scikit-learn's L1 solver (saga) has no mean-|W| scale, needs a bias and
    takes minutes for a thousand concepts where this takes seconds.
    """
    per_weight = cfg.lam / (n_classes * x.shape[1]) if cfg.l1 == "mean" else cfg.lam
    onehot = F.one_hot(y, n_classes).float()
    step = 1.0 / max(0.5 * torch.linalg.matrix_norm(x, ord=2).item() ** 2 / len(y), 1e-12)
    w = torch.zeros(x.shape[1], n_classes, device=x.device)
    momentum, t = w.clone(), 1.0
    for _ in range(cfg.epochs):
        grad = x.T @ (torch.softmax(x @ momentum, dim=1) - onehot) / len(y)
        w_next = momentum - step * grad
        w_next = torch.sign(w_next) * (w_next.abs() - step * per_weight).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = w_next + (t - 1) / t_next * (w_next - w)
        w, t = w_next, t_next
    return w.T


def decision_sizes(strengths: np.ndarray | torch.Tensor, probe: LinearProbe, energy: float = 0.9) -> np.ndarray:
    """(N,) number of concepts whose positive contributions (strength x weight of the predicted
    class), largest first, reach ``energy`` of the image's total positive contribution (0 where
    there is none): the original's coverage metric, counted as a number of concepts."""
    z = np.asarray(strengths, dtype=np.float64)
    contrib = np.clip(z * probe.coef_[probe.predict(z)], 0, None)
    contrib = -np.sort(-contrib, axis=1)
    total = contrib.sum(1, keepdims=True)
    needed = (np.cumsum(contrib, axis=1) < energy * total).sum(1) + 1
    return np.where(total[:, 0] > 0, needed, 0)


def concepts_per_decision(strengths: np.ndarray | torch.Tensor, probe: LinearProbe, energy: float = 0.9) -> float:
    """Mean of :func:`decision_sizes` over the images."""
    return float(decision_sizes(strengths, probe, energy).mean())


def nonzero_per_class(probe: LinearProbe, tol: float = 0.0) -> float:
    """Mean number of weights per class with ``|w| > tol``."""
    return float((np.abs(probe.coef_) > tol).sum(1).mean())


def local_explanation(
    strengths: np.ndarray, probe: LinearProbe, names: Sequence[str], k: int = 6, target: int | None = None
) -> pd.DataFrame:
    """An image's top (at most ``k``, non-zero) concepts for a class (default: the predicted one):
    contribution = strength x weight."""
    strengths = np.asarray(strengths, dtype=np.float64)
    if target is None:
        target = int(probe.predict(strengths[None])[0])
    contrib = strengths * probe.coef_[target]
    order = np.argsort(-np.abs(contrib))[:k]
    order = order[contrib[order] != 0]  # concepts that are silent or unused contribute nothing
    return pd.DataFrame(
        {
            "concept": order,
            "name": [names[i] for i in order],
            "strength": strengths[order],
            "weight": probe.coef_[target, order],
            "contribution": contrib[order],
        }
    )


def global_explanation(
    probe: LinearProbe, names: Sequence[str], class_names: Sequence[str], k: int = 5
) -> pd.DataFrame:
    """Each class's ``k`` largest positive probe weights with the concept names."""
    rows = []
    for c, cls in enumerate(class_names):
        for rank, j in enumerate(np.argsort(-probe.coef_[c], kind="stable")[:k]):
            if probe.coef_[c, j] > 0:
                rows.append(
                    {"class": cls, "rank": rank, "concept": int(j), "name": names[j], "score": float(probe.coef_[c, j])}
                )
    return pd.DataFrame(rows, columns=["class", "rank", "concept", "name", "score"])


def global_explanation_by_strength(
    strengths: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    names: Sequence[str],
    class_names: Sequence[str],
    k: int = 5,
) -> pd.DataFrame:
    """Each class's ``k`` concepts of highest mean strength on its images, the original's ranking
    (``vis_global_explanations_dump.py``: strengths minus their mean over all images, then the
    class mean; no probe involved)."""
    z = np.asarray(strengths, dtype=np.float64)
    z = z - z.mean(0, keepdims=True)
    labels = np.asarray(labels)
    rows = []
    for c, cls in enumerate(class_names):
        if not (labels == c).any():
            continue
        mean = z[labels == c].mean(0)
        for rank, j in enumerate(np.argsort(-mean, kind="stable")[:k]):
            rows.append({"class": cls, "rank": rank, "concept": int(j), "name": names[j], "score": float(mean[j])})
    return pd.DataFrame(rows)


def rankings_side_by_side(by_weight: pd.DataFrame, by_strength: pd.DataFrame) -> pd.DataFrame:
    """One row per class: the top names by probe weight and by mean strength, and how many agree,
    counted by concept and by name (two concepts may carry the same name)."""
    rows = []
    for cls in dict.fromkeys(by_strength["class"]):
        w = by_weight.loc[by_weight["class"] == cls, "concept"].tolist()
        s = by_strength.loc[by_strength["class"] == cls, "concept"].tolist()
        name = dict(zip(by_strength["concept"], by_strength["name"])) | dict(
            zip(by_weight["concept"], by_weight["name"])
        )
        rows.append(
            {
                "class": cls,
                "by probe weight": ", ".join(name[j] for j in w),
                "by mean strength (original)": ", ".join(name[j] for j in s),
                "shared concepts": len(set(w) & set(s)),
                "shared names": len({name[j] for j in w} & {name[j] for j in s}),
            }
        )
    return pd.DataFrame(rows).set_index("class")


def ranking_overlap(by_weight: pd.DataFrame, by_strength: pd.DataFrame, by: str = "concept") -> np.ndarray:
    """(C, C) overlaps: entry ``(a, b)`` counts the ``by`` values (``"concept"`` or ``"name"``) shared by
    class a's ranking by probe weight and class b's ranking by mean strength. The diagonal is the
    agreement of the two rankings; the mean off the diagonal is the agreement of unrelated classes,
    the chance level a diagonal must clear (generic concepts that top every class share by chance)."""
    classes = list(dict.fromkeys(by_strength["class"]))
    sets = [[set(r.loc[r["class"] == c, by]) for c in classes] for r in (by_weight, by_strength)]
    return np.array([[len(a & b) for b in sets[1]] for a in sets[0]], dtype=float)


def local_truth(
    strengths: np.ndarray | torch.Tensor,
    probe: LinearProbe,
    names: Sequence[str],
    gt: dict,
    class_names: Sequence[str],
    k: int = 5,
    permutation: np.ndarray | None = None,
) -> np.ndarray:
    """(N,) share of each image's top-``k`` explaining names (largest positive contributions to the
    predicted class, as :func:`local_explanation`) that are true of the image; NaN where none of them
    has ground truth. With ``permutation``, image ``i``'s names are checked against image
    ``permutation[i]``: the chance that an explanation fits an unrelated image."""
    z = np.asarray(strengths, dtype=np.float64)
    contrib = z * probe.coef_[probe.predict(z)]
    top = np.argsort(-contrib, axis=1, kind="stable")[:, :k]
    used = np.take_along_axis(contrib, top, axis=1) > 0
    vocab, truths = checkable_words(gt, class_names, constant=True)
    truths = truths.astype(float)  # (words, images)
    row = {w: i for i, w in enumerate(vocab)}
    name_rows = np.array([row.get(n, -1) for n in names])[top]  # (N, k); -1: no ground truth
    checkable = used & (name_rows >= 0)
    images = np.arange(len(z)) if permutation is None else np.asarray(permutation)
    hit = truths[np.clip(name_rows, 0, None), images[:, None]] * checkable
    with np.errstate(invalid="ignore"):
        return np.where(checkable.any(1), hit.sum(1) / checkable.sum(1), np.nan)


def operating_point(
    history: list[dict],
    strengths: torch.Tensor,
    labels: torch.Tensor,
    probe: LinearProbe,
    scores: pd.DataFrame | None = None,
) -> dict[str, float]:
    """The numbers an SAE-and-probe run is compared by: the SAE's final L0 and FVU, dead concepts on
    ``strengths`` (a held-out set), the probe's accuracy and sparsity and, with ``scores``
    (:func:`score_names`), the share of right names."""
    out = {
        "sae_l0": history[-1]["l0"],
        "sae_fvu": history[-1]["fvu"],
        "dead_concepts": int((strengths > 0).sum(0).eq(0).sum()),
        "accuracy_concept_probe": probe.score(strengths, labels),
        "concepts_per_decision": concepts_per_decision(strengths, probe),
        "weights_above_1e-3_per_class": nonzero_per_class(probe, 1e-3),
    }
    if scores is not None:
        out["share_right"] = summarise_scores(scores)["share_right"]
    return out
