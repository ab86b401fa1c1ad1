"""Chapter 3, DEAL: does fine-tuning with DEAL's losses make concept maps disentangled and localized, and
what does it cost in accuracy?

The method is :mod:`conceptlab.deal` (losses, training, evaluation); this module holds the chapter's
parameters, switches, runs over seeds, tables, figures, results and summary.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..artifacts import atomic_write_bytes
from ..chapter import Chapter, Param, Switch
from ..data import EvalSet, load_eval_set, load_train_test, spread_over_classes
from ..deal import (
    CONTRASTIVE,
    LOCALIZABILITY,
    ZERO_SHOT_PROMPTS,
    DealConfig,
    array_batches,
    deal_clip,
    evaluate,
    weight_change,
)
from ..descriptors import CONCEPT_TEXTS, DescriptorSet, descriptor_text_features, get_descriptors
from ..explain import explain
from ..metrics import disentanglability
from ..sae import tensor_fingerprint
from ..stats import bootstrap_interval, seed_interval
from .descriptors import check_descriptor_source
from .report import Reported, versus_chance

NAME = "03_deal"
# The paper's headline, ViT-B/32 on ImageNet (before -> after DEAL), Table 1 of li2024deal.
PAPER = {"disentanglability": (0.361, 0.397), "localizability": (0.633, 0.673), "top1": (0.632, 0.708)}
PAPER_RUN = "DEAL, maps trained (paper)"
DETACHED_RUN = "DEAL, maps detached (original code)"
NO_SEP_RUN = "DEAL without L_sep (λ_sep = 0)"
ORIGINAL_RUN = "DEAL, maps detached, per-image contrastive (original code)"
RUN_KEYS = {
    "CLIP": "clip",
    PAPER_RUN: "deal_maps_trained",
    DETACHED_RUN: "deal_maps_detached",
    ORIGINAL_RUN: "deal_original_training",
    NO_SEP_RUN: "deal_no_separation",
    "DEAL checkpoint": "deal_checkpoint",
}
LOSSES = ("contrastive", "separation", "consistency", "sparsity")
SEED_METRICS = ("disentanglability", "pointing_game", "top1", "localizability")


def _check_descriptors(value: str, p: dict[str, Any]) -> str | None:
    return check_descriptor_source(value, {**p, "dataset": p.get("dataset", "world")})


def _real(p: dict[str, Any]) -> bool:
    return p["dataset"] != "world"


def _trains(p: dict[str, Any]) -> bool:
    return p["deal_steps"] > 0


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub"), help="evaluation data set"),
    "data_root": Param(None, "dir", applies=_real, help="test images of a real data set"),
    "train_root": Param(
        None,
        "dir",
        applies=lambda p: p["dataset"] == "imagefolder" and _trains(p),
        help="training images (ImageFolder, the same class folders as data_root); default: data_root",
    ),
    "n_train": Param(2000, int, min=1, applies=_trains, help="training images DEAL draws its batches from"),
    "n_test": Param(400, int, min=1),
    "n_localize": Param(48, int, min=0, help="test images for localizability (K x 5 forward passes each)"),
    "descriptors": Param(
        "oracle", str, check=_check_descriptors, help="'oracle' (world), a JSON file, 'hf:<model>' or 'openai:<model>'"
    ),
    "fault_rate": Param(0.0, float, min=0.0, max=1.0, applies=lambda p: p["descriptors"] == "oracle"),
    "llm_base_url": Param(None, str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "llm_api_key_env": Param("OPENAI_API_KEY", str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "n_concepts": Param(5, int, min=1, help="K descriptors per class (the original: 5)"),
    "concept_text": Param("bare", str, choices=CONCEPT_TEXTS),
    "detach_maps": Param(
        False, bool, applies=_trains, help="True: the original code's detached maps (map losses inert)"
    ),
    "contrastive": Param("per_class", str, choices=CONTRASTIVE, applies=_trains),
    "zero_shot_prompts": Param("bare", str, choices=tuple(ZERO_SHOT_PROMPTS)),
    "localizability_headline": Param("correct", str, choices=tuple(LOCALIZABILITY)),
    "lambda_sep": Param(0.1, float, min=0.0, applies=_trains),
    "lambda_con": Param(0.01, float, min=0.0, applies=_trains),
    "lambda_spa": Param(0.0005, float, min=0.0, applies=_trains),
    "deal_lr": Param(1e-4, float, min=1e-12, applies=_trains),
    "deal_batch_size": Param(16, int, min=1, applies=_trains),
    "deal_steps": Param(40, int, min=0, help="fine-tuning steps of every seed; 0 evaluates only"),
    "deal_seeds": Param(
        [0, 1, 2],
        list,
        item=int,
        min=0,
        applies=_trains,
        help="training seeds of the loss-term breakdown (intervals over seeds); []: skip",
    ),
    "text_augmentation": Param(True, bool, applies=_trains, help="rich labels '{class}. It may contain ...' for L_ctr"),
    "freeze_text": Param(False, bool, applies=_trains),
    "eval_mode": Param(True, bool, applies=_trains),
    "start_layer": Param(None, int, help="ViT relevance from this block; None: the last block only"),
    "deal_checkpoint": Param(
        None, "file", help="a fine-tuned checkpoint (the original's released format) evaluated beside the base model"
    ),
    "compare_lr": Param(
        [5e-7],
        list,
        item=float,
        applies=_trains,
        help="learning rates trained for ablation_steps beside deal_lr, to measure what they move; []: skip",
    ),
    "ablation_lambda_sep": Param([0.0, 0.1], list, item=float, applies=_trains, help="[]: no ablation"),
    "ablation_lambda_con": Param([0.01], list, item=float, applies=_trains),
    "ablation_steps": Param(20, int, min=1, applies=_trains),
    "exercise_steps": Param(20, int, min=1, help="fine-tuning steps of each exercise run"),
    "n_show": Param(4, int, min=1, help="classes in the heat-map grids"),
}
SWITCHES: dict[str, Switch] = {
    "concept_text": Switch(
        "not stated",
        "bare",
        "text a descriptor's map is computed for: the bare descriptor "
        "(original code, train.py/load.py: category_name_inclusion=None) or "
        "'{class}, which has {descriptor}'",
        source="tangli-udel/DEAL:load.py#L40; tangli-udel/DEAL:loading_helpers.py#L48; "
        "tangli-udel/DEAL:train.py#L101-L107",
    ),
    "detach_maps": Switch(
        False,
        True,
        "the original code builds maps from detached attention and gradients "
        "(explainer.py, interpret; gradCAM, which train.py calls for ResNets, freezes the visual weights): "
        "its map losses carry no gradient",
        source="tangli-udel/DEAL:explainer.py#L66-L67; tangli-udel/DEAL:explainer.py#L151-L155; "
        "tangli-udel/DEAL:train.py#L119-L137",
    ),
    "contrastive": Switch(
        "not stated",
        "per_image",
        "same-class texts in a batch: negatives (original code, train.py) or one shared text per class",
        source="tangli-udel/DEAL:train.py#L149-L152",
    ),
    "zero_shot_prompts": Switch(
        "not stated",
        "bare",
        "zero-shot text: the bare class name (original code, load_eval.py) or a prompt ensemble",
        source="tangli-udel/DEAL:load_eval.py#L167-L169",
    ),
    "localizability_headline": Switch(
        "correct",
        "original_indexing_pairing",
        "the insertion metric in the "
        "headline: whole pixels of the right image, or the original notebook's "
        "indexing and image/map pairing (exp_localizability.ipynb; all three are "
        "reported)",
        source="tangli-udel/DEAL:exp_localizability.ipynb#L102-L118; "
        "tangli-udel/DEAL:exp_localizability.ipynb#L196-L202",
    ),
    "deal_lr": Switch(
        5e-7,
        5e-7,
        "learning rate (the original's ImageNet run, run.sh); the world CLIP needs "
        "more, see the learning-rate measurement",
        source="tangli-udel/DEAL:run.sh#L13",
    ),
    "deal_batch_size": Switch(
        256, 256, "batch size (the original's ImageNet run, run.sh)", source="tangli-udel/DEAL:run.sh#L4"
    ),
    "deal_steps": Switch(
        5000, 5000, "fine-tuning steps (the original's ImageNet run, run.sh)", source="tangli-udel/DEAL:run.sh#L12"
    ),
    "lambda_sep": Switch(
        0.1,
        0.1,
        "weight of L_sep (run.sh's ImageNet run; 0.05 is train.py's default)",
        source="tangli-udel/DEAL:run.sh#L9; tangli-udel/DEAL:train.py#L10",
    ),
    "eval_mode": Switch(
        True,
        True,
        "frozen normalisation statistics while training (run.sh's --eval)",
        source="tangli-udel/DEAL:run.sh#L14; tangli-udel/DEAL:train.py#L57-L58",
    ),
}
TRAINING_SWITCHES = (
    "detach_maps",
    "contrastive",
    "deal_lr",
    "deal_batch_size",
    "deal_steps",
    "lambda_sep",
    "eval_mode",
)


def switches(params: dict[str, Any]) -> dict[str, Switch]:
    """The switches that apply to a run: without fine-tuning (``deal_steps=0``) none of the training ones."""
    return {k: s for k, s in SWITCHES.items() if params["deal_steps"] > 0 or k not in TRAINING_SWITCHES}


# ---------------------------------------------------------------------------- data and runs
@dataclass
class DealData:
    """The chapter's training and test images, descriptors and part masks (world only)."""

    train: EvalSet
    test: EvalSet
    descriptors: DescriptorSet  # the first n_concepts of each class
    part_masks: np.ndarray | None


