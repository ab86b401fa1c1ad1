"""LaViSE: explain the filters of a CNN with words (METHODS.md section 4).

1. Concepts with masks. On Concept World every concept (parts, colours, patterns, sizes,
   part-attribute pairs such as "red head", habitats on the background, class names on the
   creature) has an exact mask in every image (:class:`WorldImages`); on the real path the
   concepts are the categories of a COCO-format data set with polygon or RLE masks
   (:class:`CocoImages`). An annotation rate splits them into seen and unseen
   (:func:`split_seen`); unseen concepts are never used in training.
2. Explainer. The frozen CNN up to the target layer, its feature map multiplied by a concept's
   mask (resized to the map), average-pooled, then a small head (:class:`ExplainerHead`) trained
   with the cosine margin ranking loss (:func:`csmr_loss`) to land near the concept's word
   embedding. As in the original code, the head's BatchNorm layers stay in eval mode while it
   trains (``bn_eval``, :func:`set_bn_eval`).
3. Filter explanation (:func:`explain_filters`): a filter's top-activating images, its embedding
   by the original code's default "projection" (the feature map weighted by the filter's own
   normalised map: filter attention) or by "activation" masking (the map above the ``act_q``
   quantile), the words nearest to the head's prediction, and the ground truth: concepts whose
   mask has IoU with the filter's region above a threshold.
4. Baselines: Network Dissection (:func:`dissect`), chance, random word vectors, a randomly
   initialised CNN; :func:`differences` lists where a run departs from the original code.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, atomic_write_json, params_key, safe_torch_load
from .chapter import Param, Switch
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


def _square(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the shortest side to ``size`` and crop the centre square (what the CNN sees)."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


class CocoImages:
    """Photographs with COCO instance annotations (polygon or RLE masks, read with pycocotools).

    Concepts are the data set's categories (group: the supercategory); an image's region of a
    category is the union of its instances' masks. Images and masks are resized (shortest side)
    and centre-cropped to ``size`` pixels, as the CNN sees them. ``image_ids`` picks images
    (default: every image with at least one annotation).
    """

    def __init__(self, image_dir: str | Path, annotations: str | Path, size: int = 224,
                 image_ids: Sequence[int] | None = None) -> None:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO(str(annotations))
        self.image_dir, self.size = Path(image_dir), size
        self.categories = sorted(self.coco.getCatIds())
        cats = self.coco.loadCats(self.categories)
        self.concepts = [Concept(c["name"], c.get("supercategory") or "object") for c in cats]
        self.keep = np.arange(len(self.categories))
        annotated = sorted({a["image_id"] for a in self.coco.dataset.get("annotations", [])})
        self.image_ids = list(annotated if image_ids is None else image_ids)
        if not self.image_ids:
            raise ValueError(f"{annotations} has no annotated images.")

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, positions: Sequence[int]) -> CocoImages:
        """The images at ``positions`` (same concepts)."""
        out = object.__new__(CocoImages)
        out.__dict__.update(self.__dict__, image_ids=[self.image_ids[i] for i in positions])
        return out

    def with_concepts(self, keep: np.ndarray) -> CocoImages:
        """The same images with the concepts where ``keep`` is true."""
        out = object.__new__(CocoImages)
        out.__dict__.update(self.__dict__, keep=self.keep[np.asarray(keep)],
                            concepts=[c for c, k in zip(self.concepts, keep) if k])
        return out

    def images(self, idx: np.ndarray) -> np.ndarray:
        out = []
        for i in np.asarray(idx):
            info = self.coco.loadImgs(self.image_ids[i])[0]
            with Image.open(self.image_dir / info["file_name"]) as img:
                out.append(np.asarray(_square(img.convert("RGB"), self.size, Image.BILINEAR)))
        return np.stack(out)

    def regions(self, idx: np.ndarray, size: int | None = None) -> np.ndarray:
        size = size or self.size
        out = np.zeros((len(np.asarray(idx)), len(self.categories), size, size), dtype=bool)
        for n, i in enumerate(np.asarray(idx)):
            info = self.coco.loadImgs(self.image_ids[i])[0]
            for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])):
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = Image.fromarray(self.coco.annToMask(ann) * 255)
                square = _square(_square(mask, self.size, Image.NEAREST), size, Image.NEAREST)
                out[n, self.categories.index(ann["category_id"])] |= np.asarray(square) > 127
        return out

    def composition(self, idx: np.ndarray) -> np.ndarray:
        eye = np.eye(len(self.categories), dtype=np.float32)[self.keep]
        return np.broadcast_to(eye, (len(np.asarray(idx)), *eye.shape)).copy()


def split_coco(data: CocoImages, n_train: int, n_eval: int, seed: int = 0) -> tuple[CocoImages, CocoImages]:
    """Seeded disjoint subsets of the annotated images: ``n_train`` to train the explainer (at most
    four fifths) and ``n_eval`` to explain filters on (at least one image each)."""
    if len(data) < 2:
        raise ValueError("The COCO annotations need at least two annotated images (train and evaluate).")
    order = np.random.default_rng(seed).permutation(len(data))
    n_ev = min(n_eval, max(1, len(data) // 5))
    return data.subset(order[n_ev:][:n_train]), data.subset(order[:n_ev])


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


def _glove(names: Sequence[str], path: str) -> tuple[torch.Tensor, np.ndarray]:
    """GloVe embeddings of names (the mean of their words' vectors, lower-cased as GloVe is);
    a word missing from the file is dropped, and a name with no word left is dropped."""
    tokens = [n.lower().replace("-", " ").split() for n in names]
    vectors = load_glove(path, {w for t in tokens for w in t})
    missing = sorted({w for t in tokens for w in t} - set(vectors))
    keep = np.array([any(w in vectors for w in t) for t in tokens])
    if missing:
        print(f"note: the GloVe file lacks {len(missing)} word(s) ({', '.join(missing[:8])}"
              f"{', ...' if len(missing) > 8 else ''}): dropped {int((~keep).sum())} of {len(names)} concepts "
              "with no word left; the others average the words it has.")
    if not keep.any():
        raise ValueError(f"The GloVe file {path} has a vector for none of the {len(names)} concepts.")
    rows = [np.mean([vectors[w] for w in t if w in vectors], 0) for t, k in zip(tokens, keep) if k]
    return F.normalize(torch.from_numpy(np.stack(rows)), dim=-1), keep


def embed_concepts(names: Sequence[str], source: str = "clip", clip: nn.Module | None = None,
                   tokenizer=None, template: str = "{}", seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
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
        return _glove(names, source.removeprefix("glove:"))
    if source.startswith("sentence-transformers:"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError("embedding='sentence-transformers:...' needs the optional package "
                              "sentence-transformers (pip install sentence-transformers) and a local model "
                              "folder; or use embedding='clip' or 'glove:<file>'.") from err
        model = SentenceTransformer(source.removeprefix("sentence-transformers:"), device="cpu")
        return F.normalize(torch.as_tensor(model.encode(list(names))), dim=-1), every
    raise ValueError(f"embedding={source!r}: use 'clip', 'glove:<file>', 'sentence-transformers:<model>' or 'random'.")


# ---------------------------------------------------------------------------- features
def _layer_names(model: nn.Module) -> set[str]:
    return set(get_graph_node_names(model)[1]) | set(dict(model.named_modules()))


def feature_extractor(model: nn.Module, layer: str) -> nn.Module:
    """The frozen CNN up to ``layer`` (a module name such as ``"layer4"`` or an FX node name)."""
    if layer not in _layer_names(model):
        blocks = [n for n, _ in model.named_children()]
        raise ValueError(f"target_layer={layer!r} is not a layer of this CNN; top-level layers: {blocks}.")
    return create_feature_extractor(model.eval(), return_nodes={layer: "features"}).eval()


def target_architecture(target_model: str, n_classes: int = 10) -> nn.Module:
    """The target CNN's architecture without weights: the world ResNet-18 or a torchvision model."""
    if target_model == "world":
        return world_resnet18(n_classes)
    return torchvision.models.get_model(target_model, weights=None)


def check_target_layer(value: str, params: dict[str, Any]) -> str | None:
    """A ``check`` for ``target_layer``: the layer exists in the target architecture (built without weights)."""
    model = params.get("target_model", "world")
    if model != "world" and model not in torchvision.models.list_models(module=torchvision.models):
        return None  # target_model's own check reports an unknown architecture
    if value in _layer_names(target_architecture(model)):
        return None
    blocks = [n for n, _ in target_architecture(model).named_children()]
    return f"{value!r} is not a layer of {model}; its top-level layers are {blocks}"


@torch.no_grad()
def layer_features(extractor: nn.Module, to_input: CNNInput, data: ConceptImages, batch_size: int = 128,
                   device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) target-layer activations of every image of ``data`` (on the CPU)."""
    extractor = extractor.to(device)
    chunks = range(0, len(data), batch_size)
    return torch.cat([extractor(to_input(data.images(np.arange(s, min(s + batch_size, len(data))))).to(device))
                      ["features"].cpu() for s in tqdm(chunks, disable=not progress, desc="features")])


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
def concept_examples(extractor: nn.Module, to_input: CNNInput, data: ConceptImages, keep: np.ndarray,
                     min_pixels: int = 8, batch_size: int = 128, modes: Sequence[str] = ("area",),
                     device: str | torch.device = "cpu", progress: bool = True
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
        super().__init__(nn.BatchNorm1d(d), nn.Dropout(dropout), nn.Linear(d, d), nn.ReLU(),
                         nn.BatchNorm1d(d), nn.Dropout(dropout), nn.Linear(d, e))


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
        if cfg.bn_eval:
            set_bn_eval(head)
        order = train[torch.randperm(len(train))]
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
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
def filter_scores(features: torch.Tensor, expl: FilterExplanations, head: ExplainerHead, words: torch.Tensor,
                  masking: str = "projection") -> np.ndarray:
    """(F, T, K) cosine of the head's prediction for each filter and top image with every word."""
    out = []
    for u, top in zip(expl.filters, expl.top_images):
        emb = head(filter_embedding(features[top], int(u), float(expl.thresholds[u]), masking))
        out.append((F.normalize(emb, dim=-1) @ words.T).numpy())
    return np.stack(out)


def rescore(expl: FilterExplanations, features: torch.Tensor, head: ExplainerHead, words: torch.Tensor,
            masking: str) -> FilterExplanations:
    """The same filters, images and ground truth, scored by another head, embedding or masking."""
    return replace(expl, scores=filter_scores(features, expl, head, words, masking))


@torch.no_grad()
def explain_filters(features: torch.Tensor, data: ConceptImages, head: ExplainerHead, words: torch.Tensor,
                    act_q: float = 0.99, n_top: int = 5, iou_threshold: float = 0.2, masking: str = "projection",
                    filters: np.ndarray | None = None, iou_size: int | None = None,
                    progress: bool = True) -> FilterExplanations:
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
            region, torch.from_numpy(data.regions(top, size)), torch.from_numpy(data.composition(top)))
        ious.append((inter[:, 0] / (act_area + concept_area - inter[:, 0]).clamp(min=1)).numpy())
        tops.append(top)
        acts.append(peak[top, u].numpy())
    ious_arr = np.stack(ious) if ious else np.zeros((0, n_top, len(data.concepts)), dtype=np.float32)
    expl = FilterExplanations(np.asarray(filters), np.stack(tops) if tops else np.zeros((0, n_top), int),
                              np.stack(acts) if acts else np.zeros((0, n_top)), thresholds,
                              np.zeros_like(ious_arr), ious_arr, ious_arr > iou_threshold)
    return rescore(expl, features, head, words, masking)


