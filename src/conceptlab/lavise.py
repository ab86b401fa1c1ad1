"""LaViSE: explain the filters of a CNN with words (METHODS.md section 4) — the method, as a library.

1. Concepts with masks. On Concept World every concept (parts, colours, patterns, sizes,
   part-attribute pairs such as "red head", habitats on the background, class names on the
   creature) has an exact mask in every image (:class:`WorldImages`); on the real path the
   concepts are the categories of a COCO-format data set (:class:`conceptlab.data.coco.CocoImages`).
   An annotation rate splits them into seen and unseen (:func:`split_seen`); unseen concepts are
   never used in training. Words are embedded by :func:`embed_concepts`.
2. Explainer. The frozen CNN up to the target layer, its feature map multiplied by a concept's
   mask (resized to the map), average-pooled (:func:`concept_examples`), then a small head
   (:class:`ExplainerHead`) trained with the cosine margin ranking loss (:func:`csmr_loss`) to land
   near the concept's word embedding (:func:`train_explainer`). As in the original code, the
   head's BatchNorm layers stay in eval mode while it trains (``bn_eval``, :func:`set_bn_eval`).
3. Filter explanation (:func:`explain_filters`): a filter's top-activating images, its embedding
   by the original code's default "projection" (the feature map weighted by the filter's own
   normalised map: filter attention) or by "activation" masking (the map above the ``act_q``
   quantile), the words nearest to the head's prediction, and the ground truth: concepts whose
   mask has IoU with the filter's region above a threshold.
4. Measures and references: recall@k (:func:`pair_recall`, :func:`recall_at_k`), its chance
   (:func:`chance_recall`), Network Dissection (:func:`dissect`), random scores.

Every function takes tensors, models and configs; the chapter (``conceptlab.chapters.lavise``)
is one client of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from tqdm.auto import tqdm

from .cnn import CNNInput, world_resnet18
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, WorldBatch

CONCEPT_GROUPS: tuple[str, ...] = ("part", "colour", "pattern", "size", "part attribute", "habitat", "class")
MASKINGS: tuple[str, ...] = ("projection", "activation")
MASK_RESIZES: tuple[str, ...] = ("area", "nearest")


# ---------------------------------------------------------------------------- concepts
@dataclass(frozen=True)
class Concept:
    """A word (or a few) with a mask in every annotated image.

    On the world, ``part`` and ``attribute``/``value`` say which part pixels carry it; habitats
    cover the background, class names the whole creature. On COCO a concept is a category.
    """

    name: str
    group: str
    part: str | None = None
    attribute: str | None = None
    value: str | None = None


def world_concepts(world: ConceptWorld) -> list[Concept]:
    """The concept vocabulary of a world, group by group (see :data:`CONCEPT_GROUPS`)."""
    out = [Concept(p, "part", part=p) for p in PARTS]
    for attribute, values in ATTRIBUTES.items():
        out += [Concept(v, attribute, attribute=attribute, value=v) for v in values]
    out += [
        Concept(f"{v} {p}", "part attribute", part=p, attribute=a, value=v)
        for p in PARTS
        for a, values in ATTRIBUTES.items()
        for v in values
    ]
    out += [Concept(h, "habitat", value=h) for h in HABITATS]
    out += [Concept(c, "class", value=c) for c in world.class_names]
    return out


def region_masks(batch: WorldBatch, idx: np.ndarray | None = None, size: int | None = None) -> np.ndarray:
    """(n, len(PARTS) + 1, size, size) bool: the visible pixels of each part, then the background.

    The regions are disjoint (parts occlude each other), so every concept mask is a union,
    hence a sum, of regions: see :func:`concept_composition`. ``size`` subsamples the masks
    (nearest pixel) to a divisor of the image size.
    """
    parts = batch.masks if idx is None else batch.masks[np.asarray(idx)]
    full = parts.shape[-1]
    if size is not None and size != full:
        if full % size:
            raise ValueError(f"iou_size={size} must divide the image size {full}.")
        parts = parts[..., :: full // size, :: full // size]
    return np.concatenate([parts, ~parts.any(1, keepdims=True)], axis=1)


def concept_composition(
    batch: WorldBatch, concepts: Sequence[Concept], class_names: Sequence[str], idx: np.ndarray | None = None
) -> np.ndarray:
    """(n, K, len(PARTS) + 1) float 0/1: which regions of each image make up each concept's mask."""
    idx = np.arange(len(batch)) if idx is None else np.asarray(idx)
    attrs, n = batch.attributes[idx], len(idx)
    out = np.zeros((n, len(concepts), len(PARTS) + 1), dtype=np.float32)
    attr_keys = list(ATTRIBUTES)
    for k, c in enumerate(concepts):
        if c.group == "habitat":
            out[:, k, -1] = batch.habitats[idx] == HABITATS.index(c.value)
        elif c.group == "class":
            out[:, k, :-1] = (batch.labels[idx] == list(class_names).index(c.value))[:, None]
        else:
            on_part = np.ones((n, len(PARTS)), dtype=bool)
            if c.attribute is not None:
                on_part = attrs[:, :, attr_keys.index(c.attribute)] == ATTRIBUTES[c.attribute].index(c.value)
            if c.part is not None:
                on_part = on_part & (np.arange(len(PARTS)) == PARTS.index(c.part))[None]
            out[:, k, :-1] = on_part
    return out


