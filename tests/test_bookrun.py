"""``python -m conceptlab.bookrun``: the book of a user's model from one parameter file (chapters that
apply run, the others are skipped with their reason, a separate HTML book), the time table of a build,
and a failed run that leaves no hidden notebook behind."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from PIL import Image

from conceptlab import bookrun
from conceptlab.artifacts import STAT_CACHE
from conceptlab.chapters import spec
from conceptlab.models import load_clip

CLASSES = ("cat", "dog", "owl")


def _stand_ins(root: Path, checkpoint: bool = False) -> Path:
    """A user's files beside their book file: a CLIP checkpoint, an ImageFolder, descriptors."""
    root.mkdir(parents=True, exist_ok=True)
    if checkpoint:
        torch.save({"state_dict": load_clip("ConceptWorld-ViT", None, "cpu")[0].state_dict()}, root / "clip.pt")
    else:
        (root / "clip.pt").write_bytes(b"weights")  # validation only looks for the file
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for j in range(3):
            Image.new("RGB", (40 + 8 * j, 36), (80 * c, 60 * j, 120)).save(root / "images" / name / f"{j}.png")
    (root / "descriptors.json").write_text(json.dumps({n: [f"{n} part {k}" for k in range(4)] for n in CLASSES}))
    return root


def _book_file(root: Path, **blocks) -> Path:
    common = {
        "model": "ConceptWorld-ViT",
        "pretrained": "clip.pt",
        "dataset": "imagefolder",
        "data_root": "images",
        "descriptors": "descriptors.json",
        "artifacts_dir": "store",
        "world": {"n_classes": 6},
    }
    path = root / "my.yml"
    path.write_text(yaml.safe_dump({"common": common, **blocks}))
    return path


def test_a_book_file_runs_what_applies_and_says_why_it_skips_the_rest(tmp_path):
    path = _book_file(_stand_ins(tmp_path / "mine"), **{"03_deal": {"skip": "no time today"}})
    plans, store = bookrun.read_book_file(path, tmp_path / "out", bookrun.chapters())
    assert store == tmp_path / "mine" / "store"
    plans = {p.chapter: p for p in plans}
    runs = plans["02_descriptors"]
    assert runs.skip is None
    assert runs.params["pretrained"] == str(tmp_path / "mine" / "clip.pt"), "relative to the book file"
    assert runs.params["data_root"] == str(tmp_path / "mine" / "images")
    assert runs.params["artifacts_dir"] == str(tmp_path / "mine" / "store")
    assert runs.params["results_dir"] == str(tmp_path / "out" / "results")
    assert plans["01_world_and_model"].skip is None and "descriptors" not in plans["01_world_and_model"].params
    assert plans["03_deal"].skip == "skipped by the parameter file: no time today"
    assert "lm" in plans["04_ex2"].skip, "EX2 on real images needs a real language model"
    assert "CNN" in plans["06_lavise"].skip and plans["07_verdict"].skip is None, "the verdict's model-only checks"


def test_a_book_file_is_checked_before_any_chapter_runs(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"common": {}, "03_dael": {}}))
    with pytest.raises(ValueError, match=r"unknown blocks \['03_dael'\]"):
        bookrun.read_book_file(bad, tmp_path / "out", bookrun.chapters())
    bad.write_text(yaml.safe_dump({"common": {}, "03_deal": {"deal_step": 5}}))
    with pytest.raises(ValueError, match="03_deal block .* 'deal_step' \\(did you mean 'deal_steps'\\?\\)"):
        bookrun.read_book_file(bad, tmp_path / "out", bookrun.chapters())
    bad.write_text(yaml.safe_dump({"common": {"pretrianed": "x.pt"}}))
    with pytest.raises(ValueError, match=r"no chapter declares \['pretrianed'\]"):
        bookrun.read_book_file(bad, tmp_path / "out", bookrun.chapters())
    bad.write_text(yaml.safe_dump({"common": {"results_dir": "r"}}))
    with pytest.raises(ValueError, match="results go to <out>/results"):
        bookrun.read_book_file(bad, tmp_path / "out", bookrun.chapters())
    with pytest.raises(SystemExit):
        bookrun.main(["--params", str(tmp_path / "absent.yml"), "--out", str(tmp_path / "out")])


def test_the_example_book_file_names_only_declared_parameters():
    table = yaml.safe_load((bookrun.ROOT / "examples" / "my_model.yml").read_text())
    assert set(table) == {"common", *bookrun.chapters()}
    declared = {name: set(spec(name)) for name in bookrun.chapters()}
    assert all(any(k in d for d in declared.values()) for k in table["common"]), "a common name no chapter takes"
    for name in bookrun.chapters():
        block = {k: v for k, v in (table[name] or {}).items() if k != "skip"}
        assert set(block) <= declared[name], (name, sorted(set(block) - declared[name]))


def _executed(path: Path, durations: list[float]) -> Path:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(f"# a comment\nstep_{i}()") for i in range(len(durations))]
    )
    for cell, seconds in zip(nb.cells, durations):
        cell.metadata["papermill"] = {"duration": seconds}
    nbformat.write(nb, path)
    return path


