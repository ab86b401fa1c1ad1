"""Book lanes: chapters side by side in their own processes (``bookrun --lanes``), and the store's order that
keeps two lanes from waiting on each other's models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conceptlab import bookrun
from conceptlab.artifacts import ArtifactStore


def fake_chapter(chapter: str, out_dir: Path, parameters: dict, done) -> None:
    """A lane's worker that records when it ran, in which process, with which threads, and (``meet``) whether the
    chapter named there was running at the same time (each waits up to 20 s for the other's start)."""
    start = time.time()
    (out_dir / f"{chapter}.started").touch()
    other = parameters.get("meet")
    met = None
    if other is not None:
        while not (met := (out_dir / f"{other}.started").exists()) and time.time() - start < 20:
            time.sleep(0.05)
    time.sleep(parameters["sleep"])
    record = {
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "wait": os.environ.get("OMP_WAIT_POLICY"),
        "met": met,
    }
    (out_dir / f"{chapter}.json").write_text(json.dumps(record))
    done.put((chapter, time.time() - start, parameters.get("error")))


def test_lanes_run_chapters_side_by_side_never_more_than_asked(tmp_path):
    jobs = [("a", {"sleep": 0.5, "meet": "b"}), ("b", {"sleep": 0.5, "meet": "a"}), ("c", {"sleep": 0.2})]
    finished = []
    bookrun.run_in_lanes(jobs, tmp_path, 2, lambda name, s: finished.append(name), worker=fake_chapter)
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in "abc"}
    assert sorted(finished) == ["a", "b", "c"] and finished[-1] == "c"
    assert runs["a"]["met"] and runs["b"]["met"]  # side by side, however long each process took to start
    assert runs["b"]["start"] < runs["a"]["end"] and runs["a"]["start"] < runs["b"]["end"]
    assert runs["c"]["start"] >= min(runs["a"]["end"], runs["b"]["end"])  # a third lane never opened
    assert len({r["pid"] for r in runs.values()}) == 3
    assert {r["wait"] for r in runs.values()} == {"PASSIVE"}  # lanes share the cores: waiting threads sleep


def kernel_threads() -> str:
    """How many threads torch computes with in a fresh process started from here (as a chapter's kernel is)."""
    code = "import torch; print(torch.get_num_threads())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def torch_threads(chapter: str, out_dir: Path, parameters: dict, done) -> None:
    """A lane's worker that records :func:`kernel_threads` in its lane."""
    (out_dir / f"{chapter}.threads").write_text(kernel_threads())
    done.put((chapter, 0.0, None))


@pytest.mark.parametrize("threads", sorted({"1", str(os.cpu_count() or 1)}))
def test_a_lane_computes_with_the_threads_of_a_build_without_lanes(tmp_path, monkeypatch, threads):
    """Torch's rounding depends on its thread count: a lane's kernel must use the count a plain kernel uses (one
    thread, then every core: a lane that sets its own count, a share of the cores or all of them, fails one)."""
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    plain = kernel_threads()
    jobs = [("a", {}), ("b", {})]
    bookrun.run_in_lanes(jobs, tmp_path, 2, lambda name, s: None, worker=torch_threads)
    assert plain == threads and [(tmp_path / f"{name}.threads").read_text() for name in "ab"] == [plain, plain]


def test_a_failed_chapter_stops_the_lanes_and_says_which(tmp_path):
    jobs = [("bad", {"sleep": 0.1, "error": "ValueError: no such file"}), ("later", {"sleep": 0.1})]
    with pytest.raises(RuntimeError, match="bad: ValueError: no such file"):
        bookrun.run_in_lanes(jobs, tmp_path, 1, lambda name, s: None, worker=fake_chapter)
    assert not (tmp_path / "later.json").exists()  # nothing starts after a failure


def test_lanes_start_with_the_slowest_chapters_and_unknown_ones_last():
    names = ["02_descriptors", "07_verdict", "99_new", "04_ex2", "03_deal"]
    assert bookrun.slowest_first(names) == ["04_ex2", "07_verdict", "03_deal", "02_descriptors", "99_new"]


@pytest.mark.parametrize("argv", [["--smoke", "--lanes", "2"], ["--lanes", "0"]])
def test_bad_lanes_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit):
        bookrun.main(argv)
    assert "--lanes" in capsys.readouterr().err


def test_a_model_another_process_is_building_comes_last(tmp_path):
    store = ArtifactStore(tmp_path)
    items = [("world_clip", {"seed": 0}), ("world_clip", {"seed": 1}), ("world_clip", {"seed": 2})]
    store.get_or_build(*items[2], lambda d: (d / "x").write_text("2"), lambda d: None)
    with store.building(*items[0]):  # as another lane would hold it (flock: another open file)
        assert store.busy(*items[0]) and not store.busy(*items[1]) and not store.busy(*items[2])
        order = store.free_first(items, lambda item: item)
        assert next(order) == items[1] and next(order) == items[2]
    assert next(order) == items[0] and next(order, None) is None


def test_the_book_runs_chapter_one_alone_then_the_rest_in_lanes(tmp_path, monkeypatch):
    calls: dict[str, list] = {"alone": [], "lanes": []}

    def run_chapter(name, out, params, kernel=None):
        calls["alone"].append(name)
        return out / f"{name}.ipynb"

    def run_in_lanes(jobs, out, lanes, on_done):
        calls["lanes"].append(([name for name, _ in jobs], lanes))
        for name, _ in jobs:
            on_done(name, 1.0)

    monkeypatch.setattr(bookrun, "run_chapter", run_chapter)
    monkeypatch.setattr(bookrun, "run_in_lanes", run_in_lanes)
    names = "02_descriptors,07_verdict,01_world_and_model"
    assert bookrun.main(["--lesson", "--lanes", "2", "--out", str(tmp_path), "--chapters", names]) == 0
    assert calls["alone"] == ["01_world_and_model"]
    assert calls["lanes"] == [(["07_verdict", "02_descriptors"], 2)]
    timings = json.loads((tmp_path / "results" / "timings.json").read_text())
    assert timings["lanes"] == 2 and set(timings["chapters"]) == set(names.split(","))


def test_an_error_is_told_in_one_line_even_without_a_message():
    assert bookrun.error_line(ValueError("Traceback ...\nline 3\nno file /x: check the path")) == (
        "ValueError: no file /x: check the path"
    )
    assert bookrun.error_line(KeyboardInterrupt()) == "KeyboardInterrupt: "
