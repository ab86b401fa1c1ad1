"""EX2's inspection: is a description informative, and which attributes does it mention?

- :data:`JUDGE_PROMPT` is the original yes/no question. A judge is any callable that maps a
  list of prompts to ``"yes"``/``"no"`` answers: :class:`TransformersJudge` (a local causal LM)
  or :class:`OpenAIJudge` (an OpenAI-compatible chat endpoint, key from an environment variable).
- :class:`WorldJudge` knows the ground truth of Concept World: it labels each description as
  spurious, non-visual (habitat, behaviour) or visual (which parts and attributes, and whether
  they are true for the class), and answers the yes/no question from that knowledge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import torch

from .llm import OpenAIChat
from .world import ATTRIBUTES, BEHAVIOURS, HABITATS, PARTS, ConceptWorld

JUDGE_PROMPT = ("You want to explain what a {cls} is to your students. Does the following text snippet mention any "
                "specific details about {cls} that increases your students' knowledge about {cls}? "
                "Answer yes or no.\n\nText snippet: {text}\n\nAnswer:")

ATTRIBUTE_TYPES: tuple[str, ...] = ("colour", "shape", "texture", "parts", "habitat", "behaviour", "origin", "other")
ATTRIBUTE_PROMPT = ("Which kind of attribute of a {cls} does the following text snippet describe? Answer with one "
                    "word: " + ", ".join(ATTRIBUTE_TYPES) + ".\n\nText snippet: {text}\n\nAnswer:")


def judge_prompts(class_names: Sequence[str], descriptions: Sequence[str], template: str = JUDGE_PROMPT) -> list[str]:
    return [template.format(cls=c, text=d) for c, d in zip(class_names, descriptions)]


def parse_choice(answer: str, options: Sequence[str] = ("yes", "no")) -> str | None:
    """The first of ``options`` that a free-text answer names (as a whole word), else None."""
    found = [(m.start(), o) for o in options if (m := re.search(rf"\b{re.escape(o)}\b", answer.lower()))]
    return min(found)[1] if found else None


class TransformersJudge:
    """A local causal LM as judge: picks the option whose first token is the most probable next token.

    Reading the options' logits (rather than parsing free text) always gives an answer and is
    deterministic; prompts use the model's chat template when it has one.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> TransformersJudge:
        from .textlm import load_lm

        return cls(*load_lm(name_or_path), **kwargs)

    def _first_token_ids(self, word: str) -> list[int]:
        variants = (word, " " + word, word.capitalize(), " " + word.capitalize())
        return sorted({self.tokenizer.encode(v, add_special_tokens=False)[0] for v in variants})

    def _wrap(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    @torch.no_grad()
    def choose(self, prompts: Sequence[str], options: Sequence[str] = ("yes", "no")) -> list[str]:
        """For each prompt, the option the model finds most likely as the answer's first word."""
        option_ids = [self._first_token_ids(o) for o in options]
        if len({tuple(i) for i in option_ids}) < len(options):
            raise ValueError(f"Options {list(options)} share first tokens in this tokenizer: they cannot be "
                             "told apart; rephrase the options.")
        self.tokenizer.padding_side = "left"
        dev = next(self.model.parameters()).device
        answers = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer([self._wrap(p) for p in prompts[s:s + self.batch_size]], return_tensors="pt",
                                 padding=True).to(dev)
            logp = self.model(**enc).logits[:, -1].float().log_softmax(-1)
            scores = torch.stack([logp[:, ids].logsumexp(-1) for ids in option_ids], dim=1)
            answers += [options[k] for k in scores.argmax(1).tolist()]
        return answers

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return self.choose(prompts, ("yes", "no"))


class OpenAIJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint as judge (temperature 0, a few tokens);
    the key comes from the environment variable ``api_key_env`` (None for a server without keys)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0) -> None:
        self.ask = OpenAIChat(model, base_url=base_url, api_key_env=api_key_env, temperature=0.0, max_tokens=5,
                              timeout=timeout)

    def choose(self, prompts: Sequence[str], options: Sequence[str] = ("yes", "no")) -> list[str | None]:
        """The option each answer names first (None when it names none)."""
        return [parse_choice(self.ask(p), options) for p in prompts]

    def __call__(self, prompts: Sequence[str]) -> list[str | None]:
        return self.choose(prompts, ("yes", "no"))


