"""Shared fixtures: a small world, a briefly trained world CLIP (seconds on a CPU), and the
smoke-executed chapters with the book built from them (once per test session).

`make test` runs the suite on two pytest-xdist workers. The smoke-executed chapters live in one
folder shared by both workers: a chapter is executed once, by whichever worker needs it first,
under a file lock, and the other worker waits for it and reads the same results.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conceptlab.world import ConceptWorld, WorldConfig  # numpy only

# The xdist controller imports this file too, but runs no test: torch, open_clip and papermill (11 s of CPU)
# are imported by the fixtures and tests that need them, so the controller does not compete with the two
# workers for the two cores while they collect.
TINY_WORLD = WorldConfig(n_classes=6, seed=0)
_TINY_TRAIN = {"n_train": 512, "steps": 20, "batch_size": 32, "warmup": 5}

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # two workers on two cores: one thread each, for this process and the notebook kernels it starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def __getattr__(name: str):
    """``TINY_TRAIN`` (the tiny CLIP's :class:`~conceptlab.models.TrainConfig`), built when a test imports it."""
    if name == "TINY_TRAIN":
        from conceptlab.models import TrainConfig

        return TrainConfig(**_TINY_TRAIN)
    raise AttributeError(name)


def pytest_collection_modifyitems(config, items):
    """Order the run so that neither xdist worker waits for the other.

    pytest-xdist's worksteal gives each of the two workers one half of the order to start with (then a worker
    that runs out takes from the other). The first half starts with the tests of the built book: that worker
    runs the smoke chapters one after the other (the first trains the tiny CLIP, which the tests of the tiny
    CLIP that follow reuse) and builds the book. The second half starts with the slow tests that need neither
    (processes of their own, long in-process runs), so a long test never comes last, and ends with the tests
    of single chapters, which by then find their chapters executed (``run_smoke`` lets a worker that gets
    there early take a chapter nobody has started rather than wait)."""
    groups: dict[str, list] = {"book": [], "single": [], "clip": [], "rest": []}
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        group = next(
            (g for g, f in (("book", "smoke_book"), ("single", "run_smoke"), ("clip", "tiny_clip")) if f in names),
            "rest",
        )
        groups[group].append(item)
    slow = [item for item in groups["rest"] if item.get_closest_marker("slow")]
    quick = [item for item in groups["rest"] if not item.get_closest_marker("slow")]
    first = groups["book"] + groups["clip"]
    head = max(0, len(items) // 2 - len(first))
    items[:] = first + quick[:head] + slow + quick[head:] + groups["single"]


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world() -> ConceptWorld:
    return ConceptWorld(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The smoke chapters' artifact store, shared by every xdist worker: the tiny world CLIP below has the
    smoke parameters' key, so it is trained once per session for the tests and the smoke chapters alike
    (the store's file locks make concurrent builds safe)."""
    from conceptlab.artifacts import ArtifactStore

    return ArtifactStore(_shared_dir(tmp_path_factory, "smoke") / "artifacts")


@pytest.fixture(scope="session")
def tiny_clip(tiny_store):
    """(model, preprocess, tokenizer, history) of a world CLIP trained for a few steps."""
    from conceptlab.models import TrainConfig, world_clip

    return world_clip(tiny_store, TINY_WORLD, TrainConfig(**_TINY_TRAIN), progress=False)


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this session sees (a private one without xdist)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-xdist gives each worker a subfolder of the session's folder
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _try_locked(path: Path) -> Iterator[bool]:
    """Whether this process got the lock (without waiting); held for the block if so."""
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def kernel():
    """This worker's warm Jupyter kernel: the notebook tests pay the imports once per worker, not once per run
    (the fresh-kernel path is tested by the book-from-a-file test)."""
    from conceptlab.bookrun import WarmKernel

    with WarmKernel() as warm:
        yield warm


@pytest.fixture(scope="session")
def run_smoke(tmp_path_factory, kernel):
    """Run a chapter on its smoke parameters once per test session; returns its work folder.

    A worker that finds its chapter running in the other worker runs another chapter nobody has started
    instead of waiting idle (the chapters share one artifact store, whose locks make that safe)."""
    from conceptlab.bookrun import chapters, run_chapter, smoke_parameters

    workdir = _shared_dir(tmp_path_factory, "smoke")

    def done(chapter: str) -> bool:
        return (workdir / f".{chapter}.done").exists()

    def run_if_free(chapter: str) -> bool:
        with _try_locked(workdir / f".{chapter}.lock") as mine:
            if mine and not done(chapter):
                run_chapter(chapter, workdir / "executed", smoke_parameters(chapter, workdir), kernel)
                (workdir / f".{chapter}.done").touch()
        return done(chapter)

    def run(chapter: str) -> Path:
        while not run_if_free(chapter):
            if not any(run_if_free(other) for other in chapters() if other != chapter and not done(other)):
                with _locked(workdir / f".{chapter}.lock"):  # nothing else to do: wait for it
                    pass
        return workdir

    return run


@pytest.fixture(scope="session")
def smoke_book(run_smoke, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The HTML book built by jupyter-book from every smoke-executed chapter: (book root, build process).

    Built once per session (under a lock, shared by the xdist workers); the build's output is kept
    beside it so every worker sees the same process record."""
    from conceptlab.bookrun import assemble_book, chapters

    for chapter in chapters():
        workdir = run_smoke(chapter)
    root = _shared_dir(tmp_path_factory, "book")
    record = root / ".build.json"
    with _locked(root.parent / ".book.lock"):
        if not record.exists():
            assemble_book(root, workdir / "executed", workdir / "results")
            jb = Path(sys.executable).with_name("jupyter-book")
            proc = subprocess.run([str(jb), "build", "--all", str(root)], capture_output=True, text=True, timeout=600)
            record.write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
    built = json.loads(record.read_text())
    return root, subprocess.CompletedProcess(["jupyter-book"], built["returncode"], built["stdout"], built["stderr"])
