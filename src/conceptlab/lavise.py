"""LaViSE: explain the filters of a CNN with words (METHODS.md section 4).

1. Concepts with masks: every Concept World concept (parts, colours, patterns, sizes,
   part-attribute pairs such as "red head", habitats on the background, class names on
   the creature) has a segmentation mask in every image (:func:`world_concepts`,
   :func:`concept_masks`). An annotation rate splits them into seen and unseen
   (:func:`split_seen`); unseen concepts are never used in training.
2. Explainer: the frozen CNN up to the target layer, the feature map multiplied by a
   concept's mask (resized to the map), average-pooled, then a small head
   (:class:`ExplainerHead`) trained with the cosine margin ranking loss (:func:`csmr_loss`)
   to land near the concept's word embedding (:func:`embed_concepts`).
3. Filter explanation (:func:`explain_filters`): a filter's top-activating images, its
   region (map above the ``act_q`` quantile of its activations over the data set), the
   words nearest to the embedding the head predicts for the masked map, and the ground
   truth: concepts whose mask has IoU with the region above a threshold.
4. Baselines: Network Dissection (:func:`dissect`, the concept whose masks best match a
   filter's regions over the data set) and chance rankings; random features come from
   running the same pipeline on a randomly initialised CNN or with random word vectors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, atomic_write_json, params_key, safe_torch_load
from .cnn import CNNInput
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, WorldBatch

CONCEPT_GROUPS: tuple[str, ...] = ("part", "colour", "pattern", "size", "part attribute", "habitat", "class")


# ---------------------------------------------------------------------------- concepts
@dataclass(frozen=True)
class Concept:
    """A word (or two) with a mask in every world image.

    ``part`` and ``attribute``/``value`` say which part pixels carry it; habitats cover
    the background, class names the whole creature.
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
    out += [Concept(f"{v} {p}", "part attribute", part=p, attribute=a, value=v)
            for p in PARTS for a, values in ATTRIBUTES.items() for v in values]
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


def concept_composition(batch: WorldBatch, concepts: Sequence[Concept], class_names: Sequence[str],
                        idx: np.ndarray | None = None) -> np.ndarray:
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


def concept_masks(batch: WorldBatch, concepts: Sequence[Concept], class_names: Sequence[str],
                  idx: np.ndarray | None = None) -> np.ndarray:
    """(n, K, H, W) bool masks of every concept on images ``idx`` of ``batch`` (all if None)."""
    regions = torch.from_numpy(region_masks(batch, idx)).float()
    comp = torch.from_numpy(concept_composition(batch, concepts, class_names, idx))
    return (torch.einsum("nkr,nrhw->nkhw", comp, regions) > 0).numpy()


def split_seen(concepts: Sequence[Concept], annotation_rate: float, seed: int = 0) -> np.ndarray:
    """(K,) bool: the concepts annotated for training, ``annotation_rate`` of each group (at least one)."""
    if not 0 < annotation_rate <= 1:
        raise ValueError(f"annotation_rate={annotation_rate} must lie in (0, 1]: "
                         "the share of concepts seen in training.")
    rng = np.random.default_rng(seed)
    groups = np.array([c.group for c in concepts])
    seen = np.zeros(len(concepts), dtype=bool)
    for g in dict.fromkeys(groups):
        members = np.flatnonzero(groups == g)
        n_seen = min(len(members), max(1, round(annotation_rate * len(members))))
        seen[rng.choice(members, size=n_seen, replace=False)] = True
    return seen


