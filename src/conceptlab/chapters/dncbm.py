"""Chapter 5, Discover-then-Name: parameters, switches, the chapter's run, its figures, results and summary.

The method itself is :mod:`conceptlab.dncbm` and :mod:`conceptlab.sae`; this module is its client
(the contract is in :mod:`conceptlab.chapters`). The notebook calls the steps below in order,
each filling the :class:`Result`: :func:`embed`, :func:`discover`, :func:`sweep_l1`,
:func:`name`, :func:`bottleneck`, :func:`sweep_probe`, :func:`compare_original`,
:func:`check_names`, :func:`task_agnosticity`, :func:`explain`; :func:`run` calls them all.

**The operating point.** The original's λ₁ = 3e-5 is a number on real CLIP's raw embeddings,
whose scale the original repository does not state (``scripts/save_cc3m_features.py`` saves
``model.encode_image`` outputs as they come; ``dncbm/config.py`` gives only their dimensions).
Multiplying the features by ``c`` turns a coefficient λ into λ / c on the raw features
(:func:`conceptlab.dncbm.raw_scale_coefficient`), for λ₁ and the probe's λ alike, so a number
means nothing until the scale is fixed. ``sae_scale = "unit_rms"`` (the default) fixes it, the
features scaled to a per-dimension RMS of 1 on every CLIP; ``"raw"`` is the original. The defaults
(:data:`SAE_L1`, :data:`PROBE_LAMBDA`) are set by the reasoning beside them; the chapter's sweeps
show where they sit, and its summary states what the sweeps' rule picks (the sparsest setting
whose probe stays within ``tolerance`` of the raw-feature probe).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F

from .. import dncbm, plots
from ..artifacts import atomic_write_json
from ..chapter import Chapter, Param, Switch
from ..data import load_dataset
from ..models import class_text_weights
from ..sae import (
    BIAS_INITS,
    RECONSTRUCTIONS,
    SAEConfig,
    SparseAutoencoder,
    encode_concepts,
    l1_on_original_scale,
    load_or_train_sae,
    tensor_fingerprint,
)
from ..stats import bootstrap_interval, excludes, paired_difference_interval
from .report import Reported

NAME = "05_discover_then_name"


def _check_dataset(value: str, p: dict[str, Any]) -> str | None:
    if value != "world" and p["data_root"] is None:
        return f"dataset={value!r} needs data_root (the folder of the data set)"
    return None


def _real(p: dict[str, Any]) -> bool:
    return p["dataset"] != "world"


# The chapter's operating point (see the module's docstring and the notebook's sweeps).
# λ₁ = 1e-2 on unit-RMS features puts the soft threshold of a concept near λ₁ d / 2 = 0.64 (d = 128):
# above a random direction's typical projection. The probe's λ = 10: the sweeps' rule's choice on the
# world (the book's run of 2026-11-27: 93.1 % with 2.9 concepts per decision, against 92.8 % and 4.8 at 1).
SAE_L1, SAE_BATCH, SAE_EPOCHS, PROBE_LAMBDA = 1e-2, 256, 20, 10.0
DEAD_LIMIT = 0.05  # the rule's largest share of dead concepts: a dead concept is a lost dictionary entry
SWEEP_L1 = [2e-3, 5e-3, 1e-2, 2e-2, 5e-2]
SWEEP_PROBE = [0.1, 1.0, 10.0, 100.0]

PARAMETERS: dict[str, Param] = {
    "dataset": Param(
        "world",
        str,
        choices=("world", "imagefolder", "cub"),
        check=_check_dataset,
        help="'world', or a real data set under data_root",
    ),
    "data_root": Param(None, "dir", applies=_real, help="folder of a real data set"),
    "vocabulary": Param(None, "file", help="word list, one per line (CLIP-Dissect's 20k.txt); None: the world's"),
    "n_corpus": Param(8000, int, min=16, help="unlabeled images the SAE learns from (CC3M's role)"),
    "n_probe_train": Param(3000, int, min=4),
    "n_test": Param(2000, int, min=4),
    "sae_expansion": Param(8, int, min=1, help="concepts = expansion x embedding dimension"),
    "sae_scale": Param(
        "unit_rms",
        str,
        choices=dncbm.FEATURE_SCALES,
        help="'raw': embeddings as CLIP gives them (the original); 'unit_rms': scaled to a "
        "per-dimension RMS of 1, so that sae_l1 and probe_lambda mean the same on every CLIP",
    ),
    "sae_l1": Param(SAE_L1, float, min=0.0, help="L1 coefficient on the scale of sae_reconstruction and sae_scale"),
    "sae_lr": Param(
        1e-3,
        float,
        min=1e-8,
        help="twice the original's 5e-4: a short run moves the encoder biases "
        "about lr per step, and sparsity needs them to move",
    ),
    "sae_batch_size": Param(SAE_BATCH, int, min=1, help="smaller than the original's 4096: more steps"),
    "sae_epochs": Param(SAE_EPOCHS, int, min=1),
    "sae_resample_every": Param(10, int, min=0, help="epochs between dead-concept resamplings; 0: never"),
    "sae_bias_init": Param(
        "mean", str, choices=BIAS_INITS, help="the decoder bias starts at zero (the original) or at the corpus mean"
    ),
    "sae_reconstruction": Param(
        "mean",
        str,
        choices=RECONSTRUCTIONS,
        help="squared error averaged ('mean', the code) or summed ('sum', the paper)",
    ),
    "sae_inputs": Param("raw", str, choices=dncbm.SAE_INPUTS, help="raw CLIP embeddings (original) or L2-normalised"),
    "sweep_l1": Param(SWEEP_L1, list, item=float, min=0.0, help="λ₁ values of the sweep (SAEs cached)"),
    "probe_lambda": Param(
        PROBE_LAMBDA, float, min=0.0, help="L1 coefficient of the probe, on the scale of probe_l1 and sae_scale"
    ),
    "probe_l1": Param("mean", str, choices=dncbm.PROBE_L1, help="mean |W| (nn.L1Loss, the code) or sum (the paper)"),
    "probe_solver": Param(
        "adam",
        str,
        choices=dncbm.PROBE_SOLVERS,
        help="'adam' (original: minibatch Adam) or 'fista' (proximal: exact zeros)",
    ),
    "probe_lr": Param(1e-2, float, min=1e-8, applies=lambda p: p["probe_solver"] == "adam"),
    "probe_epochs": Param(200, int, min=1),
    "probe_batch_size": Param(512, int, min=1, applies=lambda p: p["probe_solver"] == "adam"),
    "sweep_probe_lambda": Param(SWEEP_PROBE, list, item=float, min=0.0, help="probe λ values of the probe sweep"),
    "n_null": Param(20, int, min=1, help="random draws of each null (names shuffled, images shuffled)"),
    "tolerance": Param(
        0.01,
        float,
        min=0.0,
        max=1.0,
        help="the sweeps' rule: the sparsest setting whose probe is this close to the raw probe",
    ),
    "right_auroc": Param(
        0.75,
        float,
        min=0.5,
        max=1.0,
        applies=lambda p: not _real(p),
        help="AUROC from which a concept's name counts as right",
    ),
}

# Where this book, the paper and the original code (neuroexplicit-saar/Discover-then-Name) can differ.
SWITCHES: dict[str, Switch] = {
    "sae_reconstruction": Switch(
        "sum",
        "mean",
        "the SAE's reconstruction term: ||x - x_hat||^2 in the paper, "
        "the squared error averaged over dimensions in the code (l1 means D times less)",
        source="neuroexplicit-saar/Discover-then-Name:scripts/train_sae.py#L48-L49; "
        "neuroexplicit-saar/Discover-then-Name:sparse_autoencoder/sparse_autoencoder/loss/decoded_activations_l2.py#L79-L83",
    ),
    "sae_inputs": Switch(
        "raw",
        "raw",
        "the SAE learns raw CLIP embeddings; 'normalised' puts them on the sphere",
        source="neuroexplicit-saar/Discover-then-Name:scripts/save_cc3m_features.py#L37-L40; "
        "neuroexplicit-saar/Discover-then-Name:dncbm/custom_pipeline.py#L218-L223",
    ),
    "sae_scale": Switch(
        "raw",
        "raw",
        "'unit_rms' scales the features to a per-dimension RMS of 1: a coefficient "
        "then means the same on every CLIP (on the raw features it is divided by the scale)",
        source="neuroexplicit-saar/Discover-then-Name:scripts/save_cc3m_features.py#L37-L40; "
        "neuroexplicit-saar/Discover-then-Name:dncbm/custom_pipeline.py#L218-L223",
    ),
    "sae_l1": Switch(
        3e-5,
        3e-5,
        "sparsity of the concept code: fewer active concepts, worse reconstruction",
        source="neuroexplicit-saar/Discover-then-Name:README.md#L99",
    ),
    "sae_lr": Switch(5e-4, 5e-4, "SAE step size", source="neuroexplicit-saar/Discover-then-Name:README.md#L99"),
    "sae_batch_size": Switch(4096, 4096, "SAE batch", source="neuroexplicit-saar/Discover-then-Name:README.md#L99"),
    "sae_epochs": Switch(
        200,
        200,
        "SAE training length (on CC3M's 3.3 million images)",
        source="neuroexplicit-saar/Discover-then-Name:README.md#L99",
    ),
    "sae_resample_every": Switch(
        10,
        10,
        "epochs between dead-concept resamplings",
        source="neuroexplicit-saar/Discover-then-Name:README.md#L99; "
        "neuroexplicit-saar/Discover-then-Name:scripts/train_sae.py#L65-L71",
    ),
    "sae_bias_init": Switch(
        None,
        "zero",
        "where b_dec starts (the paper does not say): at the corpus mean a short "
        "run need not spend its steps learning the offset",
        source="neuroexplicit-saar/Discover-then-Name:scripts/train_sae.py#L38-L39; "
        "neuroexplicit-saar/Discover-then-Name:sparse_autoencoder/sparse_autoencoder/autoencoder/model.py#L97-L106",
    ),
    "probe_l1": Switch(
        "sum",
        "mean",
        "the probe's L1 term: ||W||_1 in the paper, nn.L1Loss (mean |W|) in the code",
        source="neuroexplicit-saar/Discover-then-Name:scripts/train_linear_probe.py#L241-L243; "
        "neuroexplicit-saar/Discover-then-Name:scripts/train_linear_probe.py#L257-L259",
    ),
    "probe_lambda": Switch(
        0.1,
        0.1,
        "the probe's sparsity weight (README command; released probes used 1.0)",
        source="neuroexplicit-saar/Discover-then-Name:README.md#L128; "
        "neuroexplicit-saar/Discover-then-Name:dncbm/method_utils.py#L133-L136",
    ),
    "probe_solver": Switch(
        "adam",
        "adam",
        "'fista' solves the same objective to exact zeros",
        source="neuroexplicit-saar/Discover-then-Name:scripts/train_linear_probe.py#L234",
    ),
    "probe_lr": Switch(
        1e-2, 1e-2, "probe step size (README command)", source="neuroexplicit-saar/Discover-then-Name:README.md#L128"
    ),
    "probe_epochs": Switch(
        200, 200, "probe training length", source="neuroexplicit-saar/Discover-then-Name:README.md#L128"
    ),
}
ORIGINAL_CODE = {name: s.original for name, s in SWITCHES.items()}

# Table 1 of the paper (CLIP ResNet-50, ImageNet), as fractions.
PAPER = {"accuracy_concept_probe": 0.729, "accuracy_raw_probe": 0.733, "accuracy_zero_shot": 0.596}

Data = tuple[dict, dict, dict, list[str]]
COVERAGE = 0.9  # the share of a decision's positive evidence that "concepts per decision" covers


def sae_config(p: dict[str, Any]) -> SAEConfig:
    """The SAE's configuration from the chapter's parameters."""
    return SAEConfig(
        expansion=p["sae_expansion"],
        l1=p["sae_l1"],
        lr=p["sae_lr"],
        batch_size=p["sae_batch_size"],
        epochs=p["sae_epochs"],
        resample_every=p["sae_resample_every"],
        reconstruction=p["sae_reconstruction"],
        decoder_bias_init=p["sae_bias_init"],
        seed=p["seed"],
    )


def probe_config(p: dict[str, Any], lam: float | None = None) -> dncbm.ProbeConfig:
    """The probe's configuration from the chapter's parameters (``lam`` overrides ``probe_lambda``)."""
    return dncbm.ProbeConfig(
        lam=p["probe_lambda"] if lam is None else lam,
        l1=p["probe_l1"],
        solver=p["probe_solver"],
        lr=p["probe_lr"],
        epochs=p["probe_epochs"],
        batch_size=p["probe_batch_size"],
        seed=p["seed"],
    )


def default_sae_config() -> SAEConfig:
    """The chapter's default SAE (its declared parameters): what chapter 7's DN-CBM row trains."""
    return sae_config({k: p.default for k, p in PARAMETERS.items()} | {"seed": 0})


def default_probe_config() -> dncbm.ProbeConfig:
    """The chapter's default probe (its declared parameters): what chapter 7's DN-CBM row uses."""
    return probe_config({k: p.default for k, p in PARAMETERS.items()} | {"seed": 0})


# ---------------------------------------------------------------------------- data and models
def chapter_features(ch: Chapter, progress: bool = True) -> Data:
    """``(corpus, probe train, probe test, class names)`` of the chapter's data set (world or real)."""
    p = ch.params
    clip, preprocess, _, _ = ch.clip(progress=progress)
    if p["dataset"] == "world":
        sets = [
            dncbm.world_features(ch.store, ch.world, clip, ch.key(), n, split, progress=progress)
            for n, split in ((p["n_corpus"], "corpus"), (p["n_probe_train"], "train"), (p["n_test"], "test"))
        ]
        return sets[0], sets[1], sets[2], list(ch.world.class_names)
    images = load_dataset(p["dataset"], p["data_root"], split="train" if p["dataset"] == "cub" else "test")
    held_out = load_dataset(p["dataset"], p["data_root"], split="test") if p["dataset"] == "cub" else None
    splits = dncbm.real_splits(images, p["n_corpus"], p["n_probe_train"], p["n_test"], p["seed"], held_out)
    sets = [dncbm.folder_features(ch.store, s, clip, preprocess, ch.key(), progress=progress) for s in splits]
    return sets[0], sets[1], sets[2], list(images.class_names)


