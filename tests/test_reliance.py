"""Measured reliance by interventions (conceptlab.reliance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptlab import reliance
from conceptlab.world import PARTS


def _border(images: np.ndarray) -> np.ndarray:
    """Mean colour of the top and bottom three rows: the background only."""
    return np.concatenate(
        [images[:, :3].reshape(len(images), -1, 3), images[:, -3:].reshape(len(images), -1, 3)], 1
    ).mean(1)


def _background_scorer(world, n_classes: int = 6):
    """A classifier that looks only at the background colour: its margin moves with the habitat alone."""
    proto = world.sample(256, "val", edit=reliance.prototypical(world))
    ref = np.stack([_border(proto.images[proto.labels == c]).mean(0) for c in range(n_classes)])

    def score(images, labels):
        logits = -((_border(images.astype(np.float32))[:, None] - ref[None]) ** 2).sum(-1)
        true = logits[np.arange(len(labels)), labels]
        others = logits.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        return logits.argmax(1) == labels, true - others.max(1)

    return score


def test_interventions_find_a_habitat_only_model(tiny_world):
    res = reliance.intervene(_background_scorer(tiny_world), tiny_world, n=128)
    rel = res.reliance()
    assert list(rel.index) == list(reliance.FACTORS) and res.correct_base.mean() > 0.9
    assert rel["habitat"] > 10 * rel.drop("habitat").abs().max()
    assert rel.drop("habitat").abs().max() < 1e-6  # no part edit touches the background
    assert rel.idxmax() == "habitat"
    by_class = res.by_class(tiny_world.class_names)
    assert by_class.shape == (6, len(reliance.FACTORS)) and (by_class["habitat"] > 0).all()


def test_absent_parts_have_no_drop_and_edits_change_only_their_factor(tiny_world):
    res = reliance.intervene(_background_scorer(tiny_world), tiny_world, n=64, factors=("wings size",))
    wings = res.base.present[:, PARTS.index("wings")]
    assert 0 < wings.sum() < len(wings)  # the tiny world has winged and wingless classes
    assert np.isnan(res.drops[~wings, 0]).all() and not np.isnan(res.drops[wings, 0]).any()
    rng = np.random.default_rng(0)
    edit = reliance.factor_edit("head pattern", rng)
    labels = np.zeros(50, int)
    attrs = tiny_world.typical_attributes(labels).copy()
    new, hab = edit(labels, attrs.copy(), np.zeros(50, int))
    changed = new != attrs
    assert changed[:, PARTS.index("head"), 1].all() and changed.sum() == 50 and (hab == 0).all()


def test_counterfactual_reliance_table_matches_the_interventions(tiny_world, tiny_clip, monkeypatch):
    """The EX2 chapter's table: accuracy drop and mean margin drop per factor, on images that have it."""
    clip, _, tokenizer, _ = tiny_clip
    scorer = _background_scorer(tiny_world)
    monkeypatch.setattr(reliance, "zero_shot_scorer", lambda *a, **k: scorer)
    table = reliance.counterfactual_reliance(clip, tokenizer, tiny_world, n=192).set_index("factor")
    assert list(table.index) == list(reliance.EX2_FACTORS)
    assert table.loc["habitat", "accuracy_base"] > 0.9 and table.loc["habitat", "reliance"] > 0.6
    assert (table.drop(index="habitat").reliance.abs() < 0.05).all()
    direct = reliance.intervene(scorer, tiny_world, 192, factors=reliance.EX2_FACTORS).reliance()
    assert np.allclose(table.logit_drop, direct.values)


def test_zero_shot_scorer_margin_is_true_minus_best_other(tiny_world, tiny_clip, monkeypatch):
    clip, _, tokenizer, _ = tiny_clip
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    monkeypatch.setattr(reliance, "class_text_weights", lambda *a, **k: torch.eye(3))
    monkeypatch.setattr(reliance, "encode_images", lambda model, images: logits)
    correct, margin = reliance.zero_shot_scorer(clip, tokenizer, ["a", "b", "c"])(None, np.array([0, 2]))
    assert correct.tolist() == [True, False] and margin.tolist() == pytest.approx([1.0, -4.0])


def test_rank_correlation_is_undefined_for_constant_input():
    assert reliance.rank_correlation([1, 2, 3], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert reliance.rank_correlation([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert reliance.rank_correlation([1, 2, 3], [0, 0, 0]) is None
