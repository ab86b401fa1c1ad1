"""Run every benchmark in ``benchmarks/bench_*.py`` and print one JSON line per figure.

A benchmark module defines ``run() -> list[dict]``; each dict has ``name``, ``value``,
``unit`` and, where the figure has a baseline measured in the same run, ``baseline``
(the baseline's value) and ``ratio``. ``python -m conceptlab.bench [name ...]`` runs all or some.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def figure(
    name: str, value: float, unit: str, baseline: float | None = None, higher_is_better: bool = True, **extra
) -> dict:
    """One benchmark figure; ``ratio`` says how many times better than the baseline it is."""
    out = {"name": name, "value": round(value, 4), "unit": unit, **extra}
    if baseline is not None:
        out["baseline"] = round(baseline, 4)
        out["ratio"] = round(value / baseline if higher_is_better else baseline / value, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    wanted = set(argv if argv is not None else sys.argv[1:])
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        if wanted and path.stem.removeprefix("bench_") not in wanted:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for row in module.run():
            print(json.dumps({"benchmark": path.stem.removeprefix("bench_"), **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
