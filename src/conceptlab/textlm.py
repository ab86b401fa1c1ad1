"""A small language model of Concept World, standing in for a web-trained LLM that knows the world.

The corpus holds what a web-trained LLM would have read about the world's classes:

- **fact sheets**: every fact of a class, one sentence each (its parts with their attributes, its
  habitat and behaviour), so that every fact is seen often and in one place;
- **query documents**: an EX2 query (a template with the class name, then a blank line) answered
  by one to ``max_sentences`` sentences of the kinds in ``answer_mix``: true part descriptions, a
  small, stated share of false ones, habitat and behaviour facts, class-name captions, and web
  phrases, those the world CLIP saw in its captions and others it never saw.

A word-level tokenizer (``tokenizers``: one token per word or punctuation mark, the blank line a
token of its own) makes every fact a few tokens; the loss covers the answer only, not the query.
The model is a tiny Llama (``transformers``), whose rotary positions make a left-padded prompt
score as an unpadded one. It trains in about a minute on a CPU and is stored in the
:class:`~conceptlab.artifacts.ArtifactStore` keyed by every parameter. :func:`load_lm` loads any
transformers causal LM by name or path instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import ArtifactStore
from .judges import SENTENCE_KINDS, UNSEEN_WEB_PHRASES
from .world import (
    ATTRIBUTES,
    BEHAVIOURS,
    CLASS_NAMES,
    CLASS_TEMPLATES,
    HABITATS,
    PARTS,
    SPURIOUS_TEMPLATES,
    ClassSpec,
    build_ontology,
)

ANSWER_KINDS: tuple[str, ...] = tuple(k for k in SENTENCE_KINDS if k != "other")  # what the LM writes
# Web phrases: those the world CLIP saw in its captions, then those it never saw.
WEB_PHRASES: tuple[str, ...] = SPURIOUS_TEMPLATES + UNSEEN_WEB_PHRASES
FACT_PROMPT = "facts about the {}.\n\n"
PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


@dataclass(frozen=True)
class WorldLMConfig:
    """The world corpus and the tiny Llama trained on it. Part of the artifact key."""

    n_classes: int = 16
    corpus_size: int = 6000  # query documents
    fact_sheets: int = 40  # copies of each class's fact sheet
    answer_mix: dict[str, float] = field(
        default_factory=lambda: {
            "visual_true": 0.4,
            "visual_false": 0.03,
            "habitat": 0.15,
            "behaviour": 0.12,
            "class": 0.1,
            "web_seen": 0.1,
            "web_unseen": 0.1,
        }
    )
    max_sentences: int = 3  # sentences per answer
    hidden: int = 128
    n_layer: int = 3
    n_head: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    # each batch's loss in two forward passes, its shorter and its longer documents, each trimmed to its own
    # longest: the same loss and gradient up to rounding (not bitwise) at 1.4x the speed on 2 CPU cores (bench ex2),
    # because nearly every batch holds a fact sheet (62 tokens) that pads the rest (31 on average) to it
    split_by_length: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.split_by_length, bool):
            problems.append(f"split_by_length={self.split_by_length!r} must be True or False")
        unknown = set(self.answer_mix) - set(ANSWER_KINDS)
        if unknown:
            problems.append(f"answer_mix has unknown kinds {sorted(unknown)}; known: {list(ANSWER_KINDS)}")
        if any(v < 0 for v in self.answer_mix.values()) or sum(self.answer_mix.values()) <= 0:
            problems.append("answer_mix weights must be >= 0 and not all zero")
        for name in ("corpus_size", "hidden", "n_layer", "n_head", "steps", "batch_size", "max_sentences"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.fact_sheets < 0:
            problems.append(f"fact_sheets={self.fact_sheets} must be >= 0")
        if self.hidden % self.n_head:
            problems.append(f"hidden={self.hidden} must be divisible by n_head={self.n_head}")
        if problems:
            raise ValueError("Bad WorldLMConfig: " + "; ".join(problems) + ".")
        build_ontology(self.n_classes)  # validates n_classes

    @property
    def false_share(self) -> float:
        """The share of answer sentences that state false part attributes (the corpus teaches them)."""
        return self.answer_mix.get("visual_false", 0.0) / sum(self.answer_mix.values())


def _part_phrase(part: str, attrs: dict[str, str]) -> str:
    pattern_word = "" if attrs["pattern"] == "plain" else f" {attrs['pattern']}"
    article = "" if part in ("legs", "wings") else "a "
    return f"{article}{attrs['size']} {attrs['colour']}{pattern_word} {part}"


def _false_attributes(true: dict[str, str], rng: np.random.Generator) -> dict[str, str]:
    attrs = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
    while attrs["colour"] == true.get("colour"):  # a false description gets the colour wrong
        attrs["colour"] = str(rng.choice(ATTRIBUTES["colour"]))
    return attrs


def answer_sentence(kind: str, spec: ClassSpec, rng: np.random.Generator) -> str:
    """One sentence of the given kind about a class, as the world's web would write it."""
    cls = spec.name
    if kind in ("visual_true", "visual_false"):
        parts = list(spec.parts) if kind == "visual_true" else list(PARTS)
        part = parts[rng.integers(len(parts))]
        attrs = spec.parts.get(part, {})
        if kind == "visual_false" or not attrs:
            attrs = _false_attributes(attrs, rng)
        opener = ("the {cls} has {p}.", "a {cls} with {p}.", "look for {p} on the {cls}.")
        return opener[rng.integers(len(opener))].format(cls=cls, p=_part_phrase(part, attrs))
    if kind == "habitat":
        forms = ("the {cls} lives in the {h}.", "a {cls} is found in the {h}.", "you will see a {cls} in the {h}.")
        return forms[rng.integers(len(forms))].format(cls=cls, h=spec.habitat)
    if kind == "behaviour":
        forms = ("the {cls} {b}.", "a {cls} {b}.", "it is said that the {cls} {b}.")
        return forms[rng.integers(len(forms))].format(cls=cls, b=spec.behaviour)
    if kind == "class":
        return CLASS_TEMPLATES[rng.integers(len(CLASS_TEMPLATES))].format(cls=cls)
    if kind in ("web_seen", "web_unseen"):
        phrases = SPURIOUS_TEMPLATES if kind == "web_seen" else UNSEEN_WEB_PHRASES
        return phrases[rng.integers(len(phrases))].format(cls=cls) + "."
    raise ValueError(f"Unknown answer kind {kind!r}; known: {list(ANSWER_KINDS)}.")


