"""Execute the chapter notebooks with papermill: ``python -m conceptlab.bookrun [--smoke | --lesson | --params F]``.

Default parameters write executed copies to ``book/chapters/`` for jupyter-book and the book's intro
table (one row per method, with chapter 7's verdict) to ``book/results/headline.md``; ``--smoke`` uses
``notebooks/smoke.yml`` (every chapter in seconds, artifacts in a scratch folder, one warm kernel); ``--lesson`` uses
``notebooks/lesson.yml`` (a class's live session, sharing the book's artifacts). ``--params my.yml --out
DIR`` builds the book of *your* model and data: a ``common`` block (model, pretrained, dataset,
data_root, ...) and one block per chapter, every chapter that applies to those inputs run, the others
skipped with the reason, and a separate HTML book in ``DIR/_build/html`` (``examples/my_model.yml`` is
an example).

An executed copy is written to a temporary file first, so a failing run never replaces the last good
one; a failed run's copy is kept in ``<out>/failed/``. Every run prints and saves a time table
(``<results>/timings.json``): seconds per chapter and per stage, the total, and whether it started
from an empty artifact store.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import STAT_CACHE, atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_ARTIFACTS = ROOT / "artifacts"  # the notebooks' default, ../artifacts from notebooks/


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


class WarmKernel:
    """One Jupyter kernel that executes several chapters in turn, so the imports (about 20 s of every
    smoke chapter: torch, open_clip, transformers) are paid once. Used for smoke runs and the tests;
    the book and the lessons run each chapter in a fresh kernel, as a reader does.

    Before each chapter the kernel's namespace and execution count are reset (IPython's ``reset``):
    a chapter sees nothing the last one defined. Imported modules stay. A kernel that died is
    replaced. Use as a context manager (``with WarmKernel() as kernel: run_chapter(..., kernel=kernel)``).
    """

    def __init__(self) -> None:
        self.manager = self._new_manager()

    @staticmethod
    def _new_manager() -> Any:
        from jupyter_client.manager import AsyncKernelManager

        return AsyncKernelManager(kernel_name="python3")

    def prepare(self) -> Any:
        """The kernel manager for the next chapter (papermill starts it on first use)."""
        from jupyter_core.utils import run_sync

        if self.manager.has_kernel:
            if run_sync(self.manager.is_alive)():
                self._execute("get_ipython().reset(new_session=True)")
            else:
                self.close()
                self.manager = self._new_manager()
        return self.manager

    def _execute(self, code: str) -> None:
        from jupyter_client import BlockingKernelClient

        client = BlockingKernelClient(connection_file=self.manager.connection_file)
        client.load_connection_file()
        client.start_channels()
        try:
            reply = client.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        finally:
            client.stop_channels()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the warm kernel could not run {code!r}: {reply['content'].get('evalue')}")

    def close(self) -> None:
        from jupyter_core.utils import run_sync

        if self.manager.has_kernel:
            run_sync(self.manager.shutdown_kernel)(now=True)

    def __enter__(self) -> WarmKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_chapter(chapter: str, out_dir: Path, parameters: dict | None = None, kernel: WarmKernel | None = None) -> Path:
    """Execute one chapter with papermill (cwd = notebooks/); return the executed copy.

    A run that fails leaves its partly executed copy in ``out_dir/failed/`` (never a hidden file).
    With ``kernel``, the chapter runs in that warm kernel instead of a fresh one."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CONCEPTLAB_INTERACTIVE"] = "0"  # a book page shows static figures, never live widgets
    target = out_dir / f"{chapter}.ipynb"
    tmp = out_dir / f".{chapter}.running.ipynb"
    failed = out_dir / "failed" / f"{chapter}.ipynb"
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / f"{chapter}.ipynb"),
            str(tmp),
            parameters=parameters or {},
            cwd=str(NOTEBOOKS),
            kernel_name="python3",
            progress_bar=False,
            **({"km": kernel.prepare()} if kernel is not None else {}),
        )
    except BaseException:
        if tmp.exists():
            failed.parent.mkdir(exist_ok=True)
            os.replace(tmp, failed)
            print(f"{chapter} failed: its executed copy up to the error is {failed}", file=sys.stderr)
        raise
    _hide_injected_parameters(tmp)
    os.replace(tmp, target)
    failed.unlink(missing_ok=True)
    return target


