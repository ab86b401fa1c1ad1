"""Chapter 7's planted CLIPs: seconds per model, and whether the measurement still recovers what was
planted, under a few training recipes (the chapter trains conditions x seeds of them, 9 by default).

A recipe is good enough when every planted model learned (zero-shot accuracy on the prototypical images
at least twice chance) and the measured reliance recovers both planted answers (every shortcut model
relies more on the habitat than every no-shortcut model; every blind model less on the blinded
attribute): ``verdict.planted_recovered``, the chapter's own check. The baseline, measured in the same
run, is the chapter's default recipe at the time of writing (300 steps of 64 on 4,000 images).

``CONCEPTLAB_PLANTED=name,name`` picks recipes; ``CONCEPTLAB_PLANTED_SEEDS`` sets the seeds (default 2).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace

from conceptlab.artifacts import ArtifactStore
from conceptlab.bench import figure
from conceptlab.models import TrainConfig
from conceptlab.verdict import measure, planted_check, planted_models, planted_recovered
from conceptlab.world import WorldConfig

CONDITIONS = ("shortcut", "no-shortcut", "blind")
BLIND, N_CLASSES, N_IMAGES = "head colour", 6, 256
BASELINE = TrainConfig(n_train=4000, steps=300, batch_size=64, lr=1e-3, warmup=30)
RECIPES: dict[str, TrainConfig] = {
    "300x64_4k": BASELINE,
    "150x64_2k": replace(BASELINE, steps=150, warmup=15, n_train=2000),
    "100x64_2k": replace(BASELINE, steps=100, warmup=10, n_train=2000),
    "100x32_2k": replace(BASELINE, steps=100, warmup=10, batch_size=32, n_train=2000),
}


def run() -> Iterator[dict]:
    wanted = [n for n in os.environ.get("CONCEPTLAB_PLANTED", ",".join(RECIPES)).split(",") if n]
    wanted = ["300x64_4k", *(n for n in wanted if n != "300x64_4k")]  # the baseline first, always
    n_seeds = int(os.environ.get("CONCEPTLAB_PLANTED_SEEDS", "2"))
    baseline = None
    for name in wanted:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            subjects = planted_models(
                ArtifactStore(folder), WorldConfig(), RECIPES[name], CONDITIONS, n_seeds, BLIND, N_CLASSES, False
            )
            per_model = (time.perf_counter() - start) / len(subjects)
            check = planted_check({s.name: measure(s, N_IMAGES) for s in subjects}, subjects, BLIND)
        baseline = baseline or per_model
        yield figure(
            f"planted_{name}",
            per_model,
            "s/model",
            baseline=baseline,
            higher_is_better=False,
            recovered=planted_recovered(check, N_CLASSES),
            accuracy=check["base accuracy"].round(3).to_dict(),
            habitat=check["habitat reliance"].round(3).to_dict(),
            blinded=check["blinded factor reliance"].round(3).to_dict(),
        )
