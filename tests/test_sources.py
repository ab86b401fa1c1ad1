"""Issue 23: every claim about the authors' code cites the repository file and line, at a pinned commit."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from conceptlab import chapters, plots
from conceptlab.chapter import (
    ORIGINAL_COMMITS,
    SHARED,
    SOURCE_COLUMN,
    Param,
    Switch,
    citations,
    differences_table,
    setup,
    source_html,
)
from conceptlab.chapters import ex2, lavise

# The original repository each chapter's switches describe (chapters 1 and 7 have none).
ORIGINAL_REPO = {
    "descriptors": "tangli-udel/DEAL",
    "deal": "tangli-udel/DEAL",
    "ex2": "BatsResearch/ex2",
    "dncbm": "neuroexplicit-saar/Discover-then-Name",
    "lavise": "YuYang0901/LaViSE",
}
NOTHING_IN_CODE = ("not released", "not stated")
QUOTED_LINE = re.compile(r"(\w+\.\w+) lines? (\d+)")  # "train_explainer.py line 21" in a text


def _defaults(module) -> dict:
    return {k: p.default for k, p in module.PARAMETERS.items()}


def _switches() -> list[tuple[str, str, Switch]]:
    """Every switch of every chapter (``switches(params)`` only ever selects from ``SWITCHES``)."""
    out = []
    for short in chapters.MODULES.values():
        module = chapters.load(short)
        if hasattr(module, "switches"):
            assert set(module.switches(_defaults(module))) <= set(module.SWITCHES)
        out += [(short, name, s) for name, s in module.SWITCHES.items()]
    return out


def _cites_or_says_nothing_in_code(source: str, original: object, what: str, repo: str) -> None:
    """The rule: a well-formed citation of the chapter's own original repository, or an empty one where the
    original's value is "not released"/"not stated" and the text says so."""
    cited = citations(source)
    if not cited:
        assert original in NOTHING_IN_CODE, f"no citation for the original's value {original!r}"
        assert original in what, f"the text must say the original's value is {original!r}"
    for c in cited:
        assert c.repo == repo, f"{c.label} cites {c.repo}, not the chapter's original {repo}"


def test_every_switch_cites_the_original_code_or_says_nothing_is_there():
    found = _switches()
    assert {short for short, _, _ in found} == set(ORIGINAL_REPO), "a chapter with switches has no original repo"
    assert len(found) >= 36
    for short, name, s in found:
        try:
            _cites_or_says_nothing_in_code(s.source, s.original, s.what, ORIGINAL_REPO[short])
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"{short}.{name}: {e}") from e


def test_line_numbers_quoted_in_a_switch_text_are_inside_its_citations():
    checked = 0
    for short, name, s in _switches():
        ranges = [(c.path.rsplit("/", 1)[-1], c.first, c.last) for c in citations(s.source)]
        for file, line in QUOTED_LINE.findall(s.what):
            checked += 1
            assert any(f == file and a <= int(line) <= b for f, a, b in ranges), f"{short}.{name}: {file} {line}"
    assert checked >= 5  # LaViSE's texts quote lines


def test_fixed_differences_cite_file_and_line():
    for name, row in ex2.FIXED_DIFFERENCES.items():
        assert SOURCE_COLUMN in row, f"ex2 fixed difference {name!r} has no {SOURCE_COLUMN!r}"
        _cites_or_says_nothing_in_code(
            row[SOURCE_COLUMN], row["original code"], row["what it changes"], "BatsResearch/ex2"
        )
    texts = [*lavise.FIXED_DIFFERENCES, *(what for _, what in lavise.ORIGINAL_SETTINGS.values())]
    for text in texts:
        assert re.search(r"\w+\.py lines? \d+", text), f"no file and line in: {text}"


