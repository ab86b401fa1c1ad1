"""The artifact store: everything the book caches, keyed by every input that made it.

``store.get_or_build(kind, key, build, load)`` is the one way to cache a thing. It names a
directory ``<root>/<kind>/<hash of key>/`` (with a ``params.json`` saying what made it), holds a
lock on it so that two kernels build it once, calls ``build(dir)`` unless the directory holds the
completion marker ``DONE``, writes ``DONE`` last, and returns ``load(dir)``. A directory without
``DONE`` is unfinished (a crash, a kill): it is built again, with a note, and a training run in
it resumes from its ``state.pt`` (or starts again when that checkpoint cannot be read). ``DONE``
records the sha256 of every file, and a load first checks them: a file changed or damaged in place
is rebuilt, with one note. Keys carry content hashes of input files and folders (:func:`fingerprint`),
never paths alone, so overwriting a checkpoint or an image invalidates what was made from it; a
stat cache (:class:`StatCache`, in ``<root>/.fingerprints.json``) keeps unchanged files from being read again.

Every write is atomic (temporary file, then ``os.replace``) and readable by the group.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
DONE = "DONE"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
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
    """Write ``obj`` as indented JSON via a temporary file."""
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
            raise ValueError(
                f"{why} It is a cached artifact: delete the folder {path.parent} and rerun to rebuild it."
            ) from err
        raise ValueError(
            f"{why} It is not a PyTorch state dict readable with weights_only=True (or it is "
            "truncated). Pass a state dict saved with torch.save(model.state_dict(), path), an "
            "open_clip checkpoint, or OpenAI's original .pt file."
        ) from err


STAT_CACHE = ".fingerprints.json"
# A file whose modification time is this close to the moment it is hashed may still change within the same
# timestamp tick; its hash is not cached (git's "racy clean" rule), so a quick overwrite is never missed.
_RACY_SECONDS = 2.0


class StatCache:
    """sha256 of files keyed by ``(path, size, mtime_ns)``, so that an unchanged file is not read again.

    Like git's index and DVC's state database: a file whose size or modification time changed is hashed
    again; a file just written (within :data:`_RACY_SECONDS`) is hashed but not remembered. With a
    ``path`` the cache persists there (JSON, written atomically, merged with what other processes wrote).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._hashes: dict[str, str] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._hashes = self._read()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache only costs re-reading files
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _stat_key(path: Path, stat: os.stat_result) -> str:
        return f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}"

    def sha256(self, path: str | Path) -> str:
        """The sha256 of a file's content, read only when its path, size or modification time is new."""
        path = Path(path).resolve()
        stat = path.stat()
        key = self._stat_key(path, stat)
        if key not in self._hashes:
            digest = _hash_file(path)
            if time.time() - stat.st_mtime_ns / 1e9 < _RACY_SECONDS:
                return digest
            self._hashes[key] = digest
            self._dirty = True
        return self._hashes[key]

    def save(self) -> None:
        """Write new entries to the cache file (merged with entries other processes wrote meanwhile)."""
        if self.path is None or not self._dirty:
            return
        merged = {**self._read(), **self._hashes} if self.path.is_file() else dict(self._hashes)
        try:
            atomic_write_bytes(self.path, json.dumps(merged, sort_keys=True).encode())
        except OSError as err:  # a read-only store still works, it only re-reads files
            note(f"could not save the file-hash cache {self.path} ({err}); files will be hashed again.")
        self._hashes, self._dirty = merged, False


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_MEMORY = StatCache()  # for callers without a store: hashes kept for this process only


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def fingerprint(path: str | Path, cache: StatCache | None = None) -> str:
    """sha256 of a file's content, or of a folder's files (relative names and content hashes; hidden
    entries skipped), so an image overwritten by another of the same size changes the fingerprint.

    ``cache`` (default: one kept in memory) avoids re-reading files whose size and modification time
    are unchanged; :meth:`ArtifactStore.fingerprint` keeps it in the store, across processes.
    """
    cache = _MEMORY if cache is None else cache
    path = Path(path).resolve()
    if path.is_dir():
        lines = [f"{p.relative_to(path).as_posix()}\t{cache.sha256(p)}" for p in _visible_files(path)]
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    else:
        digest = cache.sha256(path)
    cache.save()
    return digest


