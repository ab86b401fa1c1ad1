"""Book lanes (``python -m conceptlab.bookrun --lanes 2``): two chapters side by side, the cores shared out,
against the same work one after the other with every core.

The work is what dominates a build from scratch: world CLIPs trained with chapter 7's planted recipe (two
seeds, ``STEPS`` steps each). Baseline, measured in the same run: one process trains both, one after the
other, with this machine's default threads. Lanes: two processes at once, each with
:func:`~conceptlab.bookrun.lane_threads` threads. Both pay their processes' start.
"""

import os
import subprocess
import sys
import time

from conceptlab.bench import figure
from conceptlab.bookrun import lane_threads

STEPS = 60
_TRAIN = """
import sys, tempfile
from dataclasses import replace
from conceptlab import verdict as vd
from conceptlab.models import TrainConfig, train_world_clip
from conceptlab.world import ConceptWorld, WorldConfig
world = ConceptWorld(vd.planted_world("no-shortcut", WorldConfig(), vd.PLANTED_BLIND, vd.PLANTED_CLASSES))
for seed in map(int, sys.argv[1:]):
    cfg = replace(vd.planted_recipe(TrainConfig(), steps={steps}), seed=seed)
    with tempfile.TemporaryDirectory() as out:
        train_world_clip(world, cfg, out, progress=False)
"""


def _processes(seed_groups: list[list[int]], threads: int | None) -> float:
    """Wall seconds of one process per seed group, all started at once."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code = _TRAIN.format(steps=STEPS)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, seeds)], env=env) for seeds in seed_groups]
    if any(p.wait() for p in procs):
        raise RuntimeError("a benchmark process failed")
    return time.perf_counter() - t0


def run() -> list[dict]:
    sequential = _processes([[0, 1]], None)
    threads = lane_threads(2)
    lanes = _processes([[0], [1]], threads)
    return [
        figure(
            "two_planted_clips_in_two_lanes",
            lanes,
            "s",
            baseline=sequential,
            higher_is_better=False,
            steps=STEPS,
            threads_per_lane=threads,
        )
    ]
