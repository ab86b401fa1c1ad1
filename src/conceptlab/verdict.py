"""The verdict's protocol: does an explanation method tell the truth about what a model *uses*?

A library, usable on your own explainers and (for the model-only checks) your own open_clip model:

1. *Planted models* (:func:`planted_models`): world CLIPs trained where the answer is forced: a
   ``shortcut`` world (the habitat decides the class), a ``no-shortcut`` world (the habitat is
   independent of the class) and a ``blind`` world (one part attribute is random in training).
2. *Truth*: each model's reliance on each factor, measured by interventions (:func:`measure`,
   :mod:`conceptlab.reliance`), with its test–retest ceiling (:func:`retest`).
3. *Scores at the granularity a method states*: maps per region (the background and each part,
   :func:`map_region_scores`, area-normalised), words and descriptions per factor
   (:func:`concept_factor_scores`, :func:`mention_factor_scores`); every conversion has its
   *oracle* (the truth pushed through it: the ceiling) and its *null* (uninformative input pushed
   through it: what the conversion alone scores, e.g. :func:`vocabulary_prior`).
4. *Tests*: (a) :func:`agreement` with the measured reliance, as gain over the method's own null,
   beside a permutation band; (b) :func:`paired_test` of the habitat score (shortcut minus
   no-shortcut model) and of the blinded factor's score (blind minus no-shortcut model) on the
   same images; (c) :func:`randomisation_check`, the same factor-score similarity for every method,
   per re-initialised stage. Intervals come from one joint bootstrap over seeds and images
   (:func:`bootstrap_plan`), so every difference between two numbers is paired.
5. *Model-only checks on any open_clip CLIP* (no planted model, no world): :func:`model_only_check` runs
   a map explainer's randomisation cascade on your model and your preprocessed images, beside the null
   band of two different images' maps and the explainer's input null (its maps of noise images).

Bring your own explainer: any ``explainer(subject, batch) -> Explanation`` (see :class:`Explainer`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from .artifacts import params_key
from .models import TrainConfig, world_clip, world_clip_artifact
from .reliance import (
    FACTORS,
    Interventions,
    intervene,
    intervention_batches,
    intervention_key,
    stored_intervene,
    zero_shot_scorer,
)
from .stats import permutation_band
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, WorldBatch, WorldConfig

# Habitat captions are present (so the text side can learn the habitat), behaviour and web phrases
# are not (they would add nothing the images show). Class-name captions dominate: with 150 steps and
# half visual captions a no-shortcut model stayed near chance (zero-shot accuracy 0.22 of 6 classes);
# with half class captions its training loss fell clearly faster (3.1 against 3.6 at step 120).
PLANTED_CAPTIONS = {"visual": 0.3, "class": 0.5, "habitat": 0.2, "behaviour": 0.0, "spurious": 0.0}
# No habitat captions, the others keeping their ratio: the text side never learns the habitat words, the
# images are those of the no-shortcut world (chapter 4's positive control). Raising them from 0.2 to 0.5
# of the mix instead moved nothing: 0.2 already gives the no-shortcut CLIPs their habitat words.
NO_HABITAT_CAPTIONS = {**PLANTED_CAPTIONS, "habitat": 0.0}
CONDITIONS: dict[str, dict] = {
    "shortcut": {"habitat_correlation": 1.0},  # the habitat alone tells the class (one class per habitat)
    "no-shortcut": {"habitat_correlation": 0.0},  # the habitat is independent of the class
    "blind": {"habitat_correlation": 0.0},  # and `blind_factor` is drawn at random in training
    # no-shortcut images, captions that never name the habitat
    "habitat-unnamed": {"habitat_correlation": 0.0, "caption_mix": NO_HABITAT_CAPTIONS},
}
PLANTED_CLASSES = 6  # classes of a planted world
PLANTED_BLIND = "head colour"  # the attribute a blind model never sees
# The planted models' recipe (benchmarks/bench_planted.py): 100 steps recover both planted answers but
# leave the no-shortcut model's blinded-factor reliance near 0, 150 give it a contrast; 2e-3 stalls at
# chance (loss ln 64 after 50 steps).
PLANTED_RECIPE = {"steps": 150, "batch_size": 64, "n_train": 2000, "lr": 1e-3}
REGIONS: tuple[str, ...] = ("background", *PARTS)  # what a map can point at; the habitat is the background
GRANULARITIES = ("region", "factor")
RELIANCE_KIND = "verdict_reliance"  # the store's kind for a planted model's measured reliance


# ---------------------------------------------------------------------------- planted models
@dataclass
class Subject:
    """A model under explanation, with what explainers may need: its world and a content key."""

    name: str
    condition: str
    seed: int
    clip: nn.Module
    tokenizer: Callable
    world: ConceptWorld
    key: dict


def planted_recipe(train: TrainConfig, **changes: Any) -> TrainConfig:
    """``train`` (the world CLIP's recipe) cut to the planted models' size: :data:`PLANTED_RECIPE` with any
    ``changes`` (``steps``, ``batch_size``, ``n_train``, ``lr``), warm-up a tenth of the steps."""
    recipe = {**PLANTED_RECIPE, **changes}
    return replace(train, **recipe, warmup=max(1, recipe["steps"] // 10))


def planted_world(condition: str, base: WorldConfig, blind_factor: str, n_classes: int) -> WorldConfig:
    """The world a planted model of ``condition`` is trained on (``base`` gives everything else)."""
    blind = (blind_factor,) if condition == "blind" else ()
    cfg = replace(base, n_classes=n_classes, caption_mix=dict(PLANTED_CAPTIONS), blind=blind)
    changes: dict[str, Any] = {name: dict(v) if isinstance(v, dict) else v for name, v in CONDITIONS[condition].items()}
    return replace(cfg, **changes)


def planted_models(
    store,
    base_world: WorldConfig,
    train: TrainConfig,
    conditions: Sequence[str],
    n_seeds: int,
    blind_factor: str,
    n_classes: int,
    progress: bool = True,
) -> list[Subject]:
    """Every planted CLIP (``conditions`` x ``n_seeds``, seed s trained with ``train``'s recipe and seed s):
    trained once into ``store``, then loaded. The models are evaluated on the condition's own world
    without blinding, so that every factor can be changed on the test images; the prototypical test
    images of every condition are then the same images. Models another process is training are taken last
    (:meth:`~conceptlab.artifacts.ArtifactStore.free_first`); the list keeps the order above."""
    runs = [
        (condition, seed, planted_world(condition, base_world, blind_factor, n_classes), replace(train, seed=seed))
        for condition in conditions
        for seed in range(n_seeds)
    ]
    subjects = {}
    for condition, seed, cfg, recipe in store.free_first(runs, lambda run: world_clip_artifact(run[2], run[3])):
        clip, _, tokenizer, _ = world_clip(store, cfg, recipe, progress=progress)
        subjects[condition, seed] = Subject(
            f"{condition} {seed}",
            condition,
            seed,
            clip.eval(),
            tokenizer,
            ConceptWorld(replace(cfg, blind=())),
            {"world": cfg.to_dict(), "train": asdict(recipe)},
        )
    return [subjects[condition, seed] for condition, seed, _, _ in runs]


def measure(
    subject: Subject, n: int, seed: int = 0, store=None, images: Callable[[], Sequence[WorldBatch]] | None = None
) -> Interventions:
    """The subject's measured reliance on every factor (zero-shot margin drops on ``n`` prototypical test
    images); with a ``store`` the per-image results are cached (the images are re-rendered, bit-identical).
    ``images``: returns the subject's :func:`~conceptlab.reliance.intervention_batches` (called only to build)."""

    def scorer():
        return zero_shot_scorer(subject.clip, subject.tokenizer, subject.world.class_names)

    if store is None:
        return intervene(scorer(), subject.world, n, "test", FACTORS, seed, images() if images is not None else None)
    key = {"subject": subject.key}
    return stored_intervene(store, RELIANCE_KIND, key, scorer, subject.world, n, seed, FACTORS, images)


def measure_all(subjects: Sequence[Subject], n: int, seed: int = 0, store=None) -> dict[str, Interventions]:
    """:func:`measure` for every subject, each world's intervention images rendered once (when needed) and
    shared by its models (chapter 7's nine planted models render three sets, one per condition). Models another
    process is measuring are taken last; the mapping keeps the order of ``subjects``."""
    rendered: dict[str, Sequence[WorldBatch]] = {}

    def images(subject: Subject) -> Sequence[WorldBatch]:
        world = params_key(subject.world.config)
        if world not in rendered:
            rendered[world] = intervention_batches(subject.world, n, "test", FACTORS, seed)
        return rendered[world]

    def artifact(subject: Subject) -> tuple[str, dict]:
        return RELIANCE_KIND, intervention_key({"subject": subject.key}, n, seed)

    order = subjects if store is None else store.free_first(subjects, artifact)
    measured = {s.name: measure(s, n, seed, store, partial(images, s)) for s in order}
    return {s.name: measured[s.name] for s in subjects}


def planted_check(truths: Mapping[str, Interventions], subjects: Sequence[Subject], blind_factor: str) -> pd.DataFrame:
    """Does the measurement recover each planted answer? Per model: accuracy on the prototypical images,
    the habitat's reliance and rank, and the blinded attribute's reliance."""
    rows = []
    for s in subjects:
        rel = truths[s.name].reliance()
        rows.append(
            {
                "model": s.name,
                "condition": s.condition,
                "base accuracy": truths[s.name].correct_base.mean(),
                "habitat reliance": rel["habitat"],
                "habitat rank": int((rel > rel["habitat"]).sum()) + 1,
                "largest part factor": rel.drop("habitat").max(),
                "blinded factor reliance": rel[blind_factor],
            }
        )
    return pd.DataFrame(rows).set_index("model")


def planted_recovered(check: pd.DataFrame, n_classes: int | None = None) -> dict[str, bool]:
    """The measurement's own check, in booleans: every shortcut model relies more on the habitat than
    every no-shortcut model; every blind model relies less on the blinded attribute than every
    no-shortcut model; (with ``n_classes``) every model learned (accuracy at least twice chance)."""
    by = check.groupby("condition")
    out = {
        "shortcut habitat > no-shortcut habitat": bool(
            by["habitat reliance"].min()["shortcut"] > by["habitat reliance"].max()["no-shortcut"]
        )
    }
    if "blind" in by.groups:
        out["blinded factor: blind < no-shortcut reliance"] = bool(
            by["blinded factor reliance"].max()["blind"] < by["blinded factor reliance"].min()["no-shortcut"]
        )
    if n_classes is not None:
        out["every planted model learned (accuracy >= 2x chance)"] = bool(
            (check["base accuracy"] >= 2 / n_classes).all()
        )
    return out


# ---------------------------------------------------------------------------- explanations
@dataclass
class Explanation:
    """A method's claim about a model on a batch: ``scores`` (images, factors) in the order of
    :data:`~conceptlab.reliance.FACTORS` (NaN where the image lacks the part; a per-model claim is
    the same row for every image) and, for methods that localise, ``maps`` (images, H, W), >= 0."""

    scores: np.ndarray
    maps: np.ndarray | None = None


class Explainer(Protocol):
    """Bring your own explainer: ``explainer(subject, batch) -> Explanation``.

    ``subject.clip`` is an open_clip model (``subject.tokenizer`` its tokenizer), ``subject.world``
    the world it was trained on (class names, rendering), ``batch`` the prototypical test images
    (uint8 ``batch.images``, ``batch.labels``; masks and attributes are for the scorer, an honest
    explainer does not read them). Return factor scores, or maps and let :func:`map_factor_scores`
    convert them.
    """

    def __call__(self, subject: Subject, batch: WorldBatch) -> Explanation: ...


def factor_present(batch: WorldBatch) -> np.ndarray:
    """(images, factors) bool: the image has the factor's part (always for the habitat)."""
    cols = [
        np.ones(len(batch), bool) if f == "habitat" else batch.present[:, PARTS.index(f.split()[0])] for f in FACTORS
    ]
    return np.stack(cols, 1)


def region_present(batch: WorldBatch) -> np.ndarray:
    """(images, regions) bool: the background always, each part where the image has it."""
    return np.concatenate([np.ones((len(batch), 1), bool), batch.present], 1)


def per_model(scores: Sequence[float], batch: WorldBatch) -> np.ndarray:
    """A per-model claim (one score per factor) as an (images, factors) array, NaN for absent parts."""
    return np.where(factor_present(batch), np.asarray(scores, float)[None], np.nan)


# ---------------------------------------------------------------------------- conversions
def region_masks(batch: WorldBatch) -> np.ndarray:
    """(images, regions, H, W) bool: the background (no part) and each part's visible pixels."""
    return np.concatenate([~batch.masks.any(1, keepdims=True), batch.masks], 1)


def map_region_scores(maps: np.ndarray | torch.Tensor, batch: WorldBatch, area_normalised: bool = True) -> np.ndarray:
    """Explanation maps -> region scores (images, regions).

    ``area_normalised``: the map's mean value on each region (its energy divided by the region's area),
    in units of the map's mean value over the whole batch (a uniform map scores 1 everywhere, and a
    map that is the measured reliance painted on the regions gives back the reliance). Otherwise each
    region's share of the image's energy, by which the background (~90 % of a creature image) wins by
    its size alone. Maps are clipped at 0 and resized to the image first; NaN for absent parts."""
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32).clamp(min=0)[:, None]
    size = batch.masks.shape[-2:]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].numpy().astype(np.float64)
    masks = region_masks(batch)
    energy = (maps[:, None] * masks).sum((2, 3))
    if area_normalised:
        area = masks.sum((2, 3))
        score = np.divide(energy, area, out=np.zeros_like(energy), where=area > 0) / (maps.mean() + 1e-12)
    else:
        score = energy / (maps.sum((1, 2))[:, None] + 1e-12)
    return np.where(region_present(batch), score, np.nan)


