"""Chapter 4, EX2: parameters, switches, the run (every step cached), results, headline and summary.

The method itself (reward, GRPO alignment, generation, inspection, the paired gain, the target mix)
is :mod:`conceptlab.ex2`; the world's language model is :mod:`conceptlab.textlm`, the judges
:mod:`conceptlab.judges`. The run, in order: the VLM's reward and the LM; what the LM knows (a gate
before RL, on the world); the VLM's preference per kind of sentence and the mix RL should reach;
alignment; a fixed set of samples before and after (paired gain); inspection; the planted VLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import ex2
from .. import verdict as vd
from ..artifacts import atomic_write_json, fingerprint
from ..chapter import SOURCE_COLUMN, Chapter, Param, Switch
from ..judges import WorldJudge, judge_problem, make_judge
from ..reliance import rank_correlation
from ..stats import bootstrap_interval, excludes, permutation_band, seed_interval
from ..textlm import WorldLMConfig, count_parameters, load_lm, world_lm
from ..world import ConceptWorld, WorldConfig
from .report import Reported
from .verdict import planted_recipe, planted_recipe_parameters

NAME = "04_ex2"
STAGES = ("before", "after")


def _lm_problem(value: str, params: dict) -> str | None:
    if value == "world":
        return (
            None
            if params["dataset"] == "world"
            else ("lm='world' knows only Concept World: with real data pass a transformers causal LM name or folder")
        )
    if value.startswith((".", "/", "~")) and not Path(value).expanduser().is_dir():
        return f"{value!r} is no folder with a transformers model (save_pretrained writes one)"
    return None


def _judge_problem(value: str, params: dict) -> str | None:
    return judge_problem(value, params["judge_api_key_env"], on_world=params["dataset"] == "world")


def _config_problem(cls: type, **fields) -> str | None:
    try:
        cls(**fields)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _on_world(p: dict) -> bool:
    return p["dataset"] == "world"


def _world_lm(p: dict) -> bool:
    return p["lm"] == "world"


def _planted(p: dict) -> bool:
    return p["dataset"] == "world" and p["model"] == "world" and p["planted"]


PLANTED_CONDITIONS = ("shortcut", "habitat-unnamed")  # what a planted CLIP may differ in from the no-shortcut one


def _planted_problem(value: bool, p: dict) -> str | None:
    try:
        n = WorldConfig(**p["world"]).n_classes
    except (TypeError, ValueError):
        return None  # the world parameter reports its own problem
    if value and _planted(p) and p["lm"] == "world" and n < vd.PLANTED_CLASSES:
        return (
            f"the planted CLIPs know {vd.PLANTED_CLASSES} classes and the world LM only the world's {n}: "
            f"use a world of at least {vd.PLANTED_CLASSES} classes, or planted=False"
        )
    return None


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub"), help="images of the reward"),
    "data_root": Param(None, "dir", applies=lambda p: p["dataset"] != "world", help="a real data set's folder"),
    "images_per_class": Param(256, int, min=1, help="images of a class in its reward (the original: 256)"),
    "templates": Param(
        None,
        "file",
        check=lambda v, p: ex2.templates_problem(v),
        help="JSON list of query templates (the original's mult_template_v1.json); None: the book's",
    ),
    "lm": Param("world", str, check=_lm_problem, help="'world' or a transformers causal LM name/folder"),
    "lm_quantization": Param(None, str, choices=("8bit", "4bit"), help="bitsandbytes weights (GPU only)"),
    "lm_corpus_size": Param(6000, int, min=10, applies=_world_lm, help="query documents in the world corpus"),
    "lm_fact_sheets": Param(40, int, min=0, applies=_world_lm, help="copies of each class's fact sheet"),
    "lm_answer_mix": Param(
        dict(WorldLMConfig().answer_mix),
        dict,
        applies=_world_lm,
        check=lambda v, p: _config_problem(WorldLMConfig, answer_mix=v),
    ),
    "lm_steps": Param(600, int, min=1, applies=_world_lm),
    "lm_min_true_share": Param(
        0.9,
        float,
        min=0.0,
        max=1.0,
        applies=_world_lm,
        help="the gate before RL: share of the LM's claims that must be true",
    ),
    "lora_r": Param(0, int, min=0, help="> 0: GRPO trains LoRA adapters of this rank"),
    "grpo_steps": Param(80, int, min=1),
    "grpo_lr": Param(3e-4, float, min=0.0),
    "grpo_beta": Param(0.2, float, min=0.0, help="KL coefficient (the original PPO run started at 0.2)"),
    "num_generations": Param(8, int, min=2),
    "prompts_per_step": Param(4, int, min=1, help="prompts of different classes per GRPO step"),
    "max_new_tokens": Param(32, int, min=1),
    "samples_per_query": Param(2, int, min=1, help="fixed samples per query before and after alignment"),
    "null_draws": Param(
        3, int, min=1, help="further independent draws of the pretrained LM on the same slots: the null"
    ),
    "preference_sentences": Param(
        32, int, min=2, applies=_on_world, help="sentences per kind and class for the VLM's preference"
    ),
    "judge": Param(
        "world",
        str,
        check=_judge_problem,
        help="'world', a transformers model name/folder, or 'openai:<model>@<base_url>'",
    ),
    "judge_api_key_env": Param("OPENAI_API_KEY", str, applies=lambda p: p["judge"].startswith("openai:")),
    "judge_min_true": Param(
        1,
        int,
        min=1,
        applies=lambda p: p["judge"] == "world",
        help="true facts the world judge needs to call a description informative",
    ),
    "n_counterfactual": Param(512, int, min=8, applies=_on_world),
    "planted": Param(
        True,
        bool,
        applies=_on_world,
        check=_planted_problem,
        help="also run EX2 on chapter 7's planted shortcut and no-shortcut CLIPs (they differ in one setting)",
    ),
    "planted_seeds": Param(3, int, min=1, applies=_planted, help="planted CLIPs per condition (chapter 7's seeds)"),
    "planted_condition": Param(
        "shortcut",
        str,
        choices=PLANTED_CONDITIONS,
        applies=_planted,
        help="the planted CLIP set against the no-shortcut one: the habitat shortcut in its training images, or "
        "no habitat captions in its training text (the positive control, exercise 6)",
    ),
    "planted_reward_habitat": Param(
        None,
        float,
        min=0.0,
        max=1.0,
        applies=_planted,
        help="habitat correlation of the planted VLMs' reward images; None: the chapter's world's",
    ),
    "planted_n_images": Param(
        256, int, min=8, applies=_planted, help="test images measuring their habitat reliance (chapter 7's n_images)"
    ),
    **planted_recipe_parameters(_planted),
}

ORIGINAL_LM = "mistralai/Mistral-7B-v0.1"
ORIGINAL_JUDGE = "openai:gpt-3.5-turbo-1106@https://api.openai.com/v1"
SWITCHES: dict[str, Switch] = {
    "templates": Switch(
        "mult_template_v1.json",
        "mult_template_v1.json",
        "the queries the LM answers; None uses the book's own 25 in the same spirit",
        source="BatsResearch/ex2:utils.py#L61-L70",
    ),
    "lm": Switch(
        ORIGINAL_LM,
        ORIGINAL_LM,
        "which LM writes the descriptions",
        source="BatsResearch/ex2:train.py#L25; BatsResearch/ex2:train_runner.sh#L10",
    ),
    "lora_r": Switch(
        16, 16, "LoRA rank (0: all weights train, as the world LM is tiny)", source="BatsResearch/ex2:train.py#L47"
    ),
    "grpo_beta": Switch(
        0.2,
        0.2,
        "KL coefficient (the original's is adaptive, starting at 0.2)",
        source="BatsResearch/ex2:train.py#L39-L40",
    ),
    "max_new_tokens": Switch(
        32,
        32,
        "length of a description in tokens",
        source="BatsResearch/ex2:train.py#L141; BatsResearch/ex2:inference.py#L83",
    ),
    "images_per_class": Switch(
        256,
        256,
        "images of a class in its reward",
        source="BatsResearch/ex2:train.py#L70; BatsResearch/ex2:train.py#L196",
    ),
    "judge": Switch(
        "ChatGPT",
        ORIGINAL_JUDGE,
        "who answers the inspection questions",
        source="BatsResearch/ex2:inspection.py#L74-L85",
    ),
}
# Differences that no parameter switches (the book cannot run the original's stack).
FIXED_DIFFERENCES: dict[str, dict[str, str]] = {
    "alignment": {
        "this run": "GRPO (trl GRPOTrainer)",
        "paper": "PPO",
        "original code": "PPO (trl 0.7 API)",
        "what it changes": "trl removed that PPO API; GRPO optimises the same reward with a KL "
        "penalty, comparing completions of one query instead of a value head",
        SOURCE_COLUMN: "BatsResearch/ex2:README.md#L20; BatsResearch/ex2:train.py#L156-L164; "
        "BatsResearch/ex2:train.py#L241",
    },
    "reward scale": {
        "this run": "cosine",
        "paper": "mean similarity",
        "original code": "100 x cosine",
        "what it changes": "nothing for GRPO, which standardises rewards within a group",
        SOURCE_COLUMN: "BatsResearch/ex2:image_text_reward.py#L5-L10; BatsResearch/ex2:hf_clip_wrapper.py#L120-L125",
    },
    "prompts per step": {
        "this run": "one class per prompt, classes in turn",
        "paper": "not stated",
        "original code": "shuffled queries",
        "what it changes": "every step's reward mixes the classes equally",
        SOURCE_COLUMN: "BatsResearch/ex2:utils.py#L66-L72; BatsResearch/ex2:train.py#L156-L164; "
        "BatsResearch/ex2:train.py#L208",
    },
    "attribute question": {
        "this run": "second judge question",
        "paper": "attribute analysis",
        "original code": "not released",
        "what it changes": "how informative descriptions are sorted into types (the original's second "
        "question is not released: its inspection script asks only the first)",
        SOURCE_COLUMN: "",
    },
    "false descriptions": {
        "this run": "own category (world)",
        "paper": "not separated",
        "original code": "not separated",
        "what it changes": "informative-but-false text is never counted as spurious",
        SOURCE_COLUMN: "BatsResearch/ex2:inspection.py#L34-L36",
    },
}


def differences(ch: Chapter) -> pd.DataFrame:
    """The run's differences from the original: the switches in effect, then the fixed differences."""
    table = ch.differences(SWITCHES)
    if ch.params["templates"] is None:
        table.loc["templates", "this run"] = "the book's 25 (ex2.TEMPLATES)"
    for name, row in FIXED_DIFFERENCES.items():
        table.loc[name] = {**row, "this run follows": "neither"}
    return table


