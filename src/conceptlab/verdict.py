"""Chapter 7, the verdict: which explanation method tells the truth about what a model uses.

1. *Planted models* (:func:`planted_models`): world CLIPs trained where the answer is forced: a
   ``shortcut`` world (the habitat decides the class), a ``no-shortcut`` world (the habitat is
   independent of the class) and a ``blind`` world (one part attribute is random in training).
2. *Truth*: the reliance of each model on each factor, measured by interventions
   (:mod:`conceptlab.reliance`).
3. *One currency*: every method's output becomes a score per factor and image, an array
   ``(images, factors)`` over :data:`~conceptlab.reliance.FACTORS` (NaN where the image lacks the
   part), by one small conversion per kind of output: :func:`map_factor_scores` (explanation maps),
   :func:`mention_factor_scores` (EX2's descriptions), :func:`concept_factor_scores` (DN-CBM's
   named concepts).
4. *Tests*: (a) :func:`agreement` with the measured reliance, (b) :func:`shortcut_detection`,
   (c) :func:`randomisation_check` (cascading re-initialisation of the vision tower from the top),
   (d) :func:`localisation` of maps against the reliance-weighted part masks; then
   :func:`scoreboard` and a :func:`conclusion` written from it.

Bring your own explainer: any function ``explainer(subject, batch) -> Explanation`` (see
:class:`Explainer`) is scored exactly as the built-in methods are.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from .chapter import Param
from .explain import model_kind
from .models import TrainConfig, class_text_weights, encode_images, images_to_tensor, world_clip
from .reliance import FACTORS, Interventions, intervene, prototypical, rank_correlation, zero_shot_scorer
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, WorldBatch, WorldConfig

CONDITIONS: dict[str, dict] = {
    "shortcut": {"habitat_correlation": 1.0},  # the habitat alone tells the class (one class per habitat)
    "no-shortcut": {"habitat_correlation": 0.0},  # the habitat is independent of the class
    "blind": {"habitat_correlation": 0.0},  # and `blind_factor` is drawn at random in training
}
# Habitat captions are present (so the text side can learn the habitat), behaviour and web phrases
# are not (they would add nothing the images show). Class-name captions dominate: with 150 steps and
# half visual captions a no-shortcut model stayed near chance (zero-shot accuracy 0.22 of 6 classes);
# with half class captions its training loss fell clearly faster (3.1 against 3.6 at step 120).
PLANTED_CAPTIONS = {"visual": 0.3, "class": 0.5, "habitat": 0.2, "behaviour": 0.0, "spurious": 0.0}
TESTS = ("(a) agreement", "(b) shortcut detection", "(c) randomisation", "(d) localisation")
CHANCE = {"(a) agreement": 0.0, "(b) shortcut detection": 0.5, "(c) randomisation": 0.0,
          "(d) localisation": 0.0}

PARAMETERS = {
    "conditions": Param(["shortcut", "no-shortcut", "blind"], list, item=str,
                        check=lambda v, p: None if set(v) <= set(CONDITIONS) and "shortcut" in v
                        and "no-shortcut" in v else f"use 'shortcut', 'no-shortcut' and optionally "
                        f"'blind' (of {list(CONDITIONS)})", help="planted training conditions"),
    "n_seeds": Param(2, int, min=1, help="planted models per condition"),
    "blind_factor": Param("head colour", str, choices=FACTORS[1:], help="the attribute a blind model never sees"),
    "planted_classes": Param(6, int, min=2, max=len(HABITATS), help="classes of the planted worlds"),
    "planted_steps": Param(300, int, min=1, help="training steps of each planted CLIP"),
    "planted_batch_size": Param(64, int, min=2),
    "planted_n_train": Param(4000, int, min=64),
    "n_images": Param(256, int, min=8, help="prototypical test images per model (interventions, explanations)"),
    "n_bootstrap": Param(200, int, min=10, help="bootstrap resamples (images and seeds)"),
    "ex2_beta": Param(0.02, float, min=1e-4, help="KL coefficient of EX2's stand-in policy"),
    "sae_n_corpus": Param(4096, int, min=256, help="DN-CBM: corpus images of the SAE and the probe"),
    "sae_epochs": Param(30, int, min=1),
    "probe_lambda": Param(0.0, float, min=0.0, help="DN-CBM: L1 weight of the concept probe (0: unpenalised, fast)"),
    "deal_steps": Param(20, int, min=0, help="DEAL fine-tuning steps of each planted model (0: no DEAL row)"),
    "lavise_n_train": Param(1024, int, min=64, help="LaViSE: world images (with concept masks) that train the head"),
    "lavise_epochs": Param(5, int, min=1, help="LaViSE: training epochs of the explainer head"),
    "n_random_images": Param(64, int, min=8, help="images of the randomisation check"),
    "cascade": Param([1, 3, 6], list, item=int, check=lambda v, p: None if v and min(v) >= 1 else
                     "list stage counts >= 1", help="randomisation check: re-initialise this many top stages"),
}


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


def planted_world(condition: str, base: WorldConfig, blind_factor: str, n_classes: int) -> WorldConfig:
    """The world a planted model of ``condition`` is trained on (``base`` gives everything else)."""
    blind = (blind_factor,) if condition == "blind" else ()
    return replace(base, n_classes=n_classes, caption_mix=dict(PLANTED_CAPTIONS), blind=blind,
                   **CONDITIONS[condition])


def planted_models(store, base_world: WorldConfig, base_train: TrainConfig, p: dict,
                   progress: bool = True) -> list[Subject]:
    """Every planted CLIP (``p["conditions"]`` x ``p["n_seeds"]``): trained once into ``store``, then loaded.

    The models are evaluated on the condition's own world without blinding (the same creatures),
    so that every factor can be changed on the test images.
    """
    subjects = []
    for condition in p["conditions"]:
        cfg = planted_world(condition, base_world, p["blind_factor"], p["planted_classes"])
        for seed in range(p["n_seeds"]):
            train = replace(base_train, n_train=p["planted_n_train"], steps=p["planted_steps"],
                            batch_size=p["planted_batch_size"], warmup=max(1, p["planted_steps"] // 10), seed=seed)
            clip, _, tokenizer, _ = world_clip(store, cfg, train, progress=progress)
            subjects.append(Subject(f"{condition} {seed}", condition, seed, clip.eval(), tokenizer,
                                    ConceptWorld(replace(cfg, blind=())),
                                    {"world": cfg.to_dict(), "train": asdict(train)}))
    return subjects


def measure(subject: Subject, n: int, seed: int = 0, store=None) -> Interventions:
    """The subject's measured reliance on every factor (zero-shot margin drops on ``n`` prototypical test
    images); with a ``store`` the per-image results are cached (the images are re-rendered, bit-identical)."""
    def run() -> Interventions:
        return intervene(zero_shot_scorer(subject.clip, subject.tokenizer, subject.world.class_names),
                         subject.world, n, "test", FACTORS, seed)

    if store is None:
        return run()
    arrays = ("correct_base", "margin_base", "correct_edited", "drops")

    def build(d: Path) -> None:
        res = run()
        np.savez(d / "reliance.npz", **{k: getattr(res, k) for k in arrays})

    def load(d: Path) -> Interventions:
        data = np.load(d / "reliance.npz")
        base = subject.world.sample(n, "test", edit=prototypical(subject.world))
        return Interventions(base, FACTORS, *(data[k] for k in arrays))

    return store.get_or_build("verdict_reliance", {"subject": subject.key, "n": n, "seed": seed,
                                                   "factors": list(FACTORS)}, build, load)


def planted_check(truths: dict[str, Interventions], subjects: Sequence[Subject], blind_factor: str) -> pd.DataFrame:
    """Does the measurement recover each planted answer? Per model: the habitat's reliance and rank, and
    for blind models the blinded attribute's reliance and its percentile among the factors."""
    rows = []
    for s in subjects:
        rel = truths[s.name].reliance()
        row = {"model": s.name, "condition": s.condition, "base accuracy": truths[s.name].correct_base.mean(),
               "habitat reliance": rel["habitat"], "habitat rank": int((rel > rel["habitat"]).sum()) + 1,
               "largest part factor": rel.drop("habitat").max()}
        if s.condition == "blind":
            row["blinded factor reliance"] = rel[blind_factor]
            row["blinded factor percentile"] = _percentile(rel.to_numpy(), FACTORS.index(blind_factor))
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def planted_recovered(check: pd.DataFrame, truths: dict[str, Interventions] | None = None,
                      blind_factor: str | None = None, n_classes: int | None = None) -> dict[str, bool]:
    """The chapter's first check, in booleans: every shortcut model relies more on the habitat than every
    no-shortcut model; the blinded attribute sits in the lower half of the blind models' factors and (with
    ``truths``) every blind model relies on it less than every no-shortcut model; (with ``n_classes``)
    every planted model learned, its accuracy on prototypical images at least twice chance."""
    by = check.groupby("condition")["habitat reliance"]
    out = {"shortcut habitat > no-shortcut habitat": bool(by.min()["shortcut"] > by.max()["no-shortcut"])}
    if "blind" in set(check.condition):
        out["blinded factor in the lower half"] = bool((check["blinded factor percentile"].dropna() < 0.5).all())
        if truths is not None and blind_factor is not None:
            rel = {m: truths[m].reliance()[blind_factor] for m in check.index}
            blind = [rel[m] for m in check.index if check.condition[m] == "blind"]
            free = [rel[m] for m in check.index if check.condition[m] == "no-shortcut"]
            out["blinded factor: blind < no-shortcut reliance"] = bool(max(blind) < min(free))
    if n_classes is not None:
        out["every planted model learned (accuracy >= 2x chance)"] = bool(
            (check["base accuracy"] >= 2 / n_classes).all())
    return out


