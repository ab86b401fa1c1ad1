"""The chapter harness: one call validates a notebook's parameters and builds what every chapter needs.

A chapter's parameters cell stays literal (it is papermill's interface); the cell after it calls
:func:`setup`, which checks *every* parameter before any work — type, range, unknown or misspelt
names, files present, the chapter's own checks (an endpoint reachable, a layer name that exists) —
and reports all problems at once. :meth:`Chapter.finish` writes the chapter's results with every
parameter that applied and the content hash of every input file. See CONTRIBUTING.md.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import inspect
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__, plots, training
from .artifacts import ArtifactStore, atomic_write_json, file_input
from .models import TrainConfig, load_clip, pick_device, world_clip
from .world import ConceptWorld, WorldConfig

Check = Callable[[Any, dict[str, Any]], "str | None"]
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping", "file": "a file path", "dir": "a folder path", "path": "a file or folder path"}
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
PARAMETERS_MARK = "# Shared by every chapter"  # the first line of every parameters cell


class ParameterError(ValueError):
    """Bad chapter parameters; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Param:
    """A declared chapter parameter: its default (as in the parameters cell), kind and valid range.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``list`` (elements of kind ``item``), ``dict``,
    ``"file"``, ``"dir"`` or ``"path"``. A ``None`` default makes the parameter optional.
    ``check(value, params)`` returns a problem in words, or ``None``. ``applies(params)`` says
    whether the parameter matters in this run (results record only those that do).
    """

    default: Any
    kind: Any
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    item: Any = None
    check: Check | None = None
    applies: Callable[[dict[str, Any]], bool] | None = None
    help: str = ""


def _on_world(p: dict[str, Any]) -> bool:
    return p["model"] == "world" or p.get("dataset", "world") == "world"


def _check_model(value: str, p: dict[str, Any]) -> str | None:
    if value == "world":
        return None
    from .models import _check_model_name

    try:
        _check_model_name(value)
    except ValueError as err:
        return str(err)
    return None


def _check_pretrained(value: str | None, p: dict[str, Any]) -> str | None:
    if value is None or p["model"] == "world":
        return None
    if any(c in value for c in "/\\") or value.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors")):
        return None if Path(value).is_file() else f"checkpoint file {value!r} does not exist"
    if p["model"].startswith("hf-hub:"):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(p["model"])
    return None if value in tags else (f"model {p['model']!r} has no pretrained tag {value!r}; known tags: {tags} "
                                       "(or pass a local checkpoint file)")


def _check_device(value: str | None, p: dict[str, Any]) -> str | None:
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except RuntimeError as err:
        return f"{value!r} is not a torch device ({err}); use 'cpu', 'cuda' or 'cuda:1'"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"device {value!r} asked for, but no CUDA GPU is visible here; use None or 'cpu'"
    return None


