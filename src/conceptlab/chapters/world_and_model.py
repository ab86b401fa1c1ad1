"""Chapter 1, the world and the model: parameters, the chapter's run, its figures, results and summary.

The library it calls: :mod:`conceptlab.world` (Concept World), :mod:`conceptlab.models` (the CLIP,
zero-shot classification, the habitat shortcut) and :mod:`conceptlab.reliance` (what the model uses,
measured by changing one factor at a time). The notebook calls the steps below in order, each
filling the :class:`Result`: :func:`look`, :func:`train`, :func:`classify`, :func:`measure_reliance`;
:func:`run` calls them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .. import plots, reliance
from .. import verdict as vd
from ..chapter import Chapter, Param
from ..models import CLASS_PROMPTS, habitat_shortcut, zero_shot
from ..stats import bootstrap_interval, excludes
from ..world import ATTRIBUTES, PARTS, ConceptWorld, WorldBatch
from .report import Reported

NAME = "01_world_and_model"
PARAMETERS: dict[str, Param] = {
    "n_test": Param(2000, int, min=10, help="held-out test images"),
    "n_reliance": Param(512, int, min=8, help="prototypical test creatures changed one factor at a time"),
    "exercise_steps": Param(
        vd.PLANTED_RECIPE["steps"],
        int,
        min=1,
        help="steps of exercise 1's planted CLIPs (chapter 7's: at its default both chapters share the models)",
    ),
}
SWITCHES: dict = {}  # no original code: Concept World and its CLIP are this book's


@dataclass
class Result:
    """Everything chapter 1 computes, filled step by step (the notebook shows each step)."""

    sample: WorldBatch | None = None
    statistics: dict[str, float] = field(default_factory=dict)
    history: list[dict] | None = None
    logits: torch.Tensor | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    shortcut: dict[str, float] = field(default_factory=dict)
    interventions: reliance.Interventions | None = None


# ---------------------------------------------------------------------------- the chapter's steps
def look(ch: Chapter, r: Result) -> Result:
    """Draw the held-out test images and measure the planted rates in them."""
    with ch.stage("world"):
        r.sample = ch.world.sample(ch.params["n_test"], split="test")
        r.statistics = ch.world.statistics(r.sample)
    return r


def train(ch: Chapter, r: Result, progress: bool = True) -> Result:
    """Train (or load) the chapter's CLIP; ``history`` is ``None`` for a model not trained here."""
    with ch.stage("train"):
        r.history = ch.clip(progress=progress)[3]
    return r


def classify(ch: Chapter, r: Result) -> Result:
    """Zero-shot top-k on the test images, and accuracy at home and away from the home habitat."""
    clip, _, tokenizer, _ = ch.clip()
    with ch.stage("measure"):
        r.logits, r.accuracy = zero_shot(clip, tokenizer, r.sample.images, r.sample.labels, ch.world.class_names)
        r.shortcut = habitat_shortcut(r.logits.argmax(1).numpy(), r.sample, ch.world)
    return r


def measure_reliance(ch: Chapter, r: Result) -> Result:
    """The margin drop when one factor of prototypical creatures changes: what the model uses (per image,
    kept in the artifact store under the CLIP's key, so a rerun reads it back)."""
    clip, _, tokenizer, _ = ch.clip()
    with ch.stage("reliance"):
        r.interventions = reliance.stored_intervene(
            ch.store,
            "reliance",
            {"clip": ch.key()},
            lambda: reliance.zero_shot_scorer(clip, tokenizer, ch.world.class_names),
            ch.world,
            n=ch.params["n_reliance"],
            seed=ch.params["seed"],
        )
    return r


def run(ch: Chapter, progress: bool = False) -> Result:
    """The whole chapter, step by step as in the notebook."""
    r = look(ch, Result())
    train(ch, r, progress=progress)
    classify(ch, r)
    return measure_reliance(ch, r)


# ---------------------------------------------------------------------------- measures behind the headline
def model_label(p: dict[str, Any]) -> str:
    """What the chapter measured, in words, from its parameters: the world CLIP, or the user's model."""
    return "the world CLIP" if p["model"] == "world" else f"{p['model']} ({p['pretrained'] or 'random weights'})"


def correct(r: Result) -> np.ndarray:
    """Per test image, whether the zero-shot top class is right."""
    return r.logits.argmax(1).numpy() == r.sample.labels


def at_home(ch: Chapter, r: Result) -> np.ndarray:
    """Per test image, whether the creature sits in its class's home habitat."""
    return r.sample.habitats == ch.world.home_habitats(r.sample.labels)


def shortcut_gap(ch: Chapter, r: Result) -> tuple[float, float, float]:
    """Home-habitat minus other-habitat accuracy, with its bootstrap interval over test images."""
    rows = np.column_stack([correct(r), at_home(ch, r)]).astype(float)

    def gap(v: np.ndarray) -> float:
        home = v[:, 1] == 1
        return float(v[home, 0].mean() - v[~home, 0].mean()) if home.any() and (~home).any() else np.nan

    low, high = bootstrap_interval(rows, gap, seed=ch.params["seed"])
    return gap(rows), low, high


