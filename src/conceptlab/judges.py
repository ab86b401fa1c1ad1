"""EX2's inspection: is a description informative, and which attribute does it describe?

The original asks a chat LLM, per (class, description), in one conversation: a system message,
one worked example (question and a JSON answer with a short explanation), then the question.
Two questions are asked here, the original's and a second one that sorts informative
descriptions by attribute type:

- :data:`INFORMATIVE`: the original yes/no question ("does the snippet increase your students'
  knowledge about the class?"); "no" marks a spurious description.
- :data:`ATTRIBUTE`: which attribute the snippet describes, one of :data:`ATTRIBUTE_TYPES`,
  grouped into visual and non-visual by :data:`ATTRIBUTE_GROUPS`.

A judge is any object with ``ask(question, class_names, texts) -> answers`` (an option of the
question, or None when a reply could not be parsed): :class:`OpenAIJudge` (an OpenAI-compatible
endpoint, key from an environment variable), :class:`TransformersJudge` (a local causal LM) or
:class:`WorldJudge` (the ground truth of Concept World).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .llm import OpenAIChat, endpoint_problem
from .world import ATTRIBUTES, BEHAVIOURS, CLASS_TEMPLATES, HABITATS, PARTS, SPURIOUS_TEMPLATES, ConceptWorld

SYSTEM_MESSAGE = 'You are a knowledgeable teacher. Answer in JSON, with a short "explanation" and your "answer".'

ATTRIBUTE_GROUPS: dict[str, str] = {
    "colour": "visual",
    "texture": "visual",
    "shape": "visual",
    "size": "visual",
    "parts": "visual",
    "habitat": "non-visual",
    "behaviour": "non-visual",
    "origin": "non-visual",
    "other": "non-visual",
}
ATTRIBUTE_TYPES: tuple[str, ...] = tuple(ATTRIBUTE_GROUPS)


@dataclass(frozen=True)
class Question:
    """One judge question: its template (``{cls}``, ``{text}``), its options and a worked example."""

    name: str
    template: str
    options: tuple[str, ...]
    example: tuple[str, str, str, str]  # class, snippet, explanation, answer

    def text(self, cls: str, snippet: str) -> str:
        return self.template.format(cls=cls, text=snippet)


INFORMATIVE = Question(
    "informative",
    "You want to explain what a {cls} is to your students. Does the following text snippet mention any specific "
    "details about {cls} that increases your students' knowledge about {cls}? Answer yes or no. Provide an "
    "explanation for your answer.\n\nText snippet: {text}",
    ("yes", "no"),
    (
        "goldfinch",
        "A goldfinch on a thistle, its body bright yellow with black wings.",
        "It tells the students the colours of a goldfinch's body and wings.",
        "yes",
    ),
)

ATTRIBUTE = Question(
    "attribute",
    "You want to explain what a {cls} is to your students. Which kind of attribute of a {cls} does the following "
    "text snippet describe? Answer with one of: " + ", ".join(ATTRIBUTE_TYPES) + ". Provide an explanation for "
    "your answer.\n\nText snippet: {text}",
    ATTRIBUTE_TYPES,
    (
        "goldfinch",
        "Goldfinches are common in weedy fields and gardens across North America.",
        "It says where goldfinches live.",
        "habitat",
    ),
)


def judge_messages(
    question: Question, cls: str, text: str, system: str = SYSTEM_MESSAGE, answer_first: bool = False
) -> list[dict[str, str]]:
    """The conversation sent to a chat judge: system message, the worked example (question and JSON
    answer), then the question about ``text``. ``answer_first`` puts the answer before the explanation
    in the example (for judges that read the answer's probability instead of generating)."""
    ex_cls, ex_text, ex_why, ex_answer = question.example
    example = (
        {"answer": ex_answer, "explanation": ex_why} if answer_first else {"explanation": ex_why, "answer": ex_answer}
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question.text(ex_cls, ex_text)},
        {"role": "assistant", "content": json.dumps(example)},
        {"role": "user", "content": question.text(cls, text)},
    ]


def parse_choice(answer: str, options: Sequence[str] = ("yes", "no")) -> str | None:
    """The first of ``options`` that a free-text answer names (as a whole word), else None."""
    found = [(m.start(), o) for o in options if (m := re.search(rf"\b{re.escape(o)}\b", answer.lower()))]
    return min(found)[1] if found else None


_JSON_OBJECT = re.compile(r"\{.*?\}", re.S)
_ANSWER_FIELD = re.compile(r"\"?answer\"?\s*[:=]\s*\"?([a-zA-Z-]+)", re.I)