# ---------------------------------------------------------------------------- the protocol
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


def _has(batch: WorldBatch) -> np.ndarray:
    """(images, factors) bool: the image has the factor's part (always for the habitat)."""
    cols = [np.ones(len(batch), bool) if f == "habitat" else batch.present[:, PARTS.index(f.split()[0])]
            for f in FACTORS]
    return np.stack(cols, 1)


def per_model(scores: Sequence[float], batch: WorldBatch) -> np.ndarray:
    """A per-model claim (one score per factor) as an (images, factors) array, NaN for absent parts."""
    return np.where(_has(batch), np.asarray(scores, float)[None], np.nan)


# ---------------------------------------------------------------------------- conversions
def map_factor_scores(maps: np.ndarray | torch.Tensor, batch: WorldBatch) -> np.ndarray:
    """Explanation maps -> factor scores: the share of each map's (non-negative) energy on each part's
    mask, given to all three attributes of that part (a map cannot tell colour from pattern from size),
    and the share on the background, given to the habitat. Maps are resized to the image first."""
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32).clamp(min=0)[:, None]
    size = batch.masks.shape[-2:]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    maps = maps / (maps.sum((1, 2), keepdims=True) + 1e-12)
    part_share = (maps[:, None] * batch.masks).sum((2, 3))  # (N, parts)
    background = (maps * ~batch.masks.any(1)).sum((1, 2))
    cols = [background if f == "habitat" else part_share[:, PARTS.index(f.split()[0])] for f in FACTORS]
    return np.where(_has(batch), np.stack(cols, 1), np.nan)