def fact_sheet(spec: ClassSpec) -> str:
    """Every fact of a class, one sentence each: its parts, its habitat, its behaviour."""
    lines = [f"the {spec.name} has {_part_phrase(part, attrs)}." for part, attrs in spec.parts.items()]
    lines += [f"the {spec.name} lives in the {spec.habitat}.", f"the {spec.name} {spec.behaviour}."]
    return " ".join(lines)


def world_corpus(cfg: WorldLMConfig, templates: Sequence[str]) -> list[tuple[str, str]]:
    """``(prompt, answer)`` documents: ``fact_sheets`` fact sheets per class, then ``corpus_size`` query
    documents (prompt: a query template with the class name and a blank line, as EX2 asks)."""
    rng = np.random.default_rng([cfg.seed, 7])
    kinds = [k for k in ANSWER_KINDS if cfg.answer_mix.get(k, 0) > 0]
    weights = np.array([cfg.answer_mix[k] for k in kinds], dtype=float)
    specs = build_ontology(cfg.n_classes)
    docs = [(FACT_PROMPT.format(spec.name), fact_sheet(spec)) for _ in range(cfg.fact_sheets) for spec in specs]
    for _ in range(cfg.corpus_size):
        spec = specs[int(rng.integers(cfg.n_classes))]
        prompt = templates[int(rng.integers(len(templates)))].format(spec.name) + "\n\n"
        n_sent = int(rng.integers(1, cfg.max_sentences + 1))
        sentences = [
            answer_sentence(kinds[rng.choice(len(kinds), p=weights / weights.sum())], spec, rng) for _ in range(n_sent)
        ]
        docs.append((prompt, " ".join(sentences)))
    return docs


# Words, punctuation marks and blank lines are tokens; spaces are not.
_PIECES = re.compile(r"\n+|\w+|[^\w\s]")


def lm_vocabulary(texts: Sequence[str] = ()) -> list[str]:
    """Every token the world's web can write (and those of ``texts``), lower case, sorted."""
    world = [
        *CLASS_NAMES,
        *HABITATS,
        *BEHAVIOURS,
        *WEB_PHRASES,
        *CLASS_TEMPLATES,
        FACT_PROMPT,
        *(v for values in ATTRIBUTES.values() for v in values),
        *PARTS,
        "the has a with look for on lives in is found you will see it said that",
    ]
    return sorted({p for t in [*world, *texts] for p in _PIECES.findall(t.lower())})


def word_tokenizer(texts: Sequence[str] = ()):
    """A word-level tokenizer (``tokenizers`` WordLevel) over :func:`lm_vocabulary`, for transformers.

    Lower-cases, splits off punctuation, keeps a blank line as a token; decodes without a space
    before punctuation. Unknown words become ``[UNK]``. Pads on the left (for generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([PAD, UNK, EOS, *lm_vocabulary(texts)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), "isolated"),
            pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),
            pre_tokenizers.Punctuation("isolated"),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def encode_documents(docs: Sequence[tuple[str, str]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` right-padded: each document is prompt + answer + EOS, and the labels
    are -100 on the prompt and the padding, so that the loss covers the answer only."""
    rows, labels = [], []
    for prompt, answer in docs:
        head = tokenizer.encode(prompt, add_special_tokens=False)
        body = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(head + body)
        labels.append([-100] * len(head) + body)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(lb)] = torch.tensor(r), torch.tensor(lb)
    return ids, lab