def parse_answer(reply: str | None, options: Sequence[str] = ("yes", "no")) -> str | None:
    """The option a judge's reply gives, or None.

    Tries, in order: a JSON object with an ``answer`` field (or any field whose value is an option,
    such as the original's ``increases_knowledge``), possibly inside a code fence; an ``answer: x``
    line; a reply that starts with an option. Free text that merely mentions an option somewhere
    ("the snippet does not say yes or no") is not an answer.
    """
    if not reply:
        return None
    for block in _JSON_OBJECT.findall(reply):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            values = [obj.get("answer")] + [v for k, v in obj.items() if k != "answer"]
            for value in values:
                if isinstance(value, str) and value.strip().lower().strip(".!") in options:
                    return value.strip().lower().strip(".!")
    if match := _ANSWER_FIELD.search(reply):
        if match.group(1).lower() in options:
            return match.group(1).lower()
    first = re.match(r"\W*([a-zA-Z-]+)", reply)
    if first and first.group(1).lower() in options:
        return first.group(1).lower()
    return None


class OpenAIJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint as judge (temperature 0, up to 128 tokens, as
    the original's JSON answers need); the key comes from the environment variable ``api_key_env``
    (None for a server without keys). ``json_mode`` asks for ``response_format=json_object``, as the
    original did (not every server supports it). Raw replies are kept in ``replies``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        json_mode: bool = False,
    ) -> None:
        self.chat = OpenAIChat(
            model, base_url=base_url, api_key_env=api_key_env, temperature=0.0, max_tokens=128, timeout=timeout
        )
        self.extra = {"response_format": {"type": "json_object"}} if json_mode else {}
        self.replies: list[str] = []

    def ask(self, question: Question, class_names: Sequence[str], texts: Sequence[str]) -> list[str | None]:
        """One answer per (class, text): an option of ``question``, or None for a reply without one."""
        replies = [self.chat.chat(judge_messages(question, c, t), **self.extra) for c, t in zip(class_names, texts)]
        self.replies += replies
        return [parse_answer(r, question.options) for r in replies]