# ------------------------------------------------------------------------------------------- lanes
# Chapter 1 trains the CLIP every later chapter loads: in a lane the other lanes would only wait on its lock, so it
# runs alone, with every core, before the lanes start.
RUNS_ALONE = ("01_world_and_model",)


# A lane's kernel keeps the threads a kernel without lanes has (torch rounds by its thread count, so a build in
# lanes gives the same bits as one without), and its OpenMP threads that wait for work sleep instead of spinning,
# so that lanes sharing the cores take turns on them (two planted CLIPs in two lanes of two threads on 2 cores:
# 122 s spinning, 49 s sleeping, 58 s one after the other; the weights identical to the last bit in all three).
LANE_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


# Lanes start with the chapters that took longest in the book's build from an empty store (2026-11-29), so that
# the lanes end close together; chapters 4 and 7 share their planted models and build different ones side by side.
SLOWEST_FIRST = ("04_ex2", "07_verdict", "03_deal", "06_lavise", "05_discover_then_name", "02_descriptors")


def slowest_first(names: list[str]) -> list[str]:
    """``names`` in :data:`SLOWEST_FIRST`'s order; chapters it does not list follow in book order."""
    return sorted(names, key=lambda name: SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST))


def error_line(err: BaseException) -> str:
    """An error in one line: its type and the last line of its message (papermill's messages end with the cause)."""
    last = (str(err).strip().splitlines() or [""])[-1]
    return f"{type(err).__name__}: {last[:300]}"


def _lane_chapter(chapter: str, out_dir: Path, parameters: dict, done: Any) -> None:
    """A lane's chapter: run it, report ``(chapter, seconds, error)`` on ``done``."""
    t0, error = time.perf_counter(), None
    try:
        with terminate_as_exception():
            run_chapter(chapter, out_dir, parameters)
    except BaseException as err:  # reported to the parent, which stops the build
        error = error_line(err)
    done.put((chapter, time.perf_counter() - t0, error))


def _lane(worker: Callable[..., None], *job: Any) -> None:
    """A lane's process: :data:`LANE_ENVIRONMENT` for the kernel it starts, then ``worker(*job)``."""
    os.environ.update(LANE_ENVIRONMENT)
    worker(*job)


def run_in_lanes(
    jobs: list[tuple[str, dict]],
    out_dir: Path,
    lanes: int,
    on_done: Callable[[str, float], None],
    worker: Callable[..., None] = _lane_chapter,
) -> None:
    """Run ``(chapter, parameters)`` jobs, ``lanes`` at a time, each in its own process with the threads a build
    without lanes has, so the same bits (:data:`LANE_ENVIRONMENT`; ``python -m conceptlab.bench lanes`` measures
    the gain on your machine). Jobs start in the order given. ``on_done(chapter, seconds)`` is
    called as each finishes. A failed chapter stops the build: the running ones finish, the others do not
    start, and the error is raised; SIGTERM stops every lane (each keeps its partly executed copy in ``failed/``).
    ``worker`` (importable, with :func:`_lane_chapter`'s signature) runs one job in its process."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    context = mp.get_context("spawn")  # a fresh interpreter per chapter, as a fresh kernel is
    done = context.Queue()
    pending = list(jobs)
    running: dict[str, Any] = {}  # chapter -> its process
    reports: dict[str, tuple[float, str | None]] = {}
    failures: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < lanes and not failures:
                chapter, params = pending.pop(0)
                running[chapter] = context.Process(
                    target=_lane, args=(worker, chapter, out_dir, params, done), name=chapter
                )
                running[chapter].start()
            if not running:
                break
            wait([p.sentinel for p in running.values()])
            finished = [chapter for chapter, process in running.items() if not process.is_alive()]
            while any(chapter not in reports for chapter in finished):
                try:
                    chapter, seconds, error = done.get(timeout=10)
                except queue.Empty:  # a process killed outright (out of memory) reports nothing
                    break
                reports[chapter] = (seconds, error)
            for chapter in finished:
                process = running.pop(chapter)
                process.join()
                seconds, error = reports.pop(chapter, (0.0, f"its process ended with code {process.exitcode}"))
                if error:
                    failures.append(f"{chapter}: {error}")
                else:
                    on_done(chapter, seconds)
    except BaseException:
        for process in running.values():
            process.terminate()  # SIGTERM: the lane keeps its partly executed copy
        for process in running.values():
            process.join()
        raise
    if failures:
        raise RuntimeError("chapters failed in their lanes: " + "; ".join(failures))


def _hide_injected_parameters(path: Path) -> None:
    """Collapse papermill's injected-parameters cell on the page, like the parameters cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    nbformat.write(nb, path)