def _config_check(cls: type) -> Check:
    def check(value: dict, p: dict[str, Any]) -> str | None:
        known = [f.name for f in fields(cls)]
        unknown = [k for k in value if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            return f"unknown {cls.__name__} fields {said}; known: {known}"
        try:
            cls(**value)
        except (TypeError, ValueError) as err:
            return str(err)
        return None

    return check


SHARED: dict[str, Param] = {
    "world": Param({}, dict, check=_config_check(WorldConfig), applies=_on_world,
                   help="Concept World overrides of WorldConfig's defaults"),
    "world_clip": Param({}, dict, check=_config_check(TrainConfig), applies=lambda p: p["model"] == "world",
                        help="world-CLIP training overrides of TrainConfig's defaults"),
    "model": Param("world", str, check=_check_model, help="'world', an open_clip name or 'hf-hub:org/repo'"),
    "pretrained": Param(None, str, check=_check_pretrained, applies=lambda p: p["model"] != "world",
                        help="open_clip pretrained tag or a local checkpoint file"),
    "seed": Param(0, int, min=0),
    "device": Param(None, str, check=_check_device, help="None: CUDA when available, else CPU"),
    "checkpoint_seconds": Param(30.0, float, min=0, help="training checkpoints at most this far apart"),
    "artifacts_dir": Param("../artifacts", str),
    "results_dir": Param("../book/results", str),
}


def _kind_problem(name: str, value: Any, spec: Param) -> tuple[Any, str | None]:
    """``(coerced value, problem)`` for one parameter's type and range."""
    if value is None:
        return None, None if spec.default is None else f"{name}: None is not allowed (give {_KINDS[spec.kind]})"
    kind = spec.kind
    if kind in ("file", "dir", "path"):
        if not isinstance(value, (str, Path)):
            return value, f"{name}={value!r} should be {_KINDS[kind]}"
        path = Path(value).expanduser()
        ok = {"file": path.is_file(), "dir": path.is_dir(), "path": path.exists()}[kind]
        missing = {"file": "no such file", "dir": "no such folder", "path": "no such file or folder"}[kind]
        return str(path), None if ok else f"{name}={str(value)!r}: {missing} (relative paths start in notebooks/)"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        return value, f"{name}={value!r} ({type(value).__name__}) should be {_KINDS[kind]}"
    if kind is list and spec.item is not None:
        items = []
        for i, v in enumerate(value):
            v, problem = _kind_problem(f"{name}[{i}]", v, Param(spec.item, spec.item, spec.min, spec.max))
            if problem:
                return value, problem
            items.append(v)
        return items, None
    if spec.choices is not None and value not in spec.choices:
        return value, f"{name}={value!r} is not one of {list(spec.choices)}"
    if spec.min is not None and kind in (int, float) and value < spec.min:
        return value, f"{name}={value} must be >= {spec.min}"
    if spec.max is not None and kind in (int, float) and value > spec.max:
        return value, f"{name}={value} must be <= {spec.max}"
    return value, None


def _user_names(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The notebook's parameter-like globals.

    In IPython (papermill, Jupyter) these are the names assigned by the last run of the
    parameters cell (it opens with :data:`PARAMETERS_MARK`) and by papermill's injected cell
    after it: names made by other cells or imported are not parameters, so a teacher can rerun
    the setup cell mid-lesson. Elsewhere, every global of a parameter type that is not private.
    """
    cells = namespace.get("In")
    if isinstance(cells, list) and len(cells) > 1:
        cells = cells[:-1]
        starts = [i for i, c in enumerate(cells) if c.lstrip().startswith(PARAMETERS_MARK)]
        if starts:
            cells = [c for c in cells[starts[-1]:] if c.lstrip().startswith((PARAMETERS_MARK, "# Parameters"))]
        assigned = set()
        for source in cells:
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            assigned |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                         for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         if isinstance(t, ast.Name)}
        return {k: namespace[k] for k in assigned if k in namespace and not k.startswith("_")}
    kinds = (int, float, str, bool, list, dict, tuple, Path, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and k not in _IPYTHON_NAMES
            and isinstance(v, kinds)}


def validate(namespace: Mapping[str, Any], spec: Mapping[str, Param]) -> dict[str, Any]:
    """Validated, coerced parameters; raises :class:`ParameterError` listing every problem."""
    given = _user_names(namespace)
    problems = []
    for name in sorted(set(given) - set(spec)):
        close = difflib.get_close_matches(name, list(spec), n=1)
        problems.append(f"unknown parameter {name!r}" + (f": did you mean {close[0]!r}?" if close else
                                                          f"; this chapter's parameters: {sorted(spec)}"))
    params = {}
    for name, p in spec.items():
        value, problem = _kind_problem(name, given.get(name, p.default), p)
        params[name] = value
        if problem:
            problems.append(problem)
    if not problems:  # checks see well-typed values only
        for name, p in spec.items():
            if p.check is not None and params[name] is not None:
                problem = p.check(params[name], params)
                if problem:
                    problems.append(f"{name}: {problem}")
    if problems:
        raise ParameterError("This chapter cannot run with these parameters:\n" +
                             "\n".join(f"  - {p}" for p in problems))
    return params


def setup(chapter: str, namespace: dict[str, Any], parameters: Mapping[str, Param] | None = None) -> Chapter:
    """Validate the notebook's parameters (its ``globals()``) and return the :class:`Chapter`.

    Coerced values are written back into ``namespace``, so later cells use the plain names.
    """
    spec = {**SHARED, **(parameters or {})}
    params = validate(namespace, spec)
    namespace.update(params)
    training.set_checkpoint_interval(params["checkpoint_seconds"])
    return Chapter(chapter, params, spec)


class Chapter:
    """What a chapter's cells share: parameters, world, store, the CLIP, and the results writer."""

    def __init__(self, name: str, params: dict[str, Any], spec: Mapping[str, Param]) -> None:
        self.name, self.params, self.spec = name, params, dict(spec)
        self.world_cfg = WorldConfig(**params["world"])
        self.train_cfg = TrainConfig(**params["world_clip"])
        self.world = ConceptWorld(self.world_cfg)
        self.store = ArtifactStore(params["artifacts_dir"])
        self.device = pick_device(params["device"])
        self.inputs = {k: file_input(v) for k, v in params.items() if v is not None and self._is_input(k, v)}
        self._clip = None
        self._differences: pd.DataFrame | None = None

    def _is_input(self, name: str, value: Any) -> bool:
        if name == "pretrained":
            return Path(str(value)).is_file()
        return self.spec[name].kind in ("file", "dir", "path")

    @property
    def on_world(self) -> bool:
        return _on_world(self.params)

    @property
    def model_key(self) -> dict[str, Any]:
        """The CLIP, identified by content: world and training configs, a tag, or a checkpoint's sha256."""
        p = self.params
        if p["model"] == "world":
            return {"model": "world", "world": self.world_cfg.to_dict(), "train": asdict(self.train_cfg)}
        return {"model": p["model"], "pretrained": self.inputs.get("pretrained", p["pretrained"])}

    def key(self, **extra: Any) -> dict[str, Any]:
        """Start of every artifact key: the CLIP and every input file, plus ``extra``."""
        return {"model": self.model_key, "inputs": self.inputs, **extra}

    def clip(self, progress: bool = True):
        """``(model, preprocess, tokenizer, history or None)`` on the chapter's device, loaded once."""
        if self._clip is None:
            p = self.params
            if p["model"] == "world":
                model, preprocess, tokenizer, history = world_clip(self.store, self.world_cfg, self.train_cfg,
                                                                   progress=progress)
                self._clip = (model.to(self.device), preprocess, tokenizer, history)
            else:
                self._clip = (*load_clip(p["model"], p["pretrained"], str(self.device)), None)
        return self._clip

    def applied(self) -> dict[str, Any]:
        """The parameters that matter in this run (a real-data run records no world settings)."""
        return {k: v for k, v in self.params.items()
                if self.spec[k].applies is None or self.spec[k].applies(self.params)}

    def differences(self, switches: Mapping[str, Switch]) -> pd.DataFrame:
        """The run's switches against the paper and the original code (recorded in the results)."""
        self._differences = differences_table(switches, self.params)
        return self._differences

    def exercise(self, name: str, run: Callable[..., dict[str, float]], **changes: Any) -> pd.DataFrame:
        """Run an exercise: ``run(ch)`` as in the chapter and ``run(ch, **changes)``, both cached.

        The cache key holds every applied parameter, the inputs, the changes and the source of
        ``run``'s module, so editing the method's code recomputes the solution.
        """
        source = hashlib.sha256(Path(inspect.getfile(run)).read_bytes()).hexdigest()
        rows = {}
        for label, kwargs in (("as in the chapter", {}), (_describe(changes), changes)):
            key = {"chapter": self.name, "exercise": name, "function": f"{run.__module__}.{run.__qualname__}",
                   "source": source, "params": self.applied(), "inputs": self.inputs, "changes": kwargs}
            rows[label] = self.store.get_or_build(
                "exercise", key, lambda d, kw=kwargs: atomic_write_json(d / "result.json", run(self, **kw)),
                lambda d: json.loads((d / "result.json").read_text()))
        table = pd.DataFrame(rows).T.apply(pd.to_numeric, errors="coerce")
        table.loc["change"] = table.iloc[1] - table.iloc[0]
        return plots.table(table)

    def finish(self, results: dict[str, Any], summary: list[str] | None = None,
               headline: dict[str, Any] | None = None):
        """Write ``<results_dir>/<chapter>.json`` (results, headline, every applied parameter, inputs,
        environment, differences from the original) and return the summary for display."""
        import torch
        from IPython.display import Markdown

        record = {"chapter": self.name, "results": results, "headline": headline or {},
                  "summary": summary or [], "parameters": self.applied(), "inputs": self.inputs,
                  "environment": {"conceptlab": __version__, "torch": torch.__version__,
                                  "python": platform.python_version(), "device": str(self.device)}}
        if self._differences is not None:
            record["differences_from_original"] = self._differences.reset_index().to_dict(orient="records")
        atomic_write_json(Path(self.params["results_dir"]) / f"{self.name}.json", record)
        return Markdown("**Summary.**\n\n" + "\n".join(f"- {line}" for line in summary or []))


def _describe(changes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in changes.items()) or "unchanged"


@dataclass(frozen=True)
class Switch:
    """A choice where the original code departs from its paper: the value that computes the paper's
    method, the value that reproduces the original code, and what the choice changes."""

    paper: Any
    original: Any
    what: str


def differences_table(switches: Mapping[str, Switch], params: Mapping[str, Any]) -> pd.DataFrame:
    """One row per switch: this run's value, the paper's, the original code's, and which one the run follows."""
    rows = {}
    for name, s in switches.items():
        value = params[name]
        follows = [who for who, v in (("paper", s.paper), ("original code", s.original)) if v == value]
        rows[name] = {"this run": value, "paper": s.paper, "original code": s.original,
                      "this run follows": " and ".join(follows) or "neither", "what it changes": s.what}
    return pd.DataFrame(rows).T.rename_axis("switch")


def fidelity_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Headline numbers side by side: ``{metric: {"paper": ..., "original code": ..., "this book": ...}}``."""
    order = ["paper reports", "original code computes", "this book"]
    renamed = {m: {{"paper": order[0], "original code": order[1], "this book": order[2]}.get(k, k): v
                   for k, v in cols.items()} for m, cols in rows.items()}
    table = pd.DataFrame(renamed).T
    return table.reindex(columns=[c for c in order if c in table] + [c for c in table if c not in order])


def show_source(obj: Callable | type):
    """The source of a function or class of the package, highlighted: the book shows the code that ran."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def parameters_cell(spec: Mapping[str, Param]) -> dict[str, Any]:
    """The declared defaults, as the parameters cell must state them (tests compare the two)."""
    return {k: (list(v.default) if isinstance(v.default, tuple) else v.default) for k, v in spec.items()}


__all__ = ["SHARED", "Chapter", "Param", "ParameterError", "Switch", "differences_table", "fidelity_table",
           "parameters_cell", "setup", "show_source", "validate"]