def factor_phrase(world: ConceptWorld, c: int, factor: str) -> str:
    """A sentence stating class ``c``'s typical value of ``factor`` ("a zorbil with a red head.")."""
    spec = world.classes[c]
    if factor == "habitat":
        return f"a {spec.name} lives in the {spec.habitat}."
    part, attribute = factor.split()
    article = "" if part in ("legs", "wings") else "a "
    return f"a {spec.name} with {article}{spec.parts[part][attribute]} {part}."


def candidate_descriptions(world: ConceptWorld) -> pd.DataFrame:
    """EX2 stand-in's candidates: for each class, the class name alone and one sentence per factor its
    creature has (``factors`` lists what a sentence states). One factor per sentence keeps the text
    encoding cheap and makes a factor's mention rate its sentence's probability under the policy."""
    rows = []
    for c, spec in enumerate(world.classes):
        own = [f for f in FACTORS if f == "habitat" or f.split()[0] in spec.parts]
        rows.append({"class_index": c, "description": f"a photo of a {spec.name}.", "factors": ()})
        rows += [{"class_index": c, "description": factor_phrase(world, c, f), "factors": (f,)} for f in own]
    return pd.DataFrame(rows)


def mention_factor_scores(candidates: pd.DataFrame, rewards: np.ndarray, beta: float) -> np.ndarray:
    """EX2's claim -> factor scores: how often the aligned descriptions mention each factor.

    Stand-in for the RL-aligned language model: the optimum of KL-regularised reward maximisation
    over a uniform reference, ``pi(d | class) ~ exp(reward(d) / beta)`` over the candidates. Returns
    (classes, factors): the probability that a description of the class mentions the factor.
    """
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


def concept_factor_scores(contributions: np.ndarray, names: Sequence[str], labels: np.ndarray,
                          world: ConceptWorld) -> np.ndarray:
    """DN-CBM's claim -> factor scores: each image's concept contributions to its class (strength x probe
    weight) summed over the concepts whose name denotes the factor (split evenly where a name denotes
    several factors)."""
    out = np.zeros((len(labels), len(FACTORS)))
    for c in np.unique(labels):
        rows = labels == c
        for k, name in enumerate(names):
            factors = word_factors(name, world, c)
            for f in factors:
                out[rows, FACTORS.index(f)] += contributions[rows, k] / len(factors)
    return out


# ---------------------------------------------------------------------------- explainers
def truth_explainer(store=None, seed: int = 0) -> Explainer:
    """The planted 'explainer' that returns the measured reliance itself (and its map): the upper bound.
    It measures on the batch's own images (the first ``len(batch)`` prototypical test images)."""
    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        res = measure(subject, len(batch), seed, store)
        return Explanation(res.drops, reliance_maps(res))
    return explainer


def noise_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """Random scores and maps, seeded by the images alone: the chance level (and blind to the model)."""
    rng = np.random.default_rng(int(hashlib.sha256(batch.images.tobytes()).hexdigest()[:8], 16))
    maps = rng.random(batch.images.shape[:3])
    return Explanation(np.where(_has(batch), rng.random((len(batch), len(FACTORS))), np.nan), maps)


def _class_weights(subject: Subject) -> torch.Tensor:
    return class_text_weights(subject.clip, subject.tokenizer, subject.world.class_names)


def gradient_input_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """Plain gradient x input of the true class's zero-shot logit (|sum over channels|), as a map."""
    weights = _class_weights(subject)
    x = images_to_tensor(batch.images, subject.clip).requires_grad_(True)
    with torch.enable_grad():
        emb = F.normalize(subject.clip.encode_image(x), dim=-1)
        logit = (emb * weights[torch.as_tensor(batch.labels)]).sum()
        (grad,) = torch.autograd.grad(logit, x)
    maps = (grad * x).sum(1).abs().detach().numpy()
    return Explanation(map_factor_scores(maps, batch), maps)


def class_map_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """The model's explanation map of its class text (conceptlab.explain: relevance / Grad-CAM)."""
    from .explain import explain_batches

    weights = _class_weights(subject)[torch.as_tensor(batch.labels)][:, None]  # (N, 1, D)
    maps = explain_batches(subject.clip, images_to_tensor(batch.images, subject.clip), weights)[:, 0].numpy()
    return Explanation(map_factor_scores(maps, batch), maps)


