"""World-CLIP training speed: seconds per step of chapter 1's configuration, and the full run projected.

Baselines, measured in the same run: the same steps fed through open_clip's own per-image PIL
preprocess instead of the vectorised ``images_to_tensor`` the training loop uses; and the same steps
(chapter 1's batch of 128, chapter 7's planted batch of 64) with AdamW's per-parameter loop instead of
its fused kernel (``TrainConfig.fused_adamw``).
"""

import tempfile
import time
from dataclasses import replace

import numpy as np
import open_clip
import torch
from PIL import Image

from conceptlab.bench import figure
from conceptlab.models import TrainConfig, _quiet_random_init, images_to_tensor, train_world_clip
from conceptlab.world import ConceptWorld, WorldConfig

STEPS = 8


def _seconds_per_step(cfg: TrainConfig, world: ConceptWorld) -> float:
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        train_world_clip(world, cfg, out, progress=False, on_step=lambda step: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps)))


def _pil_preprocess_seconds(cfg: TrainConfig, world: ConceptWorld) -> float:
    """Extra time per step if each batch went through open_clip's per-image PIL transform."""
    with _quiet_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.arch)
    images = world.sample(cfg.batch_size).images
    t0 = time.perf_counter()
    torch.stack([preprocess(Image.fromarray(im)) for im in images])
    pil = time.perf_counter() - t0
    t0 = time.perf_counter()
    images_to_tensor(images, model)
    return pil - (time.perf_counter() - t0)


def run() -> list[dict]:
    world = ConceptWorld(WorldConfig())
    default = TrainConfig()
    cfg = replace(default, n_train=2 * default.batch_size, steps=STEPS, warmup=1)
    ours = _seconds_per_step(cfg, world)
    baseline = ours + _pil_preprocess_seconds(cfg, world)
    return [
        figure(
            "world_clip_step",
            ours,
            "s/step",
            baseline=baseline,
            higher_is_better=False,
            threads=torch.get_num_threads(),
            batch_size=cfg.batch_size,
        ),
        figure("world_clip_full_run_projected", ours * default.steps, "s", steps=default.steps),
        *(
            figure(
                f"world_clip_step_fused_adamw_batch_{batch}",
                ours if batch == cfg.batch_size else _seconds_per_step(replace(cfg, batch_size=batch), world),
                "s/step",
                baseline=_seconds_per_step(replace(cfg, batch_size=batch, fused_adamw=False), world),
                baseline_kind="AdamW's per-parameter loop",
                higher_is_better=False,
            )
            for batch in (default.batch_size, 64)
        ),
    ]