def _number(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def headline_table(results_dir: Path) -> str:
    """The book's headline numbers, one row per (chapter, measure), as a Markdown table: the value,
    its 95 % interval and chance where the chapter reports them."""
    from .plots import human_label

    rows = ["| chapter | measure | value | 95 % interval | chance |", "| --- | --- | --- | --- | --- |"]
    for path in sorted(results_dir.glob("[0-9][0-9]_*.json")):
        record = json.loads(path.read_text())
        for measure, value in (record.get("headline") or {}).items():
            r = value if isinstance(value, dict) else {"value": value}
            interval = "—" if r.get("low") is None else f"[{_number(r['low'])}, {_number(r.get('high'))}]"
            rows.append(
                f"| {record['chapter']} | {human_label(measure)} | {_number(r.get('value'))} | {interval} "
                f"| {_number(r.get('chance'))} |"
            )
    return "\n".join(rows) + "\n"


def intro_table(results_dir: Path) -> str:
    """The intro's table of a run: the verdict chapter's ``intro_table`` where it exists, else the headlines."""
    try:
        from .chapters import verdict
    except ImportError:
        verdict = None
    if verdict is None or not hasattr(verdict, "intro_table"):
        return headline_table(results_dir)
    table = verdict.intro_table(results_dir)
    if isinstance(table, str):
        return table
    return table.to_html() if hasattr(table, "to_html") else str(table)


BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib", "book/intro.md", "book/references.md", "book/_static")


def _copy(names: tuple[str, ...], dest: Path) -> None:
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, dirs_exist_ok=True)
        elif (ROOT / name).exists():
            shutil.copy(ROOT / name, target)


def assemble_book(dest: Path, executed: Path, results: Path) -> Path:
    """A buildable copy of the book in ``dest``: configuration, pages, executed chapters, headline table."""
    _copy(BOOK_FILES + tuple(p.relative_to(ROOT).as_posix() for p in (ROOT / "book").glob("*.md")), dest)
    (dest / "book" / "chapters").mkdir(parents=True, exist_ok=True)
    for notebook in executed.glob("[0-9][0-9]_*.ipynb"):
        shutil.copy(notebook, dest / "book" / "chapters" / notebook.name)
    (dest / "book" / "results").mkdir(parents=True, exist_ok=True)
    (dest / "book" / "results" / "headline.md").write_text(intro_table(results))
    return dest


# ------------------------------------------------------------------------------------------ timings
def store_is_empty(artifacts_dir: Path) -> bool:
    """Whether an artifact store holds nothing yet (a build from it starts from scratch)."""
    return not artifacts_dir.is_dir() or not any(p.name != STAT_CACHE for p in artifacts_dir.iterdir())