def regions_to_factors(region_scores: np.ndarray) -> np.ndarray:
    """(images, regions) -> (images, factors): the background's score to the habitat, each part's to its
    three attributes (a map cannot tell colour from pattern from size)."""
    cols = [0 if f == "habitat" else 1 + PARTS.index(f.split()[0]) for f in FACTORS]
    return region_scores[:, cols]


def factors_to_regions(scores: np.ndarray, how: str = "sum") -> np.ndarray:
    """(images, factors) -> (images, regions): the habitat to the background, a part's attributes summed
    (``how="sum"``: the truth, a margin drop per factor) or averaged (``"mean"``: a map's copied score)."""
    reduce: Any = {"sum": np.sum, "mean": np.mean}[how]
    out = [scores[:, FACTORS.index("habitat")]]
    for part in PARTS:
        out.append(reduce(scores[:, [FACTORS.index(f"{part} {a}") for a in ATTRIBUTES]], axis=1))
    return np.stack(out, 1)


def map_factor_scores(maps: np.ndarray | torch.Tensor, batch: WorldBatch, area_normalised: bool = True) -> np.ndarray:
    """Explanation maps -> factor scores: :func:`map_region_scores` given to each region's factors."""
    return regions_to_factors(map_region_scores(maps, batch, area_normalised))