def load_data(ch: Chapter) -> DealData:
    """The chapter's data. A real training folder must hold the same classes as the test folder: checked
    first, before any model is loaded or trained."""
    p = ch.params
    if not ch.on_world and p["deal_steps"] > 0:
        load_train_test(p["dataset"], p["data_root"], p["train_root"])  # raises, naming the difference
    clip, preprocess, _, _ = ch.clip()
    world = ch.world if p["dataset"] == "world" else None
    with ch.stage("data"):
        train = load_eval_set(
            clip, preprocess, p["n_train"], p["dataset"], p["train_root"] or p["data_root"], "train", world, p["seed"]
        )
        test = load_eval_set(clip, preprocess, p["n_test"], p["dataset"], p["data_root"], "test", world, p["seed"])
        ds = get_descriptors(
            p["descriptors"],
            test.class_names,
            ch.store,
            world,
            n=max(6, p["n_concepts"]),
            fault_rate=p["fault_rate"],
            seed=p["seed"],
            llm_base_url=p["llm_base_url"],
            llm_api_key_env=p["llm_api_key_env"],
        ).first(p["n_concepts"])
    masks = ds.part_masks(test.class_names, test.labels, test.masks) if world is not None else None
    return DealData(train, test, ds, masks)


def config(params: dict[str, Any], **changes: Any) -> DealConfig:
    """The DealConfig of a chapter's parameters (``changes`` use the parameter names, and ``seed``)."""
    p = {**params, **changes}
    return DealConfig(
        lambda_sep=p["lambda_sep"],
        lambda_con=p["lambda_con"],
        lambda_spa=p["lambda_spa"],
        lr=p["deal_lr"],
        batch_size=p["deal_batch_size"],
        steps=p["deal_steps"],
        n_concepts=p["n_concepts"],
        start_layer=p["start_layer"],
        text_augmentation=p["text_augmentation"],
        freeze_text=p["freeze_text"],
        eval_mode=p["eval_mode"],
        concept_text=p["concept_text"],
        detach_maps=p["detach_maps"],
        contrastive=p["contrastive"],
        seed=p["seed"],
    )