def lm_config(p: dict) -> WorldLMConfig:
    """The world LM's configuration from the chapter's parameters."""
    return WorldLMConfig(
        n_classes=WorldConfig(**p["world"]).n_classes,
        corpus_size=p["lm_corpus_size"],
        fact_sheets=p["lm_fact_sheets"],
        answer_mix=p["lm_answer_mix"],
        steps=p["lm_steps"],
        seed=p["seed"],
    )


def align_config(p: dict) -> ex2.AlignConfig:
    """GRPO's configuration from the chapter's parameters."""
    return ex2.AlignConfig(
        steps=p["grpo_steps"],
        lr=p["grpo_lr"],
        beta=p["grpo_beta"],
        num_generations=p["num_generations"],
        prompts_per_step=p["prompts_per_step"],
        max_new_tokens=p["max_new_tokens"],
        lora_r=p["lora_r"],
        seed=p["seed"],
    )


def chapter_reward(
    ch: Chapter, clip_bundle=None, key: dict | None = None, world: ConceptWorld | None = None
) -> tuple[ex2.CLIPReward, list[str], dict]:
    """``(reward, class names, reward key)`` of the chapter's VLM (or of ``clip_bundle``, identified by
    ``key``), on the chapter's images (or ``world``'s); the class means of the image embeddings are cached
    in the store."""
    from ..data import load_dataset

    p = ch.params
    clip, preprocess, tokenizer, _ = clip_bundle or ch.clip()
    key = {**(key or ch.key()), "dataset": p["dataset"], "images_per_class": p["images_per_class"]}
    if world is not None:
        key["reward_world"] = world.config.to_dict()
    if p["dataset"] == "world":
        world = world or ch.world
        names = world.class_names
        means = lambda: ex2.world_class_embeddings(clip, world, p["images_per_class"])  # noqa: E731
    else:
        images = load_dataset(p["dataset"], p["data_root"], "test")
        names = images.class_names
        means = lambda: ex2.dataset_class_embeddings(clip, preprocess, images, p["images_per_class"])  # noqa: E731
    class_means = ch.store.get_or_build(
        "ex2_class_means",
        key,
        lambda d: torch.save(means(), d / "means.pt"),
        lambda d: torch.load(d / "means.pt", weights_only=True),
    )
    return ex2.CLIPReward(clip, tokenizer, class_means), list(names), key


def chapter_lm(ch: Chapter, templates: Sequence[str], progress: bool = True) -> tuple[Any, Any, dict, list]:
    """``(model, tokenizer, key, pretraining history)`` of the chapter's language model."""
    p = ch.params
    if p["lm"] == "world":
        cfg = lm_config(p)
        model, tokenizer, history = world_lm(ch.store, cfg, templates, progress=progress)
        return model, tokenizer, {"lm": "world", **asdict(cfg), "templates": list(templates)}, history
    model, tokenizer = load_lm(p["lm"], quantization=p["lm_quantization"])
    folder = ch.inputs.get("lm") or (fingerprint(p["lm"]) if Path(p["lm"]).exists() else None)
    return model, tokenizer, {"lm": p["lm"], "sha256": folder}, []


def cached_samples(
    ch: Chapter,
    key: dict,
    model,
    tokenizer,
    queries: pd.DataFrame,
    reward: ex2.CLIPReward,
    max_new_tokens: int | None = None,
    seed_offset: int = 0,
) -> pd.DataFrame:
    """``samples_per_query`` descriptions of every query from ``model`` (identified by ``key``), with their
    rewards; seeded by the chapter's seed (plus ``seed_offset``) and stored as JSON."""
    p = ch.params
    n_tokens, seed = max_new_tokens or p["max_new_tokens"], p["seed"] + seed_offset

    def build(d: Path) -> None:
        out = ex2.sample_descriptions(model, tokenizer, queries, p["samples_per_query"], n_tokens, seed=seed)
        out["reward"] = reward.scores(out.description.tolist(), out.class_index.tolist())
        ex2.save_descriptions(out, d / "descriptions.json")

    return ch.store.get_or_build(
        "ex2_descriptions",
        {**key, "max_new_tokens": n_tokens, "samples": p["samples_per_query"], "seed": seed},
        build,
        lambda d: pd.DataFrame(json.loads((d / "descriptions.json").read_text())),
    )


