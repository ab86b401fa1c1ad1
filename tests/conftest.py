"""Shared fixtures: a small world and a briefly trained world CLIP (seconds on a CPU)."""

from __future__ import annotations

import pytest
import torch

from conceptlab.artifacts import ArtifactStore
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