def reliance_maps(res: Interventions) -> np.ndarray:
    """(images, H, W) the measured reliance placed where each factor is: every part's mask weighted by
    the image's (non-negative) margin drops of its three attributes, the background by the habitat's."""
    drops = np.nan_to_num(np.clip(res.drops, 0, None))
    masks = res.base.masks.astype(np.float32)
    out = drops[:, 0, None, None] * ~res.base.masks.any(1)
    for p, part in enumerate(PARTS):
        cols = [FACTORS.index(f"{part} {a}") for a in ATTRIBUTES]
        out = out + drops[:, cols].sum(1)[:, None, None] * masks[:, p]
    return out


def silhouette_maps(batch: WorldBatch) -> np.ndarray:
    """A map that only knows where the creature is (1 on every part, 0 on the background): a map null."""
    return np.asarray(batch.masks.any(1), dtype=np.float32)


def factor_phrase(world: ConceptWorld, c: int, factor: str) -> str:
    """A sentence stating class ``c``'s typical value of ``factor`` ("a zorbil with a red head.")."""
    spec = world.classes[c]
    if factor == "habitat":
        return f"a {spec.name} lives in the {spec.habitat}."
    part, attribute = factor.split()
    article = "" if part in ("legs", "wings") else "a "
    return f"a {spec.name} with {article}{spec.parts[part][attribute]} {part}."


