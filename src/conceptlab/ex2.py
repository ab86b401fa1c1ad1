"""EX2 (Extract and Explore): align a language model to a VLM's preferences, then inspect them.

1. Queries: 25 templates per class, each followed by a blank line.
2. Reward: the mean cosine similarity between ``f_T(description)`` and the cached image
   embeddings of the class, vectorised over a batch of completions (:class:`CLIPReward`).
3. Alignment: trl's ``GRPOTrainer`` with a KL penalty to the reference model (:func:`align`).
4. Inference: one sampled description per template per class (:func:`generate_descriptions`).
5. Inspection: :mod:`conceptlab.judges` (LLM judge, and the ground-truth judge of the world).
6. Ground truth: counterfactual images measure what the VLM relies on (:func:`counterfactual_reliance`).
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

from .artifacts import ArtifactStore, atomic_write_json
from .models import class_text_weights, encode_images, encode_texts
from .world import COLOURS, HABITATS, PARTS, ConceptWorld

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
        return (emb * self.class_means[torch.as_tensor(np.asarray(class_index))]).sum(1).numpy()

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


def align(model, tokenizer, reward: CLIPReward, queries: pd.DataFrame, cfg: AlignConfig,
          progress: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """Align a copy of ``model`` to the VLM with trl's GRPOTrainer; return the policy and its reward curve.

    Each step samples ``prompts_per_step`` queries and ``num_generations`` completions each
    (at most ``max_new_tokens``, top_p 1, top_k 0); the loss keeps a KL penalty ``beta`` to
    the frozen reference model.
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM")
    log = _reward_logger(cfg.steps, progress)
    data = Dataset.from_pandas(queries[["prompt", "class_index"]].reset_index(drop=True))
    with tempfile.TemporaryDirectory(prefix="ex2-grpo-") as scratch, warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing, which trl still sets
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = GRPOConfig(
            output_dir=scratch, use_cpu=not torch.cuda.is_available(), bf16=False, seed=cfg.seed,
            data_seed=cfg.seed, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
            beta=cfg.beta, num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=1.0, top_k=0, gradient_checkpointing=False,
            per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[log], peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)  # the RewardLog bar replaces one printed line per step
        trainer.train()
    policy = trainer.model
    if cfg.lora_r:
        policy = policy.merge_and_unload()
    return policy.eval(), log.history


def aligned_lm(store: ArtifactStore, key: dict, model, tokenizer, reward: CLIPReward, queries: pd.DataFrame,
               cfg: AlignConfig, progress: bool = True) -> tuple[torch.nn.Module, object, list[dict]]:
    """The aligned policy for ``key`` (what made the LM and the VLM) and ``cfg``: loaded, or trained and stored."""
    from .textlm import load_lm, save_pretrained_atomic

    d = store.path("ex2_aligned", {"key": key, "align": asdict(cfg)})
    if not (d / "history.json").exists():
        policy, history = align(model, tokenizer, reward, queries, cfg, progress=progress)
        save_pretrained_atomic(policy, tokenizer, d / "policy")
        atomic_write_json(d / "history.json", history)
    policy, tok = load_lm(str(d / "policy"))
    return policy, tok, json.loads((d / "history.json").read_text())