def fine_tune(ch: Chapter, data: DealData, progress: bool = True, **changes: Any) -> tuple[nn.Module, list[dict]]:
    """DEAL on the chapter's CLIP with the chapter's parameters and ``changes``: (model, history), stored.
    ``changes`` may set ``seed``: the training seed (initial randomness and batches)."""
    clip, _, tokenizer, _ = ch.clip()
    p = ch.params
    cfg = config(p, **changes)
    key = ch.key(data={k: p[k] for k in ("dataset", "n_train", "seed")}, train_root=ch.inputs.get("train_root"))
    batches = array_batches(data.train.images, data.train.labels, cfg.batch_size, cfg.seed)
    with ch.stage("train"):
        return deal_clip(
            ch.store, key, clip, tokenizer, data.test.class_names, data.descriptors.descriptors, batches, cfg, progress
        )


def scores(
    ch: Chapter,
    model: nn.Module,
    data: DealData,
    n: int | None = None,
    localize: Sequence[str] = ("correct",),
    per_image: bool = False,
    references: bool = False,
    **changes: Any,
):
    """:func:`conceptlab.deal.evaluate` of ``model`` on the first ``n`` test images with the chapter's
    parameters and ``changes``: the metrics (and, with ``per_image``, the per-image values too).

    Kept in the store (kind ``deal_scores``, keyed by :func:`score_key`), so a rerun, or an exercise that
    scores a model the chapter already scored, reads the numbers back instead of computing the maps again."""
    p = {**ch.params, **changes}
    n = n or len(data.test.labels)
    settings = {k: p[k] for k in ("n_concepts", "start_layer", "concept_text", "n_localize", "zero_shot_prompts")}

    def build(d: Path) -> None:
        masks = None if data.part_masks is None else data.part_masks[:n]
        with ch.stage("evaluate"):
            metrics, _, values = evaluate(
                model,
                ch.clip()[2],
                data.test.images[:n],
                data.test.labels[:n],
                data.test.class_names,
                data.descriptors,
                part_masks=masks,
                localizability=localize,
                references=references,
                **settings,
            )
        buffer = io.BytesIO()
        np.savez(buffer, **values)
        atomic_write_bytes(d / "per_image.npz", buffer.getvalue())
        in_order = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # tables keep this order
        atomic_write_bytes(d / "metrics.json", json.dumps(in_order).encode())

    def load(d: Path) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        with np.load(d / "per_image.npz", allow_pickle=False) as values:
            return json.loads((d / "metrics.json").read_text()), dict(values)

    key = score_key(ch, model, data, n, {**settings, "localize": list(localize), "references": references})
    metrics, values = ch.store.get_or_build("deal_scores", key, build, load)
    return (metrics, values) if per_image else metrics


