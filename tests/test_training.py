"""Resumable training: a run killed by SIGTERM or SIGKILL resumes to exactly the uninterrupted result."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conceptlab.artifacts import safe_torch_load
from conceptlab.models import TrainConfig, train_world_clip
from conceptlab.training import TrainingRun, cosine_lr, set_checkpoint_interval
from conceptlab.world import ConceptWorld, WorldConfig

WORLD = WorldConfig(n_classes=6, seed=0)
CFG = TrainConfig(n_train=64, steps=12, batch_size=8, warmup=3)
SCRIPT = """
import sys, time
from conceptlab.models import TrainConfig, train_world_clip
from conceptlab.training import set_checkpoint_interval
from conceptlab.world import ConceptWorld, WorldConfig
set_checkpoint_interval(0)
train_world_clip(ConceptWorld(WorldConfig(n_classes=6, seed=0)),
                 TrainConfig(n_train=64, steps=12, batch_size=8, warmup=3), sys.argv[1], progress=False,
                 on_step=lambda step: time.sleep(0.1))  # slow enough to be killed half-way
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference")
    set_checkpoint_interval(30)
    train_world_clip(ConceptWorld(WORLD), CFG, out, progress=False)
    return safe_torch_load(out / "model.pt")


def _kill_mid_run(out: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "training never checkpointed"
        time.sleep(0.05)
    time.sleep(0.5)  # a few more steps
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, sig, uninterrupted):
    proc = _kill_mid_run(tmp_path, sig)
    assert not (tmp_path / "model.pt").exists(), "the run finished before it was killed: make it longer"
    if sig == signal.SIGTERM:
        assert "KeyboardInterrupt" in proc.stderr.read().decode(), "SIGTERM must be handled like Ctrl-C"
    done_steps = len(safe_torch_load(tmp_path / "state.pt", owner="store")["history"])
    assert 0 < done_steps < CFG.steps
    set_checkpoint_interval(30)
    history = train_world_clip(ConceptWorld(WORLD), CFG, tmp_path, progress=False)
    assert [h["step"] for h in history] == list(range(CFG.steps))
    resumed = safe_torch_load(tmp_path / "model.pt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_checkpoints_follow_the_clock(tmp_path):
    model = torch.nn.Linear(2, 2)
    run = TrainingRun(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_seconds=3600)
    run.log({"step": 0})
    assert not (tmp_path / "state.pt").exists(), "no checkpoint before the interval has passed"
    run.checkpoint_seconds = 0
    run.log({"step": 1})
    assert len(safe_torch_load(tmp_path / "state.pt", owner="store")["history"]) == 2


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = [cosine_lr(s, 1.0, 10, warmup=2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        set_checkpoint_interval(-1)