@torch.no_grad()
def dissect(features: torch.Tensor, data: ConceptImages, thresholds: np.ndarray, iou_size: int | None = None,
            chunk: int = 32, progress: bool = True) -> np.ndarray:
    """Network Dissection: (C, K) data-set IoU of each filter's thresholded regions with each concept's masks.

    IoU(u, k) = sum over images of |region ∩ mask| / sum of |region ∪ mask|; uses every annotation.
    """
    n, c = features.shape[:2]
    size = iou_size or data.images(np.arange(1)).shape[1]
    inter = torch.zeros(c, len(data.concepts), dtype=torch.float64)
    region_area = torch.zeros(c, dtype=torch.float64)
    mask_area = torch.zeros(len(data.concepts), dtype=torch.float64)
    for s in tqdm(range(0, n, chunk), disable=not progress, desc="dissect"):
        idx = np.arange(s, min(s + chunk, n))
        i, a, m = region_overlaps(activation_regions(features[idx], thresholds, size),
                                  torch.from_numpy(data.regions(idx, size)),
                                  torch.from_numpy(data.composition(idx)))
        inter += i.sum(0).double()
        region_area += a.sum(0).double()
        mask_area += m.sum(0).double()
    union = region_area[:, None] + mask_area[None] - inter
    return (inter / union.clamp(min=1)).float().numpy()


