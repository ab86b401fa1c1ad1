"""Discover-then-Name (DN-CBM): name SAE concepts with CLIP text, probe on them, score the names.

The pipeline of the chapter: raw (not L2-normalised) CLIP image embeddings of an unlabeled
corpus (:func:`world_features`, :func:`folder_features`) -> a sparse autoencoder
(:mod:`conceptlab.sae`) -> a name per concept, the vocabulary word whose text embedding is
closest to the concept's decoder direction (:func:`name_concepts`) -> a sparse linear probe on
concept strengths (:func:`fit_probe`, the original's Adam on cross-entropy plus λ times the
*mean* |W|). On Concept World, :func:`score_names` checks every name against the ground truth.

:data:`PARAMETERS` declares the chapter's parameters, :data:`SWITCHES` the choices where this
book, the paper and the original code can differ, and ``exercise_*`` are the chapter's
"predict, then run" exercises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, safe_torch_load
from .chapter import Param, Switch
from .data import ImageSet, load_dataset, load_images
from .models import class_text_weights, encode_texts, images_to_tensor
from .sae import RECONSTRUCTIONS, SAEConfig, encode_concepts, l1_on_original_scale, load_or_train_sae
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld

# Words no Concept World image shows: a concept named by one of them is named wrongly.
DISTRACTORS: tuple[str, ...] = (
    "car", "house", "piano", "bicycle", "computer", "bottle", "chair", "guitar", "bridge", "clock",
    "river", "mountain", "city", "road", "cloud", "fire", "metal", "wooden", "glass", "paper",
    "happy", "angry", "fast", "old", "young", "soft", "shiny", "round", "square", "tall",
    "dog", "cat", "bird", "fish", "horse", "insect", "flower", "grass", "leaf", "stone",
    "night", "dawn", "winter", "seeds", "herd", "nest", "mud", "photo", "wallpaper", "download",
)
GROUND_TRUTH_KEYS = ("labels", "present", "attributes", "habitats")
SAE_INPUTS = ("raw", "normalised")
PROBE_L1 = ("mean", "sum")
PROBE_SOLVERS = ("adam", "fista")


def _check_dataset(value: str, p: dict[str, Any]) -> str | None:
    if value != "world" and p["data_root"] is None:
        return f"dataset={value!r} needs data_root (the folder of the data set)"
    return None


def _real(p: dict[str, Any]) -> bool:
    return p["dataset"] != "world"


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub"), check=_check_dataset,
                     help="'world', or a real data set under data_root"),
    "data_root": Param(None, "dir", applies=_real, help="folder of a real data set"),
    "vocabulary": Param(None, "file", help="word list, one per line (CLIP-Dissect's 20k.txt); None: the world's"),
    "n_corpus": Param(8000, int, min=16, help="unlabeled images the SAE learns from (CC3M's role)"),
    "n_probe_train": Param(3000, int, min=4),
    "n_test": Param(2000, int, min=4),
    "sae_expansion": Param(8, int, min=1, help="concepts = expansion x embedding dimension"),
    "sae_l1": Param(3e-5, float, min=0.0, help="L1 coefficient on the scale of sae_reconstruction"),
    "sae_lr": Param(5e-4, float, min=1e-8),
    "sae_batch_size": Param(1024, int, min=1, help="smaller than the original's 4096: more steps"),
    "sae_epochs": Param(30, int, min=1),
    "sae_resample_every": Param(10, int, min=0, help="epochs between dead-concept resamplings; 0: never"),
    "sae_reconstruction": Param("mean", str, choices=RECONSTRUCTIONS,
                                help="squared error averaged ('mean', the code) or summed ('sum', the paper)"),
    "sae_inputs": Param("raw", str, choices=SAE_INPUTS, help="raw CLIP embeddings (original) or L2-normalised"),
    "probe_lambda": Param(0.1, float, min=0.0, help="L1 coefficient of the probe, on the scale of probe_l1"),
    "probe_l1": Param("mean", str, choices=PROBE_L1, help="mean |W| (nn.L1Loss, the code) or sum (the paper)"),
    "probe_solver": Param("adam", str, choices=PROBE_SOLVERS,
                          help="'adam' (original: minibatch Adam) or 'fista' (proximal: exact zeros)"),
    "probe_lr": Param(1e-2, float, min=1e-8, applies=lambda p: p["probe_solver"] == "adam"),
    "probe_epochs": Param(200, int, min=1),
    "probe_batch_size": Param(512, int, min=1, applies=lambda p: p["probe_solver"] == "adam"),
    "right_auroc": Param(0.75, float, min=0.5, max=1.0, applies=lambda p: not _real(p),
                         help="AUROC from which a concept's name counts as right"),
}

# Where this book, the paper and the original code (neuroexplicit-saar/Discover-then-Name) can differ.
SWITCHES: dict[str, Switch] = {
    "sae_reconstruction": Switch("sum", "mean", "the SAE's reconstruction term: ||x - x_hat||^2 in the paper, "
                                 "the squared error averaged over dimensions in the code (l1 means D times less)"),
    "sae_inputs": Switch("raw", "raw", "the SAE learns raw CLIP embeddings; 'normalised' puts them on the sphere"),
    "sae_l1": Switch(3e-5, 3e-5, "sparsity of the concept code: fewer active concepts, worse reconstruction"),
    "sae_lr": Switch(5e-4, 5e-4, "SAE step size"),
    "sae_batch_size": Switch(4096, 4096, "SAE batch"),
    "sae_epochs": Switch(200, 200, "SAE training length (on CC3M's 3.3 million images)"),
    "sae_resample_every": Switch(10, 10, "epochs between dead-concept resamplings"),
    "probe_l1": Switch("sum", "mean", "the probe's L1 term: ||W||_1 in the paper, nn.L1Loss (mean |W|) in the code"),
    "probe_lambda": Switch(0.1, 0.1, "the probe's sparsity weight (README command; released probes used 1.0)"),
    "probe_solver": Switch("adam", "adam", "'fista' solves the same objective to exact zeros"),
    "probe_lr": Switch(1e-2, 1e-2, "probe step size (README command)"),
    "probe_epochs": Switch(200, 200, "probe training length"),
}
ORIGINAL = {name: s.original for name, s in SWITCHES.items()}

# Table 1 of the paper (CLIP ResNet-50, ImageNet), as fractions.
PAPER = {"accuracy_concept_probe": 0.729, "accuracy_raw_probe": 0.733, "accuracy_zero_shot": 0.596}


def sae_config(p: dict[str, Any]) -> SAEConfig:
    """The SAE's configuration from the chapter's parameters."""
    return SAEConfig(expansion=p["sae_expansion"], l1=p["sae_l1"], lr=p["sae_lr"], batch_size=p["sae_batch_size"],
                     epochs=p["sae_epochs"], resample_every=p["sae_resample_every"],
                     reconstruction=p["sae_reconstruction"], seed=p["seed"])


# ---------------------------------------------------------------------------- features
@torch.no_grad()
def embed_images(clip: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Raw image embeddings (after the projection, *not* L2-normalised: what the original SAE learns)."""
    dev = next(clip.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        x = images_to_tensor(chunk, clip) if isinstance(chunk, np.ndarray) else chunk
        out.append(clip.encode_image(x.to(dev)).float().cpu())
    return torch.cat(out)


def sae_inputs(features: torch.Tensor, mode: str) -> torch.Tensor:
    """The SAE's inputs: the raw embeddings, or L2-normalised ones."""
    return F.normalize(features, dim=-1) if mode == "normalised" else features


def world_features(store: ArtifactStore, world: ConceptWorld, clip: torch.nn.Module, key: dict, n: int,
                   split: str, batch_size: int = 512, progress: bool = True) -> dict[str, torch.Tensor]:
    """Raw embeddings of world images ``0..n`` of ``split`` with their ground truth, streamed and cached.

    ``key`` identifies the CLIP by content (``ch.key()``); the cache is keyed by it, the world
    configuration, the split and ``n``. Returns ``features`` plus the ground-truth arrays.
    """
    def build(d: Path) -> None:
        parts: dict[str, list] = {k: [] for k in ("features", *GROUND_TRUTH_KEYS)}
        for batch in tqdm(world.stream(n, batch_size, split), total=-(-n // batch_size), disable=not progress,
                          desc=f"embed {split}"):
            parts["features"].append(embed_images(clip, batch.images))
            for k in GROUND_TRUTH_KEYS:
                parts[k].append(torch.from_numpy(np.asarray(getattr(batch, k))))
        atomic_torch_save({k: torch.cat(v) for k, v in parts.items()}, d / "features.pt")

    full_key = {**key, "world": world.config.to_dict(), "split": split, "n": n, "embedding": "raw"}
    return store.get_or_build("dncbm_features", full_key, build,
                              lambda d: safe_torch_load(d / "features.pt", owner="store"))


def folder_features(store: ArtifactStore, images: ImageSet, clip: torch.nn.Module, preprocess: Callable,
                    key: dict, batch_size: int = 256, progress: bool = True) -> dict[str, torch.Tensor]:
    """Raw embeddings and labels of a real image set (the model's own preprocess), cached by the
    CLIP and data set (``key``, content hashes) and the file list."""
    def build(d: Path) -> None:
        feats = []
        for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="embed images"):
            x, _ = load_images(images.paths[s:s + batch_size], preprocess)
            feats.append(embed_images(clip, x, batch_size=batch_size))
        atomic_torch_save({"features": torch.cat(feats), "labels": torch.from_numpy(images.labels)},
                          d / "features.pt")

    full_key = {**key, "paths": [str(p) for p in images.paths], "embedding": "raw"}
    return store.get_or_build("dncbm_features", full_key, build,
                              lambda d: safe_torch_load(d / "features.pt", owner="store"))


def chapter_features(ch: Any, progress: bool = True) -> tuple[dict, dict, dict, list[str]]:
    """``(corpus, probe train, probe test, class names)`` of the chapter's data set (world or real)."""
    p = ch.params
    clip, preprocess, _, _ = ch.clip(progress=progress)
    if p["dataset"] == "world":
        sets = [world_features(ch.store, ch.world, clip, ch.key(), n, split, progress=progress)
                for n, split in ((p["n_corpus"], "corpus"), (p["n_probe_train"], "train"), (p["n_test"], "test"))]
        return (*sets, ch.world.class_names)
    images = load_dataset(p["dataset"], p["data_root"], split="train" if p["dataset"] == "cub" else "test")
    held_out = load_dataset(p["dataset"], p["data_root"], split="test") if p["dataset"] == "cub" else None
    splits = real_splits(images, p["n_corpus"], p["n_probe_train"], p["n_test"], p["seed"], held_out)
    sets = [folder_features(ch.store, s, clip, preprocess, ch.key(), progress=progress) for s in splits]
    return (*sets, images.class_names)


def chapter_sae(ch: Any, corpus: dict, progress: bool = True, **changes: Any):
    """The chapter's SAE (``changes`` override parameters, e.g. ``sae_l1=1e-5``): cached by content."""
    p = {**ch.params, **changes}
    x = sae_inputs(corpus["features"], p["sae_inputs"])
    return load_or_train_sae(ch.store, x, sae_config(p), key={"inputs": p["sae_inputs"]}, device=ch.device,
                             progress=progress)


# ---------------------------------------------------------------------------- naming
def world_vocabulary(world: ConceptWorld, distractors: Sequence[str] = DISTRACTORS) -> list[str]:
    """Every class, part, attribute and habitat word of the world, then the distractor words."""
    words = [*world.class_names, *PARTS, *(v for values in ATTRIBUTES.values() for v in values), *HABITATS,
             *distractors]
    return list(dict.fromkeys(words))


def load_vocabulary(path: str | Path) -> list[str]:
    """A word list, one word or phrase per line (CLIP-Dissect's ``20k.txt`` format); blank and ``#`` lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No vocabulary file at {path}: pass a text file with one word per line "
                                "(e.g. CLIP-Dissect's data/20k.txt), or vocabulary=None for the world's words.")
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
    return pd.DataFrame({"concept": np.arange(len(directions)),
                         "name": [words[i] for i in top.indices[:, 0].tolist()],
                         "similarity": top.values[:, 0].numpy(),
                         "second": [words[i] for i in second.tolist()],
                         "margin": (top.values[:, 0] - top.values[:, -1]).numpy()})


def embed_vocabulary(clip: torch.nn.Module, tokenizer: Callable, words: Sequence[str],
                     template: str = "{}") -> torch.Tensor:
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


def score_names(activations: torch.Tensor, names: pd.DataFrame, gt: dict, class_names: Sequence[str],
                directions: torch.Tensor, right_auroc: float = 0.75, duplicate_cosine: float = 0.95,
                top_k: int = 20) -> pd.DataFrame:
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
    vocab = [w for w in world_words(class_names) if (t := word_truth(w, gt, class_names)) is not None
             and 0 < t.sum() < len(t)]
    truths = np.stack([word_truth(w, gt, class_names) for w in vocab])
    auc = auroc_matrix(acts, truths)  # (words, concepts)
    row = {w: i for i, w in enumerate(vocab)}
    own = np.array([auc[row[n], k] if n in row else np.nan for k, n in enumerate(names["name"])])
    best = np.nanargmax(np.nan_to_num(auc, nan=-1), axis=0)
    kind = [_word_kind(n, class_names) for n in names["name"]]
    top = np.argsort(-acts, axis=0, kind="stable")[:top_k]  # (top_k, concepts) most activating images
    precision = np.array([truths[row[n], top[:, k]][acts[top[:, k], k] > 0].mean()
                          if n in row and not dead[k] else np.nan for k, n in enumerate(names["name"])])
    return names.assign(fires=fires, dead=dead, duplicate=duplicate, kind=kind, auroc=own, top_precision=precision,
                        right=(own >= right_auroc) & ~dead, best_word=[vocab[i] for i in best],
                        best_auroc=auc[best, np.arange(auc.shape[1])])


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
    return {"concepts": len(scores), "dead": int(scores["dead"].sum()), "duplicates": int(scores["duplicate"].sum()),
            "distinct_names": int(live["name"].nunique()),
            "share_named_without_ground_truth": float((live["kind"] == "no ground truth").mean()),
            "share_right": float(live["right"].mean()),
            "share_right_of_checkable": float(checkable["right"].mean()) if len(checkable) else float("nan"),
            "median_auroc_of_name": float(checkable["auroc"].median()) if len(checkable) else float("nan"),
            "share_top_images_show_name": float((live["top_precision"] >= 0.9).mean()),
            "share_oracle_detects_something": float((live["best_auroc"] >= 0.75).mean())}


# ---------------------------------------------------------------------------- concept bottleneck
@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe; defaults are the original's README command (Adam, lr 1e-2, batch 512,
    200 epochs, no bias, cross-entropy + 0.1 x mean |W|)."""

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


def probe_config(p: dict[str, Any], lam: float | None = None) -> ProbeConfig:
    """The probe's configuration from the chapter's parameters (``lam`` overrides ``probe_lambda``)."""
    return ProbeConfig(lam=p["probe_lambda"] if lam is None else lam, l1=p["probe_l1"], solver=p["probe_solver"],
                       lr=p["probe_lr"], epochs=p["probe_epochs"], batch_size=p["probe_batch_size"], seed=p["seed"])


def probe_l1_term(weight: torch.Tensor, l1: str = "mean") -> torch.Tensor:
    """The probe's sparsity term: mean |W| over all classes x concepts (the code's ``nn.L1Loss``
    against zeros) or the sum (the paper's ``||W||_1``)."""
    return weight.abs().mean() if l1 == "mean" else weight.abs().sum()


def probe_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, lam: float,
               l1: str = "mean") -> torch.Tensor:
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


