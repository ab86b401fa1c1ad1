"""Concept descriptors ``{class: [descriptor, ...]}`` (the original DEAL JSON format), from three sources.

- :func:`oracle_descriptors`: Concept World's ontology, with a controllable share of LLM-like faults
  (a wrong attribute, a non-visual fact, a vague phrase); it records which part each descriptor is
  about, so explanation maps can be scored against that part's mask.
- :class:`TransformersLLM`: a local causal language model (name or path) with the few-shot prompt.
- :class:`~conceptlab.llm.OpenAIChat`: any OpenAI-compatible chat endpoint; the key comes from an environment variable.

:func:`get_descriptors` is the chapters' single entry point; LLM answers are cached in the
ArtifactStore under the backend, prompt and class list that produced them.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_write_json
from .llm import OpenAIChat
from .world import PARTS, ConceptWorld

QUESTION = (
    "What are useful visual features for distinguishing a {cls} in a photo? These features should be "
    "visually distinct and have limited overlap with each other. Please list {n} of them and sort them in "
    "descending order of importance. Answer with a bullet list; each feature no more than five words."
)
ANSWER_START = "There are several useful visual features to tell there is a {cls} in a photo:\n-"
FEW_SHOT = (  # worked examples that show the answer format (our own wording)
    (
        "zebra",
        [
            "black and white stripes",
            "horse-like body shape",
            "short upright mane",
            "long tufted tail",
            "hooves",
            "large rounded ears",
        ],
    ),
    (
        "fire truck",
        [
            "bright red paint",
            "long extension ladder",
            "flashing lights on roof",
            "large wheels",
            "hoses and equipment",
            "boxy cab",
        ],
    ),
)
PART_IMPORTANCE: tuple[str, ...] = ("head", "wings", "body", "tail", "legs")
VAGUE_PHRASES: tuple[str, ...] = (
    "distinctive overall appearance",
    "graceful shape",
    "unique look",
    "striking features",
    "elegant posture",
    "characteristic silhouette",
)
FAULT_KINDS: tuple[str, ...] = ("wrong_attribute", "non_visual", "vague")


def few_shot_prompt(cls: str, n: int = 6) -> str:
    """The few-shot completion prompt for one class; the model continues after the final '-'."""
    shots = [
        f"Q: {QUESTION.format(cls=c, n=n)}\nA: {ANSWER_START.format(cls=c)[:-1]}" + "".join(f"- {d}\n" for d in ds[:n])
        for c, ds in FEW_SHOT
    ]
    return "\n".join(shots) + f"\nQ: {QUESTION.format(cls=cls, n=n)}\nA: {ANSWER_START.format(cls=cls)}"


_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2013]|\d+[.)]|\(\d+\))\s*(.+?)\s*$")


def parse_bullets(answer: str, limit: int | None = None) -> list[str]:
    """Descriptors from an LLM answer: bullet ('-', '*', '•') or numbered lines, cleaned and de-duplicated.

    The text before the first bullet is dropped unless the answer starts mid-bullet (a completion after
    the prompt's final '-'); the answer stops at the next 'Q:' (a model continuing the few-shot pattern).
    Answers with no bullets at all fall back to one descriptor per non-empty line.
    """
    answer = re.split(r"^\s*Q:", answer, maxsplit=1, flags=re.MULTILINE)[0]
    lines = [ln for ln in answer.splitlines() if ln.strip()]
    matches = [_BULLET.match(ln) for ln in lines]
    if not any(matches):
        items = [ln.strip() for ln in lines]
    else:
        items = [m.group(1) for m in matches if m]
        if lines and not matches[0] and not lines[0].rstrip().endswith(":"):
            items.insert(0, lines[0].strip())  # the first bullet, whose '-' ended the prompt
    out: list[str] = []
    for item in items:
        item = re.sub(r"\*\*|__", "", item).strip(" .;,:\"'").strip()
        if item and item.lower() not in (o.lower() for o in out):
            out.append(item)
    return out[:limit] if limit else out


def descriptor_sentence(cls: str, descriptor: str) -> str:
    """'zorbil, which has a red striped head': the text a descriptor is scored with (class-conditioned)."""
    d = descriptor.strip()
    first = d.split(" ", 1)[0].lower()
    if first in ("a", "an", "the"):
        return f"{cls}, which is {d}" if first != "the" else f"{cls}, which has {d}"
    if first in (
        "has",
        "have",
        "is",
        "often",
        "usually",
        "typically",
        "may",
        "can",
        "lives",
        "hunts",
        "sings",
        "sleeps",
        "eats",
        "travels",
        "builds",
        "dances",
    ):
        return f"{cls}, which {d}"
    if first == "used":
        return f"{cls}, which is {d}"
    return f"{cls}, which has {d}"


CONCEPT_TEXTS: tuple[str, ...] = ("bare", "sentence")


def concept_text(cls: str, descriptor: str, form: str = "bare") -> str:
    """The text a descriptor's *explanation map* is computed for.

    ``"bare"`` (the original DEAL code: ``category_name_inclusion=None``): the descriptor as it stands.
    ``"sentence"``: "{class}, which has {descriptor}" (the original uses that form only for
    classification by description; for maps it shares the class name across all K texts).
    """
    if form not in CONCEPT_TEXTS:
        raise ValueError(f"concept_text={form!r}: use one of {CONCEPT_TEXTS}.")
    return descriptor.strip() if form == "bare" else descriptor_sentence(cls, descriptor)


def rich_label(cls: str, descriptors: Sequence[str]) -> str:
    """DEAL's text augmentation: '{class}. It may contain {d_1}, {d_2}, ..., {d_K}'."""
    return f"{cls}. It may contain " + ", ".join(descriptors)


# ---------------------------------------------------------------------------- files
def validate_descriptors(data: object, source: str = "descriptors") -> dict[str, list[str]]:
    """Check the original format ``{"class": ["descriptor", ...]}``; a clear error otherwise."""
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f'{source}: expected a non-empty JSON object {{"class name": ["descriptor", ...]}}, '
            f"got {type(data).__name__}."
        )
    bad = [
        k
        for k, v in data.items()
        if not isinstance(v, list) or not v or not all(isinstance(d, str) and d.strip() for d in v)
    ]
    if bad:
        raise ValueError(f"{source}: classes {bad[:5]} do not map to a non-empty list of strings.")
    return {str(k): [d.strip() for d in v] for k, v in data.items()}