def cached_reliance(ch: Chapter, clip_bundle, key: dict) -> pd.DataFrame:
    """:func:`conceptlab.reliance.counterfactual_reliance` of a world CLIP (identified by ``key``), stored."""
    from ..reliance import counterfactual_reliance

    n, seed = ch.params["n_counterfactual"], ch.params["seed"]
    return ch.store.get_or_build(
        "ex2_reliance",
        {**key, "n": n, "seed": seed},
        lambda d: atomic_write_json(
            d / "reliance.json",
            counterfactual_reliance(clip_bundle[0], clip_bundle[2], ch.world, n, seed=seed).to_dict(orient="records"),
        ),
        lambda d: pd.DataFrame(json.loads((d / "reliance.json").read_text())),
    )


# ---------------------------------------------------------------------------- the run, step by step
@dataclass
class Result:
    """Everything the chapter computes, filled step by step (the notebook's cells, or :func:`run`)."""

    templates: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    queries: pd.DataFrame | None = None
    reward: ex2.CLIPReward | None = None
    lm: Any = None
    tokenizer: Any = None
    lm_key: dict = field(default_factory=dict)
    lm_history: list[dict] = field(default_factory=list)
    align: ex2.AlignConfig | None = None
    key: dict = field(default_factory=dict)
    knowledge: dict | None = None  # the gate: share of true claims, its interval, a random class's share
    preference: pd.DataFrame | None = None  # reward per kind of sentence (world)
    policy: Any = None
    curve: list[dict] = field(default_factory=list)
    descriptions: dict[str, pd.DataFrame] = field(default_factory=dict)  # before, after
    resampled: list[pd.DataFrame] = field(default_factory=list)  # more draws of the pretrained LM (the null)
    labelled: dict[str, pd.DataFrame] = field(default_factory=dict)
    reliance: pd.DataFrame | None = None
    planted: dict | None = None

    @property
    def n_lm_parameters(self) -> int:
        return count_parameters(self.lm)

    def shares(self) -> pd.DataFrame:
        """Share of each kind of description (the judge's), one column per stage."""
        table = pd.DataFrame({stage: ex2.kind_shares(self.labelled[stage]) for stage in STAGES})
        return table.rename_axis("kind of description")

    def attributes(self) -> pd.DataFrame:
        """Share of each attribute type among the informative descriptions, one column per stage."""
        return ex2.attribute_table({stage: self.labelled[stage] for stage in STAGES})

    def gain(self) -> dict[str, Any]:
        """The paired reward gain of alignment on the fixed samples; the same between the "before" draw and
        the pretrained LM's further draws, pooled per slot (what chance alone moves); and the aligned LM
        against those pooled draws."""
        gain, low, high = ex2.paired_gain(self.descriptions["before"], self.descriptions["after"])
        pooled = ex2.pooled_draws(self.resampled)
        null, null_low, null_high = ex2.paired_gain(self.descriptions["before"], pooled)
        over, over_low, over_high = ex2.paired_gain(pooled, self.descriptions["after"])
        return {
            "gain": gain,
            "low": low,
            "high": high,
            "null": null,
            "null_low": null_low,
            "null_high": null_high,
            "over_resampled": over,  # the aligned LM against the pretrained LM's further draws, same slots
            "over_resampled_low": over_low,
            "over_resampled_high": over_high,
            "null_draws": len(self.resampled),
            "pretrained_draw_means": [float(d.reward.mean()) for d in [self.descriptions["before"], *self.resampled]],
            "slots": len(self.descriptions["before"]),
            "before": float(self.descriptions["before"].reward.mean()),
            "after": float(self.descriptions["after"].reward.mean()),
        }

    def kind_table(self) -> pd.DataFrame:
        """The VLM's reward per kind of sentence, paired per class against a class-name caption."""
        return ex2.kind_table(self.preference)

    def mix(self, ch: Chapter) -> pd.DataFrame:
        """Sentence kinds before and after alignment, beside the mix KL-regularised RL predicts (world)."""
        shares = pd.DataFrame({s: ex2.sentence_kind_shares(self.descriptions[s], ch.world) for s in STAGES})
        reward = self.kind_table()["reward"]
        before = self.descriptions["before"]
        spread = reward_spread(before)
        shares["predicted"] = ex2.optimal_mix(shares["before"], reward, self.align.beta, scale=spread)
        shares["predicted from descriptions"] = ex2.reweighted_kind_shares(
            self.descriptions["before"], ch.world, self.align.beta, scale=spread
        )
        shares["kind reward"] = reward.reindex(shares.index)
        columns = ["kind reward", "before", "predicted", "predicted from descriptions", "after"]
        return shares[columns].rename_axis("kind of sentence")

    def mentions_against_reliance(self) -> pd.DataFrame:
        """Per factor: measured reliance and logit drop, and EX2's mention shares before, after and the gain."""
        mentions = pd.DataFrame({k: ex2.factor_mentions(self.labelled[k]) for k in STAGES})
        check = self.reliance[["reliance", "logit_drop"]].join(mentions.add_prefix("EX2 "))
        check["EX2 gain"] = check["EX2 after"] - check["EX2 before"]
        return check


def load_models(ch: Chapter, r: Result, progress: bool = True) -> None:
    """The reward (the chapter's VLM), the language model and the queries; every step cached."""
    p = ch.params
    with ch.stage("language model"):
        r.templates = ex2.load_templates(p["templates"])
        r.reward, r.class_names, vlm_key = chapter_reward(ch)
        r.lm, r.tokenizer, r.lm_key, r.lm_history = chapter_lm(ch, r.templates, progress=progress)
        r.queries = ex2.format_queries(r.class_names, r.templates)
        r.align = align_config(p)
        r.key = {"lm": r.lm_key, "vlm": vlm_key}


def sample_before(ch: Chapter, r: Result) -> None:
    """The fixed evaluation samples of the pretrained LM, and ``null_draws`` further independent draws on the
    same slots (the null: what sampling alone moves)."""
    with ch.stage("describe"):
        r.descriptions["before"] = cached_samples(
            ch, {**r.key, "stage": "before"}, r.lm, r.tokenizer, r.queries, r.reward
        )
        r.resampled = [
            cached_samples(ch, {**r.key, "stage": "before"}, r.lm, r.tokenizer, r.queries, r.reward, seed_offset=j)
            for j in range(1, ch.params["null_draws"] + 1)
        ]


def truth_interval(labelled: pd.DataFrame) -> tuple[float, float]:
    """95 % bootstrap interval (over descriptions) of the share of true claims."""
    counts = labelled[["n_true", "claims"]].to_numpy(dtype=float)
    return bootstrap_interval(counts, stat=lambda v: v[:, 0].sum() / max(v[:, 1].sum(), 1.0), seed=0)


