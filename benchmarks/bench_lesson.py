"""Lesson mode: how long each chapter takes to rerun on its lesson parameters (budget: 60 s).

A class reruns a chapter after ``make lesson`` has built its artifacts, so this times reruns: a
chapter whose lesson copy is missing from ``lessons/`` (``make lesson`` not run) is first run once,
untimed, to build them. Executed copies and results of the timed runs go to a scratch folder.
"""

import tempfile
import time
from pathlib import Path

from conceptlab.bench import figure
from conceptlab.bookrun import ROOT, chapters, parameter_set, run_chapter

BUDGET_S = 60.0
LESSONS = ROOT / "lessons"  # where `make lesson` writes the executed lesson copies


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for chapter in chapters():
            params = {**parameter_set("lesson", chapter), "results_dir": str(out / "results")}
            if not (LESSONS / f"{chapter}.ipynb").exists():
                run_chapter(chapter, out, params)
            start = time.perf_counter()
            run_chapter(chapter, out, params)
            seconds = time.perf_counter() - start
            rows.append(
                figure(
                    f"lesson_rerun_{chapter}",
                    seconds,
                    "s",
                    baseline=BUDGET_S,
                    higher_is_better=False,
                    baseline_kind="budget",
                )
            )
    return rows