class TransformersJudge:
    """A local causal LM as judge: reads the probability of each option as the answer.

    The conversation of :func:`judge_messages` (with the model's chat template when it has one)
    is followed by the start of the JSON answer, ``{"answer": "``; the option whose tokens are most
    probable there is the answer. This always answers and is deterministic; unlike a chat endpoint
    it writes no explanation. Runs on the model's device (GPU when it was loaded there).
    """

    ANSWER_PREFIX = '{"answer": "'

    def __init__(self, model, tokenizer, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> TransformersJudge:
        from .textlm import load_lm

        return cls(*load_lm(name_or_path), **kwargs)

    def render(self, question: Question, cls: str, text: str) -> str:
        """The prompt text up to the answer."""
        messages = judge_messages(question, cls, text, answer_first=True)
        if getattr(self.tokenizer, "chat_template", None):
            head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            head = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
        return head + self.ANSWER_PREFIX

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> torch.Tensor:
        """(prompts, options) log-probability of each option's tokens (then ``"``) after each prompt."""
        tok, dev = self.tokenizer, self.model.device
        option_ids = [tok.encode(o + '"', add_special_tokens=False) for o in options]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = []
        for p in prompts:
            head = tok.encode(p, add_special_tokens=False)
            seqs = [head + o for o in option_ids]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
            logp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            out.append(
                [sum(logp[k, len(head) - 1 + j, t].item() for j, t in enumerate(o)) for k, o in enumerate(option_ids)]
            )
        return torch.tensor(out)

    def ask(self, question: Question, class_names: Sequence[str], texts: Sequence[str]) -> list[str]:
        """For each (class, text), the option of ``question`` the model finds most probable."""
        prompts = [self.render(question, c, t) for c, t in zip(class_names, texts)]
        best = self.option_logprobs(prompts, question.options).argmax(1)
        return [question.options[k] for k in best.tolist()]


# ---------------------------------------------------------------------------- ground truth
_WORD = re.compile(r"[a-z]+")
# The world's part attributes as the attribute types of the second question.
_WORLD_TYPE = {"colour": "colour", "pattern": "texture", "size": "size"}
# Web phrases the world CLIP never saw in its captions (the world LM's web writes them too).
UNSEEN_WEB_PHRASES: tuple[str, ...] = (
    "share this picture of a {cls} with your friends",
    "{cls} pictures, page 2 of 5",
    "see all 24 photos of the {cls}",
)
# What one sentence is, on the world: the world LM's answer kinds, and "other" (e.g. a wrong habitat).
SENTENCE_KINDS: tuple[str, ...] = (
    "visual_true",
    "visual_false",
    "habitat",
    "behaviour",
    "class",
    "web_seen",
    "web_unseen",
    "other",
)
_PHRASE_WORD = re.compile(r"[a-z0-9]+")


def _phrase_pieces(template: str) -> list[str]:
    """The fixed words of a ``{cls}`` template, as space-joined runs ("click to enlarge photo of a")."""
    return [
        " ".join(_PHRASE_WORD.findall(part)) for part in template.lower().split("{cls}") if _PHRASE_WORD.findall(part)
    ]


def web_phrase(text: str, templates: Sequence[str]) -> bool:
    """Whether ``text`` contains one of the web-phrase ``templates`` (whatever class it names)."""
    words = " " + " ".join(_PHRASE_WORD.findall(text.lower())) + " "
    return any(all(f" {piece} " in words for piece in _phrase_pieces(t)) for t in templates)


class WorldJudge:
    """Labels descriptions of Concept World classes against the ground truth, and answers both judge
    questions from it: informative iff the text states at least ``min_true`` true facts about the
    class (a part attribute, its habitat or its behaviour)."""

    def __init__(self, world: ConceptWorld, min_true: int = 1) -> None:
        self.world, self.min_true = world, min_true
        self.names = {c.name: k for k, c in enumerate(world.classes)}
        self.attr_of_word = {v: a for a, values in ATTRIBUTES.items() for v in values}

    def visual_mentions(self, class_index: int, text: str) -> list[dict]:
        """Each part named in ``text`` with the attribute words just before it, checked against the class."""
        spec = self.world.classes[class_index]
        words = _WORD.findall(text.lower())
        mentions = []
        for i, w in enumerate(words):
            if w not in PARTS:
                continue
            attrs = {}
            for prev in reversed(words[max(0, i - 3) : i]):  # "a large red striped head"
                if prev not in self.attr_of_word or self.attr_of_word[prev] in attrs:
                    break
                attrs[self.attr_of_word[prev]] = prev
            if not attrs:
                continue
            truth = spec.parts.get(w)
            if truth is not None and "colour" in attrs and "pattern" not in attrs:
                attrs["pattern"] = "plain"  # descriptions leave a plain pattern unsaid
            correct = {a: truth is not None and truth[a] == v for a, v in attrs.items()}
            mentions.append(
                {"part": w, **attrs, "true": all(correct.values()), **{f"{a}_true": ok for a, ok in correct.items()}}
            )
        return mentions

    def label(self, class_index: int, text: str) -> dict:
        """Ground-truth labels of one description of class ``class_index``.

        ``claims`` counts the statements about the class's attributes (true or not), ``n_true``
        the true ones; ``type`` is what the text is about (visual, habitat, behaviour, or spurious
        when it states nothing), ``attribute`` the answer to :data:`ATTRIBUTE` from the true facts.
        """
        spec = self.world.classes[class_index]
        low = text.lower()
        visual = self.visual_mentions(class_index, text)
        habitats = [h for h in HABITATS if re.search(rf"\b{h}\b", low)]
        behaviours = [b for b in BEHAVIOURS if b in low]
        true_visual = [m for m in visual if m["true"]]
        out: dict[str, Any] = {
            "mentions_class": spec.name in low,
            "other_classes": sorted(n for n in self.names if n != spec.name and re.search(rf"\b{n}\b", low)),
            "visual_true": len(true_visual),
            "visual_false": len(visual) - len(true_visual),
            "parts": sorted({m["part"] for m in visual}),
            "true_colour_parts": sorted({m["part"] for m in visual if m.get("colour_true")}),
            "attributes": sorted({a for m in visual for a in ATTRIBUTES if a in m}),
            "habitat": bool(habitats),
            "habitat_true": spec.habitat in habitats,
            "behaviour": bool(behaviours),
            "behaviour_true": spec.behaviour in behaviours,
            "visual": bool(visual),
            "web_seen": web_phrase(text, SPURIOUS_TEMPLATES),
            "web_unseen": web_phrase(text, UNSEEN_WEB_PHRASES),
        }
        out["claims"] = len(visual) + len(habitats) + len(behaviours)
        out["n_true"] = out["visual_true"] + out["habitat_true"] + out["behaviour_true"]
        out["informative"] = out["n_true"] >= self.min_true
        out["type"] = "visual" if visual else "habitat" if habitats else "behaviour" if behaviours else "spurious"
        seen = [a for m in true_visual for a in ("colour", "pattern", "size") if a in m]
        out["attribute"] = (
            _WORLD_TYPE[seen[0]]
            if seen
            else "parts"
            if true_visual
            else "habitat"
            if out["habitat_true"]
            else "behaviour"
            if out["behaviour_true"]
            else "other"
        )
        return out

    def sentence_kind(self, class_index: int, sentence: str) -> str:
        """What one sentence is (:data:`SENTENCE_KINDS`): a web phrase seen or never seen in the CLIP's
        captions, a part description whose every attribute is true (else false), a true habitat or
        behaviour, a class-name caption, or "other"."""
        lab = self.label(class_index, sentence)
        if lab["web_seen"] or lab["web_unseen"]:
            return "web_seen" if lab["web_seen"] else "web_unseen"
        if lab["visual"]:
            return "visual_true" if lab["visual_false"] == 0 else "visual_false"
        if lab["habitat"] or lab["behaviour"]:
            return (
                "habitat"
                if lab["habitat_true"]
                else "behaviour"
                if lab["behaviour_true"] and not lab["habitat"]
                else "other"
            )
        name = self.world.classes[class_index].name
        captions = {t.format(cls=name).rstrip(".") for t in CLASS_TEMPLATES}
        return "class" if sentence.strip().lower().rstrip(".") in captions else "other"

    def label_frame(self, descriptions: pd.DataFrame) -> pd.DataFrame:
        """``descriptions`` (columns class_index, description) with the labels as extra columns."""
        labels = [self.label(c, t) for c, t in zip(descriptions["class_index"], descriptions["description"])]
        return pd.concat([descriptions.reset_index(drop=True), pd.DataFrame(labels)], axis=1)

    def ask(self, question: Question, class_names: Sequence[str], texts: Sequence[str]) -> list[str]:
        """The ground truth's answers to :data:`INFORMATIVE` or :data:`ATTRIBUTE`."""
        if question.name not in ("informative", "attribute"):
            raise ValueError(f"WorldJudge answers only the informative and attribute questions, not {question.name!r}.")
        unknown = sorted(set(class_names) - set(self.names))
        if unknown:
            raise ValueError(f"WorldJudge knows only this world's classes; unknown: {unknown}.")
        labels = [self.label(self.names[c], t) for c, t in zip(class_names, texts)]
        if question.name == "informative":
            return ["yes" if lab["informative"] else "no" for lab in labels]
        return [lab["attribute"] for lab in labels]


# ---------------------------------------------------------------------------- the judge parameter
def _split_openai(spec: str) -> tuple[str, str]:
    model, sep, base_url = spec.removeprefix("openai:").partition("@")
    if not sep or not model or not base_url:
        raise ValueError(
            f"judge={spec!r}: write 'openai:<model>@<base_url>', e.g. 'openai:gpt-4o-mini@https://api.openai.com/v1'."
        )
    return model, base_url


def judge_problem(spec: str, api_key_env: str | None = "OPENAI_API_KEY", on_world: bool = True) -> str | None:
    """Why the ``judge`` parameter cannot work, in words (for the chapter's parameter check), or None.

    Checked before any training: the spelling of ``openai:<model>@<base_url>``, the key variable and
    that the endpoint answers; that a local judge path exists; that ``world`` is used on the world only.
    """
    if spec == "world":
        return (
            None
            if on_world
            else (
                "judge='world' knows only Concept World: on real data pass a transformers "
                "model path or 'openai:<model>@<base_url>'"
            )
        )
    if spec.startswith("openai:"):
        try:
            _, base_url = _split_openai(spec)
        except ValueError as err:
            return str(err)
        return endpoint_problem(base_url, api_key_env)
    if (spec.startswith((".", "/", "~")) or Path(spec).exists()) and not Path(spec).expanduser().is_dir():
        return f"judge={spec!r} is no folder with a transformers model (save_pretrained writes one)"
    return None


def make_judge(
    spec: str, world: ConceptWorld | None = None, api_key_env: str | None = "OPENAI_API_KEY", min_true: int = 1
):
    """A judge from a notebook parameter: ``"world"`` (ground truth; needs ``world``),
    ``"openai:<model>@<base_url>"`` (an OpenAI-compatible endpoint), or a transformers model name/path."""
    if spec == "world":
        if world is None:
            raise ValueError(
                "judge='world' knows only Concept World: on real data pass an LLM judge "
                "(a transformers model name/path, or 'openai:<model>@<base_url>')."
            )
        return WorldJudge(world, min_true=min_true)
    if spec.startswith("openai:"):
        model, base_url = _split_openai(spec)
        return OpenAIJudge(base_url, model, api_key_env=api_key_env)
    return TransformersJudge.from_pretrained(spec)