def fit_probe(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, cfg: ProbeConfig | float = ProbeConfig(),
              n_classes: int | None = None, device: str | torch.device | None = None) -> LinearProbe:
    """A bias-free linear probe minimising ``cross-entropy + cfg.lam * L1(W)`` on ``device``.

    A number for ``cfg`` is a coefficient on the summed ``||W||_1``, solved by FISTA (500 iterations).
    """
    if not isinstance(cfg, ProbeConfig):
        cfg = ProbeConfig(lam=float(cfg), l1="sum", solver="fista", epochs=500)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    dev = torch.device(device or "cpu")
    fit = _fit_adam if cfg.solver == "adam" else _fit_fista
    return LinearProbe(fit(x.to(dev), y.to(dev), n_classes, cfg).cpu().double().numpy())


def _fit_adam(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: ProbeConfig) -> torch.Tensor:
    """The original's loop: ``nn.Linear(bias=False)``, Adam, shuffled minibatches, ``cfg.epochs`` epochs."""
    torch.manual_seed(cfg.seed)
    linear = nn.Linear(x.shape[1], n_classes, bias=False).to(x.device)
    opt = torch.optim.Adam(linear.parameters(), lr=cfg.lr)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        for idx in order.to(x.device).split(cfg.batch_size):
            loss = probe_loss(linear(x[idx]), y[idx], linear.weight, cfg.lam, cfg.l1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return linear.weight.detach()


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


def concepts_per_decision(strengths: np.ndarray | torch.Tensor, probe: LinearProbe, energy: float = 0.9) -> float:
    """Mean number of concepts whose positive contributions (strength x weight of the predicted
    class), largest first, reach ``energy`` of the total positive contribution (the original's
    coverage metric, counted as a number of concepts rather than a 0-based position)."""
    z = np.asarray(strengths, dtype=np.float64)
    contrib = np.clip(z * probe.coef_[probe.predict(z)], 0, None)
    contrib = -np.sort(-contrib, axis=1)
    total = contrib.sum(1, keepdims=True)
    needed = (np.cumsum(contrib, axis=1) < energy * total).sum(1) + 1
    return float(np.where(total[:, 0] > 0, needed, 0).mean())


def nonzero_per_class(probe: LinearProbe, tol: float = 0.0) -> float:
    """Mean number of weights per class with ``|w| > tol``."""
    return float((np.abs(probe.coef_) > tol).sum(1).mean())


def local_explanation(strengths: np.ndarray, probe: LinearProbe, names: Sequence[str], k: int = 6,
                      target: int | None = None) -> pd.DataFrame:
    """An image's top (at most ``k``, non-zero) concepts for a class (default: the predicted one):
    contribution = strength x weight."""
    strengths = np.asarray(strengths, dtype=np.float64)
    if target is None:
        target = int(probe.predict(strengths[None])[0])
    contrib = strengths * probe.coef_[target]
    order = np.argsort(-np.abs(contrib))[:k]
    order = order[contrib[order] != 0]  # concepts that are silent or unused contribute nothing
    return pd.DataFrame({"concept": order, "name": [names[i] for i in order], "strength": strengths[order],
                         "weight": probe.coef_[target, order], "contribution": contrib[order]})


def global_explanation(probe: LinearProbe, names: Sequence[str], class_names: Sequence[str],
                       k: int = 5) -> pd.DataFrame:
    """Each class's ``k`` largest positive probe weights with the concept names."""
    rows = []
    for c, cls in enumerate(class_names):
        for rank, j in enumerate(np.argsort(-probe.coef_[c], kind="stable")[:k]):
            if probe.coef_[c, j] > 0:
                rows.append({"class": cls, "rank": rank, "concept": int(j), "name": names[j],
                             "score": float(probe.coef_[c, j])})
    return pd.DataFrame(rows)


def global_explanation_by_strength(strengths: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                                   names: Sequence[str], class_names: Sequence[str], k: int = 5) -> pd.DataFrame:
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
    """One row per class: the top names by probe weight and by mean strength, and how many agree."""
    rows = []
    for cls in dict.fromkeys(by_strength["class"]):
        w = by_weight.loc[by_weight["class"] == cls, "concept"].tolist()
        s = by_strength.loc[by_strength["class"] == cls, "concept"].tolist()
        name = dict(zip(by_strength["concept"], by_strength["name"])) | dict(zip(by_weight["concept"],
                                                                               by_weight["name"]))
        rows.append({"class": cls, "by probe weight": ", ".join(name[j] for j in w),
                     "by mean strength (original)": ", ".join(name[j] for j in s),
                     "shared concepts": len(set(w) & set(s))})
    return pd.DataFrame(rows).set_index("class")


def real_splits(images: ImageSet, n_corpus: int, n_train: int, n_test: int, seed: int = 0,
                test_images: ImageSet | None = None) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(corpus, probe train, probe test) of a real data set: the corpus is a seeded subset of all images;
    the probe sets a seeded disjoint split of them, or of ``images`` / ``test_images`` where the data set has one."""
    corpus = images.subset(n_corpus, seed)
    if test_images is not None:
        return corpus, images.subset(n_train, seed), test_images.subset(n_test, seed)
    if len(images) < 4:
        raise ValueError(f"Only {len(images)} images: a probe needs at least 4 (2 to train, 2 to test).")
    order = np.random.default_rng(seed).permutation(len(images))
    n_te = min(n_test, len(images) // 3)
    pick = lambda idx: ImageSet([images.paths[i] for i in np.sort(idx)], images.labels[np.sort(idx)],  # noqa: E731
                                images.class_names)
    return corpus, pick(order[n_te:][:n_train]), pick(order[:n_te])


# ---------------------------------------------------------------------------- the chapter's runs
def vocabulary_words(ch: Any) -> list[str]:
    """The chapter's vocabulary: the ``vocabulary`` file, or the world's words plus distractors."""
    return load_vocabulary(ch.params["vocabulary"]) if ch.params["vocabulary"] else world_vocabulary(ch.world)


def headline(history: list[dict], z_test: torch.Tensor, test_labels: torch.Tensor, probe: LinearProbe,
             scores: pd.DataFrame | None = None) -> dict[str, float]:
    """The numbers a run is compared by: the SAE's final L0 and FVU, dead concepts on the test set,
    the concept probe's accuracy and sparsity and, with ``scores``, the share of right names."""
    out = {"sae_l0": history[-1]["l0"], "sae_fvu": history[-1]["fvu"],
           "dead_concepts": int((z_test > 0).sum(0).eq(0).sum()),
           "accuracy_concept_probe": probe.score(z_test, test_labels),
           "concepts_per_decision": concepts_per_decision(z_test, probe),
           "weights_above_1e-3_per_class": nonzero_per_class(probe, 1e-3)}
    if scores is not None:
        out["share_right"] = summarise_scores(scores)["share_right"]
    return out


def evaluate(ch: Any, data: tuple[dict, dict, dict, list[str]], progress: bool = False,
             **changes: Any) -> dict[str, float]:
    """:func:`headline` of one DN-CBM run with ``changes`` to the chapter's parameters (SAE cached)."""
    p = {**ch.params, **changes}
    corpus, train, test, class_names = data
    sae, history = chapter_sae(ch, corpus, progress=progress, **changes)
    z_train, z_test = (encode_concepts(sae, sae_inputs(d["features"], p["sae_inputs"]), device=ch.device)
                       for d in (train, test))
    probe = fit_probe(z_train, train["labels"], probe_config(p), len(class_names), ch.device)
    scores = None
    if p["dataset"] == "world":
        clip, _, tokenizer, _ = ch.clip(progress=progress)
        words = vocabulary_words(ch)
        names = name_concepts(sae.directions, embed_vocabulary(clip, tokenizer, words), words)
        scores = score_names(z_test, names, test, class_names, sae.directions, p["right_auroc"])
    return headline(history, z_test, test["labels"], probe, scores)


def baselines(ch: Any, data: tuple[dict, dict, dict, list[str]]) -> dict[str, float]:
    """Accuracy of the original's linear probe on the raw CLIP features (no L1) and of zero-shot
    classification (normalised embeddings against class-name prompts)."""
    _, train, test, class_names = data
    clip, _, tokenizer, _ = ch.clip()
    p = ch.params
    raw = fit_probe(train["features"], train["labels"], probe_config(p, lam=0.0), len(class_names), ch.device)
    zero_shot = F.normalize(test["features"], dim=-1) @ class_text_weights(clip, tokenizer, class_names).T
    return {"accuracy_raw_probe": raw.score(test["features"], test["labels"]),
            "accuracy_zero_shot": float((zero_shot.argmax(1) == test["labels"]).float().mean())}


def l1_measurement(ch: Any, data: tuple[dict, dict, dict, list[str]], factors: Sequence[float] = (1, 100),
                   ) -> pd.DataFrame:
    """:func:`evaluate` at the original λ₁ (3e-5, on the original scale) times each factor: the
    measurement behind the chapter's choice of ``sae_l1``."""
    scale = 1.0 if ch.params["sae_reconstruction"] == "mean" else data[0]["features"].shape[1]
    rows = {f"{f:g} x original": {"sae_l1 (original scale)": ORIGINAL["sae_l1"] * f,
                                  **evaluate(ch, data, sae_l1=ORIGINAL["sae_l1"] * f * scale)} for f in factors}
    return pd.DataFrame(rows).T


def l1_verdict(table: pd.DataFrame) -> str:
    """What :func:`l1_measurement`'s table says, in one sentence (its first row is the original λ₁)."""
    orig, strong = table.iloc[0], table.iloc[-1]
    said = (f"{table.index[-1]} λ₁ moves L0 from {orig['sae_l0']:.1f} to {strong['sae_l0']:.1f} active concepts "
            f"and FVU from {orig['sae_fvu']:.3f} to {strong['sae_fvu']:.3f}")
    if "share_right" in table:
        said += f", and the share of right names from {orig['share_right']:.1%} to {strong['share_right']:.1%}"
    better = "share_right" not in table or strong["share_right"] > orig["share_right"]
    return said + (": sparser concepts with names as good or better, so a larger sae_l1 would suit this world."
                   if better else
                   ": the sparser code costs right names, so the original λ₁ is the better default here.")


def original_changes(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that make a run compute what the original code computes, keeping the
    chapter's training length (200 epochs on CC3M is out of a book's reach)."""
    schedule = ("sae_epochs", "sae_batch_size", "sae_resample_every")
    return {k: v for k, v in ORIGINAL.items() if k not in schedule and params[k] != v}


def original_scale(p: dict[str, Any], dim: int, n_weights: int) -> dict[str, float]:
    """The run's sparsity coefficients on the original code's scale (reconstruction averaged over
    ``dim`` features; probe L1 the mean over ``n_weights`` weights), as the results record them."""
    return {"sae_l1_original_scale": l1_on_original_scale(p["sae_l1"], p["sae_reconstruction"], dim),
            "probe_lambda_original_scale": p["probe_lambda"] * (n_weights if p["probe_l1"] == "sum" else 1)}


def fidelity_rows(book: dict[str, float], original: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Rows for :func:`conceptlab.chapter.fidelity_table`: the paper, the original code's settings on
    this world, and this book's settings."""
    metrics = ("accuracy_concept_probe", "accuracy_raw_probe", "accuracy_zero_shot", "sae_l0", "sae_fvu",
               "concepts_per_decision", "share_right")
    return {m: {"paper": PAPER.get(m), "original code": original.get(m), "this book": book.get(m)}
            for m in metrics if m in book}


# ---------------------------------------------------------------------------- exercises
def exercise_sae(ch: Any, **changes: Any) -> dict[str, float]:
    """Exercise: retrain the SAE with ``changes`` (``sae_l1``, ``sae_expansion``, ``sae_inputs`` ...)
    and report what moves. The chapter's own setting is a cache hit."""
    return evaluate(ch, chapter_features(ch, progress=False), **changes)


def exercise_probe(ch: Any, **changes: Any) -> dict[str, float]:
    """Exercise: refit only the probe (``probe_lambda``, ``probe_l1``, ``probe_solver``) on the
    chapter's concepts: accuracy against sparsity."""
    out = evaluate(ch, chapter_features(ch, progress=False), **changes)
    return {k: out[k] for k in ("accuracy_concept_probe", "concepts_per_decision", "weights_above_1e-3_per_class")}


# ---------------------------------------------------------------------------- the concept explorer
def concept_view(world: ConceptWorld, strengths: torch.Tensor, names: pd.DataFrame, word_embeddings: torch.Tensor,
                 words: Sequence[str], directions: torch.Tensor, concept: int, n_images: int = 6,
                 split: str = "test") -> plt.Figure:
    """One concept at a glance: its name, the nearest vocabulary words, and the ``n_images`` images of
    ``split`` (the rows of ``strengths``) on which it fires most, rendered again from the world."""
    sims = F.normalize(directions[concept].float(), dim=-1) @ F.normalize(word_embeddings.float(), dim=-1).T
    nearest = sims.topk(min(5, len(words)))
    col = strengths[:, concept]
    top = [int(i) for i in col.argsort(descending=True)[:n_images] if col[i] > 0]
    fig, axes = plt.subplots(1, n_images + 1, figsize=(2.0 * (n_images + 1), 2.4))
    lines = [f"concept #{concept}: {names['name'][concept]}", f"fires on {(col > 0).float().mean():.1%}", ""]
    lines += [f"{words[j]}  {s:.2f}" for s, j in zip(nearest.values.tolist(), nearest.indices.tolist())]
    axes[0].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes[1:], top):
        ax.imshow(world.sample(1, split, start=i).images[0])
        ax.set_title(f"{col[i]:.2f}", fontsize=8)
    return fig