def descriptor_map_explainer(subject: Subject, batch: WorldBatch, n_descriptors: int = 5) -> Explanation:
    """The maps of the class's descriptors (the world's oracle descriptors, bare text as DEAL explains
    them), each converted by :func:`map_factor_scores` and averaged; the map shown is their mean."""
    from .descriptors import oracle_descriptors
    from .explain import explain_batches
    from .models import encode_texts

    table = oracle_descriptors(subject.world).first(n_descriptors).descriptors
    texts = torch.stack([encode_texts(subject.clip, subject.tokenizer, table[name])
                         for name in subject.world.class_names])  # (classes, K, D)
    maps = explain_batches(subject.clip, images_to_tensor(batch.images, subject.clip),
                           texts[torch.as_tensor(batch.labels)]).numpy()  # (N, K, h, w)
    scores = np.mean([map_factor_scores(maps[:, k], batch) for k in range(maps.shape[1])], 0)
    return Explanation(scores, maps.mean(1))


def ex2_explainer(beta: float) -> Explainer:
    """EX2 with a stand-in for the aligned LM: mention rates of the factors under the reward's optimal
    policy (:func:`mention_factor_scores`), the reward being EX2's (:class:`conceptlab.ex2.CLIPReward`)."""
    from .ex2 import CLIPReward, world_class_embeddings

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        reward = CLIPReward(subject.clip, subject.tokenizer, world_class_embeddings(subject.clip, subject.world, 32))
        candidates = candidate_descriptions(subject.world)
        rewards = reward.scores(candidates.description.tolist(), candidates.class_index.tolist())
        per_class = mention_factor_scores(candidates, rewards, beta)
        return Explanation(np.where(_has(batch), per_class[batch.labels], np.nan))
    return explainer


def dncbm_explainer(n_corpus: int, epochs: int, lam: float) -> Explainer:
    """DN-CBM: an SAE on the model's embeddings of a world corpus, concepts named with the world's
    vocabulary, a sparse probe on concept strengths; contributions converted by :func:`concept_factor_scores`."""
    from .dncbm import embed_vocabulary, fit_probe, name_concepts, world_vocabulary
    from .sae import SAEConfig, encode_concepts, train_sae

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        corpus = subject.world.sample(n_corpus, "corpus")
        features = encode_images(subject.clip, corpus.images)
        torch.manual_seed(subject.seed)
        sae, _ = train_sae(features, SAEConfig(expansion=4, batch_size=256, epochs=epochs, resample_every=5),
                           progress=False)
        words = world_vocabulary(subject.world)
        names = name_concepts(sae.directions, embed_vocabulary(subject.clip, subject.tokenizer, words), words).name
        strengths = encode_concepts(sae, features).numpy()
        scale = np.maximum(strengths.max(0), 1e-6)
        probe = fit_probe(strengths / scale, corpus.labels, lam)
        z = encode_concepts(sae, encode_images(subject.clip, batch.images)).numpy() / scale
        contributions = z * probe.coef_[batch.labels]
        scores = concept_factor_scores(contributions, list(names), batch.labels, subject.world)
        return Explanation(np.where(_has(batch), scores, np.nan))
    return explainer


def tower_maps(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature maps LaViSE explains (N, C, h, w) and the image embeddings, from one forward pass.

    For a ResNet: the last stage (``layer4``), LaViSE's own target. For a ViT (our addition; LaViSE
    explains CNNs): the patch tokens entering the last block, laid out on the patch grid, the last
    place where patch tokens still reach the class token. Differentiable when grad is enabled.
    """
    visual = clip.visual
    if model_kind(clip) == "resnet":
        maps = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        return maps, visual.attnpool(maps)
    h = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        h = block(h)
    gh, gw = visual.grid_size
    maps = h[:, 1:].transpose(1, 2).reshape(len(h), -1, gh, gw)
    h = torch.cat([h[:, :1], maps.flatten(2).transpose(1, 2)], 1)  # the last block reads the maps themselves
    pooled, _ = visual._pool(visual.transformer.resblocks[-1](h))
    return maps, pooled @ visual.proj if visual.proj is not None else pooled


class _TowerFeatures(nn.Module):
    """:func:`tower_maps` as LaViSE's feature extractor (``{"features": maps}``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": tower_maps(self.clip, x)[0]}