def file_input(path: str | Path | None, cache: StatCache | None = None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of an input file or folder, for keys and results (``None`` stays ``None``)."""
    return None if path is None else {"path": str(path), "sha256": fingerprint(path, cache)}


def process_state():
    """accelerate's process state, set up as a trainer sets it up (CPU processes where there is no GPU):
    one process, or several under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class ArtifactStore:
    """Directory of artifacts, each under ``<root>/<kind>/<params hash>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.stat_cache = StatCache(self.root / STAT_CACHE)

    def fingerprint(self, path: str | Path) -> str:
        """:func:`fingerprint` with this store's file-hash cache (unchanged files are not read again)."""
        return fingerprint(path, self.stat_cache)

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

    def busy(self, kind: str, params: Any) -> bool:
        """Whether another process holds the artifact's lock now (it is building it; a finished one is never busy)."""
        d = self.root / kind / params_key(params)
        if (d / DONE).exists() or not (d / ".lock").exists():
            return False
        with open(d / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
        return False

    def free_first(self, items: Sequence[T], artifact: Callable[[T], tuple[str, Any]]) -> Iterator[T]:
        """``items`` in order, except that one whose artifact (``artifact(item) -> (kind, key)``) another process
        is building waits until no other is free: two book lanes that need the same models (chapters 4 and 7)
        then build different ones side by side instead of one waiting on the other's lock. The caller builds
        or loads each item before asking for the next; what an item builds does not depend on the order."""
        pending = list(items)
        while pending:
            i = next((i for i, item in enumerate(pending) if not self.busy(*artifact(item))), 0)
            yield pending.pop(i)

    def get_or_build(
        self, kind: str, key: Any, build: Callable[[Path], Any], load: Callable[[Path], T], collective: bool = False
    ) -> T:
        """``load(dir)`` of the finished artifact for ``key``, building it first if it is not finished.

        ``build(dir)`` writes the artifact's files into ``dir``; ``DONE`` is written after it returns, with
        the sha256 of every file. A finished artifact whose files changed since (a file overwritten or
        damaged in place) or that cannot be loaded is rebuilt from nothing, with one note.
        ``collective``: ``build`` is a data-parallel training whose main process writes; under
        ``accelerate launch`` every process runs it (see :meth:`_build_together`).
        """
        if collective:
            state = process_state()
            if state.num_processes > 1:
                return self._build_together(state, kind, key, build, load)
        with self.building(kind, key) as d:
            if not (d / DONE).exists():
                _build(kind, d, build, self.stat_cache)
            else:
                changed = self.changed_files(d)
                if changed:
                    self._rebuild(kind, d, build, f"its files changed since it was built ({', '.join(changed[:5])})")
            try:
                return load(d)
            except Exception as err:
                self._rebuild(kind, d, build, f"it cannot be loaded ({type(err).__name__}: {str(err)[:200]})")
                return load(d)

    def changed_files(self, d: Path) -> list[str]:
        """Files of a finished artifact that differ from what its ``DONE`` marker recorded (or are gone)."""
        try:
            recorded = json.loads((d / DONE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return [DONE]
        changed = []
        for name, was in recorded.items():
            path = d / name
            if not path.is_file():
                changed.append(name)
            elif isinstance(was, dict):
                if path.stat().st_size != was["size"] or self.stat_cache.sha256(path) != was["sha256"]:
                    changed.append(name)
            elif path.stat().st_size != was:  # a marker written before hashes were recorded: sizes only
                changed.append(name)
        self.stat_cache.save()
        return changed

    def _rebuild(self, kind: str, d: Path, build: Callable[[Path], Any], why: str) -> None:
        """Build a finished artifact again from an empty folder, saying why once."""
        note(f"{kind}/{d.name} is finished but {why}: building it again.")
        for p in d.iterdir():
            if p.name not in ("params.json", ".lock"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _build(kind, d, build, self.stat_cache)

    def _build_together(self, state, kind: str, key: Any, build: Callable[[Path], Any], load: Callable[[Path], T]) -> T:
        """Every process builds, the main one writes ``DONE``, all load. The lock cannot guard this: one
        process would hold it while the others wait for a training that needs them all (and loading
        may wait for every process too), so the processes meet at barriers instead."""
        d = self.path(kind, key)
        state.wait_for_everyone()
        finished = (d / DONE).exists()
        state.wait_for_everyone()  # nobody writes before every process has looked
        if not finished:
            if state.is_main_process:
                _build(kind, d, build, self.stat_cache)
            else:
                build(d)
            state.wait_for_everyone()
        return load(d)


def _damaged(path: Path) -> str | None:
    """Why a training checkpoint cannot be read (``None`` when it can): e.g. truncated by a full disk."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        return f"{type(err).__name__}: {str(err)[:120]}"
    return None


def _build(kind: str, d: Path, build: Callable[[Path], Any], cache: StatCache) -> None:
    leftovers = sorted(p.name for p in d.iterdir() if p.name not in ("params.json", ".lock"))
    if leftovers:
        resume = ""
        if "state.pt" in leftovers:
            damage = _damaged(d / "state.pt")
            if damage:
                (d / "state.pt").unlink()
                resume = f"; its checkpoint state.pt cannot be read ({damage}), so from the start"
            else:
                resume = " (resuming from its checkpoint)"
        note(
            f"{kind}/{d.name} is unfinished (no {DONE} marker; found {', '.join(leftovers)}): "
            f"building it again{resume}."
        )
    build(d)
    files = {
        p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": cache.sha256(p)}
        for p in _visible_files(d)
        if p.name not in (DONE, "params.json")
    }
    cache.save()
    atomic_write_json(d / DONE, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files})


def note(message: str) -> None:
    """Tell the reader something worth knowing that is not an error (on stderr, so it stands out)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def read_results(results_dir: str | Path, chapter: str) -> dict[str, Any]:
    path = Path(results_dir) / f"{chapter}.json"
    if not path.exists():
        raise FileNotFoundError(f"No results for chapter {chapter!r} at {path}: run that chapter first.")
    return json.loads(path.read_text())
