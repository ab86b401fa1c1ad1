"""EX2 (Extract and Explore): align a language model to a VLM's preferences, then inspect them.

1. Queries: 25 templates per class, each followed by a blank line (:func:`load_templates`: the
   book's own, or a JSON list such as the original's ``mult_template_v1.json``).
2. Reward: the mean cosine similarity between ``f_T(description)`` and the cached image
   embeddings of the class, vectorised over a batch of completions (:class:`CLIPReward`).
3. Alignment: trl's ``GRPOTrainer`` with a KL penalty to the reference model (:func:`align`).
4. Inference: one sampled description per template per class (:func:`generate_descriptions`).
5. Inspection (:func:`inspect`): the judge's informative question, then the attribute question for
   the informative descriptions (:mod:`conceptlab.judges`); on the world, descriptions whose every
   claim is false are their own category ("false"), never spurious.
6. The chapter: :data:`PARAMETERS`, :data:`SWITCHES` (differences from the original),
   :func:`pipeline` (every step cached) and the exercises.
7. Ground truth: counterfactual images measure what the VLM relies on
   (:func:`conceptlab.reliance.counterfactual_reliance`).
"""

from __future__ import annotations

import copy
import json
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
from .chapter import Param, Switch
from .models import TrainConfig, encode_images, encode_texts
from .textlm import WorldLMConfig
from .world import PARTS, ConceptWorld, WorldConfig

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
        raise ValueError("templates must be a non-empty JSON list of strings, e.g. [\"Describe a photo of a {}.\"]")
    problems = [f"item {i} ({t!r}) is not a string with exactly one {{}}" for i, t in enumerate(templates)
                if not isinstance(t, str) or t.count("{}") != 1 or _formats_badly(t)]
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
    rows = [{"prompt": t.format(name) + "\n\n", "class_index": c, "class_name": name, "template_index": k}
            for c, name in enumerate(class_names) for k, t in enumerate(templates)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- reward
@torch.no_grad()
def class_image_embeddings(clip: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray,
                           n_classes: int, per_class: int = 256, batch_size: int = 256) -> torch.Tensor:
    """(C, D) mean of the normalised image embeddings of up to ``per_class`` images of each class.

    The mean cosine between a text embedding ``t`` and the images of class c equals ``t @ mean_c``,
    so caching the class means makes the reward one matrix product per batch of descriptions.
    """
    labels = np.asarray(labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)])
    missing = sorted(set(range(n_classes)) - set(labels[keep].tolist()))
    if missing:
        raise ValueError(f"No images of classes {missing}: pass images of every class (or fewer classes).")
    emb = encode_images(clip, images[keep], batch_size=batch_size)
    out = torch.zeros(n_classes, emb.shape[1])
    out.index_add_(0, torch.as_tensor(labels[keep]), emb)
    return out / torch.bincount(torch.as_tensor(labels[keep]), minlength=n_classes)[:, None]


def world_class_embeddings(clip: torch.nn.Module, world: ConceptWorld, per_class: int = 256,
                           split: str = "val") -> torch.Tensor:
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

    def __init__(self, clip: torch.nn.Module, tokenizer, class_means: torch.Tensor, batch_size: int = 512) -> None:
        self.clip, self.tokenizer, self.batch_size = clip, tokenizer, batch_size
        self.class_means = class_means.float()

    def scores(self, descriptions: Sequence[str], class_index: Sequence[int]) -> np.ndarray:
        """Reward of each description for its class, computed in one batched text encoding."""
        texts = [d.strip() for d in descriptions]
        emb = encode_texts(self.clip, self.tokenizer, texts, batch_size=self.batch_size)
        return mean_cosine_reward(emb, self.class_means, class_index)

    def __call__(self, prompts: list, completions: list, class_index: list, **_) -> list[float]:
        return self.scores(completions, class_index).tolist()


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
        problems = [f"{k}={getattr(self, k)} must be positive" for k in
                    ("steps", "lr", "num_generations", "prompts_per_step", "max_new_tokens", "temperature")
                    if getattr(self, k) <= 0]
        if self.num_generations < 2:
            problems.append("num_generations must be >= 2 (GRPO compares completions of the same prompt)")
        if self.beta < 0 or self.lora_r < 0:
            problems.append("beta and lora_r must be >= 0")
        if problems:
            raise ValueError("Bad AlignConfig: " + "; ".join(problems) + ".")