def reliance_table(ch: Chapter, r: Result) -> pd.DataFrame:
    """Mean margin drop per factor with its bootstrap interval over the creatures that have the factor."""
    iv = r.interventions
    rows = {}
    for j, factor in enumerate(iv.factors):
        drops = iv.drops[iv.has()[:, j], j]
        low, high = bootstrap_interval(drops, seed=ch.params["seed"])
        rows[factor] = {"value": float(drops.mean()), "low": low, "high": high, "n_images": len(drops)}
    return pd.DataFrame(rows).T.sort_values("value", ascending=False)


# ---------------------------------------------------------------------------- results, headline, summary
def results(ch: Chapter, r: Result) -> dict[str, Any]:
    """The results JSON's ``results`` block."""
    table = reliance_table(ch, r)
    return {
        "zero_shot": r.accuracy,
        "n_test": len(r.sample),
        "habitat_shortcut": r.shortcut,
        "final_train_loss": r.history[-1]["loss"] if r.history else None,
        "statistics": r.statistics,
        "n_classes": len(ch.world.class_names),
        "chance_top1": 1 / len(ch.world.class_names),
        "habitat_correlation": ch.world_cfg.habitat_correlation,
        "class_prompts": list(CLASS_PROMPTS),
        "train_seconds": r.history[-1].get("seconds") if r.history else None,
        "train_steps": len(r.history) if r.history else None,
        "n_factors": len(table),
        "habitat_rank": list(table.index).index("habitat") + 1,
        "reliance": table.drop(columns="n_images").to_dict(orient="index"),
        "reliance_n_images": int(table["n_images"].min()),
    }


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """Zero-shot top-1, the habitat gap and the habitat reliance, each with its interval and chance."""
    hits = correct(r).astype(float)
    low, high = bootstrap_interval(hits, seed=ch.params["seed"])
    gap, gap_low, gap_high = shortcut_gap(ch, r)
    habitat = reliance_table(ch, r).loc["habitat"]
    where = f"{model_label(ch.params)}; bootstrap over {len(hits)} test images"
    return {
        "zero-shot top-1": Reported(
            float(hits.mean()),
            low,
            high,
            chance=1 / len(ch.world.class_names),
            note=f"{where}; no paper number (Concept World is this book's)",
        ),
        "home minus other habitat top-1": Reported(
            gap, gap_low, gap_high, chance=0.0, note=f"{where}; 0 means no habitat shortcut"
        ),
        "habitat reliance (margin drop)": Reported(
            float(habitat["value"]),
            float(habitat["low"]),
            float(habitat["high"]),
            chance=0.0,
            note=f"{model_label(ch.params)}; bootstrap over {int(habitat['n_images'])} prototypical creatures; "
            "0 for a model that ignores the habitat",
        ),
    }


def summary(ch: Chapter, r: Result) -> list[str]:
    """Two or three sentences that answer the chapter's question (how well, and from what), then numbers."""
    res, head = results(ch, r), headline(ch, r)
    top1, gap = head["zero-shot top-1"], head["home minus other habitat top-1"]
    table = reliance_table(ch, r)
    top = table.drop(index="habitat").index[0]
    shortcut = (
        f"a habitat shortcut (the gap's interval [{gap.low:.1%}, {gap.high:.1%}] leaves out 0)"
        if excludes(gap.low, gap.high)
        else f"no gap beyond noise (the gap's interval [{gap.low:.1%}, {gap.high:.1%}] holds 0)"
    )
    label = model_label(ch.params)
    lines = [
        f"{label[0].upper() + label[1:]} classifies {res['n_test']} held-out creatures of {res['n_classes']} "
        f"classes with zero-shot top-1 {top1.value:.1%} (bootstrap interval {top1.low:.1%} to {top1.high:.1%}; "
        f"chance {res['chance_top1']:.1%}).",
        f"It is right {res['habitat_shortcut']['home habitat']:.1%} of the time when the creature is in its "
        f"home habitat and {res['habitat_shortcut']['other habitat']:.1%} when it is not (habitat_correlation "
        f"{res['habitat_correlation']}: {res['statistics']['home habitat share']:.1%} of test creatures are at "
        f"home): {shortcut}.",
        f"Changing one factor of a prototypical creature at a time, the true class's margin drops most, among "
        f"the parts, for the {top} ({table.loc[top, 'value']:.2f}); the habitat "
        f"({table.loc['habitat', 'value']:.2f}) ranks {res['habitat_rank']} of {res['n_factors']} factors. "
        "This measured reliance is the yardstick against which the later chapters' explanations are checked.",
    ]
    if res["train_seconds"] is not None:
        lines.append(f"Training took {res['train_seconds']:.0f} s for {res['train_steps']} steps.")
    return lines