def cell_durations(executed: Path) -> list[tuple[str, float]]:
    """``(label, seconds)`` of every code cell of an executed notebook, from papermill's metadata."""
    import nbformat

    out = []
    for i, cell in enumerate(nbformat.read(executed, as_version=4).cells):
        seconds = (cell.metadata.get("papermill") or {}).get("duration")
        if cell.cell_type == "code" and seconds is not None:
            first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
            out.append((f"cell {i}: {first.strip()[:40]}", float(seconds)))
    return out


def chapter_timing(chapter: str, seconds: float, executed: Path | None, results_dir: Path) -> dict[str, Any]:
    """A chapter's seconds and stages: the ``timings`` its results JSON carries (``ch.stage``), else its
    slowest cells (papermill's durations, cells of at least a second)."""
    stages, source = {}, "none"
    record = results_dir / f"{chapter}.json"
    if record.is_file():
        stages, source = dict(json.loads(record.read_text()).get("timings") or {}), "stages"
    if not stages and executed is not None and executed.is_file():
        stages = {label: round(s, 2) for label, s in cell_durations(executed) if s >= 1.0}
        source = "cells"
    return {"seconds": round(seconds, 2), "stages": stages, "stages_from": source}


def write_timings(
    path: Path,
    chapter_rows: Mapping[str, Mapping[str, Any]],
    total: float,
    from_scratch: bool,
    artifacts_dir: Path,
    lanes: int = 1,
) -> dict[str, Any]:
    """Save and print the build's time table (``timings.json``); with ``lanes`` > 1 a chapter's seconds are
    those of its lane, beside the other lanes."""
    record = {
        "total_seconds": round(total, 2),
        "from_scratch": from_scratch,
        "from_scratch_total_seconds": round(total, 2) if from_scratch else None,
        "artifacts_dir": str(artifacts_dir),
        "lanes": lanes,
        "chapters": dict(chapter_rows),
    }
    atomic_write_json(path, record)
    print(timings_text(record), flush=True)
    return record