def corpus_scale(ch: Chapter, corpus: dict) -> float:
    """The constant every embedding is multiplied by before the SAE (``sae_scale``, from the corpus)."""
    return dncbm.feature_scale(dncbm.sae_inputs(corpus["features"], ch.params["sae_inputs"]), ch.params["sae_scale"])


def chapter_sae(ch: Chapter, corpus: dict, progress: bool = True) -> tuple[SparseAutoencoder, list[dict]]:
    """The chapter's SAE on its corpus: cached by content and configuration."""
    p = ch.params
    x = dncbm.sae_inputs(corpus["features"], p["sae_inputs"], corpus_scale(ch, corpus))
    return load_or_train_sae(
        ch.store, x, sae_config(p), key={"inputs": p["sae_inputs"]}, device=ch.device, progress=progress
    )


def concept_strengths(ch: Chapter, sae: SparseAutoencoder, data: Data) -> dict[str, torch.Tensor]:
    """Concept strengths of the probe's train and test images."""
    corpus, train, test, _ = data
    scale = corpus_scale(ch, corpus)
    return {
        s: encode_concepts(sae, dncbm.sae_inputs(d["features"], ch.params["sae_inputs"], scale), device=ch.device)
        for s, d in (("train", train), ("test", test))
    }


def vocabulary_words(ch: Chapter) -> list[str]:
    """The chapter's vocabulary: the ``vocabulary`` file, or the world's words plus distractors."""
    return (
        dncbm.load_vocabulary(ch.params["vocabulary"]) if ch.params["vocabulary"] else dncbm.world_vocabulary(ch.world)
    )


