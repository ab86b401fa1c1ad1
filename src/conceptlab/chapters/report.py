"""Every headline number beside what gives it meaning: its interval, its chance, the paper's number.

A chapter's headline is a mapping ``{label: Reported(...)}``; :func:`reported_table` renders it
the same way in every chapter, and the results JSON stores each as a dict
(``value, low, high, chance, paper, note``). A missing reference must say why in ``note``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd


def versus_chance(low: float, high: float, chance: float, chance_high: float | None = None) -> str:
    """Where an interval lies against chance (a level, or the band ``chance`` to ``chance_high``), in words."""
    top = chance if chance_high is None else chance_high
    return "above chance" if low > top else "below chance" if high < chance else "at chance"


@dataclass(frozen=True)
class Reported:
    """A headline number with its references.

    ``low``/``high``: the interval (bootstrap over images, or over seeds where the number comes from
    training; ``note`` says which). ``chance``: chance, or a random baseline computed the same way.
    ``paper``: the original paper's number where one exists. ``note``: how the interval was made,
    and why a reference is missing (``None`` alone is not allowed to pass silently).
    """

    value: float
    low: float | None = None
    high: float | None = None
    chance: float | None = None
    paper: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        for missing, word in ((self.low is None, "interval"), (self.chance is None, "chance")):
            if missing and word not in self.note.lower():
                raise ValueError(f"a headline number missing its {word} must say why in `note`, naming the {word}")
        if self.low is not None and self.high is not None and not (self.low - 1e-9 <= self.value <= self.high + 1e-9):
            raise ValueError(f"value {self.value} lies outside its interval [{self.low}, {self.high}]")

    @property
    def above_chance(self) -> bool | None:
        """Whether the whole interval lies above chance (``None`` when either is missing)."""
        if self.low is None or self.chance is None:
            return None
        return bool(self.low > self.chance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def reported_table(headline: Mapping[str, Reported | Mapping[str, Any]], digits: int = 3) -> pd.DataFrame:
    """One row per headline number: value, 95 % interval, chance, above chance, the paper's number, note."""
    rows = {}
    for label, r in headline.items():
        r = r if isinstance(r, Reported) else Reported(**r)
        rows[label] = {
            "value": _fmt(r.value, digits),
            "95 % interval": "—" if r.low is None else f"[{_fmt(r.low, digits)}, {_fmt(r.high, digits)}]",
            "chance": _fmt(r.chance, digits),
            "above chance": {True: "yes", False: "no", None: "—"}[r.above_chance],
            "paper": _fmt(r.paper, digits),
            "note": r.note,
        }
    return pd.DataFrame(rows).T.rename_axis("measure")


_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:\.\d+)?(?![\w.])")


def numbers_in(text: str) -> list[float]:
    """The decimal numbers written in a sentence (percentages as written, e.g. ``92.5`` for "92.5 %")."""
    return [float(m.replace("−", "-")) for m in _NUMBER.findall(text)]


def _leaves(obj: Any) -> Iterable[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)


def unsupported_numbers(summary: Iterable[str], record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Numbers in summary sentences that match no number of the results record, as written (rounded),
    as a percentage, or as a small count (integers up to 10 are ordinal words in disguise)."""
    known = [
        v
        for v in _leaves({k: record[k] for k in ("results", "headline", "parameters") if k in record})
        if not math.isnan(v)
    ]
    missing = []
    for sentence in summary:
        for n in numbers_in(sentence):
            decimals = len(str(n).split(".")[1]) if "." in str(n) and not float(n).is_integer() else 0
            tol = 0.5 * 10**-decimals + 1e-9
            if n.is_integer() and abs(n) <= 10:
                continue
            if not any(abs(v - n) <= tol or abs(100 * v - n) <= tol or abs(abs(v) - abs(n)) <= tol for v in known):
                missing.append((sentence, n))
    return missing


__all__ = ["Reported", "numbers_in", "reported_table", "unsupported_numbers"]
