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
import html
import inspect
import json
import platform
import re
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__, plots, training
from .artifacts import ArtifactStore, atomic_write_json, file_input
from .models import TrainConfig, load_clip, pick_device, world_clip
from .world import ConceptWorld, WorldConfig

Check = Callable[[Any, dict[str, Any]], "str | None"]
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    "file": "a file path",
    "dir": "a folder path",
    "path": "a file or folder path",
}
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
PARAMETERS_MARK = "# Shared by every chapter"  # the first line of every parameters cell
_OUTPUTS = ("artifacts_dir", "results_dir")  # folders a chapter writes: never inputs


class ParameterError(ValueError):
    """Bad chapter parameters; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Param:
    """A declared chapter parameter: its default (as in the parameters cell), kind and valid range.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``list`` (elements of kind ``item``), ``dict`` (with
    a dataclass ``item``: overrides of its fields, each type-checked by name, then the dataclass's own
    checks), ``"file"``, ``"dir"`` or ``"path"``. A ``None`` default makes the parameter optional.
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
    return (
        None
        if value in tags
        else (
            f"model {p['model']!r} has no pretrained tag {value!r}; known tags: {tags} "
            "(or pass a local checkpoint file)"
        )
    )


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


def _type_problem(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    """``(coerced value, problem)`` of one config field against its annotation (``int`` refuses a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, str, bool):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
            return value, f"{name}={value!r} ({type(value).__name__}) should be {_KINDS[hint]}"
        return value, None
    if origin is dict:
        if not isinstance(value, dict):
            return value, f"{name}={value!r} ({type(value).__name__}) should be {_KINDS[dict]}"
        out = {}
        for k, v in value.items():
            out[k], problem = _type_problem(f"{name}.{k}", v, args[1] if args else Any)
            if problem:
                return value, problem
        return out, None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return value, f"{name}={value!r} ({type(value).__name__}) should be {_KINDS[list]}"
        items = []
        for i, v in enumerate(value):
            item, problem = _type_problem(f"{name}[{i}]", v, args[0] if args else Any)
            if problem:
                return value, problem
            items.append(item)
        return items, None
    return value, None


def _config_check(name: str, value: dict, cls: type) -> tuple[dict, str | None]:
    """``(coerced overrides, problem)`` of a mapping of ``cls``'s fields (``world``, ``world_clip``): names
    known, each field's type by its annotation, then ``cls``'s own checks (ranges, warmup <= steps)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in close.items())
        return value, f"{name}: unknown {cls.__name__} fields {said}; known: {known}"
    coerced, problems = {}, []
    for k, v in value.items():
        coerced[k], problem = _type_problem(f"{name}.{k}", v, hints[k])
        if problem:
            problems.append(problem)
    if problems:
        return value, "; ".join(problems)
    try:
        cls(**coerced)
    except (TypeError, ValueError) as err:
        return value, f"{name}: {err}"
    return coerced, None


def _check_output_dir(value: str, p: dict[str, Any]) -> str | None:
    """An output folder must be a folder, or creatable: no file in its place or above it."""
    path = Path(value).expanduser().absolute()
    for where in (path, *path.parents):
        if where.exists():
            return (
                None
                if where.is_dir()
                else (f"{str(where)!r} is a file, not a folder: pass a folder (it is created if missing)")
            )
    return None


