"""Execute the chapter notebooks with papermill: ``python -m conceptlab.bookrun [--smoke | --lesson]``.

Default parameters write executed copies to ``book/chapters/`` for jupyter-book and the book's
headline table to ``book/results/headline.md``; ``--smoke`` uses ``notebooks/smoke.yml`` (every
chapter in seconds, artifacts in a scratch folder); ``--lesson`` uses ``notebooks/lesson.yml`` (a
class's live session, sharing the book's artifacts). An executed copy is written to a temporary
file first, so a failing run never replaces the last good one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def chapters() -> list[str]:
    """Chapter names (notebook stems) in book order."""
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(chapter: str) -> set[str]:
    """Names assigned in the chapter's parameters cell."""
    import papermill as pm

    return set(pm.inspect_notebook(str(NOTEBOOKS / f"{chapter}.ipynb")))


def parameter_set(name: str, chapter: str, workdir: Path | None = None) -> dict:
    """A chapter's parameters from ``notebooks/<name>.yml`` (``smoke`` or ``lesson``).

    The file's ``common`` block applies to every chapter that declares those names; the chapter's
    own block overrides it. With ``workdir``, artifacts and results go there.
    """
    table = yaml.safe_load((NOTEBOOKS / f"{name}.yml").read_text()) or {}
    declared = declared_parameters(chapter)
    params = {k: v for k, v in (table.get("common") or {}).items() if k in declared}
    params.update(table.get(chapter) or {})
    if workdir is not None:
        params.update(artifacts_dir=str(workdir / "artifacts"), results_dir=str(workdir / "results"))
    return params


def smoke_parameters(chapter: str, workdir: Path) -> dict:
    """The smoke parameter set of a chapter, with artifacts and results in ``workdir``."""
    return parameter_set("smoke", chapter, workdir)


def run_chapter(chapter: str, out_dir: Path, parameters: dict | None = None) -> Path:
    """Execute one chapter with papermill (cwd = notebooks/); return the executed copy."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CONCEPTLAB_INTERACTIVE"] = "0"  # a book page shows static figures, never live widgets
    target = out_dir / f"{chapter}.ipynb"
    tmp = out_dir / f".{chapter}.running.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{chapter}.ipynb"), str(tmp), parameters=parameters or {},
                        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    _hide_injected_parameters(tmp)
    os.replace(tmp, target)
    return target


def _hide_injected_parameters(path: Path) -> None:
    """Collapse papermill's injected-parameters cell on the page, like the parameters cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    nbformat.write(nb, path)


def headline_table(results_dir: Path) -> str:
    """The book's headline numbers, one row per (chapter, measure), as a Markdown table."""
    from .plots import human_label

    rows = ["| chapter | measure | value |", "| --- | --- | --- |"]
    for path in sorted(results_dir.glob("[0-9][0-9]_*.json")):
        record = json.loads(path.read_text())
        for measure, value in (record.get("headline") or {}).items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            rows.append(f"| {record['chapter']} | {human_label(measure)} | {shown} |")
    return "\n".join(rows) + "\n"


BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib", "book/intro.md", "book/references.md", "book/_static")


def assemble_book(dest: Path, executed: Path, results: Path) -> Path:
    """A buildable copy of the book in ``dest``: configuration, pages, executed chapters, headline table."""
    for name in BOOK_FILES:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, dirs_exist_ok=True)
        else:
            shutil.copy(ROOT / name, target)
    (dest / "book" / "chapters").mkdir(parents=True, exist_ok=True)
    for notebook in executed.glob("[0-9][0-9]_*.ipynb"):
        shutil.copy(notebook, dest / "book" / "chapters" / notebook.name)
    (dest / "book" / "results").mkdir(parents=True, exist_ok=True)
    (dest / "book" / "results" / "headline.md").write_text(headline_table(results))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sets = ap.add_mutually_exclusive_group()
    sets.add_argument("--smoke", action="store_true", help="use notebooks/smoke.yml (seconds per chapter)")
    sets.add_argument("--lesson", action="store_true", help="use notebooks/lesson.yml (a live class)")
    ap.add_argument("--out", type=Path, default=None, help="where executed notebooks go")
    ap.add_argument("--chapters", default="all", help="comma-separated chapter stems, or 'all'")
    args = ap.parse_args(argv)
    names = chapters() if args.chapters == "all" else args.chapters.split(",")
    unknown = sorted(set(names) - set(chapters()))
    if unknown:
        ap.error(f"unknown chapters {unknown}; known: {chapters()}")
    kind = "smoke" if args.smoke else "lesson" if args.lesson else None
    out = args.out or (ROOT / "_build" / kind if kind else ROOT / "book" / "chapters")
    for name in names:
        t0 = time.time()
        if kind == "smoke":
            params = smoke_parameters(name, out.resolve())
        elif kind == "lesson":
            params = {**parameter_set("lesson", name), "results_dir": str((out / "results").resolve())}
        else:
            params = {}
        run_chapter(name, out, params)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    if kind is None:
        results = ROOT / "book" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "headline.md").write_text(headline_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
