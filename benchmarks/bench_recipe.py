"""World-CLIP sample efficiency: steps and seconds to 92 % zero-shot top-1 under a few training recipes.

Each recipe trains the world CLIP of chapter 1 (default 16-class world) from scratch and evaluates
zero-shot top-1 on the first ``N_TEST`` test images every ``EVERY`` steps (evaluation time is not
counted). A recipe's figure is the wall time the chapter pays for it (the whole schedule, rendering
the training set included), with the steps and seconds at which it first reached 92 % and its final
accuracy. The baseline, measured in the same run, is the old default recipe (450 steps of 128,
lr 1e-3, warm-up 50, 20,000 images), projected from the seconds per step of the first batch-128
recipe and the measured rendering rate (its accuracy reaches 92 % only with its whole schedule).
Steps do not depend on how busy the machine is; seconds do, so compare ratios within one run.

``CONCEPTLAB_RECIPES=name,name`` picks recipes (all by default: one full training each, minutes apiece).
Rows are yielded as each recipe finishes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from open_clip import get_tokenizer

from conceptlab.bench import figure
from conceptlab.models import TrainConfig, train_world_clip, zero_shot
from conceptlab.world import ConceptWorld, WorldConfig

TARGET = 0.92
EVERY = 25
N_TEST = 1000
OLD_DEFAULT = TrainConfig(n_train=20000, steps=450, batch_size=128, lr=1e-3, warmup=50)
RECIPES: dict[str, TrainConfig] = {
    "lr2e-3_b128_200steps_8k": replace(OLD_DEFAULT, lr=2e-3, warmup=20, steps=200, n_train=8000),
    "lr3e-3_b128_150steps_8k": replace(OLD_DEFAULT, lr=3e-3, warmup=15, steps=150, n_train=8000),
    "lr2e-3_b64_300steps_8k": replace(OLD_DEFAULT, lr=2e-3, warmup=20, steps=300, batch_size=64, n_train=8000),
    # the best of four batch-64 variants measured on 2026-11-28 (lr 1e-3, 2e-3, 3e-3; 8,000 or 19,200 images)
    "lr1e-3_b64_300steps_8k": replace(OLD_DEFAULT, lr=1e-3, warmup=30, steps=300, batch_size=64, n_train=8000),
    # measured on 2026-11-29 (1,000 test images): 0.890 after 300 steps of 128 at lr 2e-3 (no 92 %); 0.921 after
    # 600 steps of 64 (92 % first at step 525); 0.930 after 700 steps of 64, but chapter 5's concept-probe accuracy
    # fell from 0.9315 and 0.927 (the default recipe, seeds 0 and 1) to 0.920 and 0.920 (below its interval) for 14-29 %
    # less training time (steps of 64 cost 0.51 s, of 128 0.91-1.18 s in the same hour): not adopted
    "lr2e-3_b128_300steps_20k": replace(OLD_DEFAULT, lr=2e-3, warmup=30, steps=300),
    "lr1e-3_b64_600steps_20k": replace(OLD_DEFAULT, warmup=60, steps=600, batch_size=64),
    "lr1e-3_b64_700steps_20k": replace(OLD_DEFAULT, warmup=70, steps=700, batch_size=64),
}


def train_and_evaluate(cfg: TrainConfig, world: ConceptWorld, every: int = EVERY) -> list[dict]:
    """Train ``cfg`` from scratch; its history, with ``top1`` every ``every`` steps and at the end."""
    test = world.sample(N_TEST, split="test")
    tokenizer = get_tokenizer(cfg.arch)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"top1": zero_shot(model, tokenizer, test.images, test.labels, world.class_names)[1]["top1"]}

    with tempfile.TemporaryDirectory() as out:
        return train_world_clip(world, cfg, out, progress=False, evaluate=evaluate, evaluate_every=every)


def first_reaching(history: list[dict], target: float = TARGET) -> dict | None:
    """The first evaluated step whose top-1 reaches ``target`` (None if none does)."""
    return next((h for h in history if h.get("top1", -1.0) >= target), None)


def step_seconds(history: list[dict]) -> float:
    """Median wall seconds of one training step (rendering and evaluation left out)."""
    return float(np.median(np.diff([h["seconds"] for h in history])))


def render_seconds(world: ConceptWorld, n: int = 2048) -> float:
    """Seconds to render one training image (the loop renders ``n_train`` before its first step)."""
    start = time.perf_counter()
    world.sample(n, split="train")
    return (time.perf_counter() - start) / n


def run() -> Iterator[dict]:
    world = ConceptWorld(WorldConfig())
    wanted = [n for n in os.environ.get("CONCEPTLAB_RECIPES", ",".join(RECIPES)).split(",") if n]
    per_image = render_seconds(world)
    yield figure("render_train_image", per_image, "s/image")
    baseline = None
    for name in wanted:
        cfg = RECIPES[name]
        history = train_and_evaluate(cfg, world)
        per_step = step_seconds(history)
        if baseline is None and cfg.batch_size == OLD_DEFAULT.batch_size:
            baseline = OLD_DEFAULT.n_train * per_image + OLD_DEFAULT.steps * per_step
            yield figure("old_default_projected", baseline, "s", steps=OLD_DEFAULT.steps, step_seconds=per_step)
        hit = first_reaching(history)
        yield figure(
            f"recipe_{name}",
            history[-1]["seconds"],
            "s",
            baseline=baseline,
            higher_is_better=False,
            final_top1=round(history[-1]["top1"], 4),
            steps_to_92=hit and hit["step"] + 1,
            seconds_to_92=hit and round(hit["seconds"], 1),
            step_seconds=round(per_step, 4),
            threads=torch.get_num_threads(),
            curve=[(h["step"] + 1, round(h["top1"], 3)) for h in history if "top1" in h],
            **{k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "warmup", "n_train")},
        )
