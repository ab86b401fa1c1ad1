"""The artifact store: everything the book caches, keyed by every input that made it.

``store.get_or_build(kind, key, build, load)`` is the one way to cache a thing. It names a
directory ``<root>/<kind>/<hash of key>/`` (with a ``params.json`` saying what made it), holds a
lock on it so that two kernels build it once, calls ``build(dir)`` unless the directory holds the
completion marker ``DONE``, writes ``DONE`` last, and returns ``load(dir)``. A directory without
``DONE`` is unfinished (a crash, a kill): it is built again, with a note, and a training run in
it resumes from its ``state.pt``. Keys carry content hashes of input files (:func:`fingerprint`),
never paths alone, so overwriting a checkpoint or a data folder invalidates what was made from it.

Every write is atomic (temporary file, then ``os.replace``) and readable by the group.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
DONE = "DONE"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are shared like any file
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


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu", owner: str = "user") -> Any:
    """``torch.load(weights_only=True)`` with errors that say which file is wrong and what to do.

    ``owner="user"``: a file the reader supplied (never call it rebuildable); ``"store"``: the
    artifact store's own file (deleting its folder rebuilds it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: check the path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        why = f"Could not read checkpoint {path} ({type(err).__name__}: {str(err)[:200]})."
        if owner == "store":
            raise ValueError(f"{why} It is a cached artifact: delete the folder {path.parent} and rerun to "
                             "rebuild it.") from err
        raise ValueError(f"{why} It is not a PyTorch state dict readable with weights_only=True (or it is "
                         "truncated). Pass a state dict saved with torch.save(model.state_dict(), path), an "
                         "open_clip checkpoint, or OpenAI's original .pt file.") from err


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's content, or of a folder's file list with sizes (hidden entries skipped).

    File hashes are memoised per (path, size, modification time), so a large checkpoint is read once.
    """
    path = Path(path).resolve()
    if path.is_dir():
        lines = sorted(f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}" for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[memo] = digest.hexdigest()
    return _FINGERPRINTS[memo]


def file_input(path: str | Path | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of an input file or folder, for keys and results (``None`` stays ``None``)."""
    return None if path is None else {"path": str(path), "sha256": fingerprint(path)}


def process_state():
    """accelerate's process state, set up as a trainer sets it up (CPU processes where there is no GPU):
    one process, or several under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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

    def finished(self, kind: str, params: Any) -> bool:
        """Whether the artifact for ``params`` is built (its ``DONE`` marker is written)."""
        return (self.root / kind / params_key(params) / DONE).exists()

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

    def get_or_build(self, kind: str, key: Any, build: Callable[[Path], Any], load: Callable[[Path], T],
                     collective: bool = False) -> T:
        """``load(dir)`` of the finished artifact for ``key``, building it first if it is not finished.

        ``build(dir)`` writes the artifact's files into ``dir``; ``DONE`` is written after it returns.
        A finished artifact that cannot be loaded (a corrupt file) is rebuilt once, with a note.
        ``collective``: ``build`` is a data-parallel training whose main process writes; under
        ``accelerate launch`` every process runs it (see :meth:`_build_together`).
        """
        if collective:
            state = process_state()
            if state.num_processes > 1:
                return self._build_together(state, kind, key, build, load)
        with self.building(kind, key) as d:
            if not (d / DONE).exists():
                _build(kind, d, build)
            try:
                return load(d)
            except Exception as err:
                note(f"{kind}/{d.name} is finished but cannot be loaded ({type(err).__name__}: "
                      f"{str(err)[:200]}): building it again.")
                (d / DONE).unlink()
                _build(kind, d, build)
                return load(d)


    def _build_together(self, state, kind: str, key: Any, build: Callable[[Path], Any], load: Callable[[Path], T]
                        ) -> T:
        """Every process builds, the main one writes ``DONE``, all load. The lock cannot guard this: one
        process would hold it while the others wait for a training that needs them all (and loading
        may wait for every process too), so the processes meet at barriers instead."""
        d = self.path(kind, key)
        state.wait_for_everyone()
        finished = (d / DONE).exists()
        state.wait_for_everyone()  # nobody writes before every process has looked
        if not finished:
            if state.is_main_process:
                _build(kind, d, build)
            else:
                build(d)
            state.wait_for_everyone()
        return load(d)


def _build(kind: str, d: Path, build: Callable[[Path], Any]) -> None:
    leftovers = sorted(p.name for p in d.iterdir() if p.name not in ("params.json", ".lock"))
    if leftovers:
        resume = " (resuming from its checkpoint)" if "state.pt" in leftovers else ""
        note(f"{kind}/{d.name} is unfinished (no {DONE} marker; found {', '.join(leftovers)}): "
              f"building it again{resume}.")
    build(d)
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file() and p.name not in (DONE, ".lock")}
    atomic_write_json(d / DONE, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files})


def note(message: str) -> None:
    """Tell the reader something worth knowing that is not an error (on stderr, so it stands out)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def read_results(results_dir: str | Path, chapter: str) -> dict[str, Any]:
    path = Path(results_dir) / f"{chapter}.json"
    if not path.exists():
        raise FileNotFoundError(f"No results for chapter {chapter!r} at {path}: run that chapter first.")
    return json.loads(path.read_text())