def candidate_descriptions(world: ConceptWorld) -> pd.DataFrame:
    """The reward ranking's candidates: for each class, the class name alone and one true sentence per
    factor its creature has (``factors`` lists what a sentence states). These are written from the
    world's ground truth: no language model writes them, and none is spurious or false."""
    rows = []
    for c, spec in enumerate(world.classes):
        own = [f for f in FACTORS if f == "habitat" or f.split()[0] in spec.parts]
        rows.append({"class_index": c, "description": f"a photo of a {spec.name}.", "factors": ()})
        rows += [{"class_index": c, "description": factor_phrase(world, c, f), "factors": (f,)} for f in own]
    return pd.DataFrame(rows)


def mention_factor_scores(candidates: pd.DataFrame, rewards: np.ndarray, beta: float) -> np.ndarray:
    """A reward ranking -> factor scores: how often descriptions drawn from the KL-optimal policy mention
    each factor. The policy that maximises ``E[reward] - beta KL(pi || uniform)`` is
    ``pi(d | class) ~ exp(reward(d) / beta)`` over the candidates (what RL alignment such as EX2's
    converges to, without a language model). Returns (classes, factors)."""
    out = np.zeros((candidates.class_index.max() + 1, len(FACTORS)))
    for c, group in candidates.groupby("class_index"):
        r = rewards[group.index.to_numpy()] / beta
        pi = np.exp(r - r.max())
        pi /= pi.sum()
        for weight, factors in zip(pi, group.factors):
            for f in factors:
                out[c, FACTORS.index(f)] += weight
    return out


def word_factors(word: str, world: ConceptWorld, c: int) -> list[str]:
    """The factors a concept name denotes for class ``c``: a habitat word -> the habitat; a part word ->
    that part's three attributes; a value and a part ("red head") -> that attribute of that part; an
    attribute value ("red", "striped", "large") -> that attribute of the class's parts that have this
    value; anything else (class names, other words) -> none."""
    if word in HABITATS:
        return ["habitat"]
    value, _, part = word.rpartition(" ")
    if part in PARTS and value:  # "red head" (LaViSE's part-attribute concepts) -> head colour
        found = [a for a, values in ATTRIBUTES.items() if value in values]
        return [f"{part} {found[0]}"] if found and part in world.classes[c].parts else []
    if word in PARTS:
        return [f"{word} {a}" for a in ATTRIBUTES] if word in world.classes[c].parts else []
    for attribute, values in ATTRIBUTES.items():
        if word in values:
            return [f"{p} {attribute}" for p, attrs in world.classes[c].parts.items() if attrs[attribute] == word]
    return []


def concept_factor_scores(
    contributions: np.ndarray, names: Sequence[str], labels: np.ndarray, world: ConceptWorld
) -> np.ndarray:
    """Named concepts -> factor scores: each image's concept contributions to its class (e.g. DN-CBM's
    strength x probe weight) summed over the concepts whose name denotes the factor (split evenly where a
    name denotes several factors)."""
    out = np.zeros((len(labels), len(FACTORS)))
    for c in np.unique(labels):
        rows = labels == c
        for k, name in enumerate(names):
            factors = word_factors(name, world, int(c))
            for f in factors:
                out[rows, FACTORS.index(f)] += contributions[rows, k] / len(factors)
    return out


def vocabulary_prior(words: Sequence[str], labels: np.ndarray, world: ConceptWorld) -> np.ndarray:
    """The word conversion's null: the expected factor scores of words drawn uniformly from ``words``
    (every word weighted alike), per image's class. A vocabulary with more colour words than habitat
    words favours colour before any model is asked."""
    return concept_factor_scores(np.ones((len(labels), len(words))) / len(words), words, labels, world)


def oracle_words(world: ConceptWorld) -> list[str]:
    """One word per factor and part, as a perfect namer would use them ("red head", "striped body", habitats)."""
    words = list(HABITATS)
    for spec in world.classes:
        words += [f"{v} {part}" for part, attrs in spec.parts.items() for v in attrs.values()]
    return sorted(set(words))