def class_key(name: str) -> str:
    """A class name reduced for matching across sources: case, a CUB-style ``001.`` prefix, a possessive
    ``'s`` (CUB's folders drop it: "Brewer's Blackbird" is ``Brewer_Blackbird``), apostrophes, and
    ``_``/``-``/spaces ignored. "Black-footed Albatross" and ``001.Black_footed_Albatross`` agree."""
    s = re.sub(r"^\d+[._]", "", name.strip().lower())
    s = re.sub(r"['\u2019]s\b", "", s).replace("'", "").replace("\u2019", "")
    return re.sub(r"[\s_\-]+", " ", s).strip()


@dataclass
class NameMatch:
    """How a descriptor file's class names matched a data set's: ``matched`` maps each data set class
    to its file entry; ``missing`` data set classes have none; ``unused`` file entries fit no class."""

    matched: dict[str, str]
    missing: list[str]
    unused: list[str]

    def report(self) -> str:
        """One paragraph: counts, the matches that needed normalising, what did not match."""
        loose = [(c, k) for c, k in self.matched.items() if k != c]
        lines = [
            f"{len(self.matched)} of {len(self.matched) + len(self.missing)} classes matched "
            f"({len(loose)} after normalising names)"
        ]
        lines += [f"  {k!r} -> {c!r}" for c, k in loose[:5]] + (["  ..."] if len(loose) > 5 else [])
        if self.missing:
            lines.append(f"no entry for {len(self.missing)}: {self.missing[:10]}")
        if self.unused:
            lines.append(f"{len(self.unused)} file entries match no class: {self.unused[:10]}")
        return "\n".join(lines)


def match_class_names(file_names: Sequence[str], class_names: Sequence[str]) -> NameMatch:
    """Match descriptor-file keys to data set class names by :func:`class_key`; two file keys that
    reduce to the same name are an error (which one is meant cannot be told)."""
    by_key: dict[str, str] = {}
    for name in file_names:
        other = by_key.setdefault(class_key(name), name)
        if other != name:
            raise ValueError(f"Descriptor entries {other!r} and {name!r} name the same class; keep one.")
    matched = {c: by_key[class_key(c)] for c in class_names if class_key(c) in by_key}
    used = set(matched.values())
    return NameMatch(matched, [c for c in class_names if c not in matched], [k for k in file_names if k not in used])