# ---------------------------------------------------------------------------- metrics
KS: tuple[int, ...] = (5, 10, 20)


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


def recall_row(scores: np.ndarray, ground_truth: np.ndarray, seen: np.ndarray,
               ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"R@k seen": ..., "R@k unseen": ...}`` for every k."""
    return {f"R@{k} {label}": recall_at_k(scores, ground_truth, subset, k)
            for label, subset in (("seen", seen), ("unseen", ~seen)) for k in ks}


def recall_table(methods: dict[str, tuple[np.ndarray, np.ndarray]], seen: np.ndarray,
                 ks: Sequence[int] = KS) -> pd.DataFrame:
    """Recall@k on seen and unseen concepts; ``methods`` maps a name to ``(scores, ground_truth)``."""
    return pd.DataFrame([{"method": name, **recall_row(s, g, seen, ks)} for name, (s, g) in methods.items()]
                        ).set_index("method")


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


# ---------------------------------------------------------------------------- the original, as switches
# Where the original code departs from its paper (METHODS.md section 4, checked against YuYang0901/LaViSE).
SWITCHES: dict[str, Switch] = {
    "bn_eval": Switch("not stated", True, "the head's BatchNorm layers stay in eval mode while it trains "
                      "(set_bn_eval): they normalise with fixed running statistics"),
    "masking": Switch("activation", "projection", "what the head reads for a filter: the map masked where the "
                      "filter fires above act_q (paper), or weighted by the filter's normalised map (code)"),
    "mask_resize": Switch("not stated", "nearest", "object masks resized to the feature map by nearest pixel "
                          "(hard) or by area averaging (soft)"),
    "explainer_lr": Switch(1e-4, 1e-4, "Adam's learning rate for the head"),
}
FIXED_DIFFERENCES: tuple[str, ...] = (
    "Seen concepts: the book draws annotation_rate of each concept group without replacement; the original "
    "draws int(rate * K) indices with replacement (numpy's default), so fewer distinct concepts are seen.",
    "Evaluation: the book scores every (filter, top image) pair against mask-IoU ground truth; the original "
    "script pools the top 5 words of each of a filter's top 25 images, weighted by its peak activation, "
    "and computes no recall.",
    "The original inference script does not run as published: explain() is called with its first three "
    "arguments in another order than declared, and the top images are sorted with argsort(axis=1) on a "
    "one-dimensional array. The book implements what the script evidently intends.",
    "Learning-rate plateaus: factor 0.3 after 2 epochs without improvement of the held-out loss; the original "
    "uses PyTorch's defaults (factor 0.1, patience 10).",
)
# Settings of the original's scripts that are not method switches but change what is measured.
ORIGINAL_SETTINGS: dict[str, tuple[Any, str]] = {
    "dataset": ("vg", "Visual Genome objects with boxes as masks (COCO segmentations as the other option)"),
    "target_layer": ("layer4", "layer4 of an ImageNet ResNet (a 7x7 map on 224-pixel images)"),
    "embedding": ("glove:glove.6B.300d", "GloVe 6B vectors, 300 dimensions"),
    "annotation_rate": (0.1, "10% of the concept labels seen in training (--anno-rate 0.1)"),
    "explainer_epochs": (3, "3 epochs over Visual Genome, one image per batch"),
}


def setting_differences(params: dict[str, Any]) -> list[str]:
    """One line per setting where this run differs from the original's scripts, then the fixed differences."""
    lines = [f"{k} = {params[k]!r}; the original: {what}." for k, (value, what) in ORIGINAL_SETTINGS.items()
             if params[k] != value]
    return lines + list(FIXED_DIFFERENCES)