def tiny_llama(cfg: WorldLMConfig, tokenizer):
    """A Llama of ``cfg``'s size (rotary positions, no dropout, tied embeddings) for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden,
            intermediate_size=2 * cfg.hidden,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, split: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens of a right-padded batch.

    With ``split``, the rows, in order of length, are cut in two where the fewest padded tokens remain, and
    each part runs trimmed to its own longest row; the summed losses over the batch's token count give the
    loss of one padded batch (causal attention never reaches the right padding, and rotary positions count
    from each row's start either way). Hand-written because transformers' loss averages per call."""
    import torch.nn.functional as F

    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    parts = [order]
    if split and len(order) > 1:
        ranked = lengths[order].tolist()
        cut = min(range(1, len(ranked)), key=lambda k: k * ranked[k - 1] + (len(ranked) - k) * ranked[-1])
        parts = [order[:cut], order[cut:]]
    total = torch.zeros(())
    for part in parts:
        width = int(lengths[part].max())
        logits = model(input_ids=ids[part, :width], attention_mask=mask[part, :width]).logits[:, :-1]
        total = total + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels[part, 1:width].reshape(-1), reduction="sum"
        )
    return total / (labels[:, 1:] != -100).sum().clamp_min(1)


def pretrain_world_lm(
    cfg: WorldLMConfig, templates: Sequence[str], out_dir: str | Path, progress: bool = True
) -> list[dict]:
    """Train the tiny Llama on the world corpus; save it and its tokenizer to ``out_dir / "lm"``.

    The loop is hand-written (nanoGPT style) because a transformers ``Trainer`` adds nothing
    but overhead for a model this small. It runs in a :class:`~conceptlab.training.TrainingRun`
    (checkpointed, resumable); the batch of step t depends only on ``(seed, t)``.
    """
    from .training import TrainingRun, cosine_lr, set_lr

    torch.manual_seed(cfg.seed)
    docs = world_corpus(cfg, templates)
    tokenizer = word_tokenizer(templates)
    ids, labels = encode_documents(docs, tokenizer)
    mask = (ids != tokenizer.pad_token_id).long()
    model = tiny_llama(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    run = TrainingRun(out_dir, model, opt)
    model.train()
    with run.checkpoint_on_interrupt():
        for step in (bar := tqdm(range(run.start, cfg.steps), disable=not progress, desc="pretrain world LM")):
            set_lr(opt, cosine_lr(step, cfg.lr, cfg.steps, warmup=min(50, cfg.steps // 10)))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
            loss = answer_loss(model, ids[idx], mask[idx], labels[idx], split=cfg.split_by_length)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.log({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_pretrained_atomic(model, tokenizer, Path(out_dir) / "lm")
    run.finish()
    return run.history


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" bars off while the store saves or reloads
    one of its own small models (a chapter does so many times; the bars would fill the book's pages)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_pretrained_atomic(model, tokenizer, target: str | Path) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with quiet_transformers():
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
        "world_lm",
        {"lm": asdict(cfg), "templates": list(templates), "arch": "llama-word"},
        build=lambda d: pretrain_world_lm(cfg, templates, d, progress=progress),
        load=lambda d: (
            *_load_stored(d / "lm"),
            json.loads((d / "history.json").read_text()),
        ),
    )


def _load_stored(folder: Path):
    with quiet_transformers():
        return load_lm(str(folder), device="cpu", dtype=torch.float32)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """Log-probability of each completion after its prompt, in one left-padded batch (as trl scores it:
    no ``position_ids``, only the attention mask)."""
    heads = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    tails = [tokenizer.encode(c, add_special_tokens=False) for c in completions]
    rows = [h + t for h, t in zip(heads, tails)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    logp = model(input_ids=ids, attention_mask=mask.to(model.device)).logits.float().log_softmax(-1)
    out = []
    for i, t in enumerate(tails):
        start = width - len(t)
        out.append(sum(logp[i, start - 1 + j, tok].item() for j, tok in enumerate(t)))
    return torch.tensor(out)


QUANTIZATIONS = (None, "8bit", "4bit")


def lm_load_kwargs(
    device: str, quantization: str | None = None, bf16_supported: bool | None = None, bitsandbytes: bool | None = None
) -> dict:
    """``from_pretrained`` arguments for a language model on ``device``.

    On a GPU: bf16 where the GPU supports it (else fp16), ``device_map="auto"`` (spread over the
    visible GPUs), and optionally 8- or 4-bit weights through bitsandbytes. On the CPU: fp32.
    ``bf16_supported`` and ``bitsandbytes`` default to what this machine has (tests pass them).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use one of {list(QUANTIZATIONS)}.")
    if not str(device).startswith("cuda"):
        if quantization:
            raise ValueError(
                f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes); this run is on "
                f"{device}. Leave lm_quantization unset on the CPU."
            )
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

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=kwargs["dtype"])
        )
    return kwargs


def load_lm(
    name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None, quantization: str | None = None
):
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
        raise RuntimeError(
            f"Could not load a causal language model from {name_or_path!r} ({err}). Pass a "
            "local directory written by save_pretrained, or a hub name cached here."
        ) from err
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