SHARED: dict[str, Param] = {
    "world": Param(
        {}, dict, item=WorldConfig, applies=_on_world, help="Concept World overrides of WorldConfig's defaults"
    ),
    "world_clip": Param(
        {},
        dict,
        item=TrainConfig,
        applies=lambda p: p["model"] == "world",
        help="world-CLIP training overrides of TrainConfig's defaults",
    ),
    "model": Param("world", str, check=_check_model, help="'world', an open_clip name or 'hf-hub:org/repo'"),
    "pretrained": Param(
        None,
        str,
        check=_check_pretrained,
        applies=lambda p: p["model"] != "world",
        help="open_clip pretrained tag or a local checkpoint file",
    ),
    "seed": Param(0, int, min=0),
    "device": Param(None, str, check=_check_device, help="None: CUDA when available, else CPU"),
    "checkpoint_seconds": Param(30.0, float, min=0, help="training checkpoints at most this far apart"),
    "artifacts_dir": Param("../artifacts", str, check=_check_output_dir),
    "results_dir": Param("../book/results", str, check=_check_output_dir),
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
    if kind is dict and isinstance(spec.item, type) and is_dataclass(spec.item):
        return _config_check(name, value, spec.item)
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
            cells = [c for c in cells[starts[-1] :] if c.lstrip().startswith((PARAMETERS_MARK, "# Parameters"))]
        assigned = set()
        for source in cells:
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            assigned |= {
                t.id
                for node in tree.body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
        return {k: namespace[k] for k in assigned if k in namespace and not k.startswith("_")}
    kinds = (int, float, str, bool, list, dict, tuple, Path, type(None))
    return {
        k: v for k, v in namespace.items() if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, kinds)
    }


def validate(namespace: Mapping[str, Any], spec: Mapping[str, Param]) -> dict[str, Any]:
    """Validated, coerced parameters; raises :class:`ParameterError` listing every problem."""
    given = _user_names(namespace)
    problems = []
    for name in sorted(set(given) - set(spec)):
        close = difflib.get_close_matches(name, list(spec), n=1)
        problems.append(
            f"unknown parameter {name!r}"
            + (f": did you mean {close[0]!r}?" if close else f"; this chapter's parameters: {sorted(spec)}")
        )
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
        raise ParameterError(
            "This chapter cannot run with these parameters:\n" + "\n".join(f"  - {p}" for p in problems)
        )
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
        self.inputs = {
            k: file_input(path, self.store.stat_cache)
            for k, v in params.items()
            if (path := self._input_path(k, v)) is not None
        }
        self._clip: tuple[Any, ...] | None = None
        self._differences: pd.DataFrame | None = None
        self.timings: dict[str, float] = {}

    def with_params(self, **changes: Any) -> Chapter:
        """The same chapter with some parameters changed (validated like the notebook's): for exercises.

        The store is shared, and so is the loaded CLIP when the change leaves the model's key as it is.
        """
        params = validate({**self.params, **changes}, self.spec)
        other = Chapter(self.name, params, self.spec)
        if other.model_key == self.model_key and str(other.device) == str(self.device):
            other._clip = self._clip
        return other

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of the chapter's work (``"train"``, ``"measure"``, ``"explain"``, ...).

        Seconds add up per stage name and are written into the results (``timings``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _input_path(self, name: str, value: Any) -> str | None:
        """The file or folder a parameter names, if any: a file/folder parameter's value, or any string
        naming an existing path, bare or after a ``scheme:`` prefix (``glove:/data/glove.txt``,
        ``local-dir:/models/clip``), so every file a run reads is hashed into keys and results."""
        if value is None or name in _OUTPUTS:
            return None
        if self.spec[name].kind in ("file", "dir", "path"):
            return str(value)
        if not isinstance(value, str):
            return None
        candidates = [value, value.split(":", 1)[1] if ":" in value else ""]
        return next((c for c in candidates if c not in ("", ".") and Path(c).expanduser().exists()), None)

    @property
    def on_world(self) -> bool:
        return _on_world(self.params)

    @property
    def model_key(self) -> dict[str, Any]:
        """The CLIP, identified by content: world and training configs, a tag, or a checkpoint's sha256."""
        p = self.params
        if p["model"] == "world":
            return {"model": "world", "world": self.world_cfg.to_dict(), "train": asdict(self.train_cfg)}
        key = {"model": p["model"], "pretrained": self.inputs.get("pretrained", p["pretrained"])}
        return {**key, "files": self.inputs["model"]} if "model" in self.inputs else key

    def key(self, **extra: Any) -> dict[str, Any]:
        """Start of every artifact key: the CLIP and every input file, plus ``extra``."""
        return {"model": self.model_key, "inputs": self.inputs, **extra}

    def clip(self, progress: bool = True):
        """``(model, preprocess, tokenizer, history or None)`` on the chapter's device, loaded once."""
        if self._clip is None:
            p = self.params
            if p["model"] == "world":
                model, preprocess, tokenizer, history = world_clip(
                    self.store, self.world_cfg, self.train_cfg, progress=progress
                )
                self._clip = (model.to(self.device), preprocess, tokenizer, history)
            else:
                self._clip = (*load_clip(p["model"], p["pretrained"], str(self.device)), None)
        return self._clip

    def applied(self) -> dict[str, Any]:
        """The parameters that matter in this run (a real-data run records no world settings); once a
        user's CLIP is loaded, also the architecture that ran (``loaded_architecture``, e.g. the
        ``-quickgelu`` variant that OpenAI's weights are loaded as)."""
        out = {
            k: v for k, v in self.params.items() if self.spec[k].applies is None or self.spec[k].applies(self.params)
        }
        if self._clip is not None and self.params["model"] != "world":
            out["loaded_architecture"] = loaded_architecture(self.params["model"], self._clip[0])
        return out

    def differences(self, switches: Mapping[str, Switch]) -> DifferencesTable:
        """The run's switches against the paper and the original code (recorded in the results)."""
        self._differences = differences_table(switches, self.params)
        return self._differences

    def exercise(self, name: str, run: Callable[..., dict[str, float]], **changes: Any) -> pd.DataFrame:
        """Run an exercise: ``run(ch)`` as in the chapter and ``run(ch.with_params(**changes))``, both cached.

        Changes that name a declared parameter go through :meth:`with_params` (validated); any other
        change (a prompt template, a noise level) is passed to ``run`` as a keyword. The cache key holds
        every applied parameter, the inputs, the changes and the source of ``run``'s module, so editing
        the method's code recomputes the solution.
        """
        source = hashlib.sha256(Path(inspect.getfile(run)).read_bytes()).hexdigest()
        rows = {}
        for label, kwargs in (("as in the chapter", {}), (_describe(changes), changes)):
            key = {
                "chapter": self.name,
                "exercise": name,
                "function": f"{run.__module__}.{run.__qualname__}",
                "source": source,
                "params": self.applied(),
                "inputs": self.inputs,
                "changes": kwargs,
            }
            rows[label] = self.store.get_or_build(
                "exercise",
                key,
                # (name, value) pairs: JSON objects are written with sorted keys, the table keeps run's order
                lambda d, kw=kwargs: atomic_write_json(d / "result.json", list(self._exercise(run, kw).items())),  # type: ignore[misc]
                lambda d: dict(json.loads((d / "result.json").read_text())),
            )
        table = pd.DataFrame(rows).T.apply(pd.to_numeric, errors="coerce")
        table.loc["change"] = table.iloc[1] - table.iloc[0]
        return plots.table(table)

    def _exercise(self, run: Callable[..., dict[str, float]], changes: Mapping[str, Any]) -> dict[str, float]:
        declared = {k: v for k, v in changes.items() if k in self.spec}
        other = {k: v for k, v in changes.items() if k not in self.spec}
        return run(self.with_params(**declared) if declared else self, **other)

    def finish(self, results: dict[str, Any], summary: list[str] | None = None, headline: dict[str, Any] | None = None):
        """Write ``<results_dir>/<chapter>.json`` (results, headline, every applied parameter, inputs,
        environment, differences from the original) and return the summary for display."""
        import torch
        from IPython.display import Markdown

        record = {
            "chapter": self.name,
            "results": results,
            "headline": _plain(headline or {}),
            "summary": summary or [],
            "parameters": self.applied(),
            "inputs": self.inputs,
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "environment": {
                "conceptlab": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(self.device),
            },
        }
        if self._differences is not None:
            record["differences_from_original"] = self._differences.reset_index().to_dict(orient="records")
        atomic_write_json(Path(self.params["results_dir"]) / f"{self.name}.json", record)
        return Markdown("**Summary.**\n\n" + "\n".join(f"- {line}" for line in summary or []))


def loaded_architecture(name: str, model: Any) -> str:
    """The open_clip architecture a loaded model is: ``name``, or its QuickGELU variant when the
    weights were loaded with QuickGELU under a GELU name (``ViT-B-32`` -> ``ViT-B-32-quickgelu``)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    quick = any(isinstance(m, QuickGELU) for m in model.modules())
    if not quick or name.endswith("-quickgelu") or name.startswith(("hf-hub:", "local-dir:")):
        return name
    twin = f"{name}-quickgelu"
    return twin if twin in open_clip.list_models() else f"{name} (QuickGELU)"


def _plain(headline: Mapping[str, Any]) -> dict[str, Any]:
    """Headline values as JSON: a :class:`~conceptlab.chapters.report.Reported` becomes its dict."""
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in headline.items()}


def _describe(changes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in changes.items()) or "unchanged"


@dataclass(frozen=True)
class Switch:
    """A choice where the original code departs from its paper: the value that computes the paper's
    method, the value that reproduces the original code, and what the choice changes."""

    paper: Any
    original: Any
    what: str
    source: str = ""  # where the original code sets it: "owner/repo:path#L12" or "#L12-L15", several "; "-separated


# The commit of each original repository at which the lines cited by ``Switch.source`` were read.
ORIGINAL_COMMITS = {
    "tangli-udel/DEAL": "9b2cc057090e2f3bfae6c1c871f1a009456b8a87",
    "BatsResearch/ex2": "a2da07ece4880294a655aefaaa3a198a832fb2dc",
    "neuroexplicit-saar/Discover-then-Name": "03484baef77747596712cf971e402f77b9da5a9a",
    "YuYang0901/LaViSE": "c16a9d179eb63086ac9f0e012f1530b4365554a2",
}
SOURCE_COLUMN = "where in the original code"
_CITATION = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+):(?P<path>[^\s#;]+)#L(?P<first>\d+)(?:-L(?P<last>\d+))?")
_RENDERED = (".ipynb", ".md")  # files GitHub renders: line anchors need the plain view


@dataclass(frozen=True)
class Citation:
    """One cited line range of an original repository, at its pinned commit (:data:`ORIGINAL_COMMITS`)."""

    repo: str
    path: str
    first: int
    last: int

    @property
    def lines(self) -> str:
        """GitHub's line anchor: ``L12`` or ``L12-L15``."""
        return f"L{self.first}" if self.last == self.first else f"L{self.first}-L{self.last}"

    @property
    def url(self) -> str:
        """The range on GitHub at the pinned commit."""
        plain = "?plain=1" if self.path.endswith(_RENDERED) else ""
        return f"https://github.com/{self.repo}/blob/{ORIGINAL_COMMITS[self.repo]}/{self.path}{plain}#{self.lines}"

    @property
    def label(self) -> str:
        """Short text: ``DEAL/train.py#L12-L15``."""
        return f"{self.repo.split('/')[1]}/{self.path}#{self.lines}"


def citations(source: str) -> list[Citation]:
    """The citations of a ``Switch.source`` (``""``: none); a malformed one or an unknown repository raises."""
    out = []
    for part in filter(None, (p.strip() for p in source.split(";"))):
        m = _CITATION.fullmatch(part)
        if m is None:
            raise ValueError(f"{part!r} is not 'owner/repo:path#L<a>' or 'owner/repo:path#L<a>-L<b>'")
        if m["repo"] not in ORIGINAL_COMMITS:
            raise ValueError(f"{part!r}: no pinned commit for {m['repo']!r}; known: {sorted(ORIGINAL_COMMITS)}")
        first, last = int(m["first"]), int(m["last"] or m["first"])
        if not 0 < first <= last:
            raise ValueError(f"{part!r}: lines must run forwards from 1")
        out.append(Citation(m["repo"], m["path"], first, last))
    return out


def source_html(source: str) -> str:
    """A ``Switch.source`` as HTML anchors, for tables shown as HTML (``""`` for none)."""
    return "; ".join(f'<a href="{c.url}">{html.escape(c.label)}</a>' for c in citations(source))


class DifferencesTable(pd.DataFrame):
    """A differences table: plain text (recorded as such in the results), shown in a notebook with its
    :data:`SOURCE_COLUMN` as links. A subclass, because pandas escapes HTML in every cell of a DataFrame's
    display; ``_constructor`` keeps the class through ``astype``, ``rename``, ``round`` and ``.loc`` rows."""

    @property
    def _constructor(self):
        return DifferencesTable

    def _repr_html_(self) -> str | None:
        if SOURCE_COLUMN not in self.columns:
            return super()._repr_html_()
        shown = pd.DataFrame(self).rename(index=_escaped, columns=_escaped)
        for column in shown.columns:
            shown[column] = shown[column].map(source_html if column == SOURCE_COLUMN else _escaped)
        with pd.option_context("display.max_colwidth", None):  # a cut anchor is broken HTML
            return shown.to_html(escape=False, notebook=True)


def _escaped(value: Any) -> Any:
    return html.escape(value) if isinstance(value, str) else value


def differences_table(switches: Mapping[str, Switch], params: Mapping[str, Any]) -> DifferencesTable:
    """One row per switch: this run's value, the paper's, the original code's, which one the run follows,
    what it changes and where the original code sets it (a citation; shown as links)."""
    rows = {}
    for name, s in switches.items():
        value = params[name]
        follows = [who for who, v in (("paper", s.paper), ("original code", s.original)) if v == value]
        citations(s.source)  # a malformed citation fails here, not on the page
        rows[name] = {
            "this run": value,
            "paper": s.paper,
            "original code": s.original,
            "this run follows": " and ".join(follows) or "neither",
            "what it changes": s.what,
            SOURCE_COLUMN: s.source,
        }
    return DifferencesTable(pd.DataFrame(rows).T.rename_axis("switch"))


def fidelity_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Headline numbers side by side: ``{metric: {"paper": ..., "original code": ..., "this book": ...}}``."""
    order = ["paper reports", "original code computes", "this book"]
    renamed = {
        m: {{"paper": order[0], "original code": order[1], "this book": order[2]}.get(k, k): v for k, v in cols.items()}
        for m, cols in rows.items()
    }
    table = pd.DataFrame(renamed).T
    return table.reindex(columns=[c for c in order if c in table] + [c for c in table if c not in order])


def show_source(obj: Callable | type):
    """The source of a function or class of the package, highlighted: the book shows the code that ran."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def parameters_cell(spec: Mapping[str, Param]) -> dict[str, Any]:
    """The declared defaults, as the parameters cell must state them (tests compare the two)."""
    return {k: (list(v.default) if isinstance(v.default, tuple) else v.default) for k, v in spec.items()}


__all__ = [
    "ORIGINAL_COMMITS",
    "SHARED",
    "SOURCE_COLUMN",
    "Chapter",
    "Citation",
    "DifferencesTable",
    "Param",
    "ParameterError",
    "Switch",
    "citations",
    "differences_table",
    "fidelity_table",
    "parameters_cell",
    "setup",
    "show_source",
    "source_html",
    "validate",
]