# Recall the paper reports (Visual Genome). Not on file in this project: the table shows them as missing.
PAPER_RECALL: dict[str, float] = {}


ORIGINAL_CODE: dict[str, Any] = {k: s.original for k, s in SWITCHES.items()}  # every switch as the code has it



def fidelity_rows(book: dict[str, float], original: dict[str, float],
                  metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Rows for :func:`conceptlab.chapter.fidelity_table`: paper, original code and book per metric."""
    return {m: {"paper": PAPER_RECALL.get(m, float("nan")), "original code": original[m], "this book": book[m]}
            for m in metrics}


# ---------------------------------------------------------------------------- a run, from parameters
@dataclass
class LaviseRun:
    """Everything a LaViSE run needs, built from a chapter's parameters by :func:`setup_run`."""

    params: dict[str, Any]
    store: ArtifactStore
    cnn: nn.Module
    to_input: CNNInput
    cnn_history: list[dict] | None
    cnn_key: dict[str, Any]
    extractor: nn.Module
    train_data: ConceptImages
    eval_data: ConceptImages
    data_key: dict[str, Any]
    words: torch.Tensor
    seen: np.ndarray
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)  # shared by the runs that differ in the seen split only

    @property
    def concepts(self) -> list[Concept]:
        return self.eval_data.concepts

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]


