"""Concept World rendering speed on one core (goal: >= 2,000 images/s at 64x64)."""

import os

import torch

from conceptlab.bench import figure, timed
from conceptlab.world import ConceptWorld


def run() -> list[dict]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for resolution, n in ((64, 4096), (224, 512)):
        world = ConceptWorld(resolution=resolution)
        world.sample(8)  # warm up
        seconds = timed(lambda w=world, n=n: w.sample(n), repeat=3)
        goal = 2000.0 if resolution == 64 else None
        rows.append(
            figure(
                f"world_render_{resolution}px",
                n / seconds,
                "images/s",
                baseline=goal,
                baseline_kind="goal" if goal else None,
            )
        )
    return rows
