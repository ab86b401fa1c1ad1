"""Chapter 7, the verdict: parameters, the chapter's run, its scoreboard, conclusion, results and summary.

The protocol is :mod:`conceptlab.verdict` (planted models, measures, nulls, tests) and the explainers
:mod:`conceptlab.explainers`; this module is their client (the contract is in :mod:`conceptlab.chapters`).
The notebook calls, in order: :func:`sanity` (the model-only checks on the chapter's own CLIP, a user's
model included), then, with ``planted`` (the default), :func:`plant`, :func:`measure_truths`, :func:`tune`,
:func:`rows`, :func:`explain`, :func:`score`, :func:`randomise`, :func:`scoreboard` and :func:`conclusion`;
:func:`run` calls them all. :func:`intro_table` writes the book's headline table from every chapter's results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import explainers as xp
from .. import verdict as vd
from ..chapter import Chapter, Param, loaded_architecture
from ..data import load_eval_set
from ..models import class_text_weights
from ..reliance import FACTORS, Interventions
from ..world import HABITATS
from .report import Reported

NAME = "07_verdict"


CONDITIONS = ("shortcut", "no-shortcut", "blind")  # the verdict's planted models (not chapter 4's positive control)


def _check_conditions(value: list[str], p: dict[str, Any]) -> str | None:
    if set(value) <= set(CONDITIONS) and {"shortcut", "no-shortcut"} <= set(value):
        return None
    return f"got {value!r}: use 'shortcut', 'no-shortcut' and optionally 'blind'"


def planted_recipe_parameters(applies: Callable[[dict], bool] | None = None) -> dict[str, Param]:
    """The planted CLIPs' recipe as chapter parameters (chapter 4 declares them too, so that with the same
    values both chapters load the same stored models)."""
    r = vd.PLANTED_RECIPE
    return {
        "planted_steps": Param(
            r["steps"], int, min=1, applies=applies, help="training steps of each planted CLIP (verdict.PLANTED_RECIPE)"
        ),
        "planted_batch_size": Param(r["batch_size"], int, min=2, applies=applies),
        "planted_n_train": Param(r["n_train"], int, min=64, applies=applies, help="training images of a planted CLIP"),
        "planted_lr": Param(r["lr"], float, min=1e-6, applies=applies),
    }


PARAMETERS: dict[str, Param] = {
    "planted": Param(
        True, bool, help="run the planted-model sections (minutes; they do not depend on the model under study)"
    ),
    "dataset": Param(
        "world", str, choices=("world", "imagefolder", "cub"), help="images of the model-only sanity checks"
    ),
    "data_root": Param(None, "dir", applies=lambda p: p["dataset"] != "world", help="folder of a real data set"),
    "conditions": Param(
        list(CONDITIONS),
        list,
        item=str,
        check=_check_conditions,
        help="planted training conditions",
    ),
    "n_seeds": Param(3, int, min=1, help="planted models per condition"),
    "blind_factor": Param(vd.PLANTED_BLIND, str, choices=FACTORS[1:], help="the attribute a blind model never sees"),
    "planted_classes": Param(vd.PLANTED_CLASSES, int, min=2, max=len(HABITATS), help="classes of the planted worlds"),
    **planted_recipe_parameters(),
    "n_images": Param(256, int, min=8, help="prototypical test images per model (interventions, explanations)"),
    "n_bootstrap": Param(200, int, min=10, help="joint bootstrap resamples (seeds and images)"),
    "n_permutations": Param(200, int, min=10, help="draws of every permutation band"),
    "ranking_beta": Param(0.02, float, min=1e-4, help="KL coefficient of the reward ranking's policy"),
    "sae_n_corpus": Param(4096, int, min=256, help="DN-CBM: corpus images of the SAE and the probe"),
    "sae_epochs": Param(30, int, min=1),
    "probe_lambda": Param(None, float, min=0.0, help="DN-CBM probe's L1 weight; None: chapter 5's default probe"),
    "deal_steps": Param(20, int, min=0, help="DEAL fine-tuning steps of each planted model (0: no DEAL rows)"),
    "lavise_n_train": Param(1024, int, min=64, help="LaViSE: world images (with concept masks) that train the head"),
    "lavise_epochs": Param(5, int, min=1, help="LaViSE: training epochs of the explainer head"),
    "n_random_models": Param(2, int, min=1, help="randomisation check: models checked (first seed per condition)"),
    "n_random_images": Param(64, int, min=8, help="images of the randomisation checks (model-only and planted)"),
    "cascade": Param(
        [1, 3, 6],
        list,
        item=int,
        check=lambda v, p: None if v and min(v) >= 1 else "list stage counts >= 1",
        help="randomisation check: re-initialise this many top stages",
    ),
}
SWITCHES: dict = {}
REFERENCES = ("truth (measured)", "noise")
APART = ("KL-optimal reward ranking",)  # not EX2: kept apart from the methods (issue 20, item 5)
TUNED = ("class map (DEAL-tuned)", "descriptor maps (DEAL-tuned)")
METHOD_OF_ROW = {
    "class map (CLIP)": "DEAL",
    "descriptor maps (CLIP)": "DEAL",
    "class map (DEAL-tuned)": "DEAL",
    "descriptor maps (DEAL-tuned)": "DEAL",
    "DN-CBM": "DN-CBM",
    "LaViSE": "LaViSE",
    "KL-optimal reward ranking": "EX2",
}


@dataclass
class Result:
    """Everything chapter 7 computes, filled step by step (the notebook's cells, or :func:`run`)."""

    subjects: list[vd.Subject] = field(default_factory=list)
    truths: dict[str, Interventions] = field(default_factory=dict)
    check: pd.DataFrame | None = None
    recovered: dict[str, bool] = field(default_factory=dict)
    tuned: list[vd.Subject] = field(default_factory=list)
    tuned_truths: dict[str, Interventions] = field(default_factory=dict)
    methods: dict[str, xp.Method] = field(default_factory=dict)
    explanations: dict[str, dict[str, vd.Explanation]] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    randomisation: pd.DataFrame | None = None
    retest: dict[str, float] = field(default_factory=dict)
    lavise_explains: str = ""
    sanity: dict[str, vd.ModelOnlyCheck] = field(default_factory=dict)
    model_under_study: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the model under study
def sanity(ch: Chapter, r: Result) -> pd.DataFrame:
    """The model-only sanity checks of every map explainer of :data:`~conceptlab.explainers.MODEL_ONLY_MAPS`
    on the chapter's CLIP (``model``/``pretrained``; default chapter 1's world CLIP) and ``n_random_images``
    images of ``dataset`` (:func:`~conceptlab.verdict.model_only_check`); their table."""
    p = ch.params
    with ch.stage("sanity"):
        clip, preprocess, tokenizer, _ = ch.clip()
        world = ch.world if p["dataset"] == "world" else None
        test = load_eval_set(
            clip, preprocess, p["n_random_images"], p["dataset"], p["data_root"], world=world, seed=p["seed"]
        )
        texts = class_text_weights(clip, tokenizer, test.class_names)
        args = (clip, test.images, test.labels, texts, p["cascade"], p["n_bootstrap"], p["n_permutations"], p["seed"])
        r.sanity = {name: vd.model_only_check(maps, *args) for name, maps in xp.MODEL_ONLY_MAPS.items()}
    r.model_under_study = {
        "model": p["model"],
        "pretrained": p["pretrained"],
        "architecture": "world CLIP (chapter 1)" if p["model"] == "world" else loaded_architecture(p["model"], clip),
        "dataset": p["dataset"],
        "data_root": p["data_root"],
        "n_images": len(test.labels),
        "n_classes": len(test.class_names),
    }
    return sanity_table(r)


def sanity_table(r: Result) -> pd.DataFrame:
    """One row per explainer and comparison: the cascade, then the null band and the input null."""
    rows = []
    for name, c in r.sanity.items():
        for _, row in c.cascade.iterrows():
            rows.append({"explainer": name, **row.to_dict()})
        for what, (mean, low, high) in (
            ("two different images (null band)", c.band),
            ("shuffled pixels (null band)", c.shuffled),
            ("noise images (input null)", c.input_null),
        ):
            rows.append(
                {"explainer": name, "comparison": what, "top stage": "—", "similarity": mean, "low": low, "high": high}
            )
    table = pd.DataFrame(rows).set_index(["explainer", "comparison"])
    return table.astype({"stages re-initialised": "Int64"})


def sanity_figure(r: Result):
    """Similarity of each explainer's maps with the trained model's against the stages re-initialised
    (bootstrap intervals), the band of two different images' maps shaded, the noise images' level dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r.sanity), figsize=(4.5 * len(r.sanity), 3.2), sharey=True, squeeze=False)
    for ax, (name, c) in zip(axes[0], r.sanity.items()):
        t = c.cascade
        err = np.vstack([t.similarity - t.low, t.high - t.similarity]).clip(min=0)
        ax.errorbar(t["stages re-initialised"], t.similarity, yerr=err, marker="o", capsize=3, label="maps vs trained")
        ax.axhspan(c.band[1], c.band[2], color="tab:gray", alpha=0.3, label="two different images")
        ax.axhline(c.input_null[0], color="tab:red", ls="--", lw=1, label="noise images")
        ax.set(title=name, xlabel="top vision stages re-initialised", ylim=(min(-0.1, c.band[1] - 0.05), 1.05))
    axes[0][0].set_ylabel("Spearman rho over map pixels")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def sanity_sentences(r: Result) -> list[str]:
    """One generated sentence per explainer: does it follow the weights, does it depend on the input?"""
    lines = []
    for name, c in r.sanity.items():
        last = c.randomised
        verdict = (
            "inside or below the band, so the maps follow the weights"
            if c.follows_the_weights
            else "above the band: the maps survive re-initialisation, so they do not follow the weights"
        )
        noise = (
            "inside or below the band (the maps depend on the image)"
            if c.input_dependent
            else "above the band (part of every map does not depend on the image)"
        )
        lines.append(
            f"The {name} on the model under study ({c.n_images} images): with all {c.n_stages} vision stages "
            f"re-initialised its maps keep a similarity of {last.similarity:.2f} [{last.low:.2f}, {last.high:.2f}] "
            f"with the trained model's, against {c.band[1]:.2f} to {c.band[2]:.2f} between the maps of two "
            f"different images: {verdict}. Its maps of noise images reach {c.input_null[0]:.2f} with those of "
            f"the real images, {noise}."
        )
    return lines


def section(ch: Chapter, title: str | None = None) -> bool:
    """Whether a planted-model section runs (``planted``); when it does not and ``title`` names the
    section, print why (later cells of a section pass no title)."""
    if ch.params["planted"] or title is None:
        return bool(ch.params["planted"])
    print(
        f"{title}: skipped (planted=False). This section trains and explains Concept World's planted models; "
        "it costs minutes and does not depend on the model under study."
    )
    return False


# ---------------------------------------------------------------------------- steps
def planted_recipe(ch: Chapter):
    """The planted models' training recipe: the chapter's CLIP recipe, shorter (see ``planted_*``)."""
    p = ch.params
    return vd.planted_recipe(
        ch.train_cfg,
        n_train=p["planted_n_train"],
        steps=p["planted_steps"],
        lr=p["planted_lr"],
        batch_size=p["planted_batch_size"],
    )


def plant(ch: Chapter, r: Result, progress: bool = True) -> pd.DataFrame:
    """Train (or load) the planted models; a table of what each one is."""
    p = ch.params
    with ch.stage("train"):
        r.subjects = vd.planted_models(
            ch.store,
            ch.world_cfg,
            planted_recipe(ch),
            p["conditions"],
            p["n_seeds"],
            p["blind_factor"],
            p["planted_classes"],
            progress=progress,
        )
    return pd.DataFrame(
        [
            {
                "model": s.name,
                "habitat correlation": s.key["world"]["habitat_correlation"],
                "blind": ", ".join(s.key["world"].get("blind", [])) or "—",
                "training steps": s.key["train"]["steps"],
            }
            for s in r.subjects
        ]
    ).set_index("model")


def measure_truths(ch: Chapter, r: Result) -> pd.DataFrame:
    """Measure every planted model's reliance and check that the planted answers are recovered."""
    p = ch.params
    with ch.stage("measure"):
        r.truths = vd.measure_all(r.subjects, p["n_images"], p["seed"], ch.store)
    r.check = vd.planted_check(r.truths, r.subjects, p["blind_factor"])
    r.recovered = vd.planted_recovered(r.check, p["planted_classes"])
    r.retest = {g: float(np.mean([vd.retest(t, g) for t in r.truths.values()])) for g in vd.GRANULARITIES}
    return pd.DataFrame({m: t.reliance() for m, t in r.truths.items()}).T


def tune(ch: Chapter, r: Result) -> None:
    """DEAL-tuned copies of every planted model, and their own measured reliance (what DEAL rows explain)."""
    p = ch.params
    if not p["deal_steps"]:
        return
    with ch.stage("train"):
        r.tuned = [xp.deal_subject(ch.store, s, p["deal_steps"], p["seed"]) for s in r.subjects]
    with ch.stage("measure"):
        r.tuned_truths = vd.measure_all(r.tuned, p["n_images"], p["seed"], ch.store)


def probe(ch: Chapter):
    """DN-CBM's probe: chapter 5's default (its sparse probe), with ``probe_lambda`` if given."""
    from .dncbm import default_probe_config

    cfg = replace(default_probe_config(), seed=ch.params["seed"])
    return cfg if ch.params["probe_lambda"] is None else replace(cfg, lam=ch.params["probe_lambda"])


def dncbm_scale() -> str:
    """The feature scale chapter 5's SAE and probe are defined on (its ``sae_scale`` default)."""
    from .dncbm import PARAMETERS as DNCBM

    return DNCBM["sae_scale"].default


def sae(ch: Chapter):
    """DN-CBM's SAE: chapter 5's default configuration, trained for the verdict's ``sae_epochs``."""
    from .dncbm import default_sae_config

    return replace(default_sae_config(), epochs=ch.params["sae_epochs"])


def rows(ch: Chapter, r: Result, yours: dict[str, xp.Method] | None = None) -> dict[str, xp.Method]:
    """The scoreboard's rows: the methods, the reward ranking (apart), ``yours``, then the references."""
    p = ch.params
    class_map = {"explainer": "class map"}
    descriptor_maps = {"explainer": "descriptor maps", "n_descriptors": 5}
    maps = {
        "class map (CLIP)": xp.map_method(xp.class_map_explainer, "the CLIP's map of its class text", class_map),
        "descriptor maps (CLIP)": xp.map_method(
            xp.descriptor_map_explainer, "the CLIP's maps of the class's descriptors", descriptor_maps
        ),
    }
    if p["deal_steps"]:
        maps |= {
            "class map (DEAL-tuned)": xp.map_method(
                xp.class_map_explainer, "the DEAL-tuned copy's map of its class text", class_map
            ),
            "descriptor maps (DEAL-tuned)": xp.map_method(
                xp.descriptor_map_explainer, "the DEAL-tuned copy's descriptor maps", descriptor_maps
            ),
        }
    maps["gradient × input"] = xp.map_method(
        xp.gradient_input_explainer, "gradient x input of the class logit", {"explainer": "gradient x input"}
    )
    r.methods = {
        **maps,
        "DN-CBM": xp.dncbm_method(p["sae_n_corpus"], sae(ch), probe(ch), dncbm_scale()),
        "LaViSE": xp.lavise_method(p["lavise_n_train"], p["lavise_epochs"]),
        "KL-optimal reward ranking": xp.reward_ranking_method(p["ranking_beta"]),
        **(yours or {}),
        "truth (measured)": xp.Method(
            xp.truth_explainer(ch.store, p["seed"]), "factor", "the measured reliance itself (the ceiling)"
        ),
        "noise": xp.Method(xp.noise_explainer, "factor", "random scores (chance)"),
    }
    r.lavise_explains = xp.lavise_target(r.subjects[0].clip)
    return r.methods


def _models(r: Result, name: str) -> tuple[list[vd.Subject], dict[str, Interventions]]:
    """The models a row explains and their truths: DEAL-tuned copies for the DEAL rows."""
    return (r.tuned, r.tuned_truths) if name in TUNED else (r.subjects, r.truths)


def explain(ch: Chapter, r: Result, progress: bool = False) -> None:
    """Every row's explanation of every model it explains."""
    from tqdm.auto import tqdm

    with ch.stage("explain"):
        for name, method in tqdm(r.methods.items(), desc="methods", disable=not progress):
            subjects, truths = _models(r, name)
            r.explanations[name] = {
                s.name: xp.explain_cached(ch.store, method, s, truths[s.name].base) for s in subjects
            }


def score(ch: Chapter, r: Result) -> None:
    """Tests (a) and (b) for every row, on one joint bootstrap plan over seeds and images."""
    p = ch.params
    conditions = {s.name: s.condition for s in r.subjects}
    plan = vd.bootstrap_plan(conditions, p["n_images"], p["n_bootstrap"], p["seed"])
    with ch.stage("score"):
        for name, method in r.methods.items():
            r.scores[name] = _score_row(ch, r, name, method, plan)


def _strongest_null(
    method: xp.Method, subjects: list[vd.Subject], truths: dict[str, Interventions], truth: dict[str, np.ndarray]
) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """The row's null that agrees best with the truth (its conversion's most favourable uninformative input)."""
    if method.null is None:
        return None, None
    nulls: dict[str, dict[str, np.ndarray]] = {}
    for s in subjects:
        for label, scores in method.null(s, truths[s.name].base).items():
            nulls.setdefault(label, {})[s.name] = vd.at_granularity(scores, method.granularity)
    label = max(nulls, key=lambda k: np.mean([vd.profile_rho(nulls[k][m], truth[m]) for m in nulls[k]]))
    return label, nulls[label]


def _score_row(ch: Chapter, r: Result, name: str, method: xp.Method, plan: vd.Plan) -> dict:
    p, g = ch.params, method.granularity
    subjects, truths = _models(r, name)
    expl = r.explanations[name]
    scores = {m: vd.at_granularity(e.scores, g) for m, e in expl.items()}
    truth = {m: vd.truth_scores(t, g) for m, t in truths.items()}
    label, null = _strongest_null(method, subjects, truths, truth)
    out: dict[str, Any] = {"granularity": g, "null": label, "agreement": vd.agreement(scores, truth, plan, null)}
    out["band"] = dict(zip(("mean", "low", "high"), vd.agreement_band(scores, truth, p["n_permutations"], p["seed"])))
    oracle = {s.name: vd.oracle_scores(truths[s.name], g, s.world) for s in subjects}
    out["oracle"] = float(np.mean([vd.profile_rho(oracle[m], truth[m]) for m in oracle]))
    rel = {m: vd.relative_scores(e.scores, g) for m, e in expl.items()}
    by = {c: {s.seed: s.name for s in subjects if s.condition == c} for c in p["conditions"]}
    column = {"habitat": FACTORS.index("habitat"), "blind": FACTORS.index(p["blind_factor"])}
    pairs = {"habitat": ("shortcut", "no-shortcut"), "blind": ("blind", "no-shortcut")}
    for test, (a, b) in pairs.items():
        if a in by:
            j = column[test]
            out[test] = vd.paired_test(
                {k: rel[m][:, j] for k, m in by[a].items()},
                {k: rel[m][:, j] for k, m in by[b].items()},
                p["n_bootstrap"],
                p["seed"],
                p["n_permutations"],
            )
            out[test]["detected"] = vd.detected(out[test], +1 if test == "habitat" else -1)
    return out


def randomise(ch: Chapter, r: Result) -> pd.DataFrame:
    """(c) For every row, on the first model of each of the first ``n_random_models`` conditions: the
    factor-score similarity of its explanation after re-initialising the top stages, against its band."""
    p = ch.params
    frames = []
    with ch.stage("explain"):
        for name, method in r.methods.items():
            subjects, _ = _models(r, name)
            checked = [next(s for s in subjects if s.condition == c) for c in p["conditions"][: p["n_random_models"]]]
            for s in checked:
                batch = r.truths[s.name].base.first(p["n_random_images"])
                ref = vd.Explanation(r.explanations[name][s.name].scores[: p["n_random_images"]])
                counted = [k for k in p["cascade"] if k >= method.counted_from(s.clip)]
                if counted:  # only stages at or below what the row explains
                    explain = partial(xp.explain_cached, ch.store, method)
                    frame = vd.randomisation_check(explain, s, batch, counted, p["seed"], ref)
                    frames.append(frame.assign(row=name))
    r.randomisation = pd.concat(frames, ignore_index=True)
    for name in r.methods:
        sim = r.randomisation[r.randomisation.row == name]
        if sim.empty:  # no cascade stage reaches what this row explains
            continue
        bands = [
            vd.similarity_band(r.explanations[name][m].scores, p["n_permutations"], p["seed"])
            for m in sim.model.unique()
        ]
        r.scores[name]["randomisation"] = {
            "similarity": float(sim.similarity.mean()),
            "band_high": float(np.mean([b[2] for b in bands])),
            "band_low": float(np.mean([b[1] for b in bands])),
        }
        r.scores[name]["randomisation"]["follows the weights"] = bool(
            r.scores[name]["randomisation"]["similarity"] <= r.scores[name]["randomisation"]["band_high"]
        )
    return r.randomisation


# ---------------------------------------------------------------------------- tables and words
def scoreboard(r: Result) -> pd.DataFrame:
    """One row per explainer: (a) at its granularity (rho, interval, its null, the gain over it, the
    oracle's ceiling, the permutation band), (b) the two paired tests, (c) the randomisation check."""
    out = {}
    for name, s in r.scores.items():
        a, row = s["agreement"], {"granularity": s["granularity"], "null": s["null"]}
        row |= {
            "(a) rho": a["rho"],
            "(a) low": a["low"],
            "(a) high": a["high"],
            "(a) null": a.get("null"),
            "(a) gain": a.get("gain"),
            "(a) gain low": a.get("gain_low"),
            "(a) gain high": a.get("gain_high"),
            "(a) oracle": s["oracle"],
            "(a) chance band high": s["band"]["high"],
        }
        for test in ("habitat", "blind"):
            if test in s:
                row |= {
                    f"(b) {test}": s[test]["diff"],
                    f"(b) {test} low": s[test]["low"],
                    f"(b) {test} high": s[test]["high"],
                    f"(b) {test} detected": s[test]["detected"],
                }
        if "randomisation" in s:
            c = s["randomisation"]
            row |= {
                "(c) similarity": c["similarity"],
                "(c) band high": c["band_high"],
                "(c) follows the weights": c["follows the weights"],
            }
        out[name] = row
    return pd.DataFrame.from_dict(out, orient="index")


def scoreboard_figure(r: Result):
    """The scoreboard as a figure: (a) each row's gain over its own null, and the two planted tests (b) as
    paired differences, each with its 95 % interval; a bar whose interval misses 0 registers the property."""
    import matplotlib.pyplot as plt

    board = scoreboard(r)
    panels = [("(a) gain", "(a) agreement: gain over the row's null")]
    panels += [(f"(b) {t}", f"(b) {t}: planted minus no-shortcut") for t in ("habitat", "blind") if f"(b) {t}" in board]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(board) + 1.5), sharey=True)
    for ax, (col, title) in zip(np.atleast_1d(axes), panels):
        value = board[col].astype(float)
        err = np.abs(np.vstack([value - board[f"{col} low"].astype(float), board[f"{col} high"].astype(float) - value]))
        ax.barh(board.index, value, xerr=np.nan_to_num(err), color="tab:blue", alpha=0.7, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.tight_layout()
    return fig


def what_is_explained(r: Result) -> pd.DataFrame:
    """Under the scoreboard: what each row explains, at which granularity, scored against which truth."""
    return pd.DataFrame(
        {
            name: {
                "explains": m.explains,
                "granularity": m.granularity,
                "scored against": "the DEAL-tuned copy's own reliance"
                if name in TUNED
                else "the planted model's reliance",
            }
            for name, m in r.methods.items()
        }
    ).T


def _gain_above(s: dict) -> bool:
    a = s["agreement"]
    return "gain_low" in a and a["gain_low"] > 0


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def conclusion(r: Result) -> list[str]:
    """The chapter's verdict in sentences, generated from the scores (never by hand)."""
    methods = [m for m in r.scores if m not in REFERENCES and m not in APART]
    s = r.scores
    beyond = [m for m in methods if _gain_above(s[m])]
    lines = [
        f"(a) Agreement beyond the method's own null (gain interval above 0): {len(beyond)} of {len(methods)} "
        f"rows ({_names(beyond)}). The oracle reaches {min(s[m]['oracle'] for m in methods):.2f} or more "
        f"through every conversion; the measurement's own test–retest ceiling is "
        f"{r.retest['factor']:.2f} per factor and {r.retest['region']:.2f} per region."
    ]
    for test, what, planted in (
        ("habitat", "the habitat shortcut", "shortcut"),
        ("blind", "the blinded factor", "blind"),
    ):
        if not any(test in s[m] for m in methods):
            continue
        found = [m for m in methods if s[m][test]["detected"]]
        truth = s["truth (measured)"][test]
        lines.append(
            f"(b) {what.capitalize()} ({planted} minus no-shortcut models, same images): detected by "
            f"{len(found)} of {len(methods)} rows ({_names(found)}); the measured reliance itself moves "
            f"by {truth['diff']:.3f} [{truth['low']:.3f}, {truth['high']:.3f}]"
            + (
                ", and noise stays inside its band."
                if _inside(s["noise"][test])
                else ", and noise does not stay inside its band (too few images or seeds)."
            )
        )
    if all("randomisation" in s[m] for m in methods):
        stays = [m for m in methods if not s[m]["randomisation"]["follows the weights"]]
        noise = s.get("noise", {}).get("randomisation", {}).get("follows the weights")
        lines.append(
            f"(c) Randomisation: {len(stays)} of {len(methods)} rows keep an explanation more similar "
            f"than a shuffled one when the weights they explain are re-initialised ({_names(stays)})"
            + ("; noise passes this check too, so passing it is necessary, not sufficient." if noise else ".")
        )
    for m in APART:
        if m in s:
            a = s[m]["agreement"]
            lines.append(
                f"Apart: the {m} (EX2's objective without its language model, RL or judge) has "
                f"(a) rho {a['rho']:.2f}, gain {a['gain']:.2f} [{a['gain_low']:.2f}, {a['gain_high']:.2f}] "
                f"over its flat-reward null; it is not a test of EX2."
            )
    return lines


def _inside(test: dict) -> bool:
    return bool(test["band_low"] <= test["diff"] <= test["band_high"])


def verdicts(r: Result) -> dict[str, str]:
    """A short verdict per row, in words, from its tests."""
    out = {}
    for name, s in r.scores.items():
        parts = ["agrees beyond its null" if _gain_above(s) else "no agreement beyond its null"]
        for test, label in (("habitat", "habitat shortcut"), ("blind", "blinded factor")):
            if test in s:
                parts.append(f"{label} {'detected' if s[test]['detected'] else 'not detected'}")
        if "randomisation" in s:
            parts.append(
                "follows the weights" if s["randomisation"]["follows the weights"] else "fails the randomisation check"
            )
        out[name] = "; ".join(parts)
    return out


# ---------------------------------------------------------------------------- the contract
def run(ch: Chapter, progress: bool = False) -> Result:
    """The chapter's work, in the notebook's order."""
    r = Result()
    sanity(ch, r)
    if not ch.params["planted"]:
        return r
    plant(ch, r, progress=progress)
    measure_truths(ch, r)
    tune(ch, r)
    rows(ch, r)
    explain(ch, r)
    score(ch, r)
    randomise(ch, r)
    return r


def _plain(obj: Any) -> Any:
    """JSON-able copy (numpy numbers and bools to Python ones)."""
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def results(ch: Chapter, r: Result) -> dict:
    """The results JSON's ``results`` block: the scoreboard, every test with its intervals and per-model
    numbers, the planted check, the measured reliance and the randomisation cascade; first the model under
    study and its model-only sanity checks (the only block when ``planted`` is False)."""
    first = {
        "model_under_study": r.model_under_study,
        "sanity": {name: c.to_dict() for name, c in r.sanity.items()},
        "planted": ch.params["planted"],
    }
    if not ch.params["planted"]:
        return _plain(first)
    measured = pd.DataFrame({m: t.reliance() for m, t in r.truths.items()}).T
    board = scoreboard(r).astype(object)
    return _plain(
        {
            **first,
            "scoreboard": board.where(board.notna(), None).to_dict(orient="index"),
            "scores": r.scores,
            "verdicts": verdicts(r),
            "what_is_explained": what_is_explained(r).to_dict(orient="index"),
            "planted_check": r.check.reset_index().to_dict("records"),
            "recovered": r.recovered,
            "retest": r.retest,
            "measured_reliance": measured.to_dict(orient="index"),
            "randomisation": r.randomisation.to_dict("records"),
            "lavise_explains": r.lavise_explains,
        }
    )


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """Per model-only explainer: the similarity of its maps after re-initialising every vision stage, with
    its interval, chance the band of two different images; per method row: (a) as the gain of Spearman's rho
    over the method's own null, with its interval."""
    out = {}
    for name, c in r.sanity.items():
        last = c.randomised
        out[f"{name}: similarity after re-initialising every vision stage"] = Reported(
            float(last.similarity),
            float(last.low),
            float(last.high),
            chance=c.band[0],
            note=f"Spearman's rho over map pixels, mean over {c.n_images} images of the model under study, bootstrap "
            "over images; chance: the maps of two different images; no paper number",
        )
    for name, s in r.scores.items():
        a = s["agreement"]
        if name in REFERENCES or "gain" not in a:
            continue
        out[f"{name}: (a) gain over its null"] = Reported(
            a["gain"],
            a["gain_low"],
            a["gain_high"],
            chance=0.0,
            note=f"rho {a['rho']:.2f} minus its {s['null']}'s {a['null']:.2f}; joint bootstrap over seeds and "
            "images; no paper number (the papers do not test against planted models)",
        )
    return out


def summary(ch: Chapter, r: Result) -> list[str]:
    """The chapter's answer, generated from the results."""
    p = ch.params
    if not p["planted"]:
        return [*sanity_sentences(r), "The planted-model sections were skipped (planted=False)."]
    ok = all(r.recovered.values())
    return [
        f"The measurement {'recovers' if ok else 'does not recover'} every planted answer on "
        f"{len(r.subjects)} planted models ({p['n_seeds']} per condition, {p['n_images']} images each).",
        *conclusion(r),
        f"LaViSE explained {r.lavise_explains}; the DEAL rows explain {p['deal_steps']}-step tuned copies, "
        "scored against their own reliance.",
        *sanity_sentences(r),
    ]


# ---------------------------------------------------------------------------- exercises
def _loaded(ch: Chapter) -> Result:
    r = Result()
    plant(ch, r, progress=False)
    measure_truths(ch, r)
    return r


def exercise_area(ch: Chapter, area_normalised: bool = True) -> dict[str, float]:
    """The CLIP class map's habitat test with raw energy shares (``area_normalised=False``) or normalised."""
    r = _loaded(ch)
    method = xp.map_method(
        lambda s, b: vd.Explanation(vd.map_factor_scores(xp.class_map_explainer(s, b).maps, b, area_normalised)),
        "class map",
    )
    r.methods = {"class map": method}
    explain(ch, r)
    score(ch, r)
    s = r.scores["class map"]
    return {
        "(a) rho": s["agreement"]["rho"],
        "(b) habitat": s["habitat"]["diff"],
        "(b) habitat low": s["habitat"]["low"],
        "(b) habitat high": s["habitat"]["high"],
    }


def exercise_noisy_truth(ch: Chapter, noise_level: float = 0.0) -> dict[str, float]:
    """The true reliance plus Gaussian noise of ``noise_level`` times its own spread, as an explainer."""
    r = _loaded(ch)
    rng = np.random.default_rng(ch.params["seed"])
    noisy = {
        m: t.drops + noise_level * np.nanstd(t.drops) * rng.standard_normal(t.drops.shape) for m, t in r.truths.items()
    }
    r.methods = {"noisy truth": xp.Method(lambda s, b: vd.Explanation(noisy[s.name]), "factor", "noisy truth")}
    explain(ch, r)
    score(ch, r)
    s = r.scores["noisy truth"]
    return {
        "(a) rho": s["agreement"]["rho"],
        "(a) low": s["agreement"]["low"],
        "(a) high": s["agreement"]["high"],
        "(b) habitat": s["habitat"]["diff"],
        "(b) habitat low": s["habitat"]["low"],
    }


def exercise_fewer_images(ch: Chapter) -> dict[str, float]:
    """The CLIP class map's (a) interval width and habitat test at the chapter's ``n_images``."""
    r = _loaded(ch)
    r.methods = {"class map": xp.map_method(xp.class_map_explainer, "class map")}
    explain(ch, r)
    score(ch, r)
    s = r.scores["class map"]
    return {
        "(a) rho": s["agreement"]["rho"],
        "(a) interval width": s["agreement"]["high"] - s["agreement"]["low"],
        "(b) habitat interval width": s["habitat"]["high"] - s["habitat"]["low"],
    }


# ---------------------------------------------------------------------------- the book's intro table
INTRO = {  # method -> (what it claims, its chapter, the headline measure to show, if the chapter has it)
    "DEAL": ("fine-tuning makes concept maps disentangled and localised, and accuracy rises", "03_deal"),
    "EX2": ("RL-aligned descriptions reveal which text features the VLM prefers", "04_ex2"),
    "DN-CBM": ("SAE concepts, named from a vocabulary, explain a sparse bottleneck", "05_discover_then_name"),
    "LaViSE": ("a filter's function can be named in open-vocabulary words", "06_lavise"),
}


def _chapter_number(record: dict) -> tuple[str, str]:
    """``(paper, this book)`` from a chapter's headline: its first number with a paper value."""
    for label, h in (record.get("headline") or {}).items():
        if isinstance(h, dict) and h.get("paper") is not None:
            return f"{label}: {h['paper']:.3f}", f"{h['value']:.3f}"
    for label, h in (record.get("headline") or {}).items():
        if isinstance(h, dict) and "value" in h:
            return "—", f"{label}: {h['value']:.3f}"
    return "—", "—"


def intro_table(results_dir: Path) -> str:
    """The book's headline (Markdown): one row per method, what it claims, the paper's number, this book's
    number on the world, and the verdict of chapter 7 (its rows for that method)."""
    results_dir = Path(results_dir)
    records = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("[0-9][0-9]_*.json")}
    verdict = (records.get(NAME) or {}).get("results", {}).get("verdicts", {})
    lines = [
        "| method | what it claims | paper | this book, on Concept World | verdict (chapter 7) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, (claim, stem) in INTRO.items():
        paper, book = _chapter_number(records.get(stem, {}))
        said = [f"*{row}*: {v}" for row, v in verdict.items() if METHOD_OF_ROW.get(row) == method]
        if method == "EX2":
            from .ex2 import planted_verdict

            tested = planted_verdict(records.get(stem, {}).get("results", {}))
            said = [tested] if tested else []
            said += [
                f"the verdict's {row} row is not EX2: it ranks true one-factor sentences by EX2's reward, "
                f"without EX2's language model ({v})"
                for row, v in verdict.items()
                if METHOD_OF_ROW.get(row) == method
            ]
        lines.append(f"| {method} | {claim} | {paper} | {book} | {'<br>'.join(said) or 'chapter 7 not run'} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "NAME",
    "PARAMETERS",
    "SWITCHES",
    "Result",
    "conclusion",
    "exercise_area",
    "exercise_fewer_images",
    "exercise_noisy_truth",
    "explain",
    "headline",
    "intro_table",
    "measure_truths",
    "plant",
    "probe",
    "randomise",
    "results",
    "rows",
    "run",
    "sanity",
    "sanity_figure",
    "sanity_sentences",
    "sanity_table",
    "score",
    "scoreboard",
    "section",
    "summary",
    "tune",
    "verdicts",
    "what_is_explained",
]