def check_knowledge(ch: Chapter, r: Result) -> None:
    """On the world: how many of the pretrained LM's claims are true, against the same descriptions judged
    as about a random class (printed, and saved in the store before the gate decides); with the world LM,
    stops the chapter (:class:`conceptlab.ex2.KnowledgeGateError`) below ``lm_min_true_share``."""
    if not ch.on_world:
        return
    labelled = WorldJudge(ch.world).label_frame(r.descriptions["before"])

    def measure(d: Path) -> None:
        share, claims = ex2.truth_share(labelled)
        low, high = truth_interval(labelled)
        atomic_write_json(
            d / "knowledge.json",
            {
                "true_share": share,
                "low": low,
                "high": high,
                "claims": claims,
                "random_class": ex2.random_class_truth(r.descriptions["before"], ch.world, ch.params["seed"]),
            },
        )

    key = {
        **r.key,
        "samples": ch.params["samples_per_query"],
        "seed": ch.params["seed"],
        "max_new_tokens": ch.params["max_new_tokens"],
    }
    r.knowledge = ch.store.get_or_build(
        "ex2_knowledge", key, measure, lambda d: json.loads((d / "knowledge.json").read_text())
    )
    k = r.knowledge
    print(
        f"The LM's claims: {k['true_share']:.1%} true of {k['claims']} (95 % interval {k['low']:.1%} to "
        f"{k['high']:.1%}); the same descriptions judged as about a random class: {k['random_class']:.1%}."
    )
    if ch.params["lm"] == "world":
        ex2.knowledge_gate(labelled, ch.params["lm_min_true_share"])


def target(ch: Chapter, r: Result) -> None:
    """On the world, before any RL: the VLM's reward of every kind of sentence, for every class."""
    if not ch.on_world:
        return
    with ch.stage("target"):
        r.preference = ex2.kind_preference(r.reward, ch.world, ch.params["preference_sentences"], ch.params["seed"])


def align(ch: Chapter, r: Result, progress: bool = True) -> None:
    """GRPO alignment of the LM to the VLM's reward, logged relative to each class's pre-RL mean."""
    baseline = ex2.class_baseline(r.descriptions["before"], len(r.class_names))
    with ch.stage("align"):
        r.policy, r.curve = ex2.aligned_lm(
            ch.store,
            {**r.key, "relative": True},
            r.lm,
            r.tokenizer,
            r.reward.relative_to(baseline),
            r.queries,
            r.align,
            progress=progress,
        )


def sample_after(ch: Chapter, r: Result, max_new_tokens: int | None = None) -> None:
    """The aligned policy's samples of the same (query, sample) slots, with the same seed."""
    with ch.stage("describe"):
        r.descriptions["after"] = cached_samples(
            ch,
            {**r.key, "stage": "after", "align": asdict(r.align)},
            r.policy,
            r.tokenizer,
            r.queries,
            r.reward,
            max_new_tokens,
        )


def judge(ch: Chapter, min_true: int | None = None):
    """The chapter's judge (``judge`` parameter); on the world it also knows the ground truth."""
    p = ch.params
    return make_judge(
        p["judge"], ch.world if ch.on_world else None, p["judge_api_key_env"], min_true or p["judge_min_true"]
    )


def inspect_both(ch: Chapter, r: Result) -> None:
    """EX2's inspection of the descriptions before and after alignment."""
    truth, judge_fn = (ch.world if ch.on_world else None), judge(ch)
    with ch.stage("inspect"):
        r.labelled = {stage: ex2.inspect_descriptions(r.descriptions[stage], judge_fn, truth) for stage in STAGES}


def ground_truth(ch: Chapter, r: Result) -> None:
    """On the world: the VLM's measured reliance on each factor (counterfactual images)."""
    if not ch.on_world:
        return
    with ch.stage("ground truth"):
        r.reliance = cached_reliance(ch, ch.clip(), ch.key()).set_index("factor")


def gain_table(r: Result) -> pd.DataFrame:
    """The three paired comparisons on the fixed slots: value and 95 % interval of each."""
    g = r.gain()
    rows = {
        "aligned minus pretrained (same seed)": ("gain", "low", "high"),
        "pretrained: further draws minus first (the null)": ("null", "null_low", "null_high"),
        "aligned minus the further draws pooled": ("over_resampled", "over_resampled_low", "over_resampled_high"),
    }
    table = pd.DataFrame({name: [g[k] for k in keys] for name, keys in rows.items()}, index=["mean", "low", "high"])
    return table.T.rename_axis(f"reward difference over {g['slots']} slots")


def gain_figure(r: Result) -> plt.Axes:
    """Each draw's mean reward: the pretrained LM's draws (grey; the first, which the aligned LM shares its
    seed with, outlined) against the aligned LM's (orange)."""
    g = r.gain()
    means = g["pretrained_draw_means"]
    _, ax = plt.subplots(figsize=(6.5, 1.8))
    ax.scatter(means, np.zeros(len(means)), color="grey", s=40, label="pretrained LM, one dot per draw")
    ax.scatter(means[:1], [0], facecolors="none", edgecolors="black", s=110, label="its first draw (same seed)")
    ax.scatter([g["after"]], [0], color="tab:orange", marker="D", s=60, label="aligned LM")
    ax.set_yticks([])
    ax.set_xlabel(f"mean reward over the {g['slots']} fixed slots")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=3, frameon=False, fontsize=8)
    return ax


def reward_spread(before: pd.DataFrame) -> float:
    """The reward's unit for GRPO: its spread within a query (within a class with one sample per query)."""
    spread = float(np.sqrt(before.groupby(["class_index", "template_index"]).reward.var().mean()))
    if np.isnan(spread):
        spread = float(before.groupby("class_index").reward.std().mean())
    return spread


def examples(r: Result, n_classes: int = 4) -> pd.DataFrame:
    """The first template's first sample for the first classes, before and after alignment, side by side."""

    def first(df: pd.DataFrame) -> pd.DataFrame:
        return df[(df.template_index == 0) & (df["sample"] == 0) & (df.class_index < n_classes)]

    return pd.DataFrame(
        {
            "class": first(r.descriptions["before"]).class_name.to_numpy(),
            **{stage: first(r.descriptions[stage]).description.to_numpy() for stage in STAGES},
        }
    )


# ---------------------------------------------------------------------------- the planted shortcut
def planted_pair(ch: Chapter) -> tuple[str, str]:
    """The two planted conditions compared: no-shortcut (the training habitat random) and
    ``planted_condition`` (the habitat the class's own, or no habitat captions)."""
    return "no-shortcut", ch.params["planted_condition"]


def planted_subjects(ch: Chapter, progress: bool = False) -> list[vd.Subject]:
    """The planted CLIPs of :func:`planted_pair`, seeds ``0 .. planted_seeds - 1``: trained once into the store
    with chapter 7's recipe (chapters 1, 4 and 7 load the same models)."""
    p = ch.params
    return vd.planted_models(
        ch.store,
        ch.world_cfg,
        planted_recipe(ch),
        planted_pair(ch),
        p["planted_seeds"],
        vd.PLANTED_BLIND,
        vd.PLANTED_CLASSES,
        progress=progress,
    )


def planted_reward_world(ch: Chapter) -> ConceptWorld:
    """The images of the planted VLMs' reward, the same for every model: the chapter's world cut to the
    planted classes, with habitat correlation ``planted_reward_habitat`` (None: the chapter world's)."""
    habitat = ch.params["planted_reward_habitat"]
    cfg = ch.world_cfg if habitat is None else replace(ch.world_cfg, habitat_correlation=habitat)
    return ConceptWorld(replace(cfg, n_classes=vd.PLANTED_CLASSES))


def planted_align_config(ch: Chapter, r: Result, n_classes: int) -> ex2.AlignConfig:
    """The chapter's GRPO settings with as many prompts per class as the chapter's own alignment."""
    steps = max(1, round(r.align.steps * n_classes / len(r.class_names)))
    return replace(r.align, steps=steps)


