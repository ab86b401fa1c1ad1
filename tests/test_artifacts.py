"""The artifact store: content keys, atomic writes, a completion marker, reuse only when every input matches."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from conceptlab import artifacts
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
    assert json.loads((built[0] / DONE).read_text())["files"]["x.pt"]["size"] > 0


def test_a_folder_without_the_marker_is_unfinished_and_rebuilt_with_a_note(tmp_path, capsys):
    store, built = ArtifactStore(tmp_path), []
    d = store.path("thing", {"n": 1})
    (d / "x.pt").write_bytes(b"half a file")  # a crash before DONE was written
    out = store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    assert torch.equal(out["w"], torch.ones(2)) and len(built) == 1
    assert "unfinished" in capsys.readouterr().err


def test_a_finished_artifact_that_cannot_be_loaded_is_rebuilt_once(tmp_path, capsys):
    store, built, loads = ArtifactStore(tmp_path), [], []

    def load_failing_once(d):
        loads.append(d)
        if len(loads) == 2:
            raise RuntimeError("a reader that changed its mind")
        return _load_x(d)

    store.get_or_build("thing", {"n": 1}, _tensor_builder(built), load_failing_once)
    out = store.get_or_build("thing", {"n": 1}, _tensor_builder(built), load_failing_once)
    assert torch.equal(out["w"], torch.ones(2)) and len(built) == 2
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "cannot be loaded" in notes[0], notes


def test_done_records_each_files_hash_and_a_file_changed_in_place_is_rebuilt_with_one_note(tmp_path, capsys):
    store, built = ArtifactStore(tmp_path), []
    store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    d = built[0]
    recorded = json.loads((d / DONE).read_text())["files"]["x.pt"]
    assert recorded["sha256"] == hashlib.sha256((d / "x.pt").read_bytes()).hexdigest()
    raw = bytearray((d / "x.pt").read_bytes())
    raw[-30] ^= 0xFF  # damaged in place: same size, still a zip torch may read
    (d / "x.pt").write_bytes(bytes(raw))
    capsys.readouterr()
    out = store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    assert torch.equal(out["w"], torch.ones(2)) and len(built) == 2
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "changed since it was built (x.pt)" in notes[0], notes
    store.get_or_build("thing", {"n": 1}, _tensor_builder(built), _load_x)
    assert len(built) == 2, "a verified artifact is not rebuilt"


def test_a_truncated_training_checkpoint_of_an_unfinished_artifact_is_rebuilt_from_the_start(tmp_path, capsys):
    store, seen = ArtifactStore(tmp_path), []
    d = store.path("run", {"n": 1})
    atomic_torch_save({"model": torch.zeros(1000)}, d / "state.pt")
    (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:500])  # a full disk, a kill mid-copy

    def build(d):
        seen.append((d / "state.pt").exists())
        if (d / "state.pt").exists():
            safe_torch_load(d / "state.pt", owner="store")  # what a resuming TrainingRun does
        atomic_torch_save({"w": torch.ones(2)}, d / "x.pt")

    out = store.get_or_build("run", {"n": 1}, build, _load_x)
    assert torch.equal(out["w"], torch.ones(2)) and seen == [False]
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "cannot be read" in notes[0] and "from the start" in notes[0], notes


def test_fingerprint_follows_content_not_path(tmp_path):
    a = tmp_path / "model.pt"
    a.write_bytes(b"weights one")
    first = fingerprint(a)
    a.write_bytes(b"weights two, longer")  # the same path, other weights
    assert fingerprint(a) != first
    b = tmp_path / "copy.pt"
    b.write_bytes(b"weights two, longer")
    assert fingerprint(b) == fingerprint(a)


def test_folder_fingerprint_sees_an_image_overwritten_by_another_of_the_same_size(tmp_path):
    (tmp_path / "cat").mkdir()
    image = tmp_path / "cat" / "1.jpg"
    image.write_bytes(b"first image")
    first = fingerprint(tmp_path)
    image.write_bytes(b"other image")  # same size, same name
    assert fingerprint(tmp_path) != first


def _age(path, seconds: float = 60.0) -> None:
    """Date a file back, as an unchanged file on disk is (a file just written is never cached)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_the_stat_cache_reads_an_unchanged_file_once_across_stores(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for i in range(3):
        (data / "cat" / f"{i}.jpg").write_bytes(bytes([i]) * 100)
        _age(data / "cat" / f"{i}.jpg")
    reads = []
    real = artifacts._hash_file
    monkeypatch.setattr(artifacts, "_hash_file", lambda p: reads.append(p.name) or real(p))
    first = ArtifactStore(tmp_path / "store").fingerprint(data)
    assert len(reads) == 3 and (tmp_path / "store" / artifacts.STAT_CACHE).is_file()
    again = ArtifactStore(tmp_path / "store").fingerprint(data)  # another process: the cache file
    assert again == first and len(reads) == 3, "unchanged files must not be read again"
    (data / "cat" / "1.jpg").write_bytes(b"x" * 100)  # same size, new modification time
    assert ArtifactStore(tmp_path / "store").fingerprint(data) != first and reads[3:] == ["1.jpg"]


def test_a_file_just_written_is_hashed_but_not_cached(tmp_path):
    cache = artifacts.StatCache(tmp_path / "cache.json")
    f = tmp_path / "w.pt"
    f.write_bytes(b"one")
    assert cache.sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two")  # within the same timestamp tick, possibly: must still be seen
    assert cache.sha256(f) == hashlib.sha256(b"two").hexdigest()


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


@pytest.mark.slow
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