def concept_masks(
    batch: WorldBatch, concepts: Sequence[Concept], class_names: Sequence[str], idx: np.ndarray | None = None
) -> np.ndarray:
    """(n, K, H, W) bool masks of every concept on images ``idx`` of ``batch`` (all if None)."""
    regions = torch.from_numpy(region_masks(batch, idx)).float()
    comp = torch.from_numpy(concept_composition(batch, concepts, class_names, idx))
    return (torch.einsum("nkr,nrhw->nkhw", comp, regions) > 0).numpy()


def split_seen(concepts: Sequence[Concept], annotation_rate: float, seed: int = 0) -> np.ndarray:
    """(K,) bool: the concepts annotated for training, ``annotation_rate`` of each group (at least one)."""
    if not 0 < annotation_rate <= 1:
        raise ValueError(
            f"annotation_rate={annotation_rate} must lie in (0, 1]: the share of concepts seen in training."
        )
    rng = np.random.default_rng(seed)
    groups = np.array([c.group for c in concepts])
    seen = np.zeros(len(concepts), dtype=bool)
    for g in dict.fromkeys(groups):
        members = np.flatnonzero(groups == g)
        n_seen = min(len(members), max(1, round(annotation_rate * len(members))))
        seen[rng.choice(members, size=n_seen, replace=False)] = True
    return seen


# ---------------------------------------------------------------------------- annotated images
class ConceptImages(Protocol):
    """Images with a mask for every concept, as regions composed into concepts.

    ``regions(idx, size)`` (n, R, s, s) bool and ``composition(idx)`` (n, K, R) 0/1 give the
    concept masks as sums of regions; region-level arithmetic keeps IoUs cheap for many concepts.
    """

    concepts: list[Concept]

    def __len__(self) -> int: ...

    def images(self, idx: np.ndarray) -> np.ndarray: ...

    def regions(self, idx: np.ndarray, size: int | None = None) -> np.ndarray: ...

    def composition(self, idx: np.ndarray) -> np.ndarray: ...

    def with_concepts(self, keep: np.ndarray) -> ConceptImages: ...


@dataclass
class WorldImages:
    """Concept World images with the exact masks of ``concepts`` (a :class:`ConceptImages`)."""

    batch: WorldBatch
    concepts: list[Concept]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.batch)

    def images(self, idx: np.ndarray) -> np.ndarray:
        return self.batch.images[np.asarray(idx)]

    def regions(self, idx: np.ndarray, size: int | None = None) -> np.ndarray:
        return region_masks(self.batch, idx, size)

    def composition(self, idx: np.ndarray) -> np.ndarray:
        return concept_composition(self.batch, self.concepts, self.class_names, idx)

    def with_concepts(self, keep: np.ndarray) -> WorldImages:
        """The same images with the concepts where ``keep`` is true."""
        return WorldImages(self.batch, [c for c, k in zip(self.concepts, keep) if k], self.class_names)