def timings_text(record: Mapping[str, Any]) -> str:
    """The time table as text: one line per chapter, its stages below it."""
    lines = [f"{'chapter':<24}{'seconds':>9}  status"]
    for name, row in record["chapters"].items():
        lines.append(f"{name:<24}{row.get('seconds', 0):>9.1f}  {row.get('status', 'ran')}")
        for stage, s in sorted((row.get("stages") or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  {stage:<40.40}{s:>9.1f}")
    scratch = "yes" if record["from_scratch"] else "no (artifacts reused)"
    lanes = record.get("lanes", 1)
    side = f"; {lanes} lanes after {RUNS_ALONE[0]}" if lanes > 1 else ""
    lines.append(f"total {record['total_seconds']:.0f} s; from an empty artifact store: {scratch}{side}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the book of a file
@dataclass
class Plan:
    """What a parameter file asks of one chapter: its parameters, or why it is skipped."""

    chapter: str
    params: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None


def _chapter_module(chapter: str) -> Any:
    """The chapter's module (:mod:`conceptlab.chapters`), ``None`` for a chapter that has none yet."""
    from . import chapters as chapter_modules

    try:
        return chapter_modules.load(chapter)
    except ImportError:
        return None


def _chapter_spec(chapter: str, module: Any) -> dict[str, Any]:
    """Every parameter the chapter declares; without a chapter module, the shared ones (the notebook
    then checks its own when it runs)."""
    from .chapter import SHARED

    return {**SHARED, **(module.PARAMETERS if module is not None else {})}


def _absolute(value: Any, kind: Any, base: Path) -> Any:
    """A relative path in a parameter file, resolved against the file's folder: file and folder
    parameters always, other strings when they name an existing path (bare or after ``scheme:``)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    if kind in ("file", "dir", "path"):
        return str(base / value)
    if (base / value).exists():
        return str(base / value)
    scheme, _, rest = value.partition(":")
    if rest and not Path(rest).is_absolute() and (base / rest).exists():
        return f"{scheme}:{base / rest}"
    return value


def _rule(chapter: str, params: Mapping[str, Any], module: Any) -> str | None:
    """Why a chapter does not apply to these parameters (``None``: it does). A chapter module may say
    itself, with ``applies(params) -> str | None``; otherwise the book's rule for LaViSE."""
    if hasattr(module, "applies"):
        return module.applies(dict(params))
    user_model = params.get("model", "world") != "world"
    if chapter == "06_lavise" and params.get("target_model", "world") == "world" and user_model:
        return (
            "LaViSE explains the filters of a CNN, not a CLIP: name yours in the 06_lavise block "
            "(target_model, target_weights, target_layer) to run it"
        )
    # 07_verdict runs for a user's model: its model-only checks use the user's CLIP and data, and its block's
    # `planted` says whether the planted-model sections (Concept World's own models) run as well
    return None


def plan_chapter(
    chapter: str, common: Mapping[str, Any], block: Any, base: Path, out: Path, artifacts_dir: Path
) -> Plan:
    """The parameters of one chapter from a book file (common block, then the chapter's), or why it is skipped:
    the user's ``skip``, a rule of the chapter, or the problems its parameter check finds."""
    from .chapter import ParameterError, validate

    if block is False or (isinstance(block, dict) and "skip" in block):
        reason = block.get("skip") if isinstance(block, dict) else None
        return Plan(chapter, skip=f"skipped by the parameter file{': ' + str(reason) if reason else ''}")
    block = dict(block or {})
    module = _chapter_module(chapter)
    spec = _chapter_spec(chapter, module)
    declared = set(spec) if module is not None else declared_parameters(chapter)
    unknown = sorted(set(block) - declared)
    if unknown:  # a typo in a chapter's own block is an error, not a reason to skip the chapter
        hints = [
            f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, declared, n=1)) else "")
            for k in unknown
        ]
        raise ValueError(f"the {chapter} block names parameters the chapter does not declare: {', '.join(hints)}")
    params = {k: v for k, v in common.items() if k in declared}
    params.update(block)
    params = {k: _absolute(v, spec[k].kind if k in spec else None, base) for k, v in params.items()}
    params.update(artifacts_dir=str(artifacts_dir), results_dir=str(out / "results"))
    reason = _rule(chapter, params, module)
    if reason:
        return Plan(chapter, params, skip=reason)
    try:
        validate(params if module is not None else {k: v for k, v in params.items() if k in spec}, spec)
    except ParameterError as err:
        return Plan(
            chapter,
            params,
            skip=str(err).replace("This chapter cannot run with these parameters:", "its parameters do not fit:"),
        )
    return Plan(chapter, params)


def read_book_file(path: Path, out: Path, names: list[str]) -> tuple[list[Plan], Path]:
    """Plans for every chapter of ``names`` from a book parameter file, and the artifact store they share."""
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, dict):
        raise ValueError(f"{path} must hold a mapping: a 'common' block and one block per chapter")
    unknown = sorted(set(table) - {"common", "artifacts_dir", *chapters()})
    if unknown:
        raise ValueError(f"{path}: unknown blocks {unknown}; use 'common' and chapter names {chapters()}")
    base = path.resolve().parent
    common = dict(table.get("common") or {})
    if "results_dir" in common:
        raise ValueError(f"{path}: results go to <out>/results; remove results_dir from the common block")
    artifacts = Path(_absolute(common.pop("artifacts_dir", str(DEFAULT_ARTIFACTS)), "dir", base))
    unused = sorted(set(common) - set().union(*(declared_parameters(name) for name in chapters())))
    if unused:
        raise ValueError(f"{path}: no chapter declares {unused} (common block)")
    return [plan_chapter(name, common, table.get(name), base, out, artifacts) for name in names], artifacts