def filter_relevance(clip: nn.Module, tokenizer, world: ConceptWorld, batch: WorldBatch
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, each filter's gradient x activation of the true class's zero-shot logit, summed over
    positions (N, C), and the feature maps (N, C, h, w): which filters the class decision uses."""
    weights = class_text_weights(clip, tokenizer, world.class_names)[torch.as_tensor(batch.labels)]
    with torch.enable_grad():
        maps, emb = tower_maps(clip, images_to_tensor(batch.images, clip))
        logit = (F.normalize(emb, dim=-1) * weights).sum()
        (grad,) = torch.autograd.grad(logit, maps)
    return (grad * maps).sum((-1, -2)).detach(), maps.detach()


def filter_factor_scores(relevance: torch.Tensor, words_per_filter: np.ndarray, concepts: Sequence,
                         labels: np.ndarray, world: ConceptWorld) -> np.ndarray:
    """LaViSE's claim -> factor scores: each image's most relevant filters (``words_per_filter`` (N, k, w):
    the concept indices that explain its top-k filters), the filter's (positive) relevance shared evenly
    over its words and credited to the factors each word denotes for the image's class (:func:`word_factors`)."""
    out = np.zeros((len(labels), len(FACTORS)))
    top = relevance.clamp(min=0).topk(words_per_filter.shape[1], dim=1).values.numpy()  # (N, k)
    for i, c in enumerate(labels):
        for weight, words in zip(top[i], words_per_filter[i]):
            for k in words:
                factors = word_factors(concepts[k].name, world, int(c))
                for f in factors:
                    out[i, FACTORS.index(f)] += weight / len(words) / len(factors)
    return out


def lavise_explainer(n_train: int = 1024, epochs: int = 5, n_filters: int = 5, n_words: int = 3,
                     act_q: float = 0.99) -> Explainer:
    """LaViSE on the vision tower (:func:`tower_maps`): an explainer head trained with CSMR on the model's
    own feature maps of ``n_train`` world images with concept masks, words embedded by the model's text
    tower; then each image's ``n_filters`` most relevant filters (:func:`filter_relevance`) explained by
    their ``n_words`` nearest words ("projection" masking) and converted by :func:`filter_factor_scores`.
    The head is retrained for every model (and every randomised copy), as LaViSE would be."""
    from .lavise import (
        ExplainerConfig,
        WorldImages,
        activation_thresholds,
        concept_examples,
        embed_concepts,
        filter_embedding,
        train_explainer,
        world_concepts,
    )

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        concepts = world_concepts(subject.world)
        words, _ = embed_concepts([c.name for c in concepts], "clip", subject.clip, subject.tokenizer)
        data = WorldImages(subject.world.sample(n_train, "train"), concepts, subject.world.class_names)
        seen = np.ones(len(concepts), bool)
        to_input = lambda im: images_to_tensor(im, subject.clip)  # noqa: E731
        pairs = concept_examples(_TowerFeatures(subject.clip), to_input, data, seen, progress=False)["area"]
        head, _ = train_explainer(*pairs, words, seen, ExplainerConfig(epochs=epochs, seed=subject.seed),
                                  progress=False)
        relevance, maps = filter_relevance(subject.clip, subject.tokenizer, subject.world, batch)
        thresholds = activation_thresholds(maps, act_q)
        top = relevance.topk(n_filters, dim=1).indices  # (N, k)
        with torch.no_grad():
            emb = torch.cat([filter_embedding(maps[i:i + 1], int(u), float(thresholds[u]))
                             for i in range(len(maps)) for u in top[i]])
            cos = F.normalize(head(emb), dim=-1) @ words.T
        nearest = cos.topk(n_words, dim=1).indices.view(len(maps), n_filters, n_words).numpy()
        scores = filter_factor_scores(relevance, nearest, concepts, batch.labels, subject.world)
        return Explanation(np.where(_has(batch), scores, np.nan))
    return explainer


def deal_explainer(store, steps: int, seed: int = 0, maps: str = "class") -> Explainer:
    """The class map (``maps="class"``) or the descriptor maps (``"descriptors"``) of a DEAL-tuned copy of
    the model (a short fine-tune on the world's oracle descriptors, cached in ``store``): does DEAL's
    training change what the maps claim?"""
    if maps not in ("class", "descriptors"):
        raise ValueError(f"maps={maps!r}: use 'class' or 'descriptors'.")
    explain_tuned = class_map_explainer if maps == "class" else descriptor_map_explainer
    from .artifacts import safe_torch_load
    from .deal import DealConfig, array_batches, train_deal
    from .descriptors import oracle_descriptors

    cfg = DealConfig(lr=1e-4, batch_size=16, steps=steps, seed=seed)

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        tuned = copy.deepcopy(subject.clip)
        stages = subject.key.get("randomised", 0)  # the randomisation check: randomise the tuned model
        key = {k: v for k, v in subject.key.items() if k != "randomised"}
        descriptors = oracle_descriptors(subject.world).descriptors
        train = subject.world.sample(256, "train")
        batches = array_batches(train.images, train.labels, cfg.batch_size, seed,
                                to_tensor=lambda im: images_to_tensor(im, tuned))

        def build(d: Path) -> None:
            if stages:
                raise RuntimeError("Explain the trained model before its randomised copies (DEAL tunes it first).")
            train_deal(tuned, subject.tokenizer, subject.world.class_names, descriptors, batches, cfg, d,
                       progress=False)

        state = store.get_or_build("verdict_deal", {"subject": key, "deal": asdict(cfg)}, build,
                                   lambda d: safe_torch_load(d / "model.pt"))
        tuned.load_state_dict(state)
        tuned = randomised(tuned, stages, seed) if stages else tuned.eval()
        return explain_tuned(replace(subject, clip=tuned), batch)
    return explainer


REFERENCES = ("truth (planted)", "noise")


def method_explainers(store, p: dict, yours: dict[str, Explainer] | None = None) -> dict[str, Explainer]:
    """The chapter's explainers from its parameters ``p``: the four methods (the DEAL-tuned rows only when
    ``deal_steps`` > 0), then ``yours`` (bring your own), then the references: truth and noise."""
    deal = {"class map (DEAL-tuned)": deal_explainer(store, p["deal_steps"], p["seed"]),
            "descriptor maps (DEAL-tuned)": deal_explainer(store, p["deal_steps"], p["seed"], maps="descriptors")}
    return {"class map (CLIP)": class_map_explainer, "descriptor maps (CLIP)": descriptor_map_explainer,
            **(deal if p["deal_steps"] else {}),
            "EX2 (reward-optimal stand-in)": ex2_explainer(p["ex2_beta"]),
            "DN-CBM": dncbm_explainer(p["sae_n_corpus"], p["sae_epochs"], p["probe_lambda"]),
            "LaViSE": lavise_explainer(p["lavise_n_train"], p["lavise_epochs"]),
            **(yours or {}), "truth (planted)": truth_explainer(store, p["seed"]), "noise": noise_explainer}


def lavise_target(clip: nn.Module) -> str:
    """What :func:`lavise_explainer` explains in this model, in words."""
    return "ResNet layer4 filters" if model_kind(clip) == "resnet" else \
        "ViT patch-token channels (our adaptation of LaViSE)"


# ---------------------------------------------------------------------------- the tests
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


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching rows of a and b (0 where a row is constant)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def agreement(scores: dict[str, np.ndarray], truths: dict[str, Interventions], conditions: dict[str, str],
              n_bootstrap: int = 200, seed: int = 0) -> dict:
    """(a) Spearman's rho between a method's mean factor scores and the measured reliance, per model, and its
    mean over models with a 95 % bootstrap interval: each resample draws the models of every condition
    (seeds) and, for each model, its images, both with replacement."""
    rng = np.random.default_rng(seed)
    names = list(scores)
    point = {}
    for m in names:
        s, t = np.nanmean(scores[m], 0), truths[m].reliance().to_numpy()
        ok = ~np.isnan(s) & ~np.isnan(t)
        point[m] = _spearman_rows(s[None, ok], t[None, ok])[0]
    groups = {}
    for m in names:
        groups.setdefault(conditions[m], []).append(m)
    boot = np.zeros(n_bootstrap)
    for b in range(n_bootstrap):
        picked = [g[i] for g in groups.values() for i in rng.integers(len(g), size=len(g))]
        rhos = []
        for m in picked:
            idx = rng.integers(len(scores[m]), size=len(scores[m]))
            with warnings.catch_warnings():  # a resample may miss every image with some part
                warnings.simplefilter("ignore", RuntimeWarning)
                s, t = np.nanmean(scores[m][idx], 0), np.nanmean(truths[m].drops[idx], 0)
            ok = ~np.isnan(s) & ~np.isnan(t)
            rhos.append(_spearman_rows(s[None, ok], t[None, ok])[0])
        boot[b] = np.mean(rhos)
    return {"rho": float(np.mean(list(point.values()))), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)), "per_model": point}