# ---------------------------------------------------------------------------- embeddings
def embed_concepts(
    names: Sequence[str],
    source: str = "clip",
    clip: nn.Module | None = None,
    tokenizer=None,
    template: str = "{}",
    seed: int = 0,
) -> tuple[torch.Tensor, np.ndarray]:
    """``(words, keep)``: L2-normalised word embeddings (K', e) of the names where ``keep`` (K,) is true.

    ``source``: ``"clip"`` (the text encoder of ``clip``, on ``template.format(name)``),
    ``"glove:<file>"`` (multi-word names average their words; names without any vector are
    dropped with a note), ``"sentence-transformers:<model>"``, or ``"random"`` (seeded Gaussian
    vectors: an embedding space without semantics).
    """
    every = np.ones(len(names), dtype=bool)
    if source == "clip":
        if clip is None or tokenizer is None:
            raise ValueError("embedding='clip' needs the CLIP model and its tokenizer.")
        from .models import encode_texts

        return encode_texts(clip, tokenizer, [template.format(n) for n in names]), every
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        return F.normalize(torch.randn(len(names), 128, generator=gen), dim=-1), every
    if source.startswith("glove:"):
        from .data.glove import glove_embeddings

        return glove_embeddings(names, source.removeprefix("glove:"))
    if source.startswith("sentence-transformers:"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                "embedding='sentence-transformers:...' needs the optional package "
                "sentence-transformers (pip install sentence-transformers) and a local model "
                "folder; or use embedding='clip' or 'glove:<file>'."
            ) from err
        model = SentenceTransformer(source.removeprefix("sentence-transformers:"), device="cpu")
        return F.normalize(torch.as_tensor(model.encode(list(names))), dim=-1), every
    raise ValueError(f"embedding={source!r}: use 'clip', 'glove:<file>', 'sentence-transformers:<model>' or 'random'.")


# ---------------------------------------------------------------------------- features
def layer_names(model: nn.Module) -> set[str]:
    """Every name ``feature_extractor`` accepts for ``model``: FX node names and module names."""
    return set(get_graph_node_names(model)[1]) | set(dict(model.named_modules()))


def feature_extractor(model: nn.Module, layer: str) -> nn.Module:
    """The frozen CNN up to ``layer`` (a module name such as ``"layer4"`` or an FX node name)."""
    if layer not in layer_names(model):
        blocks = [n for n, _ in model.named_children()]
        raise ValueError(f"target_layer={layer!r} is not a layer of this CNN; top-level layers: {blocks}.")
    return create_feature_extractor(model.eval(), return_nodes={layer: "features"}).eval()


def target_architecture(target_model: str, n_classes: int = 10) -> nn.Module:
    """The target CNN's architecture without weights: the world ResNet-18 or a torchvision model."""
    if target_model == "world":
        return world_resnet18(n_classes)
    return torchvision.models.get_model(target_model, weights=None)