@pytest.mark.parametrize(
    "source, url",
    [
        (
            "tangli-udel/DEAL:run.sh#L13",
            f"https://github.com/tangli-udel/DEAL/blob/{ORIGINAL_COMMITS['tangli-udel/DEAL']}/run.sh#L13",
        ),
        (
            "YuYang0901/LaViSE:infer_filter.py#L123-L126",
            f"https://github.com/YuYang0901/LaViSE/blob/{ORIGINAL_COMMITS['YuYang0901/LaViSE']}/infer_filter.py#L123-L126",
        ),
        (  # GitHub renders notebooks: line anchors only work on the plain view
            "tangli-udel/DEAL:exp_localizability.ipynb#L196-L202",
            f"https://github.com/tangli-udel/DEAL/blob/{ORIGINAL_COMMITS['tangli-udel/DEAL']}"
            "/exp_localizability.ipynb?plain=1#L196-L202",
        ),
    ],
)
def test_source_html_points_at_the_pinned_commit_and_lines(source, url):
    assert source_html(source) == f'<a href="{url}">{citations(source)[0].label}</a>'


def test_citations_are_checked():
    assert all(re.fullmatch(r"[0-9a-f]{40}", commit) for commit in ORIGINAL_COMMITS.values())
    two = "tangli-udel/DEAL:run.sh#L9; tangli-udel/DEAL:train.py#L10-L12"
    assert source_html(two).count('<a href="https://github.com/tangli-udel/DEAL/blob/') == 2
    assert [c.label for c in citations(two)] == ["DEAL/run.sh#L9", "DEAL/train.py#L10-L12"]
    assert source_html("") == "" and citations("") == []
    for bad in (
        "train.py#L10",
        "tangli-udel/DEAL:train.py",
        "tangli-udel/DEAL:train.py#L12-L10",
        "someone/else:a.py#L1",
    ):
        with pytest.raises(ValueError):
            citations(bad)
    with pytest.raises(ValueError):  # a malformed citation fails when the table is built, not on the page
        differences_table({"x": Switch(1, 1, "x", source="DEAL/train.py#L1")}, {"x": 1})


def _shown_links(table) -> list[str]:
    page = table._repr_html_()
    assert "&lt;a href" not in page, "the links were escaped"
    return re.findall(r'<a href="([^"]+)">', page)


@pytest.mark.parametrize("short", sorted(ORIGINAL_REPO))
def test_a_chapters_differences_table_links_every_sourced_switch(short):
    module = chapters.load(short)
    table = differences_table(module.SWITCHES, _defaults(module))
    for name, s in module.SWITCHES.items():
        assert table.loc[name, SOURCE_COLUMN] == s.source  # plain text: what the results JSON records
    urls = [c.url for s in module.SWITCHES.values() for c in citations(s.source)]
    assert urls and _shown_links(table) == urls
    # the notebooks show it through plots.table or astype(str): the links survive both
    assert _shown_links(plots.table(table)) == urls == _shown_links(table.astype(str))


def test_ex2_fixed_differences_are_linked_too():
    params = _defaults(ex2)
    ch = SimpleNamespace(params=params, differences=lambda switches: differences_table(switches, params))
    table = ex2.differences(ch)
    for name, row in ex2.FIXED_DIFFERENCES.items():
        assert table.loc[name, SOURCE_COLUMN] == row[SOURCE_COLUMN]
    fixed = [c.url for row in ex2.FIXED_DIFFERENCES.values() for c in citations(row[SOURCE_COLUMN])]
    assert fixed and _shown_links(table)[-len(fixed) :] == fixed


def test_results_record_the_citation_as_plain_text(tmp_path):
    spec = {"lambda_sep": Param(0.1, float, min=0.0)}
    namespace = {k: v.default for k, v in SHARED.items()} | {
        "artifacts_dir": str(tmp_path / "artifacts"),
        "results_dir": str(tmp_path / "results"),
        "lambda_sep": 0.05,
    }
    ch = setup("99_sources", namespace, spec)
    source = "tangli-udel/DEAL:run.sh#L9; tangli-udel/DEAL:train.py#L10"
    ch.differences({"lambda_sep": Switch(0.1, 0.1, "weight of L_sep", source=source)})
    ch.finish({})
    record = json.loads((tmp_path / "results" / "99_sources.json").read_text())
    assert record["differences_from_original"][0][SOURCE_COLUMN] == source
