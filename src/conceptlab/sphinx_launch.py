"""Launch buttons that open the paired notebook (``notebooks/NN.ipynb``), not the executed copy.

jupyter-book builds the chapter pages from the executed copies in ``book/chapters/`` (written by
``make notebooks``, not in the repository). sphinx-book-theme builds every launch URL (Binder,
JupyterHub, Colab) as ``<repository>/<path_to_book>/<page name>.ipynb`` in its
``html-page-context`` handler (priority 501), so the buttons would open ``book/chapters/NN.ipynb``,
a file the repository does not have. This Sphinx extension runs after that handler and points
each launch URL at the paired notebook ``notebooks/NN.ipynb`` instead.

Enable it in ``_config.yml``::

    sphinx:
      extra_extensions: [conceptlab.sphinx_launch]

The Sphinx option ``conceptlab_launch_pages`` maps a page folder to the repository folder of its
notebooks (default ``{"book/chapters/": "notebooks/"}``). The download button is left alone: it
offers the executed notebook of the page, outputs included.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

LAUNCH_GROUP = "launch-buttons"  # sphinx-book-theme's label for the group of launch links


def paired_notebook(pagename: str, pages: dict[str, str]) -> str | None:
    """The repository path of the notebook behind a page (``None`` for pages that have none)."""
    for folder, notebooks in pages.items():
        if pagename.startswith(folder):
            return f"{notebooks}{pagename.removeprefix(folder)}.ipynb"
    return None


def relink_launch_buttons(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """``html-page-context`` handler: rewrite the theme's launch URLs to the paired notebook."""
    target = paired_notebook(pagename, app.config.conceptlab_launch_pages)
    if target is None:
        return
    prefix = app.config.html_theme_options.get("path_to_docs", "").strip("/")
    prefix = f"{prefix}/" if prefix else ""
    for group in context.get("header_buttons", []):
        if group.get("label") == LAUNCH_GROUP:
            for button in group.get("buttons", []):
                if "url" in button:
                    button["url"] = button["url"].replace(f"{prefix}{pagename}.ipynb", f"{prefix}{target}")


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the option and the handler (after sphinx-book-theme's, priority 501)."""
    app.add_config_value("conceptlab_launch_pages", {"book/chapters/": "notebooks/"}, "html")
    app.connect("html-page-context", relink_launch_buttons, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