def run_planted(ch: Chapter, r: Result, progress: bool = True) -> None:
    """EX2 on every planted CLIP: the chapter's LM aligned to each with the same settings and reward images,
    sampled on the same slots; beside it, each model's measured habitat reliance."""
    if not _planted(ch.params):
        return
    world = planted_reward_world(ch)
    n = len(world.classes)
    queries = ex2.format_queries(world.class_names, r.templates)
    before = r.descriptions["before"]
    before = before[before.class_index < n].reset_index(drop=True)
    settings = planted_align_config(ch, r, n)
    models = {}
    with ch.stage("planted"):
        subjects = planted_subjects(ch, progress)
        truths = vd.measure_all(subjects, ch.params["planted_n_images"], ch.params["seed"], ch.store)
        for s in tqdm(subjects, desc="EX2 on the planted CLIPs", disable=not progress):
            key = {"model": s.key}
            reward, _, vlm = chapter_reward(ch, (s.clip, None, s.tokenizer, None), key, world)
            akey = {**r.key, "vlm": vlm}
            rescored_before = rescored(before, reward)
            policy, _ = ex2.aligned_lm(
                ch.store,
                {**akey, "relative": True},
                r.lm,
                r.tokenizer,
                reward.relative_to(ex2.class_baseline(rescored_before, n)),
                queries,
                settings,
                progress=False,
            )
            models[s.name] = {
                "condition": s.condition,
                "seed": s.seed,
                "habitat reliance": float(truths[s.name].reliance()["habitat"]),
                "before": rescored_before,
                "after": cached_samples(
                    ch, {**akey, "stage": "after", "align": asdict(settings)}, policy, r.tokenizer, queries, reward
                ),
                "preference": ex2.kind_preference(reward, world, ch.params["preference_sentences"], ch.params["seed"]),
            }
    r.planted = {"world": world, "align": settings, "models": models, "pair": planted_pair(ch)}


def rescored(descriptions: pd.DataFrame, reward: ex2.CLIPReward) -> pd.DataFrame:
    """The same descriptions with ``reward``'s scores: the chapter's "before" samples serve every VLM, as
    sampling the same LM with the same seed and queries would write them again (only the reward differs)."""
    out = descriptions.copy()
    out["reward"] = reward.scores(out.description.tolist(), out.class_index.tolist())
    return out


def _kinds(r: Result, v: dict, stage: str) -> tuple[int, pd.DataFrame]:
    """``(number of descriptions, their sentence kinds)`` for a planted model's ``stage`` descriptions in slot
    order; judged once per model and stage (the table, the reading and the results all count them)."""
    cache = v.setdefault("sentence kinds", {})
    if stage not in cache:
        ordered = v[stage].sort_values(list(ex2.PAIR_KEYS)).reset_index(drop=True)
        cache[stage] = len(ordered), ex2.sentence_kinds(ordered, r.planted["world"])
    return cache[stage]


def _planted_kind_share(r: Result, v: dict, stage: str, kind: str = "habitat") -> float:
    return float(ex2.kind_shares_of(_kinds(r, v, stage)[1])[kind])


def _predicted_share(r: Result, v: dict, kind: str = "habitat") -> float:
    """The aligned share of ``kind`` that KL-regularised RL predicts from the model's kind rewards."""
    before = ex2.kind_shares_of(_kinds(r, v, "before")[1])
    reward = ex2.kind_table(v["preference"])["reward"]
    return float(ex2.optimal_mix(before, reward, r.align.beta, scale=reward_spread(v["before"]))[kind])


