"""The built book in a headless Chromium, and the launch path of every notebook.

The book is the one conftest's ``smoke_book`` builds from the smoke-executed chapters. A local
HTTP server serves it; MathJax comes from Debian's ``libjs-mathjax`` instead of the CDN the
pages name (the tests run offline), configured to typeset exactly the elements the book's own
MathJax configuration selects (Sphinx's ``math`` class). Chromium, its driver and MathJax are
installed by ``make browser`` (Debian packages).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jupytext
import pytest
import yaml

from conceptlab.bookrun import NOTEBOOKS, ROOT, chapters

CHAPTERS = chapters()
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MATHJAX = Path("/usr/share/javascript/mathjax")
MATHJAX_CONFIG = (
    '<script type="text/x-mathjax-config">MathJax.Hub.Config({tex2jax: {inlineMath: '
    '[["\\\\(","\\\\)"]], displayMath: [["\\\\[","\\\\]"]], processClass: "math", '
    'ignoreClass: "tex2jax_ignore|mathjax_ignore"}});</script>\n'
)
MATHJAX_LOCAL = "/__mathjax__/MathJax.js?config=TeX-AMS_SVG"  # SVG: no web fonts to wait for

# One script per page: waits for MathJax, inspects the page, then opens every toggle and measures code.
PAGE_REPORT_JS = """
const done = arguments[arguments.length - 1];
const rendered = el => el.querySelector('.MathJax_CHTML, .MathJax, .MathJax_SVG, mjx-container') !== null;
const maths = () => [...document.querySelectorAll('article .math')];
const finish = () => {
  const params = document.querySelector('div.cell.tag_parameters');
  const paramsPre = params && params.querySelector('pre');
  const report = {
    math: maths().length, mathRendered: maths().filter(rendered).length,
    prose: [...document.querySelectorAll('article p, article li')].map(e => e.innerText).join('\\n'),
    params: params !== null,
    paramsCollapsed: params !== null && params.querySelector('details:not([open]) summary') !== null
                     && paramsPre !== null && !paramsPre.checkVisibility(),
    citations: [...document.querySelectorAll('span.bibtex-citation a')].map(a => a.getAttribute('href')),
    launch: [...document.querySelectorAll('.dropdown-launch-buttons a')].map(a => a.href),
    download: [...document.querySelectorAll('.dropdown-download-buttons a')].map(a => a.href),
  };
  const exercises = [...document.querySelectorAll('article section')].find(
      s => /^exercises/i.test((s.querySelector('h2, h3') || {}).textContent || ''));
  report.exerciseToggles = exercises ? exercises.querySelectorAll('div.cell details summary').length : -1;
  document.querySelectorAll('details').forEach(d => d.open = true);
  report.overflowing = [...document.querySelectorAll('div.cell pre')]
    .filter(p => p.scrollWidth > p.clientWidth + 1)
    .map(p => `${p.scrollWidth} > ${p.clientWidth}: ${p.innerText.split('\\n')[0].slice(0, 80)}`);
  done(report);
};
const started = Date.now();
(function wait() {
  const pending = maths().filter(m => !rendered(m)).length;
  if ((pending === 0 && document.readyState === 'complete') || Date.now() - started > 30000) finish();
  else setTimeout(wait, 200);
})();
"""


class _BookHandler(SimpleHTTPRequestHandler):
    """Serves the built HTML; MathJax from the local Debian copy instead of the CDN."""

    def translate_path(self, path: str) -> str:
        if path.startswith("/__mathjax__/"):
            return str(MATHJAX / path.split("?")[0].removeprefix("/__mathjax__/"))
        return super().translate_path(path)

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        html = re.sub(
            r'<script[^>]*src="https://[^"]*mathjax[^"]*"[^>]*></script>',
            lambda _: MATHJAX_CONFIG + f'<script src="{MATHJAX_LOCAL}"></script>',
            path.read_text(),
        )
        body = html.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Debian's), driven by selenium; skips only where none is installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER, MATHJAX) if not p.exists()]
    if missing:
        pytest.skip(f"{missing} absent: run `make browser` (apt-get install chromium chromium-driver libjs-mathjax)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(smoke_book) -> Iterator[str]:
    """The smoke book's HTML on a local HTTP server; yields its base URL."""
    book, proc = smoke_book
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    handler = functools.partial(_BookHandler, directory=str(book / "_build" / "html"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def reports(browser, site) -> dict[str, dict]:
    """The page report of every chapter, and the anchors of the references page."""
    out = {}
    for chapter in CHAPTERS:
        browser.get(f"{site}/book/chapters/{chapter}.html")
        out[chapter] = browser.execute_async_script(PAGE_REPORT_JS)
    browser.get(f"{site}/book/references.html")
    out["references"] = browser.execute_script("return [...document.querySelectorAll('.citation[id]')].map(e => e.id);")
    return out


def _markdown(chapter: str) -> str:
    return "\n".join(c.source for c in jupytext.read(NOTEBOOKS / f"{chapter}.py").cells if c.cell_type == "markdown")


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_math_is_typeset(reports, chapter):
    page = reports[chapter]
    assert page["mathRendered"] == page["math"], f"{page['math'] - page['mathRendered']} formulas not typeset"
    raw = re.findall(r"\$\$|\\\(|\\\[|\{math\}", page["prose"])
    assert not raw, f"TeX left as text in the prose: {raw[:5]}"
    if re.search(r"\$[^$\n]+\$", _markdown(chapter)):
        assert page["math"] > 0, "the chapter writes $...$ but the page has no math"


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_code_line_overflows_its_box(reports, chapter):
    assert not reports[chapter]["overflowing"], "\n".join(reports[chapter]["overflowing"])


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_parameters_cell_is_collapsed(reports, chapter):
    assert reports[chapter]["params"], "no cell tagged `parameters` on the page"
    assert reports[chapter]["paramsCollapsed"], "the parameters cell is shown; tag it hide-cell"


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_citations_link_to_entries_of_the_references_page(reports, chapter):
    page, entries = reports[chapter], set(reports["references"])
    assert "{cite" not in page["prose"], "an unresolved {cite} role"
    cited = len(re.findall(r"\{cite(?::\w+)?\}`", _markdown(chapter)))
    assert len(page["citations"]) >= cited, f"{cited} citations in the source, {len(page['citations'])} links"
    targets = [href.split("#")[-1] for href in page["citations"] if "references.html#" in href]
    assert len(targets) == len(page["citations"]), f"citations that miss the references page: {page['citations']}"
    assert set(targets) <= entries, f"no entry for {set(targets) - entries}"


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_exercises_have_solution_toggles(reports, chapter):
    toggles = reports[chapter]["exerciseToggles"]
    assert toggles != -1, "no Exercises section"
    assert toggles >= 3, f"{toggles} hidden solutions in the Exercises section; 3-5 expected"


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_launch_buttons_open_the_paired_notebook_and_download_exists(reports, chapter):
    page = reports[chapter]
    launch = {host: [u for u in page["launch"] if host in u] for host in ("colab", "binder", "hub")}
    assert all(launch.values()), f"launch buttons missing: {page['launch']}"
    for urls in launch.values():
        assert all(f"notebooks/{chapter}.ipynb" in u for u in urls), urls
    assert any(u.endswith(f"{chapter}.ipynb") for u in page["download"]), page["download"]


# ------------------------------------------------------------------ opened outside a checkout
def _repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")


def _install_lines(chapter: str) -> str:
    """The install block of the setup cell (the first code cell after the parameters cell): the lines
    before ``if ...find_spec("conceptlab")...:`` and that block; empty if there is none."""
    code = [c.source for c in jupytext.read(NOTEBOOKS / f"{chapter}.py").cells if c.cell_type == "code"]
    lines = code[1].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("if ") and '"conceptlab"' in line), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[:end])