def _write_toc(dest: Path, ran: list[str]) -> None:
    toc = {
        "format": "jb-book",
        "root": "book/intro",
        "chapters": [{"file": f"book/chapters/{name}"} for name in ran] + [{"file": "book/references"}],
    }
    (dest / "_toc.yml").write_text(
        "# The chapters this parameter file ran (conceptlab.bookrun --params)\n" + yaml.safe_dump(toc, sort_keys=False)
    )


def _write_intro(dest: Path, source: Path, plans: list[Plan], failed: dict[str, str], timings: str) -> None:
    ran = [p.chapter for p in plans if p.skip is None and p.chapter not in failed]
    lines = [
        "# Your model, the whole book",
        "",
        f"Built by `python -m conceptlab.bookrun --params {source.name}` with these shared parameters:",
        "",
        "```yaml",
        yaml.safe_dump(yaml.safe_load(source.read_text()).get("common") or {}).rstrip(),
        "```",
        "",
        "## What this run finds",
        "",
        intro_table(dest / "results"),
        "",
        "## Chapters",
        "",
    ]
    lines += [f"- {name}: ran" for name in ran]
    lines += [f"- {name}: failed ({why})" for name, why in failed.items()]
    lines += [f"- {p.chapter}: not run, {' '.join(p.skip.split())}" for p in plans if p.skip]
    lines += ["", "## Where the time went", "", "```text", timings, "```", ""]
    (dest / "book" / "intro.md").write_text("\n".join(lines))


def build_html(dest: Path) -> subprocess.CompletedProcess:
    """``jupyter-book build --all dest`` (HTML in ``dest/_build/html``)."""
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", "--all", str(dest)], capture_output=True, text=True)


def book_from_file(path: Path, out: Path, names: list[str]) -> int:
    """Run every chapter a book file applies to, skip the others with their reason, build ``out/_build/html``."""
    out = out.resolve()
    plans, artifacts = read_book_file(path, out, names)
    from_scratch, start, rows, failed = store_is_empty(artifacts), time.perf_counter(), {}, {}
    executed = out / "book" / "chapters"
    for plan in plans:
        if plan.skip:
            print(f"{plan.chapter}: skipped, {' '.join(plan.skip.split())}", flush=True)
            rows[plan.chapter] = {"seconds": 0.0, "status": "skipped", "reason": plan.skip}
            continue
        t0 = time.perf_counter()
        try:
            target = run_chapter(plan.chapter, executed, plan.params)
        except Exception as err:  # one chapter's failure does not stop the others
            failed[plan.chapter] = error_line(err)
            target = None
        seconds = time.perf_counter() - t0
        rows[plan.chapter] = {
            **chapter_timing(plan.chapter, seconds, target, out / "results"),
            "status": "failed" if plan.chapter in failed else "ran",
        }
        print(f"{plan.chapter}: {rows[plan.chapter]['status']}, {seconds:.0f} s", flush=True)
    record = write_timings(out / "results" / "timings.json", rows, time.perf_counter() - start, from_scratch, artifacts)
    _copy(("_config.yml", "references.bib", "book/references.md", "book/_static"), out)
    _write_toc(out, [p.chapter for p in plans if p.skip is None and p.chapter not in failed])
    _write_intro(out, path, plans, failed, timings_text(record))
    proc = build_html(out)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return proc.returncode
    print(f"The book: {out / '_build' / 'html' / 'index.html'}", flush=True)
    for name, why in failed.items():
        print(f"{name} failed: {why}", file=sys.stderr)
    return 1 if failed else 0


class Terminated(BaseException):
    """SIGTERM as an exception, so that a killed run moves its half-executed copy to ``failed/`` (not an
    ``Exception``: a book file's loop, which goes on after a failed chapter, must stop)."""


