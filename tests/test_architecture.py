"""The direction of imports: method modules are a library; chapters, plots and widgets are its clients."""

from __future__ import annotations

import ast
from pathlib import Path

import conceptlab

PACKAGE = Path(conceptlab.__file__).parent
CLIENTS = {"chapter", "chapters", "plots", "explore", "bookrun", "prepare", "bench", "sphinx_launch"}
DRAWING = {"matplotlib", "seaborn", "IPython", "ipywidgets"}


def library_modules() -> list[Path]:
    """Every module of the package that is not a client (chapter harness, chapters, plots, widgets, runners)."""
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in CLIENTS
    )


def imported(path: Path) -> set[str]:
    """Top-level names of conceptlab modules and third-party packages that a module imports."""
    names = set()
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for conceptlab/x.py, 1 for conceptlab/data/x.py
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {
                a.name.split(".")[0] if not a.name.startswith("conceptlab.") else a.name.split(".")[1]
                for a in node.names
            }
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0:
                parts = module.split(".")
                names.add(parts[1] if parts[0] == "conceptlab" and len(parts) > 1 else parts[0])
                if module == "conceptlab":
                    names |= {a.name for a in node.names}
            elif node.level - 1 == depth:  # relative to the package root
                names.add(module.split(".")[0] if module else "")
                if not module:
                    names |= {a.name for a in node.names}
    return names


def test_library_modules_import_no_chapter_harness_plots_or_widgets():
    offenders = {str(p.relative_to(PACKAGE)): sorted(imported(p) & (CLIENTS | DRAWING)) for p in library_modules()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"method modules must not import chapter code, plots or widgets: {offenders}"


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    bad = PACKAGE / "_probe_bad_import.py"
    bad.write_text("from .chapter import Param\nimport matplotlib.pyplot as plt\n")
    try:
        assert imported(bad) >= {"chapter", "matplotlib"}
    finally:
        bad.unlink()


def test_every_library_module_is_in_the_api_reference():
    api = (PACKAGE.parents[1] / "book" / "api.md").read_text()
    public = [p for p in library_modules() if not p.name.startswith("_") or p.name == "__init__.py"]
    names = {
        ".".join(("conceptlab", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for p in public
    }
    names.discard("conceptlab")
    missing = sorted(n for n in names if f"automodule:: {n}\n" not in api)
    assert not missing, f"add {missing} to book/api.md"


def test_every_name_in_the_api_summaries_exists():
    """A summary line naming a function that was renamed or removed renders as a dead entry."""
    import importlib
    import re

    api = (PACKAGE.parents[1] / "book" / "api.md").read_text()
    summaries = re.findall(r"\.\. currentmodule:: (\S+)\n\n\.\. autosummary::\n\n((?:   \S+\n)+)", api)
    assert len(summaries) == api.count("autosummary::")  # every summary read
    stale = []
    for module, block in summaries:
        names = block.split()
        assert names, module
        stale += [f"{module}.{n}" for n in names if not hasattr(importlib.import_module(module), n)]
    assert not stale, f"remove or rename {stale} in book/api.md"