def factor_oracle(drops: np.ndarray, labels: np.ndarray, world: ConceptWorld) -> np.ndarray:
    """The truth pushed through the word conversion: each factor's drop given to the word that names it
    for the image's class (:func:`oracle_words`), then :func:`concept_factor_scores`. Reaches the truth."""
    words = oracle_words(world)
    contributions = np.zeros((len(labels), len(words)))
    for i, c in enumerate(labels):
        for j, f in enumerate(FACTORS):
            if np.isnan(drops[i, j]):
                continue
            name = (
                world.classes[c].habitat
                if f == "habitat"
                else f"{world.classes[c].parts[f.split()[0]][f.split()[1]]} {f.split()[0]}"
            )
            contributions[i, words.index(name)] += drops[i, j]
    return np.where(np.isnan(drops), np.nan, concept_factor_scores(contributions, words, labels, world))


# ---------------------------------------------------------------------------- the truth at a granularity
def truth_scores(res: Interventions, granularity: str) -> np.ndarray:
    """The measured reliance per image at ``granularity``: factors (margin drops) or regions (the drops of
    a part's attributes summed; the habitat's on the background)."""
    if granularity == "factor":
        return res.drops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.where(region_present(res.base), factors_to_regions(np.nan_to_num(res.drops), "sum"), np.nan)


def at_granularity(scores: np.ndarray, granularity: str) -> np.ndarray:
    """A method's factor scores at ``granularity`` (regions: the mean of a part's attributes)."""
    if granularity == "factor":
        return scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return factors_to_regions(scores, "mean")


def oracle_scores(res: Interventions, granularity: str, world: ConceptWorld) -> np.ndarray:
    """The truth pushed through the conversion of ``granularity``: the reliance map through the map
    conversion (regions), or the factor drops through the word conversion (factors): the ceiling."""
    if granularity == "region":
        return at_granularity(map_factor_scores(reliance_maps(res), res.base), "region")
    return factor_oracle(res.drops, res.base.labels, world)


# ---------------------------------------------------------------------------- statistics
def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching rows of a and b (0 where a row is constant)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def profile_rho(scores: np.ndarray, truth: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Spearman's rho between the mean (over images ``idx``) of a method's scores and of the truth, over
    the columns both define."""
    with warnings.catch_warnings():  # a resample may miss every image with some part
        warnings.simplefilter("ignore", RuntimeWarning)
        s = np.nanmean(scores if idx is None else scores[idx], 0)
        t = np.nanmean(truth if idx is None else truth[idx], 0)
    ok = ~np.isnan(s) & ~np.isnan(t)
    return float(spearman_rows(s[None, ok], t[None, ok])[0]) if ok.sum() > 1 else 0.0


Plan = list[list[tuple[str, np.ndarray]]]


def bootstrap_plan(conditions: Mapping[str, str], n_images: int, n_bootstrap: int, seed: int = 0) -> Plan:
    """One joint bootstrap, shared by every statistic so that differences are paired: each resample draws
    the models of every condition (its seeds) with replacement and, for each drawn model, its images."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for m, c in conditions.items():
        groups.setdefault(c, []).append(m)
    return [
        [
            (g[i], rng.integers(n_images, size=n_images))
            for g in groups.values()
            for i in rng.integers(len(g), size=len(g))
        ]
        for _ in range(n_bootstrap)
    ]


def _interval(boot: np.ndarray, level: float = 0.95, point: float | None = None) -> tuple[float, float]:
    """Percentile interval of ``boot``, widened to hold ``point`` (a skewed bootstrap of few images can miss it)."""
    a = (1 - level) / 2
    low, high = float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))
    return (low, high) if point is None else (min(low, point), max(high, point))


def _profiles(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(resamples, columns) means of ``x`` over the images of each row of ``idx`` (NaN-aware), at once."""
    counts = np.stack([np.bincount(i, minlength=len(x)) for i in idx]).astype(float)
    defined = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(defined, x, 0.0)) / (counts @ defined)


def _rhos(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching rows, over the columns both define (0 where fewer than two)."""
    ok = ~np.isnan(s) & ~np.isnan(t)
    if ok.all():
        return spearman_rows(s, t)
    return np.array([spearman_rows(a[None, k], b[None, k])[0] if k.sum() > 1 else 0.0 for a, b, k in zip(s, t, ok)])


def _boot_rhos(scores: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], plan: Plan) -> np.ndarray:
    """The mean rho over each resample's models, for every resample of ``plan``."""
    total, count = np.zeros(len(plan)), np.zeros(len(plan))
    by_model: dict[str, list[tuple[int, np.ndarray]]] = {}
    for d, draw in enumerate(plan):
        for m, idx in draw:
            by_model.setdefault(m, []).append((d, idx))
    for m, items in by_model.items():
        draws, idx = np.array([d for d, _ in items]), np.stack([i for _, i in items])
        np.add.at(total, draws, _rhos(_profiles(scores[m], idx), _profiles(truth[m], idx)))
        np.add.at(count, draws, 1)
    return total / count


