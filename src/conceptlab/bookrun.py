"""Execute the chapter notebooks with papermill: ``python -m conceptlab.bookrun [--smoke]``.

Default parameters write executed copies to ``book/chapters/`` for jupyter-book; ``--smoke``
uses ``notebooks/smoke.yml`` (every chapter in seconds). An executed copy is written to a
temporary file first, so a failing run never replaces the last good one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def chapters() -> list[str]:
    """Chapter names (notebook stems) in book order."""
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def smoke_parameters(chapter: str, workdir: Path) -> dict:
    """The smoke parameter set of a chapter, writing into ``workdir``."""
    table = yaml.safe_load((NOTEBOOKS / "smoke.yml").read_text()) or {}
    params = dict(table.get("common", {}))
    params.update(table.get(chapter, {}))
    params.update(artifacts_dir=str(workdir / "artifacts"), results_dir=str(workdir / "results"))
    return params


def run_chapter(chapter: str, out_dir: Path, parameters: dict | None = None) -> Path:
    """Execute one chapter with papermill (cwd = notebooks/); return the executed copy."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chapter}.ipynb"
    tmp = out_dir / f".{chapter}.running.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{chapter}.ipynb"), str(tmp), parameters=parameters or {},
                        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="use the smoke parameter set")
    ap.add_argument("--out", type=Path, default=None, help="where executed notebooks go")
    ap.add_argument("--chapters", default="all", help="comma-separated chapter stems, or 'all'")
    args = ap.parse_args(argv)
    names = chapters() if args.chapters == "all" else args.chapters.split(",")
    unknown = sorted(set(names) - set(chapters()))
    if unknown:
        ap.error(f"unknown chapters {unknown}; known: {chapters()}")
    out = args.out or (ROOT / "_build" / "smoke" if args.smoke else ROOT / "book" / "chapters")
    for name in names:
        t0 = time.time()
        params = smoke_parameters(name, out.resolve()) if args.smoke else {}
        run_chapter(name, out, params)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