# ---------------------------------------------------------------------------- inference
@torch.no_grad()
def generate_descriptions(model, tokenizer, queries: pd.DataFrame, max_new_tokens: int = 32, seed: int = 0,
                          batch_size: int = 64, temperature: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """One sampled completion per query row (top_p 1, top_k 0), returned as a ``description`` column."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    dev = next(model.parameters()).device
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


# ---------------------------------------------------------------------------- ground truth
def _recolour(part: int, rng: np.random.Generator):
    def edit(labels, attrs, habitats):
        present = attrs[:, part, 0] >= 0
        shift = rng.integers(1, len(COLOURS), size=len(labels))
        attrs[:, part, 0] = np.where(present, (attrs[:, part, 0] + shift) % len(COLOURS), attrs[:, part, 0])
        return attrs, habitats
    return edit


def counterfactual_reliance(clip: torch.nn.Module, tokenizer, world: ConceptWorld, n: int = 1024,
                            split: str = "test", seed: int = 0) -> pd.DataFrame:
    """What the VLM relies on, measured by editing images: one row per factor.

    Base images show each creature with its class-typical attributes in its home habitat.
    Each counterfactual changes one factor (the habitat, or one part's colour) of the same
    creatures with the same pose and noise. ``reliance`` is the drop in zero-shot accuracy,
    ``logit_drop`` the mean drop of the true class's logit margin, on images that have the part.
    """
    weights = class_text_weights(clip, tokenizer, world.class_names)

    def prototypical(labels, attrs, habitats):
        return world.typical_attributes(labels).copy(), world.home_habitats(labels)

    def chain(edit):
        return lambda lab, att, hab: edit(lab, *prototypical(lab, att, hab))

    def scores(batch):
        logits = encode_images(clip, batch.images) @ weights.T
        true = logits[torch.arange(len(batch)), torch.as_tensor(batch.labels)]
        others = logits.clone()
        others[torch.arange(len(batch)), torch.as_tensor(batch.labels)] = -torch.inf
        return (logits.argmax(1).numpy() == batch.labels), (true - others.max(1).values).numpy()

    base = world.sample(n, split, edit=prototypical)
    base_correct, base_margin = scores(base)
    rows = []
    rng = np.random.default_rng(seed)
    edits = {"habitat": lambda lab, att, hab: (att, (hab + rng.integers(1, len(HABITATS), size=len(lab)))
                                               % len(HABITATS))}
    edits.update({f"{p} colour": _recolour(k, rng) for k, p in enumerate(PARTS)})
    for factor, edit in edits.items():
        cf = world.sample(n, split, edit=chain(edit))
        keep = np.ones(n, bool) if factor == "habitat" else cf.present[:, PARTS.index(factor.split()[0])]
        correct, margin = scores(cf)
        rows.append({"factor": factor, "n_images": int(keep.sum()),
                     "accuracy_base": float(base_correct[keep].mean()),
                     "accuracy_edited": float(correct[keep].mean()),
                     "reliance": float(base_correct[keep].mean() - correct[keep].mean()),
                     "logit_drop": float((base_margin - margin)[keep].mean())})
    return pd.DataFrame(rows)


def inspect_world(descriptions: pd.DataFrame, world: ConceptWorld, judge_answers: Sequence | None = None
                  ) -> pd.DataFrame:
    """Ground-truth labels of world descriptions plus EX2's ``kind``: "spurious" where the judge says
    "no" (the world judge by default), else the description's type (visual, habitat, behaviour)."""
    from .judges import WorldJudge, judge_prompts

    world_judge = WorldJudge(world)
    labelled = world_judge.label_frame(descriptions)
    if judge_answers is None:
        judge_answers = world_judge(judge_prompts(labelled.class_name, labelled.description))
    labelled["judge"] = list(judge_answers)
    labelled["kind"] = np.where(labelled.judge == "no", "spurious", labelled.type)
    return labelled


def factor_mentions(labelled: pd.DataFrame) -> pd.Series:
    """Share of descriptions that state each factor of :func:`counterfactual_reliance` truly:
    the class's habitat, or a part's true colour."""
    shares = {"habitat": labelled.habitat_true.mean()}
    shares.update({f"{p} colour": labelled.true_colour_parts.map(lambda ps, p=p: p in ps).mean() for p in PARTS})
    return pd.Series(shares, name="mention share")


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (one side constant, e.g. nothing changed)."""
    from scipy.stats import spearmanr

    if np.ptp(np.asarray(a, float)) == 0 or np.ptp(np.asarray(b, float)) == 0:
        return None
    return float(spearmanr(a, b).statistic)


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