def per_class_agreement(scores: np.ndarray, res: Interventions) -> np.ndarray:
    """(a) per class: Spearman's rho between the method's mean factor scores and the measured reliance on
    the class's images alone (NaN for a class without images)."""
    labels = res.base.labels
    out = np.full(labels.max() + 1, np.nan)
    for c in np.unique(labels):
        with warnings.catch_warnings():  # a factor the class lacks is NaN on all its images
            warnings.simplefilter("ignore", RuntimeWarning)
            s, t = np.nanmean(scores[labels == c], 0), np.nanmean(res.drops[labels == c], 0)
        ok = ~np.isnan(s) & ~np.isnan(t)
        out[c] = _spearman_rows(s[None, ok], t[None, ok])[0]
    return out


def per_class_table(results: dict[str, MethodResult], truths: dict[str, Interventions],
                    class_names: Sequence[str]) -> pd.DataFrame:
    """Methods x classes: :func:`per_class_agreement` averaged over the models."""
    rows = {m: np.nanmean([per_class_agreement(r.explanations[s].scores, truths[s]) for s in r.explanations], 0)
            for m, r in results.items()}
    return pd.DataFrame(rows, index=list(class_names)).T


def _percentile(values: np.ndarray, j: int) -> float:
    """Share of the other (defined) factors that score below factor j (ties count half)."""
    v = values[~np.isnan(values)] if not np.isnan(values[j]) else None
    if v is None or len(v) < 2:
        return 0.5
    return float(((v < values[j]).sum() + 0.5 * ((v == values[j]).sum() - 1)) / (len(v) - 1))


def shortcut_detection(scores: dict[str, np.ndarray], conditions: dict[str, str], blind_factor: str) -> dict:
    """(b) Does the method rank the habitat higher for every shortcut model than for every no-shortcut
    model (share of such pairs, ties half), and the blinded attribute low for blind models (1 minus its
    percentile among the factors)? The score is the mean of the two parts that apply; chance is 0.5."""
    pct = {m: _percentile(np.nanmean(s, 0), 0) for m, s in scores.items()}
    short = [pct[m] for m in scores if conditions[m] == "shortcut"]
    free = [pct[m] for m in scores if conditions[m] == "no-shortcut"]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in short for b in free]
    out = {"habitat_pairs": float(np.mean(pairs)) if pairs else float("nan")}
    j = FACTORS.index(blind_factor)
    blind = [1 - _percentile(np.nanmean(s, 0), j) for m, s in scores.items() if conditions[m] == "blind"]
    out["blind_low"] = float(np.mean(blind)) if blind else float("nan")
    out["score"] = float(np.nanmean([out["habitat_pairs"], out["blind_low"]]))
    return out