def test_timings_come_from_the_chapters_stages_or_else_from_its_slowest_cells(tmp_path, capsys):
    executed = _executed(tmp_path / "01_x.ipynb", [0.2, 12.5, 3.0])
    row = bookrun.chapter_timing("01_x", 20.0, executed, tmp_path)
    assert row["stages_from"] == "cells" and row["stages"] == {"cell 1: step_1()": 12.5, "cell 2: step_2()": 3.0}
    (tmp_path / "01_x.json").write_text(json.dumps({"timings": {"train": 14.0, "measure": 2.5}}))
    row = bookrun.chapter_timing("01_x", 20.0, executed, tmp_path)
    assert row == {"seconds": 20.0, "stages": {"train": 14.0, "measure": 2.5}, "stages_from": "stages"}
    store = tmp_path / "store"
    store.mkdir()
    (store / STAT_CACHE).write_text("{}")
    assert bookrun.store_is_empty(store) and bookrun.store_is_empty(tmp_path / "none")
    record = bookrun.write_timings(tmp_path / "res" / "timings.json", {"01_x": row}, 21.3, True, store)
    assert json.loads((tmp_path / "res" / "timings.json").read_text()) == record
    assert record["from_scratch_total_seconds"] == 21.3 and record["chapters"]["01_x"]["stages"]["train"] == 14.0
    printed = capsys.readouterr().out
    assert "train" in printed and "total 21 s; from an empty artifact store: yes" in printed
    (store / "world_clip").mkdir()
    assert not bookrun.store_is_empty(store)


@pytest.mark.notebook
def test_the_whole_book_builds_from_one_file_on_stand_in_files(tmp_path):
    """Runs chapter 2 on the user's CLIP, ImageFolder and descriptor file (tiny sizes); chapter 6 is skipped by
    rule, chapter 7 by the file (it runs on a user's model: tests/test_verdict_model_only.py)."""
    root = _stand_ins(tmp_path / "mine", checkpoint=True)
    skip = {"skip": "its planted models take minutes"}
    path = _book_file(root, **{"02_descriptors": {"n_test": 9, "n_explain": 3}, "07_verdict": skip})
    out = tmp_path / "book"
    rc = bookrun.main(["--params", str(path), "--out", str(out), "--chapters", "02_descriptors,06_lavise,07_verdict"])
    assert rc == 0
    record = json.loads((out / "results" / "02_descriptors.json").read_text())
    assert record["parameters"]["loaded_architecture"] == "ConceptWorld-ViT"
    assert record["inputs"]["pretrained"]["path"] == str(root / "clip.pt"), "relative to the book file"
    assert record["inputs"]["descriptors"]["path"] == str(root / "descriptors.json"), "a string parameter's file"
    timings = json.loads((out / "results" / "timings.json").read_text())
    assert timings["from_scratch"] and timings["chapters"]["02_descriptors"]["status"] == "ran"
    assert timings["chapters"]["06_lavise"]["status"] == "skipped"
    html = out / "_build" / "html"
    assert "book/intro.html" in (html / "index.html").read_text()
    intro = (html / "book" / "intro.html").read_text()
    assert "CNN" in intro and "planted" in intro, "the introduction says why chapters were skipped"
    assert (html / "book" / "chapters" / "02_descriptors.html").is_file()
    assert not (html / "book" / "chapters" / "06_lavise.html").exists()


def _notebook(path: Path, source: str) -> str:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("n = 0", metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(source)]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return str(path)


@pytest.mark.notebook
def test_a_warm_kernel_runs_chapters_in_turn_each_in_a_clean_namespace(tmp_path):
    import papermill as pm

    first = _notebook(tmp_path / "first.ipynb", "import os\nleft_behind = n\nprint(os.getpid())")
    second = _notebook(tmp_path / "second.ipynb", "import os\nprint(os.getpid(), 'left_behind' in globals())")

    def run(source: str, kernel: bookrun.WarmKernel) -> tuple[list[str], int]:
        out = tmp_path / "out.ipynb"
        pm.execute_notebook(source, str(out), parameters={"n": 1}, progress_bar=False, km=kernel.prepare())
        cell = nbformat.read(out, as_version=4).cells[-1]
        return "".join(o.get("text", "") for o in cell.outputs).split(), cell.execution_count

    with bookrun.WarmKernel() as kernel:
        (pid,), count = run(first, kernel)
        assert count == 3, "the parameters cell, papermill's injected cell, then this one"
        assert run(second, kernel) == ([pid, "False"], 3), "the same process, a reset namespace and count"
        kernel.manager.provisioner.process.kill()
        kernel.manager.provisioner.process.wait()
        (new_pid, seen), _ = run(second, kernel)
        assert new_pid != pid and seen == "False", "a kernel that died is replaced"
    assert not kernel.manager.has_kernel


@pytest.mark.notebook
def test_a_run_stopped_by_sigterm_keeps_its_executed_copy_in_failed_and_no_hidden_file(tmp_path):
    """``kill`` (a CI timeout, a stopped ``make book``) stops the build; the chapter that was running
    leaves its partly executed copy in ``failed/``, never a hidden ``.<chapter>.running.ipynb``."""
    import signal
    import subprocess
    import sys
    import time

    chapter = bookrun.chapters()[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conceptlab.bookrun", "--smoke", "--chapters", chapter, "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    hidden = tmp_path / f".{chapter}.running.ipynb"
    deadline = time.monotonic() + 120
    while not hidden.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hidden.exists(), "the run never started its chapter"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (tmp_path / "failed" / f"{chapter}.ipynb").is_file() and "failed/" in err
