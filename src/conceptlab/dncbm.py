"""Discover-then-Name (DN-CBM): name SAE concepts with CLIP text, probe on them, score the names.

The pipeline of the chapter: embeddings of an unlabeled corpus (:func:`world_features`,
:func:`folder_features`) -> a sparse autoencoder (:mod:`conceptlab.sae`) -> a name per
concept, the vocabulary word whose text embedding is closest to the concept's decoder
direction (:func:`name_concepts`) -> a sparse linear probe on concept strengths
(:func:`fit_probe`). On Concept World, :func:`score_names` checks every name against the
ground truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, safe_torch_load
from .data import ImageSet, load_images
from .models import encode_images, encode_texts
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


# ---------------------------------------------------------------------------- features
def world_features(store: ArtifactStore, world: ConceptWorld, clip: torch.nn.Module, model_key: dict, n: int,
                   split: str, batch_size: int = 512, progress: bool = True) -> dict[str, torch.Tensor]:
    """Embeddings of world images ``0..n`` of ``split`` with their ground truth, streamed and cached.

    ``model_key`` identifies the CLIP (e.g. its training parameters); the cache is keyed by it,
    the world configuration, the split and ``n``. Returns ``features`` plus the ground-truth arrays.
    """
    params = {"world": world.config.to_dict(), "model": model_key, "split": split, "n": n}

    def build(d: Path) -> None:
        parts: dict[str, list] = {k: [] for k in ("features", *GROUND_TRUTH_KEYS)}
        for batch in tqdm(world.stream(n, batch_size, split), total=-(-n // batch_size), disable=not progress,
                          desc=f"embed {split}"):
            parts["features"].append(encode_images(clip, batch.images))
            for k in GROUND_TRUTH_KEYS:
                parts[k].append(torch.from_numpy(np.asarray(getattr(batch, k))))
        atomic_torch_save({k: torch.cat(v) for k, v in parts.items()}, d / "features.pt")

    return store.get_or_create("dncbm_features", params, "features.pt", build, safe_torch_load)


def folder_features(store: ArtifactStore, images: ImageSet, clip: torch.nn.Module, preprocess: Callable,
                    model_key: dict, batch_size: int = 256, progress: bool = True) -> dict[str, torch.Tensor]:
    """Embeddings and labels of a real image set (the model's own preprocess), cached by file list and model."""
    params = {"model": model_key, "paths": [str(p) for p in images.paths]}

    def build(d: Path) -> None:
        feats = []
        for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="embed images"):
            x, _ = load_images(images.paths[s:s + batch_size], preprocess)
            feats.append(encode_images(clip, x, batch_size=batch_size))
        atomic_torch_save({"features": torch.cat(feats), "labels": torch.from_numpy(images.labels)},
                          d / "features.pt")

    return store.get_or_create("dncbm_features", params, "features.pt", build, safe_torch_load)


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
def concept_scale(train_strengths: torch.Tensor) -> torch.Tensor:
    """Per-concept divisor (the training max, 1 for dead concepts) so the L1 penalty treats concepts alike."""
    top = train_strengths.max(0).values
    return torch.where(top > 0, top, torch.ones_like(top))


class SparseLinearProbe:
    """Multinomial logistic regression minimising ``mean cross-entropy + lam * ||W||_1`` (bias unpenalised).

    Solved full-batch with FISTA (accelerated proximal gradient, step ``1/L`` from the largest
    singular value of the inputs): the soft-threshold step sets weights to exactly zero, which
    DN-CBM's Adam on the same loss does not, and scikit-learn's L1 solver (saga) needs minutes
    for a thousand concepts where this needs seconds. With ``lam = 0`` use scikit-learn instead
    (:func:`fit_probe` does).
    """

    def __init__(self, lam: float, iterations: int = 500) -> None:
        self.lam, self.iterations = lam, iterations

    def fit(self, x: np.ndarray, y: np.ndarray) -> SparseLinearProbe:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self.classes_ = np.arange(int(y.max()) + 1)
        xb = torch.cat([x, torch.ones(len(x), 1)], 1)  # last column: the bias
        xt = xb.T
        if (xb != 0).float().mean() < 0.2:  # concept strengths are sparse: sparse products are much faster
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                xb, xt = xb.to_sparse_csr(), xt.contiguous().to_sparse_csr()
        onehot = F.one_hot(y, len(self.classes_)).float()
        step = 1.0 / max(0.5 * _top_singular_value(xb, xt) ** 2 / len(y), 1e-12)  # 1 / Lipschitz constant
        w = torch.zeros(xb.shape[1], len(self.classes_))
        momentum, t = w.clone(), 1.0
        for _ in range(self.iterations):
            grad = xt @ (torch.softmax(xb @ momentum, dim=1) - onehot) / len(y)
            w_next = momentum - step * grad
            w_next[:-1] = torch.sign(w_next[:-1]) * (w_next[:-1].abs() - step * self.lam).clamp_min(0)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            momentum = w_next + (t - 1) / t_next * (w_next - w)
            w, t = w_next, t_next
        self.coef_, self.intercept_ = w[:-1].T.double().numpy(), w[-1].double().numpy()
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.decision_function(x).argmax(1)

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


def _top_singular_value(x: torch.Tensor, xt: torch.Tensor, iterations: int = 50) -> float:
    """Largest singular value of ``x`` by power iteration (works for sparse ``x``; ``xt`` is its transpose)."""
    v = torch.ones(x.shape[1]) / x.shape[1] ** 0.5
    for _ in range(iterations):
        v = xt @ (x @ v[:, None])
        v = (v / v.norm().clamp_min(1e-12)).squeeze(1)
    return float((x @ v[:, None]).norm()) * 1.01  # a little above: power iteration approaches from below


def fit_probe(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, lam: float = 0.0,
              iterations: int = 500) -> SparseLinearProbe | LogisticRegression:
    """A linear probe with ``mean cross-entropy + lam * ||W||_1``: sparse (FISTA) for ``lam > 0``,
    scikit-learn's unpenalised logistic regression for ``lam = 0``."""
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0.")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if lam > 0:
        return SparseLinearProbe(lam, iterations).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable data: weights grow until max_iter
        return LogisticRegression(C=np.inf, max_iter=iterations).fit(x, y)


def nonzero_per_class(probe: SparseLinearProbe | LogisticRegression) -> float:
    """Mean number of non-zero weights per class."""
    return float((probe.coef_ != 0).sum(1).mean())


def local_explanation(strengths: np.ndarray, probe: SparseLinearProbe | LogisticRegression, names: Sequence[str],
                      k: int = 6, target: int | None = None) -> pd.DataFrame:
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


def global_explanation(probe: SparseLinearProbe | LogisticRegression, names: Sequence[str], class_names: Sequence[str],
                       k: int = 5) -> pd.DataFrame:
    """Each class's ``k`` largest positive weights with the concept names."""
    rows = []
    for c, cls in enumerate(class_names):
        for rank, j in enumerate(np.argsort(-probe.coef_[c])[:k]):
            if probe.coef_[c, j] > 0:
                rows.append({"class": cls, "rank": rank, "concept": int(j), "name": names[j],
                             "weight": float(probe.coef_[c, j])})
    return pd.DataFrame(rows)


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