# ---------------------------------------------------------------------------- figures
def training_curve(history: list[dict]) -> plt.Axes:
    """The contrastive loss per step, titled with the steps and (where recorded) the training seconds."""
    ax = plots.curve(history, "loss")
    seconds = history[-1].get("seconds")  # models trained before seconds were recorded have none
    took = "" if seconds is None else f", {seconds:.0f} s of training"
    ax.set_title(f"contrastive loss ({len(history)} steps{took})")
    return ax


def reliance_figure(table: pd.DataFrame) -> plt.Axes:
    """Mean margin drop per factor with 95 % intervals; the habitat in orange."""
    shown = table.iloc[::-1]
    y = np.arange(len(shown))
    colours = ["C1" if f == "habitat" else "C0" for f in shown.index]
    _, ax = plt.subplots(figsize=(6.5, 0.28 * len(shown) + 1))
    ax.barh(
        y,
        shown["value"],
        color=colours,
        xerr=[shown["value"] - shown["low"], shown["high"] - shown["value"]],
        capsize=2,
    )
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set(yticks=y, yticklabels=shown.index, xlabel="drop of the true class's logit margin")
    ax.set_title("what the model uses: one factor changed at a time", fontsize=10)
    return ax


def explorer_change(world: ConceptWorld, table: pd.DataFrame) -> dict[str, str]:
    """The explorer's first view: the first class's most relied-on part factor set to another value."""
    factor = next(f for f in table.index if f != "habitat" and f.split()[0] in world.classes[0].parts)
    part, attribute = factor.split()
    typical = world.classes[0].parts[part][attribute]
    other = next(v for v in ATTRIBUTES[attribute] if v != typical)
    return {"creature": world.class_names[0], "part": part, attribute: other}


def ontology_table(world: ConceptWorld) -> pd.DataFrame:
    """One row per class: its home habitat, behaviour and each part's typical attributes."""
    return pd.DataFrame(
        [
            {
                "class": c.name,
                "habitat": c.habitat,
                "behaviour": c.behaviour,
                **{p: " ".join(c.parts[p].values()) if p in c.parts else "—" for p in PARTS},
            }
            for c in world.classes
        ]
    )


# ---------------------------------------------------------------------------- exercises
def exercise_train_habitat(ch: Chapter, condition: str = "no-shortcut") -> dict[str, float]:
    """Seed 0 of chapter 7's planted CLIP of ``condition`` ('shortcut': every creature in its class's home
    habitat; 'no-shortcut': the habitat drawn at random), trained for ``exercise_steps`` steps of chapter 7's
    recipe, tested on no-shortcut test images, where the habitat says nothing about the class. With the
    default steps the key is chapter 7's, so the model is trained once for both chapters."""
    recipe = vd.planted_recipe(ch.train_cfg, steps=ch.params["exercise_steps"])
    (subject,) = vd.planted_models(
        ch.store, ch.world_cfg, recipe, [condition], 1, vd.PLANTED_BLIND, vd.PLANTED_CLASSES, progress=False
    )
    world = ConceptWorld(vd.planted_world("no-shortcut", ch.world_cfg, vd.PLANTED_BLIND, vd.PLANTED_CLASSES))
    test = world.sample(ch.params["n_test"], split="test")
    logits, acc = zero_shot(subject.clip, subject.tokenizer, test.images, test.labels, world.class_names)
    return {"top-1": acc["top1"], **habitat_shortcut(logits.argmax(1).numpy(), test, world)}


def exercise_test_habitat(ch: Chapter, habitat_correlation: float | None = None) -> dict[str, float]:
    """The chapter's CLIP on test images drawn with another habitat correlation (no retraining)."""
    world = (
        ch.world if habitat_correlation is None else ConceptWorld(ch.world_cfg, habitat_correlation=habitat_correlation)
    )
    clip, _, tokenizer, _ = ch.clip(progress=False)
    test = world.sample(ch.params["n_test"], split="test")
    _, acc = zero_shot(clip, tokenizer, test.images, test.labels, world.class_names)
    return {
        "top-1": acc["top1"],
        "home habitat share": float((test.habitats == world.home_habitats(test.labels)).mean()),
    }


def exercise_prompts(ch: Chapter, template: str | None = None) -> dict[str, float]:
    """Zero-shot accuracy of the chapter's CLIP with one prompt template instead of the ensemble."""
    clip, _, tokenizer, _ = ch.clip(progress=False)
    test = ch.world.sample(ch.params["n_test"], split="test")
    _, acc = zero_shot(
        clip,
        tokenizer,
        test.images,
        test.labels,
        ch.world.class_names,
        CLASS_PROMPTS if template is None else (template,),
    )
    return acc