def _real_data(p: dict[str, Any], inputs: dict[str, Any]) -> tuple[CocoImages, CocoImages, dict[str, Any]]:
    data = CocoImages(p["data_root"], p["annotations"], p["target_input_size"])
    train, test = split_coco(data, p["n_explain"], p["n_eval"], p["seed"])
    key = {"coco": {k: inputs.get(k) for k in ("data_root", "annotations")}, "size": p["target_input_size"],
           "train_ids": params_key(train.image_ids), "eval_ids": params_key(test.image_ids)}
    print(f"COCO: {len(data.concepts)} categories, {len(train)} images to train the explainer, "
          f"{len(test)} to explain filters on")
    return train, test, key


# What setup_run's result depends on; other parameters (the seen split, the head, the explanation) do not.
SETUP_PARAMS: tuple[str, ...] = (
    "dataset", "data_root", "annotations", "embedding", "concept_template", "target_model", "target_weights",
    "target_input_size", "target_layer", "target_init", "cnn_n_train", "cnn_steps", "cnn_batch_size", "cnn_lr",
    "n_explain", "n_eval", "seed", "world", "world_clip", "model", "pretrained", "artifacts_dir")
_RUNS: dict[str, LaviseRun] = {}  # per process: an exercise reuses the chapter's CNN, images and feature maps


def setup_run(ch: Any, progress: bool = True, **changes: Any) -> LaviseRun:
    """Target CNN, annotated images, word embeddings and the seen split for the chapter ``ch``'s parameters
    (``changes`` override some of them: an exercise). Built once per process for the same setup."""
    p = {**ch.params, **changes}
    key = params_key({k: p[k] for k in SETUP_PARAMS})
    if key not in _RUNS:
        _RUNS[key] = _build_run(ch, p, progress)
    base = _RUNS[key]
    return replace(base, params=p, seen=split_seen(base.train_data.concepts, p["annotation_rate"], p["seed"]))


