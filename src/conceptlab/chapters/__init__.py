"""One module per chapter: the chapter's parameters, switches, result, results JSON and summary.

The method modules (``conceptlab.deal``, ``conceptlab.sae`` ...) are a library: they import nothing
from here, from :mod:`conceptlab.chapter`, :mod:`conceptlab.plots` or :mod:`conceptlab.explore`.
A chapter module is their thin client, and every chapter module has the same shape:

``NAME``
    The notebook's stem (``"05_discover_then_name"``).
``PARAMETERS: dict[str, Param]``
    The chapter's own parameters (the shared ones are :data:`conceptlab.chapter.SHARED`).
``SWITCHES: dict[str, Switch]``
    Where the original code departs from its paper (``{}`` where it does not).
``Result``
    A dataclass holding everything the chapter computed.
``run(ch, progress=False) -> Result``
    The chapter's work, calling the same functions, in the same order, as the notebook's cells.
``results(ch, r) -> dict``
    The results JSON's ``results`` block.
``headline(ch, r) -> dict[str, Reported]``
    The chapter's headline numbers, each with its interval, chance and the paper's number.
``summary(ch, r) -> list[str]``
    Two or three generated sentences that answer the chapter's opening question, then the numbers.

A notebook fills its ``Result`` cell by cell and ends with ``finish(ch, r, chapter_module)``; the
tests run ``run`` on the smoke parameters and check that it writes what the notebook wrote.
Exercises change parameters with ``ch.with_params(...)`` (through ``ch.exercise``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..chapter import SHARED, Chapter, setup

MODULES = {
    "01_world_and_model": "world_and_model",
    "02_descriptors": "descriptors",
    "03_deal": "deal",
    "04_ex2": "ex2",
    "05_discover_then_name": "dncbm",
    "06_lavise": "lavise",
    "07_verdict": "verdict",
}
CONTRACT = ("NAME", "PARAMETERS", "SWITCHES", "Result", "run", "results", "headline", "summary")


def load(name: str) -> ModuleType:
    """The chapter module of a notebook stem (``"03_deal"``) or of a short name (``"deal"``)."""
    short = MODULES.get(name, name)
    if short not in MODULES.values():
        raise KeyError(f"no chapter {name!r}; known: {sorted(MODULES)}")
    return importlib.import_module(f"{__name__}.{short}")


def spec(name: str) -> dict[str, Any]:
    """Every parameter a chapter accepts: the shared ones and its own."""
    return {**SHARED, **load(name).PARAMETERS}


def start(name: str, params: Mapping[str, Any]) -> Chapter:
    """A validated :class:`Chapter` from a plain mapping of parameters (scripts and tests)."""
    module = load(name)
    return setup(module.NAME, dict(params), module.PARAMETERS)


def finish(ch: Chapter, r: Any, module: ModuleType):
    """Write the chapter's results JSON from its result object; show the summary, the headline table
    and links to the API reference of every library function the chapter calls."""
    from IPython.display import Markdown

    from .report import reported_table

    if hasattr(module, "differences"):  # a chapter whose differences go beyond its switches builds the table
        module.differences(ch)
    else:
        switches = module.switches(ch.params) if hasattr(module, "switches") else module.SWITCHES
        if switches:
            ch.differences(switches)
    headline = module.headline(ch, r)
    shown = ch.finish(module.results(ch, r), summary=module.summary(ch, r), headline=headline)
    links = ", ".join(f"[`{name.removeprefix('conceptlab.')}`](../api.html#{name})" for name in library_calls(module))
    table = reported_table(headline).to_markdown() if headline else ""
    return Markdown(f"{shown.data}\n\n{table}\n\n**Library functions this chapter calls:** {links}")


def library_calls(module: ModuleType) -> list[str]:
    """Qualified names (``conceptlab.sae.sae_loss``) of the library functions and classes a chapter module uses."""
    tree = ast.parse(inspect.getsource(module))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {
        f"{n.value.id}.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    }
    names = set()
    for alias, obj in vars(module).items():
        if inspect.ismodule(obj) and _is_library(obj.__name__):
            names |= {
                f"{obj.__name__}.{u.split('.', 1)[1]}"
                for u in used
                if u.startswith(f"{alias}.")
                and (
                    inspect.isfunction(getattr(obj, u.split(".", 1)[1], None))
                    or inspect.isclass(getattr(obj, u.split(".", 1)[1], None))
                )
            }
        elif (inspect.isfunction(obj) or inspect.isclass(obj)) and alias in used and _is_library(obj.__module__):
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    return sorted(names)


def _is_library(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "conceptlab" and len(parts) > 1 and parts[1] not in _CLIENTS


_CLIENTS = {"chapter", "chapters", "plots", "explore", "bookrun", "prepare", "bench", "sphinx_launch"}


def run(name: str, params: Mapping[str, Any], progress: bool = False) -> tuple[Chapter, Any]:
    """Validate ``params``, run the chapter's work and write its results: ``(chapter, result)``."""
    module = load(name)
    ch = start(name, params)
    r = module.run(ch, progress=progress)
    finish(ch, r, module)
    return ch, r


__all__ = ["CONTRACT", "MODULES", "finish", "library_calls", "load", "run", "spec", "start"]