@torch.no_grad()
def layer_features(
    extractor: nn.Module,
    to_input: CNNInput,
    data: ConceptImages,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """(N, C, h, w) target-layer activations of every image of ``data`` (on the CPU)."""
    extractor = extractor.to(device)
    chunks = range(0, len(data), batch_size)
    return torch.cat(
        [
            extractor(to_input(data.images(np.arange(s, min(s + batch_size, len(data))))).to(device))["features"].cpu()
            for s in tqdm(chunks, disable=not progress, desc="features")
        ]
    )


def resize_masks(masks: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Masks (n, K, H, W) resized to the feature map: ``"area"`` averages (a soft mask), ``"nearest"``
    samples one pixel per cell (the original's hard mask)."""
    if mode not in MASK_RESIZES:
        raise ValueError(f"mask_resize={mode!r}: use one of {MASK_RESIZES}.")
    if mode == "area":
        return F.adaptive_avg_pool2d(masks.float(), size)
    return F.interpolate(masks.float(), size=size, mode="nearest")


def masked_pool(features: torch.Tensor, masks: torch.Tensor, mode: str = "area") -> torch.Tensor:
    """Feature maps (n, C, h, w) times masks (n, K, H, W) resized to (h, w), average-pooled: (n, K, C).

    As in LaViSE, the pool divides by the map's size, not the mask's, so the head also sees how
    large the region is.
    """
    small = resize_masks(masks, features.shape[-2:], mode)
    return torch.einsum("nchw,nkhw->nkc", features, small) / (features.shape[-1] * features.shape[-2])


@torch.no_grad()
def concept_examples(
    extractor: nn.Module,
    to_input: CNNInput,
    data: ConceptImages,
    keep: np.ndarray,
    min_pixels: int = 8,
    batch_size: int = 128,
    modes: Sequence[str] = ("area",),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Training pairs of the explainer per mask-resize mode: pooled features ``x`` (M, C) and concept ids ``y``.

    One pair per image and concept with at least ``min_pixels`` mask pixels, for concepts with ``keep``;
    one pass of the CNN serves every mode in ``modes``.
    """
    xs: dict[str, list] = {m: [] for m in modes}
    ys = []
    extractor = extractor.to(device)
    for s in tqdm(range(0, len(data), batch_size), disable=not progress, desc="concept features"):
        idx = np.arange(s, min(s + batch_size, len(data)))
        regions = torch.from_numpy(data.regions(idx)).float()
        comp = torch.from_numpy(data.composition(idx))
        feats = extractor(to_input(data.images(idx)).to(device))["features"].cpu()
        area = comp @ regions.sum((-1, -2))[..., None]
        use = (area[..., 0] >= min_pixels) & torch.from_numpy(keep)[None]
        for m in modes:
            xs[m].append((comp @ masked_pool(feats, regions, m))[use])  # (b, K, C) -> (pairs, C)
        ys.append(use.nonzero()[:, 1])
    y = torch.cat(ys)
    return {m: (torch.cat(xs[m]), y) for m in modes}


# ---------------------------------------------------------------------------- explainer
class ExplainerHead(nn.Sequential):
    """LaViSE's head: BN, Dropout, Linear d->d, ReLU, BN, Dropout, Linear d->e."""

    def __init__(self, d: int, e: int, dropout: float = 0.1) -> None:
        super().__init__(
            nn.BatchNorm1d(d),
            nn.Dropout(dropout),
            nn.Linear(d, d),
            nn.ReLU(),
            nn.BatchNorm1d(d),
            nn.Dropout(dropout),
            nn.Linear(d, e),
        )


def set_bn_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``module`` in eval mode (the original's ``set_bn_eval``): they
    normalise with their running statistics, which therefore never change while training."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def csmr_loss(pred: torch.Tensor, target: torch.Tensor, words: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Cosine margin ranking loss: sum over wrong words w of max(0, margin - cos(p, t) + cos(p, w)), mean over p.

    ``pred`` (n, e) predictions, ``target`` (n,) indices into ``words`` (V, e), unit-norm rows.
    """
    cos = F.normalize(pred, dim=-1) @ words.T
    pos = cos.gather(1, target[:, None])
    hinge = (margin - pos + cos).clamp(min=0)
    return hinge.scatter(1, target[:, None], 0.0).sum(1).mean()


@dataclass(frozen=True)
class ExplainerConfig:
    """Training of the explainer head (Adam and ReduceLROnPlateau as in LaViSE).

    ``bn_eval``: the head's BatchNorm layers in eval mode while training, as the original code.
    """

    epochs: int = 10
    batch_size: int = 1024  # large batches: the head trains in seconds on a CPU
    lr: float = 1e-3
    margin: float = 1.0
    dropout: float = 0.1
    val_fraction: float = 0.1
    bn_eval: bool = True
    seed: int = 0


def train_explainer(
    x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, seen: np.ndarray, cfg: ExplainerConfig, progress: bool = True
) -> tuple[ExplainerHead, list[dict]]:
    """Train a head mapping pooled features ``x`` to the embedding ``words[y]`` with CSMR.

    ``y`` indexes all concepts, ``words`` (K, e) embeds them all; only the ``seen`` words
    take part in the loss, so unseen concepts are never used in training.
    """
    if not seen[y.numpy()].all():
        raise ValueError("Training pairs contain unseen concepts: build them with keep=seen.")
    to_seen = torch.full((len(seen),), -1, dtype=torch.long)
    to_seen[torch.from_numpy(np.flatnonzero(seen))] = torch.arange(int(seen.sum()))
    y, words = to_seen[y], words[torch.from_numpy(seen)]
    if len(x) < 10:
        raise ValueError(f"Only {len(x)} training pairs: raise n_explain or lower min_pixels.")
    torch.manual_seed(cfg.seed)
    perm = torch.randperm(len(x))
    n_val = max(1, int(cfg.val_fraction * len(x)))
    val, train = perm[:n_val], perm[n_val:]
    head = ExplainerHead(x.shape[1], words.shape[1], cfg.dropout)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=2)
    history = []
    for epoch in tqdm(range(cfg.epochs), disable=not progress, desc="train explainer"):
        head.train()
        if cfg.bn_eval:
            set_bn_eval(head)
        order = train[torch.randperm(len(train))]
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            b = order[s : s + cfg.batch_size]
            if len(b) < 2:  # BatchNorm in train mode needs two samples
                continue
            loss = csmr_loss(head(x[b]), y[b], words, cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        head.eval()
        with torch.no_grad():
            pred = head(x[val])
            val_loss = csmr_loss(pred, y[val], words, cfg.margin).item()
            val_top1 = ((F.normalize(pred, dim=-1) @ words.T).argmax(1) == y[val]).float().mean().item()
        plateau.step(val_loss)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_top1": val_top1,
                "lr": opt.param_groups[0]["lr"],
            }
        )
    return head.eval(), history


# ---------------------------------------------------------------------------- filters
def activation_thresholds(features: torch.Tensor, act_q: float) -> np.ndarray:
    """(C,) per filter: the ``act_q`` quantile of its activations over all images and positions."""
    if not 0 < act_q < 1:
        raise ValueError(f"act_q={act_q} must lie in (0, 1), e.g. 0.99.")
    flat = features.transpose(0, 1).reshape(features.shape[1], -1).numpy()
    return np.quantile(flat, act_q, axis=1).astype(np.float32)


def activation_regions(maps: torch.Tensor, thresholds: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Maps (n, C, h, w) upsampled bilinearly to ``size`` and thresholded per filter: (n, C, size, size) bool."""
    up = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return up > torch.as_tensor(thresholds).view(1, -1, 1, 1)


def region_overlaps(act: torch.Tensor, regions: torch.Tensor, comp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Intersections (n, U, K), activation areas (n, U) and concept areas (n, K) of activation regions
    ``act`` (n, U, H, W) with the concept masks made of ``regions`` (n, R, H, W) by ``comp`` (n, K, R)."""
    a = act.flatten(2).float()
    r = regions.flatten(2).float()
    inter = (a @ r.transpose(1, 2)) @ comp.transpose(1, 2)
    return inter, a.sum(-1), (comp @ r.sum(-1)[..., None])[..., 0]


def filter_embedding(maps: torch.Tensor, u: int, threshold: float, masking: str = "projection") -> torch.Tensor:
    """(T, C) what the head reads for filter ``u`` on maps (T, C, h, w).

    ``"projection"`` (the original code's default, "filter attention"): every channel weighted by
    the filter's own map divided by its L2 norm, averaged over positions. ``"activation"``: every
    channel masked by the positions where the filter exceeds ``threshold``, averaged likewise.
    """
    c = maps[:, u]
    if masking == "activation":
        return (maps * (c > threshold)[:, None]).mean((-1, -2))
    if masking == "projection":
        return (maps * (c / c.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None])[:, None]).mean((-1, -2))
    raise ValueError(f"masking={masking!r}: use one of {MASKINGS}.")


@dataclass
class FilterExplanations:
    """Per explained filter and top image: predicted concept scores and mask-IoU ground truth."""

    filters: np.ndarray  # (F,) filter index
    top_images: np.ndarray  # (F, T) image index, most activating first
    top_activation: np.ndarray  # (F, T) max activation of the filter on that image
    thresholds: np.ndarray  # (C,) act_q quantile per filter
    scores: np.ndarray  # (F, T, K) cosine of the predicted embedding with every concept
    ious: np.ndarray  # (F, T, K) IoU of the filter's region with every concept mask
    ground_truth: np.ndarray  # (F, T, K) bool: ious above the IoU threshold


@torch.no_grad()
def filter_scores(
    features: torch.Tensor,
    expl: FilterExplanations,
    head: ExplainerHead,
    words: torch.Tensor,
    masking: str = "projection",
) -> np.ndarray:
    """(F, T, K) cosine of the head's prediction for each filter and top image with every word."""
    out = []
    for u, top in zip(expl.filters, expl.top_images):
        emb = head(filter_embedding(features[top], int(u), float(expl.thresholds[u]), masking))
        out.append((F.normalize(emb, dim=-1) @ words.T).numpy())
    return np.stack(out)


def rescore(
    expl: FilterExplanations, features: torch.Tensor, head: ExplainerHead, words: torch.Tensor, masking: str
) -> FilterExplanations:
    """The same filters, images and ground truth, scored by another head, embedding or masking."""
    return replace(expl, scores=filter_scores(features, expl, head, words, masking))


@torch.no_grad()
def explain_filters(
    features: torch.Tensor,
    data: ConceptImages,
    head: ExplainerHead,
    words: torch.Tensor,
    act_q: float = 0.99,
    n_top: int = 5,
    iou_threshold: float = 0.2,
    masking: str = "projection",
    filters: np.ndarray | None = None,
    iou_size: int | None = None,
    progress: bool = True,
) -> FilterExplanations:
    """LaViSE's filter explanation on the images ``data`` whose target-layer maps are ``features``.

    ``words`` (K, e) embeds all concepts, seen and unseen: the predicted words are ranked among all.
    The ground truth of a filter on an image: the concepts whose mask has IoU above
    ``iou_threshold`` with the filter's region (its map above the ``act_q`` quantile), computed
    at ``iou_size`` pixels a side (the image size if None).
    """
    thresholds = activation_thresholds(features, act_q)
    peak = features.amax((-1, -2))  # (N, C)
    live = np.flatnonzero(peak.amax(0).numpy() > thresholds)
    filters = live if filters is None else np.intersect1d(np.asarray(filters), live)
    size = iou_size or data.images(np.arange(1)).shape[1]
    tops, acts, ious = [], [], []
    for u in tqdm(filters, disable=not progress, desc="explain filters"):
        top = peak[:, u].topk(min(n_top, len(peak))).indices.numpy()
        region = activation_regions(features[top][:, [u]], thresholds[[u]], size)  # (T, 1, H, W)
        inter, act_area, concept_area = region_overlaps(
            region, torch.from_numpy(data.regions(top, size)), torch.from_numpy(data.composition(top))
        )
        ious.append((inter[:, 0] / (act_area + concept_area - inter[:, 0]).clamp(min=1)).numpy())
        tops.append(top)
        acts.append(peak[top, u].numpy())
    ious_arr = np.stack(ious) if ious else np.zeros((0, n_top, len(data.concepts)), dtype=np.float32)
    expl = FilterExplanations(
        np.asarray(filters),
        np.stack(tops) if tops else np.zeros((0, n_top), int),
        np.stack(acts) if acts else np.zeros((0, n_top)),
        thresholds,
        np.zeros_like(ious_arr),
        ious_arr,
        ious_arr > iou_threshold,
    )
    return rescore(expl, features, head, words, masking)


@torch.no_grad()
def dissect(
    features: torch.Tensor,
    data: ConceptImages,
    thresholds: np.ndarray,
    iou_size: int | None = None,
    chunk: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Network Dissection: (C, K) data-set IoU of each filter's thresholded regions with each concept's masks.

    IoU(u, k) = sum over images of ``|region ∩ mask|`` / sum of ``|region ∪ mask|``; uses every annotation.
    """
    n, c = features.shape[:2]
    size = iou_size or data.images(np.arange(1)).shape[1]
    inter = torch.zeros(c, len(data.concepts), dtype=torch.float64)
    region_area = torch.zeros(c, dtype=torch.float64)
    mask_area = torch.zeros(len(data.concepts), dtype=torch.float64)
    for s in tqdm(range(0, n, chunk), disable=not progress, desc="dissect"):
        idx = np.arange(s, min(s + chunk, n))
        i, a, m = region_overlaps(
            activation_regions(features[idx], thresholds, size),
            torch.from_numpy(data.regions(idx, size)),
            torch.from_numpy(data.composition(idx)),
        )
        inter += i.sum(0).double()
        region_area += a.sum(0).double()
        mask_area += m.sum(0).double()
    union = region_area[:, None] + mask_area[None] - inter
    return (inter / union.clamp(min=1)).float().numpy()


# ---------------------------------------------------------------------------- metrics
KS: tuple[int, ...] = (5, 10, 20)


def pair_recall(scores: np.ndarray, ground_truth: np.ndarray, subset: np.ndarray, k: int) -> np.ndarray:
    """Recall@k per (filter, image) pair: the share of its ground-truth concepts in ``subset`` that are
    ranked in the top k of all concepts. ``scores``, ``ground_truth``: (..., K); returns (...) with NaN
    where a pair has no ground-truth concept in ``subset``."""
    s = scores.reshape(-1, scores.shape[-1])
    g = ground_truth.reshape(-1, ground_truth.shape[-1]) & subset[None]
    hit = np.zeros_like(g)
    np.put_along_axis(hit, np.argsort(-s, axis=1, kind="stable")[:, :k], True, axis=1)
    n = g.sum(1)
    out = np.full(len(g), np.nan)
    out[n > 0] = (hit & g).sum(1)[n > 0] / n[n > 0]
    return out.reshape(scores.shape[:-1])


def recall_at_k(scores: np.ndarray, ground_truth: np.ndarray, subset: np.ndarray, k: int) -> float:
    """Mean over (filter, image) pairs of :func:`pair_recall`; pairs without a ground-truth concept in
    ``subset`` are skipped (NaN when no pair has one)."""
    r = pair_recall(scores, ground_truth, subset, k)
    r = r[np.isfinite(r)]
    return float(r.mean()) if len(r) else float("nan")


def chance_recall(k: int, n_concepts: int) -> float:
    """Expected recall@k of a random ranking of ``n_concepts`` words: each ground-truth concept lands in
    the top k with probability k / K, whichever subset (seen, unseen) the recall is taken over."""
    return min(k, n_concepts) / n_concepts


def recall_row(
    scores: np.ndarray, ground_truth: np.ndarray, seen: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """``{"R@k seen": ..., "R@k unseen": ...}`` for every k."""
    return {
        f"R@{k} {label}": recall_at_k(scores, ground_truth, subset, k)
        for label, subset in (("seen", seen), ("unseen", ~seen))
        for k in ks
    }


def chance_scores(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random concept scores: the recall of a ranking that knows nothing."""
    return np.random.default_rng(seed).random(shape)


def filter_labels(
    expl: FilterExplanations, dissection_iou: np.ndarray, concepts: Sequence[Concept], seen: np.ndarray
) -> pd.DataFrame:
    """One row per explained filter: the explainer's word (top-1 of the mean score over its top images),
    the dissection label (highest data-set IoU) and whether they agree."""
    names = np.array([c.name for c in concepts])
    groups = np.array([c.group for c in concepts])
    explainer = expl.scores.mean(1).argmax(1)
    dissection = dissection_iou[expl.filters].argmax(1)
    top3 = np.argsort(-expl.scores.mean(1), axis=1)[:, :3]
    return pd.DataFrame(
        {
            "filter": expl.filters,
            "explainer word": names[explainer],
            "explainer top-3": [", ".join(names[t]) for t in top3],
            "dissection concept": names[dissection],
            "dissection group": groups[dissection],
            "dissection IoU": dissection_iou[expl.filters, dissection],
            "dissection concept seen": seen[dissection],
            "agree": explainer == dissection,
            "dissection in explainer top-3": (top3 == dissection[:, None]).any(1),
        }
    )