def planted_table(r: Result) -> pd.DataFrame | None:
    """Per planted CLIP: its measured habitat reliance, its reward for habitat sentences over a class-name
    caption, and the share of habitat sentences before alignment, predicted by RL, and after."""
    if r.planted is None:
        return None
    rows = {
        name: {
            "condition": v["condition"],
            "seed": v["seed"],
            "habitat reliance (measured)": v["habitat reliance"],
            "habitat reward minus class": float(ex2.kind_table(v["preference"]).loc["habitat", "minus class"]),
            "habitat share before": _planted_kind_share(r, v, "before"),
            "predicted": _predicted_share(r, v),
            "after": _planted_kind_share(r, v, "after"),
        }
        for name, v in r.planted["models"].items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("planted CLIP")


def planted_figure(r: Result) -> plt.Axes:
    """Each planted CLIP's aligned habitat share (filled) and RL's prediction (hollow) against its measured
    habitat reliance; the dashed line is the share before alignment (the same samples for every model)."""
    table = planted_table(r)
    _, ax = plt.subplots(figsize=(6, 3))
    for condition, color in zip(r.planted["pair"], ("tab:blue", "tab:red")):
        t = table[table.condition == condition]
        x = t["habitat reliance (measured)"].astype(float)
        ax.scatter(x, t["after"].astype(float), color=color, label=f"{condition}: after alignment")
        ax.scatter(
            x, t["predicted"].astype(float), facecolors="none", edgecolors=color, label=f"{condition}: predicted"
        )
    ax.axhline(float(table["habitat share before"].iloc[0]), color="grey", ls="--", lw=1, label="before alignment")
    ax.set_xlabel("measured habitat reliance (mean margin drop)")
    ax.set_ylabel("share of habitat sentences")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return ax


def _versus(pair: Sequence[str]) -> str:
    """How a planted difference is taken, e.g. "shortcut minus no-shortcut"."""
    return f"{pair[1]} minus {pair[0]}"


def _pairs(r: Result) -> list[tuple[dict, dict]]:
    """(no-shortcut, planted condition) models of the same seed."""
    by = {(v["condition"], v["seed"]): v for v in r.planted["models"].values()}
    seeds = sorted({seed for _, seed in by})
    control, planted = r.planted["pair"]
    return [(by[(control, s)], by[(planted, s)]) for s in seeds]


def _over_seeds(per_seed: list[float], one_seed: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean over seeds with its 95 % t interval; with one seed, ``one_seed``: an interval within that seed (or
    none), which says nothing about other seeds."""
    if len(per_seed) == 1:
        low, high = one_seed or (per_seed[0], per_seed[0])
        return {"value": per_seed[0], "low": low, "high": high, "per_seed": per_seed}
    value, low, high = seed_interval(per_seed)
    return {"value": value, "low": low, "high": high, "per_seed": per_seed}


def label_swap_band(per_seed: Sequence[np.ndarray], n_permutations: int = 1000, seed: int = 0) -> dict[str, float]:
    """The null of a shortcut-minus-no-shortcut mean (mean over seeds of each seed's mean over its units): the
    two models' labels swapped at random on each unit (a slot, a class), i.e. its difference's sign flipped;
    the mean and 95 % band of the result. A difference is a finding only outside this band."""

    def draw(rng: np.random.Generator) -> float:
        return float(np.mean([(d * rng.choice((-1.0, 1.0), size=len(d))).mean() for d in per_seed]))

    mean, low, high = permutation_band(draw, n_permutations, seed=seed)
    return {"mean": mean, "low": low, "high": high}


def clears(d: dict[str, Any]) -> bool:
    """Whether a difference (an :func:`_over_seeds` dict) is a finding: its interval excludes 0 and, when it
    has a null band, its value lies outside that band."""
    band = d.get("band")
    outside = band is None or not band["low"] <= d["value"] <= band["high"]
    return excludes(d["low"], d["high"]) and outside


def _null_band(d: dict[str, Any], digits: int) -> str:
    """`` (null band [low, high])`` for a difference with a band, else nothing."""
    band = d.get("band")
    return f" (null band [{band['low']:+.{digits}f}, {band['high']:+.{digits}f}])" if band else ""


def planted_difference(r: Result, kind: str = "habitat") -> dict[str, Any]:
    """Share of ``kind`` sentences after alignment, shortcut minus no-shortcut VLM of the same seed (the same
    slots): per seed, and its mean over seeds with a 95 % t interval over seeds (one seed: over its slots),
    and its label-swap null band over slots (:func:`label_swap_band`)."""
    slots = [_slot_shares(r, b, kind) - _slot_shares(r, a, kind) for a, b in _pairs(r)]
    within = bootstrap_interval(slots[0], seed=0) if len(slots) == 1 else None
    return {**_over_seeds([float(d.mean()) for d in slots], within), "band": label_swap_band(slots)}


def plant_took(ch: Chapter, r: Result) -> dict[str, Any]:
    """The plant, its reward and what RL predicts, per seed and over seeds (95 % t intervals; one seed: the
    reward gap over classes, the aligned share over slots): the measured habitat reliance, shortcut minus
    no-shortcut; how much more the shortcut VLM's reward prefers habitat sentences over a class-name caption
    (with its label-swap band over classes); the difference of aligned habitat shares KL-regularised RL
    predicts from the two kind rewards; and the observed difference (:func:`planted_difference`)."""
    pairs = _pairs(r)
    seed = ch.params["seed"]
    per_class = [
        ex2.planted_reward_differences(a["preference"], b["preference"], "habitat").to_numpy() for a, b in pairs
    ]
    within = bootstrap_interval(per_class[0], seed=seed) if len(pairs) == 1 else None
    return {
        "seeds": len(pairs),
        "reward_images_habitat_correlation": r.planted["world"].config.habitat_correlation,
        "reliance": _over_seeds([b["habitat reliance"] - a["habitat reliance"] for a, b in pairs]),
        "reward_gap": {
            **_over_seeds([float(d.mean()) for d in per_class], within),
            "band": label_swap_band(per_class, seed=seed),
        },
        "predicted": _over_seeds([_predicted_share(r, b) - _predicted_share(r, a) for a, b in pairs]),
        "observed": planted_difference(r),
    }


def _slot_shares(r: Result, v: dict, kind: str) -> np.ndarray:
    """Per aligned description of planted model ``v``, in the order of its (class, template, sample) slot, the
    share of its sentences of ``kind``."""
    n, kinds = _kinds(r, v, "after")
    share = (kinds.kind == kind).groupby(kinds.description_index).mean()
    return share.reindex(range(n), fill_value=0.0).to_numpy()


# ---------------------------------------------------------------------------- the whole run
def run(ch: Chapter, progress: bool = False) -> Result:
    """The chapter's work, in the notebook's order."""
    r = Result()
    load_models(ch, r, progress=progress)
    sample_before(ch, r)
    check_knowledge(ch, r)
    target(ch, r)
    align(ch, r, progress=progress)
    sample_after(ch, r)
    inspect_both(ch, r)
    ground_truth(ch, r)
    run_planted(ch, r, progress=progress)
    return r


def prepare(ch: Chapter) -> None:
    """Build the chapter's trained artifacts (the LM and the GRPO policy), e.g. data-parallel under
    ``accelerate launch -m conceptlab.prepare 04_ex2``; the notebook then loads them."""
    r = Result()
    load_models(ch, r, progress=False)
    sample_before(ch, r)
    check_knowledge(ch, r)
    align(ch, r, progress=False)


# ---------------------------------------------------------------------------- results
def reward_rise(r: Result) -> dict[str, float]:
    """GRPO's logged reward (relative to each class's pre-RL mean), first and last fifth of the steps."""
    first, last, window = ex2.reward_rise(r.curve)
    return {"first_window": first, "last_window": last, "rise": last - first, "window_steps": window}


def prediction_agreement(mix: pd.DataFrame, n_permutations: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Pearson's r across sentence kinds between each prediction's change of share and the observed change,
    with its null: the 95 % band of r when the observed changes are permuted among the kinds."""
    observed = (mix["after"] - mix["before"]).to_numpy()
    out = {}
    for column in ("predicted", "predicted from descriptions"):
        predicted = (mix[column] - mix["before"]).to_numpy()
        _, low, high = permutation_band(partial(_shuffled_r, predicted, observed), n_permutations, seed=seed)
        out[column] = {"r": float(np.corrcoef(predicted, observed)[0, 1]), "null_low": low, "null_high": high}
    return out


def _shuffled_r(predicted: np.ndarray, observed: np.ndarray, rng: np.random.Generator) -> float:
    return float(np.corrcoef(predicted, rng.permutation(observed))[0, 1])


def _side(agreement: dict[str, float]) -> str:
    return "inside" if agreement["null_low"] <= agreement["r"] <= agreement["null_high"] else "outside"


def _frame(table: pd.DataFrame) -> dict:
    return {str(k): {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for k, row in table.iterrows()}


def results(ch: Chapter, r: Result) -> dict:
    """The results JSON's ``results`` block."""
    shares, attributes = r.shares(), r.attributes()
    nonvisual = attributes.xs("non-visual", level="group").sum()
    out = {
        "lm_parameters": r.n_lm_parameters,
        "queries": len(r.queries),
        "interval_level": 0.95,
        "gain": r.gain(),
        "grpo_reward": reward_rise(r),
        **{f"nonvisual_of_informative_{stage}": float(v) for stage, v in nonvisual.items()},
        "attribute_shares_after": attributes["after"].droplevel(0).to_dict(),
        "judge_yes_after": float((r.labelled["after"].judge == "yes").mean()),
        "unparsed_share": {s: float(shares.loc["unparsed", s]) for s in STAGES},
    }
    for kind, stage in shares.stack().index:  # share_<kind>_<stage>; "non-visual" is written nonvisual
        out[f"share_{kind.replace('-', '')}_{stage}"] = float(shares.loc[kind, stage])
    if r.knowledge is not None:
        out["knowledge"] = {
            **r.knowledge,
            "gate": ch.params["lm_min_true_share"] if ch.params["lm"] == "world" else None,
            "corpus_false_share": lm_config(ch.params).false_share if ch.params["lm"] == "world" else None,
        }
    if r.preference is not None:
        out["kind_reward"] = _frame(r.kind_table())
        mix = r.mix(ch)
        out["kind_mix"] = _frame(mix)
        out["kind_mix_agreement"] = prediction_agreement(mix)
    if r.reliance is not None:
        check = r.mentions_against_reliance()
        out.update(
            spearman_reliance_gain=rank_correlation(check.logit_drop, check["EX2 gain"]),
            reliance=r.reliance.reliance.to_dict(),
            mention_share_after=check["EX2 after"].to_dict(),
        )
    if r.planted is not None:
        table = planted_table(r)
        out["planted"] = {
            "pair": list(r.planted["pair"]),
            "grpo_steps": r.planted["align"].steps,
            "models": {
                name: {k: (v if isinstance(v, str) else float(v)) for k, v in row.items()}
                for name, row in table.iterrows()
            },
            "plant": plant_took(ch, r),
            "after_differences": {k: planted_difference(r, k) for k in ("habitat", "visual_true", "class", "web_seen")},
        }
    return out


def _share_interval(labelled: pd.DataFrame, kind: str) -> tuple[float, float, float]:
    values = (labelled.kind == kind).to_numpy(dtype=float)
    return (float(values.mean()), *bootstrap_interval(values, seed=0))


def headline(ch: Chapter, r: Result) -> dict[str, Reported]:
    """The paired reward gain of alignment, what the LM knows, the spurious share, the planted shift."""
    g = r.gain()
    out = {
        "reward gain of alignment (paired)": Reported(
            g["gain"],
            g["low"],
            g["high"],
            chance=g["null"],
            note=f"mean over {g['slots']} fixed (query, sample) slots, 95 % bootstrap; chance: the same difference "
            f"between the pretrained LM's first draw and its {g['null_draws']} further draws pooled per slot; the "
            "paper plots a rising reward but gives no number",
        )
    }
    if r.knowledge is not None:
        k = r.knowledge
        out["true share of the LM's claims (before RL)"] = Reported(
            k["true_share"],
            k["low"],
            k["high"],
            chance=k["random_class"],
            note="95 % bootstrap over descriptions; chance: the same descriptions judged as about a random class",
        )
    value, low, high = _share_interval(r.labelled["after"], "spurious")
    out["spurious share (aligned)"] = Reported(
        value,
        low,
        high,
        chance=float((r.labelled["before"].kind == "spurious").mean()),
        note="95 % bootstrap over descriptions; chance: the share before alignment; the paper gives no number",
    )
    if r.planted is not None:
        t = plant_took(ch, r)
        d = t["observed"]
        out[f"habitat sentences after alignment, {_versus(r.planted['pair'])} VLM"] = Reported(
            d["value"],
            d["low"],
            d["high"],
            chance=0.0,
            note=f"share of sentences, the same slots; mean over {t['seeds']} seeds, 95 % t interval over seeds; "
            f"chance: no difference; the measured habitat reliance differs by {t['reliance']['value']:+.2f}",
        )
    return out


def fidelity_rows(res: dict) -> dict[str, dict]:
    """The chapter's opening table, like with like: what the paper reports, what the original code
    computes (it needs Mistral-7B and ChatGPT, so: its definition), and this book's number."""
    rows = {
        "reward gain of alignment": {
            "paper": "rises (training curves)",
            "original code": "PPO, 1000 steps",
            "this book": res["gain"]["gain"],
        },
        "spurious share of aligned descriptions": {
            "paper": "a major share (abstract)",
            "original code": "judge 'no' share",
            "this book": res["share_spurious_after"],
        },
        "informative but false share": {
            "paper": "not reported",
            "original code": "counted as informative",
            "this book": res["share_false_after"],
        },
        "non-visual share of informative": {
            "paper": "significant, e.g. habitat",
            "original code": "not released",
            "this book": res["nonvisual_of_informative_after"],
        },
    }
    if "planted" in res:
        rows[f"habitat sentences after alignment, {_versus(res['planted']['pair'])} VLM"] = {
            "paper": "non-visual attributes (e.g. habitat) carry preference",
            "original code": "not tested on a known shortcut",
            "this book": res["planted"]["plant"]["observed"]["value"],
        }
    return rows


def _interval(value: float, low: float, high: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f} (95 % interval {low:+.{digits}f} to {high:+.{digits}f})"


def summary(ch: Chapter, r: Result) -> list[str]:
    """Generated from the result: what the LM knows, the target, the gain, the kinds, the planted VLM."""
    out = []
    if r.knowledge is not None:
        k = r.knowledge
        out.append(
            f"Before RL, {k['true_share']:.1%} of the language model's {k['claims']} claims are true "
            f"(95 % interval {k['low']:.1%} to {k['high']:.1%}; judged as about a random class, "
            f"{k['random_class']:.1%})."
        )
    if r.preference is not None:
        kinds = r.kind_table()
        best, worst = kinds.index[0], kinds.index[-1]
        out.append(
            f"The CLIP rewards {best.replace('_', ' ')} sentences most ({kinds.loc[best, 'reward']:.4f}) "
            f"and {worst.replace('_', ' ')} sentences least ({kinds.loc[worst, 'reward']:.4f})."
        )
    g = r.gain()
    moved = "an interval that excludes 0" if excludes(g["low"], g["high"]) else "an interval that includes 0"
    out.append(
        f"On the same {g['slots']} (query, sample) slots, alignment changes the mean reward by "
        f"{_interval(g['gain'], g['low'], g['high'])}, {moved}; the pretrained LM's {g['null_draws'] + 1} "
        f"independent draws have mean rewards from {min(g['pretrained_draw_means']):.4f} to "
        f"{max(g['pretrained_draw_means']):.4f}, the aligned LM {g['after']:.4f}."
    )
    beyond = excludes(g["over_resampled_low"], g["over_resampled_high"]) and g["over_resampled"] > 0
    out.append(
        f"Against the pretrained LM's {g['null_draws']} further draws pooled per slot, the aligned LM's reward "
        f"differs by {_interval(g['over_resampled'], g['over_resampled_low'], g['over_resampled_high'])}: the gain "
        + ("is beyond what resampling alone moves." if beyond else "is not distinguishable from resampling.")
    )
    shares = r.shares()
    out.append(
        f"After alignment {shares.loc['spurious', 'after']:.1%} of the descriptions are spurious "
        f"({shares.loc['spurious', 'before']:.1%} before) and {shares.loc['false', 'after']:.1%} informative "
        f"but false; {shares.loc['unparsed', 'after']:.1%} of the judge's replies could not be parsed."
    )
    if r.preference is not None:
        mix = r.mix(ch)
        kind = (mix["predicted"] - mix["before"]).abs().idxmax()
        out.append(
            f"KL-regularised RL predicts the share of {kind.replace('_', ' ')} sentences to move from "
            f"{mix.loc[kind, 'before']:.1%} to {mix.loc[kind, 'predicted']:.1%}; it went to "
            f"{mix.loc[kind, 'after']:.1%}."
        )
        by_kind, by_description = (prediction_agreement(mix)[c] for c in ("predicted", "predicted from descriptions"))

        out.append(
            "Across kinds, the predicted changes of share correlate with the observed ones at "
            f"r = {by_kind['r']:+.2f} when predicted from each kind's mean sentence reward, and at "
            f"r = {by_description['r']:+.2f} when predicted from the pretrained LM's own descriptions, each "
            f"reweighted by its reward; with the observed changes permuted among the kinds, 95 % of r fall "
            f"between {by_description['null_low']:+.2f} and {by_description['null_high']:+.2f}, so the second lies "
            f"{_side(by_description)} that band and the first {_side(by_kind)} its own."
        )
    if r.planted is not None:
        out.append(plant_sentence(ch, r))
    return out


def plant_sentence(ch: Chapter, r: Result) -> str:
    """The planted comparison in words, from :func:`plant_took`: the plant, the reward, RL's prediction and the
    aligned shares; then whether alignment followed the reward, and whether the reward followed the reliance."""
    t = plant_took(ch, r)
    rel, gap, pred, obs = (t[k] for k in ("reliance", "reward_gap", "predicted", "observed"))
    per_seed = ", ".join(f"{v:+.3f}" for v in obs["per_seed"])
    seeds = t["seeds"]
    control, planted = r.planted["pair"]

    def stated(d: dict, digits: int) -> str:
        if seeds == 1 and d["low"] == d["high"]:
            return f"{d['value']:+.{digits}f}"
        return _interval(d["value"], d["low"], d["high"], digits)

    nulls = "null bands: 95 % of the differences with the two models' labels swapped at random per class or slot"
    said = (
        f"On chapter 7's planted CLIPs ({seeds} seed{'s' if seeds > 1 else ''} per condition; reward images whose "
        f"habitat is the class's own {t['reward_images_habitat_correlation']:.0%} of the time), the {planted} VLM's "
        f"measured habitat reliance exceeds the {control} VLM's by {stated(rel, 2)}; its reward prefers habitat "
        f"sentences over a class-name caption by {stated(gap, 4)} more{_null_band(gap, 4)}; KL-regularised "
        f"RL predicts the aligned share of habitat sentences to differ by {stated(pred, 3)}, and after alignment "
        f"it differs by {stated(obs, 3)}{_null_band(obs, 3)} ("
        + (
            f"per seed {per_seed}; intervals: 95 % t over seeds; {nulls}). "
            if seeds > 1
            else f"one seed: the intervals are over its classes and slots and say nothing about other seeds; {nulls}). "
        )
    )
    if not clears(gap):
        return said + (
            "The reward gap's interval includes 0 or its value lies inside its null band: the plant did not reach "
            "the reward, so there was nothing for EX2 to recover."
        )
    if not clears(obs):
        return said + (
            "Alignment did not move the habitat share beyond its interval and null band although the rewards "
            "differ: RL did not recover the reward's preference."
        )
    if np.sign(obs["value"]) != np.sign(gap["value"]):
        return said + "Alignment moved the habitat share against the rewards' difference."
    said += (
        "Alignment moved the habitat share the way the rewards differ: the mechanism recovers what the reward prefers"
    )
    if not excludes(rel["low"], rel["high"]):
        return said + (
            "; the measured reliance does not differ (its interval includes 0): the preference EX2 recovered lies in "
            "how the text side scores the sentences, not in what the classifier uses."
        )
    if np.sign(obs["value"]) == np.sign(rel["value"]):
        return said + ", and that is the way the measured reliance differs."
    return said + (
        "; but the measured reliance differs the other way: here EX2's habitat preference does not follow what "
        "the VLM relies on."
    )


def planted_verdict(res: dict) -> str | None:
    """EX2 on the planted habitat shortcut in a phrase, from a chapter-4 results block (the book's headline
    table): detected when the aligned habitat share differs, beyond its interval, the way the reliance does."""
    if "planted" not in res:
        return None
    t, pair = res["planted"]["plant"], res["planted"]["pair"]
    obs, rel = t["observed"], t["reliance"]["value"]
    if not clears(obs):
        verdict = "not detected"
    elif not excludes(t["reliance"]["low"], t["reliance"]["high"]):
        verdict = "moves the descriptions, with no measured reliance to follow"
    else:
        verdict = "detected" if np.sign(obs["value"]) == np.sign(rel) else "points the other way"
    return (
        f"{'habitat shortcut' if pair[1] == 'shortcut' else pair[1]} {verdict} (chapter 4: EX2's LM, GRPO and judge "
        f"on chapter 7's planted CLIPs, {t['seeds']} seeds): aligned habitat share, {_versus(pair)}, "
        f"{obs['value']:+.3f} [{obs['low']:+.3f}, {obs['high']:+.3f}]"
        + _null_band(obs, 3)
        + f"; measured habitat reliance {rel:+.2f}"
    )


# ---------------------------------------------------------------------------- exercises
def _exercise_summary(ch: Chapter, r: Result) -> dict[str, float]:
    shares = ex2.kind_shares(ex2.inspect_descriptions(r.descriptions["after"], judge(ch), ch.world))
    gain = ex2.paired_gain(r.descriptions["before"], r.descriptions["after"])[0]
    return {
        "reward gain (paired)": gain,
        **{f"share {k}": float(shares[k]) for k in ("spurious", "false", "visual", "non-visual")},
    }


def _aligned(ch: Chapter, max_new_tokens: int | None = None) -> Result:
    r = Result()
    load_models(ch, r, progress=False)
    sample_before(ch, r)
    align(ch, r, progress=False)
    sample_after(ch, r, max_new_tokens)
    return r


def exercise_stricter_judge(ch: Chapter) -> dict[str, float]:
    """The aligned descriptions judged by a world judge with the chapter's ``judge_min_true``."""
    return _exercise_summary(ch, _aligned(ch))


def exercise_alignment(ch: Chapter) -> dict[str, float]:
    """Align with the chapter's GRPO settings (``grpo_steps``, ``grpo_beta``, ...), then inspect."""
    return _exercise_summary(ch, _aligned(ch))


def exercise_description_length(ch: Chapter, description_tokens: int | None = None) -> dict[str, float]:
    """The chapter's aligned policy writing descriptions of at most ``description_tokens`` tokens
    (the pretrained LM too, so that the gain stays paired)."""
    r = _aligned(ch, description_tokens)
    if description_tokens is not None:
        r.descriptions["before"] = cached_samples(
            ch, {**r.key, "stage": "before"}, r.lm, r.tokenizer, r.queries, r.reward, description_tokens
        )
    return _exercise_summary(ch, r)


def exercise_images_per_class(ch: Chapter, reward_images: int | None = None) -> dict[str, float]:
    """How well a reward estimated from ``reward_images`` images a class agrees with the chapter's reward,
    on the chapter's aligned descriptions (Spearman's rho, and the mean absolute difference)."""
    from scipy.stats import spearmanr

    after = _aligned(ch).descriptions["after"]
    other_ch = ch if reward_images is None else ch.with_params(images_per_class=reward_images)
    reward, _, _ = chapter_reward(other_ch)
    other = reward.scores(after.description.tolist(), after.class_index.tolist())
    return {
        "Spearman with the chapter's reward": float(spearmanr(other, after.reward).statistic),
        "mean |reward difference|": float(np.abs(other - after.reward).mean()),
    }


def exercise_planted(ch: Chapter) -> dict[str, float]:
    """EX2 on the planted CLIPs with the chapter's ``planted_reward_habitat`` and ``planted_condition`` (planted
    minus no-shortcut, means over seeds): the measured habitat reliance, the habitat reward gap and the aligned
    habitat share, predicted and observed; the reliance, the gap and the share with their 95 % intervals over
    seeds, and whether the gap and the share clear their nulls (:func:`clears`: 1 yes, 0 no)."""
    r = Result()
    load_models(ch, r, progress=False)
    sample_before(ch, r)
    run_planted(ch, r, progress=False)
    t = plant_took(ch, r)
    reliance, gap, share = t["reliance"], t["reward_gap"], t["observed"]
    return {
        "habitat reliance": reliance["value"],
        "reliance: low": reliance["low"],
        "reliance: high": reliance["high"],
        "habitat reward gap": gap["value"],
        "reward gap: low": gap["low"],
        "reward gap: high": gap["high"],
        "reward gap clears its null": float(clears(gap)),
        "habitat share predicted by RL": t["predicted"]["value"],
        "habitat share after alignment": share["value"],
        "share: low": share["low"],
        "share: high": share["high"],
        "share clears its null": float(clears(share)),
    }


__all__ = ["NAME", "PARAMETERS", "SWITCHES", "Result", "headline", "prepare", "results", "run", "summary"]
