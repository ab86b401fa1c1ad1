"""A small language model of Concept World, standing in for a web-trained LLM.

The world corpus holds the kinds of text a web-trained LLM has read about the world's
classes, written as answers to the EX2 queries: visual part descriptions (true and
false), habitat and behaviour facts, class-name captions and spurious web phrases, in a
configurable mix. A byte-level BPE tokenizer (``tokenizers``) and a GPT-2 model of a few
hundred thousand parameters (``transformers``) are trained on it in about a minute on one
CPU core and stored in the :class:`~conceptlab.artifacts.ArtifactStore` keyed by every
parameter. :func:`load_lm` loads any transformers causal LM by name or path instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import ArtifactStore
from .world import (
    ATTRIBUTES,
    BEHAVIOURS,
    CLASS_TEMPLATES,
    HABITATS,
    PARTS,
    SPURIOUS_TEMPLATES,
    ClassSpec,
    build_ontology,
)

ANSWER_KINDS: tuple[str, ...] = ("visual_true", "visual_false", "habitat", "behaviour", "class", "spurious")
# Web phrases the world CLIP never saw in its captions, next to the ones it did (SPURIOUS_TEMPLATES).
EXTRA_WEB_PHRASES: tuple[str, ...] = (
    "share this picture of a {cls} with your friends",
    "{cls} pictures, page 2 of 5",
    "see all 24 photos of the {cls}",
)
WEB_PHRASES: tuple[str, ...] = SPURIOUS_TEMPLATES + EXTRA_WEB_PHRASES
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class WorldLMConfig:
    """The world corpus and the GPT-2 trained on it. Part of the artifact key."""

    n_classes: int = 16
    corpus_size: int = 12000
    answer_mix: dict[str, float] = field(default_factory=lambda: {
        "visual_true": 0.3, "visual_false": 0.15, "habitat": 0.15, "behaviour": 0.1, "class": 0.1,
        "spurious": 0.2})
    max_sentences: int = 2  # sentences per answer
    vocab_size: int = 1024
    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    n_positions: int = 96
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        unknown = set(self.answer_mix) - set(ANSWER_KINDS)
        if unknown:
            problems.append(f"answer_mix has unknown kinds {sorted(unknown)}; known: {list(ANSWER_KINDS)}")
        if any(v < 0 for v in self.answer_mix.values()) or sum(self.answer_mix.values()) <= 0:
            problems.append("answer_mix weights must be >= 0 and not all zero")
        for name in ("corpus_size", "vocab_size", "n_embd", "n_layer", "n_head", "steps", "batch_size",
                     "max_sentences"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if problems:
            raise ValueError("Bad WorldLMConfig: " + "; ".join(problems) + ".")
        build_ontology(self.n_classes)  # validates n_classes


def _part_phrase(part: str, colour: str, pattern: str, size: str) -> str:
    pattern_word = "" if pattern == "plain" else f" {pattern}"
    article = "" if part in ("legs", "wings") else "a "
    return f"{article}{size} {colour}{pattern_word} {part}"


def answer_sentence(kind: str, spec: ClassSpec, rng: np.random.Generator) -> str:
    """One sentence of the given kind about a class, as the world's web would write it."""
    cls = spec.name
    if kind in ("visual_true", "visual_false"):
        own = list(spec.parts)
        parts = own if kind == "visual_true" else list(PARTS)
        k = int(rng.integers(1, min(3, len(parts)) + 1))
        picked = [parts[i] for i in sorted(rng.choice(len(parts), size=k, replace=False))]
        phrases = []
        for part in picked:
            attrs = dict(spec.parts.get(part, {}))
            if kind == "visual_false" or not attrs:
                true_colour = attrs.get("colour")
                attrs = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
                while attrs["colour"] == true_colour:  # a false description gets the colour wrong
                    attrs["colour"] = str(rng.choice(ATTRIBUTES["colour"]))
            phrases.append(_part_phrase(part, attrs["colour"], attrs["pattern"], attrs["size"]))
        joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        opener = ("the {cls} has {p}.", "a {cls} with {p}.", "look for {p} on the {cls}.")
        return opener[rng.integers(len(opener))].format(cls=cls, p=joined)
    if kind == "habitat":
        forms = ("the {cls} lives in the {h}.", "a {cls} is found in the {h}.", "you will see a {cls} in the {h}.")
        return forms[rng.integers(len(forms))].format(cls=cls, h=spec.habitat)
    if kind == "behaviour":
        forms = ("the {cls} {b}.", "a {cls} {b}.", "it is said that the {cls} {b}.")
        return forms[rng.integers(len(forms))].format(cls=cls, b=spec.behaviour)
    if kind == "class":
        return CLASS_TEMPLATES[rng.integers(len(CLASS_TEMPLATES))].format(cls=cls)
    if kind == "spurious":
        return WEB_PHRASES[rng.integers(len(WEB_PHRASES))].format(cls=cls) + "."
    raise ValueError(f"Unknown answer kind {kind!r}; known: {list(ANSWER_KINDS)}.")


