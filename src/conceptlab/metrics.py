"""Metrics for concept explanation maps: DEAL's own (disentanglability; localizability, the mean
:func:`insertion_fidelity`) and, where ground-truth masks exist, map-versus-mask scores (pointing game,
energy in mask, overlap).

Maps are (N, K, h, w) non-negative tensors (K concepts per image); masks are boolean (N, K, H, W)
at image resolution (the mask of the part each concept is about). Maps are upsampled bilinearly
to the mask size before any map-versus-mask score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .explain import minmax


# ---------------------------------------------------------------------------- DEAL losses on maps
def separation_loss(maps: torch.Tensor) -> torch.Tensor:
    """``mean_batch sum_{i<j} sum_pixels h_i h_j`` of (N, K, h, w) maps."""
    flat = maps.flatten(2)
    gram = flat @ flat.transpose(1, 2)  # (N, K, K): pixel sums of h_i * h_j
    return torch.triu(gram, diagonal=1).sum((1, 2)).mean()


def consistency_loss(concept_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """``mean_batch sum_pixels (sum_k h_k - h_c)^2``; concept_maps (N, K, h, w), class_maps (N, h, w)."""
    return ((concept_maps.sum(1) - class_maps) ** 2).flatten(1).sum(1).mean()


def sparsity_loss(raw_maps: torch.Tensor) -> torch.Tensor:
    """L_spa as the original codes it (``SparsityLoss``): each image's K *raw* maps (N, K, h, w) min-max
    normalised jointly (one min and max per image), then ``sum |h|`` over maps, pixels *and the batch*."""
    flat = raw_maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-8)).abs().sum()


# ---------------------------------------------------------------------------- DEAL evaluation
def disentanglability(separation_losses: Sequence[float] | float) -> float:
    """DEAL's score: ``1 / (1 + exp(-10 (0.2 - mean(L_sep) / 100)))``; higher is better."""
    loss = float(np.mean(separation_losses)) / 100
    return 1.0 / (1.0 + math.exp(-10.0 * (0.2 - loss)))


def shuffled_pixels(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, K, h, w) maps with each map's pixels permuted independently: the same values, placed at random.
    The null of :func:`separation_loss`: how much maps with these values overlap by chance."""
    flat = maps.flatten(2)
    order = torch.rand(flat.shape, generator=generator).argsort(-1).to(flat.device)
    return flat.gather(-1, order).view_as(maps)


def mask_maps(masks: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, K, H, W) boolean part masks as (N, K, h, w) maps: each cell's share of the part. The truth
    pushed through a map score (its ceiling); a concept without a part gets an empty map."""
    return F.adaptive_avg_pool2d(torch.as_tensor(masks, dtype=torch.float32), size)


def blur(images: torch.Tensor) -> torch.Tensor:
    """DEAL's baseline image: bilinear down-sampling by 0.5, then back up."""
    size = images.shape[-2:]
    small = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def insertion_images(
    images: torch.Tensor, maps: torch.Tensor, steps: int = 5, original_indexing: bool = False
) -> torch.Tensor:
    """(N, K, steps, C, H, W): the blurred image with the top 1/steps, 2/steps, ... of pixels restored.

    Pixels are ranked by the concept map upsampled bicubically to the image size. By default whole
    pixels (all channels) are inserted; ``original_indexing=True`` reproduces the original's quirk of
    indexing the flattened C*H*W image with H*W ranks (only parts of the first channel change).
    """
    n, c, hgt, wid = images.shape
    k = maps.shape[1]
    up = F.interpolate(
        maps.float().reshape(n * k, 1, *maps.shape[-2:]), size=(hgt, wid), mode="bicubic", align_corners=False
    ).reshape(n, k, hgt * wid)
    order = up.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(hgt * wid, device=order.device).expand_as(order))
    fractions = torch.arange(1, steps + 1, device=images.device) / steps
    keep = rank[:, :, None, :] < (fractions * hgt * wid).round().long()[None, None, :, None]  # (N, K, S, HW)
    base, full = blur(images), images
    if original_indexing:
        flat_keep = torch.zeros(n, k, steps, c * hgt * wid, dtype=torch.bool, device=images.device)
        flat_keep[..., : hgt * wid] = keep
        out = torch.where(flat_keep, full.reshape(n, 1, 1, -1), base.reshape(n, 1, 1, -1))
        return out.reshape(n, k, steps, c, hgt, wid)
    keep = keep.reshape(n, k, steps, 1, hgt, wid)
    return torch.where(keep, full[:, None, None], base[:, None, None])