# ---------------------------------------------------------------------------- embeddings
def load_glove(path: str | Path, words: set[str]) -> dict[str, np.ndarray]:
    """Vectors of ``words`` from a GloVe-format text file (``word v1 v2 ...`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GloVe vectors at {path}: pass embedding='glove:<path to vectors.txt>'.")
    found: dict[str, np.ndarray] = {}
    with open(path, encoding="utf8") as f:
        for line_no, line in enumerate(f, 1):
            word, _, rest = line.rstrip().partition(" ")
            if word in words:
                try:
                    found[word] = np.array(rest.split(), dtype=np.float32)
                except ValueError as err:
                    raise ValueError(f"{path}:{line_no} is not 'word number number ...' (GloVe format).") from err
    dims = {v.shape[0] for v in found.values()}
    if len(dims) > 1:
        raise ValueError(f"{path} has vectors of different lengths {sorted(dims)}.")
    return found


def embed_concepts(names: Sequence[str], source: str = "clip", clip: nn.Module | None = None,
                   tokenizer=None, template: str = "{}", seed: int = 0) -> torch.Tensor:
    """(K, e) L2-normalised word embeddings of concept names.

    ``source``: ``"clip"`` (the text encoder of ``clip``, on ``template.format(name)``),
    ``"glove:<file>"`` (multi-word names average their words), ``"sentence-transformers:<model>"``,
    or ``"random"`` (seeded Gaussian vectors: an embedding space without semantics).
    """
    if source == "clip":
        if clip is None or tokenizer is None:
            raise ValueError("embedding='clip' needs the CLIP model and its tokenizer.")
        from .models import encode_texts

        return encode_texts(clip, tokenizer, [template.format(n) for n in names])
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        return F.normalize(torch.randn(len(names), 128, generator=gen), dim=-1)
    if source.startswith("glove:"):
        vectors = load_glove(source.removeprefix("glove:"), {w for n in names for w in n.split()})
        missing = sorted({w for n in names for w in n.split()} - set(vectors))
        if missing:
            raise ValueError(f"The GloVe file has no vector for {missing[:10]} ({len(missing)} words); "
                             "use a larger vocabulary file or remove those concepts.")
        return F.normalize(torch.from_numpy(np.stack([np.mean([vectors[w] for w in n.split()], 0) for n in names])),
                           dim=-1)
    if source.startswith("sentence-transformers:"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError("embedding='sentence-transformers:...' needs the optional package "
                              "sentence-transformers (pip install sentence-transformers) and a local model "
                              "folder; or use embedding='clip' or 'glove:<file>'.") from err
        model = SentenceTransformer(source.removeprefix("sentence-transformers:"), device="cpu")
        return F.normalize(torch.as_tensor(model.encode(list(names))), dim=-1)
    raise ValueError(f"embedding={source!r}: use 'clip', 'glove:<file>', 'sentence-transformers:<model>' or 'random'.")


# ---------------------------------------------------------------------------- features
def feature_extractor(model: nn.Module, layer: str) -> nn.Module:
    """The frozen CNN up to ``layer`` (a module name such as ``"layer4"`` or an FX node name)."""
    nodes = get_graph_node_names(model)[1]
    modules = [name for name, _ in model.named_children()]
    if layer not in nodes and layer not in dict(model.named_modules()):
        blocks = [n for n in modules if n]
        raise ValueError(f"target_layer={layer!r} is not a layer of this CNN; top-level layers: {blocks}.")
    return create_feature_extractor(model.eval(), return_nodes={layer: "features"}).eval()


@torch.no_grad()
def layer_features(extractor: nn.Module, to_input: CNNInput, images: np.ndarray, batch_size: int = 128,
                   progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) target-layer activations of uint8 images."""
    chunks = range(0, len(images), batch_size)
    return torch.cat([extractor(to_input(images[s:s + batch_size]))["features"]
                      for s in tqdm(chunks, disable=not progress, desc="features")])


