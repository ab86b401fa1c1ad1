"""The chapter contract (conceptlab.chapters): every chapter module has the same shape, its ``run``
writes what its notebook wrote, and every headline number carries its interval and chance."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conceptlab import chapters
from conceptlab.bookrun import chapters as notebook_stems
from conceptlab.bookrun import smoke_parameters
from conceptlab.chapters.report import Reported, numbers_in, reported_table, unsupported_numbers

CHAPTERS = notebook_stems()


def test_every_notebook_has_a_chapter_module():
    assert sorted(chapters.MODULES) == CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_module_follows_the_contract(chapter):
    module = chapters.load(chapter)
    missing = [name for name in chapters.CONTRACT if not hasattr(module, name)]
    assert not missing, f"{module.__name__} lacks {missing}"
    assert module.NAME == chapter
    assert dataclasses.is_dataclass(module.Result), "Result is a dataclass"
    for fn in ("run", "results", "headline", "summary"):
        assert callable(getattr(module, fn))


def test_reported_refuses_a_bare_number_and_renders_its_references():
    with pytest.raises(ValueError, match="say why"):
        Reported(0.5)
    with pytest.raises(ValueError, match="missing its chance"):
        Reported(0.5, 0.4, 0.6, note="bootstrap over images")  # a note that does not say why chance is missing
    with pytest.raises(ValueError, match="missing its interval"):
        Reported(0.5, chance=0.1, note="one trained model; chance: uniform guessing")
    assert Reported(0.5, 0.4, 0.6, note="no chance level for a count").chance is None
    with pytest.raises(ValueError, match="outside its interval"):
        Reported(0.9, 0.1, 0.2, chance=0.5)
    table = reported_table({"top-1": Reported(0.8, 0.7, 0.9, chance=0.0625, paper=0.76)})
    assert table.loc["top-1", "above chance"] == "yes" and table.loc["top-1", "paper"] == "0.760"
    assert Reported(0.3, 0.05, 0.4, chance=0.1).above_chance is False


def test_unsupported_numbers_finds_a_number_the_results_do_not_hold():
    record = {"results": {"accuracy": 0.9234, "n": 500}, "headline": {}, "parameters": {"seed": 0}}
    assert unsupported_numbers(["Accuracy 0.923 on 500 images (92.3 %)."], record) == []
    assert unsupported_numbers(["Accuracy 0.95 on 500 images."], record) == [("Accuracy 0.95 on 500 images.", 0.95)]
    assert numbers_in("from 0.688 to −0.657, 3 seeds") == [0.688, -0.657, 3.0]


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_headline_numbers_carry_interval_and_chance_and_summaries_hold_only_recorded_numbers(chapter, run_smoke):
    record = json.loads((run_smoke(chapter) / "results" / f"{chapter}.json").read_text())
    assert record["headline"], "a chapter states its headline numbers"
    for label, entry in record["headline"].items():
        assert isinstance(entry, dict) and set(entry) >= {"value", "low", "high", "chance", "note"}, (
            f"{label}: a headline number is a Reported (value, interval, chance, paper, note)"
        )
        Reported(**entry)  # an interval and a chance, or a note saying why not
    assert record["summary"], "a chapter ends with a generated summary"
    assert unsupported_numbers(record["summary"], record) == [], "summary numbers must come from the results"
    assert record["timings"], "a chapter times its stages (Chapter.stage): the book's time table reads them"


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return a == b


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_run_writes_what_the_notebook_wrote(chapter, run_smoke, tmp_path):
    """``run`` is the notebook without the story: the same calls, the same results (artifacts shared)."""
    workdir = run_smoke(chapter)
    params = {**smoke_parameters(chapter, workdir), "results_dir": str(tmp_path)}
    chapters.run(chapter, params)
    notebook = json.loads((workdir / "results" / f"{chapter}.json").read_text())
    scripted = json.loads((tmp_path / f"{chapter}.json").read_text())
    assert _close(notebook["results"], scripted["results"]), "run() and the notebook computed different results"
    assert _close(notebook["headline"], scripted["headline"])
    assert notebook["summary"] == scripted["summary"]