def agreement(
    scores: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    plan: Plan,
    null: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """(a) Spearman's rho between a method's mean scores and the measured reliance, per model, and its mean
    over models with a bootstrap interval over ``plan``. With ``null`` (the same method's conversion fed
    with uninformative input), also the null's rho and the gain over it, paired on the same resamples."""
    per_model = {m: profile_rho(scores[m], truth[m]) for m in scores}
    boot = _boot_rhos(scores, truth, plan)
    rho = float(np.mean(list(per_model.values())))
    out: dict[str, Any] = {"rho": rho, "per_model": per_model}
    out["low"], out["high"] = _interval(boot, point=rho)
    if null is not None:
        null_point = float(np.mean([profile_rho(null[m], truth[m]) for m in scores]))
        out |= {"null": null_point, "gain": rho - null_point}
        out["gain_low"], out["gain_high"] = _interval(boot - _boot_rhos(null, truth, plan), point=rho - null_point)
    return out


def agreement_band(
    scores: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    n_permutations: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(a)'s permutation null: ``(mean, low, high)`` of the mean rho over models when each model's truth
    profile is shuffled over the columns (the chance a method's own scores meet)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_permutations)
    for m in scores:
        everything = np.arange(len(scores[m]))[None]
        s, t = _profiles(scores[m], everything)[0], _profiles(truth[m], everything)[0]
        ok = ~np.isnan(s) & ~np.isnan(t)
        s, t = s[None, ok], t[ok]
        shuffled = t[np.argsort(rng.random((n_permutations, len(t))), axis=1)]
        draws += spearman_rows(np.repeat(s, n_permutations, 0), shuffled) / len(scores)
    return float(draws.mean()), *_interval(draws, level)


def relative_scores(scores: np.ndarray, granularity: str) -> np.ndarray:
    """Scores comparable between two models: a map's area-normalised region scores as they are; factor
    scores as each factor's share of the image's total absolute score (a method's scale may differ by model)."""
    if granularity == "region":
        return scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        total = np.nansum(np.abs(scores), 1, keepdims=True)
        return np.divide(scores, total, out=np.full_like(scores, np.nan, dtype=float), where=total > 0)


def paired_test(
    a: Mapping[int, np.ndarray],
    b: Mapping[int, np.ndarray],
    n_bootstrap: int = 200,
    seed: int = 0,
    n_permutations: int = 200,
) -> dict:
    """(b) The mean of ``a - b`` over paired models (same seed) and images (the same images), with a joint
    bootstrap interval over seeds and images and a sign-flip permutation band (the difference when the
    two conditions are exchangeable). ``a``, ``b``: ``{seed: per-image scores}``."""
    seeds = sorted(set(a) & set(b))
    diffs = [np.asarray(a[s], float) - np.asarray(b[s], float) for s in seeds]
    diffs = [d[~np.isnan(d)] for d in diffs]
    diffs = [d for d in diffs if len(d)]
    if not diffs:
        nan = float("nan")
        return {"diff": nan, "low": nan, "high": nan, "band_low": nan, "band_high": nan, "per_seed": {}}
    rng = np.random.default_rng(seed)
    boot = np.array(
        [
            np.mean(
                [
                    diffs[i][rng.integers(len(diffs[i]), size=len(diffs[i]))].mean()
                    for i in rng.integers(len(diffs), size=len(diffs))
                ]
            )
            for _ in range(n_bootstrap)
        ]
    )
    _, band_low, band_high = permutation_band(
        lambda g: float(np.mean([(d * g.choice([-1.0, 1.0], size=len(d))).mean() for d in diffs])),
        n_permutations,
        seed=seed,
    )
    diff = float(np.mean([d.mean() for d in diffs]))
    low, high = _interval(boot, point=diff)
    return {
        "diff": diff,
        "low": low,
        "high": high,
        "band_low": band_low,
        "band_high": band_high,
        "per_seed": {int(s): float(d.mean()) for s, d in zip(seeds, diffs)},
    }


def detected(test: Mapping[str, float], direction: int) -> bool:
    """Whether a paired test's interval excludes 0 in the planted ``direction`` (+1 or -1)."""
    return bool(test["low"] > 0) if direction > 0 else bool(test["high"] < 0)


def retest(res: Interventions, granularity: str = "factor") -> float:
    """The measurement's test–retest ceiling: Spearman's rho between the reliance measured on the even and
    on the odd images (two disjoint image sets) of one model."""
    t = truth_scores(res, granularity)
    n = len(t)
    return profile_rho(t[np.arange(0, n, 2)], t[np.arange(1, n, 2)])


# ---------------------------------------------------------------------------- (c) randomisation
def vision_stages(clip: nn.Module) -> list[str]:
    """Names of the vision tower's parameter groups from the top (output) down, for cascading
    re-initialisation: the projection and final norm, each block / ResNet stage, then the stem."""
    visual = clip.visual
    if hasattr(visual, "transformer"):
        blocks = [f"transformer.resblocks.{i}." for i in reversed(range(len(visual.transformer.resblocks)))]
        return ["proj|ln_post.", *blocks, "conv1.|class_embedding|positional_embedding|ln_pre."]
    return ["attnpool.", "layer4.", "layer3.", "layer2.", "layer1.", "stem"]


def randomised(clip: nn.Module, n_stages: int, seed: int = 0) -> nn.Module:
    """A copy of ``clip`` whose top ``n_stages`` vision stages (:func:`vision_stages`) are re-initialised:
    every weight re-drawn from a normal with the trained tensor's mean and standard deviation (biases
    and norm shifts to 0, norm scales to 1), the text tower untouched."""
    out = copy.deepcopy(clip)
    stages = vision_stages(clip)[:n_stages]
    prefixes = [p for s in stages for p in s.split("|")]
    last = n_stages >= len(vision_stages(clip))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in out.visual.named_parameters():
            if not (last or name.startswith(tuple(prefixes))):
                continue
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and ("ln" in name or "bn" in name or "norm" in name):
                param.fill_(1.0)
            else:
                std = float(param.std()) if param.numel() > 1 else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * std + float(param.mean()))
    return out.eval()


def randomisation_check(
    explainer: Explainer,
    subject: Subject,
    batch: WorldBatch,
    cascade: Sequence[int],
    seed: int = 0,
    reference: Explanation | None = None,
) -> pd.DataFrame:
    """(c) Adebayo et al.'s model randomisation test in one currency: re-initialise the top ``k`` vision
    stages for each ``k`` of ``cascade`` and compare the explanation's mean factor scores with the trained
    model's (Spearman's rho; 1 = unchanged). ``reference``: the trained model's explanation, if known."""
    stages = vision_stages(subject.clip)
    ref = reference if reference is not None else explainer(subject, batch)
    rows = []
    for k in sorted({min(c, len(stages)) for c in cascade}):
        rnd = replace(
            subject,
            clip=randomised(subject.clip, k, seed),
            key={**subject.key, "randomised": {"stages": k, "seed": seed}},
        )
        rows.append(
            {
                "model": subject.name,
                "stages re-initialised": k,
                "top stage": stages[k - 1].split("|")[0].rstrip("."),
                "similarity": profile_rho(explainer(rnd, batch).scores, ref.scores),
            }
        )
    return pd.DataFrame(rows)


def similarity_band(scores: np.ndarray, n_permutations: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """(c)'s null: the similarity of an explanation's mean factor scores with a shuffled copy of themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = np.nanmean(scores, 0)
    s = s[~np.isnan(s)]
    return permutation_band(
        lambda g: float(spearman_rows(s[None], g.permutation(s)[None])[0]), n_permutations, seed=seed
    )


# ---------------------------------------------------------------------------- model-only checks (any CLIP)
MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], np.ndarray]  # (clip, images, texts (N, D)) -> (N, h, w)


def _unit_ranks(maps: np.ndarray) -> np.ndarray:
    """(N, pixels) ranks of each map over its pixels, centred and scaled to unit norm (0 for a constant map)."""
    r = rankdata(np.asarray(maps, np.float64).reshape(len(maps), -1), axis=1)
    r = r - r.mean(1, keepdims=True)
    norm = np.sqrt((r**2).sum(1, keepdims=True))
    return np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)


def map_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching maps (N, h, w) over their pixels: one number per image."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"maps of different shapes {np.shape(a)} and {np.shape(b)}")
    return (_unit_ranks(a) * _unit_ranks(b)).sum(1)


def mean_interval(values: np.ndarray, n_bootstrap: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-image ``values`` and its 95 % bootstrap interval over images."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(len(values), size=(n_bootstrap, len(values)))].mean(1)
    mean = float(values.mean())
    return (mean, *_interval(boot, point=mean))


def different_images_band(maps: np.ndarray, n_permutations: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """What "no relation" looks like: ``(mean, low, high)`` over random pairings (every image with another
    image, a derangement per draw) of the mean similarity between the maps of two different images."""
    r = _unit_ranks(maps)
    gram = r @ r.T

    def draw(g: np.random.Generator) -> float:
        order = g.permutation(len(r))
        return float(gram[order, np.roll(order, 1)].mean())

    return permutation_band(draw, n_permutations, seed=seed)


def shuffled_band(maps: np.ndarray, n_permutations: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean similarity between each map and a copy with its pixels shuffled.
    Ranks follow their pixels, so the maps are ranked once and each draw shuffles the ranks (what
    :func:`map_similarity` of the shuffled maps computes, without re-ranking them per draw)."""
    r = _unit_ranks(maps)
    return permutation_band(
        lambda g: float((r * r[:, g.permutation(r.shape[1])]).sum(1).mean()), n_permutations, seed=seed
    )


def noise_images(images: torch.Tensor, clip: nn.Module | None = None, seed: int = 0) -> torch.Tensor:
    """Images that show nothing, shaped like ``images``: uniform random pixels, normalised with the model's
    preprocessing mean and standard deviation (standard normal values without one)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = getattr(getattr(clip, "visual", None), "preprocess_cfg", None)
    if not cfg:
        return torch.randn(images.shape, generator=gen)
    mean, std = (torch.tensor(cfg[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
    return (torch.rand(images.shape, generator=gen) - mean) / std


@dataclass
class ModelOnlyCheck:
    """One map explainer's model-only sanity checks on one CLIP and one set of images.

    ``cascade``: per count of re-initialised top vision stages (0: the trained model, its maps recomputed),
    the mean similarity of the maps with the trained model's and its bootstrap interval over images.
    ``band``: the mean similarity between the maps of two different images (what no relation looks like);
    ``shuffled``: between a map and a pixel-shuffled copy; ``input_null``: between the maps of noise images
    and of the real images, with its interval. Similarities are Spearman's rho over map pixels."""

    cascade: pd.DataFrame
    band: tuple[float, float, float]
    shuffled: tuple[float, float, float]
    input_null: tuple[float, float, float]
    n_images: int
    n_stages: int

    @property
    def randomised(self) -> pd.Series:
        """The cascade's last row: every vision stage re-initialised."""
        return self.cascade.iloc[-1]

    @property
    def follows_the_weights(self) -> bool:
        """Whether the maps of the fully re-initialised model fall inside or below the band."""
        return bool(self.randomised["similarity"] <= self.band[2])

    @property
    def input_dependent(self) -> bool:
        """Whether the maps of noise images fall inside or below the band (the maps depend on the input)."""
        return bool(self.input_null[0] <= self.band[2])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record: the cascade, the bands, the input null and the two decisions."""
        names = ("mean", "low", "high")
        return {
            "cascade": self.cascade.to_dict("records"),
            "band (two different images)": dict(zip(names, self.band)),
            "band (shuffled pixels)": dict(zip(names, self.shuffled)),
            "input null (noise images)": dict(zip(names, self.input_null)),
            "n_images": self.n_images,
            "n_stages": self.n_stages,
            "follows the weights": self.follows_the_weights,
            "maps depend on the input": self.input_dependent,
        }


def model_only_check(
    maps: MapFn,
    clip: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    class_texts: torch.Tensor,
    cascade: Sequence[int],
    n_bootstrap: int = 200,
    n_permutations: int = 200,
    seed: int = 0,
) -> ModelOnlyCheck:
    """Adebayo et al.'s model randomisation cascade for a map explainer on any open_clip CLIP: the maps of
    each image's class text (``class_texts[labels]``) from the trained model and from copies whose top
    ``k`` vision stages are re-initialised (:func:`randomised`, ``k`` from ``cascade``, then every stage),
    beside the null band (:func:`different_images_band`, :func:`shuffled_band`) and the explainer's input
    null (its maps of :func:`noise_images`). ``clip`` itself is never changed."""
    texts = torch.as_tensor(class_texts)[torch.as_tensor(np.asarray(labels))]
    stages = vision_stages(clip)
    ref = maps(clip, images, texts)
    rows = [("trained model (maps recomputed)", 0, "—", maps(clip, images, texts))]
    for k in sorted({min(c, len(stages)) for c in cascade} | {len(stages)}):
        top = stages[k - 1].split("|")[0].rstrip(".")
        rows.append((f"top {k} stages re-initialised", k, top, maps(randomised(clip, k, seed), images, texts)))
    table = pd.DataFrame(
        [
            {"comparison": what, "stages re-initialised": k, "top stage": top}
            | dict(zip(("similarity", "low", "high"), mean_interval(map_similarity(ref, m), n_bootstrap, seed)))
            for what, k, top, m in rows
        ]
    )
    noise = maps(clip, noise_images(images, clip, seed), texts)
    return ModelOnlyCheck(
        table,
        different_images_band(ref, n_permutations, seed),
        shuffled_band(ref, n_permutations, seed),
        mean_interval(map_similarity(ref, noise), n_bootstrap, seed),
        len(images),
        len(stages),
    )


# ---------------------------------------------------------------------------- per class
def per_class_agreement(scores: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(a) per class: rho between the method's mean scores and the truth on the class's images alone."""
    out = np.full(labels.max() + 1, np.nan)
    for c in np.unique(labels):
        out[c] = profile_rho(scores, truth, np.flatnonzero(labels == c))
    return out


__all__ = [
    "CONDITIONS",
    "NO_HABITAT_CAPTIONS",
    "GRANULARITIES",
    "PLANTED_CAPTIONS",
    "REGIONS",
    "Explainer",
    "Explanation",
    "MapFn",
    "ModelOnlyCheck",
    "Plan",
    "Subject",
    "agreement",
    "agreement_band",
    "at_granularity",
    "bootstrap_plan",
    "candidate_descriptions",
    "concept_factor_scores",
    "detected",
    "different_images_band",
    "factor_oracle",
    "factor_phrase",
    "factor_present",
    "factors_to_regions",
    "map_factor_scores",
    "map_region_scores",
    "map_similarity",
    "mean_interval",
    "measure",
    "measure_all",
    "model_only_check",
    "mention_factor_scores",
    "noise_images",
    "oracle_scores",
    "oracle_words",
    "paired_test",
    "per_class_agreement",
    "per_model",
    "planted_check",
    "planted_models",
    "planted_recovered",
    "planted_world",
    "profile_rho",
    "randomisation_check",
    "randomised",
    "region_masks",
    "region_present",
    "regions_to_factors",
    "relative_scores",
    "reliance_maps",
    "retest",
    "shuffled_band",
    "silhouette_maps",
    "similarity_band",
    "spearman_rows",
    "truth_scores",
    "vision_stages",
    "vocabulary_prior",
    "word_factors",
]
