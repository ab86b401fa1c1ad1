"""Chapter 2, Descriptors: classification by description and explanation maps of descriptors.

The chapter asks two questions of a CLIP and its class descriptors: do descriptions classify better
than the bare class name, and do a descriptor's explanation maps point at the part it describes?
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import descriptors as desc
from ..chapter import Chapter, Param, Switch
from ..data import EvalSet, load_eval_set, spread_over_classes
from ..descriptors import CONCEPT_TEXTS, DescriptorSet
from ..models import class_text_weights, encode_images, topk_accuracy
from ..stats import bootstrap_interval, paired_difference_interval
from .report import Reported

NAME = "02_descriptors"
ZERO_SHOT = "class name only (zero-shot)"


def check_descriptor_source(value: str, params: dict) -> str | None:
    """The ``descriptors`` parameter: a problem in words, or None (checked before any work)."""
    if value == "oracle":
        return (
            None
            if params.get("dataset", "world") == "world"
            else (
                "'oracle' needs Concept World (dataset='world'); with real data pass a JSON file, 'hf:<model>' or "
                "'openai:<model>'"
            )
        )
    if value.startswith("hf:"):
        name = value[3:]
        looks_local = name.startswith((".", "/", "~"))
        return f"no language-model folder at {name!r}" if looks_local and not Path(name).expanduser().is_dir() else None
    if value.startswith("openai:"):
        env = params.get("llm_api_key_env") or "OPENAI_API_KEY"
        return None if os.environ.get(env) else f"'openai:' needs the API key in the environment variable {env}"
    return (
        None
        if Path(value).expanduser().is_file()
        else (
            f"no descriptor file {value!r} (relative paths start in notebooks/); or use 'oracle', 'hf:<model>', "
            "'openai:<model>'"
        )
    )


def _oracle(p: dict[str, Any]) -> bool:
    return p["descriptors"] == "oracle"


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub")),
    "data_root": Param(None, "dir", applies=lambda p: p["dataset"] != "world"),
    "descriptors": Param(
        "oracle",
        str,
        check=check_descriptor_source,
        help="'oracle' (world), a JSON file, 'hf:<model>' or 'openai:<model>'",
    ),
    "llm_base_url": Param(None, str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "llm_api_key_env": Param("OPENAI_API_KEY", str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "n_descriptors": Param(6, int, min=1),
    "fault_rate": Param(
        0.25, float, min=0.0, max=1.0, applies=_oracle, help="oracle: share of faulty descriptors in the maps section"
    ),
    "fault_rates": Param(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        list,
        item=float,
        min=0.0,
        max=1.0,
        applies=_oracle,
        help="oracle: the quality sweep",
    ),
    "concept_text": Param("bare", str, choices=CONCEPT_TEXTS, help="text of a descriptor's map"),
    "n_test": Param(500, int, min=1),
    "n_explain": Param(200, int, min=1, help="test images (spread over the classes) whose maps are scored"),
    "start_layer": Param(None, int, help="ViT relevance from this block; None: the last block only"),
}
SWITCHES: dict[str, Switch] = {
    "concept_text": Switch(
        "not stated",
        "bare",
        "text a descriptor's map is computed for: the bare descriptor "
        "(original DEAL code, train.py/load.py: category_name_inclusion=None) or "
        "'{class}, which has {descriptor}'",
        source="tangli-udel/DEAL:load.py#L40; tangli-udel/DEAL:loading_helpers.py#L48; "
        "tangli-udel/DEAL:train.py#L101-L107",
    ),
}


@dataclass
class Result:
    """What the chapter computed, filled cell by cell."""

    test: EvalSet | None = None
    descriptors: DescriptorSet | None = None
    features: torch.Tensor | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> top-1s
    hits: dict[str, np.ndarray] = field(default_factory=dict)  # row -> per-image hits (bootstrap units)
    explained: np.ndarray | None = None  # indices of the test images whose maps are scored
    maps: dict[str, tuple[dict[str, float], torch.Tensor, pd.DataFrame | None]] = field(default_factory=dict)
    every_block: dict[str, float] = field(default_factory=dict)  # map scores, relevance from block 0


def load_test(ch: Chapter) -> EvalSet:
    """The chapter's test images."""
    p = ch.params
    clip, preprocess, _, _ = ch.clip()
    with ch.stage("data"):
        return load_eval_set(
            clip,
            preprocess,
            p["n_test"],
            p["dataset"],
            p["data_root"],
            world=ch.world if ch.on_world else None,
            seed=p["seed"],
        )


