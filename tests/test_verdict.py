"""Chapter 7's conversions and tests (conceptlab.verdict): each must fail when it is broken."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conceptlab import verdict
from conceptlab.reliance import FACTORS, Interventions, prototypical
from conceptlab.world import PARTS, WorldConfig


@pytest.fixture(scope="module")
def proto(tiny_world):
    return tiny_world.sample(64, "test", edit=prototypical(tiny_world))


@pytest.fixture(scope="module")
def tiny_rn_clip():
    """A randomly initialised world ResNet CLIP (shapes and gradients only)."""
    from conceptlab.models import load_clip

    torch.manual_seed(0)
    return load_clip("ConceptWorld-RN", None, "cpu")


def _synthetic_truths(batch, seed=0):
    """Six fake models (2 per condition) with planted reliance profiles and per-image noise."""
    rng = np.random.default_rng(seed)
    has = verdict._has(batch)
    truths, conditions = {}, {}
    for condition in ("shortcut", "no-shortcut", "blind"):
        for s in range(2):
            profile = rng.random(len(FACTORS))
            profile[0] = 3.0 if condition == "shortcut" else 0.05
            if condition == "blind":
                profile[FACTORS.index("body colour")] = 0.0
            drops = profile[None] + 0.3 * rng.standard_normal((len(batch), len(FACTORS)))
            drops = np.where(has, drops, np.nan)
            name = f"{condition} {s}"
            truths[name] = Interventions(batch, FACTORS, np.ones(len(batch), bool), np.ones(len(batch)),
                                         np.ones((len(batch), len(FACTORS)), bool), drops)
            conditions[name] = condition
    return truths, conditions


def test_map_factor_scores_are_energy_shares_per_part_and_background(proto):
    head = PARTS.index("head")
    scores = verdict.map_factor_scores(proto.masks[:, head].astype(float), proto)
    assert np.allclose(scores[:, FACTORS.index("head colour")], 1)
    assert np.allclose(scores[:, FACTORS.index("head size")], 1)
    assert np.allclose(np.nan_to_num(scores[:, FACTORS.index("body colour")]), 0, atol=1e-6)
    uniform = verdict.map_factor_scores(np.ones((len(proto), 8, 8)), proto)
    background = (~proto.masks.any(1)).mean((1, 2))
    assert np.allclose(uniform[:, 0], background, atol=1e-5)
    wings = PARTS.index("wings")
    assert np.isnan(uniform[~proto.present[:, wings], FACTORS.index("wings colour")]).all()


def test_mention_scores_follow_the_reward(tiny_world):
    candidates = verdict.candidate_descriptions(tiny_world)
    assert "a photo of a" in candidates.description[0]
    rewards = np.zeros(len(candidates))
    target = candidates.index[(candidates.class_index == 0) & (candidates.factors == ("habitat",))][0]
    rewards[target] = 1.0
    scores = verdict.mention_factor_scores(candidates, rewards, beta=0.01)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-6) and scores[0, 1:].max() < 1e-6
    flat = verdict.mention_factor_scores(candidates, np.zeros(len(candidates)), beta=1.0)
    assert 0 < flat[1, 0] < 0.5  # uniform policy: the habitat is one of many mentioned factors
    spec = tiny_world.classes[0]
    assert spec.habitat in candidates.description[target] and spec.name in candidates.description[target]


def test_concept_names_map_to_the_factors_they_denote(tiny_world):
    spec = tiny_world.classes[0]
    part, attrs = next(iter(spec.parts.items()))
    assert verdict.word_factors(spec.habitat, tiny_world, 0) == ["habitat"]
    assert verdict.word_factors(part, tiny_world, 0) == [f"{part} colour", f"{part} pattern", f"{part} size"]
    assert f"{part} colour" in verdict.word_factors(attrs["colour"], tiny_world, 0)
    assert verdict.word_factors(spec.name, tiny_world, 0) == [] == verdict.word_factors("piano", tiny_world, 0)
    contributions = np.array([[2.0, 1.0, 5.0]])
    out = verdict.concept_factor_scores(contributions, [spec.habitat, part, "piano"], np.array([0]), tiny_world)
    assert out[0, 0] == 2.0 and out[0, FACTORS.index(f"{part} size")] == pytest.approx(1 / 3)
    assert out.sum() == pytest.approx(3.0)


def test_truth_wins_every_column_and_noise_sits_at_chance(proto):
    truths, conditions = _synthetic_truths(proto)
    rng = np.random.default_rng(1)
    truth = {m: t.drops for m, t in truths.items()}
    noise = {m: np.where(verdict._has(proto), rng.random(t.drops.shape), np.nan) for m, t in truths.items()}
    a_truth = verdict.agreement(truth, truths, conditions, n_bootstrap=50)
    a_noise = verdict.agreement(noise, truths, conditions, n_bootstrap=50)
    assert a_truth["rho"] == pytest.approx(1.0) and a_truth["low"] > 0.8
    assert abs(a_noise["rho"]) < 0.35 and a_noise["low"] < 0 < a_noise["high"]
    b_truth = verdict.shortcut_detection(truth, conditions, "body colour")
    b_noise = verdict.shortcut_detection(noise, conditions, "body colour")
    assert b_truth["habitat_pairs"] == 1.0 and b_truth["blind_low"] > 0.9
    assert b_noise["score"] < 0.95
    draws = [verdict.shortcut_detection({m: np.random.default_rng(k).random(t.drops.shape) for m, t in truths.items()},
                                        conditions, "body colour")["score"] for k in range(40)]
    assert abs(np.mean(draws) - 0.5) < 0.1
    # a broken conversion (scores in the wrong factor order) loses the agreement
    shuffled = {m: s[:, ::-1] for m, s in truth.items()}
    assert verdict.agreement(shuffled, truths, conditions, n_bootstrap=20)["rho"] < 0.5
    t = truths["shortcut 0"]
    assert verdict.localisation(verdict.reliance_maps(t), t) == pytest.approx(1.0)
    assert abs(verdict.localisation(rng.random((len(proto), 16, 16)), t)) < 0.1
    assert np.isnan(verdict.localisation(None, t))


def test_reliance_maps_put_the_habitat_on_the_background(proto):
    drops = np.zeros((len(proto), len(FACTORS)))
    drops[:, 0] = 1.0
    res = Interventions(proto, FACTORS, None, None, None, drops)
    maps = verdict.reliance_maps(res)
    assert np.array_equal(maps > 0, ~proto.masks.any(1))


def test_randomisation_reinitialises_from_the_top(tiny_clip):
    clip = tiny_clip[0]
    stages = verdict.vision_stages(clip)
    assert stages[0].startswith("proj") and "resblocks" in stages[1]
    top = verdict.randomised(clip, 1)
    before, after = dict(clip.named_parameters()), dict(top.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "visual.proj" in changed and all(n.startswith("visual.") for n in changed)
    assert not any("resblocks" in n for n in changed)
    full = dict(verdict.randomised(clip, len(stages)).named_parameters())
    assert all(not torch.equal(before[n], full[n]) for n in before if n.startswith("visual.") and "bias" not in n
               and before[n].numel() > 1)
    assert all(torch.equal(before[n], full[n]) for n in before if not n.startswith("visual."))


def test_randomisation_check_fails_a_model_blind_explainer(tiny_clip, tiny_world, proto):
    clip, _, tokenizer, _ = tiny_clip
    subject = verdict.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    small = proto  # 64 images
    blind = verdict.randomisation_check(verdict.noise_explainer, subject, small)
    assert verdict.randomisation_score(blind) == 0.0
    follows = verdict.randomisation_check(verdict.gradient_input_explainer, subject, small)
    assert verdict.randomisation_score(follows) > 0.2
    assert list(blind["stages re-initialised"]) == list(range(1, len(verdict.vision_stages(clip)) + 1))


def test_conclusion_is_written_from_the_table():
    board = pd.DataFrame({t: [0.9, 0.1, 0.05] for t in verdict.TESTS}, index=["good", "bad", "noise"])
    board.loc["bad", verdict.TESTS[2]] = 0.0
    text = verdict.conclusion(board)
    assert "good does best (0.90" in text and "bad barely changes" in text and "its explanation says" in text
    board.loc["bad"] = 0.95
    assert "bad does best (0.95" in verdict.conclusion(board)


def test_planted_worlds_force_the_answer():
    base = WorldConfig()
    short = verdict.planted_world("shortcut", base, "head size", 6)
    blind = verdict.planted_world("blind", base, "head size", 6)
    assert short.habitat_correlation == 1.0 and short.caption_mix["habitat"] > 0 and not short.blind
    assert blind.blind == ("head size",) and blind.habitat_correlation == 0.0
    # one habitat per class in a six-class world: the habitat alone tells the class
    from conceptlab.world import ConceptWorld

    world = ConceptWorld(short)
    assert len(set(world.home_habitats(np.arange(6)))) == 6


def test_part_attribute_words_and_filter_scores(tiny_world):
    spec = tiny_world.classes[0]
    part, attrs = next(iter(spec.parts.items()))
    assert verdict.word_factors(f"{attrs['colour']} {part}", tiny_world, 0) == [f"{part} colour"]
    c, missing = next((c, p) for c, k in enumerate(tiny_world.classes) for p in PARTS if p not in k.parts)
    assert verdict.word_factors(f"{attrs['colour']} {missing}", tiny_world, c) == []
    assert verdict.word_factors(f"blue {missing}", tiny_world, c) == []
    names = [verdict.FACTORS[0], spec.habitat, f"{attrs['colour']} {part}", part]

    class Word:  # what LaViSE's concepts look like to the conversion: a name
        def __init__(self, name):
            self.name = name

    concepts = [Word(n) for n in names]
    relevance = torch.tensor([[3.0, -1.0, 1.0]])  # filter 0 most relevant, then filter 2; filter 1 negative
    words = np.array([[[1, 2], [3, 3]]])  # filter 0: habitat + "red head"; filter 2: the part (twice)
    out = verdict.filter_factor_scores(relevance, words, concepts, np.array([0]), tiny_world)
    assert out[0, 0] == pytest.approx(1.5)  # half of filter 0's relevance
    assert out[0, FACTORS.index(f"{part} colour")] == pytest.approx(1.5 + 1 / 3)
    assert out[0, FACTORS.index(f"{part} size")] == pytest.approx(1 / 3)
    assert out.sum() == pytest.approx(4.0)


@pytest.mark.parametrize("arch", ["vit", "rn"])
def test_tower_maps_feed_the_embedding_and_lavise_follows_the_model(arch, tiny_clip, tiny_rn_clip, tiny_world,
                                                                    proto):
    clip, tokenizer = (tiny_clip[0], tiny_clip[2]) if arch == "vit" else (tiny_rn_clip[0], tiny_rn_clip[2])
    x = verdict.images_to_tensor(proto.images[:4], clip)
    maps, emb = verdict.tower_maps(clip, x)
    with torch.no_grad():
        assert torch.allclose(emb, clip.encode_image(x), atol=1e-4)  # the maps are the tower's own path
    relevance, _ = verdict.filter_relevance(clip, tokenizer, tiny_world, proto.first(4))
    assert relevance.shape == maps.shape[:2] and relevance.abs().sum() > 0
    subject = verdict.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    explainer = verdict.lavise_explainer(n_train=128, epochs=1, n_filters=3, n_words=2)
    small = proto.first(16)
    out = explainer(subject, small)
    assert out.scores.shape == (16, len(FACTORS)) and np.isfinite(out.scores[verdict._has(small)]).all()
    assert np.isnan(out.scores[~verdict._has(small)]).all() and np.nansum(out.scores) > 0
    check = verdict.randomisation_check(explainer, subject, small, cascade=[len(verdict.vision_stages(clip))])
    assert verdict.randomisation_score(check) > 0  # a randomised tower gets another explanation


def test_descriptor_maps_and_per_class_agreement(tiny_clip, tiny_world, proto):
    clip, _, tokenizer, _ = tiny_clip
    subject = verdict.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    out = verdict.descriptor_map_explainer(subject, proto.first(8), n_descriptors=2)
    assert out.maps.shape[0] == 8 and out.scores.shape == (8, len(FACTORS))
    assert np.allclose(np.nansum(out.scores[:, 1:], 1) / 3 + out.scores[:, 0], 1, atol=1e-3)  # energy shares
    assert not np.allclose(out.scores, verdict.class_map_explainer(subject, proto.first(8)).scores, equal_nan=True)
    truths, _ = _synthetic_truths(proto)
    t = truths["shortcut 0"]
    exact = verdict.per_class_agreement(t.drops, t)
    present = np.unique(proto.labels)
    assert np.allclose(exact[present], 1.0)
    shuffled = verdict.per_class_agreement(t.drops[:, ::-1], t)
    assert np.nanmean(shuffled[present]) < 0.5


def test_planted_recovered_checks_blindness_against_no_shortcut_and_learning(proto):
    truths, conditions = _synthetic_truths(proto)
    subjects = [verdict.Subject(m, c, 0, None, None, None, {}) for m, c in conditions.items()]
    check = verdict.planted_check(truths, subjects, "body colour")
    ok = verdict.planted_recovered(check, truths, "body colour", n_classes=6)
    assert all(ok.values()) and len(ok) == 4
    # a blind model that relies on the blinded factor as much as the others fails the comparison
    t = truths["blind 0"]
    t.drops[:, FACTORS.index("body colour")] = 5.0
    assert not verdict.planted_recovered(verdict.planted_check(truths, subjects, "body colour"), truths,
                                         "body colour")["blinded factor: blind < no-shortcut reliance"]
    # a model at chance has not learned
    truths["shortcut 1"].correct_base[:] = False
    assert not verdict.planted_recovered(verdict.planted_check(truths, subjects, "body colour"),
                                         n_classes=6)["every planted model learned (accuracy >= 2x chance)"]


def test_conclusion_uses_the_bootstrap_interval_for_agreement():
    board = pd.DataFrame({t: [0.3, 0.05] for t in verdict.TESTS}, index=["m", "noise"])
    lucky = board.copy()
    lucky.loc["noise"] = 0.25  # chance as the noise explainer met it: m's interval must clear 0.25
    assert "no method" in verdict.conclusion(lucky, intervals=pd.DataFrame({"low": [0.1, 0], "high": [0.5, 0.5]},
                                                                              index=["m", "noise"])).split("On (b)")[0]
    wide = pd.DataFrame({"low": [-0.2, -0.5], "high": [0.8, 0.5]}, index=["m", "noise"])
    tight = pd.DataFrame({"low": [0.1, -0.5], "high": [0.5, 0.5]}, index=["m", "noise"])
    assert "On (a) agreement, m does best (0.30; chance 0.05); no method" in verdict.conclusion(board, intervals=wide)
    assert "1 of 1 methods is clearly above" in verdict.conclusion(board, intervals=tight)


def test_method_explainers_follow_the_parameters_and_references_come_last(tmp_path):
    p = {"deal_steps": 0, "seed": 0, "ex2_beta": 0.02, "sae_n_corpus": 256, "sae_epochs": 1, "probe_lambda": 0.0,
         "lavise_n_train": 64, "lavise_epochs": 1}
    mine = {"mine": verdict.noise_explainer}
    names = list(verdict.method_explainers(tmp_path, p, yours=mine))
    assert not any("DEAL" in n for n in names) and names[-3:] == ["mine", *verdict.REFERENCES]
    assert sum("DEAL" in n for n in verdict.method_explainers(tmp_path, {**p, "deal_steps": 2})) == 2


def test_worst_classes_names_each_methods_lowest_class_without_references():
    table = pd.DataFrame({"a": [0.5, -0.2, 1.0], "b": [0.1, 0.9, 1.0]}, index=["m1", "m2", "truth (planted)"])
    text = verdict.worst_classes(table)
    assert "m1: a (0.50)" not in text and "m1: b (0.10)" in text and "m2: a (-0.20)" in text
    assert "truth" not in text