def masked_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Feature maps (n, C, h, w) times masks (n, K, H, W) resized to (h, w), average-pooled: (n, K, C).

    Masks are resized by area averaging (a soft mask); as in LaViSE, the pool divides by the
    map's size, not the mask's, so the head also sees how large the region is.
    """
    small = F.adaptive_avg_pool2d(masks.float(), features.shape[-2:])
    return torch.einsum("nchw,nkhw->nkc", features, small) / (features.shape[-1] * features.shape[-2])


@torch.no_grad()
def concept_examples(extractor: nn.Module, to_input: CNNInput, world: ConceptWorld, n: int,
                     concepts: Sequence[Concept], keep: np.ndarray, split: str = "train", min_pixels: int = 8,
                     batch_size: int = 128, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs of the explainer: masked, pooled features ``x`` (M, C) and concept ids ``y`` (M,).

    One pair per image and concept with at least ``min_pixels`` mask pixels, for concepts with ``keep``.
    """
    xs, ys = [], []
    bar = tqdm(total=n, disable=not progress, desc="concept features")
    for block in world.stream(n, batch_size=512, split=split):
        for s in range(0, len(block), batch_size):
            idx = np.arange(s, min(s + batch_size, len(block)))
            regions = torch.from_numpy(region_masks(block, idx)).float()
            comp = torch.from_numpy(concept_composition(block, concepts, world.class_names, idx))
            pooled = comp @ masked_pool(extractor(to_input(block.images[idx]))["features"], regions)  # (b, K, C)
            area = comp @ regions.sum((-1, -2))[..., None]
            use = (area[..., 0] >= min_pixels) & torch.from_numpy(keep)[None]
            xs.append(pooled[use])
            ys.append(use.nonzero()[:, 1])
            bar.update(len(idx))
    bar.close()
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------- explainer
class ExplainerHead(nn.Sequential):
    """LaViSE's head: BN, Dropout, Linear d->d, ReLU, BN, Dropout, Linear d->e."""

    def __init__(self, d: int, e: int, dropout: float = 0.1) -> None:
        super().__init__(nn.BatchNorm1d(d), nn.Dropout(dropout), nn.Linear(d, d), nn.ReLU(),
                         nn.BatchNorm1d(d), nn.Dropout(dropout), nn.Linear(d, e))


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
    """Training of the explainer head (Adam and ReduceLROnPlateau as in LaViSE)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    margin: float = 1.0
    dropout: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0


def train_explainer(x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, seen: np.ndarray, cfg: ExplainerConfig,
                    progress: bool = True) -> tuple[ExplainerHead, list[dict]]:
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
        order = train[torch.randperm(len(train))]
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            if len(b) < 2:  # BatchNorm needs two samples
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
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_loss": val_loss,
                        "val_top1": val_top1, "lr": opt.param_groups[0]["lr"]})
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
def explain_filters(features: torch.Tensor, batch: WorldBatch, concepts: Sequence[Concept],
                    class_names: Sequence[str], head: ExplainerHead, words: torch.Tensor, act_q: float = 0.99,
                    n_top: int = 5, iou_threshold: float = 0.2, filters: np.ndarray | None = None,
                    iou_size: int | None = None, progress: bool = True) -> FilterExplanations:
    """LaViSE's filter explanation on the images ``batch`` whose target-layer maps are ``features``.

    ``words`` (K, e) embeds all concepts, seen and unseen: the predicted words are ranked among all.
    IoUs are computed at ``iou_size`` pixels a side (the image size if None).
    """
    thresholds = activation_thresholds(features, act_q)
    peak = features.amax((-1, -2))  # (N, C)
    live = np.flatnonzero(peak.amax(0).numpy() > thresholds)
    filters = live if filters is None else np.intersect1d(np.asarray(filters), live)
    size = iou_size or batch.masks.shape[-1]
    tops, acts, scores, ious = [], [], [], []
    for u in tqdm(filters, disable=not progress, desc="explain filters"):
        top = peak[:, u].topk(min(n_top, len(peak))).indices.numpy()
        maps = features[top]  # (T, C, h, w)
        region_small = (maps[:, u] > float(thresholds[u])).float()[:, None]  # (T, 1, h, w)
        emb = head(masked_pool(maps, region_small)[:, 0])
        scores.append((F.normalize(emb, dim=-1) @ words.T).numpy())
        region = activation_regions(maps[:, [u]], thresholds[[u]], size)  # (T, 1, H, W)
        inter, act_area, concept_area = region_overlaps(
            region, torch.from_numpy(region_masks(batch, top, size)),
            torch.from_numpy(concept_composition(batch, concepts, class_names, top)))
        ious.append((inter[:, 0] / (act_area + concept_area - inter[:, 0]).clamp(min=1)).numpy())
        tops.append(top)
        acts.append(peak[top, u].numpy())
    ious_arr = np.stack(ious)
    return FilterExplanations(np.asarray(filters), np.stack(tops), np.stack(acts), thresholds, np.stack(scores),
                              ious_arr, ious_arr > iou_threshold)


@torch.no_grad()
def dissect(features: torch.Tensor, batch: WorldBatch, concepts: Sequence[Concept], class_names: Sequence[str],
            thresholds: np.ndarray, iou_size: int | None = None, chunk: int = 32, progress: bool = True) -> np.ndarray:
    """Network Dissection: (C, K) data-set IoU of each filter's thresholded regions with each concept's masks.

    IoU(u, k) = sum over images of |region ∩ mask| / sum of |region ∪ mask|; uses every annotation.
    """
    n, c = features.shape[:2]
    size = iou_size or batch.masks.shape[-1]
    inter = torch.zeros(c, len(concepts), dtype=torch.float64)
    region_area = torch.zeros(c, dtype=torch.float64)
    mask_area = torch.zeros(len(concepts), dtype=torch.float64)
    for s in tqdm(range(0, n, chunk), disable=not progress, desc="dissect"):
        idx = np.arange(s, min(s + chunk, n))
        i, a, m = region_overlaps(activation_regions(features[idx], thresholds, size),
                                  torch.from_numpy(region_masks(batch, idx, size)),
                                  torch.from_numpy(concept_composition(batch, concepts, class_names, idx)))
        inter += i.sum(0).double()
        region_area += a.sum(0).double()
        mask_area += m.sum(0).double()
    union = region_area[:, None] + mask_area[None] - inter
    return (inter / union.clamp(min=1)).float().numpy()


# ---------------------------------------------------------------------------- metrics
def recall_at_k(scores: np.ndarray, ground_truth: np.ndarray, subset: np.ndarray, k: int) -> float:
    """Mean over (filter, image) pairs of the share of ground-truth concepts in ``subset`` ranked in the top k.

    ``scores`` and ``ground_truth`` are (..., K); pairs without a ground-truth concept in ``subset`` are skipped.
    """
    s = scores.reshape(-1, scores.shape[-1])
    g = ground_truth.reshape(-1, ground_truth.shape[-1]) & subset[None]
    hit = np.zeros_like(g)
    np.put_along_axis(hit, np.argsort(-s, axis=1, kind="stable")[:, :k], True, axis=1)
    valid = g.sum(1) > 0
    if not valid.any():
        return float("nan")
    return float(((hit & g).sum(1)[valid] / g.sum(1)[valid]).mean())


def recall_table(methods: dict[str, tuple[np.ndarray, np.ndarray]], seen: np.ndarray,
                 ks: Sequence[int] = (5, 10, 20)) -> pd.DataFrame:
    """Recall@k on seen and unseen concepts; ``methods`` maps a name to ``(scores, ground_truth)``."""
    rows = []
    for name, (scores, gt) in methods.items():
        row = {"method": name}
        for label, subset in (("seen", seen), ("unseen", ~seen)):
            for k in ks:
                row[f"R@{k} {label}"] = recall_at_k(scores, gt, subset, k)
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def chance_scores(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random concept scores: the recall of a ranking that knows nothing."""
    return np.random.default_rng(seed).random(shape)


