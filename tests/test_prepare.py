"""``python -m conceptlab.prepare``: EX2's GRPO data-parallel over two processes (torchrun, CPU/gloo: the
code path `accelerate launch` takes on several GPUs), stored once, then loaded by a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conceptlab import prepare
from conceptlab.artifacts import ArtifactStore
from conceptlab.bookrun import smoke_parameters


def _prepare_on_two_processes(chapter: str, params: dict, tmp_path) -> Path:
    """``torchrun --nproc_per_node 2 -m conceptlab.prepare <chapter> -f params.yml`` must succeed on both
    processes; the parameter file."""
    params_file = tmp_path / "params.yml"
    params_file.write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["-m", "conceptlab.prepare", chapter, "-f", str(params_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(line for line in done.stdout.splitlines() if line.startswith(f"{chapter} prepared"))
    assert reports == [f"{chapter} prepared: process {rank} of 2" for rank in (0, 1)], done.stdout[-2000:]
    return params_file


@pytest.mark.slow
def test_two_processes_align_once_and_a_single_process_loads_it(tmp_path):
    tiny = {"world_clip": {"n_train": 128, "steps": 4, "batch_size": 32, "warmup": 1}, "lm_steps": 10, "grpo_steps": 2}
    params = {**smoke_parameters("04_ex2", tmp_path), **tiny}  # the data-parallel path, not the models, is tested
    params_file = _prepare_on_two_processes("04_ex2", params, tmp_path)
    aligned = [d for d in (tmp_path / "artifacts" / "ex2_aligned").iterdir() if (d / "DONE").exists()]
    assert len(aligned) == 1  # built once, by the main process
    assert json.loads((aligned[0] / "launch.json").read_text()) == {"processes": 2}
    history = json.loads((aligned[0] / "history.json").read_text())
    assert len(history) == params["grpo_steps"]
    # one process with the same parameters finds the policy built: nothing is trained again
    stamp = (aligned[0] / "DONE").stat().st_mtime_ns
    prepare.main(["04_ex2", "-f", str(params_file)])
    assert (aligned[0] / "DONE").stat().st_mtime_ns == stamp
    assert ArtifactStore(tmp_path / "artifacts").finished(
        "ex2_aligned", json.loads((aligned[0] / "params.json").read_text())
    )


@pytest.mark.slow
def test_two_processes_train_the_lavise_cnn_once(tmp_path):
    """The world CNN's multi-GPU path (accelerate over torch.distributed) on two CPU processes: both take
    part, the main process alone writes, and the store holds one model."""
    params = {**smoke_parameters("06_lavise", tmp_path), "cnn_steps": 2}
    _prepare_on_two_processes("06_lavise", params, tmp_path)
    (cnn,) = (tmp_path / "artifacts" / "world_cnn").iterdir()
    assert (cnn / "DONE").exists() and (cnn / "model.pt").exists()
    assert len(json.loads((cnn / "history.json").read_text())) == 2
    assert not [p.name for p in cnn.iterdir() if p.name.startswith(".")], "no half-written file left behind"


def test_prepare_rejects_a_parameter_file_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "params.yml"
    bad.write_text("- grpo_steps\n")
    with pytest.raises(SystemExit):
        prepare.main(["04_ex2", "-f", str(bad)])


def test_prepare_calls_the_chapter_modules_own_prepare_with_a_validated_chapter(tmp_path, monkeypatch):
    from conceptlab import chapters

    module = chapters.load("04_ex2")
    seen = []
    monkeypatch.setattr(module, "prepare", lambda ch: seen.append(ch))
    prepare.prepare("04_ex2", {**smoke_parameters("04_ex2", tmp_path), "grpo_steps": 2.0})
    (ch,) = seen
    assert ch.name == "04_ex2" and ch.params["grpo_steps"] == 2 and isinstance(ch.params["grpo_steps"], int)
    with pytest.raises(ValueError, match="grpo_stepz"):
        prepare.prepare("04_ex2", {"grpo_stepz": 2})
