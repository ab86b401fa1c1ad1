"""Chapter 7's protocol (conceptlab.verdict), explainers (conceptlab.explainers) and chapter module:
each measure must register what it tests, and fail when it is broken (issue 20, item 7)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlab import explainers as xp
from conceptlab import verdict as vd
from conceptlab.chapters import verdict as chapter
from conceptlab.models import images_to_tensor
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


def _interventions(batch, drops):
    n = len(batch)
    return Interventions(batch, FACTORS, np.ones(n, bool), np.ones(n), np.ones((n, len(FACTORS)), bool), drops)


def _planted(batch, n_seeds=3, seed=0):
    """Fake models per condition: shortcut models rely on the habitat, blind ones not on body colour."""
    rng = np.random.default_rng(seed)
    has = vd.factor_present(batch)
    truths, conditions = {}, {}
    for condition in ("shortcut", "no-shortcut", "blind"):
        for s in range(n_seeds):
            profile = rng.random(len(FACTORS)) + 0.2
            profile[0] = 3.0 if condition == "shortcut" else 0.1
            if condition == "blind":
                profile[FACTORS.index("body colour")] = 0.0
            drops = np.where(has, profile[None] + 0.1 * rng.standard_normal((len(batch), len(FACTORS))), np.nan)
            truths[f"{condition} {s}"] = _interventions(batch, drops)
            conditions[f"{condition} {s}"] = condition
    return truths, conditions


def _pairs(scores, conditions, a, b, column):
    by = {c: {int(m.split()[-1]): m for m in conditions if conditions[m] == c} for c in (a, b)}
    return ({k: scores[m][:, column] for k, m in by[a].items()}, {k: scores[m][:, column] for k, m in by[b].items()})


# ---------------------------------------------------------------------------- conversions
def test_region_scores_are_area_normalised_and_uniform_maps_score_one(proto):
    uniform = vd.map_region_scores(np.ones((len(proto), 8, 8)), proto)
    assert np.allclose(uniform[vd.region_present(proto)], 1.0, atol=1e-3)
    raw = vd.map_region_scores(np.ones((len(proto), 8, 8)), proto, area_normalised=False)
    assert (raw[:, 0] > 0.5).all()  # the background wins a raw share by its size alone
    head = 1 + PARTS.index("head")
    only_head = vd.map_region_scores(proto.masks[:, PARTS.index("head")].astype(float), proto)
    assert (only_head[:, head] > 10).all() and np.allclose(only_head[:, 0], 0)
    factors = vd.regions_to_factors(only_head)
    assert np.allclose(factors[:, FACTORS.index("head colour")], factors[:, FACTORS.index("head size")])
    wings = PARTS.index("wings")
    assert np.isnan(uniform[~proto.present[:, wings], 1 + wings]).all()


def test_part_level_oracle_reaches_one_on_maps_and_words(proto, tiny_world):
    truths, _ = _planted(proto)
    for t in truths.values():
        clean = _interventions(proto, np.where(t.has(), np.nanmean(t.drops, 0)[None], np.nan))  # no image noise
        for g in vd.GRANULARITIES:
            assert vd.profile_rho(vd.oracle_scores(clean, g, tiny_world), vd.truth_scores(clean, g)) == 1.0
            assert vd.profile_rho(vd.oracle_scores(t, g, tiny_world), vd.truth_scores(t, g)) > 0.9
    # the old conversion (raw shares copied to three attributes) cannot reach it
    t = truths["no-shortcut 0"]
    raw = vd.map_factor_scores(vd.reliance_maps(t), proto, area_normalised=False)
    assert vd.profile_rho(raw, t.drops) < 0.9


def test_vocabulary_prior_is_the_word_conversions_null(proto, tiny_world):
    spec = tiny_world.classes[0]
    colours = [attrs["colour"] for attrs in spec.parts.values()]
    prior = vd.vocabulary_prior([*colours, "piano", "bird"], proto.labels, tiny_world)
    first = proto.labels == 0
    colour_cols = [FACTORS.index(f"{p} colour") for p in spec.parts]
    assert (prior[first][:, colour_cols].sum(1) > 0).all() and (prior[first][:, 0] == 0).all()
    # random words through the conversion favour colour: against a colour-first truth they score well
    truth = np.where(vd.factor_present(proto), 0.0, np.nan)
    truth[:, [FACTORS.index(f"{p} colour") for p in PARTS]] += 1.0
    truth = np.where(vd.factor_present(proto), truth, np.nan)
    assert vd.profile_rho(prior, truth) > 0.3


def test_mention_scores_follow_the_reward(tiny_world):
    candidates = vd.candidate_descriptions(tiny_world)
    rewards = np.zeros(len(candidates))
    target = candidates.index[(candidates.class_index == 0) & (candidates.factors == ("habitat",))][0]
    rewards[target] = 1.0
    scores = vd.mention_factor_scores(candidates, rewards, beta=0.01)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-6) and scores[0, 1:].max() < 1e-6
    flat = vd.mention_factor_scores(candidates, np.zeros(len(candidates)), beta=1.0)
    assert np.ptp(flat[1][flat[1] > 0]) == pytest.approx(0.0)  # the flat null: every stated factor alike


def test_concept_names_map_to_the_factors_they_denote(tiny_world):
    spec = tiny_world.classes[0]
    part, attrs = next(iter(spec.parts.items()))
    assert vd.word_factors(spec.habitat, tiny_world, 0) == ["habitat"]
    assert vd.word_factors(part, tiny_world, 0) == [f"{part} colour", f"{part} pattern", f"{part} size"]
    assert vd.word_factors(f"{attrs['colour']} {part}", tiny_world, 0) == [f"{part} colour"]
    assert vd.word_factors(spec.name, tiny_world, 0) == [] == vd.word_factors("piano", tiny_world, 0)
    out = vd.concept_factor_scores(
        np.array([[2.0, 1.0, 5.0]]), [spec.habitat, part, "piano"], np.array([0]), tiny_world
    )
    assert out[0, 0] == 2.0 and out[0, FACTORS.index(f"{part} size")] == pytest.approx(1 / 3)
    assert out.sum() == pytest.approx(3.0)


# ---------------------------------------------------------------------------- the tests themselves
def test_a_planted_map_explainer_whose_background_follows_habitat_reliance_passes_the_habitat_test(proto):
    truths, conditions = _planted(proto)
    maps = {m: vd.reliance_maps(t) for m, t in truths.items()}
    scores = {m: vd.map_factor_scores(maps[m], proto) for m in truths}
    test = vd.paired_test(*_pairs(scores, conditions, "shortcut", "no-shortcut", 0), 100)
    assert vd.detected(test, +1) and test["low"] > test["band_high"]
    blind = vd.paired_test(*_pairs(scores, conditions, "blind", "no-shortcut", FACTORS.index("body colour")), 100)
    assert blind["diff"] < 0
    # a map that does not follow the model (the silhouette) detects nothing
    flat = {m: vd.map_factor_scores(vd.silhouette_maps(proto), proto) for m in truths}
    assert not vd.detected(vd.paired_test(*_pairs(flat, conditions, "shortcut", "no-shortcut", 0), 100), +1)


def test_noise_sits_inside_the_permutation_band_on_every_test(proto, tiny_world):
    truths, conditions = _planted(proto)
    subjects = {
        m: vd.Subject(m, c, int(m.split()[-1]), None, None, tiny_world, {"name": m}) for m, c in conditions.items()
    }
    noise = {m: xp.noise_explainer(subjects[m], proto).scores for m in truths}
    assert not np.allclose(noise["shortcut 0"], noise["no-shortcut 0"], equal_nan=True)  # fresh per model
    drops = {m: t.drops for m, t in truths.items()}
    a = vd.agreement(noise, drops, vd.bootstrap_plan(conditions, len(proto), 50))
    _, low, high = vd.agreement_band(noise, drops, 200)
    assert low <= a["rho"] <= high and a["low"] < 0 < a["high"]
    rel = {m: vd.relative_scores(s, "factor") for m, s in noise.items()}
    for test in (
        vd.paired_test(*_pairs(rel, conditions, "shortcut", "no-shortcut", 0), 100),
        vd.paired_test(*_pairs(rel, conditions, "blind", "no-shortcut", FACTORS.index("body colour")), 100),
    ):
        assert test["band_low"] <= test["diff"] <= test["band_high"] and not vd.detected(test, +1)
    other = xp.noise_explainer(vd.Subject("x", "shortcut", 0, None, None, tiny_world, {"randomised": 1}), proto)
    similarity = vd.profile_rho(other.scores, noise["shortcut 0"])
    _, low, high = vd.similarity_band(noise["shortcut 0"], 200)
    assert low <= similarity <= high


def test_agreement_reports_the_gain_over_the_null_on_paired_resamples(proto):
    truths, conditions = _planted(proto)
    drops = {m: t.drops for m, t in truths.items()}
    plan = vd.bootstrap_plan(conditions, len(proto), 50)
    a = vd.agreement(drops, drops, plan, null=drops)
    assert a["rho"] == pytest.approx(1.0) and a["gain"] == pytest.approx(0.0) and a["gain_high"] == pytest.approx(0)
    shuffled = {m: d[:, ::-1] for m, d in drops.items()}  # a broken conversion: the factors in the wrong order
    broken = vd.agreement(shuffled, drops, plan, null=drops)
    assert broken["rho"] < 0.5 and broken["gain_high"] < 0
    assert set(broken["per_model"]) == set(truths)


def test_retest_and_bootstrap_plan_resample_seeds_within_conditions(proto):
    truths, conditions = _planted(proto)
    assert vd.retest(truths["shortcut 0"]) > 0.8
    plan = vd.bootstrap_plan(conditions, len(proto), 20)
    for draw in plan:
        drawn = [conditions[m] for m, _ in draw]
        assert sorted(drawn) == sorted(conditions.values())  # every condition keeps its number of seeds


def test_planted_recovered_checks_blindness_and_learning(proto):
    truths, conditions = _planted(proto, n_seeds=2)
    subjects = [vd.Subject(m, c, 0, None, None, None, {}) for m, c in conditions.items()]
    check = vd.planted_check(truths, subjects, "body colour")
    assert all(vd.planted_recovered(check, n_classes=6).values())
    truths["blind 0"].drops[:, FACTORS.index("body colour")] = 5.0
    truths["shortcut 1"].correct_base[:] = False
    bad = vd.planted_recovered(vd.planted_check(truths, subjects, "body colour"), n_classes=6)
    assert not bad["blinded factor: blind < no-shortcut reliance"]
    assert not bad["every planted model learned (accuracy >= 2x chance)"]


def test_planted_worlds_force_the_answer():
    from conceptlab.world import ConceptWorld

    base = WorldConfig()
    short = vd.planted_world("shortcut", base, "head size", 6)
    blind = vd.planted_world("blind", base, "head size", 6)
    assert short.habitat_correlation == 1.0 and short.caption_mix["habitat"] > 0 and not short.blind
    assert blind.blind == ("head size",) and blind.habitat_correlation == 0.0
    assert len(set(ConceptWorld(short).home_habitats(np.arange(6)))) == 6


# ---------------------------------------------------------------------------- randomisation and explainers
def test_randomisation_reinitialises_from_the_top(tiny_clip):
    clip = tiny_clip[0]
    stages = vd.vision_stages(clip)
    assert stages[0].startswith("proj") and "resblocks" in stages[1]
    before, after = dict(clip.named_parameters()), dict(vd.randomised(clip, 1).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "visual.proj" in changed and not any("resblocks" in n for n in changed)
    full = dict(vd.randomised(clip, len(stages)).named_parameters())
    assert all(torch.equal(before[n], full[n]) for n in before if not n.startswith("visual."))


def test_randomisation_check_fails_an_explainer_blind_to_the_weights(tiny_clip, tiny_world, proto):
    clip, _, tokenizer, _ = tiny_clip
    subject = vd.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    small = proto.first(16)
    fixed = np.where(vd.factor_present(small), np.arange(len(FACTORS))[None], np.nan)
    constant = vd.randomisation_check(lambda s, b: vd.Explanation(fixed), subject, small, [1, 3])
    assert (constant.similarity == 1.0).all() and (constant.similarity > vd.similarity_band(fixed, 100)[2]).all()

    def reads_weights(s, b):  # a claim read off the top stage's weights
        return vd.Explanation(vd.per_model(s.clip.visual.proj[: len(FACTORS), 0].detach().numpy(), b))

    follows = vd.randomisation_check(reads_weights, subject, small, [1])
    assert follows.similarity.iloc[0] < vd.similarity_band(reads_weights(subject, small).scores, 100)[2]


def test_measure_all_renders_each_worlds_images_once_and_matches_measure(tiny_clip, tiny_world, monkeypatch):
    from dataclasses import replace

    from conceptlab.world import ConceptWorld

    clip, _, tokenizer, _ = tiny_clip
    other = ConceptWorld(replace(tiny_world.config, habitat_correlation=0.5))
    subjects = [
        vd.Subject(name, "no-shortcut", 0, clip, tokenizer, world, {"name": name})
        for name, world in (("a", tiny_world), ("b", ConceptWorld(tiny_world.config)), ("c", other))
    ]
    rendered = []
    real = vd.intervention_batches
    monkeypatch.setattr(vd, "intervention_batches", lambda world, *a: rendered.append(world) or real(world, *a))
    shared = vd.measure_all(subjects, 16, seed=3)
    assert len(rendered) == 2, "the two subjects of one world share its images"
    for s in subjects:
        alone = vd.measure(s, 16, seed=3)
        assert np.array_equal(alone.drops, shared[s.name].drops, equal_nan=True)
        assert np.array_equal(alone.base.images, shared[s.name].base.images)


def test_explanations_are_cached_per_method_config_subject_and_images(tiny_clip, tiny_world, proto, tmp_path):
    from conceptlab.artifacts import ArtifactStore

    calls = []

    def counting(s, b):
        calls.append(s.name)
        return vd.Explanation(np.where(vd.factor_present(b), len(calls), np.nan))

    store, method = ArtifactStore(tmp_path), xp.Method(counting, "factor", "a counter", config={"explainer": "counter"})
    subject = vd.Subject("s", "no-shortcut", 0, tiny_clip[0], tiny_clip[2], tiny_world, {"model": 1})
    first = xp.explain_cached(store, method, subject, proto)
    again = xp.explain_cached(store, method, subject, proto)
    assert len(calls) == 1 and np.array_equal(first.scores, again.scores, equal_nan=True)
    xp.explain_cached(store, method, subject, proto.first(8))  # other images
    xp.explain_cached(store, xp.Method(counting, "factor", "", config={"explainer": "other"}), subject, proto)
    for seed in (0, 1, 0):
        vd.randomisation_check(partial(xp.explain_cached, store, method), subject, proto, [1, 2], seed, first)
    assert len(calls) == 7, "each re-initialised copy (stages and seed) has its own key"
    xp.explain_cached(store, xp.Method(counting, "factor", "yours, no config"), subject, proto)
    xp.explain_cached(store, xp.Method(counting, "factor", "yours, no config"), subject, proto)
    assert len(calls) == 9, "an explainer without a config is never cached"


@pytest.mark.parametrize("arch", ["vit", "rn"])
def test_tower_maps_come_from_a_hook_on_the_models_own_path(arch, tiny_clip, tiny_rn_clip, tiny_world, proto):
    clip, tokenizer = (tiny_clip[0], tiny_clip[2]) if arch == "vit" else (tiny_rn_clip[0], tiny_rn_clip[2])
    x = images_to_tensor(proto.images[:4], clip)
    maps, emb, _ = xp.tower_maps(clip, x)
    with torch.no_grad():
        assert torch.allclose(emb, clip.encode_image(x), atol=1e-5)
    assert maps.ndim == 4 and maps.shape[0] == 4
    relevance, _ = xp.filter_relevance(clip, tokenizer, tiny_world.class_names, proto.first(4))
    assert relevance.shape == maps.shape[:2] and relevance.abs().sum() > 0
    assert xp.lavise_first_stage(clip) == (2 if arch == "rn" else 3)


def test_lavise_explains_filters_in_words_and_follows_the_model(tiny_clip, tiny_world, proto):
    clip, _, tokenizer, _ = tiny_clip
    subject = vd.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    small = proto.first(16)
    out = xp.lavise_explainer(n_train=128, epochs=1, n_filters=3, n_words=2)(subject, small)
    assert out.scores.shape == (16, len(FACTORS)) and np.isfinite(out.scores[vd.factor_present(small)]).all()
    assert np.isnan(out.scores[~vd.factor_present(small)]).all() and np.nansum(out.scores) > 0


def test_filter_scores_share_relevance_over_words_and_factors(tiny_world):
    spec = tiny_world.classes[0]
    part, attrs = next(iter(spec.parts.items()))
    names = ["piano", spec.habitat, f"{attrs['colour']} {part}", part]
    relevance = torch.tensor([[3.0, -1.0, 1.0]])  # filter 0 most relevant, then filter 2; filter 1 negative
    words = np.array([[[1, 2], [3, 3]]])
    out = xp.filter_factor_scores(relevance, words, names, np.array([0]), tiny_world)
    assert out[0, 0] == pytest.approx(1.5)
    assert out[0, FACTORS.index(f"{part} colour")] == pytest.approx(1.5 + 1 / 3)
    assert out.sum() == pytest.approx(4.0)


def test_descriptor_maps_differ_from_the_class_map(tiny_clip, tiny_world, proto):
    clip, _, tokenizer, _ = tiny_clip
    subject = vd.Subject("s", "no-shortcut", 0, clip, tokenizer, tiny_world, {})
    out = xp.descriptor_map_explainer(subject, proto.first(8), n_descriptors=2)
    assert out.maps.shape[0] == 8 and out.scores.shape == (8, len(FACTORS))
    assert not np.allclose(out.scores, xp.class_map_explainer(subject, proto.first(8)).scores, equal_nan=True)


# ---------------------------------------------------------------------------- the chapter's words
def _result_with(gain_low: dict[str, float]) -> chapter.Result:
    r = chapter.Result(retest={"factor": 0.9, "region": 0.95})
    test = {"diff": 0.0, "low": -0.1, "high": 0.1, "band_low": -0.1, "band_high": 0.1, "detected": False}
    for name, low in gain_low.items():
        r.scores[name] = {
            "granularity": "factor",
            "oracle": 1.0,
            "band": {"mean": 0, "low": -0.3, "high": 0.3},
            "agreement": {
                "rho": 0.5,
                "low": 0.2,
                "high": 0.7,
                "null": 0.1,
                "gain": 0.4,
                "gain_low": low,
                "gain_high": 0.8,
            },
            "habitat": dict(test),
        }
    return r


def test_the_conclusion_is_generated_from_the_scores():
    r = _result_with({"A": 0.1, "B": -0.2, "truth (measured)": 0.5, "noise": -0.5})
    first = chapter.conclusion(r)[0]
    assert "1 of 2 rows (A)" in first
    r.scores["B"]["agreement"]["gain_low"] = 0.05
    assert "2 of 2 rows (A, B)" in chapter.conclusion(r)[0]
    r.scores["A"]["habitat"]["detected"] = True
    habitat = next(line for line in chapter.conclusion(r) if line.startswith("(b)"))
    assert "1 of 2 rows (A)" in habitat and "noise stays inside its band" in habitat
    assert chapter.verdicts(r)["A"].startswith("agrees beyond its null; habitat shortcut detected")


def test_the_notebook_writes_no_conclusion_by_hand():
    source = (Path(__file__).parents[1] / "notebooks" / "07_verdict.py").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.startswith("#"))
    assert "chapter.conclusion(r)" in code and "chapters.finish(ch, r, chapter)" in code
    assert 'f"' not in code and "v == v" not in code


def test_intro_table_has_one_row_per_method_with_the_verdict(tmp_path):
    record = {
        "chapter": chapter.NAME,
        "results": {"verdicts": {"DN-CBM": "no agreement beyond its null", "KL-optimal reward ranking": "agrees"}},
    }
    (tmp_path / f"{chapter.NAME}.json").write_text(json.dumps(record))
    (tmp_path / "03_deal.json").write_text(
        json.dumps(
            {
                "headline": {
                    "localizability": {
                        "value": 0.61,
                        "low": 0.5,
                        "high": 0.7,
                        "chance": 0.2,
                        "paper": 0.673,
                        "note": "",
                    }
                }
            }
        )
    )
    table = chapter.intro_table(tmp_path)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(chapter.INTRO)
    deal = next(line for line in lines if line.startswith("| DEAL"))
    assert "0.673" in deal and "0.610" in deal
    assert "no agreement beyond its null" in next(line for line in lines if line.startswith("| DN-CBM"))
    ex2_row = next(line for line in lines if line.startswith("| EX2"))
    assert "is not EX2" in ex2_row and "habitat shortcut" not in ex2_row  # chapter 4 not run: nothing tested
    for observed, reliance, null, verdict in (
        (-0.4, 1.0, 0.05, "points the other way"),
        (0.3, 1.0, 0.05, "detected"),
        (0.3, 1.0, 0.5, "not detected"),  # outside 0 but inside its label-swap null band
        (0.0, 1.0, 0.05, "not detected"),
        (-0.4, 0.0, 0.05, "moves the descriptions, with no measured reliance to follow"),  # a text-side plant
    ):
        band = {"mean": 0.0, "low": -null, "high": null}
        plant = {
            "seeds": 3,
            "reliance": {"value": reliance, "low": reliance - 0.2, "high": reliance + 0.2},
            "observed": {"value": observed, "low": observed - 0.1, "high": observed + 0.1, "band": band},
        }
        planted = {"plant": plant, "pair": ["no-shortcut", "shortcut"]}
        (tmp_path / "04_ex2.json").write_text(json.dumps({"results": {"planted": planted}}))
        ex2_row = next(line for line in chapter.intro_table(tmp_path).splitlines() if line.startswith("| EX2"))
        assert f"habitat shortcut {verdict} (chapter 4" in ex2_row and f"{observed:+.3f}" in ex2_row