def world_corpus(cfg: WorldLMConfig, templates: Sequence[str]) -> list[str]:
    """``corpus_size`` documents ``"<query>\\n\\n<answer>"``: a query template and 1..max_sentences answers."""
    rng = np.random.default_rng([cfg.seed, 7])
    kinds = [k for k in ANSWER_KINDS if cfg.answer_mix.get(k, 0) > 0]
    weights = np.array([cfg.answer_mix[k] for k in kinds], dtype=float)
    specs = build_ontology(cfg.n_classes)
    docs = []
    for _ in range(cfg.corpus_size):
        spec = specs[rng.integers(cfg.n_classes)]
        query = templates[rng.integers(len(templates))].format(spec.name)
        n_sent = int(rng.integers(1, cfg.max_sentences + 1))
        sentences = [answer_sentence(kinds[rng.choice(len(kinds), p=weights / weights.sum())], spec, rng)
                     for _ in range(n_sent)]
        docs.append(f"{query}\n\n{' '.join(sentences)}")
    return docs


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts) + [" ".join(HABITATS + BEHAVIOURS)], vocab_size=vocab_size,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def _batches(docs: list[str], tokenizer, cfg: WorldLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer([d + EOS for d in docs], padding="max_length", truncation=True, max_length=cfg.n_positions,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pretrain_world_lm(cfg: WorldLMConfig, templates: Sequence[str], out_dir: str | Path,
                      progress: bool = True) -> list[dict]:
    """Train tokenizer and GPT-2 on the world corpus; save both to ``out_dir / "lm"`` (``save_pretrained``).

    The loop is hand-written (nanoGPT style) because a transformers ``Trainer`` adds nothing
    but overhead for a model this small. It runs in a :class:`~conceptlab.training.TrainingRun`
    (checkpointed, resumable); the batch of step t depends only on ``(seed, t)``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from .training import TrainingRun, cosine_lr, set_lr

    torch.manual_seed(cfg.seed)
    docs = world_corpus(cfg, templates)
    tokenizer = train_tokenizer(docs, cfg.vocab_size)
    ids, mask = _batches(docs, tokenizer, cfg)
    labels = ids.masked_fill(mask == 0, -100)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    run = TrainingRun(out_dir, model, opt)
    model.train()
    with run.checkpoint_on_interrupt():
        for step in (bar := tqdm(range(run.start, cfg.steps), disable=not progress, desc="pretrain world LM")):
            set_lr(opt, cosine_lr(step, cfg.lr, cfg.steps, warmup=min(50, cfg.steps // 10)))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
            width = int(mask[idx].sum(1).max())  # trim the padding shared by the whole batch
            loss = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width],
                         labels=labels[idx, :width]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.log({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_pretrained_atomic(model, tokenizer, Path(out_dir) / "lm")
    run.finish()
    return run.history


def save_pretrained_atomic(model, tokenizer, target: str | Path) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def world_lm(store: ArtifactStore, cfg: WorldLMConfig, templates: Sequence[str], progress: bool = True):
    """The world LM for these parameters, loaded from the store or trained. Returns ``(model, tokenizer, history)``.

    Loaded in fp32 on the CPU: it is small, and GRPO fine-tunes all of its weights.
    """
    return store.get_or_build(
        "world_lm", {"lm": asdict(cfg), "templates": list(templates)},
        build=lambda d: pretrain_world_lm(cfg, templates, d, progress=progress),
        load=lambda d: (*load_lm(str(d / "lm"), device="cpu", dtype=torch.float32),
                        json.loads((d / "history.json").read_text())))


QUANTIZATIONS = (None, "8bit", "4bit")


def lm_load_kwargs(device: str, quantization: str | None = None, bf16_supported: bool | None = None,
                   bitsandbytes: bool | None = None) -> dict:
    """``from_pretrained`` arguments for a language model on ``device``.

    On a GPU: bf16 where the GPU supports it (else fp16), ``device_map="auto"`` (spread over the
    visible GPUs), and optionally 8- or 4-bit weights through bitsandbytes. On the CPU: fp32.
    ``bf16_supported`` and ``bitsandbytes`` default to what this machine has (tests pass them).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use one of {list(QUANTIZATIONS)}.")
    if not str(device).startswith("cuda"):
        if quantization:
            raise ValueError(f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes); this run is on "
                             f"{device}. Leave lm_quantization unset on the CPU.")
        return {"dtype": torch.float32}
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    kwargs = {"dtype": torch.bfloat16 if bf16_supported else torch.float16, "device_map": "auto"}
    if quantization:
        if bitsandbytes is None:
            import importlib.util

            bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
        if not bitsandbytes:
            raise ValueError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=kwargs["dtype"]))
    return kwargs


def load_lm(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None,
            quantization: str | None = None):
    """Any transformers causal LM and its tokenizer by hub name or local path, in eval mode.

    ``device`` None: the GPU when there is one (half precision, ``device_map="auto"``, see
    :func:`lm_load_kwargs`), else the CPU in fp32; ``dtype`` overrides the precision. The tokenizer
    pads on the left (for batched generation) and gets a pad token if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = lm_load_kwargs(device, quantization)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"Could not load a causal language model from {name_or_path!r} ({err}). Pass a "
                           "local directory written by save_pretrained, or a hub name cached here.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())
