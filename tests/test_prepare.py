"""``python -m conceptlab.prepare``: EX2's GRPO and LaViSE's world CNN data-parallel over two processes
(torchrun, CPU/gloo: the code path `accelerate launch` takes on several GPUs), stored once, then loaded by
a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conceptlab import prepare
from conceptlab.artifacts import ArtifactStore
from conceptlab.bookrun import smoke_parameters


def _prepare_on_two_processes(names: list[str], params: dict, tmp_path) -> None:
    """``torchrun --nproc_per_node 2 -m conceptlab.prepare <names> -f params.yml`` must succeed on both
    processes, for every chapter in turn."""
    params_file = tmp_path / "params.yml"
    params_file.write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["-m", "conceptlab.prepare", *names, "-f", str(params_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(line for line in done.stdout.splitlines() if line.endswith(" of 2"))
    expected = sorted(f"{name} prepared: process {rank} of 2" for name in names for rank in (0, 1))
    assert reports == expected, done.stdout[-2000:]


@pytest.mark.slow
def test_two_processes_align_and_train_the_cnn_once_and_a_single_process_loads_them(tmp_path):
    """EX2's GRPO and LaViSE's world CNN in one launch of two processes (the start-up is paid once): both
    processes take part in each, the main process alone writes, the store holds one of each, and one
    process with the same parameters finds them built."""
    tiny = {"world_clip": {"n_train": 128, "steps": 4, "batch_size": 32, "warmup": 1}, "lm_steps": 10, "grpo_steps": 2}
    ex2 = {**smoke_parameters("04_ex2", tmp_path), **tiny}  # the data-parallel path, not the models, is tested
    params = {**ex2, **smoke_parameters("06_lavise", tmp_path), **tiny, "cnn_steps": 2}
    _prepare_on_two_processes(["04_ex2", "06_lavise"], params, tmp_path)

    aligned = [d for d in (tmp_path / "artifacts" / "ex2_aligned").iterdir() if (d / "DONE").exists()]
    assert len(aligned) == 1  # built once, by the main process
    assert json.loads((aligned[0] / "launch.json").read_text()) == {"processes": 2}
    assert len(json.loads((aligned[0] / "history.json").read_text())) == params["grpo_steps"]
    (cnn,) = (tmp_path / "artifacts" / "world_cnn").iterdir()
    assert (cnn / "DONE").exists() and (cnn / "model.pt").exists()
    assert len(json.loads((cnn / "history.json").read_text())) == 2
    assert not [p.name for p in cnn.iterdir() if p.name.startswith(".")], "no half-written file left behind"

    # one process with EX2's share of the same parameters finds the policy built: nothing is trained again
    stamp = (aligned[0] / "DONE").stat().st_mtime_ns
    ex2_file = tmp_path / "ex2.yml"
    ex2_file.write_text(yaml.safe_dump(prepare.chapter_parameters(["04_ex2", "06_lavise"], params)["04_ex2"]))
    prepare.main(["04_ex2", "-f", str(ex2_file)])
    assert (aligned[0] / "DONE").stat().st_mtime_ns == stamp
    assert ArtifactStore(tmp_path / "artifacts").finished(
        "ex2_aligned", json.loads((aligned[0] / "params.json").read_text())
    )


def test_several_chapters_take_the_names_they_declare_and_refuse_names_none_declares(tmp_path, capsys):
    shares = prepare.chapter_parameters(["04_ex2", "06_lavise"], {"grpo_steps": 2, "cnn_steps": 3, "seed": 1})
    assert shares == {"04_ex2": {"grpo_steps": 2, "seed": 1}, "06_lavise": {"cnn_steps": 3, "seed": 1}}
    assert prepare.chapter_parameters(["04_ex2"], {"cnn_steps": 3}) == {"04_ex2": {"cnn_steps": 3}}, (
        "one chapter gets the whole file and rejects the name itself"
    )
    bad = tmp_path / "params.yml"
    bad.write_text("grpo_steps: 2\ngrpo_stpes: 3\n")
    with pytest.raises(SystemExit):
        prepare.main(["04_ex2", "06_lavise", "-f", str(bad)])
    assert "['grpo_stpes']" in capsys.readouterr().err, "the error names the misspelt parameter"


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
