"""Measured reliance: what a model uses, found by changing one factor of otherwise identical images.

Concept World can draw the same creatures (pose, background phase, noise) twice with one factor
changed (:meth:`~conceptlab.world.ConceptWorld.sample` with ``edit``). The *factors* are every
part's colour, pattern and size, and the habitat. Base images show each creature with its
class-typical attributes in its home habitat; each counterfactual changes one factor to another
value. The drop of the true class's logit margin between the two is the model's reliance on that
factor for that image; its mean over images (per class, or overall) is the measured reliance that
chapter 7 scores every explanation method against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .artifacts import ArtifactStore
from .models import class_text_weights, encode_images
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, Edit, WorldBatch

FACTORS: tuple[str, ...] = ("habitat", *(f"{p} {a}" for p in PARTS for a in ATTRIBUTES))
EX2_FACTORS: tuple[str, ...] = ("habitat", *(f"{p} colour" for p in PARTS))  # the EX2 chapter's factors
Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def factor_part(factor: str) -> int | None:
    """Index into PARTS of the part a factor belongs to (None for the habitat)."""
    return None if factor == "habitat" else PARTS.index(factor.split()[0])


def factor_edit(factor: str, rng: np.random.Generator) -> Edit:
    """An edit that changes ``factor`` to another value (uniformly among the others) where the part exists."""
    if factor == "habitat":
        return lambda lab, att, hab: (att, (hab + rng.integers(1, len(HABITATS), size=len(lab))) % len(HABITATS))
    part, name = factor.split()
    p, a = PARTS.index(part), list(ATTRIBUTES).index(name)
    size = len(ATTRIBUTES[name])

    def edit(labels, attrs, habitats):
        present = attrs[:, p, a] >= 0
        shift = rng.integers(1, size, size=len(labels))
        attrs[:, p, a] = np.where(present, (attrs[:, p, a] + shift) % size, attrs[:, p, a])
        return attrs, habitats

    return edit


def prototypical(world: ConceptWorld) -> Edit:
    """Every creature with its class-typical attributes in its home habitat."""
    return lambda labels, attrs, habitats: (world.typical_attributes(labels).copy(), world.home_habitats(labels))


def zero_shot_scorer(clip: torch.nn.Module, tokenizer, class_names: Sequence[str]) -> Scorer:
    """``score(images, labels) -> (correct, margin)`` of a CLIP's zero-shot classifier: whether the
    top class is right, and the true class's logit minus the best other class's logit."""
    weights = class_text_weights(clip, tokenizer, class_names)

    def score(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = encode_images(clip, images) @ weights.T
        rows, lab = torch.arange(len(labels)), torch.as_tensor(labels)
        true = logits[rows, lab]
        others = logits.clone()
        others[rows, lab] = -torch.inf
        return (logits.argmax(1).numpy() == labels), (true - others.max(1).values).numpy()

    return score


@dataclass
class Interventions:
    """Per-image results of the factor interventions on ``base`` (the prototypical images).

    ``drops`` and ``correct_edited`` are (images, factors); NaN / False where the image lacks the part.
    """

    base: WorldBatch
    factors: tuple[str, ...]
    correct_base: np.ndarray
    margin_base: np.ndarray
    correct_edited: np.ndarray
    drops: np.ndarray

    def has(self) -> np.ndarray:
        """(images, factors) bool: the image has the factor (its part is present; the habitat always)."""
        return ~np.isnan(self.drops)

    def reliance(self, images: np.ndarray | None = None) -> pd.Series:
        """Mean margin drop per factor over ``images`` (indices; all by default)."""
        d = self.drops if images is None else self.drops[images]
        return pd.Series(np.nanmean(d, axis=0), index=list(self.factors), name="reliance")

    def by_class(self, class_names: Sequence[str]) -> pd.DataFrame:
        """Mean margin drop per class (rows) and factor (columns)."""
        frame = pd.DataFrame(self.drops, columns=list(self.factors))
        return frame.groupby(np.asarray(class_names)[self.base.labels]).mean()


def intervention_batches(
    world: ConceptWorld, n: int = 512, split: str = "test", factors: Sequence[str] = FACTORS, seed: int = 0
) -> list[WorldBatch]:
    """The images :func:`intervene` scores: ``n`` prototypical images, then the same images with each factor
    of ``factors`` changed in turn (the edits draw their new values from one generator seeded by ``seed``,
    in the order of ``factors``)."""
    proto = prototypical(world)
    rng = np.random.default_rng(seed)
    batches = [world.sample(n, split, edit=proto)]
    for factor in factors:
        edit = factor_edit(factor, rng)
        batches.append(world.sample(n, split, edit=lambda lab, att, hab, e=edit: e(lab, *proto(lab, att, hab))))  # type: ignore[misc]
    return batches


def intervene(
    score: Scorer,
    world: ConceptWorld,
    n: int = 512,
    split: str = "test",
    factors: Sequence[str] = FACTORS,
    seed: int = 0,
    batches: Sequence[WorldBatch] | None = None,
) -> Interventions:
    """Change each factor in turn on ``n`` prototypical images and record the margin drops.

    ``batches``: the images of :func:`intervention_batches` for these arguments, when already rendered
    (several models of one world are scored on the same images)."""
    base, *edited = batches if batches is not None else intervention_batches(world, n, split, factors, seed)
    correct_base, margin_base = score(base.images, base.labels)
    drops = np.full((n, len(factors)), np.nan)
    correct = np.zeros((n, len(factors)), bool)
    for j, (factor, batch) in enumerate(zip(factors, edited, strict=True)):
        p = factor_part(factor)
        keep = np.ones(n, bool) if p is None else batch.present[:, p]
        correct[:, j], margin = score(batch.images, batch.labels)
        drops[keep, j] = (margin_base - margin)[keep]
        correct[~keep, j] = False
    return Interventions(base, tuple(factors), correct_base, margin_base, correct, drops)


def stored_intervene(
    store: ArtifactStore,
    kind: str,
    key: dict,
    scorer: Callable[[], Scorer],
    world: ConceptWorld,
    n: int = 512,
    seed: int = 0,
    factors: Sequence[str] = FACTORS,
    batches: Callable[[], Sequence[WorldBatch]] | None = None,
) -> Interventions:
    """:func:`intervene` on the test split, its per-image results kept in ``store`` under ``kind`` and ``key``
    (plus ``n``, ``seed`` and ``factors``): a rerun re-renders the base images (bit-identical) and reads the
    rest back. ``scorer`` and ``batches`` (the :func:`intervention_batches`) are called only to build."""
    arrays = ("correct_base", "margin_base", "correct_edited", "drops")

    def build(d: Path) -> None:
        res = intervene(scorer(), world, n, "test", factors, seed, batches() if batches is not None else None)
        np.savez(d / "reliance.npz", **{k: getattr(res, k) for k in arrays})

    def load(d: Path) -> Interventions:
        data = np.load(d / "reliance.npz")
        base = world.sample(n, "test", edit=prototypical(world))
        return Interventions(base, tuple(factors), *(data[k] for k in arrays))

    return store.get_or_build(kind, intervention_key(key, n, seed, factors), build, load)


def intervention_key(key: dict, n: int, seed: int, factors: Sequence[str] = FACTORS) -> dict:
    """The store key of :func:`stored_intervene`'s results: the caller's ``key`` with what the measurement adds."""
    return {**key, "n": n, "seed": seed, "factors": list(factors)}


def counterfactual_reliance(
    clip: torch.nn.Module,
    tokenizer,
    world: ConceptWorld,
    n: int = 1024,
    split: str = "test",
    seed: int = 0,
    factors: Sequence[str] = EX2_FACTORS,
) -> pd.DataFrame:
    """What a CLIP relies on, one row per factor: ``reliance`` is the drop in zero-shot accuracy,
    ``logit_drop`` the mean drop of the true class's logit margin, on the images that have the factor."""
    res = intervene(zero_shot_scorer(clip, tokenizer, world.class_names), world, n, split, factors, seed)
    rows = []
    for j, factor in enumerate(res.factors):
        keep = res.has()[:, j]
        base, edited = res.correct_base[keep].mean(), res.correct_edited[keep, j].mean()
        rows.append(
            {
                "factor": factor,
                "n_images": int(keep.sum()),
                "accuracy_base": float(base),
                "accuracy_edited": float(edited),
                "reliance": float(base - edited),
                "logit_drop": float(res.drops[keep, j].mean()),
            }
        )
    return pd.DataFrame(rows)


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (one side constant, e.g. nothing changed)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)