def evaluate(ch: Chapter, data: Data, progress: bool = False) -> dict[str, float]:
    """:func:`conceptlab.dncbm.operating_point` of one DN-CBM run on the chapter's parameters (SAE cached)."""
    return evaluate_many([ch], data, progress)[0]


def evaluate_many(chs: Sequence[Chapter], data: Data, progress: bool = False) -> list[dict[str, float]]:
    """:func:`evaluate` for several parameter sets (a sweep) on the same data (so the same CLIP). Each point is
    kept in the store (kind ``dncbm_point``, keyed by :func:`point_key`), so a sweep's point that an exercise
    repeats, or a rerun, is read back; the points still to compute have their probes fitted together."""
    keys = [point_key(c, data) for c in chs]
    todo = [i for i, (c, key) in enumerate(zip(chs, keys)) if not c.store.finished("dncbm_point", key)]
    computed = dict(zip(todo, _compute_points([chs[i] for i in todo], data, progress))) if todo else {}

    def build(i: int) -> Callable[[Path], Any]:
        def write(d: Path) -> None:
            point = computed[i] if i in computed else _compute_points([chs[i]], data, progress)[0]
            atomic_write_json(d / "point.json", point)

        return write

    return [
        c.store.get_or_build("dncbm_point", key, build(i), lambda d: json.loads((d / "point.json").read_text()))
        for i, (c, key) in enumerate(zip(chs, keys))
    ]


def point_key(ch: Chapter, data: Data) -> dict[str, Any]:
    """What one operating point depends on: the CLIP and input files (``ch.key()``), every parameter of the
    run besides where files go, the content of every tensor of the data (features and ground truth), the
    class names, and the code that computes it (this module, :mod:`conceptlab.dncbm` and
    :mod:`conceptlab.sae`: a point is a result, so editing how it is computed must recompute it)."""
    corpus, train, test, class_names = data
    sources = {"chapter": __file__, "method": dncbm.__file__, "sae": inspect.getfile(SparseAutoencoder)}
    return ch.key(
        code={name: ch.store.fingerprint(path) for name, path in sources.items()},
        params={k: v for k, v in ch.params.items() if k not in ("artifacts_dir", "results_dir")},
        data={
            split: {name: tensor_fingerprint(torch.as_tensor(np.asarray(v))) for name, v in sorted(d.items())}
            for split, d in (("corpus", corpus), ("train", train), ("test", test))
        },
        class_names=list(class_names),
    )


def _compute_points(chs: Sequence[Chapter], data: Data, progress: bool = False) -> list[dict[str, float]]:
    """The operating points of several parameter sets, their probes fitted together and each vocabulary
    embedded once."""
    corpus, train, test, class_names = data
    vocabularies: dict[Any, tuple[list[str], torch.Tensor]] = {}
    runs = [(c, *chapter_sae(c, corpus, progress=progress)) for c in chs]
    strengths = [concept_strengths(c, sae, data) for c, sae, _ in runs]
    probes = dncbm.fit_probes(
        [z["train"] for z in strengths],
        train["labels"],
        [probe_config(c.params) for c in chs],
        len(class_names),
        chs[0].device,
    )
    points = []
    for (c, sae, history), z, probe in zip(runs, strengths, probes):
        scores = None
        if c.params["dataset"] == "world":
            if c.params["vocabulary"] not in vocabularies:
                clip, _, tokenizer, _ = c.clip(progress=progress)
                words = vocabulary_words(c)
                vocabularies[c.params["vocabulary"]] = words, dncbm.embed_vocabulary(clip, tokenizer, words)
            words, embedded = vocabularies[c.params["vocabulary"]]
            names = dncbm.name_concepts(sae.directions, embedded, words)
            scores = dncbm.score_names(z["test"], names, test, class_names, sae.directions, c.params["right_auroc"])
        point = dncbm.operating_point(history, z["test"], test["labels"], probe, scores)
        if scores is not None:  # the share of right names, with its interval over live concepts
            right = _interval(scores.loc[~scores["dead"], "right"].to_numpy(dtype=float), c.params["seed"])
            point |= {"share_right_low": right["low"], "share_right_high": right["high"]}
        points.append({k: v.item() if isinstance(v, np.generic) else v for k, v in point.items()})  # JSON-ready
    return points


