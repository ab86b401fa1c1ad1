"""Explore by hand: ipywidgets controls that redraw a matplotlib figure, static in the built book.

``explorer(draw, **controls)`` calls ``draw(**values) -> Figure``. Each control is an
ipywidgets abbreviation, as for ``ipywidgets.interact``: a list of options (a dropdown), a
``(min, max[, step])`` tuple (a slider), a bool (a checkbox) or a widget. Every controlled
argument of ``draw`` needs a default: those are the values the static figure shows.

Live or static? A widget is only worth showing where a frontend renders it. In a papermill run
(``make book``) nobody does, and the built HTML page would show "Loading widget..." instead of
a figure. :func:`widget_frontend` decides, in this order:

1. ``interactive=True/False`` passed to :func:`explorer`;
2. the environment variable ``CONCEPTLAB_INTERACTIVE`` (``1``/``0``): set it to ``0`` for a
   papermill run started from inside a live kernel, or to ``1`` for a frontend not listed below;
3. live when the code runs in an IPython kernel started by a Jupyter server (JupyterLab, Notebook
   7, a JupyterHub: the server sets ``JPY_SESSION_NAME`` in the kernel's environment) or in
   Google Colab; static otherwise (papermill, nbconvert, a plain Python process).

Static mode creates no widget at all, so nothing widget-related is stored in the notebook.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from .models import class_text_weights, encode_images
from .world import ATTRIBUTES, HABITATS, PARTS, ConceptWorld, WorldBatch

INTERACTIVE_ENV = "CONCEPTLAB_INTERACTIVE"
KEEP = "as sampled"  # the option that leaves an attribute or the habitat as the world drew it


def widget_frontend() -> bool:
    """Whether widgets displayed now are rendered live (see the module docstring for the rule)."""
    forced = os.environ.get(INTERACTIVE_ENV, "").strip().lower()
    if forced:
        return forced in {"1", "true", "yes", "on"}
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    return bool(os.environ.get("JPY_SESSION_NAME")) or "google.colab" in sys.modules


class Explorer:
    """Controls, an output area and the last figure drawn; displays itself (live or static)."""

    def __init__(
        self,
        draw: Callable[..., plt.Figure],
        controls: dict[str, Any],
        interactive: bool,
        initial: dict[str, Any] | None = None,
    ) -> None:
        signature = inspect.signature(draw).parameters
        initial = initial or {}
        missing = [
            name
            for name in controls
            if name not in initial and (name not in signature or signature[name].default is inspect.Parameter.empty)
        ]
        if missing:
            raise TypeError(f"draw() needs a default for every control; none for {missing}")
        if set(initial) - set(controls):
            raise TypeError(f"initial values for names that are no control: {sorted(set(initial) - set(controls))}")
        self.draw = draw
        self.defaults = {name: initial[name] if name in initial else signature[name].default for name in controls}
        self.interactive = interactive
        self.draws = 0
        self.figure: plt.Figure | None = None
        self.controls: dict[str, Any] = {}
        self.output = self.widget = None
        if interactive:
            self._build_widgets(controls)
        self.redraw()

    def _build_widgets(self, controls: dict[str, Any]) -> None:
        import ipywidgets as widgets

        for name, abbrev in controls.items():
            control = widgets.interactive.widget_from_abbrev(abbrev, self.defaults[name])
            if control is None:
                raise ValueError(f"control {name}={abbrev!r} is no ipywidgets abbreviation")
            control.description = name.replace("_", " ")
            if hasattr(control, "continuous_update"):
                control.continuous_update = False  # redraw on release, not on every pixel of a drag
            control.observe(self.redraw, names="value")
            self.controls[name] = control
        self.output = widgets.Output()
        self.widget = widgets.HBox([widgets.VBox(list(self.controls.values())), self.output])

    @property
    def values(self) -> dict[str, Any]:
        """The current value of every control (the defaults when static)."""
        return {name: c.value for name, c in self.controls.items()} if self.controls else dict(self.defaults)

    def redraw(self, change: dict | None = None) -> None:
        """Draw the figure for the current values (an ipywidgets ``observe`` callback)."""
        figure = self.draw(**self.values)
        self.figure, self.draws = figure, self.draws + 1
        plt.close(figure)  # a closed figure is not shown a second time by the inline backend
        if self.output is not None:
            from IPython.display import clear_output, display

            with self.output:
                clear_output(wait=True)
                display(figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget if self.interactive else self.figure)


def explorer(
    draw: Callable[..., plt.Figure],
    interactive: bool | None = None,
    initial: dict[str, Any] | None = None,
    **controls: Any,
) -> Explorer:
    """Controls that redraw ``draw(**values)`` live, or the figure of the defaults when static.

    ``initial`` overrides ``draw``'s defaults as the first values shown (the static figure).
    ``interactive=None`` asks :func:`widget_frontend`. Show the result as a cell's last value.
    """
    return Explorer(draw, controls, widget_frontend() if interactive is None else interactive, initial)


# ------------------------------------------------------------------ chapter 1: the world and the model
def counterfactual(
    world: ConceptWorld, index: int, part: str, changes: dict[str, str], habitat: str | None = None, split: str = "test"
) -> WorldBatch:
    """Image ``index`` of ``split`` redrawn with ``changes`` (``{"colour": "red", ...}``) to one part
    and, optionally, another habitat: the same creature, pose, background phase and noise.

    A part the class does not have is added when ``changes`` name one of its attributes; its other
    attributes take their first values (plain, small).
    """
    p = PARTS.index(part)

    def edit(labels: np.ndarray, attrs: np.ndarray, habitats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if changes:
            attrs[:, p] = np.maximum(attrs[:, p], 0)
        for k, attribute in enumerate(ATTRIBUTES):
            if attribute in changes:
                attrs[:, p, k] = ATTRIBUTES[attribute].index(changes[attribute])
        if habitat is not None:
            habitats[:] = HABITATS.index(habitat)
        return attrs, habitats

    return world.sample(1, split, start=index, edit=edit)


@torch.no_grad()
def top_classes(
    model: torch.nn.Module, class_weights: torch.Tensor, images: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, float]]:
    """Per image, every class's zero-shot probability (softmax of the CLIP logits), by class name."""
    scale = model.logit_scale.exp().item() if hasattr(model, "logit_scale") else 100.0
    probs = (scale * encode_images(model, images) @ class_weights.T).softmax(-1)
    return [dict(zip(class_names, row.tolist())) for row in probs]


