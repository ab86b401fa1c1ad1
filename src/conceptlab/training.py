"""Training bookkeeping shared by every training loop: resumable runs and one learning-rate schedule.

A :class:`TrainingRun` keeps a loop's model, optimizer and history in ``state.pt`` while it runs
and writes ``model.pt`` + ``history.json`` when it finishes. It checkpoints every
``checkpoint_seconds`` (by wall-clock time, so a slow run and a fast run lose at most that much
work), on Ctrl-C and on SIGTERM. A killed run (SIGKILL, a dead kernel) resumes from its last
checkpoint; because every loop draws the data of step ``t`` from ``(seed, t)`` alone, the resumed
run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .artifacts import atomic_torch_save, atomic_write_json, safe_torch_load

DEFAULT_CHECKPOINT_SECONDS = 30.0
_interval = {"seconds": DEFAULT_CHECKPOINT_SECONDS}


def set_checkpoint_interval(seconds: float) -> None:
    """Default checkpoint interval of every later :class:`TrainingRun` (a chapter's ``checkpoint_seconds``)."""
    if seconds < 0:
        raise ValueError(f"checkpoint_seconds={seconds} must be >= 0 (0 checkpoints after every step).")
    _interval["seconds"] = float(seconds)


def cosine_lr(step: int, lr: float, total: int, warmup: int = 0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TrainingRun:
    """Resumable training state in ``out_dir``.

    Construction resumes model, optimizer and history from ``state.pt`` if an earlier run was
    interrupted; ``start`` is the first step still to do. Call :meth:`log` once per finished step
    and :meth:`finish` at the end; run the loop inside :meth:`checkpoint_on_interrupt`.
    ``writes=False`` (a non-main process of a multi-GPU run) keeps the bookkeeping, writes nothing.
    """

    def __init__(
        self,
        out_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        writes: bool = True,
        checkpoint_seconds: float | None = None,
    ) -> None:
        self.out_dir, self.model, self.optimizer, self.writes = Path(out_dir), model, optimizer, writes
        self.checkpoint_seconds = _interval["seconds"] if checkpoint_seconds is None else checkpoint_seconds
        self.state_path = self.out_dir / "state.pt"
        self.history: list[dict] = []
        if self.state_path.exists():
            state = safe_torch_load(self.state_path, owner="store")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.history = state["history"]
        self._last_save = time.monotonic()
        self._signal: int | None = None

    @property
    def start(self) -> int:
        return len(self.history)

    def log(self, record: dict[str, Any]) -> None:
        """Record a finished step; checkpoint when ``checkpoint_seconds`` have passed since the last one."""
        self.history.append(record)
        if self._signal is not None:  # a signal arrived during the step: stop at its end, consistently
            self.checkpoint()
            raise KeyboardInterrupt(f"signal {self._signal}")
        if time.monotonic() - self._last_save >= self.checkpoint_seconds:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save everything needed to resume after the steps logged so far."""
        if self.writes:
            atomic_torch_save(
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "history": self.history},
                self.state_path,
            )
        self._last_save = time.monotonic()

    @contextlib.contextmanager
    def checkpoint_on_interrupt(self) -> Iterator[None]:
        """Keep the finished steps when the run is interrupted: Ctrl-C, a stopped kernel, or SIGTERM.

        A signal (SIGINT, SIGTERM) is held until the running step is logged, then the run checkpoints
        and raises ``KeyboardInterrupt``: raising mid-step would save weights one update ahead of the
        history, and the resumed run would differ from an uninterrupted one."""

        def on_signal(signum, frame):
            self._signal = signum

        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            yield
        except KeyboardInterrupt:
            self.checkpoint()
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def finish(self, **extra_json: Any) -> None:
        """Write ``model.pt``, ``history.json`` (and any ``name=object`` as ``name.json``); drop ``state.pt``."""
        if not self.writes:
            return
        atomic_torch_save(self.model.state_dict(), self.out_dir / "model.pt")
        atomic_write_json(self.out_dir / "history.json", self.history)
        for name, obj in extra_json.items():
            atomic_write_json(self.out_dir / f"{name}.json", obj)
        self.state_path.unlink(missing_ok=True)