def _build_run(ch: Any, p: dict[str, Any], progress: bool) -> LaviseRun:
    from .cnn import CNNConfig, get_cnn, randomised_copy

    if p["dataset"] == "coco":
        train, test, data_key = _real_data(p, ch.inputs)
    else:
        concepts = world_concepts(ch.world)
        train, test = (WorldImages(ch.world.sample(n, split=s), concepts, ch.world.class_names)
                       for n, s in ((p["n_explain"], "train"), (p["n_eval"], "test")))
        data_key = {"world": ch.world_cfg.to_dict(), "n_explain": p["n_explain"], "n_eval": p["n_eval"]}
    cnn_cfg = CNNConfig(n_train=p["cnn_n_train"], steps=p["cnn_steps"], batch_size=p["cnn_batch_size"],
                        lr=p["cnn_lr"], seed=p["seed"])
    cnn, to_input, history = get_cnn(p["target_model"], p["target_weights"], ch.store, ch.world_cfg, cnn_cfg,
                                     p["target_input_size"], device=ch.device, progress=progress)
    if p["target_init"] == "random":
        cnn = randomised_copy(cnn, p["seed"])
    cnn_key = {"model": p["target_model"], "weights": ch.inputs.get("target_weights"), "init": p["target_init"],
               "size": p["target_input_size"], "layer": p["target_layer"],
               "cnn": {"world": ch.world_cfg.to_dict(), **asdict(cnn_cfg)} if p["target_model"] == "world" else None}
    clip, _, tokenizer, _ = ch.clip(progress=progress) if p["embedding"] == "clip" else (None,) * 4
    words, keep = embed_concepts([c.name for c in train.concepts], p["embedding"], clip, tokenizer,
                                 p["concept_template"], seed=p["seed"])
    if not keep.all():
        train, test = train.with_concepts(keep), test.with_concepts(keep)
    return LaviseRun(p, ch.store, cnn, to_input, history, cnn_key, feature_extractor(cnn, p["target_layer"]),
                     train, test, data_key, words, np.ones(len(train.concepts), dtype=bool), ch.device)


