"""LaViSE on one core: Network Dissection IoU via region composition versus materialised concept masks.

Concept masks are unions of disjoint regions (five parts and the background), so
``lavise.dissect`` intersects each filter's region with six region masks and composes the
concepts' overlaps from those; the baseline materialises every concept's full mask and
intersects with all of them, as a direct implementation would. Both give the same IoUs.
"""

import os

import numpy as np
import torch

from conceptlab import lavise
from conceptlab.bench import figure, timed
from conceptlab.world import ConceptWorld


def _dissect_materialised(features, batch, concepts, class_names, thresholds, size, chunk=32):
    inter = torch.zeros(features.shape[1], len(concepts))
    act_area, mask_area = torch.zeros(features.shape[1]), torch.zeros(len(concepts))
    step = batch.masks.shape[-1] // size
    for s in range(0, len(batch), chunk):
        idx = np.arange(s, min(s + chunk, len(batch)))
        act = lavise.activation_regions(features[idx], thresholds, size).flatten(2).float()
        masks = torch.from_numpy(lavise.concept_masks(batch, concepts, class_names, idx)[..., ::step, ::step])
        masks = masks.flatten(2).float()
        inter += (act @ masks.transpose(1, 2)).sum(0)
        act_area += act.sum((0, 2))
        mask_area += masks.sum((0, 2))
    return (inter / (act_area[:, None] + mask_area[None] - inter).clamp(min=1)).numpy()


def run() -> list[dict]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = ConceptWorld(n_classes=16)
    batch = world.sample(128, split="test")
    concepts = lavise.world_concepts(world)
    features = torch.rand(len(batch), 256, 8, 8, generator=torch.Generator().manual_seed(0))
    thresholds = lavise.activation_thresholds(features, 0.99)
    data = lavise.WorldImages(batch, concepts, world.class_names)
    fast = lavise.dissect(features, data, thresholds, iou_size=32, progress=False)
    slow = _dissect_materialised(features, batch, concepts, world.class_names, thresholds, 32)
    if not np.allclose(fast, slow, atol=1e-5):
        raise AssertionError("region-composed and materialised dissection disagree")
    t_fast = timed(lambda: lavise.dissect(features, data, thresholds, iou_size=32, progress=False), repeat=2)
    t_slow = timed(
        lambda: _dissect_materialised(features, batch, concepts, world.class_names, thresholds, 32), repeat=2
    )
    return [
        figure(
            "lavise_dissect_256_filters_32px",
            len(batch) / t_fast,
            "images/s",
            baseline=len(batch) / t_slow,
            baseline_kind="materialised concept masks",
            n_concepts=len(concepts),
        )
    ]