def descriptor_set(ch: Chapter, test: EvalSet, fault_rate: float | None = None) -> DescriptorSet:
    """The chapter's descriptors (the oracle's at ``fault_rate``, default the parameter)."""
    p = ch.params
    return desc.get_descriptors(
        p["descriptors"],
        test.class_names,
        ch.store,
        ch.world if ch.on_world else None,
        n=p["n_descriptors"],
        seed=p["seed"],
        llm_base_url=p["llm_base_url"],
        fault_rate=p["fault_rate"] if fault_rate is None else fault_rate,
        llm_api_key_env=p["llm_api_key_env"],
    )


def sweep(ch: Chapter, ds: DescriptorSet) -> dict[str, DescriptorSet]:
    """The descriptor sets classified: the oracle at every ``fault_rates`` value, else the chapter's own."""
    p = ch.params
    if ch.on_world and p["descriptors"] == "oracle":
        return {
            f"oracle, fault rate {r:.2f}": desc.oracle_descriptors(ch.world, p["n_descriptors"], r, p["seed"])
            for r in p["fault_rates"]
        }
    return {str(p["descriptors"]): ds}


def _hits(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    return (logits.argmax(1) == torch.as_tensor(labels)).float().numpy()


def classify(
    ch: Chapter, test: EvalSet, features: torch.Tensor, sets: dict[str, DescriptorSet]
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Top-1 by the bare class name and by description (with and without the class name) for each set;
    and each row's per-image hits."""
    clip, _, tokenizer, _ = ch.clip()
    with ch.stage("classify"):
        zero_shot = features @ class_text_weights(clip, tokenizer, test.class_names, ("{}",)).T
        rows = {ZERO_SHOT: {"description_top1": topk_accuracy(zero_shot, test.labels, 1)}}
        hits = {ZERO_SHOT: _hits(zero_shot, test.labels)}
        for name, d in sets.items():
            rows[name] = desc.description_accuracy(features, clip, tokenizer, test.class_names, d, test.labels)
            for suffix, named in (("", True), ("_descriptors_only", False)):
                logits = desc.description_logits(features, clip, tokenizer, d.descriptors, test.class_names, named)
                hits[name + suffix] = _hits(logits, test.labels)
    return rows, hits


def _map_scores(
    ch: Chapter, test: EvalSet, ds: DescriptorSet, rows: np.ndarray, text: str, start_layer: int
) -> tuple[dict[str, float], torch.Tensor, pd.DataFrame | None]:
    """Map scores, maps and per-descriptor table of the chosen test images for one concept text and layer."""
    clip, _, tokenizer, _ = ch.clip()
    k = min(5, min(len(v) for v in ds.descriptors.values()))
    masks = test.masks[rows] if test.masks is not None else None
    with ch.stage("explain"):
        return desc.map_scores(
            clip, tokenizer, test.images[rows], test.labels[rows], test.class_names, ds, k, masks, text, start_layer
        )


def explain_maps(
    ch: Chapter, test: EvalSet, ds: DescriptorSet, rows: np.ndarray
) -> dict[str, tuple[dict[str, float], torch.Tensor, pd.DataFrame | None]]:
    """Map scores, maps and per-descriptor table of the chosen test images, for both concept texts."""
    return {t: _map_scores(ch, test, ds, rows, t, ch.params["start_layer"]) for t in CONCEPT_TEXTS}


def every_block(ch: Chapter, test: EvalSet, ds: DescriptorSet, rows: np.ndarray) -> dict[str, float]:
    """Map scores of the chapter's concept text with the relevance rule started at the first attention block
    (``start_layer=0``) instead of ``start_layer``; empty when the chapter already starts there."""
    if ch.params["start_layer"] == 0:
        return {}
    return _map_scores(ch, test, ds, rows, ch.params["concept_text"], 0)[0]


def explained_rows(ch: Chapter, test: EvalSet) -> np.ndarray:
    """The ``n_explain`` test images whose maps are scored: spread over the classes, not the first ones."""
    return spread_over_classes(test.labels, min(ch.params["n_explain"], len(test.labels)), ch.params["seed"])


def run(ch: Chapter, progress: bool = False) -> Result:
    """The chapter's work, cell by cell as in the notebook."""
    r = Result(test=load_test(ch))
    r.descriptors = descriptor_set(ch, r.test)
    r.features = encode_images(ch.clip()[0], r.test.images)
    r.accuracy, r.hits = classify(ch, r.test, r.features, sweep(ch, r.descriptors))
    r.explained = explained_rows(ch, r.test)
    r.maps = explain_maps(ch, r.test, r.descriptors, r.explained)
    r.every_block = every_block(ch, r.test, r.descriptors, r.explained)
    return r


def results(ch: Chapter, r: Result) -> dict:
    """The results JSON's ``results`` block."""
    swept = [n for n in r.accuracy if n != ZERO_SHOT]
    out = {
        "zero_shot_top1": r.accuracy[ZERO_SHOT]["description_top1"],
        "description_accuracy": {n: r.accuracy[n]["description_top1"] for n in swept},
        "descriptor_only_accuracy": {n: r.accuracy[n]["description_top1_descriptors_only"] for n in swept},
        "maps_by_concept_text": {t: s for t, (s, _, _) in r.maps.items()},
        "n_test": len(r.test.labels),
    }
    out["maps_relevance_from_block_0"] = r.every_block
    out["chance"] = 1 / len(r.test.class_names)
    out["n_explain"] = len(r.explained)
    out["description_minus_zero_shot"] = {
        n: dict(zip(("mean", "low", "high"), paired_difference_interval(r.hits[n], r.hits[ZERO_SHOT]))) for n in swept
    }
    per = r.maps[ch.params["concept_text"]][2]
    if per is not None:
        out["by_part"] = per.groupby("part")[["pointing game", "energy in mask", "part area"]].mean().to_dict("index")
        out["by_fault"] = per.groupby("fault")[["pointing game", "energy in mask"]].mean().to_dict("index")
    return out


def _boot(values: np.ndarray, chance: float | None, note: str, paper: float | None = None, stat=np.mean) -> Reported:
    low, high = bootstrap_interval(values, stat=stat)
    value = float(stat(np.asarray(values, dtype=float)))
    return Reported(value, min(low, value), max(high, value), chance, paper, note)


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """Top-1 by class name and by description, descriptors alone, and the maps' pointing game, each with
    a bootstrap interval over images and chance (1 / classes; a uniform map for the pointing game)."""
    chance = 1 / len(r.test.class_names)
    boot = "95 % bootstrap over test images"
    first, last = [n for n in r.accuracy if n != ZERO_SHOT][0], [n for n in r.accuracy if n != ZERO_SHOT][-1]
    out = {
        "zero-shot top-1 (bare class name)": _boot(
            r.hits[ZERO_SHOT], chance, boot + "; paper: another data set and model, not comparable"
        ),
        f"top-1 by description ({first})": _boot(r.hits[first], chance, boot),
        f"top-1, descriptors only ({last})": _boot(r.hits[last + "_descriptors_only"], chance, boot),
    }
    scores, _, per = r.maps[ch.params["concept_text"]]
    if per is not None:
        out["pointing game"] = _boot(
            per["pointing game"].to_numpy(),
            float(per["part area"].mean()),
            "95 % bootstrap over (image, descriptor) pairs; chance: a uniform map (the part's share of the image)",
        )
    return out


def summary(ch: Chapter, r: Result) -> list[str]:
    """Generated sentences that answer the opening question first, then the numbers."""
    res = results(ch, r)
    swept = list(res["description_accuracy"])
    zs, chance = res["zero_shot_top1"], res["chance"]
    lines = []
    for n in swept[:1]:
        d = res["description_minus_zero_shot"][n]
        finding = (
            "a difference outside its interval"
            if d["low"] > 0 or d["high"] < 0
            else "a difference inside its interval, so no finding: unlike the paper, descriptions add "
            "nothing measurable here"
        )
        lines.append(
            f"Classification by description ({n}) scores {res['description_accuracy'][n]:.3f} against "
            f"{zs:.3f} for the bare class name: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], "
            f"{finding}."
        )
    if len(swept) > 1:
        only = res["descriptor_only_accuracy"]
        named = res["description_accuracy"][swept[-1]]
        carries = (
            ": with the class name in every sentence, the class name carries the accuracy"
            if only[swept[-1]] < named
            else ""
        )
        lines.append(
            f"Without the class name the descriptors alone score {only[swept[0]]:.3f} ({swept[0]}) and "
            f"{only[swept[-1]]:.3f} ({swept[-1]}), against chance {chance:.3f} and {named:.3f} with the "
            f"class name{carries}."
        )
    maps = res["maps_by_concept_text"][ch.params["concept_text"]]
    if "pointing_game" in maps:
        lines.append(
            f"The maps' peak falls on the described part for {maps['pointing_game']:.3f} of part "
            f"descriptors, where a uniform map would get {maps['part_area']:.3f}."
        )
    if "pointing_game" in maps and "pointing_game" in r.every_block:
        lines.append(
            f"Starting the relevance rule at the first attention block instead of the last moves the "
            f"pointing game from {maps['pointing_game']:.3f} to {r.every_block['pointing_game']:.3f} and "
            f"disentanglability from {maps['disentanglability']:.3f} to "
            f"{r.every_block['disentanglability']:.3f}."
        )
    lines += [f"Zero-shot top-1 with the bare class name: {zs:.3f}."]
    lines += [
        f"By description ({n}): top-1 {res['description_accuracy'][n]:.3f}, descriptors only "
        f"{res['descriptor_only_accuracy'][n]:.3f}."
        for n in swept
    ]
    lines += [
        "Maps, "
        + "; ".join(
            f"{t} concept text: " + ", ".join(f"{m.replace('_', ' ')} {v:.3f}" for m, v in s.items())
            for t, s in res["maps_by_concept_text"].items()
        )
        + "."
    ]
    return lines


# ---------------------------------------------------------------------------- figures
def accuracy_figure(ch: Chapter, r: Result):
    """Top-1 against the oracle's fault rate: by description and descriptors only, with the zero-shot and
    chance lines (look for: the descriptors-only curve falling toward chance while the other stays flat)."""
    import matplotlib.pyplot as plt

    swept = [n for n in r.accuracy if n != ZERO_SHOT]
    oracle = ch.on_world and ch.params["descriptors"] == "oracle"
    x = ch.params["fault_rates"] if oracle else list(range(len(swept)))  # a file: one descriptor set
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (
        ("description_top1", "by description (with class name)"),
        ("description_top1_descriptors_only", "descriptors only"),
    ):
        ax.plot(x, [r.accuracy[n][key] for n in swept], "o-", label=label)
    ax.axhline(r.accuracy[ZERO_SHOT]["description_top1"], color="k", ls="--", lw=1, label="zero-shot (class name)")
    ax.axhline(1 / len(r.test.class_names), color="grey", ls=":", lw=1, label="chance")
    ax.set(xlabel="oracle fault rate" if oracle else "descriptor set", ylabel="top-1", ylim=(0, 1.02))
    if not oracle:
        ax.set_xticks(x, [Path(n).name for n in swept], fontsize=7)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def example_maps(ch: Chapter, r: Result, n: int = 4):
    """Maps of one explained image per class (rows) for each of its class's descriptors (columns), with the
    described part's mask outlined where Concept World has one."""
    from ..plots import heatmap_grid, mask_outlines

    scores, maps, _ = r.maps[ch.params["concept_text"]]
    show = np.arange(min(n, len(r.explained)))  # explained rows are spread over the classes
    rows = r.explained[show]
    k = maps.shape[1]
    fig = heatmap_grid(
        r.test.display[rows],
        maps[show].numpy(),
        row_titles=[r.test.class_names[r.test.labels[i]] for i in rows],
        col_titles=[f"descriptor {j + 1}" for j in range(k)],
    )
    if r.test.masks is not None:
        mask_outlines(
            fig, r.descriptors.first(k).part_masks(r.test.class_names, r.test.labels[rows], r.test.masks[rows])
        )
    return fig


# ---------------------------------------------------------------------------- exercises
def exercise(ch: Chapter) -> dict[str, float]:
    """Description accuracy on up to 200 test images, and map scores on ``n_explain`` of them (spread
    over the classes), with the chapter's parameters."""
    test = load_eval_set(
        ch.clip()[0],
        ch.clip()[1],
        min(200, ch.params["n_test"]),
        ch.params["dataset"],
        ch.params["data_root"],
        world=ch.world if ch.on_world else None,
        seed=ch.params["seed"],
    )
    ds = descriptor_set(ch, test)
    out = desc.description_accuracy(
        encode_images(ch.clip()[0], test.images), ch.clip()[0], ch.clip()[2], test.class_names, ds, test.labels
    )
    out.update(explain_maps(ch, test, ds, explained_rows(ch, test))[ch.params["concept_text"]][0])
    return out


def faults_exercise(ch: Chapter, fault_rate: float = 0.75):
    """The "more faults" exercise: it applies to the oracle only (a descriptor file has no fault rate)."""
    if ch.params["descriptors"] != "oracle":
        print(
            f"This exercise does not apply: descriptors={ch.params['descriptors']!r} is a fixed list, and "
            "fault_rate changes only the Concept World oracle's descriptors."
        )
        return None
    return ch.exercise("more faults", exercise, fault_rate=fault_rate)


__all__ = ["NAME", "PARAMETERS", "SWITCHES", "Result", "headline", "results", "run", "summary"]
