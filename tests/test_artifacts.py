"""The artifact store: content keys, atomic writes, a completion marker, reuse only when every input matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlab.artifacts import (
    DONE,
    ArtifactStore,
    atomic_torch_save,
    atomic_write_bytes,
    fingerprint,
    params_key,
    read_results,
    safe_torch_load,
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


def _tensor_builder(built: list):
    def build(d):
        built.append(d)
        atomic_torch_save({"w": torch.ones(2)}, d / "x.pt")

    return build


def _load_x(d):
    return safe_torch_load(d / "x.pt", owner="store")


def test_get_or_build_builds_once_per_key_and_marks_completion_last(tmp_path):
    store, built = ArtifactStore(tmp_path), []
    for key in ({"n": 1}, {"n": 1}, {"n": 2}):
        out = store.get_or_build("thing", key, _tensor_builder(built), _load_x)
        assert torch.equal(out["w"], torch.ones(2))
    assert len(built) == 2
    assert json.loads((built[0] / "params.json").read_text()) == {"n": 1}
    assert json.loads((built[0] / DONE).read_text())["files"]["x.pt"] > 0


def test_a_folder_without_the_marker_is_unfinished_and_rebuilt_with_a_note(tmp_path, capsys):
    store, built = ArtifactStore(tmp_path), []
    d = store.path("thing", {"n": 1})
    (d / "x.pt").write_bytes(b"half a file")  # a crash before DONE was written
    out = store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    assert torch.equal(out["w"], torch.ones(2)) and len(built) == 1
    assert "unfinished" in capsys.readouterr().err


def test_a_finished_artifact_that_cannot_be_loaded_is_rebuilt_once(tmp_path, capsys):
    store, built = ArtifactStore(tmp_path), []
    store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    (built[0] / "x.pt").write_bytes(b"corrupted on disk")
    out = store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    assert torch.equal(out["w"], torch.ones(2)) and len(built) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_fingerprint_follows_content_not_path(tmp_path):
    a = tmp_path / "model.pt"
    a.write_bytes(b"weights one")
    first = fingerprint(a)
    a.write_bytes(b"weights two, longer")  # the same path, other weights
    assert fingerprint(a) != first
    b = tmp_path / "copy.pt"
    b.write_bytes(b"weights two, longer")
    assert fingerprint(b) == fingerprint(a)


def test_folder_fingerprint_sees_added_files_and_ignores_hidden_ones(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.jpg").write_bytes(b"x")
    first = fingerprint(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "junk").write_bytes(b"y")
    assert fingerprint(tmp_path) == first
    (tmp_path / "cat" / "2.jpg").write_bytes(b"z")
    assert fingerprint(tmp_path) != first


def test_artifact_files_are_readable_by_the_group(tmp_path):
    path = atomic_write_bytes(tmp_path / "x.bin", b"1")
    assert path.stat().st_mode & 0o040, oct(path.stat().st_mode)


def test_a_users_broken_checkpoint_is_not_called_rebuildable(tmp_path):
    path = tmp_path / "mine.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        safe_torch_load(path)
    assert "rebuild" not in str(err.value) and "mine.pt" in str(err.value)
    with pytest.raises(ValueError, match="rebuild"):
        safe_torch_load(path, owner="store")


def test_safe_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)  # arbitrary objects need weights_only=False
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        safe_torch_load(path)


def test_reading_the_results_of_a_chapter_not_yet_run_says_so(tmp_path):
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

    ArtifactStore(root).get_or_build("slow", {"n": 1}, build, lambda d: (d / "x.bin").read_bytes())
