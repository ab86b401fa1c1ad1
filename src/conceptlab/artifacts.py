"""A small artifact store: files keyed by a hash of the parameters that made them.

``store.path("clip", params)`` names a directory ``<root>/clip/<hash>/`` that holds the
artifact and a ``params.json`` saying what made it. Writes are atomic (temporary file,
then ``os.replace``), so an interrupted run never leaves a half-written artifact that a
later run would mistake for a finished one, and a finished artifact is never
overwritten by a failed run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return obj.item()
    return obj


def params_key(params: Any) -> str:
    """A short, stable hash of JSON-able parameters (dict key order does not matter)."""
    text = json.dumps(_jsonable(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say which file is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Check the path, or delete the parameter to train one.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"Could not read checkpoint {path} ({type(err).__name__}: {str(err)[:200]}). "
            "The file is corrupt, truncated or not a PyTorch state dict: delete it and rerun to rebuild it, "
            "or point to a valid checkpoint.") from err


class TrainingRun:
    """Resumable training state in ``out_dir``: ``state.pt`` while a run is under way,
    ``model.pt`` and ``history.json`` once it is finished.

    Construction resumes model, optimizer and history from ``state.pt`` if an earlier run was
    interrupted; ``start`` is the first step still to do. ``writes=False`` (a non-main process
    of a multi-GPU run) keeps the bookkeeping but writes nothing.
    """

    def __init__(self, out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 writes: bool = True) -> None:
        self.out_dir, self.model, self.optimizer, self.writes = Path(out_dir), model, optimizer, writes
        self.state_path = self.out_dir / "state.pt"
        self.history: list[dict] = []
        if self.state_path.exists():
            state = safe_torch_load(self.state_path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.history = state["history"]

    @property
    def start(self) -> int:
        return len(self.history)

    def checkpoint(self) -> None:
        """Save everything needed to resume after the steps logged so far."""
        if self.writes:
            atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "history": self.history}, self.state_path)

    @contextlib.contextmanager
    def checkpoint_on_interrupt(self) -> Iterator[None]:
        """Keep the finished steps when the run is interrupted (Ctrl-C, a stopped kernel)."""
        try:
            yield
        except KeyboardInterrupt:
            self.checkpoint()
            raise

    def finish(self, **extra_json: Any) -> None:
        """Write ``model.pt``, ``history.json`` (and any ``name=object`` as ``name.json``); drop ``state.pt``."""
        if not self.writes:
            return
        atomic_torch_save(self.model.state_dict(), self.out_dir / "model.pt")
        atomic_write_json(self.out_dir / "history.json", self.history)
        for name, obj in extra_json.items():
            atomic_write_json(self.out_dir / f"{name}.json", obj)
        self.state_path.unlink(missing_ok=True)


class ArtifactStore:
    """Directory of artifacts, each under ``<root>/<kind>/<params hash>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, params: Any) -> Path:
        """The directory for this kind and parameters (created, with its ``params.json``)."""
        d = self.root / kind / params_key(params)
        if not (d / "params.json").exists():
            atomic_write_json(d / "params.json", params)
        return d

    @contextlib.contextmanager
    def building(self, kind: str, params: Any) -> Iterator[Path]:
        """Hold an exclusive lock on the artifact's directory while it is checked and built, so
        that two kernels asking for the same artifact build it once (the second one waits)."""
        d = self.path(kind, params)
        with open(d / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_create(self, kind: str, params: Any, filename: str,
                      build: Callable[[Path], Any], load: Callable[[Path], Any]) -> Any:
        """Load ``<dir>/filename`` if present, else ``build(dir)`` (which must write it) and load it."""
        with self.building(kind, params) as d:
            target = d / filename
            if not target.exists():
                build(d)
                if not target.exists():
                    raise RuntimeError(f"Building {kind} did not write {target}.")
        return load(target)


def write_results(results_dir: str | Path, chapter: str, numbers: dict[str, Any],
                  params: dict[str, Any]) -> Path:
    """Write a chapter's headline numbers, with the parameters that produced them."""
    return atomic_write_json(Path(results_dir) / f"{chapter}.json",
                             {"chapter": chapter, "results": numbers, "parameters": params})


def read_results(results_dir: str | Path, chapter: str) -> dict[str, Any]:
    path = Path(results_dir) / f"{chapter}.json"
    if not path.exists():
        raise FileNotFoundError(f"No results for chapter {chapter!r} at {path}: run that chapter first.")
    return json.loads(path.read_text())