def pairing_rows(n: int, k: int, original_pairing: bool = False, batch: int = 8) -> torch.Tensor:
    """Which image each (image, concept) row of image-major maps and texts is inserted into, (N*K,).

    Correct: row ``i*K + j`` uses image i. ``original_pairing``: the original notebook tiles each batch of
    ``batch`` images with ``images.repeat(K, 1, 1, 1)`` (image-major maps and texts against a tiled image
    list), so row r of a batch of b images uses image ``r mod b``, mostly another image than its map's.
    """
    if not original_pairing:
        return torch.arange(n).repeat_interleave(k)
    rows = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        rows.append(start + torch.arange(b * k) % b)
    return torch.cat(rows)


@torch.no_grad()
def insertion_fidelity(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    text_features: torch.Tensor,
    steps: int = 5,
    original_indexing: bool = False,
    original_pairing: bool = False,
    pairing_batch: int = 8,
    chunk: int = 256,
) -> torch.Tensor:
    """Insertion fidelity per (image, concept), (N, K), in [0, 1]; DEAL's localizability is its mean.

    ``encode`` maps preprocessed images to L2-normalised embeddings; ``text_features`` (K, D) or (N, K, D).
    At each step ``|cos(x_step, d) - cos(x_blur, d)| / |cos(x, d) - cos(x_blur, d)|`` is clamped to [0, 1].
    ``original_indexing`` / ``original_pairing``: the original notebook's two quirks (see
    :func:`insertion_images` and :func:`pairing_rows`; the pairing tiles batches of ``pairing_batch``).
    """
    n, k = maps.shape[:2]
    texts = text_features if text_features.dim() == 3 else text_features.unsqueeze(0).expand(n, -1, -1)
    texts = F.normalize(texts.float(), dim=-1).reshape(n * k, -1)
    rows = pairing_rows(n, k, original_pairing, pairing_batch).to(images.device)
    f_full, f_blur = encode(images)[rows], encode(blur(images))[rows]  # (N*K, D)
    cos_full, cos_blur = (f_full * texts).sum(-1), (f_blur * texts).sum(-1)
    flat_maps, per = maps.reshape(n * k, 1, *maps.shape[-2:]), max(1, chunk // steps)
    cos_steps = []
    for s in range(0, n * k, per):
        inserted = insertion_images(images[rows[s : s + per]], flat_maps[s : s + per], steps, original_indexing)
        f_steps = encode(inserted.flatten(0, 2)).view(-1, steps, f_full.shape[-1])
        cos_steps.append((f_steps * texts[s : s + per, None]).sum(-1))
    ratio = (torch.cat(cos_steps) - cos_blur[:, None]).abs() / ((cos_full - cos_blur).abs()[:, None] + 1e-8)
    return ratio.clamp(0, 1).mean(-1).view(n, k)


# ---------------------------------------------------------------------------- ground truth
def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    maps = torch.as_tensor(maps, dtype=torch.float32)
    lead = maps.shape[:-2]
    up = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size)


def pointing_game(maps: torch.Tensor, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """1.0 where the map's maximum (at mask resolution) falls inside the mask, else 0.0; NaN for empty masks."""
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    up = _upsample(maps, masks.shape[-2:]).flatten(-2)
    hit = masks.flatten(-2).gather(-1, up.argmax(-1, keepdim=True)).squeeze(-1).float()
    return torch.where(masks.flatten(-2).any(-1), hit, torch.full_like(hit, float("nan")))


def energy_in_mask(maps: torch.Tensor, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Share of the (min-max normalised) map's mass inside the mask; NaN for empty masks."""
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    up = minmax(_upsample(maps, masks.shape[-2:])).flatten(-2)
    share = (up * masks.flatten(-2)).sum(-1) / (up.sum(-1) + 1e-8)
    return torch.where(masks.flatten(-2).any(-1), share, torch.full_like(share, float("nan")))


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum min(a, b) / sum max(a, b)`` over the last two dims (1 for identical maps)."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / (torch.maximum(a, b).flatten(-2).sum(-1) + 1e-8)


def overlap_agreement(maps: torch.Tensor, masks: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Map overlap versus mask overlap for every concept pair (i < j) of every image.

    Returns flat arrays ``map_overlap`` (soft IoU of the two min-max maps) and ``mask_overlap``
    (IoU of the two masks), skipping pairs where either mask is empty. Disentangled, localized maps
    overlap where the masks overlap and nowhere else.
    """
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    up = minmax(_upsample(maps, masks.shape[-2:]))
    k = maps.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    map_ov = soft_iou(up[:, i], up[:, j])
    inter = (masks[:, i] & masks[:, j]).flatten(-2).sum(-1).float()
    union = (masks[:, i] | masks[:, j]).flatten(-2).sum(-1).float()
    valid = masks[:, i].flatten(-2).any(-1) & masks[:, j].flatten(-2).any(-1)
    return {"map_overlap": map_ov[valid].numpy(), "mask_overlap": (inter / union.clamp(min=1))[valid].numpy()}