def filter_labels(expl: FilterExplanations, dissection_iou: np.ndarray, concepts: Sequence[Concept],
                  seen: np.ndarray) -> pd.DataFrame:
    """One row per explained filter: the explainer's word (top-1 of the mean score over its top images),
    the dissection label (highest data-set IoU) and whether they agree."""
    names = np.array([c.name for c in concepts])
    groups = np.array([c.group for c in concepts])
    explainer = expl.scores.mean(1).argmax(1)
    dissection = dissection_iou[expl.filters].argmax(1)
    top3 = np.argsort(-expl.scores.mean(1), axis=1)[:, :3]
    return pd.DataFrame({
        "filter": expl.filters,
        "explainer word": names[explainer],
        "explainer top-3": [", ".join(names[t]) for t in top3],
        "dissection concept": names[dissection],
        "dissection group": groups[dissection],
        "dissection IoU": dissection_iou[expl.filters, dissection],
        "dissection concept seen": seen[dissection],
        "agree": explainer == dissection,
        "dissection in explainer top-3": (top3 == dissection[:, None]).any(1),
    })


# ---------------------------------------------------------------------------- storage and figures
def stored_explainer(store: ArtifactStore, params: dict, pairs: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     words: torch.Tensor, seen: np.ndarray, cfg: ExplainerConfig, progress: bool = True
                     ) -> tuple[ExplainerHead, list[dict]]:
    """The explainer head for ``params`` from the store, or trained on ``pairs()`` and stored.

    ``params`` must name everything the pairs depend on (CNN, layer, training images); the
    embedding and the seen split are added to the key here.
    """
    key = {**params, "explainer": asdict(cfg), "seen": seen.tolist(), "words": params_key(words.tolist())}
    d = store.path("lavise_explainer", key)
    if not (d / "head.pt").exists():
        feats, targets = pairs()
        head, history = train_explainer(feats, targets, words, seen, cfg, progress=progress)
        atomic_write_json(d / "history.json", history)
        atomic_torch_save({"d": feats.shape[1], "state": head.state_dict()}, d / "head.pt")
    saved = safe_torch_load(d / "head.pt")
    head = ExplainerHead(int(saved["d"]), words.shape[1], cfg.dropout)
    head.load_state_dict(saved["state"])
    return head.eval(), json.loads((d / "history.json").read_text())


def filter_figure(expl: FilterExplanations, features: torch.Tensor, batch: WorldBatch, concepts: Sequence[Concept],
                  rows: Sequence[int], row_titles: Sequence[str], n_words: int = 2) -> plt.Figure:
    """Each row a filter: its top images with the activation region outlined and the top predicted words."""
    names = [c.name for c in concepts]
    n_top = expl.top_images.shape[1]
    size = batch.images.shape[1]
    fig, axes = plt.subplots(len(rows), n_top, figsize=(1.9 * n_top, 2.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        u = expl.filters[row]
        for t, i in enumerate(expl.top_images[row]):
            region = activation_regions(features[[i]][:, [u]], expl.thresholds[[u]], size)[0, 0].numpy()
            ax = axes[r, t]
            ax.imshow(batch.images[i])
            ax.contour(region, levels=[0.5], colors="white", linewidths=1.2)
            words = [names[k] for k in np.argsort(-expl.scores[row, t])[:n_words]]
            ax.set_title("\n".join(words), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(row_titles[r], fontsize=7)
    fig.tight_layout()
    return fig
