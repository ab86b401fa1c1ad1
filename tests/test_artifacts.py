"""The artifact store: parameter keys, atomic writes, reuse only on matching parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlab.artifacts import (
    ArtifactStore,
    atomic_torch_save,
    atomic_write_bytes,
    params_key,
    read_results,
    safe_torch_load,
    write_results,
)


def test_params_key_ignores_order_and_sees_every_value():
    assert params_key({"a": 1, "b": [1, 2]}) == params_key({"b": [1, 2], "a": 1})
    assert params_key({"a": 1, "b": [1, 2]}) != params_key({"a": 1, "b": [2, 1]})
    assert params_key({"a": 1.0}) != params_key({"a": 1.5})


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")

    class Boom:
        def __len__(self):
            raise RuntimeError

    with pytest.raises(TypeError):
        atomic_write_bytes(target, Boom())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_get_or_create_builds_once_per_parameter_set(tmp_path):
    store, built = ArtifactStore(tmp_path), []

    def build(d):
        built.append(d)
        atomic_torch_save({"w": torch.ones(2)}, d / "x.pt")

    for params in ({"n": 1}, {"n": 1}, {"n": 2}):
        out = store.get_or_create("thing", params, "x.pt", build, safe_torch_load)
        assert torch.equal(out["w"], torch.ones(2))
    assert len(built) == 2
    assert json.loads((built[0] / "params.json").read_text()) == {"n": 1}


def test_safe_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)  # arbitrary objects need weights_only=False
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        safe_torch_load(path)


def test_results_round_trip(tmp_path):
    write_results(tmp_path, "ch", {"acc": torch.tensor(0.5)}, {"seed": 0})
    assert read_results(tmp_path, "ch") == {"chapter": "ch", "results": {"acc": 0.5}, "parameters": {"seed": 0}}
    with pytest.raises(FileNotFoundError, match="run that chapter"):
        read_results(tmp_path, "other")


def test_concurrent_requests_build_an_artifact_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.starmap(_build_slowly, [(str(tmp_path), i) for i in range(2)])
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1


def _build_slowly(root: str, worker: int) -> None:
    import time

    def build(d):
        with open(Path(root) / "builds.log", "a") as log:
            log.write(f"{worker}\n")
        time.sleep(2.0)  # long enough for the two workers to overlap
        atomic_write_bytes(d / "x.bin", b"done")

    ArtifactStore(root).get_or_create("slow", {"n": 1}, "x.bin", build, lambda p: p.read_bytes())