def _run_install_lines(source: str, installed: bool, monkeypatch) -> list[str]:
    """Execute the lines with conceptlab importable or not; return every install command they issue."""
    import importlib.util
    import subprocess

    calls: list[str] = []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (real("json") if installed else None) if name == "conceptlab" else real(name, *a),
    )
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: calls.append(" ".join(map(str, cmd))))
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, *a, **k: calls.append(" ".join(map(str, cmd))))

    class Shell:
        def run_line_magic(self, magic: str, line: str) -> None:
            calls.append(f"%{magic} {line}")

    exec(compile(source, "<setup cell>", "exec"), {"get_ipython": Shell})
    return calls


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_installs_the_package_only_outside_a_checkout(chapter, monkeypatch):
    source, url = _install_lines(chapter), _repository_url()
    assert f"git+{url}" in source, f"the setup cell must install from git+{url} (repository.url in _config.yml)"
    outside = _run_install_lines(source, installed=False, monkeypatch=monkeypatch)
    assert len(outside) == 1 and "install" in outside[0] and f"git+{url}" in outside[0], outside
    assert _run_install_lines(source, installed=True, monkeypatch=monkeypatch) == []


def test_launch_extension_rewrites_the_theme_urls():
    from types import SimpleNamespace

    from conceptlab.sphinx_launch import LAUNCH_GROUP, relink_launch_buttons

    config = SimpleNamespace(
        conceptlab_launch_pages={"book/chapters/": "notebooks/"}, html_theme_options={"path_to_docs": "docs/"}
    )
    theme = "https://colab.research.google.com/github/o/r/blob/main/docs/book/chapters/03_deal.ipynb"
    context = {
        "header_buttons": [
            {"label": LAUNCH_GROUP, "buttons": [{"url": theme}, {"javascript": "x"}]},
            {"label": "other", "buttons": [{"url": theme}]},
        ]
    }
    relink_launch_buttons(SimpleNamespace(config=config), "book/chapters/03_deal", "page.html", context, None)
    assert context["header_buttons"][0]["buttons"][0]["url"].endswith("/blob/main/docs/notebooks/03_deal.ipynb")
    assert context["header_buttons"][1]["buttons"][0]["url"] == theme, "only the launch group changes"


def test_launch_extension_maps_pages_to_paired_notebooks():
    from conceptlab.sphinx_launch import paired_notebook

    pages = {"book/chapters/": "notebooks/"}
    assert paired_notebook("book/chapters/03_deal", pages) == "notebooks/03_deal.ipynb"
    assert paired_notebook("book/intro", pages) is None
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "conceptlab.sphinx_launch" in config["sphinx"].get("extra_extensions", []), (
        "enable the launch-button extension in _config.yml"
    )
    assert all(
        (NOTEBOOKS / paired_notebook(f"book/chapters/{c}", pages).removeprefix("notebooks/")).exists() for c in CHAPTERS
    )
