"""Book lanes (``python -m conceptlab.bookrun --lanes 2``): two chapters side by side, each with the threads of a
build without lanes and waiting threads asleep (:data:`~conceptlab.bookrun.LANE_ENVIRONMENT`), against the same
work one after the other.

The work is what dominates a build from scratch: world CLIPs trained with chapter 7's planted recipe (two
seeds, ``STEPS`` steps each). Baseline, measured in the same run: one process trains both, one after the
other, with the same threads. Lanes: two processes at once. Both pay their processes' start. The figure also
says whether the lanes' weights equal the baseline's to the last bit (what lets a build in lanes publish the
same numbers as one without).
"""

import os
import subprocess
import sys
import tempfile
import time

from conceptlab.bench import figure
from conceptlab.bookrun import LANE_ENVIRONMENT

STEPS = 60
_TRAIN = """
import hashlib, sys, tempfile, torch
from dataclasses import replace
from conceptlab import verdict as vd
from conceptlab.models import TrainConfig, train_world_clip
from conceptlab.world import ConceptWorld, WorldConfig
world = ConceptWorld(vd.planted_world("no-shortcut", WorldConfig(), vd.PLANTED_BLIND, vd.PLANTED_CLASSES))
for seed in map(int, sys.argv[2:]):
    cfg = replace(vd.planted_recipe(TrainConfig(), steps={steps}), seed=seed)
    with tempfile.TemporaryDirectory() as out:
        train_world_clip(world, cfg, out, progress=False)
        weights = torch.load(out + "/model.pt", weights_only=True)
    digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in weights.values())).hexdigest()
    open(f"{{sys.argv[1]}}/{{seed}}", "w").write(digest)
"""


def _processes(seed_groups: list[list[int]], env: dict[str, str], digests: str) -> float:
    """Wall seconds of one process per seed group, all started at once; each seed's weight digest in ``digests``."""
    code = _TRAIN.format(steps=STEPS)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-c", code, digests, *map(str, seeds)], env=env) for seeds in seed_groups
    ]
    if any(p.wait() for p in procs):
        raise RuntimeError("a benchmark process failed")
    return time.perf_counter() - t0


def _read(folder: str) -> dict[str, str]:
    return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}


def run() -> list[dict]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        sequential = _processes([[0, 1]], env, one)
        lanes = _processes([[0], [1]], {**env, **LANE_ENVIRONMENT}, two)
        identical = _read(one) == _read(two)
    return [
        figure(
            "two_planted_clips_in_two_lanes",
            lanes,
            "s",
            baseline=sequential,
            higher_is_better=False,
            steps=STEPS,
            weights_identical=identical,
        )
    ]
