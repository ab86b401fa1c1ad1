"""Explorers: widgets build and redraw without a browser; static mode shows the defaults' figure."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conceptlab import explore
from conceptlab.world import COLOURS, PARTS


def _pixels(fig: plt.Figure) -> bytes:
    """The rendered figure (works for closed figures too, as IPython's display does)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="rgba")
    return buf.getvalue()


def _line(slope: float = 1.0, label: str = "a") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, slope])
    ax.set(ylim=(0, 3), title=label)
    return fig


def test_explorer_redraws_when_a_control_changes():
    calls = []

    def draw(slope: float = 1.0, label: str = "a"):
        calls.append((slope, label))
        return _line(slope, label)

    ex = explore.explorer(draw, interactive=True, slope=(0.0, 3.0, 0.5), label=["a", "b"])
    assert set(ex.controls) == {"slope", "label"} and ex.controls["slope"].value == 1.0
    assert calls == [(1.0, "a")] and ex.draws == 1
    before = _pixels(ex.figure)
    ex.controls["slope"].value = 2.5
    assert calls[-1] == (2.5, "a") and ex.draws == 2
    ex.controls["label"].value = "b"
    assert calls[-1] == (2.5, "b") and ex.draws == 3
    assert before != _pixels(ex.figure)
    assert ex.widget is not None and ex.output is not None


def test_static_explorer_builds_no_widget_and_draws_the_defaults():
    ex = explore.explorer(_line, interactive=False, slope=(0.0, 3.0), label=["a", "b"])
    assert ex.controls == {} and ex.widget is None and ex.draws == 1
    assert ex.values == {"slope": 1.0, "label": "a"}
    assert ex.figure.axes[0].get_title() == "a"


def test_explorer_rejects_a_control_without_a_default():
    with pytest.raises(TypeError, match="slope"):
        explore.explorer(lambda slope: _line(slope), interactive=False, slope=(0.0, 3.0))
    with pytest.raises(TypeError, match="colour"):
        explore.explorer(_line, interactive=False, initial={"colour": "red"}, slope=(0.0, 3.0))


def test_initial_values_replace_the_defaults_live_and_static():
    static = explore.explorer(lambda slope: _line(slope), interactive=False, initial={"slope": 2.0}, slope=(0.0, 3.0))
    assert static.values == {"slope": 2.0}
    live = explore.explorer(_line, interactive=True, initial={"label": "b"}, label=["a", "b"])
    assert live.controls["label"].value == "b" and live.figure.axes[0].get_title() == "b"


@pytest.mark.parametrize(
    ("env", "session", "expected"), [("0", "nb.ipynb", False), ("1", None, True), (None, None, False)]
)
def test_widget_frontend_follows_the_override_then_the_environment(monkeypatch, env, session, expected):
    for name, value in ((explore.INTERACTIVE_ENV, env), ("JPY_SESSION_NAME", session)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert explore.widget_frontend() is expected  # pytest runs in no kernel: static unless forced


def test_counterfactual_changes_only_the_edited_part(tiny_world):
    original = tiny_world.sample(1, "test", start=3)
    head = PARTS.index("head")
    colour = next(c for i, c in enumerate(COLOURS) if i != original.attributes[0, head, 0])
    edited = explore.counterfactual(tiny_world, 3, "head", {"colour": colour})
    assert edited.attributes[0, head, 0] == list(COLOURS).index(colour)
    assert (np.delete(edited.attributes, head, 1) == np.delete(original.attributes, head, 1)).all()
    changed = (original.images[0] != edited.images[0]).any(-1)
    assert changed.any(), "recolouring the head changed no pixel"
    assert not changed[~(original.masks[0, head] | edited.masks[0, head])].any(), "pixels outside the head changed"


def test_counterfactual_moves_the_creature_to_another_habitat(tiny_world):
    original = tiny_world.sample(1, "test", start=0)
    habitat = next(h for i, h in enumerate(explore.HABITATS) if i != original.habitats[0])
    edited = explore.counterfactual(tiny_world, 0, "head", {}, habitat=habitat)
    assert edited.habitats[0] == explore.HABITATS.index(habitat)
    assert (edited.attributes == original.attributes).all()
    creature = original.masks[0].any(0)
    assert (edited.images[0][creature] == original.images[0][creature]).all()
    assert (edited.images[0][~creature] != original.images[0][~creature]).any()


def test_world_explorer_updates_image_and_top_classes(tiny_world, tiny_clip):
    model, _, tokenizer, _ = tiny_clip
    ex = explore.world_explorer(tiny_world, model, tokenizer, pool=64, k=3, interactive=True, part="body")
    assert ex.controls["part"].value == "body"
    assert set(ex.controls) == {"creature", "example", "part", "colour", "pattern", "size", "habitat"}
    bars = ex.figure.axes[2]
    assert len(bars.get_yticklabels()) == 3
    assert {t.get_text() for t in bars.get_yticklabels()} <= set(tiny_world.class_names)
    before, draws = _pixels(ex.figure), ex.draws
    ex.controls["habitat"].value = "ocean" if "ocean" not in ex.figure.axes[0].get_title() else "cave"
    assert ex.draws == draws + 1
    assert before != _pixels(ex.figure)
    ex.controls["creature"].value = tiny_world.class_names[2]
    assert ex.figure.axes[0].get_title().startswith(tiny_world.class_names[2])


def test_top_classes_are_probabilities(tiny_world, tiny_clip):
    model, _, tokenizer, _ = tiny_clip
    weights = explore.class_text_weights(model, tokenizer, tiny_world.class_names)
    probs = explore.top_classes(model, weights, tiny_world.sample(4, "test").images, tiny_world.class_names)
    assert len(probs) == 4 and all(abs(sum(p.values()) - 1) < 1e-4 for p in probs)