# ---------------------------------------------------------------------------- ground truth
_WORD = re.compile(r"[a-z]+")


class WorldJudge:
    """Labels descriptions of Concept World classes against the ground truth."""

    def __init__(self, world: ConceptWorld) -> None:
        self.world = world
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
            for prev in reversed(words[max(0, i - 3):i]):  # "a large red striped head"
                if prev not in self.attr_of_word or self.attr_of_word[prev] in attrs:
                    break
                attrs[self.attr_of_word[prev]] = prev
            if not attrs:
                continue
            truth = spec.parts.get(w)
            if truth is not None and "colour" in attrs and "pattern" not in attrs:
                attrs["pattern"] = "plain"  # descriptions leave a plain pattern unsaid
            correct = {a: truth is not None and truth[a] == v for a, v in attrs.items()}
            mentions.append({"part": w, **attrs, "true": all(correct.values()),
                             **{f"{a}_true": ok for a, ok in correct.items()}})
        return mentions

    def label(self, class_index: int, text: str) -> dict:
        """Ground-truth labels of one description of class ``class_index``."""
        spec = self.world.classes[class_index]
        low = text.lower()
        visual = self.visual_mentions(class_index, text)
        habitats = [h for h in HABITATS if re.search(rf"\b{h}\b", low)]
        behaviours = [b for b in BEHAVIOURS if b in low]
        out = {
            "mentions_class": spec.name in low,
            "other_classes": sorted(n for n in self.names if n != spec.name and re.search(rf"\b{n}\b", low)),
            "visual_true": sum(m["true"] for m in visual), "visual_false": sum(not m["true"] for m in visual),
            "parts": sorted({m["part"] for m in visual}),
            "true_colour_parts": sorted({m["part"] for m in visual if m.get("colour_true")}),
            "attributes": sorted({a for m in visual for a in ATTRIBUTES if a in m}),
            "habitat": bool(habitats), "habitat_true": spec.habitat in habitats,
            "behaviour": bool(behaviours), "behaviour_true": spec.behaviour in behaviours,
        }
        out["visual"] = bool(visual)
        out["informative"] = out["visual_true"] > 0 or out["habitat_true"] or out["behaviour_true"]
        out["type"] = ("visual" if visual else "habitat" if habitats else "behaviour" if behaviours
                       else "spurious")
        return out

    def label_frame(self, descriptions: pd.DataFrame) -> pd.DataFrame:
        """``descriptions`` (columns class_index, description) with the labels as extra columns."""
        labels = [self.label(c, t) for c, t in zip(descriptions["class_index"], descriptions["description"])]
        return pd.concat([descriptions.reset_index(drop=True), pd.DataFrame(labels)], axis=1)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """Answer :data:`JUDGE_PROMPT` prompts: "yes" iff the snippet states something true about the class."""
        pattern = re.compile(r"what a (\w+) is to your students.*Text snippet: (.*)\n\nAnswer:", re.S)
        answers = []
        for p in prompts:
            match = pattern.search(p)
            if not match or match.group(1) not in self.names:
                raise ValueError("WorldJudge answers only JUDGE_PROMPT prompts about this world's classes.")
            answers.append("yes" if self.label(self.names[match.group(1)], match.group(2))["informative"] else "no")
        return answers


def make_judge(spec: str, world: ConceptWorld | None = None, api_key_env: str | None = "OPENAI_API_KEY"):
    """A judge from a notebook parameter: ``"world"`` (ground truth; needs ``world``),
    ``"openai:<model>@<base_url>"`` (an OpenAI-compatible endpoint), or a transformers model name/path."""
    if spec == "world":
        if world is None:
            raise ValueError("judge='world' knows only Concept World: on real data pass an LLM judge "
                             "(a transformers model name/path, or 'openai:<model>@<base_url>').")
        return WorldJudge(world)
    if spec.startswith("openai:"):
        model, sep, base_url = spec.removeprefix("openai:").partition("@")
        if not sep or not model or not base_url:
            raise ValueError(f"judge={spec!r}: write 'openai:<model>@<base_url>', e.g. "
                             "'openai:gpt-4o-mini@https://api.openai.com/v1'.")
        return OpenAIJudge(base_url, model, api_key_env=api_key_env)
    return TransformersJudge.from_pretrained(spec)
