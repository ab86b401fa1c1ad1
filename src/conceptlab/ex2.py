"""EX2 (Extract and Explore): align a language model to a VLM's preferences, then inspect them.

1. Queries: 25 templates per class, each followed by a blank line (:func:`load_templates`: the
   book's own, or a JSON list such as the original's ``mult_template_v1.json``).
2. Reward: the mean cosine similarity between ``f_T(description)`` and the cached image
   embeddings of the class, vectorised over a batch of completions (:class:`CLIPReward`).
3. Alignment: trl's ``GRPOTrainer`` with a KL penalty to the reference model, class-balanced
   prompts and dropout off (:func:`align`).
4. Inference: sampled descriptions of every query (:func:`generate_descriptions`,
   :func:`sample_descriptions`); the gain of alignment on the same samples (:func:`paired_gain`).
5. Inspection (:func:`inspect_descriptions`): the judge's informative question, then the attribute
   question for the informative descriptions (:mod:`conceptlab.judges`); on the world, descriptions
   whose every claim is false are their own category ("false"), never spurious.
6. On the world: what the LM knows before RL (:func:`knowledge_gate`), the VLM's preference per kind
   of sentence (:func:`kind_preference`) and the mix KL-regularised RL predicts (:func:`optimal_mix`),
   and, per class, how much more one VLM's reward prefers a kind than another's
   (:func:`planted_reward_differences`).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_write_json, process_state
from .models import encode_images, encode_texts
from .world import PARTS, ConceptWorld

TEMPLATES: tuple[str, ...] = (
    "Describe a photo of a {}.",
    "What are useful visual features for distinguishing a {} in a photo?",
    "Write a caption for an image of a {}.",
    "Write a poem inspired by the visual characteristics of a {}.",
    "Critique a photo of a {} and provide suggestions for improvement.",
    "Describe what a {} looks like.",
    "What does a {} look like in a picture?",
    "Write a short description of an image showing a {}.",
    "Write an alt text for a photo of a {}.",
    "Describe the composition of a photograph of a {}.",
    "Write a short story about a photo of a {}.",
    "Write a review of a photograph of a {}.",
    "How would you recognise a {} in a photo?",
    "List the visual characteristics of a {}.",
    "Describe the colours and patterns of a {}.",
    "Write a social media post about a photo of a {}.",
    "Describe a painting of a {}.",
    "Write a museum label for a picture of a {}.",
    "Explain to a child what a {} looks like.",
    "Write a field guide entry for a {}.",
    "Describe a close-up photo of a {}.",
    "Write a headline for a news photo of a {}.",
    "Describe a {} to someone who has never seen one.",
    "Write a haiku about a picture of a {}.",
    "Describe the most striking detail in a photo of a {}.",
)


def check_templates(templates: object) -> list[str]:
    """``templates`` as a list of query templates, or ValueError saying what is wrong with it.

    A template is a string with exactly one ``{}`` for the class name (the format of the original's
    ``data_files/mult_template_v1.json``: a JSON list of such strings).
    """
    if not isinstance(templates, list) or not templates:
        raise ValueError('templates must be a non-empty JSON list of strings, e.g. ["Describe a photo of a {}."]')
    problems = [
        f"item {i} ({t!r}) is not a string with exactly one {{}}"
        for i, t in enumerate(templates)
        if not isinstance(t, str) or t.count("{}") != 1 or _formats_badly(t)
    ]
    if problems:
        raise ValueError("Bad templates: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "") + ".")
    return list(templates)


def _formats_badly(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return True
    return False


def load_templates(source: str | Path | None) -> list[str]:
    """The query templates: the built-in :data:`TEMPLATES` for None or ``"default"``, else a JSON file
    holding a list of strings (such as the original's ``mult_template_v1.json``)."""
    if source is None or source == "default":
        return list(TEMPLATES)
    try:
        data = json.loads(Path(source).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"templates={str(source)!r} is not a readable JSON file ({err}).") from err
    return check_templates(data)


def save_templates(templates: Sequence[str], path: str | Path) -> Path:
    """Write templates as the original stores them: a JSON list of strings."""
    return atomic_write_json(path, check_templates(list(templates)))


def templates_problem(value: str | None, params: dict | None = None) -> str | None:
    """The chapter's check of the ``templates`` parameter: None when it loads, else the problem in words."""
    try:
        load_templates(value)
    except ValueError as err:
        return str(err)
    return None


def format_queries(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> pd.DataFrame:
    """One row per (class, template): ``prompt`` is the formatted template followed by a blank line."""
    rows = [
        {"prompt": t.format(name) + "\n\n", "class_index": c, "class_name": name, "template_index": k}
        for c, name in enumerate(class_names)
        for k, t in enumerate(templates)
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- reward
@torch.no_grad()
def class_image_embeddings(
    clip: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    n_classes: int,
    per_class: int = 256,
) -> torch.Tensor:
    """(C, D) mean of the normalised image embeddings of up to ``per_class`` images of each class.

    The mean cosine between a text embedding ``t`` and the images of class c equals ``t @ mean_c``,
    so caching the class means makes the reward one matrix product per batch of descriptions.
    """
    labels = np.asarray(labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)])
    missing = sorted(set(range(n_classes)) - set(labels[keep].tolist()))
    if missing:
        raise ValueError(f"No images of classes {missing}: pass images of every class (or fewer classes).")
    emb = encode_images(clip, images[keep])
    out = torch.zeros(n_classes, emb.shape[1])
    out.index_add_(0, torch.as_tensor(labels[keep]), emb)
    return out / torch.bincount(torch.as_tensor(labels[keep]), minlength=n_classes)[:, None]


def world_class_embeddings(
    clip: torch.nn.Module, world: ConceptWorld, per_class: int = 256, split: str = "val"
) -> torch.Tensor:
    """Class means of ``per_class`` world images of each class (rendered from ``split``)."""
    n = int(per_class * len(world.classes) * 1.4) + 64
    batch = world.sample(n, split=split)
    return class_image_embeddings(clip, batch.images, batch.labels, len(world.classes), per_class)


def dataset_class_embeddings(clip: torch.nn.Module, preprocess, images, per_class: int = 256) -> torch.Tensor:
    """Class means for a real :class:`~conceptlab.data.ImageSet`, loading only ``per_class`` images a class."""
    from .data import load_images

    keep = np.concatenate([np.flatnonzero(images.labels == c)[:per_class] for c in range(len(images.class_names))])
    tensors, _ = load_images([images.paths[i] for i in keep], preprocess)
    return class_image_embeddings(clip, tensors, images.labels[keep], len(images.class_names), per_class)


def mean_cosine_reward(text_emb: torch.Tensor, class_means: torch.Tensor, class_index: Sequence[int]) -> np.ndarray:
    """EX2's reward: the mean cosine of each unit text embedding to its class's unit image embeddings,
    computed as the dot product with the class's mean image embedding (``class_means``)."""
    return (text_emb * class_means[torch.as_tensor(np.asarray(class_index))]).sum(1).numpy()


class CLIPReward:
    """EX2's reward as a trl reward function: mean cosine of a completion to its class's images."""

    __name__ = "clip_reward"  # trl logs each reward function under its name

    def __init__(
        self,
        clip: torch.nn.Module,
        tokenizer,
        class_means: torch.Tensor,
        batch_size: int = 512,
        baseline: torch.Tensor | None = None,
    ) -> None:
        self.clip, self.tokenizer, self.batch_size = clip, tokenizer, batch_size
        self.class_means = class_means.float()
        self.baseline = None if baseline is None else torch.as_tensor(baseline, dtype=torch.float32)

    def relative_to(self, baseline: Sequence[float] | torch.Tensor) -> CLIPReward:
        """The same reward, minus a per-class baseline (e.g. each class's mean reward before alignment)
        when trl calls it: GRPO compares completions of one prompt, so its updates do not change, but the
        logged reward becomes comparable between steps whatever their mix of classes."""
        return CLIPReward(self.clip, self.tokenizer, self.class_means, self.batch_size, torch.as_tensor(baseline))

    def scores(self, descriptions: Sequence[str], class_index: Sequence[int]) -> np.ndarray:
        """Reward of each description for its class, computed in one batched text encoding."""
        texts = [d.strip() for d in descriptions]
        emb = encode_texts(self.clip, self.tokenizer, texts, batch_size=self.batch_size)
        return mean_cosine_reward(emb, self.class_means, class_index)

    def __call__(self, prompts: list, completions: list, class_index: list, **_) -> list[float]:
        scores = self.scores(completions, class_index)
        if self.baseline is not None:
            scores = scores - self.baseline[torch.as_tensor(class_index)].numpy()
        return scores.tolist()


def class_baseline(descriptions: pd.DataFrame, n_classes: int) -> torch.Tensor:
    """(C,) mean reward of each class's descriptions (columns class_index, reward)."""
    means = descriptions.groupby("class_index").reward.mean().reindex(range(n_classes))
    if means.isna().any():
        raise ValueError(f"no descriptions of classes {means.index[means.isna()].tolist()}")
    return torch.tensor(means.to_numpy(), dtype=torch.float32)


# ---------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class AlignConfig:
    """GRPO settings (trl). Part of the artifact key of an aligned model."""

    steps: int = 150
    lr: float = 2e-4
    beta: float = 0.2  # KL coefficient to the reference model (the original PPO run started at 0.2)
    num_generations: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    lora_r: int = 0  # > 0: train LoRA adapters (r, alpha 2r, dropout 0.05) instead of the full model
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("steps", "lr", "num_generations", "prompts_per_step", "max_new_tokens", "temperature")
            if getattr(self, k) <= 0
        ]
        if self.num_generations < 2:
            problems.append("num_generations must be >= 2 (GRPO compares completions of the same prompt)")
        if self.beta < 0 or self.lora_r < 0:
            problems.append("beta and lora_r must be >= 0")
        if problems:
            raise ValueError("Bad AlignConfig: " + "; ".join(problems) + ".")


