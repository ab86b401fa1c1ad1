"""Chapter 1's module: the run, its headline with chance and intervals, a generated summary, exercises
that share the chapter's CLIP, and the reliance yardstick."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_TRAIN, TINY_WORLD

from conceptlab import chapters
from conceptlab.chapters import world_and_model
from conceptlab.chapters.report import unsupported_numbers
from conceptlab.verdict import planted_models, planted_recipe


@pytest.fixture(scope="module")
def chapter_run(tiny_store, tiny_clip, tmp_path_factory):
    """Chapter 1 on the tests' tiny world, reusing the session's tiny CLIP (same key): (ch, result, record)."""
    results = tmp_path_factory.mktemp("results")
    params = {
        "world": {"n_classes": TINY_WORLD.n_classes},
        "world_clip": {k: getattr(TINY_TRAIN, k) for k in ("n_train", "steps", "batch_size", "warmup")},
        "n_test": 64,
        "n_reliance": 16,
        "artifacts_dir": str(tiny_store.root),
        "results_dir": str(results),
    }
    ch, r = chapters.run("01_world_and_model", params)
    return ch, r, json.loads((results / "01_world_and_model.json").read_text())


def test_headline_numbers_carry_chance_and_an_interval(chapter_run):
    ch, r, record = chapter_run
    top1 = record["headline"]["zero-shot top-1"]
    assert top1["chance"] == pytest.approx(1 / 6) and top1["low"] <= top1["value"] <= top1["high"]
    assert top1["value"] == pytest.approx(record["results"]["zero_shot"]["top1"], abs=1e-6)
    assert all(h["chance"] is not None and h["low"] is not None for h in record["headline"].values())
    assert record["results"]["train_seconds"] == pytest.approx(r.history[-1]["seconds"])
    assert record["results"]["habitat_correlation"] == 0.8 and record["results"]["n_classes"] == 6


def test_summary_is_generated_from_the_numbers(chapter_run):
    ch, r, record = chapter_run
    assert unsupported_numbers(record["summary"], record) == []
    assert f"{record['results']['zero_shot']['top1']:.1%}" in record["summary"][0]
    worse = replace(r, logits=torch.roll(r.logits, 1, dims=1))  # every prediction moved one class on
    value = world_and_model.headline(ch, worse)["zero-shot top-1"].value
    assert value != pytest.approx(record["results"]["zero_shot"]["top1"])
    assert f"{value:.1%}" in world_and_model.summary(ch, worse)[0]


def test_no_label_calls_a_user_model_the_world_clip(chapter_run):
    _, _, record = chapter_run
    assert not any("world" in label.lower() for label in record["headline"])
    label = world_and_model.model_label({"model": "ViT-B-32", "pretrained": "openai"})
    assert "world" not in label.lower() and "ViT-B-32" in label


def test_reliance_yardstick_and_the_explorer_change(chapter_run):
    ch, r, record = chapter_run
    table = world_and_model.reliance_table(ch, r)
    assert list(table["value"]) == sorted(table["value"], reverse=True) and len(table) == 16
    assert ((table["low"] <= table["value"] + 1e-12) & (table["value"] <= table["high"] + 1e-12)).all()
    change = world_and_model.explorer_change(ch.world, table)
    spec = ch.world.classes[0]
    attribute = next(k for k in ("colour", "pattern", "size") if k in change)
    assert change["part"] in spec.parts and change[attribute] != spec.parts[change["part"]][attribute]


class Trained(Exception):
    """Raised by the stubbed trainer: the exercise asked for a training run."""


def test_test_time_exercises_reuse_the_chapter_clip_and_the_training_one_changes_only_the_world(
    chapter_run, monkeypatch
):
    ch, r, record = chapter_run
    calls = []

    def train(world, cfg, out_dir, progress=True, **kwargs):
        calls.append((world.config, cfg))
        raise Trained

    monkeypatch.setattr("conceptlab.models.train_world_clip", train)
    assert world_and_model.exercise_test_habitat(ch, habitat_correlation=0.0)["home habitat share"] < 0.5
    assert world_and_model.exercise_prompts(ch, template="{}")["top1"] >= 0
    assert world_and_model.exercise_test_habitat(ch)["top-1"] == pytest.approx(record["results"]["zero_shot"]["top1"])
    assert calls == []  # test-time changes never retrain
    for condition in ("no-shortcut", "shortcut"):
        with pytest.raises(Trained):
            world_and_model.exercise_train_habitat(ch, condition=condition)
    (base_world, base_cfg), (world, cfg) = calls[0], calls[-1]
    assert base_world.habitat_correlation == 0.0 and world.habitat_correlation == 1.0
    assert replace(base_world, habitat_correlation=1.0) == world  # only the habitat's correlation differs
    assert (
        base_cfg
        == cfg
        == replace(
            planted_recipe(ch.train_cfg),
            steps=ch.params["exercise_steps"],
            warmup=max(1, ch.params["exercise_steps"] // 10),
        )
    )


def test_the_shortcut_exercise_trains_chapter_7s_planted_models(tmp_path, monkeypatch):
    """At its default steps, exercise 1's models have the keys of chapter 7's first planted seed: trained once."""
    from conceptlab.chapter import setup
    from conceptlab.chapters import verdict as chapter7

    keys = []

    def train(world, cfg, out_dir, progress=True, **kwargs):
        raise Trained

    def record(store, kind, key, build, load):
        keys.append(key)
        raise Trained

    monkeypatch.setattr("conceptlab.models.train_world_clip", train)
    ch1 = setup("01_world_and_model", {"artifacts_dir": str(tmp_path)}, world_and_model.PARAMETERS)
    ch7 = setup("07_verdict", {"artifacts_dir": str(tmp_path)}, chapter7.PARAMETERS)
    monkeypatch.setattr(type(ch1.store), "get_or_build", record)
    for condition in ("shortcut", "no-shortcut"):
        with pytest.raises(Trained):
            world_and_model.exercise_train_habitat(ch1, condition=condition)
        with pytest.raises(Trained):
            planted_models(ch7.store, ch7.world_cfg, chapter7.planted_recipe(ch7), [condition], 1, "head colour", 6)
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]


def test_reliance_is_kept_in_the_store_and_read_back_on_a_rerun(chapter_run, monkeypatch):
    """A rerun of the reliance step reads the per-image margin drops from the store instead of intervening
    again, and gets the same numbers; another ``n_reliance`` is a new key (measured)."""
    ch, r, _ = chapter_run
    from conceptlab import reliance

    calls = []
    real = reliance.intervene
    monkeypatch.setattr(reliance, "intervene", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = world_and_model.measure_reliance(ch, world_and_model.Result())
    assert calls == [], "a rerun with the same CLIP and settings must not intervene again"
    assert again.interventions.drops.tobytes() == r.interventions.drops.tobytes()
    assert again.interventions.reliance().equals(r.interventions.reliance())
    other = ch.with_params(n_reliance=ch.params["n_reliance"] + 1)
    measured = world_and_model.measure_reliance(other, world_and_model.Result()).interventions
    assert measured.drops.shape[0] == other.params["n_reliance"]
    assert len(calls) == 1