def localisation(maps: np.ndarray | None, res: Interventions) -> float:
    """(d) Mean over images of the Pearson correlation between the method's map (resized to the image)
    and :func:`reliance_maps`; NaN for methods without maps."""
    if maps is None:
        return float("nan")
    truth = reliance_maps(res)
    m = torch.as_tensor(np.asarray(maps), dtype=torch.float32)[:, None]
    m = F.interpolate(m, size=truth.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
    a = m.reshape(len(m), -1) - m.reshape(len(m), -1).mean(1, keepdims=True)
    b = truth.reshape(len(truth), -1) - truth.reshape(len(truth), -1).mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    return float(np.divide((a * b).sum(1), den, out=np.zeros(len(a)), where=den > 0).mean())


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


def randomisation_check(explainer: Explainer, subject: Subject, batch: WorldBatch, seed: int = 0,
                        cascade: Sequence[int] | None = None) -> pd.DataFrame:
    """(c) Adebayo et al.'s model randomisation test: re-initialise the vision tower stage by stage from
    the top and compare the explanation with the trained model's: Spearman's rho of the mean factor
    scores and (for maps) the mean per-image rho of the maps. An explanation that stays the same fails.
    ``cascade``: the numbers of top stages to re-initialise (default: each in turn, down to the stem)."""
    stages = vision_stages(subject.clip)
    ref = explainer(subject, batch)
    rows = []
    for k in sorted({min(c, len(stages)) for c in cascade or range(1, len(stages) + 1)}):
        stage = stages[k - 1]
        rnd = replace(subject, clip=randomised(subject.clip, k, seed), key={**subject.key, "randomised": k})
        out = explainer(rnd, batch)
        a, b = np.nanmean(ref.scores, 0), np.nanmean(out.scores, 0)
        ok = ~np.isnan(a) & ~np.isnan(b)
        rho = rank_correlation(a[ok], b[ok])
        if rho is None:  # a constant side: the same explanation if nothing changed, else unrelated
            rho = 1.0 if np.allclose(a[ok], b[ok]) else 0.0
        row = {"stages re-initialised": k, "top stage": stage.split("|")[0].rstrip("."), "score rho": rho}
        if ref.maps is not None:
            row["map rho"] = float(_spearman_rows(_resized(ref.maps), _resized(out.maps)).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _resized(maps: np.ndarray, size: int = 16) -> np.ndarray:
    m = torch.as_tensor(np.asarray(maps), dtype=torch.float32)[:, None]
    return F.adaptive_avg_pool2d(m, size)[:, 0].reshape(len(m), -1).numpy()


def randomisation_score(check: pd.DataFrame) -> float:
    """1 minus the mean similarity over the cascade (map rho where the method has maps, else score rho),
    negative similarities counted as 0: 1 = the explanation follows the weights, 0 = it ignores them."""
    col = "map rho" if "map rho" in check else "score rho"
    return float(1 - check[col].clip(lower=0).mean())


# ---------------------------------------------------------------------------- the scoreboard
@dataclass
class MethodResult:
    """One method's explanations of every subject and its test results."""

    explanations: dict[str, Explanation]
    tests: dict[str, float]
    details: dict


def score_method(explainer: Explainer, subjects: Sequence[Subject], truths: dict[str, Interventions],
                 p: dict, random_subject: Subject | None = None) -> MethodResult:
    """Run one explainer on every subject and compute the tests (a)-(d)."""
    expl = {s.name: explainer(s, truths[s.name].base) for s in subjects}
    conditions = {s.name: s.condition for s in subjects}
    scores = {m: e.scores for m, e in expl.items()}
    a = agreement(scores, truths, conditions, p["n_bootstrap"], p["seed"])
    b = shortcut_detection(scores, conditions, p["blind_factor"])
    random_subject = random_subject or subjects[0]
    batch = truths[random_subject.name].base
    check = randomisation_check(explainer, random_subject, batch.first(p["n_random_images"]), p["seed"],
                                p["cascade"])
    d = [localisation(e.maps, truths[m]) for m, e in expl.items()]
    tests = {TESTS[0]: a["rho"], TESTS[1]: b["score"], TESTS[2]: randomisation_score(check),
             TESTS[3]: float(np.mean(d))}
    return MethodResult(expl, tests, {"agreement": a, "shortcut": b, "randomisation": check.to_dict("list"),
                                      "localisation_per_model": d})


def scoreboard(results: dict[str, MethodResult]) -> pd.DataFrame:
    """Methods x tests."""
    return pd.DataFrame({m: r.tests for m, r in results.items()}).T[list(TESTS)]


def conclusion(board: pd.DataFrame, reference: Sequence[str] = REFERENCES,
               intervals: pd.DataFrame | None = None) -> str:
    """The chapter's verdict in words, written from the scoreboard (never by hand). Chance on a test is
    its nominal level or, if higher, the ``"noise"`` explainer's score (the chance a finite set of images
    and models leaves). A method is clearly above chance when it beats that by 0.1, and on (a), given the
    bootstrap ``intervals`` (columns ``low``, ``high``), when its 95 % interval lies above it."""
    methods = board.drop(index=[r for r in reference if r in board.index])
    lines = []
    for test in TESTS:
        col = methods[test].dropna()
        if col.empty:
            continue
        noise = board.loc["noise", test] if "noise" in board.index else np.nan
        best, chance = col.idxmax(), max(CHANCE[test], noise) if noise == noise else CHANCE[test]
        if test == TESTS[0] and intervals is not None:
            above = [m for m in col.index if intervals.loc[m, "low"] > chance]
        else:
            above = [m for m in col.index if col[m] > chance + 0.1]
        verb = "is" if len(above) == 1 else "are"
        lines.append(f"On {test}, {best} does best ({col[best]:.2f}; chance {chance:.2f}); "
                     + (f"{len(above)} of {len(col)} methods {verb} clearly above chance."
                        if above else "no method is clearly above chance."))
    fails = [m for m in methods.index if methods.loc[m, TESTS[2]] < 0.2]
    if fails:
        lines.append(f"{', '.join(fails)} {'barely changes' if len(fails) == 1 else 'barely change'} when the "
                     "model's weights are randomised, so "
                     f"{'its explanation says' if len(fails) == 1 else 'their explanations say'} little about "
                     "this model.")
    mean = methods[list(TESTS[:3])].sub(pd.Series(CHANCE)[list(TESTS[:3])]).mean(axis=1)
    lines.append(f"Over tests (a)-(c), the method furthest above chance is {mean.idxmax()} "
                 f"(mean margin {mean.max():.2f}); the one closest to chance is {mean.idxmin()} "
                 f"({mean.min():.2f}).")
    if "truth (planted)" in board.index:
        lines.append(f"For scale: the measured reliance itself scores {board.loc['truth (planted)', TESTS[0]]:.2f} "
                     f"on (a) and {board.loc['truth (planted)', TESTS[1]]:.2f} on (b)"
                     + (f", and noise {board.loc['noise', TESTS[0]]:.2f} and {board.loc['noise', TESTS[1]]:.2f}."
                        if "noise" in board.index else "."))
    return " ".join(lines)


def heatmap(frame: pd.DataFrame, label: str, vmin: float | None = None, vmax: float | None = None):
    """A table as a heatmap with its numbers (the scoreboard, the measured reliance)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * frame.shape[1] + 3), 0.45 * len(frame) + 1.8))
    sns.heatmap(frame.astype(float), annot=True, fmt=".2f", cmap="RdYlGn", vmin=vmin, vmax=vmax, ax=ax,
                cbar_kws={"label": label}, annot_kws={"size": 8})
    ax.set_xlabel("")
    ax.set_ylabel("")
    fig.tight_layout()
    return fig


def worst_classes(per_class: pd.DataFrame, reference: Sequence[str] = REFERENCES) -> str:
    """A sentence naming, for each method, the class where it agrees least with the measurement."""
    rows = per_class.drop(index=[r for r in reference if r in per_class.index])
    return "Classes where a method disagrees most with the measurement: " + ", ".join(
        f"{m}: {row.idxmin()} ({row.min():.2f})" for m, row in rows.iterrows() if row.notna().any()) + "."


# ---------------------------------------------------------------------------- exercises
def _chapter_models(ch) -> tuple[list[Subject], dict[str, Interventions], dict[str, str]]:
    """The chapter's planted models and their measured reliance, loaded from the store."""
    p = ch.params
    subjects = planted_models(ch.store, ch.world_cfg, ch.train_cfg, p, progress=False)
    truths = {s.name: measure(s, p["n_images"], p["seed"], ch.store) for s in subjects}
    return subjects, truths, {s.name: s.condition for s in subjects}


def _two_tests(scores: dict[str, np.ndarray], truths, conditions, p: dict) -> dict[str, float]:
    a = agreement(scores, truths, conditions, p["n_bootstrap"], p["seed"])
    b = shortcut_detection(scores, conditions, p["blind_factor"])
    return {TESTS[0]: a["rho"], "(a) low": a["low"], "(a) high": a["high"], TESTS[1]: b["score"]}


def exercise_ex2_beta(ch, ex2_beta: float | None = None) -> dict[str, float]:
    """EX2's stand-in at another KL coefficient: tests (a) and (b), and the habitat's mention rate."""
    subjects, truths, conditions = _chapter_models(ch)
    beta = ex2_beta or ch.params["ex2_beta"]
    scores = {s.name: ex2_explainer(beta)(s, truths[s.name].base).scores for s in subjects}
    habitat = {c: float(np.mean([np.nanmean(scores[m][:, 0]) for m in scores if conditions[m] == c]))
               for c in ("shortcut", "no-shortcut")}
    return {**_two_tests(scores, truths, conditions, ch.params), "habitat mention, shortcut": habitat["shortcut"],
            "habitat mention, no-shortcut": habitat["no-shortcut"]}


def exercise_noisy_truth(ch, noise_level: float = 0.0) -> dict[str, float]:
    """The true reliance plus Gaussian noise of ``noise_level`` times its own spread, as an explainer."""
    _, truths, conditions = _chapter_models(ch)
    rng = np.random.default_rng(ch.params["seed"])
    scores = {m: t.drops + noise_level * np.nanstd(t.drops) * rng.standard_normal(t.drops.shape)
              for m, t in truths.items()}
    return _two_tests(scores, truths, conditions, ch.params)


def exercise_fewer_images(ch, n_images: int | None = None) -> dict[str, float]:
    """The CLIP class map's agreement and its bootstrap interval when every model is measured and explained
    on ``n_images`` images."""
    p = {**ch.params, **({"n_images": n_images} if n_images else {})}
    subjects = planted_models(ch.store, ch.world_cfg, ch.train_cfg, p, progress=False)
    truths = {s.name: measure(s, p["n_images"], p["seed"], ch.store) for s in subjects}
    scores = {s.name: class_map_explainer(s, truths[s.name].base).scores for s in subjects}
    out = _two_tests(scores, truths, {s.name: s.condition for s in subjects}, p)
    return {**out, "interval width": out["(a) high"] - out["(a) low"]}