def balanced_prompts(queries: pd.DataFrame, steps: int, prompts_per_step: int, seed: int = 0) -> pd.DataFrame:
    """The prompts of every GRPO step, in order: step s takes ``prompts_per_step`` queries of as many
    different classes (classes taken in turn, so every class is seen equally often), templates drawn at
    random. Fed to trl unshuffled, a step's reward mixes no more of one class than of another."""
    rng = np.random.default_rng([seed, 11])
    classes = np.sort(queries.class_index.unique())
    by_class = {c: queries.index[queries.class_index == c].to_numpy() for c in classes}
    order = np.concatenate([rng.permutation(classes) for _ in range(steps * prompts_per_step // len(classes) + 1)])
    rows = [rng.choice(by_class[c]) for c in order[: steps * prompts_per_step]]
    return queries.loc[rows].reset_index(drop=True)


def _reward_logger(steps: int, progress: bool):
    from transformers import TrainerCallback

    class RewardLog(TrainerCallback):
        """Keeps trl's per-step logs (mean reward, KL, ...) as the reward curve, with a progress bar."""

        def __init__(self) -> None:
            self.history: list[dict] = []
            self.bar = tqdm(total=steps, disable=not progress, desc="GRPO")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.history.append(
                    {"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
                )
                self.bar.set_postfix(reward=f"{logs['reward']:.3f}", kl=f"{logs.get('kl', 0):.3f}")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return RewardLog()


def training_precision(cuda: bool | None = None, bf16_supported: bool | None = None) -> dict:
    """trl/transformers precision flags for GRPO: bf16 (or fp16) mixed precision on a GPU, fp32 on the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if bf16_supported is None:
        bf16_supported = cuda and torch.cuda.is_bf16_supported()
    return {"use_cpu": not cuda, "bf16": cuda and bf16_supported, "fp16": cuda and not bf16_supported}


def align(
    model,
    tokenizer,
    reward: CLIPReward,
    queries: pd.DataFrame,
    cfg: AlignConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> list[dict]:
    """Align ``model`` to the VLM with trl's GRPOTrainer; save the policy to ``out_dir/policy``, return the
    reward curve. ``model`` itself is left unchanged.

    Each step takes ``prompts_per_step`` queries of different classes (:func:`balanced_prompts`) and
    samples ``num_generations`` completions each (at most ``max_new_tokens``, top_p 1, top_k 0); the
    loss keeps a KL penalty ``beta`` to the reference model, and dropout is off in both. Without LoRA
    the policy is a copy of ``model`` and trl loads the reference from the model's folder; with
    ``lora_r > 0`` only adapters train, the reference is the same weights with the adapters switched
    off (no second copy), and only the adapters are saved.
    Data-parallel on several GPUs: ``accelerate launch -m conceptlab.prepare 04_ex2`` (see the README).
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from .textlm import quiet_transformers

    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM")
    state = process_state()
    processes = state.num_processes  # under `accelerate launch` each takes its share of a step
    if cfg.prompts_per_step % processes:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes "
            f"({processes}), so that a step sees the same prompts however many processes run it."
        )
    log = _reward_logger(cfg.steps, progress)
    prompts = balanced_prompts(queries, cfg.steps, cfg.prompts_per_step, cfg.seed)
    data = Dataset.from_pandas(prompts[["prompt", "class_index"]])
    with tempfile.TemporaryDirectory(prefix="ex2-grpo-") as scratch, warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing, which trl still sets
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = GRPOConfig(
            output_dir=scratch,
            **training_precision(),
            seed=cfg.seed,
            data_seed=cfg.seed,
            max_steps=cfg.steps,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            beta=cfg.beta,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=1.0,
            top_k=0,
            gradient_checkpointing=False,
            per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step // processes,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            disable_dropout=True,
            shuffle_dataset=False,
        )
        with quiet_transformers():  # trl loads the reference model: no "Loading weights" bar per alignment
            trainer = GRPOTrainer(
                model=model if cfg.lora_r else copy.deepcopy(model),
                reward_funcs=reward,
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                callbacks=[log],
                peft_config=peft_config,
            )
        trainer.remove_callback(PrinterCallback)  # the RewardLog bar replaces one printed line per step
        trainer.train()
    from .textlm import save_pretrained_atomic

    if state.is_main_process:
        save_pretrained_atomic(trainer.model, tokenizer, Path(out_dir) / "policy")
        atomic_write_json(Path(out_dir) / "history.json", log.history)
        atomic_write_json(Path(out_dir) / "launch.json", {"processes": processes})
    if cfg.lora_r:
        trainer.model.unload()  # takes the adapters out of ``model`` again
    return log.history


def load_policy(folder: str | Path, base) -> torch.nn.Module:
    """The aligned policy saved by :func:`align`: a full model, or LoRA adapters put on a copy of ``base``
    (merged into it, unless ``base`` is quantized)."""
    from .textlm import load_lm, quiet_transformers

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        with quiet_transformers():
            return load_lm(str(folder), device=str(base.device), dtype=base.dtype)[0]
    from peft import PeftModel

    with quiet_transformers():
        policy = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    quantized = getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None)
    return (policy if quantized else policy.merge_and_unload()).eval()


def aligned_lm(
    store: ArtifactStore,
    key: dict,
    model,
    tokenizer,
    reward: CLIPReward,
    queries: pd.DataFrame,
    cfg: AlignConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[dict]]:
    """The aligned policy for ``key`` (what made the LM and the VLM) and ``cfg``, and its reward curve:
    loaded from the store, or trained with :func:`align` and stored.

    Under ``accelerate launch`` (``python -m conceptlab.prepare``) every process trains, trl splitting
    each step's completions between them, and the main process stores the policy.
    """

    def load(d: Path) -> tuple[torch.nn.Module, list[dict]]:
        return load_policy(d / "policy", model), json.loads((d / "history.json").read_text())

    return store.get_or_build(
        "ex2_aligned",
        {"key": key, "align": asdict(cfg)},
        collective=True,
        load=load,
        build=lambda d: align(model, tokenizer, reward, queries, cfg, d, progress=progress),
    )


def reward_rise(curve: Sequence[dict]) -> tuple[float, float, int]:
    """Mean reward of GRPO's first and last fifth of steps, and the window's length."""
    rewards = [h["reward"] for h in curve]
    window = max(1, len(rewards) // 5)
    return float(np.mean(rewards[:window])), float(np.mean(rewards[-window:])), window


# ---------------------------------------------------------------------------- inference
@torch.no_grad()
def generate_descriptions(
    model,
    tokenizer,
    queries: pd.DataFrame,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    progress: bool = False,
) -> pd.DataFrame:
    """One sampled completion per query row (top_p 1, top_k 0), returned as a ``description`` column."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    dev = model.device  # the first GPU of a device_map="auto" model, else its only device
    out = []
    prompts = queries["prompt"].tolist()
    for s in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate"):
        enc = tokenizer(prompts[s : s + batch_size], return_tensors="pt", padding=True).to(dev)
        gen = model.generate(
            **enc,
            do_sample=True,
            top_p=1.0,
            top_k=0,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    result = queries.copy()
    result["description"] = [o.strip() for o in out]
    return result


def save_descriptions(descriptions: pd.DataFrame, path: str | Path) -> Path:
    """Write descriptions as JSON records (class, template, prompt, description, and any extra columns)."""
    return atomic_write_json(path, descriptions.to_dict(orient="records"))


# ---------------------------------------------------------------------------- inspection
KINDS: tuple[str, ...] = ("spurious", "false", "visual", "non-visual", "unparsed")


def inspect_descriptions(descriptions: pd.DataFrame, judge, world: ConceptWorld | None = None) -> pd.DataFrame:
    """EX2's inspection of ``descriptions`` (columns class_name, description; class_index on the world).

    The judge answers :data:`~conceptlab.judges.INFORMATIVE` for every description and
    :data:`~conceptlab.judges.ATTRIBUTE` for the informative ones. ``kind`` is "spurious" where the
    judge says "no", else the attribute's group ("visual" or "non-visual"); "unparsed" where a reply
    could not be read. On the world the ground-truth labels are added, and a description that
    states facts about the class, none of them true, is "false" (informative but false) whatever
    the judge says: it is never counted as spurious.
    """
    from .judges import ATTRIBUTE, ATTRIBUTE_GROUPS, INFORMATIVE, WorldJudge

    df = descriptions.reset_index(drop=True)
    if world is not None:
        df = WorldJudge(world).label_frame(df)
    df["judge"] = judge.ask(INFORMATIVE, df.class_name.tolist(), df.description.tolist())
    yes = df.index[df.judge == "yes"]
    df["attribute"] = None
    if len(yes):
        df.loc[yes, "attribute"] = judge.ask(ATTRIBUTE, df.class_name[yes].tolist(), df.description[yes].tolist())
    group = df.attribute.map(ATTRIBUTE_GROUPS)
    df["kind"] = np.where(df.judge == "no", "spurious", np.where(group.isna(), "unparsed", group))
    if world is not None:
        df.loc[(df.claims > 0) & (df.n_true == 0), "kind"] = "false"
    return df


def kind_shares(labelled: pd.DataFrame) -> pd.Series:
    """Share of descriptions of each kind (every kind of :data:`KINDS`, 0 where absent)."""
    return labelled.kind.value_counts(normalize=True).reindex(list(KINDS), fill_value=0.0)


def attribute_table(labelled: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Share of each attribute type (and group) among the informative descriptions, one column per stage."""
    from .judges import ATTRIBUTE_GROUPS

    cols = {}
    for stage, df in labelled.items():
        informative = df.attribute.dropna()
        cols[stage] = informative.value_counts(normalize=True).reindex(list(ATTRIBUTE_GROUPS), fill_value=0.0)
    table = pd.DataFrame(cols)
    table.index = pd.MultiIndex.from_tuples([(ATTRIBUTE_GROUPS[a], a) for a in table.index], names=["group", "type"])
    return table


def factor_mentions(labelled: pd.DataFrame) -> pd.Series:
    """Share of descriptions that state each factor of :func:`conceptlab.reliance.counterfactual_reliance` truly:
    the class's habitat, or a part's true colour."""
    shares = {"habitat": labelled.habitat_true.mean()}
    shares.update({f"{p} colour": labelled.true_colour_parts.map(lambda ps, p=p: p in ps).mean() for p in PARTS})
    return pd.Series(shares, name="mention share")


# ---------------------------------------------------------------------------- before and after, paired
def sample_descriptions(
    model, tokenizer, queries: pd.DataFrame, samples_per_query: int = 2, max_new_tokens: int = 32, seed: int = 0
) -> pd.DataFrame:
    """``samples_per_query`` sampled descriptions of every query (column ``sample``), seeded: the fixed
    evaluation set that the LM before and after alignment both write."""
    rows = pd.concat([queries.assign(sample=k) for k in range(samples_per_query)], ignore_index=True)
    return generate_descriptions(model, tokenizer, rows, max_new_tokens, seed=seed)


PAIR_KEYS = ("class_index", "template_index", "sample")


def paired_gain(
    before: pd.DataFrame, after: pd.DataFrame, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean reward gain, low, high)`` of ``after`` over ``before`` on the same (class, template, sample)
    slots: each slot's gain is after minus before; 95 % bootstrap interval over the slots."""
    from .stats import paired_difference_interval

    keys = list(PAIR_KEYS)
    a, b = after.set_index(keys).sort_index(), before.set_index(keys).sort_index()
    if not a.index.equals(b.index) or a.index.has_duplicates:
        raise ValueError(
            "before and after must hold the same (class_index, template_index, sample) slots, "
            "each once: the gain is paired"
        )
    return paired_difference_interval(a.reward.to_numpy(), b.reward.to_numpy(), n_resamples=n_resamples, seed=seed)


def pooled_draws(draws: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Several independent draws of one LM on the same slots, as one frame whose ``reward`` is each slot's
    mean over the draws: a null that one lucky or unlucky draw cannot move."""
    keys = list(PAIR_KEYS)
    rewards = pd.concat([d.set_index(keys).reward for d in draws], axis=1)
    if rewards.isna().any().any() or len(rewards) != len(draws[0]):
        raise ValueError("every draw must hold the same (class_index, template_index, sample) slots")
    return rewards.mean(axis=1).rename("reward").reset_index()


# ---------------------------------------------------------------------------- what the LM knows
class KnowledgeGateError(RuntimeError):
    """The language model does not know the world well enough for its alignment to mean anything."""


def truth_share(labelled: pd.DataFrame) -> tuple[float, int]:
    """``(share of true claims, number of claims)`` in descriptions labelled by the world judge
    (columns ``claims`` and ``n_true``: statements about the class's parts, habitat, behaviour)."""
    claims = int(labelled.claims.sum())
    return (float(labelled.n_true.sum() / claims) if claims else float("nan")), claims


def knowledge_gate(labelled: pd.DataFrame, min_true_share: float = 0.9) -> float:
    """The share of true claims, or :class:`KnowledgeGateError` when it is below ``min_true_share``."""
    share, claims = truth_share(labelled)
    if not share >= min_true_share:  # NaN (no claims at all) fails too
        raise KnowledgeGateError(
            f"The language model knows too little of the world to align it: {share:.1%} of its {claims} "
            f"claims are true, the gate asks for {min_true_share:.0%}. Train it longer (lm_steps), on more "
            f"documents (lm_corpus_size) or with fewer false sentences (lm_answer_mix); or lower "
            f"lm_min_true_share to run anyway."
        )
    return share


def random_class_truth(descriptions: pd.DataFrame, world: ConceptWorld, seed: int = 0) -> float:
    """Share of true claims when every description is judged as if about another class (drawn at random):
    what an LM writing the world's sentences about the wrong class would score."""
    from .judges import WorldJudge

    rng = np.random.default_rng(seed)
    n = len(world.classes)
    other = (descriptions.class_index.to_numpy() + rng.integers(1, n, len(descriptions))) % n
    return truth_share(WorldJudge(world).label_frame(descriptions.assign(class_index=other)))[0]


# ---------------------------------------------------------------------------- the target before the run
def kind_sentences(world: ConceptWorld, per_kind: int = 32, seed: int = 0) -> pd.DataFrame:
    """``per_kind`` sentences of every answer kind for every class, written from the ground truth."""
    from .textlm import ANSWER_KINDS, answer_sentence

    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {"kind": kind, "class_index": c, "sentence": answer_sentence(kind, spec, rng)}
            for c, spec in enumerate(world.classes)
            for kind in ANSWER_KINDS
            for _ in range(per_kind)
        ]
    )


def kind_preference(reward: CLIPReward, world: ConceptWorld, per_kind: int = 32, seed: int = 0) -> pd.DataFrame:
    """The VLM's preference straight from the reward: :func:`kind_sentences` with their rewards."""
    df = kind_sentences(world, per_kind, seed)
    df["reward"] = reward.scores(df.sentence.tolist(), df.class_index.tolist())
    return df


def kind_table(preference: pd.DataFrame, reference: str = "class", seed: int = 0) -> pd.DataFrame:
    """Per kind: mean reward, and its difference to the ``reference`` kind with a 95 % interval paired
    over classes (each class's mean of the kind minus its mean of the reference; bootstrap over classes)."""
    from .stats import paired_difference_interval

    per_class = preference.pivot_table(index="class_index", columns="kind", values="reward", aggfunc="mean")
    rows = {}
    for kind in per_class:
        diff, low, high = paired_difference_interval(per_class[kind], per_class[reference], seed=seed)
        rows[kind] = {"reward": float(per_class[kind].mean()), f"minus {reference}": diff, "low": low, "high": high}
    return pd.DataFrame(rows).T.sort_values("reward", ascending=False).rename_axis("kind")


def planted_reward_differences(
    control: pd.DataFrame, planted: pd.DataFrame, kind: str, reference: str = "class"
) -> pd.Series:
    """Per class: how much more the planted VLM's reward prefers ``kind`` sentences over ``reference`` ones
    than the control's does. ``control`` and ``planted`` are :func:`kind_preference` frames of the same sentences."""

    def relative(preference: pd.DataFrame) -> pd.Series:
        per_class = preference.pivot_table(index="class_index", columns="kind", values="reward", aggfunc="mean")
        return per_class[kind] - per_class[reference]

    return relative(planted) - relative(control)


def optimal_mix(reference: pd.Series, reward: pd.Series, beta: float, scale: float = 1.0) -> pd.Series:
    """The mix of kinds that KL-regularised RL converges to: ``π*(k) ∝ π_ref(k) · exp(r_k / (β · scale))``.

    ``reference``: the shares of the kinds before alignment; ``reward``: each kind's mean reward;
    ``scale``: the reward's unit (GRPO divides rewards by their spread within a group, so pass that
    spread to predict what GRPO optimises; 1 for the raw reward)."""
    r = reward.reindex(reference.index).fillna(reward.min())
    logits = np.log(reference.clip(lower=1e-12)) + (r - r.max()) / (beta * scale)
    weights = np.exp(logits) * (reference > 0)
    return weights / weights.sum()


def sentence_kinds(descriptions: pd.DataFrame, world: ConceptWorld) -> pd.DataFrame:
    """One row per sentence of every description (columns class_index, description), with its kind
    (:meth:`conceptlab.judges.WorldJudge.sentence_kind`) and the position of its description."""
    from .judges import WorldJudge

    judge = WorldJudge(world)
    rows = [
        {"description_index": i, "class_index": c, "sentence": s, "kind": judge.sentence_kind(c, s)}
        for i, (c, text) in enumerate(zip(descriptions.class_index, descriptions.description))
        for s in re.split(r"(?<=[.!?])\s+", str(text).strip())
        if s
    ]
    return pd.DataFrame(rows, columns=["description_index", "class_index", "sentence", "kind"])


def sentence_kind_shares(descriptions: pd.DataFrame, world: ConceptWorld) -> pd.Series:
    """Share of the sentences of ``descriptions`` of each kind (every kind present, 0 where absent)."""
    return kind_shares_of(sentence_kinds(descriptions, world))


def kind_shares_of(kinds: pd.DataFrame) -> pd.Series:
    """Share of each kind among the sentences of a :func:`sentence_kinds` frame (every kind present, 0 where
    absent): for callers that keep the kinds to count them several ways."""
    from .judges import SENTENCE_KINDS

    return kinds.kind.value_counts(normalize=True).reindex(list(SENTENCE_KINDS), fill_value=0.0)


def reweighted_kind_shares(
    descriptions: pd.DataFrame, world: ConceptWorld, beta: float, scale: float = 1.0
) -> pd.Series:
    """The sentence-kind mix KL-regularised RL converges to, estimated on the pretrained LM's own descriptions:
    ``π*(y) ∝ π_ref(y) · exp(r(y) / (β · scale))`` by self-normalised importance weights, each class's
    descriptions reweighted among themselves. Unlike :func:`optimal_mix` it uses the reward of whole
    descriptions, the unit the VLM scores (a sentence's reward depends on what else the description says)."""
    from .judges import SENTENCE_KINDS

    d = descriptions.reset_index(drop=True)
    w = np.exp((d.reward - d.groupby("class_index").reward.transform("max")) / (beta * scale))
    w = w / w.groupby(d.class_index).transform("sum")
    kinds = sentence_kinds(d, world)
    weight = w.to_numpy()[kinds.description_index.to_numpy()]
    shares = pd.Series(weight).groupby(kinds.kind.to_numpy()).sum() / weight.sum()
    return shares.reindex(list(SENTENCE_KINDS), fill_value=0.0)


# ---------------------------------------------------------------------------- the whole method on a world CLIP
def run_on_world(
    store: ArtifactStore,
    clip: torch.nn.Module,
    clip_tokenizer,
    clip_key: dict,
    world: ConceptWorld,
    lm_cfg,
    align_cfg: AlignConfig,
    images_per_class: int = 256,
    samples_per_query: int = 2,
    templates: Sequence[str] = TEMPLATES,
    progress: bool = False,
) -> dict:
    """EX2 on any world CLIP (``clip_key`` identifies it in the store): the world LM ``lm_cfg``
    (:class:`conceptlab.textlm.WorldLMConfig`, stored once for every CLIP), GRPO alignment to the CLIP's
    reward (stored), and ``samples_per_query`` fixed samples of every query before and after.

    Returns ``{"before", "after"}`` (descriptions with their rewards, paired by slot: see
    :func:`paired_gain`), ``"curve"`` (GRPO's log) and ``"sentence_kinds"`` (share of each kind of
    sentence before and after, :func:`sentence_kind_shares`)."""
    from .textlm import world_lm

    lm, tokenizer, _ = world_lm(store, lm_cfg, templates, progress=progress)
    reward = CLIPReward(clip, clip_tokenizer, world_class_embeddings(clip, world, images_per_class))
    queries = format_queries(world.class_names, templates)
    out = {}
    before = sample_descriptions(lm, tokenizer, queries, samples_per_query, align_cfg.max_new_tokens, align_cfg.seed)
    before["reward"] = reward.scores(before.description.tolist(), before.class_index.tolist())
    key = {
        "clip": clip_key,
        "lm": asdict(lm_cfg),
        "templates": list(templates),
        "images_per_class": images_per_class,
        "relative": True,
    }
    policy, out["curve"] = aligned_lm(
        store,
        key,
        lm,
        tokenizer,
        reward.relative_to(class_baseline(before, len(world.classes))),
        queries,
        align_cfg,
        progress=progress,
    )
    after = sample_descriptions(policy, tokenizer, queries, samples_per_query, align_cfg.max_new_tokens, align_cfg.seed)
    after["reward"] = reward.scores(after.description.tolist(), after.class_index.tolist())
    out.update(
        before=before,
        after=after,
        sentence_kinds=pd.DataFrame(
            {"before": sentence_kind_shares(before, world), "after": sentence_kind_shares(after, world)}
        ),
    )
    return out