def score_key(ch: Chapter, model: nn.Module, data: DealData, n: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What a score depends on: the weights of the model scored (by content: the CLIP or any fine-tune), the
    first ``n`` test images, their labels and part masks, the class names and descriptors, the evaluation's
    settings, and the code that computes it (this module and the library modules of the evaluation)."""
    from .. import deal, descriptors, explain, metrics, models

    test = data.test
    code = {m.__name__: ch.store.fingerprint(inspect.getfile(m)) for m in (deal, descriptors, explain, metrics, models)}
    code["chapter"] = ch.store.fingerprint(__file__)
    return ch.key(
        scored=hashlib.sha256(
            "".join(f"{k}={tensor_fingerprint(v)};" for k, v in model.state_dict().items()).encode()
        ).hexdigest(),
        code=code,
        images=tensor_fingerprint(torch.as_tensor(test.images[:n])),
        labels=tensor_fingerprint(torch.as_tensor(np.asarray(test.labels[:n]))),
        masks=None if data.part_masks is None else tensor_fingerprint(torch.as_tensor(data.part_masks[:n])),
        class_names=list(test.class_names),
        descriptors=data.descriptors.descriptors,
        settings=settings,
    )


def evaluate_both_texts(ch: Chapter, model: nn.Module, data: DealData) -> dict[str, dict[str, float]]:
    """Scores with both concept texts; localizability (three ways) with the chapter's own."""
    return {
        t: scores(
            ch, model, data, concept_text=t, localize=tuple(LOCALIZABILITY) if t == ch.params["concept_text"] else ()
        )
        for t in CONCEPT_TEXTS
    }


def fine_tune_runs(ch: Chapter, data: DealData, progress: bool = False) -> dict[str, tuple[nn.Module, list[dict]]]:
    """The chapter's fine-tunes at ``deal_steps``: the paper's maps trained and the original code's maps
    detached (everything else equal), then detached with the original's per-image contrastive loss too
    (train.py: same-class texts in a batch are negatives); a ``deal_checkpoint`` beside them."""
    p, runs = ch.params, {}
    if p["deal_steps"] > 0:
        for detach in (p["detach_maps"], not p["detach_maps"]):
            runs[DETACHED_RUN if detach else PAPER_RUN] = fine_tune(ch, data, progress, detach_maps=detach)
        if p["contrastive"] != "per_image":
            runs[ORIGINAL_RUN] = fine_tune(ch, data, progress, detach_maps=True, contrastive="per_image")
    if p["deal_checkpoint"] is not None:
        runs["DEAL checkpoint"] = (checkpoint_model(ch), [])
    return runs


def checkpoint_model(ch: Chapter) -> nn.Module:
    """The ``deal_checkpoint`` of the chapter, loaded into the chapter's architecture (any format
    :func:`conceptlab.models.load_clip` reads, the original's released ``model_state_dict`` file included)."""
    from ..models import load_clip

    p = ch.params
    name = ch.train_cfg.arch if p["model"] == "world" else p["model"]
    return load_clip(name, p["deal_checkpoint"], str(ch.device))[0]


BREAKDOWN = {
    PAPER_RUN: {"detach_maps": False},
    DETACHED_RUN: {"detach_maps": True},
    NO_SEP_RUN: {"detach_maps": False, "lambda_sep": 0.0},
}


def seed_runs(
    ch: Chapter, data: DealData, evals: dict[str, dict[str, dict[str, float]]]
) -> dict[str, list[dict[str, float]]]:
    """The loss-term breakdown over ``deal_seeds``: the paper's run, maps detached (L_ctr alone trains) and
    λ_sep = 0 (L_ctr, L_con and L_spa train), each at ``deal_steps``; scored with the chapter's concept text
    (localizability the correct way). Runs already scored in ``evals`` (the chapter's seed) are reused."""
    p, text = ch.params, ch.params["concept_text"]
    out: dict[str, list] = {}
    for name, change in BREAKDOWN.items() if p["deal_steps"] > 0 and p["deal_seeds"] else ():
        out[name] = []
        for s in p["deal_seeds"]:
            if s == p["seed"] and name in evals:
                out[name].append(evals[name][text])
                continue
            tuned, _ = fine_tune(ch, data, False, seed=s, **change)  # type: ignore[arg-type]
            out[name].append(scores(ch, tuned, data))
    return out


def learning_rates(ch: Chapter, data: DealData, before: dict[str, float]) -> pd.DataFrame:
    """Each of ``deal_lr`` and ``compare_lr`` trained for ``ablation_steps``: the relative change of the
    vision weights and of the scores."""
    p, clip = ch.params, ch.clip()[0]
    text_cols = [c for c in ("pointing_game",) if c in before]
    rows = {}
    for lr in [p["deal_lr"]] + p["compare_lr"] if p["compare_lr"] and p["deal_steps"] > 0 else []:
        tuned, _ = fine_tune(ch, data, False, deal_steps=p["ablation_steps"], deal_lr=lr)
        after = scores(ch, tuned, data, localize=())
        rows[lr] = {
            "relative weight change": weight_change(tuned, clip),
            **{f"Δ {c}": after[c] - before[c] for c in ("disentanglability", "top1", *text_cols)},
        }
    return pd.DataFrame(rows).T.rename_axis("learning rate")


def ablation(ch: Chapter, data: DealData) -> list[dict]:
    """A grid over λ_sep and λ_con at ``ablation_steps`` (λ_spa fixed), the paper's differentiable maps, each
    point trained with every seed of ``deal_seeds`` (the chapter's ``seed`` when there are none): a row per
    point and seed."""
    p, rows = ch.params, []
    for l_sep in p["ablation_lambda_sep"] if p["deal_steps"] > 0 else []:
        for l_con in p["ablation_lambda_con"]:
            for s in p["deal_seeds"] or [p["seed"]]:
                changes = {"deal_steps": p["ablation_steps"], "lambda_sep": l_sep, "lambda_con": l_con, "seed": s}
                tuned, _ = fine_tune(ch, data, False, **changes)
                rows.append(
                    {"lambda_sep": l_sep, "lambda_con": l_con, "seed": s, **scores(ch, tuned, data, localize=())}
                )
    return rows


def ablation_table(
    rows: list[dict], metrics: Sequence[str] = ("disentanglability", "pointing_game", "top1")
) -> pd.DataFrame:
    """The grid's rows over seeds: per (λ_sep, λ_con) the number of seeds and each metric as
    ``mean [low, high]`` (t interval over the seeds)."""
    table = pd.DataFrame(rows)
    out = {}
    for point, group in table.groupby(["lambda_sep", "lambda_con"]):
        cells: dict[str, Any] = {"seeds": len(group)}
        for m in (m for m in metrics if m in group):
            mean, low, high = seed_interval(group[m])
            cells[m] = f"{mean:.3f} [{low:.3f}, {high:.3f}]"
        out[point] = cells
    return pd.DataFrame(out).T.rename_axis(["lambda_sep", "lambda_con"])


# ---------------------------------------------------------------------------- the chapter's result
@dataclass
class Result:
    """What the chapter computed, filled cell by cell."""

    data: DealData | None = None
    evals: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> text -> metrics
    clip_per_image: dict[str, np.ndarray] = field(default_factory=dict)  # the CLIP's per-image values
    runs: dict[str, tuple[nn.Module, list[dict]]] = field(default_factory=dict)
    seeds: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # breakdown run -> per-seed scores
    learning_rates: pd.DataFrame = field(default_factory=pd.DataFrame)
    ablation: list[dict] = field(default_factory=list)


def evaluate_clip(ch: Chapter, data: DealData) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """The base CLIP with both concept texts, and its per-image values (bootstrap units); with the
    chapter's concept text also the references (chance and truth) of disentanglability and localizability."""
    text = ch.params["concept_text"]
    evals: dict[str, dict[str, float]] = {}
    per_image: dict[str, np.ndarray] = {}
    for t in CONCEPT_TEXTS:
        evals[t], values = scores(
            ch,
            ch.clip()[0],
            data,
            concept_text=t,
            per_image=True,
            localize=tuple(LOCALIZABILITY) if t == text else (),
            references=t == text,
        )
        per_image = values if t == text else per_image
    return evals, per_image


def run(ch: Chapter, progress: bool = False) -> Result:
    """The chapter's work, cell by cell as in the notebook."""
    r = Result(data=load_data(ch))
    r.evals["CLIP"], r.clip_per_image = evaluate_clip(ch, r.data)
    r.runs = fine_tune_runs(ch, r.data, progress)
    r.evals.update({name: evaluate_both_texts(ch, tuned, r.data) for name, (tuned, _) in r.runs.items()})
    r.seeds = seed_runs(ch, r.data, r.evals)
    r.learning_rates = learning_rates(ch, r.data, r.evals["CLIP"][ch.params["concept_text"]])
    r.ablation = ablation(ch, r.data)
    return r


def _loc_key(variant: str) -> str:
    return "localizability" + ("" if variant == "correct" else f"_{variant}")


def breakdown(ch: Chapter, r: Result) -> dict[str, dict[str, dict[str, float]]]:
    """Over seeds, per metric: the whole change (paper's run − CLIP) and its parts: L_ctr on rich labels
    (maps detached − CLIP), L_con + L_spa (λ_sep = 0 − maps detached) and L_sep (paper's run − λ_sep = 0);
    each ``{"mean", "low", "high"}`` (t interval over seeds)."""
    if not r.seeds or not r.seeds.get(PAPER_RUN):
        return {}
    before = r.evals["CLIP"][ch.params["concept_text"]]
    out = {}
    for m in SEED_METRICS:
        if m not in before or any(m not in s for runs in r.seeds.values() for s in runs):
            continue
        full, det, nosep = (np.array([s[m] for s in r.seeds[n]]) for n in (PAPER_RUN, DETACHED_RUN, NO_SEP_RUN))
        parts = {
            "whole change": full - before[m],
            "L_ctr (rich labels)": det - before[m],
            "L_con + L_spa": nosep - det,
            "L_sep": full - nosep,
        }
        out[m] = {k: dict(zip(("mean", "low", "high"), seed_interval(v))) for k, v in parts.items()}
    return out


def results(ch: Chapter, r: Result) -> dict:
    """The results JSON's ``results`` block."""
    p = ch.params
    key = {name: RUN_KEYS.get(name, name) for name in r.evals}
    text_metrics = ("disentanglability", "pointing_game", "energy_in_mask")
    maps = {
        key[n]: {t: {m: v for m, v in s.items() if m in text_metrics} for t, s in e.items()} for n, e in r.evals.items()
    }
    loc = {key[n]: {v: e[p["concept_text"]].get(_loc_key(v)) for v in LOCALIZABILITY} for n, e in r.evals.items()}
    tuned = next((n for n in r.evals if n != "CLIP"), None)
    headline_loc = _loc_key(p["localizability_headline"])
    head = {
        f"{m}_{who}": r.evals[n][p["concept_text"]].get(metric)
        for who, n in (("clip", "CLIP"), ("deal", tuned))
        if n
        for m, metric in (
            ("disentanglability", "disentanglability"),
            ("localizability", headline_loc),
            ("top1", "top1"),
            ("pointing_game", "pointing_game"),
        )
    }
    out = {
        "headline": head,
        "maps_by_concept_text": maps,
        "localizability": loc,
        "scores": {key[n]: e[p["concept_text"]] for n, e in r.evals.items()},
        "learning_rate": {str(lr): row for lr, row in r.learning_rates.to_dict(orient="index").items()},
        "ablation": r.ablation,
    }
    out["seeds"] = {RUN_KEYS[n]: runs for n, runs in r.seeds.items()}
    out["breakdown"] = breakdown(ch, r)
    out["paper"] = {
        **{m: {"before": b, "after": a} for m, (b, a) in PAPER.items()},
        "top1_gain": round(PAPER["top1"][1] - PAPER["top1"][0], 3),
    }
    out["chance"] = chance_levels(ch, r)
    out["map_references"] = map_references(r, p["concept_text"])
    return out


def chance_levels(ch: Chapter, r: Result) -> dict[str, float]:
    """Chance per measure: top-1 1/classes; the pointing game, the mean area of a part's mask; the map
    scores, their null maps through the same conversion (:data:`CHANCE_NOTES`)."""
    assert r.data is not None
    chance = {"top1": 1 / len(r.data.test.class_names)}
    if r.data.part_masks is not None:
        area = r.data.part_masks.mean((-2, -1))
        chance["pointing_game"] = float(area[r.data.part_masks.any((-2, -1))].mean())
    clip = r.evals["CLIP"][ch.params["concept_text"]]
    return chance | {m: clip[f"chance_{m}"] for m in CHANCE_NOTES if f"chance_{m}" in clip}


# The chance level of a map score: the score of null maps through the same conversion (deal.evaluate's
# references); the truth is the part masks as maps.
CHANCE_NOTES = {
    "disentanglability": "; chance: the CLIP's maps with every map's pixels shuffled",
    "localizability": "; chance: uniform random maps",
}
PER_IMAGE_REFERENCE = {"disentanglability": "separation_loss", "localizability": "localizability"}


def map_references(r: Result, text: str) -> dict[str, dict[str, float]]:
    """Per map score: chance with its 95 % bootstrap band over test images, and the truth (the part masks
    as maps: the ceiling), each through the same conversion as the score (world only for the truth)."""
    out: dict[str, dict[str, float]] = {}
    clip, per = r.evals["CLIP"][text], r.clip_per_image
    for m, unit in PER_IMAGE_REFERENCE.items():
        if f"chance_{m}" not in clip:
            continue
        values = per[f"chance_{unit}"]
        stat: Any = disentanglability if m == "disentanglability" else np.mean
        low, high = bootstrap_interval(values[~np.isnan(values)], stat=stat)
        out[m] = {"chance": clip[f"chance_{m}"], "chance_low": low, "chance_high": high}
        if f"truth_{m}" in clip:
            out[m]["truth"] = clip[f"truth_{m}"]
    return out


def reference_sentence(measure: str, ref: dict[str, float], scored: list[tuple[str, Reported]]) -> str:
    """A map score of each model (``scored``: CLIP first) against its chance band and its truth (``ref``:
    one entry of :func:`map_references`), in words."""
    truth = f"; the part masks as maps reach {ref['truth']:.3f}" if "truth" in ref else ""
    above_truth = "truth" in ref and bool(scored) and scored[0][1].low is not None and scored[0][1].low > ref["truth"]
    return (
        f"Against chance ({CHANCE_NOTES[measure].removeprefix('; chance: ')}: {ref['chance']:.3f} "
        f"[{ref['chance_low']:.3f}, {ref['chance_high']:.3f}]{truth}), {measure} is "
        + ", ".join(
            f"{h.value:.3f} [{h.low:.3f}, {h.high:.3f}] for {who} "
            f"({versus_chance(h.low, h.high, ref['chance_low'], ref['chance_high'])})"
            for who, h in scored
            if h.low is not None and h.high is not None
        )
        + (
            "; the CLIP's maps score above the part masks themselves, so this score does not reward finding the "
            "part a concept names"
            if above_truth
            else ""
        )
        + "."
    )


def _references(measure: str, chance: float | None, paper: float | None) -> str:
    """The note's words on the chance level (what it is, or why there is none) and a missing paper number."""
    if chance is None:
        said = "; no chance level: DEAL's score has none"
    else:
        said = CHANCE_NOTES.get(measure, "")
    return said + ("" if paper is not None else "; no paper number: the paper has no part masks")


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """Before and after DEAL (the paper's method) for disentanglability, localizability, top-1 and pointing
    game: the CLIP with a bootstrap interval over images, DEAL with a t interval over training seeds;
    chance where one exists, the paper's ImageNet numbers (ViT-B/32, not the same model or data)."""
    per, chance = r.clip_per_image, results(ch, r)["chance"]
    sources = {
        "disentanglability": per.get("separation_loss"),
        "localizability": per.get("localizability"),
        "top1": per.get("top1"),
        "pointing_game": per.get("pointing_game"),
    }
    out = {}
    for m, values in sources.items():
        after = [s[m] for s in r.seeds.get(PAPER_RUN, []) if m in s]
        values = None if values is None else values[~np.isnan(values)]
        if values is None or not len(values):
            continue
        paper = PAPER.get(m, (None, None))
        stat: Any = disentanglability if m == "disentanglability" else np.mean
        value, (low, high) = float(stat(values)), bootstrap_interval(values, stat=stat)
        out[f"{m.replace('_', ' ')}, CLIP"] = Reported(
            value,
            min(low, value),
            max(high, value),
            chance.get(m),
            paper[0],
            "95 % bootstrap over test images" + _references(m, chance.get(m), paper[0]),
        )
        if after:
            mean, lo, hi = seed_interval(after)
            out[f"{m.replace('_', ' ')}, DEAL"] = Reported(
                mean,
                lo,
                hi,
                chance.get(m),
                paper[1],
                f"mean and 95 % t interval over {len(after)} training seeds" + _references(m, chance.get(m), paper[1]),
            )
    return out


def original_run(r: Result) -> str:
    """The run closest to the original code's training: maps detached with the per-image contrastive loss
    where the chapter ran it, else maps detached."""
    return ORIGINAL_RUN if ORIGINAL_RUN in r.evals else DETACHED_RUN


def fidelity_rows(
    before: dict[str, float], book: dict[str, float], original: dict[str, float], headline: str = "correct"
) -> dict[str, dict[str, str]]:
    """Rows for :func:`conceptlab.chapter.fidelity_table`: paper, original code and this book, before -> after.

    ``book`` / ``original``: the DEAL runs with the paper's switches and with the original code's (maps
    detached, per-image contrastive where run, localizability with the original notebook's indexing and
    pairing: :func:`original_run`); ``before`` the base CLIP.
    """
    arrow = lambda a, b: f"{a:.3f} → {b:.3f}"  # noqa: E731
    rows = {}
    for metric in ("disentanglability", "localizability", "top1"):
        mine = _loc_key(headline) if metric == "localizability" else metric
        theirs = _loc_key("original_indexing_pairing") if metric == "localizability" else metric
        rows[metric] = {
            "paper": arrow(*PAPER[metric]) + " (ImageNet, ViT-B/32)",
            "original code": arrow(before[theirs], original[theirs]) if theirs in original else "—",
            "this book": arrow(before[mine], book[mine]) if mine in book else "—",
        }
    return rows


def switch_steps(r: Result, text: str) -> pd.DataFrame:
    """From the book's run to the original code's, one switch at a time (before → after DEAL): maps
    detached (explainer.py), the per-image contrastive loss (train.py), then localizability as
    exp_localizability.ipynb computes it. Columns are literal runs; the original settings not run here
    (lr, batch, steps) are in the switch table."""
    if PAPER_RUN not in r.evals or DETACHED_RUN not in r.evals:
        return pd.DataFrame()
    before, book, det = (r.evals[n][text] for n in ("CLIP", PAPER_RUN, DETACHED_RUN))
    orig_loc = _loc_key("original_indexing_pairing")
    arrow = lambda a, b, m: f"{a[m]:.3f} → {b[m]:.3f}" if m in a and m in b else "—"  # noqa: E731
    cols = {"this book (paper's method)": (book, "localizability"), "+ maps detached": (det, "localizability")}
    if ORIGINAL_RUN in r.evals:
        det = r.evals[ORIGINAL_RUN][text]
        cols["+ per-image contrastive"] = (det, "localizability")
    cols["+ original localizability (lr, batch, steps: not run)"] = (det, orig_loc)
    rows = {
        m: {c: arrow(before, run, loc if m == "localizability" else m) for c, (run, loc) in cols.items()}
        for m in ("disentanglability", "localizability", "top1", "pointing_game")
    }
    return pd.DataFrame(rows).T.rename_axis("metric")


def summary(ch: Chapter, r: Result) -> list[str]:
    """Generated sentences that answer the opening question first (where the book contradicts the paper
    included), then the numbers."""
    p, text = ch.params, ch.params["concept_text"]
    res = results(ch, r)
    clip = r.evals["CLIP"]
    lines = []
    parts = res["breakdown"]
    n_seeds = len(p["deal_seeds"])
    for m, label in (("disentanglability", "Disentanglability"), ("pointing_game", "The pointing game")):
        if m not in parts:
            continue
        whole = parts[m]["whole change"]
        sig = lambda d: "a finding" if d["low"] > 0 or d["high"] < 0 else "inside its interval"  # noqa: E731
        lines.append(
            f"{label} changes by {whole['mean']:+.3f} [{whole['low']:+.3f}, {whole['high']:+.3f}] over "
            f"{n_seeds} seeds ({sig(whole)}); of it, L_ctr on rich labels gives "
            f"{parts[m]['L_ctr (rich labels)']['mean']:+.3f}, L_con + L_spa "
            f"{parts[m]['L_con + L_spa']['mean']:+.3f} and L_sep {parts[m]['L_sep']['mean']:+.3f}."
        )
    if "top1" in parts:
        t = parts["top1"]["whole change"]
        gain = f"where the paper reports a gain of {res['paper']['top1_gain']:.3f} on ImageNet"
        verdict = (
            f"drops, {gain}"
            if t["high"] < 0
            else "rises, as the paper reports"
            if t["low"] > 0
            else f"does not change beyond its interval, {gain}"
        )
        lines.append(f"Top-1 {verdict}: {t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}].")
    lines.append(
        "Before fine-tuning, "
        + "; ".join(
            f"{t} concept text: disentanglability {clip[t]['disentanglability']:.3f}"
            + (f", pointing game {clip[t]['pointing_game']:.3f}" if "pointing_game" in clip[t] else "")
            for t in clip
        )
        + "."
    )
    heads = headline(ch, r)
    for m, ref in res["map_references"].items():
        lines.append(
            reference_sentence(m, ref, [(w, heads[f"{m}, {w}"]) for w in ("CLIP", "DEAL") if f"{m}, {w}" in heads])
        )
    for name, e in r.evals.items():
        if name == "CLIP":
            continue
        a, b = clip[text], e[text]
        moves = [
            f"{m} {a[m]:.3f} → {b[m]:.3f}"
            for m in ("disentanglability", "localizability", "top1", "pointing_game")
            if m in a and m in b
        ]
        lines.append(f"{name}: " + ", ".join(moves) + ".")
    loc = {v: clip[text].get(_loc_key(v)) for v in LOCALIZABILITY}
    if all(v is not None for v in loc.values()):
        lines.append(
            "Localizability of the CLIP, three ways: "
            + ", ".join(f"{v.replace('_', ' ')} {x:.3f}" for v, x in loc.items())
            + "."
        )
    if len(r.learning_rates) > 1:
        lines.append(
            f"In {p['ablation_steps']} steps the vision weights change by "
            + ", ".join(f"{row['relative weight change']:.2e} at lr {lr:g}" for lr, row in r.learning_rates.iterrows())
            + " (relative)."
        )
    return lines


# ---------------------------------------------------------------------------- figures
def plot_losses(history: Sequence[dict], title: str):
    """The four DEAL losses of a training run, side by side."""
    import matplotlib.pyplot as plt

    from ..plots import curve

    fig, axes = plt.subplots(1, len(LOSSES), figsize=(3.4 * len(LOSSES), 2.6))
    for ax, name in zip(axes, LOSSES):
        curve(history, name, smooth=max(1, len(history) // 10), ax=ax)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def breakdown_figure(ch: Chapter, r: Result):
    """Disentanglability, pointing game and top-1 for the CLIP and the three breakdown runs, every seed a
    dot (look for: which run carries the change, and whether seeds agree)."""
    import matplotlib.pyplot as plt

    metrics = [
        m
        for m in ("disentanglability", "pointing_game", "top1")
        if m in r.evals["CLIP"][ch.params["concept_text"]] and r.seeds.get(PAPER_RUN)
    ]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.6 * max(1, len(metrics)), 3), squeeze=False)
    names = ["CLIP", DETACHED_RUN, NO_SEP_RUN, PAPER_RUN]
    labels = ["CLIP", "L_ctr only\n(maps detached)", "+ L_con, L_spa\n(λ_sep = 0)", "+ L_sep\n(paper)"]
    for ax, m in zip(axes[0], metrics):
        for i, name in enumerate(names):
            values = (
                [r.evals["CLIP"][ch.params["concept_text"]][m]] if name == "CLIP" else [s[m] for s in r.seeds[name]]
            )
            ax.plot([i] * len(values), values, "o", alpha=0.6, color=f"C{i}")
            ax.plot([i - 0.2, i + 0.2], [np.mean(values)] * 2, color="k", lw=1.5)
        if m in results(ch, r)["chance"]:
            ax.axhline(results(ch, r)["chance"][m], color="grey", ls=":", lw=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_title(m.replace("_", " "), fontsize=9)
    fig.suptitle(f"{ch.params['deal_steps']} steps, {len(ch.params['deal_seeds'])} seeds (dots); bar: mean", fontsize=9)
    fig.tight_layout()
    return fig


def ablation_figure(ch: Chapter, r: Result):
    """The same three metrics against λ_sep and against steps, each point the mean over seeds with its t
    interval and the seeds as dots: top, the grid at ``ablation_steps`` and the breakdown's runs at
    ``deal_steps`` (λ_sep = 0 and the chapter's); bottom, 0, ``ablation_steps`` and ``deal_steps`` steps at
    the chapter's λ's. Each panel has the CLIP's level; a map score also its chance band and the part masks'
    score (:func:`map_references`), the others their chance in the title (:func:`chance_levels`)."""
    import matplotlib.pyplot as plt

    p = ch.params
    before = r.evals["CLIP"][p["concept_text"]]
    chance, references = chance_levels(ch, r), map_references(r, p["concept_text"])
    metrics = [m for m in ("disentanglability", "pointing_game", "top1") if m in before]
    grid = [a for a in r.ablation if a["lambda_con"] == p["lambda_con"]]
    at_end = {0.0: r.seeds.get(NO_SEP_RUN, []), p["lambda_sep"]: r.seeds.get(PAPER_RUN, [])}
    fig, axes = plt.subplots(2, len(metrics), figsize=(3.4 * len(metrics), 5.2), squeeze=False)

    def over_seeds(ax, xs: list[float], runs: list[list[float]], label: str, colour: str) -> None:
        kept = [(x, v) for x, v in zip(xs, runs) if v]
        for x, v in kept:
            ax.plot([x] * len(v), v, ".", color=colour, alpha=0.4)
        stats = np.array([seed_interval(v) for _, v in kept]).reshape(-1, 3)
        xk = [x for x, _ in kept]
        ax.errorbar(
            xk,
            stats[:, 0],
            yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]],
            fmt="o-",
            color=colour,
            capsize=3,
            label=label,
        )

    for j, m in enumerate(metrics):
        lambdas = sorted({a["lambda_sep"] for a in grid})
        over_seeds(
            axes[0, j],
            lambdas,
            [[a[m] for a in grid if a["lambda_sep"] == lam] for lam in lambdas],
            f"{p['ablation_steps']} steps",
            "C0",
        )
        ends = sorted(at_end)
        over_seeds(axes[0, j], ends, [[s[m] for s in at_end[lam]] for lam in ends], f"{p['deal_steps']} steps", "C1")
        title = m.replace("_", " ") + (f" (chance {chance[m]:.3f})" if m in chance and m not in references else "")
        axes[0, j].set(xlabel="λ_sep", title=title)
        same = [a[m] for a in grid if a["lambda_sep"] == p["lambda_sep"]]
        steps = [0, p["ablation_steps"], p["deal_steps"]]
        over_seeds(
            axes[1, j],
            steps,
            [[before[m]], same, [s[m] for s in at_end[p["lambda_sep"]]]],
            f"λ_sep = {p['lambda_sep']:g}",
            "C1",
        )
        axes[1, j].set(xlabel="steps")
        ref = references.get(m, {})
        for ax in axes[:, j]:
            ax.axhline(before[m], color="k", ls="--", lw=1, label="CLIP")
            if ref:
                ax.axhspan(ref["chance_low"], ref["chance_high"], color="0.85", label="chance band")
            if "truth" in ref:
                ax.axhline(ref["truth"], color="C2", ls=":", lw=1.5, label="part masks")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def concept_features(ch: Chapter, model: nn.Module, data: DealData, rows: Sequence[int]) -> torch.Tensor:
    """(len(rows), K, D) text features of the descriptors of each chosen test image's class."""
    p = ch.params
    feats = descriptor_text_features(
        model, ch.clip()[2], data.descriptors.descriptors, data.test.class_names, p["n_concepts"], p["concept_text"]
    )
    return feats[torch.as_tensor(data.test.labels[list(rows)])]


