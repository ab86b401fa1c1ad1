"""Project plumbing: paired notebooks, parameters cells, environment.yml, smoke runs of every chapter."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jupytext
import pytest
import yaml

import conceptlab.chapter
from conceptlab.bookrun import NOTEBOOKS, ROOT, chapters, run_chapter, smoke_parameters

CHAPTERS = chapters()


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_a_twin_and_they_are_in_sync():
    ipynbs = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    pys = {p.stem for p in NOTEBOOKS.glob("*.py")}
    assert ipynbs == pys, f"unpaired notebooks: {ipynbs ^ pys}"
    for stem in sorted(ipynbs):
        a, b = jupytext.read(NOTEBOOKS / f"{stem}.ipynb"), jupytext.read(NOTEBOOKS / f"{stem}.py")
        assert _cells(a) == _cells(b), f"{stem}: run `jupytext --sync notebooks/{stem}.py`"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_has_parameters_cell_first_and_no_outputs(chapter):
    raw = json.loads((NOTEBOOKS / f"{chapter}.ipynb").read_text())
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), "the first code cell must be tagged `parameters`"
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"
    params = set(re.findall(r"^(\w+)\s*=", "".join(code[0]["source"]), flags=re.M))
    assert {"artifacts_dir", "results_dir"} <= params


@pytest.mark.parametrize("parameter_set", ["smoke", "lesson"])
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_parameter_sets_exist_for_every_chapter_and_are_real_parameters(chapter, parameter_set):
    table = yaml.safe_load((NOTEBOOKS / f"{parameter_set}.yml").read_text())
    assert chapter in table, f"add a `{chapter}` block to notebooks/{parameter_set}.yml"
    source = jupytext.read(NOTEBOOKS / f"{chapter}.py").cells
    first_code = next(c for c in source if c.cell_type == "code").source
    declared = set(re.findall(r"^(\w+)\s*=", first_code, flags=re.M))
    own = set(table[chapter] or {})
    assert own <= declared, f"{parameter_set}.yml sets parameters {own - declared} that {chapter} does not declare"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_parameters_cell_states_exactly_the_declared_parameters(chapter, monkeypatch):
    """The literal parameters cell (papermill's interface) and the declared spec (validation) agree."""
    code = [c.source for c in jupytext.read(NOTEBOOKS / f"{chapter}.py").cells if c.cell_type == "code"]
    assert code[0].lstrip().startswith(conceptlab.chapter.PARAMETERS_MARK), "the harness finds the cell by it"
    cell_values: dict = {}
    exec(code[0], cell_values)
    cell_values = {k: v for k, v in cell_values.items() if not k.startswith("__")}
    seen = {}

    def fake_setup(name, namespace, parameters=None):
        seen.update(name=name, spec={**conceptlab.chapter.SHARED, **(parameters or {})})
        raise _SetupReached

    monkeypatch.setattr(conceptlab.chapter, "setup", fake_setup)
    with pytest.raises(_SetupReached):
        exec(code[1], {"get_ipython": None})
    assert seen["name"] == chapter, "the setup cell (the cell after the parameters) calls chapter.setup"
    assert cell_values == conceptlab.chapter.parameters_cell(seen["spec"])


class _SetupReached(Exception):
    pass


def _first_error(chapter: str, params: dict) -> tuple[BaseException, int]:
    """Execute a chapter's code cells in this process (papermill's parameter injection, no kernel) until
    one raises: ``(the exception, the cell's number)``. Kernel-free, so every chapter is checked in seconds."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOKS / f"{chapter}.ipynb")), params)
    namespace: dict = {"__name__": "__main__", "display": print}
    for count, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), 1):
        try:
            exec(compile(cell.source, f"{chapter} cell {count}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # noqa: BLE001  (the first failure is what the test inspects)
            return err, count
    raise AssertionError(f"{chapter} ran to the end")


def test_every_chapter_refuses_bad_parameters_before_any_work(tmp_path, monkeypatch):
    """A misspelt name and a wrong type stop each chapter in its setup cell, with both problems named."""
    monkeypatch.chdir(NOTEBOOKS)  # where papermill runs them
    for chapter in CHAPTERS:
        params = {**smoke_parameters(chapter, tmp_path), "seed": "abc", "definitely_mispelt": 1}
        err, count = _first_error(chapter, params)
        assert type(err).__name__ == "ParameterError", (chapter, err)
        assert "'definitely_mispelt'" in str(err) and "seed='abc'" in str(err), chapter
        assert count <= 3, f"{chapter} validated only in cell {count}"
    assert not (tmp_path / "artifacts").exists(), "nothing may be built before the parameters are valid"


@pytest.mark.notebook
def test_a_chapter_refuses_bad_parameters_in_its_kernel(tmp_path, kernel):
    """The same through papermill and a kernel, once: the error a user of ``papermill -p`` sees, and the
    failed run's executed copy kept in ``failed/`` for reading, with no hidden half-written notebook.
    (This worker's warm kernel, reset as for every chapter: the book-from-a-file test runs the fresh one.)"""
    import papermill as pm

    params = {**smoke_parameters(CHAPTERS[0], tmp_path), "seed": "abc"}
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_chapter(CHAPTERS[0], tmp_path / "executed", params, kernel)
    assert err.value.ename == "ParameterError" and "seed='abc'" in err.value.evalue
    assert err.value.exec_count <= 3 and not (tmp_path / "artifacts").exists()
    assert not [p.name for p in (tmp_path / "executed").iterdir() if p.name.startswith(".")]
    assert (tmp_path / "executed" / "failed" / f"{CHAPTERS[0]}.ipynb").is_file()


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_with_smoke_parameters_and_writes_its_results(chapter, run_smoke):
    workdir = run_smoke(chapter)
    nb = json.loads((workdir / "executed" / f"{chapter}.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", [])), "no figure"
    results = json.loads((workdir / "results" / f"{chapter}.json").read_text())
    assert results["chapter"] == chapter and results["results"]
    assert _numbers(results["results"]), "results must hold numbers"
    headline = _numbers(results["headline"])
    assert headline and all(v == v for v in headline), "the headline (the intro's table) holds real numbers"
    assert results["parameters"]["results_dir"] == str(workdir / "results"), "every applied parameter is recorded"


def _numbers(value) -> list[float]:
    """Every number in a nested results record."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _plain(text: str) -> str:
    """Text without the terminal's colour codes (Sphinx colours its warnings)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.notebook
def test_book_builds_from_executed_chapters_without_reexecuting(smoke_book):
    book, proc = smoke_book
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Executing" not in proc.stdout, "jupyter-book must not execute notebooks"
    docstrings = [line for line in _plain(proc.stderr).splitlines() if "docstring of" in line or "autosummary>" in line]
    assert not docstrings, "the API reference renders every docstring (write |x| as ``|x|``):\n" + "\n".join(docstrings)
    for chapter in CHAPTERS:
        html = (book / "_build" / "html" / "book" / "chapters" / f"{chapter}.html").read_text()
        assert "<img" in html and "Traceback (most recent call last)" not in html, chapter
    assert (book / "_build" / "html" / "index.html").exists()
    intro = (book / "_build" / "html" / "book" / "intro.html").read_text()
    assert "what it claims" in intro and "verdict (chapter 7)" in intro, "the intro shows the reader's table"
    assert all(method in intro for method in ("DEAL", "EX2", "DN-CBM", "LaViSE")), "one row per method"


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    major_minor = tuple(int(x) for x in python.split("=")[1].split(".")[:2])
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1).split("."))
    assert major_minor >= minimum
    assert "pip" in deps
    pip_lines = next(d["pip"] for d in deps if isinstance(d, dict))
    extras = set(project["optional-dependencies"]) - {"all"}
    all_extra = re.findall(r"\[(.*)\]", project["optional-dependencies"]["all"][0])[0]
    assert set(all_extra.split(",")) == extras, "the `all` extra must name every other extra"
    installed = [line for line in pip_lines if line.startswith("-e .")]
    assert installed, "environment.yml must install the project itself"
    named = set(re.findall(r"\[(.*)\]", installed[0])[0].split(","))
    assert named == {"all"} or named == extras, f"environment.yml installs extras {named}, pyproject has {extras}"
    assert "-c constraints.txt" in pip_lines, "pin the same versions as `make install`"


def test_constraints_pin_every_direct_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        re.split(r"==", line)[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    direct = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-") for d in direct} - {"conceptlab"}
    assert names <= pins, f"constraints.txt does not pin {names - pins}"


def test_every_chapter_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    missing = [c for c in CHAPTERS if f"book/chapters/{c}" not in toc]
    assert not missing, f"add {missing} to _toc.yml"


def test_readme_shows_the_two_commands_and_ci_calls_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert Path(ROOT / "Makefile").read_text().count("pytest") >= 1