def baselines(ch: Chapter, data: Data) -> dict[str, np.ndarray]:
    """Per test image, whether the original's linear probe on the raw CLIP features (no L1) and
    zero-shot classification (normalised embeddings against class-name prompts) are right."""
    _, train, test, class_names = data
    clip, _, tokenizer, _ = ch.clip()
    raw = dncbm.fit_probe(
        train["features"], train["labels"], probe_config(ch.params, lam=0.0), len(class_names), ch.device
    )
    zero_shot = F.normalize(test["features"], dim=-1) @ class_text_weights(clip, tokenizer, class_names).T
    labels = np.asarray(test["labels"])
    return {"raw probe": raw.predict(test["features"]) == labels, "zero-shot": zero_shot.argmax(1).numpy() == labels}


def l1_measurement(ch: Chapter, data: Data) -> pd.DataFrame:
    """:func:`evaluate` at every λ₁ of ``sweep_l1`` and the chapter's own (one row each, SAEs cached)."""
    values = sorted({*ch.params["sweep_l1"], ch.params["sae_l1"]})
    points = evaluate_many([ch.with_params(sae_l1=v) for v in values], data)
    return pd.DataFrame(dict(zip(values, points))).T.rename_axis("sae_l1")


def probe_measurement(ch: Chapter, r: Result) -> pd.DataFrame:
    """The probe refitted at every λ of ``sweep_probe_lambda`` and the chapter's own, on the chapter's
    concepts: accuracy against the concepts a decision needs."""
    _, train, test, class_names = r.data
    rows = {}
    lams = sorted({*ch.params["sweep_probe_lambda"], ch.params["probe_lambda"]})
    cfgs = [probe_config(ch.params, lam) for lam in lams]
    probes = dncbm.fit_probes([r.strengths["train"]] * len(lams), train["labels"], cfgs, len(class_names), ch.device)
    for lam, probe in zip(lams, probes):
        rows[lam] = {
            "accuracy_concept_probe": probe.score(r.strengths["test"], test["labels"]),
            "concepts_per_decision": dncbm.concepts_per_decision(r.strengths["test"], probe),
            "weights_above_1e-3_per_class": dncbm.nonzero_per_class(probe, 1e-3),
        }
    return pd.DataFrame(rows).T.rename_axis("probe_lambda")


def rule_choice(table: pd.DataFrame, raw_accuracy: float, tolerance: float, n_concepts: int | None = None) -> float:
    """The sweep's choice: the largest coefficient (the sparsest setting) whose concept probe stays within
    ``tolerance`` of the raw-feature probe's accuracy and, for an SAE sweep (``n_concepts`` given), that
    leaves at most :data:`DEAD_LIMIT` of the concepts dead (the original resamples dead concepts: a
    dictionary of dead entries is not sparse, it is small); the most accurate one when none qualifies."""
    ok = table["accuracy_concept_probe"].astype(float) >= raw_accuracy - tolerance
    if n_concepts is not None:
        ok &= table["dead_concepts"].astype(float) <= DEAD_LIMIT * n_concepts
    chosen = table.index[ok]
    return float(max(chosen)) if len(chosen) else float(table["accuracy_concept_probe"].astype(float).idxmax())


def original_changes(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that make a run compute what the original code computes, keeping the
    chapter's training length (200 epochs on CC3M is out of a book's reach)."""
    schedule = ("sae_epochs", "sae_batch_size", "sae_resample_every")
    return {k: v for k, v in ORIGINAL_CODE.items() if k not in schedule and params[k] != v}


def original_scale(p: dict[str, Any], dim: int, scale: float) -> dict[str, float | None]:
    """The run's sparsity coefficients as the original code would need them on the raw features:
    λ₁ for a reconstruction averaged over ``dim`` features, the probe's λ for the mean |W| (times
    the number of weights for the paper's sum), both divided by the feature ``scale``."""
    return {
        "sae_l1_original_scale": dncbm.raw_scale_coefficient(
            l1_on_original_scale(p["sae_l1"], p["sae_reconstruction"], dim), scale
        ),
        "probe_lambda_original_scale": dncbm.raw_scale_coefficient(p["probe_lambda"], scale)
        if p["probe_l1"] == "mean"
        else None,
    }