def shown_rows(ch: Chapter, r: Result) -> np.ndarray:
    """The test images of the heat-map grids: one per class, ``n_show`` classes."""
    labels = r.data.test.labels
    return spread_over_classes(labels, min(ch.params["n_show"], len(set(labels.tolist()))), ch.params["seed"])


def shown_classes(ch: Chapter, r: Result) -> list[str]:
    """The classes of the heat-map grids' rows, in order."""
    return [r.data.test.class_names[r.data.test.labels[i]] for i in shown_rows(ch, r)]


def example_maps(ch: Chapter, r: Result) -> list:
    """One test image per class (rows), its class's K descriptors (columns): the CLIP, then each fine-tuned
    model; the described part's mask outlined on the world."""
    from ..plots import heatmap_grid, mask_outlines

    data = r.data
    rows = shown_rows(ch, r)
    titles = [data.test.class_names[data.test.labels[i]] for i in rows]
    figs = []
    for name, model in {"CLIP": ch.clip()[0], **{n: m for n, (m, _) in r.runs.items()}}.items():
        maps = explain(model, data.test.images[rows], concept_features(ch, model, data, list(rows)))
        fig = heatmap_grid(
            data.test.display[rows], maps.numpy(), titles, [f"d{j + 1}" for j in range(ch.params["n_concepts"])]
        )
        if data.part_masks is not None:
            mask_outlines(fig, data.part_masks[rows])
        fig.suptitle(name, y=1.02)
        figs.append(fig)
    return figs


