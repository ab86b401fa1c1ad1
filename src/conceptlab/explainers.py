"""The four methods (and references) as verdict explainers: ``explainer(subject, batch) -> Explanation``.

Each explainer turns a method's own output into factor scores through the conversion of
:mod:`conceptlab.verdict` that matches what the method states (maps per region, names per factor).
A :class:`Method` bundles an explainer with its granularity, its conversion's null and what it explains.
The feature maps that LaViSE explains are read with a forward hook (:func:`tower_maps`), through
open_clip's public modules only.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import ArtifactStore, params_key
from .explain import explain_batches, model_kind
from .models import class_text_weights, encode_images, encode_texts, images_to_tensor
from .reliance import FACTORS
from .sae import tensor_fingerprint
from .verdict import (
    Explainer,
    Explanation,
    MapFn,
    Subject,
    candidate_descriptions,
    concept_factor_scores,
    factor_present,
    map_factor_scores,
    measure,
    mention_factor_scores,
    reliance_maps,
    silhouette_maps,
    vocabulary_prior,
    word_factors,
)
from .world import WorldBatch

Null = Callable[[Subject, WorldBatch], dict[str, np.ndarray]]  # named uninformative inputs -> factor scores


@dataclass(frozen=True)
class Method:
    """An explainer as the verdict scores it: ``granularity`` ("region" for maps, "factor" for words and
    descriptions), ``null`` (its conversion fed with uninformative inputs: named factor scores; the
    verdict takes the one that agrees best with the truth, the strongest null), ``explains``
    (what it explains, in words) and ``first_stage`` (the first re-initialised stage count of the
    randomisation cascade that reaches what it explains: LaViSE explains a layer, not the output).
    ``config``: everything besides the model and the images that makes its explanations (JSON-able);
    with it, :func:`explain_cached` keeps them in the artifact store; without it (your own explainer
    unless you give one) they are recomputed on every run."""

    explain: Explainer
    granularity: str
    explains: str
    null: Null | None = None
    first_stage: Callable[[nn.Module], int] | None = None
    config: Mapping[str, Any] | None = None

    def counted_from(self, clip: nn.Module) -> int:
        return 1 if self.first_stage is None else self.first_stage(clip)


def explain_cached(store: ArtifactStore | None, method: Method, subject: Subject, batch: WorldBatch) -> Explanation:
    """``method.explain(subject, batch)``, its factor scores kept in ``store`` (kind ``verdict_explanation``)
    when the method states its ``config``: keyed by that config, the subject's key (a DEAL-tuned or
    re-initialised copy has its own) and the content of the images and labels. The cached explanation
    holds the scores only (the scoreboard's input), not the maps."""
    if store is None or method.config is None:
        return method.explain(subject, batch)
    key = {
        "method": dict(method.config),
        "subject": subject.key,
        "images": tensor_fingerprint(torch.from_numpy(batch.images)),
        "labels": tensor_fingerprint(torch.from_numpy(batch.labels)),
    }

    def build(d: Path) -> None:
        np.save(d / "scores.npy", method.explain(subject, batch).scores)

    return store.get_or_build("verdict_explanation", key, build, lambda d: Explanation(np.load(d / "scores.npy")))


# ---------------------------------------------------------------------------- nulls
def map_null(subject: Subject, batch: WorldBatch) -> dict[str, np.ndarray]:
    """The map conversion's nulls: a uniform map, and a map that only knows the creature's silhouette."""
    return {
        "uniform map": map_factor_scores(np.ones(batch.images.shape[:3]), batch),
        "silhouette map": map_factor_scores(silhouette_maps(batch), batch),
    }


def ranking_null(subject: Subject, batch: WorldBatch, beta: float = 1.0) -> dict[str, np.ndarray]:
    """The reward ranking's null: a flat reward (every candidate alike) through the same policy."""
    candidates = candidate_descriptions(subject.world)
    flat = mention_factor_scores(candidates, np.zeros(len(candidates)), beta)
    return {"flat reward": np.where(factor_present(batch), flat[batch.labels], np.nan)}


def words_null(vocabulary: Callable[[Subject], list[str]]) -> Null:
    """A word conversion's null: words drawn uniformly from the method's vocabulary (:func:`vocabulary_prior`)."""

    def null(subject: Subject, batch: WorldBatch) -> dict[str, np.ndarray]:
        prior = vocabulary_prior(vocabulary(subject), batch.labels, subject.world)
        return {"vocabulary prior": np.where(factor_present(batch), prior, np.nan)}

    return null


# ---------------------------------------------------------------------------- references
def truth_explainer(store=None, seed: int = 0) -> Explainer:
    """The planted 'explainer' that returns the measured reliance itself (and its map): the upper bound.
    It measures on the batch's own images (the first ``len(batch)`` prototypical test images)."""

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        res = measure(subject, len(batch), seed, store)
        return Explanation(res.drops, reliance_maps(res))

    return explainer


def noise_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """Random scores and maps, a fresh draw per model (seeded by its key and the images): chance."""
    digest = hashlib.sha256(json.dumps(subject.key, sort_keys=True, default=str).encode() + batch.images.tobytes())
    rng = np.random.default_rng(int(digest.hexdigest()[:8], 16))
    maps = rng.random(batch.images.shape[:3])
    return Explanation(np.where(factor_present(batch), rng.random((len(batch), len(FACTORS))), np.nan), maps)


# ---------------------------------------------------------------------------- maps
def _class_weights(subject: Subject) -> torch.Tensor:
    return class_text_weights(subject.clip, subject.tokenizer, subject.world.class_names)


def class_maps(clip: nn.Module, images: torch.Tensor, texts: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """The class map explainer on preprocessed images: each image's map of its own text feature
    (``texts[i]``, e.g. its class's zero-shot weight), by :func:`conceptlab.explain.explain_batches`."""
    return explain_batches(clip, images, texts[:, None], batch_size)[:, 0].numpy()


def gradient_input_maps(clip: nn.Module, images: torch.Tensor, texts: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Plain gradient x input of each image's logit for its own text feature (absolute channel sum), (N, S, S)."""
    dev, out = next(clip.parameters()).device, []
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(dev).detach().requires_grad_(True)
        with torch.enable_grad():
            emb = F.normalize(clip.encode_image(x), dim=-1)
            (grad,) = torch.autograd.grad((emb * texts[s : s + batch_size].to(dev)).sum(), x)
        out.append((grad * x).sum(1).abs().detach().cpu())
    return torch.cat(out).numpy()


MODEL_ONLY_MAPS: dict[str, MapFn] = {"class map": class_maps, "gradient × input": gradient_input_maps}
"""The map explainers whose model-only checks run on any CLIP (:func:`conceptlab.verdict.model_only_check`)."""


def gradient_input_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """Plain gradient x input of the true class's zero-shot logit (absolute channel sum), as a map."""
    weights = _class_weights(subject)[torch.as_tensor(batch.labels)]
    maps = gradient_input_maps(subject.clip, images_to_tensor(batch.images, subject.clip), weights, len(batch))
    return Explanation(map_factor_scores(maps, batch), maps)


def class_map_explainer(subject: Subject, batch: WorldBatch) -> Explanation:
    """The model's explanation map of its class text (conceptlab.explain: relevance / Grad-CAM)."""
    weights = _class_weights(subject)[torch.as_tensor(batch.labels)]  # (N, D)
    maps = class_maps(subject.clip, images_to_tensor(batch.images, subject.clip), weights)
    return Explanation(map_factor_scores(maps, batch), maps)


def descriptor_map_explainer(subject: Subject, batch: WorldBatch, n_descriptors: int = 5) -> Explanation:
    """The maps of the class's descriptors (the world's oracle descriptors, bare text as DEAL explains
    them), each converted by :func:`~conceptlab.verdict.map_factor_scores` and averaged."""
    from .descriptors import oracle_descriptors

    table = oracle_descriptors(subject.world).first(n_descriptors).descriptors
    texts = torch.stack(
        [encode_texts(subject.clip, subject.tokenizer, table[name]) for name in subject.world.class_names]
    )  # (classes, K, D)
    maps = explain_batches(
        subject.clip, images_to_tensor(batch.images, subject.clip), texts[torch.as_tensor(batch.labels)]
    ).numpy()  # (N, K, h, w)
    scores = np.mean([map_factor_scores(maps[:, k], batch) for k in range(maps.shape[1])], 0)
    return Explanation(scores, maps.mean(1))


def deal_subject(store, subject: Subject, steps: int, seed: int = 0, n_train: int = 256) -> Subject:
    """A DEAL-tuned copy of ``subject`` (a short fine-tune on the world's oracle descriptors, cached in
    ``store``): the model the DEAL rows explain, and whose own reliance they are scored against."""
    from .artifacts import safe_torch_load
    from .deal import DealConfig, array_batches, train_deal
    from .descriptors import oracle_descriptors

    cfg = DealConfig(lr=1e-4, batch_size=16, steps=steps, seed=seed)
    tuned = copy.deepcopy(subject.clip)
    key = {"subject": subject.key, "deal": asdict(cfg), "n_train": n_train}

    def build(d: Path) -> None:
        train = subject.world.sample(n_train, "train")
        batches = array_batches(
            train.images, train.labels, cfg.batch_size, seed, to_tensor=lambda im: images_to_tensor(im, tuned)
        )
        train_deal(
            tuned,
            subject.tokenizer,
            subject.world.class_names,
            oracle_descriptors(subject.world).descriptors,
            batches,
            cfg,
            d,
            progress=False,
        )

    tuned.load_state_dict(store.get_or_build("verdict_deal", key, build, lambda d: safe_torch_load(d / "model.pt")))
    return replace(subject, clip=tuned.eval(), key={**subject.key, "deal": key["deal"], "deal_n_train": n_train})


# ---------------------------------------------------------------------------- a reward ranking (EX2's objective)
def reward_ranking_explainer(beta: float) -> Explainer:
    """KL-optimal reward ranking: the mention rates of the factors under the policy that EX2's objective
    converges to (:func:`~conceptlab.verdict.mention_factor_scores`), over true one-factor sentences
    written from the world, with EX2's reward (:class:`conceptlab.ex2.CLIPReward`). Not EX2: no language
    model, no RL, no judge, no spurious or false candidates."""
    from .ex2 import CLIPReward, world_class_embeddings

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        reward = CLIPReward(subject.clip, subject.tokenizer, world_class_embeddings(subject.clip, subject.world, 32))
        candidates = candidate_descriptions(subject.world)
        rewards = reward.scores(candidates.description.tolist(), candidates.class_index.tolist())
        per_class = mention_factor_scores(candidates, rewards, beta)
        return Explanation(np.where(factor_present(batch), per_class[batch.labels], np.nan))

    return explainer


# ---------------------------------------------------------------------------- DN-CBM
def dncbm_vocabulary(subject: Subject) -> list[str]:
    """The words DN-CBM names its concepts from on the world (chapter 5's world vocabulary)."""
    from .dncbm import world_vocabulary

    return list(world_vocabulary(subject.world))


def dncbm_explainer(n_corpus: int, sae_cfg, probe, scale: str = "unit_rms") -> Explainer:
    """DN-CBM as chapter 5 runs it: an SAE (``sae_cfg``, a :class:`conceptlab.sae.SAEConfig`) on the model's
    embeddings of a world corpus scaled by :func:`conceptlab.dncbm.feature_scale` (``scale``), concepts named
    with the world's vocabulary, the method's sparse probe (``probe``: a :class:`conceptlab.dncbm.ProbeConfig`)
    on concept strengths; each image's contributions (strength x weight) converted by ``concept_factor_scores``."""
    from .dncbm import embed_vocabulary, feature_scale, fit_probe, name_concepts
    from .sae import encode_concepts, train_sae

    corpora: dict[str, WorldBatch] = {}  # the corpus of a world, rendered once for all its models and copies

    def explainer(subject: Subject, batch: WorldBatch) -> Explanation:
        world = params_key(subject.world.config)
        if world not in corpora:
            corpora[world] = subject.world.sample(n_corpus, "corpus")
        corpus = corpora[world]
        features = encode_images(subject.clip, corpus.images)
        c = feature_scale(features, scale)
        torch.manual_seed(subject.seed)
        sae, _ = train_sae(features * c, replace(sae_cfg, seed=subject.seed), progress=False)
        words = dncbm_vocabulary(subject)
        names = name_concepts(sae.directions, embed_vocabulary(subject.clip, subject.tokenizer, words), words).name
        strengths = encode_concepts(sae, features * c).numpy()
        weights = fit_probe(strengths, corpus.labels, probe).coef_
        z = encode_concepts(sae, encode_images(subject.clip, batch.images) * c).numpy()
        scores = concept_factor_scores(z * weights[batch.labels], list(names), batch.labels, subject.world)
        return Explanation(np.where(factor_present(batch), scores, np.nan))

    return explainer


# ---------------------------------------------------------------------------- LaViSE
def tower_maps(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(maps, embeddings, hooked)`` from one ``clip.encode_image``: the feature maps LaViSE explains
    (N, C, h, w), the image embeddings, and the hooked tensor itself (for gradients; ``maps`` is a view
    of it). For a ResNet: the output of ``layer4``, LaViSE's own target. For a ViT (our adaptation;
    LaViSE explains CNNs): the patch tokens entering the last block, on the patch grid, read by a forward
    pre-hook on that block (no private open_clip internals)."""
    visual, captured = clip.visual, {}  # type: ignore[var-annotated]
    if model_kind(clip) == "resnet":
        handle = visual.layer4.register_forward_hook(lambda m, args, out: captured.setdefault("x", out))
    else:
        handle = visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda m, args: captured.setdefault("x", args[0])
        )
    try:
        emb = clip.encode_image(images)
    finally:
        handle.remove()
    return _as_maps(clip, captured["x"]), emb, captured["x"]


def _as_maps(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The hooked tensor as (N, C, h, w): a ResNet's map as it is; a ViT's patch tokens on their grid."""
    if model_kind(clip) == "resnet":
        return x
    if not getattr(clip.visual.transformer, "batch_first", True):
        x = x.transpose(0, 1)
    gh, gw = clip.visual.grid_size
    return x[:, -gh * gw :].transpose(1, 2).reshape(len(x), -1, gh, gw)


def lavise_first_stage(clip: nn.Module) -> int:
    """The first cascade count that re-initialises a stage at or below the layer LaViSE explains
    (a ViT: the blocks below the last; a ResNet: ``layer4``)."""
    return 2 if model_kind(clip) == "resnet" else 3


class _TowerFeatures(nn.Module):
    """:func:`tower_maps` as LaViSE's feature extractor (``{"features": maps}``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": tower_maps(self.clip, x)[0]}


def filter_relevance(clip: nn.Module, tokenizer, class_names, batch: WorldBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, each filter's gradient x activation of the true class's zero-shot logit, summed over
    positions (N, C), and the feature maps (N, C, h, w): which filters the class decision uses."""
    weights = class_text_weights(clip, tokenizer, class_names)[torch.as_tensor(batch.labels)]
    with torch.enable_grad():
        maps, emb, hooked = tower_maps(clip, images_to_tensor(batch.images, clip))
        logit = (F.normalize(emb, dim=-1) * weights).sum()
        (grad,) = torch.autograd.grad(logit, hooked)
    return (_as_maps(clip, grad) * maps).sum((-1, -2)).detach(), maps.detach()


def filter_factor_scores(
    relevance: torch.Tensor, words_per_filter: np.ndarray, names: list[str], labels: np.ndarray, world
) -> np.ndarray:
    """LaViSE's claim -> factor scores: each image's most relevant filters (``words_per_filter`` (N, k, w):
    indices into ``names`` of the words that explain its top-k filters), the filter's (positive) relevance
    shared evenly over its words and credited to the factors each word denotes for the image's class."""
    out = np.zeros((len(labels), len(FACTORS)))
    top = relevance.clamp(min=0).topk(words_per_filter.shape[1], dim=1).values.numpy()  # (N, k)
    for i, c in enumerate(labels):
        for weight, words in zip(top[i], words_per_filter[i]):
            for k in words:
                factors = word_factors(names[k], world, int(c))
                for f in factors:
                    out[i, FACTORS.index(f)] += weight / len(words) / len(factors)
    return out


def lavise_vocabulary(subject: Subject) -> list[str]:
    """The words LaViSE's head chooses from on the world (chapter 6's world concepts)."""
    from .lavise import world_concepts

    return [c.name for c in world_concepts(subject.world)]


def lavise_explainer(
    n_train: int = 1024, epochs: int = 5, n_filters: int = 5, n_words: int = 3, act_q: float = 0.99
) -> Explainer:
    """LaViSE on the vision tower (:func:`tower_maps`): an explainer head trained with CSMR on the model's
    own feature maps of ``n_train`` world images with concept masks, words embedded by the model's text
    tower; then each image's ``n_filters`` most relevant filters (:func:`filter_relevance`) explained by
    their ``n_words`` nearest words ("projection" masking), converted by :func:`filter_factor_scores`.
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
        names = [c.name for c in concepts]
        words, _ = embed_concepts(names, "clip", subject.clip, subject.tokenizer)
        data = WorldImages(subject.world.sample(n_train, "train"), concepts, subject.world.class_names)
        seen = np.ones(len(concepts), bool)
        to_input = lambda im: images_to_tensor(im, subject.clip)  # noqa: E731
        pairs = concept_examples(_TowerFeatures(subject.clip), to_input, data, seen, progress=False)["area"]
        x, y = pairs
        head, _ = train_explainer(x, y, words, seen, ExplainerConfig(epochs=epochs, seed=subject.seed), progress=False)
        relevance, maps = filter_relevance(subject.clip, subject.tokenizer, subject.world.class_names, batch)
        thresholds = activation_thresholds(maps, act_q)
        top = relevance.topk(n_filters, dim=1).indices  # (N, k)
        with torch.no_grad():
            emb = torch.cat(
                [
                    filter_embedding(maps[i : i + 1], int(u), float(thresholds[u]))
                    for i in range(len(maps))
                    for u in top[i]
                ]
            )
            cos = F.normalize(head(emb), dim=-1) @ words.T
        nearest = cos.topk(n_words, dim=1).indices.view(len(maps), n_filters, n_words).numpy()
        scores = filter_factor_scores(relevance, nearest, names, batch.labels, subject.world)
        return Explanation(np.where(factor_present(batch), scores, np.nan))

    return explainer


def lavise_target(clip: nn.Module) -> str:
    """What :func:`lavise_explainer` explains in this model, in words."""
    return (
        "ResNet layer4 filters"
        if model_kind(clip) == "resnet"
        else "ViT patch-token channels entering the last block (our adaptation of LaViSE)"
    )


# ---------------------------------------------------------------------------- the methods
def map_method(explainer: Explainer, explains: str, config: Mapping[str, Any] | None = None) -> Method:
    """A map explainer scored per region, with the silhouette map as its null."""
    return Method(explainer, "region", explains, map_null, config=config)


def dncbm_method(n_corpus: int, sae_cfg, probe, scale: str = "unit_rms") -> Method:
    return Method(
        dncbm_explainer(n_corpus, sae_cfg, probe, scale),
        "factor",
        "the model's image embeddings, through chapter 5's SAE and sparse probe",
        words_null(dncbm_vocabulary),
        config={
            "explainer": "DN-CBM",
            "n_corpus": n_corpus,
            "sae": asdict(sae_cfg),
            "probe": asdict(probe),
            "scale": scale,
        },
    )


def lavise_method(n_train: int, epochs: int) -> Method:
    return Method(
        lavise_explainer(n_train, epochs),
        "factor",
        "filters of the vision tower, in words",
        words_null(lavise_vocabulary),
        lavise_first_stage,
        {"explainer": "LaViSE", "n_train": n_train, "epochs": epochs},
    )


def reward_ranking_method(beta: float) -> Method:
    return Method(
        reward_ranking_explainer(beta),
        "factor",
        "the text tower's reward on true one-factor sentences (no language model)",
        lambda s, b: ranking_null(s, b, beta),
        config={"explainer": "KL-optimal reward ranking", "beta": beta},
    )


__all__ = [
    "MODEL_ONLY_MAPS",
    "Method",
    "class_map_explainer",
    "class_maps",
    "deal_subject",
    "descriptor_map_explainer",
    "dncbm_explainer",
    "dncbm_method",
    "dncbm_vocabulary",
    "explain_cached",
    "filter_factor_scores",
    "filter_relevance",
    "gradient_input_explainer",
    "gradient_input_maps",
    "lavise_explainer",
    "lavise_first_stage",
    "lavise_method",
    "lavise_target",
    "lavise_vocabulary",
    "map_method",
    "map_null",
    "noise_explainer",
    "ranking_null",
    "reward_ranking_explainer",
    "reward_ranking_method",
    "tower_maps",
    "truth_explainer",
    "words_null",
]