@contextlib.contextmanager
def terminate_as_exception():
    """Within the block, SIGTERM (``kill``, a CI timeout, ``make`` stopped) raises :class:`Terminated`."""

    def _raise(signum: int, frame: object) -> None:
        raise Terminated(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        with terminate_as_exception():
            return _main(argv)
    except Terminated as err:
        print(f"bookrun {err}: the chapter that was running left its partly executed copy in failed/", file=sys.stderr)
        return 128 + signal.SIGTERM


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = ap.add_mutually_exclusive_group()
    sets.add_argument("--smoke", action="store_true", help="use notebooks/smoke.yml (seconds per chapter)")
    sets.add_argument("--lesson", action="store_true", help="use notebooks/lesson.yml (a live class)")
    sets.add_argument(
        "--params",
        type=Path,
        default=None,
        help="a book file (common block + chapter blocks): the book of your model, built in --out",
    )
    ap.add_argument("--out", type=Path, default=None, help="where executed notebooks (with --params: the book) go")
    ap.add_argument("--chapters", default="all", help="comma-separated chapter stems, or 'all'")
    ap.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="run chapters N at a time, each in its own process with the threads of one lane, the results "
        "identical to one lane (chapter 1 runs first, alone; `make book` uses 2); `python -m conceptlab.bench "
        "lanes` measures the gain on your machine",
    )
    args = ap.parse_args(argv)
    names = chapters() if args.chapters == "all" else args.chapters.split(",")
    unknown = sorted(set(names) - set(chapters()))
    if unknown:
        ap.error(f"unknown chapters {unknown}; known: {chapters()}")
    if args.lanes < 1:
        ap.error(f"--lanes {args.lanes}: give 1 (one chapter after another) or more")
    if args.params is not None:
        if args.out is None:
            ap.error("--params needs --out DIR (the book of your run is built there)")
        if not args.params.is_file():
            ap.error(f"no parameter file {args.params}")
        try:
            return book_from_file(args.params, args.out, names)
        except ValueError as err:
            ap.error(str(err))
    kind = "smoke" if args.smoke else "lesson" if args.lesson else None
    if kind == "smoke" and args.lanes > 1:
        ap.error("--smoke runs every chapter in one warm kernel; drop --lanes (or use --lesson or the book)")
    out = (args.out or (ROOT / "_build" / kind if kind else ROOT / "book" / "chapters")).resolve()
    results = out / "results" if kind else ROOT / "book" / "results"
    artifacts = out / "artifacts" if kind == "smoke" else DEFAULT_ARTIFACTS
    from_scratch, start, rows = store_is_empty(artifacts), time.perf_counter(), {}

    def parameters(name: str) -> dict:
        if kind == "smoke":
            return smoke_parameters(name, out)
        if kind == "lesson":
            return {**parameter_set("lesson", name), "results_dir": str(results)}
        return {}

    def finished(name: str, seconds: float, target: Path | None = None) -> None:
        rows[name] = {**chapter_timing(name, seconds, target or out / f"{name}.ipynb", results), "status": "ran"}
        print(f"{name}: {seconds:.0f} s", flush=True)

    first = [name for name in names if args.lanes == 1 or name in RUNS_ALONE]
    with WarmKernel() if kind == "smoke" else contextlib.nullcontext() as kernel:  # smoke: one kernel for all
        for name in first:
            t0 = time.perf_counter()
            target = run_chapter(name, out, parameters(name), kernel)
            finished(name, time.perf_counter() - t0, target)
    in_lanes = [name for name in names if name not in first]
    if in_lanes:
        print(f"{', '.join(in_lanes)}: {args.lanes} lanes", flush=True)
        jobs = [(name, parameters(name)) for name in slowest_first(in_lanes)]
        run_in_lanes(jobs, out, args.lanes, finished)
    rows = {name: rows[name] for name in names}  # the time table in the order asked, not the order finished
    write_timings(results / "timings.json", rows, time.perf_counter() - start, from_scratch, artifacts, args.lanes)
    if kind is None:
        (results / "headline.md").write_text(intro_table(results))  # the intro includes it
    return 0


if __name__ == "__main__":
    sys.exit(main())