def chapter_summary(results: dict[str, Any], right_auroc: float) -> list[str]:
    """The chapter's closing summary, every number from ``results``."""
    lines = [f"The SAE ({results['n_concepts']} concepts, λ₁ = {results['sae_l1_original_scale']:g} on the "
             f"original scale) keeps {results['sae_final_l0']:.1f} concepts active per image and leaves "
             f"{results['sae_final_fvu']:.1%} of the variance unexplained.",
             f"The concept probe reaches {results['accuracy_concept_probe']:.1%} against "
             f"{results['accuracy_raw_probe']:.1%} for the same probe on the raw features and "
             f"{results['accuracy_zero_shot']:.1%} zero-shot; a decision needs "
             f"{results['concepts_per_decision']:.1f} concepts for 90 % of its positive evidence.",
             f"Ranked the original way (mean strength) and by probe weight, a class's top 4 concepts share "
             f"{results['global_rankings_shared_top4']:.1f} concepts on average."]
    if "l1_verdict" in results:
        lines.insert(1, results["l1_verdict"][0].upper() + results["l1_verdict"][1:])
    if "share_right" in results:
        lines.append(f"{results['share_right']:.1%} of the live concepts carry a right name (AUROC ≥ {right_auroc}); "
                     f"for {results['share_oracle_detects_something']:.1%} some checkable word would have been right.")
    return lines