def map_explorer(ch: Chapter, r: Result, interactive: bool | None = None):
    """Pick a test image and one of its class's descriptors; see each model's map of it (static in the book)."""
    import matplotlib.pyplot as plt

    from ..explore import explorer
    from ..plots import heatmap_grid

    p, data, tokenizer = ch.params, r.data, ch.clip()[2]
    models = {"CLIP": ch.clip()[0], **{n.split(", ")[-1]: m for n, (m, _) in r.runs.items()}}
    k, names, test = p["n_concepts"], data.test.class_names, data.test
    feats = {
        m: descriptor_text_features(model, tokenizer, data.descriptors.descriptors, names, k, p["concept_text"])
        for m, model in models.items()
    }

    def draw(image: int = 0, descriptor: int = 1) -> plt.Figure:
        c = int(test.labels[image])
        maps = [
            explain(model, test.images[image : image + 1], feats[m][c, descriptor - 1 : descriptor], p["start_layer"])
            for m, model in models.items()
        ]
        fig = heatmap_grid(test.display[image : image + 1], torch.cat(maps, 1).numpy(), [names[c]], list(models))
        fig.suptitle(f"'{data.descriptors.descriptors[names[c]][descriptor - 1]}'", y=1.05, fontsize=9)
        return fig

    return explorer(draw, interactive, image=(0, len(test.labels) - 1), descriptor=(1, k))


# ---------------------------------------------------------------------------- exercises
def exercise(ch: Chapter) -> dict[str, float]:
    """A "predict, then run" exercise: DEAL for ``exercise_steps`` steps with the chapter's parameters,
    scored on up to 200 test images (localizability on ``n_localize // 2`` of them)."""
    p = ch.params
    data = load_data(ch)
    tuned, history = fine_tune(ch, data, progress=False, deal_steps=p["exercise_steps"])
    out = scores(ch, tuned, data, n=min(200, len(data.test.labels)), n_localize=p["n_localize"] // 2)
    out["separation_loss_last_step"] = history[-1]["separation"] if history else float("nan")
    out["weight_change"] = weight_change(tuned, ch.clip()[0])
    return out


__all__ = ["NAME", "PARAMETERS", "SWITCHES", "Result", "headline", "results", "run", "summary"]