def training_pairs(run: LaviseRun, progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled features and concept ids of every annotated concept on the training images, per mask resize
    (stored: one pass of the CNN serves every seen split, embedding and head)."""
    key = {"cnn": run.cnn_key, "data": run.data_key, "concepts": run.names, "min_pixels": run.params["min_pixels"]}

    def build(d: Path) -> None:
        pairs = concept_examples(run.extractor, run.to_input, run.train_data, np.ones(len(run.names), bool),
                                 run.params["min_pixels"], modes=MASK_RESIZES, device=run.device, progress=progress)
        atomic_torch_save({m: {"x": x.half(), "y": y.int()} for m, (x, y) in pairs.items()}, d / "pairs.pt")

    saved = run.store.get_or_build("lavise_pairs", key, build, lambda d: safe_torch_load(d / "pairs.pt",
                                                                                      owner="store"))
    return {m: (v["x"].float(), v["y"].long()) for m, v in saved.items()}


def train_head(run: LaviseRun, words: torch.Tensor | None = None, progress: bool = True,
               **switches: Any) -> tuple[ExplainerHead, list[dict]]:
    """The explainer head for this run (``switches`` override ``bn_eval``, ``mask_resize``, ``explainer_lr``),
    trained on the seen concepts once, then loaded from the store."""
    p = {**run.params, **switches}
    words = run.words if words is None else words
    cfg = ExplainerConfig(epochs=p["explainer_epochs"], lr=p["explainer_lr"], bn_eval=p["bn_eval"], seed=p["seed"])
    key = {"cnn": run.cnn_key, "data": run.data_key, "concepts": run.names, "min_pixels": p["min_pixels"],
           "mask_resize": p["mask_resize"], "explainer": asdict(cfg), "seen": run.seen.tolist(),
           "words": params_key(words.tolist())}

    def build(d: Path) -> None:
        x, y = training_pairs(run, progress)[p["mask_resize"]]
        use = torch.from_numpy(run.seen)[y]
        head, history = train_explainer(x[use], y[use], words, run.seen, cfg, progress=progress)
        atomic_write_json(d / "history.json", history)
        atomic_torch_save({"d": x.shape[1], "state": head.state_dict()}, d / "head.pt")

    def load(d: Path) -> tuple[ExplainerHead, list[dict]]:
        saved = safe_torch_load(d / "head.pt", owner="store")
        head = ExplainerHead(int(saved["d"]), words.shape[1], cfg.dropout)
        head.load_state_dict(saved["state"])
        return head.eval(), json.loads((d / "history.json").read_text())

    return run.store.get_or_build("lavise_explainer", key, build, load)


def eval_features(run: LaviseRun, progress: bool = True) -> torch.Tensor:
    """(N, C, h, w) target-layer maps of the evaluation images (computed once per run)."""
    if "features" not in run.cache:
        run.cache["features"] = layer_features(run.extractor, run.to_input, run.eval_data, device=run.device,
                                               progress=progress)
    return run.cache["features"]


def explain(run: LaviseRun, features: torch.Tensor, head: ExplainerHead, words: torch.Tensor | None = None,
            masking: str | None = None, progress: bool = True) -> FilterExplanations:
    """:func:`explain_filters` with the run's parameters."""
    p = run.params
    return explain_filters(features, run.eval_data, head, run.words if words is None else words, p["act_q"],
                           p["n_top"], p["iou_threshold"], masking or p["masking"], iou_size=p["iou_size"],
                           progress=progress)


_EXERCISES: dict[str, dict[str, float]] = {}  # per process: every exercise's "as in the chapter" row is one run


def exercise(ch: Any, **changes: Any) -> dict[str, float]:
    """Recall@k of the chapter's explainer with ``changes`` to its parameters (the exercises' solutions)."""
    key = params_key({**ch.params, **changes})
    if key not in _EXERCISES:
        _EXERCISES[key] = _exercise(ch, changes)
    return _EXERCISES[key]


def _exercise(ch: Any, changes: dict[str, Any]) -> dict[str, float]:
    run = setup_run(ch, progress=False, **changes)
    head, history = train_head(run, progress=False)
    expl = explain(run, eval_features(run, progress=False), head, progress=False)
    return {**recall_row(expl.scores, expl.ground_truth, run.seen, (5, 20)), "seen concepts": int(run.seen.sum()),
            "held-out top-1 (seen words)": history[-1]["val_top1"]}


# ---------------------------------------------------------------------------- parameters
def check_embedding(value: str, params: dict[str, Any]) -> str | None:
    """A ``check`` for ``embedding``: a known source, and a GloVe file that exists."""
    if value in ("clip", "random") or value.startswith("sentence-transformers:"):
        return None
    if value.startswith("glove:"):
        path = Path(value.removeprefix("glove:")).expanduser()
        return None if path.is_file() else f"no GloVe file at {str(path)!r} (relative paths start in notebooks/)"
    return f"{value!r}: use 'clip', 'glove:<file>', 'sentence-transformers:<model folder>' or 'random'"


def check_target_model(value: str, params: dict[str, Any]) -> str | None:
    """A ``check`` for ``target_model``: ``"world"``, or a torchvision architecture with local weights."""
    if value == "world":
        return None
    if value not in torchvision.models.list_models(module=torchvision.models):
        return f"{value!r} is not a torchvision classification model (e.g. 'resnet18', 'alexnet', 'vgg16')"
    if params.get("target_weights") is None and params.get("target_init") != "random":
        return f"{value!r} needs target_weights=<local state dict file>: this project never downloads weights"
    return None


def check_dataset(value: str, params: dict[str, Any]) -> str | None:
    """A ``check`` for ``dataset``: the COCO path names its images, annotations and a photograph CNN."""
    if value != "coco":
        return None
    missing = [k for k in ("data_root", "annotations") if params.get(k) is None]
    if missing:
        return f"dataset='coco' needs {' and '.join(missing)} (the images folder and an instances JSON)"
    if params.get("target_model") == "world":
        return "dataset='coco' explains a CNN for photographs: set target_model (e.g. 'resnet18') and target_weights"
    return None


def check_iou_size(value: int, params: dict[str, Any]) -> str | None:
    """A ``check`` for ``iou_size``: on the world it divides the image size."""
    from .world import WorldConfig

    if params.get("dataset") == "coco":
        return None
    resolution = WorldConfig(**params.get("world", {})).resolution
    return None if resolution % value == 0 else f"{value} must divide the world's image size {resolution}"


def _world_cnn(p: dict[str, Any]) -> bool:
    return p["target_model"] == "world"


def _coco(p: dict[str, Any]) -> bool:
    return p["dataset"] == "coco"


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "coco"), check=check_dataset,
                     help="'world' or 'coco' (a COCO-format instances JSON with polygon/RLE masks)"),
    "data_root": Param(None, "dir", applies=_coco, help="the images folder of the COCO-format data set"),
    "annotations": Param(None, "file", applies=_coco, help="a COCO instances JSON for the images in data_root"),
    "embedding": Param("clip", str, check=check_embedding,
                       help="'clip' (the chapter's CLIP text encoder), 'glove:<file>', "
                            "'sentence-transformers:<model>' or 'random'"),
    "concept_template": Param("{}", str, applies=lambda p: p["embedding"] == "clip"),
    "target_model": Param("world", str, check=check_target_model,
                          help="'world' (a ResNet-18 trained on the world) or a torchvision architecture"),
    "target_weights": Param(None, "file", applies=lambda p: not _world_cnn(p), help="a local state dict"),
    "target_input_size": Param(224, int, min=16, applies=lambda p: not _world_cnn(p) or _coco(p)),
    "target_layer": Param("layer3", str, check=check_target_layer, help="the layer whose filters are explained"),
    "target_init": Param("trained", str, choices=("trained", "random"),
                         help="'random' re-initialises the CNN's weights: the random-features baseline"),
    "cnn_n_train": Param(2000, int, min=16, applies=_world_cnn),
    "cnn_steps": Param(60, int, min=1, applies=_world_cnn),
    "cnn_batch_size": Param(32, int, min=2, applies=_world_cnn),
    "cnn_lr": Param(2e-3, float, min=0.0, applies=_world_cnn),
    "annotation_rate": Param(0.6, float, min=0.01, max=1.0, help="share of each concept group seen in training"),
    "n_explain": Param(1500, int, min=1, help="images whose annotated concepts train the explainer"),
    "min_pixels": Param(8, int, min=1, help="smallest mask (pixels) that makes a training pair"),
    "explainer_epochs": Param(10, int, min=1),
    "explainer_lr": Param(1e-3, float, min=0.0),
    "bn_eval": Param(True, bool, help="the head's BatchNorm in eval mode while training (the original code)"),
    "mask_resize": Param("area", str, choices=MASK_RESIZES),
    "masking": Param("activation", str, choices=MASKINGS, help="what the head reads for a filter"),
    "n_eval": Param(600, int, min=1, help="images on which filters are explained"),
    "act_q": Param(0.99, float, min=0.5, max=0.9999, help="activation quantile that bounds a filter's region"),
    "n_top": Param(5, int, min=1, help="top-activating images per filter"),
    "iou_threshold": Param(0.2, float, min=0.0, max=1.0),
    "iou_size": Param(32, int, min=4, check=check_iou_size, help="pixels a side at which IoUs are computed"),
}


# ---------------------------------------------------------------------------- figures
def filter_figure(expl: FilterExplanations, features: torch.Tensor, data: ConceptImages, rows: Sequence[int],
                  row_titles: Sequence[str], n_words: int = 2) -> plt.Figure:
    """Each row a filter: its top images with the activation region outlined and the top predicted words."""
    names = [c.name for c in data.concepts]
    n_top = expl.top_images.shape[1]
    fig, axes = plt.subplots(len(rows), n_top, figsize=(1.9 * n_top, 2.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        u = expl.filters[row]
        images = data.images(expl.top_images[row])
        for t, i in enumerate(expl.top_images[row]):
            region = activation_regions(features[[i]][:, [u]], expl.thresholds[[u]], images.shape[1])[0, 0].numpy()
            ax = axes[r, t]
            ax.imshow(images[t])
            ax.contour(region, levels=[0.5], colors="white", linewidths=1.2)
            ax.set_title("\n".join(names[k] for k in np.argsort(-expl.scores[row, t])[:n_words]), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(row_titles[r], fontsize=7)
    fig.tight_layout()
    return fig