def _draw_counterfactual(
    original: WorldBatch,
    edited: WorldBatch,
    probs: list[dict[str, float]],
    class_names: Sequence[str],
    title: str,
    k: int,
) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.2), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax, batch, name in zip(axes, (original, edited), ("as sampled", title)):
        ax.imshow(batch.images[0])
        ax.set_title(f"{class_names[batch.labels[0]]} in the {HABITATS[batch.habitats[0]]}\n{name}", fontsize=9)
        ax.axis("off")
    shown = sorted(probs[1], key=probs[1].get, reverse=True)[:k][::-1]
    y = np.arange(len(shown))
    axes[2].barh(y + 0.2, [probs[1][c] for c in shown], height=0.4, label="changed", color="C0")
    axes[2].barh(y - 0.2, [probs[0][c] for c in shown], height=0.4, label="as sampled", color="0.7")
    axes[2].set(yticks=y, yticklabels=shown, xlim=(0, 1), xlabel="zero-shot probability")
    axes[2].set_title(f"the model's top {k} classes", fontsize=9)
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def world_explorer(
    world: ConceptWorld,
    model: torch.nn.Module,
    tokenizer: Callable,
    split: str = "test",
    pool: int = 512,
    k: int = 5,
    interactive: bool | None = None,
    **initial: Any,
) -> Explorer:
    """Chapter 1: pick a class and one of its images, change a part's attribute or the habitat,
    see both images and the model's top ``k`` classes for each.

    ``initial`` sets the first values (``creature``, ``example``, ``part``, ``colour``, ``pattern``,
    ``size``, ``habitat``), e.g. ``habitat="desert"`` for a static figure that shows a change.
    """
    weights = class_text_weights(model, tokenizer, world.class_names)
    labels = world.sample(pool, split).labels
    names = list(world.class_names)
    # rendering is the slow part (a 512-image block per sample): keep the recent ones
    original = functools.lru_cache(maxsize=32)(lambda index: world.sample(1, split, start=index))

    def draw(
        creature: str = names[0],
        example: int = 0,
        part: str = "head",
        colour: str = KEEP,
        pattern: str = KEEP,
        size: str = KEEP,
        habitat: str = KEEP,
    ) -> plt.Figure:
        matches = np.flatnonzero(labels == names.index(creature))
        index = int(matches[example % len(matches)]) if len(matches) else 0
        changes = {a: v for a, v in zip(ATTRIBUTES, (colour, pattern, size)) if v != KEEP}
        moved = None if habitat == KEEP else habitat
        edited = counterfactual(world, index, part, changes, moved, split) if changes or moved else original(index)
        probs = top_classes(model, weights, np.concatenate([original(index).images, edited.images]), names)
        said = ", ".join(f"{part} {v}" for v in changes.values()) or "no part changed"
        return _draw_counterfactual(original(index), edited, probs, names, said, min(k, len(names)))

    return explorer(
        draw,
        interactive,
        initial,
        creature=names,
        example=(0, 9),
        part=list(PARTS),
        colour=[KEEP, *ATTRIBUTES["colour"]],
        pattern=[KEEP, *ATTRIBUTES["pattern"]],
        size=[KEEP, *ATTRIBUTES["size"]],
        habitat=[KEEP, *HABITATS],
    )