def _reward_logger(steps: int, progress: bool):
    from transformers import TrainerCallback

    class RewardLog(TrainerCallback):
        """Keeps trl's per-step logs (mean reward, KL, ...) as the reward curve, with a progress bar."""

        def __init__(self) -> None:
            self.history: list[dict] = []
            self.bar = tqdm(total=steps, disable=not progress, desc="GRPO")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.history.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()
                                                                    if isinstance(v, (int, float))}})
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


def align(model, tokenizer, reward: CLIPReward, queries: pd.DataFrame, cfg: AlignConfig, out_dir: str | Path,
          progress: bool = True) -> list[dict]:
    """Align ``model`` to the VLM with trl's GRPOTrainer; save the policy to ``out_dir/policy``, return the
    reward curve. ``model`` itself is left unchanged.

    Each step samples ``prompts_per_step`` queries and ``num_generations`` completions each
    (at most ``max_new_tokens``, top_p 1, top_k 0); the loss keeps a KL penalty ``beta`` to
    the reference model. Without LoRA the policy is a copy of ``model`` and trl loads the reference
    from the model's folder; with ``lora_r > 0`` only adapters train, the reference is the same
    weights with the adapters switched off (no second copy), and only the adapters are saved.
    Data-parallel on several GPUs: ``accelerate launch -m conceptlab.prepare 04_ex2`` (see the README).
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM")
    state = process_state()
    processes = state.num_processes  # under `accelerate launch` each takes its share of a step
    if cfg.prompts_per_step % processes:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes "
                         f"({processes}), so that a step sees the same prompts however many processes run it.")
    log = _reward_logger(cfg.steps, progress)
    data = Dataset.from_pandas(queries[["prompt", "class_index"]].reset_index(drop=True))
    with tempfile.TemporaryDirectory(prefix="ex2-grpo-") as scratch, warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing, which trl still sets
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = GRPOConfig(
            output_dir=scratch, **training_precision(), seed=cfg.seed,
            data_seed=cfg.seed, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
            beta=cfg.beta, num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=1.0, top_k=0, gradient_checkpointing=False,
            per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step // processes, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model if cfg.lora_r else copy.deepcopy(model), reward_funcs=reward, args=args,
                              train_dataset=data, processing_class=tokenizer, callbacks=[log],
                              peft_config=peft_config)
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
    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        from .textlm import load_lm

        return load_lm(str(folder), device=str(base.device), dtype=base.dtype)[0]
    from peft import PeftModel

    policy = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    quantized = getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None)
    return (policy if quantized else policy.merge_and_unload()).eval()


def aligned_lm(store: ArtifactStore, key: dict, model, tokenizer, reward: CLIPReward, queries: pd.DataFrame,
               cfg: AlignConfig, progress: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """The aligned policy for ``key`` (what made the LM and the VLM) and ``cfg``, and its reward curve:
    loaded from the store, or trained with :func:`align` and stored.

    Under ``accelerate launch`` (``python -m conceptlab.prepare``) every process trains, trl splitting
    each step's completions between them, and the main process stores the policy.
    """
    def load(d: Path) -> tuple[torch.nn.Module, list[dict]]:
        return load_policy(d / "policy", model), json.loads((d / "history.json").read_text())

    return store.get_or_build("ex2_aligned", {"key": key, "align": asdict(cfg)}, collective=True, load=load,
                              build=lambda d: align(model, tokenizer, reward, queries, cfg, d, progress=progress))


# ---------------------------------------------------------------------------- inference
@torch.no_grad()
def generate_descriptions(model, tokenizer, queries: pd.DataFrame, max_new_tokens: int = 32, seed: int = 0,
                          batch_size: int = 64, temperature: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """One sampled completion per query row (top_p 1, top_k 0), returned as a ``description`` column."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    dev = model.device  # the first GPU of a device_map="auto" model, else its only device
    out = []
    prompts = queries["prompt"].tolist()
    for s in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate"):
        enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True).to(dev)
        gen = model.generate(**enc, do_sample=True, top_p=1.0, top_k=0, temperature=temperature,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    result = queries.copy()
    result["description"] = [o.strip() for o in out]
    return result


def save_descriptions(descriptions: pd.DataFrame, path: str | Path) -> Path:
    """Write descriptions as JSON records (class, template, prompt, description, and any extra columns)."""
    return atomic_write_json(path, descriptions.to_dict(orient="records"))


# ---------------------------------------------------------------------------- inspection
KINDS: tuple[str, ...] = ("spurious", "false", "visual", "non-visual", "unparsed")


def inspect(descriptions: pd.DataFrame, judge, world: ConceptWorld | None = None) -> pd.DataFrame:
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


def attribute_shift(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Total variation distance between the attribute types of two sets of inspected descriptions
    (0: the same mix of attributes among the informative ones, 1: no attribute type in common)."""
    table = attribute_table({"a": a, "b": b})
    return float((table["a"] - table["b"]).abs().sum() / 2)


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


def text_preference(reward: CLIPReward, world: ConceptWorld) -> pd.DataFrame:
    """The VLM's preference for each kind of sentence, straight from the reward.

    For every class, the reward of each sentence kind (true part description, habitat fact,
    web phrase, ...) written from the world's ground truth; mean over classes and phrasings.
    """
    from .textlm import ANSWER_KINDS, answer_sentence

    rng = np.random.default_rng(0)
    rows = [{"kind": kind, "class_index": c, "sentence": answer_sentence(kind, spec, rng)}
            for c, spec in enumerate(world.classes) for kind in ANSWER_KINDS for _ in range(8)]
    df = pd.DataFrame(rows)
    df["reward"] = reward.scores(df["sentence"].tolist(), df["class_index"].tolist())
    return df


# ---------------------------------------------------------------------------- the chapter
def _lm_problem(value: str, params: dict) -> str | None:
    if value == "world":
        return None if params["dataset"] == "world" else ("lm='world' knows only Concept World: with real data "
                                                          "pass a transformers causal LM name or folder")
    if value.startswith((".", "/", "~")) and not Path(value).expanduser().is_dir():
        return f"{value!r} is no folder with a transformers model (save_pretrained writes one)"
    return None


def _judge_problem(value: str, params: dict) -> str | None:
    from .judges import judge_problem

    return judge_problem(value, params["judge_api_key_env"], on_world=params["dataset"] == "world")


def _config_problem(cls: type, **fields) -> str | None:
    try:
        cls(**fields)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _world_only(p: dict) -> bool:
    return p["dataset"] == "world"


def _second(p: dict) -> bool:
    return p["dataset"] == "world" and p["model"] == "world" and p["second_vlm"]


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub"), help="images of the reward"),
    "data_root": Param(None, "dir", applies=lambda p: p["dataset"] != "world", help="a real data set's folder"),
    "images_per_class": Param(256, int, min=1, help="images of a class in its reward (the original: 256)"),
    "templates": Param(None, "file", check=lambda v, p: templates_problem(v),
                       help="JSON list of query templates (the original's mult_template_v1.json); None: the book's"),
    "lm": Param("world", str, check=_lm_problem, help="'world' or a transformers causal LM name/folder"),
    "lm_quantization": Param(None, str, choices=("8bit", "4bit"), help="bitsandbytes weights (GPU only)"),
    "lm_corpus_size": Param(6000, int, min=10, applies=lambda p: p["lm"] == "world"),
    "lm_answer_mix": Param(dict(WorldLMConfig().answer_mix), dict, applies=lambda p: p["lm"] == "world",
                           check=lambda v, p: _config_problem(WorldLMConfig, answer_mix=v)),
    "lm_steps": Param(400, int, min=1, applies=lambda p: p["lm"] == "world"),
    "lora_r": Param(0, int, min=0, help="> 0: GRPO trains LoRA adapters of this rank"),
    "grpo_steps": Param(60, int, min=1),
    "grpo_lr": Param(3e-4, float, min=0.0),
    "grpo_beta": Param(0.2, float, min=0.0, help="KL coefficient (the original PPO run started at 0.2)"),
    "num_generations": Param(8, int, min=2),
    "prompts_per_step": Param(4, int, min=1),
    "max_new_tokens": Param(32, int, min=1),
    "judge": Param("world", str, check=_judge_problem,
                   help="'world', a transformers model name/folder, or 'openai:<model>@<base_url>'"),
    "judge_api_key_env": Param("OPENAI_API_KEY", str, applies=lambda p: p["judge"].startswith("openai:")),
    "judge_min_true": Param(1, int, min=1, applies=lambda p: p["judge"] == "world",
                            help="true facts the world judge needs to call a description informative"),
    "n_counterfactual": Param(512, int, min=8, applies=_world_only),
    "second_vlm": Param(False, bool, applies=_world_only,
                        help="also align to a second world CLIP (costs its training: off in the book's run)"),
    "second_world": Param({"habitat_correlation": 0.3, "caption_mix": {
        "visual": 0.4, "class": 0.2, "habitat": 0.05, "behaviour": 0.05, "spurious": 0.3}}, dict,
        applies=_second, check=lambda v, p: _config_problem(WorldConfig, **{**p["world"], **v})),
    "second_world_clip": Param({"steps": 150}, dict, applies=_second,
                               check=lambda v, p: _config_problem(TrainConfig, **{**p["world_clip"], **v})),
}

ORIGINAL_LM = "mistralai/Mistral-7B-v0.1"
ORIGINAL_JUDGE = "openai:gpt-3.5-turbo-1106@https://api.openai.com/v1"
SWITCHES: dict[str, Switch] = {
    "templates": Switch("mult_template_v1.json", "mult_template_v1.json",
                        "the queries the LM answers; None uses the book's own 25 in the same spirit"),
    "lm": Switch(ORIGINAL_LM, ORIGINAL_LM, "which LM writes the descriptions"),
    "lora_r": Switch(16, 16, "LoRA rank (0: all weights train, as the world LM is tiny)"),
    "grpo_beta": Switch(0.2, 0.2, "KL coefficient (the original's is adaptive, starting at 0.2)"),
    "max_new_tokens": Switch(32, 32, "length of a description in tokens"),
    "images_per_class": Switch(256, 256, "images of a class in its reward"),
    "judge": Switch("ChatGPT", ORIGINAL_JUDGE, "who answers the inspection questions"),
}
# Differences that no parameter switches (the book cannot run the original's stack).
FIXED_DIFFERENCES: dict[str, dict[str, str]] = {
    "alignment": {"this run": "GRPO (trl GRPOTrainer)", "paper": "PPO", "original code": "PPO (trl 0.7 API)",
                  "what it changes": "trl removed that PPO API; GRPO optimises the same reward with a KL "
                                     "penalty, comparing completions of one query instead of a value head"},
    "reward scale": {"this run": "cosine", "paper": "mean similarity", "original code": "100 x cosine",
                     "what it changes": "nothing for GRPO, which standardises rewards within a group"},
    "attribute question": {"this run": "second judge question", "paper": "attribute analysis",
                           "original code": "not released",
                           "what it changes": "how informative descriptions are sorted into types"},
    "false descriptions": {"this run": "own category (world)", "paper": "not separated",
                           "original code": "not separated",
                           "what it changes": "informative-but-false text is never counted as spurious"},
}


def differences(ch) -> pd.DataFrame:
    """The run's differences from the original: the switches in effect, then the fixed differences."""
    table = ch.differences(SWITCHES)
    if ch.params["templates"] is None:
        table.loc["templates", "this run"] = "the book's 25 (ex2.TEMPLATES)"
    for name, row in FIXED_DIFFERENCES.items():
        table.loc[name] = {**row, "this run follows": "neither"}
    return table


def lm_config(p: dict) -> WorldLMConfig:
    """The world LM's configuration from the chapter's parameters."""
    return WorldLMConfig(n_classes=WorldConfig(**p["world"]).n_classes, corpus_size=p["lm_corpus_size"],
                         answer_mix=p["lm_answer_mix"], steps=p["lm_steps"], seed=p["seed"])


def align_config(p: dict) -> AlignConfig:
    """GRPO's configuration from the chapter's parameters."""
    return AlignConfig(steps=p["grpo_steps"], lr=p["grpo_lr"], beta=p["grpo_beta"],
                       num_generations=p["num_generations"], prompts_per_step=p["prompts_per_step"],
                       max_new_tokens=p["max_new_tokens"], lora_r=p["lora_r"], seed=p["seed"])


def chapter_reward(ch, clip_bundle=None, key: dict | None = None) -> tuple[CLIPReward, list[str], dict]:
    """``(reward, class names, reward key)`` of the chapter's VLM (or of ``clip_bundle``, identified by
    ``key``); the class means of the image embeddings are cached in the store."""
    from .data import load_dataset

    p = ch.params
    clip, preprocess, tokenizer, _ = clip_bundle or ch.clip()
    key = {**(key or ch.key()), "dataset": p["dataset"], "images_per_class": p["images_per_class"]}
    if p["dataset"] == "world":
        names = ch.world.class_names
        means = lambda: world_class_embeddings(clip, ch.world, p["images_per_class"])  # noqa: E731
    else:
        images = load_dataset(p["dataset"], p["data_root"], "test")
        names = images.class_names
        means = lambda: dataset_class_embeddings(clip, preprocess, images, p["images_per_class"])  # noqa: E731
    class_means = ch.store.get_or_build("ex2_class_means", key,
                                        lambda d: torch.save(means(), d / "means.pt"),
                                        lambda d: torch.load(d / "means.pt", weights_only=True))
    return CLIPReward(clip, tokenizer, class_means), list(names), key


def chapter_lm(ch, templates: Sequence[str], progress: bool = True) -> tuple[torch.nn.Module, object, dict, list]:
    """``(model, tokenizer, key, pretraining history)`` of the chapter's language model."""
    from .textlm import load_lm, world_lm

    p = ch.params
    if p["lm"] == "world":
        cfg = lm_config(p)
        model, tokenizer, history = world_lm(ch.store, cfg, templates, progress=progress)
        return model, tokenizer, {"lm": "world", **asdict(cfg), "templates": list(templates)}, history
    model, tokenizer = load_lm(p["lm"], quantization=p["lm_quantization"])
    return model, tokenizer, {"lm": p["lm"], "sha256": ch.inputs.get("lm") or _folder_hash(p["lm"])}, []


def _folder_hash(path: str) -> str | None:
    from .artifacts import fingerprint

    return fingerprint(path) if Path(path).exists() else None


def cached_descriptions(ch, key: dict, model, tokenizer, queries: pd.DataFrame, max_new_tokens: int,
                        reward: CLIPReward) -> pd.DataFrame:
    """One description per query from ``model`` (identified by ``key``), with its reward; stored as JSON."""
    def build(d: Path) -> None:
        out = generate_descriptions(model, tokenizer, queries, max_new_tokens, seed=ch.params["seed"])
        out["reward"] = reward.scores(out.description.tolist(), out.class_index.tolist())
        save_descriptions(out, d / "descriptions.json")

    return ch.store.get_or_build("ex2_descriptions", {**key, "max_new_tokens": max_new_tokens}, build,
                                 lambda d: pd.DataFrame(json.loads((d / "descriptions.json").read_text())))


def reward_rise(curve: Sequence[dict]) -> tuple[float, float, int]:
    """Mean reward of GRPO's first and last fifth of steps, and the window's length."""
    rewards = [h["reward"] for h in curve]
    window = max(1, len(rewards) // 5)
    return float(np.mean(rewards[:window])), float(np.mean(rewards[-window:])), window


# ---------------------------------------------------------------------------- pipeline and exercises
class _ParamsView:
    """A chapter seen with other parameters (the same world, store and CLIP)."""

    def __init__(self, ch, params: dict) -> None:
        self._ch, self.params = ch, params

    def __getattr__(self, name: str):
        return getattr(self._ch, name)


def pipeline(ch, progress: bool = True, **changes) -> dict:
    """The chapter's EX2 run with ``changes`` to its parameters, every step cached in the store:
    the reward, the LM, the aligned policy and its reward curve (``run["describe"](stage)`` writes,
    or loads, the descriptions of the LM before or after alignment)."""
    p = {**ch.params, **changes}
    view = _ParamsView(ch, p) if changes else ch
    templates = load_templates(p["templates"])
    reward, names, vlm_key = chapter_reward(view)
    model, tokenizer, lm_key, lm_history = chapter_lm(view, templates, progress=progress)
    queries = format_queries(names, templates)
    cfg = align_config(p)
    key = {"lm": lm_key, "vlm": vlm_key}
    policy, curve = aligned_lm(ch.store, key, model, tokenizer, reward, queries, cfg, progress=progress)

    def describe(stage: str, max_new_tokens: int | None = None) -> pd.DataFrame:
        lm = {"before": model, "after": policy}[stage]
        stage_key = {**key, "stage": stage, **({"align": asdict(cfg)} if stage == "after" else {})}
        return cached_descriptions(view, stage_key, lm, tokenizer, queries, max_new_tokens or p["max_new_tokens"],
                                   reward)

    return {"params": p, "templates": templates, "reward": reward, "class_names": names, "queries": queries,
            "lm": model, "tokenizer": tokenizer, "lm_key": lm_key, "lm_history": lm_history, "align": cfg,
            "policy": policy, "curve": curve, "describe": describe, "key": key}


def _summary(descriptions: pd.DataFrame, curve: Sequence[dict], world: ConceptWorld,
             min_true: int) -> dict[str, float]:
    from .judges import WorldJudge

    shares = kind_shares(inspect(descriptions, WorldJudge(world, min_true), world))
    first, last, _ = reward_rise(curve)
    return {"reward rise (GRPO)": last - first, "description reward": float(descriptions.reward.mean()),
            **{f"share {k}": float(shares[k]) for k in ("spurious", "false", "visual", "non-visual")}}


def exercise_stricter_judge(ch, judge_min_true: int | None = None) -> dict[str, float]:
    """The chapter's aligned descriptions judged again, "yes" only with ``judge_min_true`` true facts."""
    run = pipeline(ch, progress=False)
    return _summary(run["describe"]("after"), run["curve"], ch.world,
                    judge_min_true or ch.params["judge_min_true"])


def exercise_grpo_steps(ch, grpo_steps: int | None = None) -> dict[str, float]:
    """Align for ``grpo_steps`` GRPO steps instead of the chapter's, then inspect."""
    run = pipeline(ch, progress=False, **({} if grpo_steps is None else {"grpo_steps": grpo_steps}))
    return _summary(run["describe"]("after"), run["curve"], ch.world, ch.params["judge_min_true"])


def exercise_description_length(ch, max_new_tokens: int | None = None) -> dict[str, float]:
    """The chapter's aligned policy writing descriptions of at most ``max_new_tokens`` tokens."""
    run = pipeline(ch, progress=False)
    return _summary(run["describe"]("after", max_new_tokens), run["curve"], ch.world, ch.params["judge_min_true"])


def exercise_images_per_class(ch, images_per_class: int | None = None) -> dict[str, float]:
    """How well a reward estimated from ``images_per_class`` images agrees with the chapter's reward,
    on the chapter's aligned descriptions (Spearman's rho, and the mean absolute difference)."""
    from scipy.stats import spearmanr

    run = pipeline(ch, progress=False)
    after = run["describe"]("after")
    view = _ParamsView(ch, {**ch.params, **({} if images_per_class is None else
                                            {"images_per_class": images_per_class})})
    reward, _, _ = chapter_reward(view)
    other = reward.scores(after.description.tolist(), after.class_index.tolist())
    return {"Spearman with the chapter's reward": float(spearmanr(other, after.reward).statistic),
            "mean |reward difference|": float(np.abs(other - after.reward).mean())}


def cached_reliance(ch, clip_bundle, key: dict) -> pd.DataFrame:
    """:func:`conceptlab.reliance.counterfactual_reliance` of a world CLIP (identified by ``key``), stored."""
    from .reliance import counterfactual_reliance

    n, seed = ch.params["n_counterfactual"], ch.params["seed"]
    return ch.store.get_or_build(
        "ex2_reliance", {**key, "n": n, "seed": seed},
        lambda d: atomic_write_json(d / "reliance.json", counterfactual_reliance(
            clip_bundle[0], clip_bundle[2], ch.world, n, seed=seed).to_dict(orient="records")),
        lambda d: pd.DataFrame(json.loads((d / "reliance.json").read_text())))


def second_vlm(ch, progress: bool = True) -> tuple[tuple, dict]:
    """The second world CLIP (``second_world`` / ``second_world_clip`` over the chapter's settings) and its key."""
    from .models import world_clip

    p = ch.params
    world_b = WorldConfig(**{**ch.world_cfg.to_dict(), **p["second_world"]})
    train_b = TrainConfig(**{**asdict(ch.train_cfg), **p["second_world_clip"]})
    bundle = world_clip(ch.store, world_b, train_b, progress=progress)
    return bundle, {"model": {"model": "world", "world": world_b.to_dict(), "train": asdict(train_b)}}


def fidelity_rows(results: dict) -> dict[str, dict]:
    """The chapter's opening table: what the paper reports, what the original code computes (it needs
    Mistral-7B and ChatGPT, so: its definition), and this book's number on the world."""
    rows = {
        "spurious share of aligned descriptions": {
            "paper": "a major share (abstract)", "original code": "judge 'no' share",
            "this book": results["share_spurious_after"]},
        "informative but false share": {
            "paper": "not reported", "original code": "counted as informative",
            "this book": results["share_false_after"]},
        "non-visual share of informative": {
            "paper": "significant, e.g. habitat", "original code": "not released",
            "this book": results["nonvisual_of_informative_after"]},
        "reward rise during alignment": {
            "paper": "rises (training curves)", "original code": "PPO, 1000 steps",
            "this book": results["reward_rise"]},
    }
    rows["VLMs prefer different attributes (attribute shift)"] = {
        "paper": "yes", "original code": "one run per VLM",
        "this book": results["second_vlm"]["attribute_shift"] if "second_vlm" in results else
        "not run (second_vlm=False)"}
    return rows


def align_to(ch, run: dict, bundle, key: dict, progress: bool = True) -> dict:
    """The chapter's LM (from :func:`pipeline`'s ``run``) aligned to another VLM (``bundle``, identified
    by ``key``) with the same settings: its reward, reward curve and aligned descriptions, all cached."""
    reward, _, vlm = chapter_reward(ch, bundle, key)
    akey = {**run["key"], "vlm": vlm}
    policy, curve = aligned_lm(ch.store, akey, run["lm"], run["tokenizer"], reward, run["queries"], run["align"],
                               progress=progress)
    after = cached_descriptions(ch, {**akey, "stage": "after", "align": asdict(run["align"])}, policy,
                                run["tokenizer"], run["queries"], ch.params["max_new_tokens"], reward)
    return {"reward": reward, "curve": curve, "after": after}


def planted(world: dict) -> dict[str, float]:
    """What a world (a ``WorldConfig.to_dict()``) planted: its spurious-caption rate and habitat correlation."""
    mix = world["caption_mix"]
    return {"spurious-caption rate": mix.get("spurious", 0.0) / sum(mix.values()),
            "habitat correlation": world["habitat_correlation"]}