def fidelity_rows(book: dict[str, float], original: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Rows for :func:`conceptlab.chapter.fidelity_table`: the paper, the original code's settings on
    this world, and this book's settings."""
    metrics = (
        "accuracy_concept_probe",
        "accuracy_raw_probe",
        "accuracy_zero_shot",
        "sae_l0",
        "sae_fvu",
        "concepts_per_decision",
        "share_right",
    )
    return {
        m: {"paper": PAPER.get(m), "original code": original.get(m), "this book": book.get(m)}
        for m in metrics
        if m in book
    }


# ---------------------------------------------------------------------------- the chapter's steps
@dataclass
class Result:
    """Everything chapter 5 computes, filled step by step (the notebook shows each step)."""

    data: Data = field(default_factory=lambda: ({}, {}, {}, []))
    scale: float = 1.0
    sae: SparseAutoencoder = field(default_factory=lambda: SparseAutoencoder(1, 1))
    history: list[dict] = field(default_factory=list)
    l1_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    words: list[str] = field(default_factory=list)
    word_embeddings: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    names: pd.DataFrame = field(default_factory=pd.DataFrame)
    strengths: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: pd.DataFrame | None = None  # None on a real data set: no ground truth
    probe: dncbm.LinearProbe = field(default_factory=lambda: dncbm.LinearProbe(np.zeros((0, 0))))
    book: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    probe_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    original: dict[str, float] = field(default_factory=dict)
    truth: dict[str, float] = field(default_factory=dict)
    nulls: pd.DataFrame = field(default_factory=pd.DataFrame)
    tasks: pd.DataFrame = field(default_factory=pd.DataFrame)
    rankings: pd.DataFrame = field(default_factory=pd.DataFrame)
    overlap: dict[str, np.ndarray] = field(default_factory=dict)
    local: dict[str, np.ndarray] = field(default_factory=dict)


def embed(ch: Chapter, r: Result, progress: bool = True) -> Result:
    """Embed the corpus and the probe's images (cached), and fix the features' scale."""
    with ch.stage("embed"):
        r.data = chapter_features(ch, progress=progress)
        r.scale = corpus_scale(ch, r.data[0])
    return r


def discover(ch: Chapter, r: Result, progress: bool = True) -> Result:
    """Train (or load) the chapter's SAE on the corpus."""
    with ch.stage("sae"):
        r.sae, r.history = chapter_sae(ch, r.data[0], progress=progress)
    return r


def sweep_l1(ch: Chapter, r: Result) -> Result:
    """The λ₁ sweep: L0, FVU, dead concepts, probe accuracy, concepts per decision, right names."""
    with ch.stage("l1 sweep"):
        r.l1_table = l1_measurement(ch, r.data)
    return r


def name(ch: Chapter, r: Result, progress: bool = True) -> Result:
    """Name every concept, compute concept strengths, and (on the world) score every name."""
    corpus, train, test, class_names = r.data
    with ch.stage("name"):
        r.words = vocabulary_words(ch)
        clip, _, tokenizer, _ = ch.clip(progress=progress)
        r.word_embeddings = dncbm.embed_vocabulary(clip, tokenizer, r.words)
        r.names = dncbm.name_concepts(r.sae.directions, r.word_embeddings, r.words)
        r.strengths = concept_strengths(ch, r.sae, r.data)
        r.scores = (
            dncbm.score_names(
                r.strengths["test"], r.names, test, class_names, r.sae.directions, ch.params["right_auroc"]
            )
            if ch.on_world
            else None
        )
    return r


def bottleneck(ch: Chapter, r: Result) -> Result:
    """The sparse probe on concept strengths, and the raw-feature and zero-shot baselines."""
    _, train, test, class_names = r.data
    with ch.stage("probe"):
        r.probe = dncbm.fit_probe(
            r.strengths["train"], train["labels"], probe_config(ch.params), len(class_names), ch.device
        )
        r.book = dncbm.operating_point(r.history, r.strengths["test"], test["labels"], r.probe, r.scores)
        r.correct = baselines(ch, r.data)
        r.correct["concept probe"] = r.probe.predict(r.strengths["test"]) == np.asarray(test["labels"])
        r.base = {
            "accuracy_raw_probe": float(r.correct["raw probe"].mean()),
            "accuracy_zero_shot": float(r.correct["zero-shot"].mean()),
        }
    return r


def sweep_probe(ch: Chapter, r: Result) -> Result:
    """The probe-λ sweep on the chapter's concepts."""
    with ch.stage("probe sweep"):
        r.probe_table = probe_measurement(ch, r)
    return r


def compare_original(ch: Chapter, r: Result) -> Result:
    """The same run on the original code's settings (the chapter's training length)."""
    with ch.stage("original"):
        changes = original_changes(ch.params)
        r.original = evaluate(ch.with_params(**changes), r.data) if changes else r.book
    return r


def check_names(ch: Chapter, r: Result) -> Result:
    """Summarise the names' scores against the ground truth, and the same scores by chance (world only)."""
    if r.scores is None:
        return r
    _, _, test, class_names = r.data
    with ch.stage("nulls"):
        r.truth = dncbm.summarise_scores(r.scores)
        r.nulls = dncbm.name_score_nulls(
            r.strengths["test"],
            r.names,
            test,
            class_names,
            ch.params["right_auroc"],
            n_draws=ch.params["n_null"],
            seed=ch.params["seed"],
        )
    return r


def task_agnosticity(ch: Chapter, r: Result) -> Result:
    """A second task (the habitat) on the same concept strengths (world only)."""
    if not ch.on_world:
        return r
    _, train, test, _ = r.data
    with ch.stage("tasks"):
        n_hab = int(train["habitats"].max()) + 1
        habitat = dncbm.fit_probe(r.strengths["train"], train["habitats"], probe_config(ch.params), n_hab, ch.device)
        raw_habitat = dncbm.fit_probe(
            train["features"], train["habitats"], probe_config(ch.params, 0.0), n_hab, ch.device
        )
        truth = np.asarray(test["habitats"])
        r.correct["habitat concept probe"] = habitat.predict(r.strengths["test"]) == truth
        r.correct["habitat raw probe"] = raw_habitat.predict(test["features"]) == truth
        r.tasks = pd.DataFrame(
            [
                {
                    "task": "class",
                    "concepts": r.book["accuracy_concept_probe"],
                    "raw features": r.base["accuracy_raw_probe"],
                },
                {
                    "task": "habitat",
                    "concepts": float(r.correct["habitat concept probe"].mean()),
                    "raw features": float(r.correct["habitat raw probe"].mean()),
                },
            ]
        ).set_index("task")
    return r


def explain(ch: Chapter, r: Result, k: int = 4) -> Result:
    """Global explanations ranked two ways (probe weight, the original's mean strength) with their
    agreement by concept and by name; on the world, local explanations checked against each image."""
    _, _, test, class_names = r.data
    names = r.names["name"].tolist()
    by_weight = dncbm.global_explanation(r.probe, names, class_names, k=k)
    by_strength = dncbm.global_explanation_by_strength(r.strengths["test"], test["labels"], names, class_names, k=k)
    r.rankings = dncbm.rankings_side_by_side(by_weight, by_strength)
    r.overlap = {by: dncbm.ranking_overlap(by_weight, by_strength, by) for by in ("concept", "name")}
    if ch.on_world:
        permutation = np.random.default_rng(ch.params["seed"]).permutation(len(test["labels"]))
        r.local = {
            "true": dncbm.local_truth(r.strengths["test"], r.probe, names, test, class_names),
            "chance": dncbm.local_truth(
                r.strengths["test"], r.probe, names, test, class_names, permutation=permutation
            ),
        }
    return r


def run(ch: Chapter, progress: bool = False) -> Result:
    """The whole chapter, step by step as in the notebook."""
    r = Result()
    embed(ch, r, progress=progress)
    discover(ch, r, progress=progress)
    sweep_l1(ch, r)
    name(ch, r, progress=progress)
    for step in (bottleneck, sweep_probe, compare_original, check_names, task_agnosticity, explain):
        step(ch, r)
    return r


# ---------------------------------------------------------------------------- results, headline, summary
def _interval(values: np.ndarray, seed: int) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    low, high = bootstrap_interval(values, seed=seed)
    return {"value": float(values.mean()) if len(values) else float("nan"), "low": low, "high": high}


def _band(draws: pd.Series) -> dict[str, float]:
    return {"mean": float(draws.mean()), "low": float(draws.quantile(0.025)), "high": float(draws.quantile(0.975))}


def _agreement(overlap: np.ndarray, seed: int) -> dict[str, float]:
    """The diagonal's mean with its bootstrap interval over classes, and the off-diagonal mean (chance)."""
    off = overlap[~np.eye(len(overlap), dtype=bool)]
    return {**_interval(np.diag(overlap), seed), "chance": float(off.mean()) if len(off) else float("nan")}


def accuracy_blocks(ch: Chapter, r: Result) -> dict[str, dict[str, float]]:
    """The probe's accuracy, its gap to the raw-feature probe and the concepts per decision, with intervals."""
    seed = ch.params["seed"]
    gap, low, high = paired_difference_interval(r.correct["concept probe"], r.correct["raw probe"], seed=seed)
    out = {
        "accuracy_concept_probe_interval": _interval(r.correct["concept probe"], seed),
        "accuracy_gap_to_raw_probe": {"value": gap, "low": low, "high": high},
        "concepts_per_decision_interval": _interval(dncbm.decision_sizes(r.strengths["test"], r.probe), seed),
    }
    if "habitat concept probe" in r.correct:  # the second task (world only), paired over the same test images
        gap, low, high = paired_difference_interval(
            r.correct["habitat concept probe"], r.correct["habitat raw probe"], seed=seed
        )
        out["habitat_gap_to_raw_probe"] = {"value": gap, "low": low, "high": high}
    return out


def name_blocks(ch: Chapter, r: Result) -> dict[str, Any]:
    """The shares of :func:`conceptlab.dncbm.summarise_scores` with intervals over live concepts, and
    their nulls (world only)."""
    if r.scores is None:
        return {}
    seed, live = ch.params["seed"], r.scores[~r.scores["dead"]]
    return {
        "share_right_interval": _interval(live["right"].to_numpy(dtype=float), seed),
        "share_oracle_detects_something_interval": _interval((live["best_auroc"] >= 0.75).to_numpy(float), seed),
        "share_top_images_show_name_interval": _interval((live["top_precision"] >= 0.9).to_numpy(float), seed),
        "nulls": {k: _band(r.nulls[k]) for k in r.nulls},
    }


def explanation_blocks(ch: Chapter, r: Result) -> dict[str, Any]:
    """Agreement of the two global rankings (by concept, by name) and, on the world, how often a local
    explanation's names are true of the image, each with its chance."""
    seed = ch.params["seed"]
    out = {
        "global_rankings_shared_concepts_top4": _agreement(r.overlap["concept"], seed),
        "global_rankings_shared_names_top4": _agreement(r.overlap["name"], seed),
    }
    if ch.on_world:
        out |= {
            "local_explanations_true": _interval(r.local["true"], seed),
            "local_explanations_true_chance": _interval(r.local["chance"], seed),
        }
    return out


def results(ch: Chapter, r: Result) -> dict[str, Any]:
    """The results JSON's ``results`` block."""
    corpus, _, _, _ = r.data
    dim = corpus["features"].shape[1]
    l0 = [h["l0"] for h in r.history]
    tail = max(1, len(l0) // 10)
    out = {
        "n_corpus": len(corpus["features"]),
        "embedding_dim": dim,
        "n_concepts": r.sae.n_concepts,
        "vocabulary_size": len(r.words),
        "raw_embedding_norm": float(corpus["features"].norm(dim=-1).mean()),
        "feature_scale": r.scale,
        "sae_l1": ch.params["sae_l1"],
        "probe_lambda": ch.params["probe_lambda"],
        **original_scale(ch.params, dim, r.scale),
        "sae_final_fvu": r.history[-1]["fvu"],
        "sae_final_l0": r.history[-1]["l0"],
        "sae_l0_drop_last_tenth": (l0[-1 - tail] - l0[-1]) / l0[-1 - tail] if len(l0) > tail else 0.0,
        "coverage_energy": COVERAGE,
        **r.base,
        **{k: v for k, v in r.book.items() if k not in ("sae_l0", "sae_fvu")},
        **r.truth,
        **accuracy_blocks(ch, r),
        **name_blocks(ch, r),
        **explanation_blocks(ch, r),
        "original_code": r.original,
        "sae_l1_by_the_rule": rule_choice(
            r.l1_table, r.base["accuracy_raw_probe"], ch.params["tolerance"], r.sae.n_concepts
        ),
        "probe_lambda_by_the_rule": rule_choice(r.probe_table, r.base["accuracy_raw_probe"], ch.params["tolerance"]),
        "l1_sweep": {f"{k:g}": v for k, v in r.l1_table.astype(float).to_dict(orient="index").items()},
        "probe_sweep": {f"{k:g}": v for k, v in r.probe_table.astype(float).to_dict(orient="index").items()},
    }
    if ch.on_world:
        out["tasks"] = r.tasks.to_dict(orient="index")
    return out


def _reported(block: dict[str, float], chance: float | None, paper: float | None = None, note: str = "") -> Reported:
    return Reported(block["value"], block["low"], block["high"], chance=chance, paper=paper, note=note)


def accuracy_reported(ch: Chapter, r: Result) -> dict[str, Reported]:
    """The bottleneck's headline rows: accuracy, the gap to the raw-feature probe, concepts per decision, L0."""
    res, n_classes = accuracy_blocks(ch, r), len(r.data[3])
    return {
        "concept-probe accuracy": _reported(
            res["accuracy_concept_probe_interval"],
            1 / n_classes,
            PAPER["accuracy_concept_probe"],
            "bootstrap over test images; one SAE seed; paper: ImageNet, RN50",
        ),
        "accuracy gap to the raw-feature probe": _reported(
            res["accuracy_gap_to_raw_probe"],
            None,
            PAPER["accuracy_concept_probe"] - PAPER["accuracy_raw_probe"],
            "paired bootstrap over test images; no chance level (a difference of two accuracies), the reference "
            "is 0: a gap whose interval holds 0 is no finding",
        ),
        "concepts per decision (90 % of the evidence)": _reported(
            res["concepts_per_decision_interval"],
            None,
            None,
            f"bootstrap over test images; of {r.sae.n_concepts} concepts, no chance level (a count, not a score); "
            "the paper gives no such count",
        ),
        "active concepts per image (L0)": Reported(
            r.history[-1]["l0"],
            note=(
                f"last training epoch, of {r.sae.n_concepts} concepts on a {r.data[0]['features'].shape[1]}-"
                "dimensional embedding; one SAE, so no interval, and no chance level (a count); the paper reports "
                "no L0"
            ),
        ),
    }


def names_reported(ch: Chapter, r: Result) -> dict[str, Reported]:
    """The names' headline rows, each beside its null (world only)."""
    if not ch.on_world:
        return {}
    res = name_blocks(ch, r)
    nulls = res["nulls"]
    return {
        "share of right names": _reported(
            res["share_right_interval"],
            nulls["share_right"]["mean"],
            None,
            "bootstrap over live concepts; chance: the names shuffled among them; the paper checks no names",
        ),
        "share where some word is right (oracle)": _reported(
            res["share_oracle_detects_something_interval"],
            nulls["share_oracle_detects_something"]["mean"],
            None,
            "best-of-all-words AUROC ≥ 0.75; chance: the same with the images shuffled",
        ),
        "share whose top images show the name": _reported(
            res["share_top_images_show_name_interval"],
            nulls["share_top_images_show_name"]["mean"],
            None,
            "precision ≥ 0.9 of the 20 top images; chance: the images shuffled",
        ),
    }


def explanations_reported(ch: Chapter, r: Result) -> dict[str, Reported]:
    """The explanations' headline rows: local explanations true of the image, global rankings' agreement."""
    res = explanation_blocks(ch, r)
    out = {}
    if ch.on_world:
        out["local explanations true of the image"] = _reported(
            res["local_explanations_true"],
            res["local_explanations_true_chance"]["value"],
            None,
            "share of an image's top-5 checkable names true of it; chance: checked on another image",
        )
    agree = res["global_rankings_shared_names_top4"]
    out["global rankings: shared names in the top 4"] = _reported(
        agree, agree["chance"], None, "bootstrap over classes; chance: the rankings of two different classes"
    )
    return out


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """The chapter's headline numbers with their intervals, chance and the paper's numbers."""
    return {**accuracy_reported(ch, r), **names_reported(ch, r), **explanations_reported(ch, r)}


def _finding(block: dict[str, float], reference: float) -> bool:
    return excludes(block["low"], block["high"], reference)


def gap_verdict(gap: dict[str, float]) -> str:
    """A concept probe's accuracy minus the raw-feature probe's, in words: a change is only one beyond its
    interval."""
    if gap["high"] < 0:
        return "the bottleneck loses accuracy beyond the interval"
    if gap["low"] > 0:
        return "the bottleneck gains accuracy beyond the interval"
    return "within noise: no loss or gain beyond the interval"


def habitat_sentence(concepts: float, raw: float, gap: dict[str, float]) -> str:
    """The second task (the habitat) on the same concept strengths, against a raw-feature probe."""
    return (
        f"On the second task, the habitat, the same concepts reach {concepts:.1%} against the raw-feature "
        f"probe's {raw:.1%}, a gap of {gap['value']:+.3f} ({gap['low']:+.3f} to {gap['high']:+.3f}, paired "
        f"bootstrap over test images): {gap_verdict(gap)}."
    )


def original_names_sentence(book: dict[str, float], original: dict[str, float]) -> str:
    """The original code's share of right names against this book's, each with its interval over live
    concepts (``book``: value, low, high; ``original``: the original run's ``share_right``, ``_low``, ``_high``)."""
    value, low, high = original["share_right"], original["share_right_low"], original["share_right_high"]
    side = "higher than" if value > book["value"] else "lower than" if value < book["value"] else "equal to"
    apart = low > book["high"] or high < book["low"]
    return (
        f"The original code's settings name {value:.1%} ({low:.1%}–{high:.1%}) of their live concepts right, "
        f"{side} this book's {book['value']:.1%} ({book['low']:.1%}–{book['high']:.1%}): "
        + ("the two intervals do not overlap." if apart else "the two intervals overlap, so this is no finding.")
    )


def summary(ch: Chapter, r: Result) -> list[str]:
    """Two or three sentences answering the chapter's question, then the numbers; every number from
    :func:`results`."""
    res = results(ch, r)
    where = "Concept World" if ch.on_world else "this data set"
    gap = res["accuracy_gap_to_raw_probe"]
    lines = []
    if ch.on_world:
        right, chance = res["share_right_interval"], res["nulls"]["share_right"]
        verdict = "above" if right["low"] > chance["high"] else "not clearly above"
        lines.append(
            f"Are the names right? On {where}, {res['share_right']:.1%} of the live concepts carry a name "
            f"the ground truth confirms ({right['low']:.1%}–{right['high']:.1%}), {verdict} the "
            f"{chance['mean']:.1%} that the same names shuffled among the concepts reach."
        )
        if "share_right" in res["original_code"]:
            lines.append(original_names_sentence(right, res["original_code"]))
    else:
        lines.append(f"On {where} there is no ground truth: the names are shown, not checked.")
    said = "a real difference" if _finding(gap, 0.0) else "within noise"
    lines.append(
        f"Does the bottleneck explain? The concept probe reaches {res['accuracy_concept_probe']:.1%} against "
        f"the raw-feature probe's {res['accuracy_raw_probe']:.1%}, a gap of {gap['value']:+.3f} "
        f"({gap['low']:+.3f} to {gap['high']:+.3f}): {said}. A decision needs "
        f"{res['concepts_per_decision']:.1f} concepts for {res['coverage_energy']:.0%} of its evidence, with "
        f"{res['sae_final_l0']:.1f} active per image on a {res['embedding_dim']}-dimensional embedding."
    )
    if "habitat_gap_to_raw_probe" in res:
        habitat = res["tasks"]["habitat"]
        lines.append(habitat_sentence(habitat["concepts"], habitat["raw features"], res["habitat_gap_to_raw_probe"]))
    points = 100 * ch.params["tolerance"]
    tol = (
        f"within {points:g} point{'' if points == 1 else 's'} of the raw-feature probe's accuracy, "
        f"with at most {DEAD_LIMIT:.0%} of the SAE's concepts dead"
    )
    lines.append(
        f"The operating point: features scaled by {res['feature_scale']:.3f} ('{ch.params['sae_scale']}'), "
        f"λ₁ = {res['sae_l1']:g} (that is {res['sae_l1_original_scale']:.3g} on the original code's raw "
        f"scale) and probe λ = {res['probe_lambda']:g}; the sweeps' rule (the sparsest setting {tol}) "
        f"picks λ₁ = {res['sae_l1_by_the_rule']:g} and probe λ = {res['probe_lambda_by_the_rule']:g}. "
        f"The original's settings give L0 {res['original_code']['sae_l0']:.1f} and "
        f"{res['original_code']['concepts_per_decision']:.1f} concepts per decision here."
    )
    names, concepts = res["global_rankings_shared_names_top4"], res["global_rankings_shared_concepts_top4"]
    lines.append(
        f"Ranked the original way (mean strength) and by probe weight, a class's top 4 share "
        f"{concepts['value']:.2f} concepts and {names['value']:.2f} names (two unrelated classes: "
        f"{names['chance']:.2f} names)."
    )
    if ch.on_world:
        local, local_chance = res["local_explanations_true"], res["local_explanations_true_chance"]
        lines.append(
            f"Of an image's top 5 checkable explaining names, {local['value']:.1%} are true of it "
            f"({local_chance['value']:.1%} when checked on another image); for "
            f"{res['share_oracle_detects_something']:.1%} of the concepts some word would have been right "
            f"(chance {res['nulls']['share_oracle_detects_something']['mean']:.1%})."
        )
    if res["sae_l0_drop_last_tenth"] > 0.05:
        lines.append(
            f"L0 still fell by {res['sae_l0_drop_last_tenth']:.1%} over the last tenth of training: "
            "the SAE has not converged."
        )
    return lines


# ---------------------------------------------------------------------------- exercises
def exercise_sae(ch: Chapter) -> dict[str, float]:
    """Exercise: retrain the SAE with changed parameters (``sae_l1``, ``sae_expansion``, ``sae_inputs`` ...)
    and report what moves. The chapter's own setting is a cache hit."""
    return evaluate(ch, chapter_features(ch, progress=False))


def exercise_probe(ch: Chapter) -> dict[str, float]:
    """Exercise: refit only the probe (``probe_lambda``, ``probe_l1``, ``probe_solver``) on the
    chapter's concepts: accuracy against sparsity."""
    out = evaluate(ch, chapter_features(ch, progress=False))
    return {k: out[k] for k in ("accuracy_concept_probe", "concepts_per_decision", "weights_above_1e-3_per_class")}


# ---------------------------------------------------------------------------- figures
def training_curves(history: list[dict]) -> plt.Figure:
    """The SAE's unexplained variance, active concepts per image and dead concepts per epoch."""
    hist = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    titles = ["unexplained variance (FVU)", "active concepts per image (L0)", "dead concepts"]
    for ax, col, title in zip(axes, ["fvu", "l0", "dead"], titles):
        plots.curve(hist.dropna(subset=[col]).to_dict("records"), col, x="epoch", smooth=1, ax=ax)
        ax.set_title(title)
    fig.tight_layout()
    return fig


def l1_sweep_figure(table: pd.DataFrame, default: float) -> plt.Figure:
    """Every measure of the λ₁ sweep against λ₁ (log scale), the chapter's default marked."""
    columns = {
        "sae_l0": "active concepts per image (L0)",
        "sae_fvu": "unexplained variance (FVU)",
        "dead_concepts": "dead concepts",
        "share_right": "share of right names",
        "accuracy_concept_probe": "concept-probe accuracy",
        "concepts_per_decision": "concepts per decision",
    }
    columns = {k: v for k, v in columns.items() if k in table}
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
    for ax in axes.flat[len(columns) :]:
        ax.set_axis_off()
    for ax, (col, title) in zip(axes.flat, columns.items()):
        ax.plot(table.index, table[col].astype(float), marker="o")
        ax.axvline(default, color="grey", ls="--", lw=1)
        ax.set(xscale="log", xlabel="λ₁", title=title)
    fig.suptitle("the λ₁ sweep (dashed: the chapter's default)", y=1.02)
    fig.tight_layout()
    return fig


def probe_sweep_figure(table: pd.DataFrame, raw_accuracy: float, default: float) -> plt.Axes:
    """Accuracy against concepts per decision for every probe λ, the raw-feature probe as a line."""
    ax = plt.subplots(figsize=(5.5, 3.4))[1]
    ax.plot(table["concepts_per_decision"], table["accuracy_concept_probe"], marker="o")
    for lam, row in table.iterrows():
        ax.annotate(
            f"λ={lam:g}" + (" (default)" if lam == default else ""),
            (row["concepts_per_decision"], row["accuracy_concept_probe"]),
            fontsize=8,
        )
    ax.axhline(raw_accuracy, color="grey", ls="--", lw=1, label="probe on raw CLIP features")
    ax.set(xlabel="concepts per decision (90 % of the evidence)", ylabel="test accuracy")
    ax.legend(fontsize=8)
    return ax


def names_against_oracle(scores: pd.DataFrame) -> plt.Axes:
    """Each live concept: the AUROC of its own name against the best AUROC any checkable word reaches."""
    live = scores[~scores["dead"]]
    ax = sns.scatterplot(live.fillna({"auroc": 0.5}), x="best_auroc", y="auroc", hue="kind", s=18)
    ax.plot([0.5, 1], [0.5, 1], color="grey", lw=1, ls="--")
    ax.set(xlabel="oracle AUROC (best checkable word)", ylabel="AUROC of its own name (0.5 if uncheckable)")
    ax.legend(fontsize=8, bbox_to_anchor=(1, 1))
    return ax


def names_by_kind(scores: pd.DataFrame) -> pd.DataFrame:
    """Live concepts grouped by the kind of their name: how many, the share right, median AUROCs."""
    live = scores[~scores["dead"]]
    return live.groupby("kind").agg(
        concepts=("concept", "size"),
        right=("right", "mean"),
        median_auroc=("auroc", "median"),
        oracle_auroc=("best_auroc", "median"),
        top_precision=("top_precision", "median"),
    )


def concept_view(ch: Chapter, r: Result, concept: int, n_images: int = 6) -> plt.Figure:
    """One concept at a glance: its name, the nearest vocabulary words, and the ``n_images`` test
    images on which it fires most, rendered again from the world."""
    words, strengths = r.words, r.strengths["test"]
    sims = F.normalize(r.sae.directions[concept].float(), dim=-1) @ F.normalize(r.word_embeddings.float(), dim=-1).T
    nearest = sims.topk(min(5, len(words)))
    col = strengths[:, concept]
    top = [int(i) for i in col.argsort(descending=True)[:n_images] if col[i] > 0]
    fig, axes = plt.subplots(1, n_images + 1, figsize=(2.0 * (n_images + 1), 2.4))
    lines = [f"concept #{concept}: {r.names['name'][concept]}", f"fires on {(col > 0).float().mean():.1%}", ""]
    lines += [f"{words[j]}  {s:.2f}" for s, j in zip(nearest.values.tolist(), nearest.indices.tolist())]
    axes[0].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes[1:], top):
        ax.imshow(ch.world.sample(1, "test", start=i).images[0])
        ax.set_title(f"{col[i]:.2f}", fontsize=8)
    return fig


def most_used_concepts(r: Result, n: int = 20) -> list[tuple[str, int]]:
    """The ``n`` concepts the probe relies on most, as ``(label, concept)`` menu options."""
    most_used = np.argsort(-np.abs(r.probe.coef_).sum(0))[:n]
    return [(f"#{j} {r.names['name'][j]}", int(j)) for j in most_used]


def local_explanations(ch: Chapter, r: Result, images: Sequence[int] = (0, 1, 2), k: int = 6) -> plt.Figure:
    """Test images (on the world) with their top ``k`` contributions (strength x weight) to the predicted class."""
    _, _, test, class_names = r.data
    rows = 2 if ch.on_world else 1
    fig, axes = plt.subplots(rows, len(images), figsize=(4.2 * len(images), 6.5 if ch.on_world else 3.2), squeeze=False)
    for col, i in enumerate(images):
        z = r.strengths["test"][i].numpy()
        expl = dncbm.local_explanation(z, r.probe, r.names["name"].tolist(), k=k)
        pred = class_names[int(r.probe.predict(z[None])[0])]
        labels = [f"{n} #{c}" for n, c in zip(expl["name"], expl["concept"])]
        sns.barplot(x=expl["contribution"], y=labels, ax=axes[-1, col], color="C0")
        axes[-1, col].set(ylabel="", title=f"true {class_names[int(test['labels'][i])]}, predicted {pred}")
        if ch.on_world:
            axes[0, col].imshow(ch.world.sample(1, "test", start=i).images[0])
            axes[0, col].set_axis_off()
    fig.tight_layout()
    return fig


__all__ = [
    "NAME",
    "ORIGINAL_CODE",
    "PAPER",
    "PARAMETERS",
    "SWITCHES",
    "Result",
    "default_probe_config",
    "headline",
    "probe_config",
    "results",
    "run",
    "summary",
]
