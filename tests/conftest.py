"""Shared fixtures: a small world, a briefly trained world CLIP (seconds on a CPU), and the
smoke-executed chapters with the book built from them (once per test session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptlab.artifacts import ArtifactStore
from conceptlab.bookrun import assemble_book, chapters, run_chapter, smoke_parameters
from conceptlab.models import TrainConfig, world_clip
from conceptlab.world import ConceptWorld, WorldConfig

TINY_WORLD = WorldConfig(n_classes=6, seed=0)
TINY_TRAIN = TrainConfig(n_train=512, steps=20, batch_size=32, warmup=5)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world() -> ConceptWorld:
    return ConceptWorld(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def tiny_clip(tiny_store):
    """(model, preprocess, tokenizer, history) of a world CLIP trained for a few steps."""
    return world_clip(tiny_store, TINY_WORLD, TINY_TRAIN, progress=False)


@pytest.fixture(scope="session")
def run_smoke(tmp_path_factory):
    """Run a chapter on its smoke parameters once per test session; returns its work folder."""
    workdir, done = tmp_path_factory.mktemp("smoke"), set()

    def run(chapter: str) -> Path:
        if chapter not in done:
            run_chapter(chapter, workdir / "executed", smoke_parameters(chapter, workdir))
            done.add(chapter)
        return workdir

    return run


@pytest.fixture(scope="session")
def smoke_book(run_smoke, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The HTML book built by jupyter-book from every smoke-executed chapter: (book root, build process)."""
    for chapter in chapters():
        workdir = run_smoke(chapter)
    root = assemble_book(tmp_path_factory.mktemp("book"), workdir / "executed", workdir / "results")
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", "--all", str(root)], capture_output=True, text=True, timeout=600)
    return root, proc