def load_descriptors(path: str | Path, class_names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read a descriptor file in the original format; with ``class_names``, return them in that order.

    Class names are matched by :func:`class_key` (case, underscores, hyphens, apostrophes, CUB's
    number prefix ignored) and the match is reported; a class without descriptors is an error that
    lists the closest file entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No descriptor file at {path}: pass descriptors=<JSON file "
            '{"class": ["descriptor", ...]}> or descriptors=\'oracle\' on Concept World.'
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    table = validate_descriptors(data, str(path))
    if class_names is None:
        return table
    match = match_class_names(list(table), class_names)
    if match.missing:
        close = {
            c: difflib.get_close_matches(class_key(c), [class_key(k) for k in match.unused], n=2)
            for c in match.missing[:5]
        }
        raise ValueError(
            f"{path} has no descriptors for {len(match.missing)} of {len(class_names)} classes "
            f"(e.g. {match.missing[:5]}); closest unused entries (normalised): {close}. "
            "Rename those entries to the data set's class names."
        )
    print(f"descriptors from {path}: {match.report()}")
    return {c: table[match.matched[c]] for c in class_names}


def save_descriptors(path: str | Path, descriptors: dict[str, list[str]]) -> Path:
    """Write descriptors in the original format, atomically."""
    return atomic_write_json(path, validate_descriptors(descriptors))


# ---------------------------------------------------------------------------- world oracle
@dataclass
class DescriptorSet:
    """Descriptors plus, on Concept World, the part each one is about (None: no part) and its fault."""

    descriptors: dict[str, list[str]]
    parts: dict[str, list[str | None]] = field(default_factory=dict)
    faults: dict[str, list[str | None]] = field(default_factory=dict)

    def first(self, k: int) -> DescriptorSet:
        """The first ``k`` descriptors of each class (DEAL trains on K = 5)."""
        cut = lambda table: {c: v[:k] for c, v in table.items()}  # noqa: E731
        short = DescriptorSet(cut(self.descriptors), cut(self.parts), cut(self.faults))
        too_few = [c for c, v in short.descriptors.items() if len(v) < k]
        if too_few:
            raise ValueError(f"Classes {too_few[:5]} have fewer than {k} descriptors; lower n_concepts.")
        return short

    def part_masks(self, class_names: Sequence[str], labels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(N, K, H, W) bool: each descriptor's part mask on each image (empty for part-less descriptors)."""
        k = len(self.descriptors[class_names[0]])
        out = np.zeros((len(labels), k, *masks.shape[-2:]), dtype=bool)
        for i, c in enumerate(labels):
            for j, part in enumerate(self.parts[class_names[c]]):
                if part is not None:
                    out[i, j] = masks[i, PARTS.index(part)]
        return out


def _part_phrase(attrs: dict[str, str], part: str, keys: Sequence[str]) -> str:
    words = [attrs[a] for a in keys if not (a == "pattern" and attrs[a] == "plain")]
    return " ".join(words + [part])


def oracle_descriptors(world: ConceptWorld, n: int = 6, fault_rate: float = 0.0, seed: int = 0) -> DescriptorSet:
    """Ground-truth descriptors for every class, ``fault_rate`` of them replaced by LLM-like faults.

    One descriptor per present part in order of importance ("large red striped head"), then shorter
    single-part phrases ("striped head", "red body") until there are ``n``. A fault is a wrong colour
    (same part), a non-visual fact (habitat or behaviour; no part) or a vague phrase (no part).
    """
    from .world import COLOURS

    if not 0 <= fault_rate <= 1:
        raise ValueError(f"fault_rate={fault_rate} must lie in [0, 1].")
    out = DescriptorSet({}, {}, {})
    for c, spec in enumerate(world.classes):
        rng = np.random.default_rng([seed, c])
        parts = [p for p in PART_IMPORTANCE if p in spec.parts]
        items = [(_part_phrase(spec.parts[p], p, ("size", "colour", "pattern")), p) for p in parts]
        extra = [
            (_part_phrase(spec.parts[p], p, keys), p) for keys in (("colour",), ("pattern",), ("size",)) for p in parts
        ]
        items += [e for e in extra if e[0] not in {i[0] for i in items}][: max(0, n - len(items))]
        descs, part_of, faults = [], [], []
        for text, part in items[:n]:
            fault = FAULT_KINDS[rng.integers(len(FAULT_KINDS))] if rng.random() < fault_rate else None
            if fault == "wrong_attribute":
                true = spec.parts[part]["colour"]
                wrong = [col for col in COLOURS if col != true][rng.integers(len(COLOURS) - 1)]
                text = re.sub(rf"\b{true}\b", wrong, text) if true in text.split() else f"{wrong} {text}"
            elif fault == "non_visual":
                text, part = (f"lives in the {spec.habitat}" if rng.random() < 0.5 else spec.behaviour), None
            elif fault == "vague":
                text, part = VAGUE_PHRASES[rng.integers(len(VAGUE_PHRASES))], None
            descs.append(text)
            part_of.append(part)
            faults.append(fault)
        out.descriptors[spec.name], out.parts[spec.name], out.faults[spec.name] = descs, part_of, faults
    return out


# ---------------------------------------------------------------------------- LLM backends
class LLM(Protocol):
    params: dict

    def __call__(self, prompt: str) -> str: ...


class TransformersLLM:
    """A local causal LM (transformers name or path); greedy decoding, i.e. temperature 0 as in the original."""

    def __init__(self, name_or_path: str, max_new_tokens: int = 96, device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import pick_device

        local = Path(name_or_path).exists()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local)
        except OSError as err:
            raise RuntimeError(
                f"Could not load the language model {name_or_path!r} ({str(err)[:200]}). Pass a "
                "local folder saved with save_pretrained(), or a hub name in the local cache."
            ) from err
        self.device = pick_device(device)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.params = {"backend": "transformers", "model": str(name_or_path), "max_new_tokens": max_new_tokens}

    def __call__(self, prompt: str) -> str:
        import torch

        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def llm_descriptors(
    llm: LLM, class_names: Sequence[str], n: int = 6, progress: bool = True
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Ask ``llm`` for ``n`` descriptors per class; returns (descriptors, raw answers)."""
    table, raw = {}, {}
    for cls in tqdm(class_names, disable=not progress, desc="descriptors"):
        raw[cls] = llm(few_shot_prompt(cls, n))
        table[cls] = parse_bullets(raw[cls], limit=n)
        if not table[cls]:
            raise RuntimeError(f"The LLM gave no usable descriptor for {cls!r}; its answer was {raw[cls][:200]!r}.")
    return table, raw


def cached_llm_descriptors(
    llm: LLM, class_names: Sequence[str], store: ArtifactStore, n: int = 6, progress: bool = True
) -> dict[str, list[str]]:
    """:func:`llm_descriptors`, stored under the backend, prompt and classes (reused when they match)."""
    params = {"llm": llm.params, "classes": list(class_names), "n": n, "prompt": few_shot_prompt("{cls}", n)}

    def build(d: Path) -> None:
        table, raw = llm_descriptors(llm, class_names, n, progress)
        atomic_write_json(d / "raw_answers.json", raw)
        save_descriptors(d / "descriptors.json", table)

    return store.get_or_build("descriptors", params, build, lambda d: load_descriptors(d / "descriptors.json"))


def get_descriptors(
    source: str,
    class_names: Sequence[str],
    store: ArtifactStore,
    world: ConceptWorld | None = None,
    n: int = 6,
    fault_rate: float = 0.0,
    seed: int = 0,
    llm_base_url: str | None = None,
    llm_api_key_env: str = "OPENAI_API_KEY",
) -> DescriptorSet:
    """The chapters' descriptor parameter.

    ``"oracle"`` (Concept World only), a path to a JSON file in the original format,
    ``"hf:<name or path>"`` (local transformers causal LM) or ``"openai:<model>"`` (with ``llm_base_url``).
    """
    if source == "oracle":
        if world is None:
            raise ValueError(
                "descriptors='oracle' needs Concept World (model='world'); with real data pass a JSON "
                "file, 'hf:<model>' or 'openai:<model>'."
            )
        return oracle_descriptors(world, n, fault_rate, seed)
    if source.startswith("hf:"):
        table = cached_llm_descriptors(TransformersLLM(source[3:]), class_names, store, n)
    elif source.startswith("openai:"):
        chat = OpenAIChat(source[7:], base_url=llm_base_url or "https://api.openai.com/v1", api_key_env=llm_api_key_env)
        table = cached_llm_descriptors(chat, class_names, store, n)
    else:
        table = load_descriptors(source, class_names)
    table = {c: table[c] for c in class_names}
    return DescriptorSet(
        table, {c: [None] * len(v) for c, v in table.items()}, {c: [None] * len(v) for c, v in table.items()}
    )


def descriptor_text_features(
    model,
    tokenizer,
    descriptors: dict[str, list[str]],
    class_names: Sequence[str],
    k: int | None = None,
    form: str = "bare",
):
    """(C, K, D) normalised embeddings of each class's first ``k`` descriptors as :func:`concept_text`
    ``form`` gives them (``"bare"``: the original's map texts); equal K per class."""
    from .models import encode_texts

    k = k or min(len(descriptors[c]) for c in class_names)
    short = [c for c in class_names if len(descriptors[c]) < k]
    if short:
        raise ValueError(f"Classes {short[:5]} have fewer than {k} descriptors.")
    texts = [concept_text(c, d, form) for c in class_names for d in descriptors[c][:k]]
    return encode_texts(model, tokenizer, texts).view(len(class_names), k, -1)


def description_logits(
    image_features,
    model,
    tokenizer,
    descriptors: dict[str, list[str]],
    class_names: Sequence[str],
    with_class_name: bool = True,
):
    """Classification by description: (N, C) mean cosine similarity of each image with a class's descriptors.

    ``with_class_name``: score "{class}, which has {descriptor}" (the original); else the bare descriptor.
    """
    import torch

    from .models import encode_texts

    scores = []
    for c in class_names:
        texts = [descriptor_sentence(c, d) if with_class_name else d for d in descriptors[c]]
        emb = encode_texts(model, tokenizer, texts)
        scores.append((image_features @ emb.T).mean(1))
    return torch.stack(scores, 1)


# ---------------------------------------------------------------------------- maps and accuracy
def map_scores(
    model,
    tokenizer,
    images,
    labels,
    class_names: Sequence[str],
    ds: DescriptorSet,
    k: int,
    masks: np.ndarray | None,
    form: str = "bare",
    start_layer: int | None = None,
):
    """Explanation maps of each image's first ``k`` descriptors, and their scores: disentanglability and,
    where Concept World ``masks`` (N, parts, H, W) exist, pointing game and energy in the part's mask.
    Returns (scores, maps (N, k, h, w), per-descriptor table or None)."""
    import pandas as pd
    import torch

    from .explain import explain_batches
    from .metrics import disentanglability, energy_in_mask, pointing_game, separation_loss

    table = {c: ds.descriptors[c][:k] for c in class_names}
    concepts = descriptor_text_features(model, tokenizer, table, class_names, k, form)
    maps = explain_batches(model, images, concepts[torch.as_tensor(labels)], start_layer=start_layer)
    out = {"disentanglability": disentanglability([separation_loss(m[None]).item() for m in maps])}
    if masks is None:
        return out, maps, None
    first = ds.first(k)
    part_masks = first.part_masks(class_names, labels, masks)
    rows = pd.DataFrame(
        {
            "part": [p for c in labels for p in first.parts[class_names[c]]],
            "fault": [f or "none" for c in labels for f in first.faults[class_names[c]]],
            "pointing game": pointing_game(maps, part_masks).numpy().ravel(),
            "energy in mask": energy_in_mask(maps, part_masks).numpy().ravel(),
            "part area": part_masks.mean((-2, -1)).ravel(),
        }
    ).dropna()
    out.update(
        {
            "pointing_game": float(rows["pointing game"].mean()),
            "energy_in_mask": float(rows["energy in mask"].mean()),
            "part_area": float(rows["part area"].mean()),
        }
    )
    return out, maps, rows


def description_accuracy(
    features, model, tokenizer, class_names: Sequence[str], ds: DescriptorSet, labels
) -> dict[str, float]:
    """Top-1 of classification by description, with the class name in each sentence (the original) and
    with the bare descriptors only."""
    from .models import topk_accuracy

    return {
        f"description_top1{suffix}": topk_accuracy(
            description_logits(features, model, tokenizer, ds.descriptors, class_names, with_class_name=named),
            labels,
            1,
        )
        for suffix, named in (("", True), ("_descriptors_only", False))
    }
