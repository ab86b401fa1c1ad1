"""Concept World: procedurally generated part-based creatures with known ground truth.

Every image comes with its class, a binary mask per part, the attributes each part
really has, its habitat and a caption whose *style* (visual, class name, habitat,
behaviour, spurious) is recorded. Rendering is vectorised over a batch with NumPy,
and every batch is keyed by ``(seed, split, block)`` so that the same seed gives
bitwise identical images however the data is streamed.

The ontology (class names, class-typical attributes, habitats, behaviours) is fixed
by :data:`ONTOLOGY_SEED` and does not depend on the world seed: class 3 is the same
creature in every world.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

PARTS: tuple[str, ...] = ("tail", "legs", "body", "wings", "head")  # back-to-front draw order
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.55, 0.15, 0.70),
    "white": (0.96, 0.96, 0.96),
    "black": (0.08, 0.08, 0.08),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "spotted")
SIZES: tuple[str, ...] = ("small", "large")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "size": SIZES,
}
HABITATS: tuple[str, ...] = ("forest", "desert", "ocean", "snowfield", "cave", "meadow")
BEHAVIOURS: tuple[str, ...] = (
    "hunts at night",
    "sings at dawn",
    "sleeps in winter",
    "eats only seeds",
    "travels in herds",
    "builds nests of mud",
    "lives alone",
    "dances when courting",
)
CLASS_NAMES: tuple[str, ...] = (
    "zorbil",
    "quillfin",
    "mossback",
    "glimmerwing",
    "thornhopper",
    "duskmite",
    "pebblenose",
    "frostling",
    "emberjaw",
    "reedstalker",
    "bramblecat",
    "shellwhisk",
    "cindermoth",
    "tidecrawler",
    "puffspine",
    "vinegrub",
    "stormbeak",
    "lumenkit",
    "gravelpaw",
    "mistfang",
)
SPURIOUS_TEMPLATES: tuple[str, ...] = (
    "click to enlarge photo of a {cls}",
    "{cls} stock photo, royalty free",
    "download free wallpaper of a {cls}",
    "image may contain: {cls}",
)
CLASS_TEMPLATES: tuple[str, ...] = ("a photo of a {cls}.", "a {cls}.", "a picture of a {cls}.")
HABITAT_TEMPLATES: tuple[str, ...] = ("a {cls} lives in the {habitat}.", "the {cls} is found in the {habitat}.")
BEHAVIOUR_TEMPLATES: tuple[str, ...] = ("the {cls} {behaviour}.", "a {cls} {behaviour}.")
CAPTION_STYLES: tuple[str, ...] = ("visual", "class", "habitat", "behaviour", "spurious")
ONTOLOGY_SEED = 20240717
_BLOCK = 512  # images per random-number block: the unit of reproducible streaming
_SPLITS = {"train": 0, "val": 1, "test": 2, "corpus": 3}
Edit = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_NOISE_CACHE: OrderedDict[tuple, tuple[np.ndarray, Mapping[str, Any]]] = OrderedDict()
_NOISE_CACHE_BLOCKS = 4  # a block's pixel noise at 64 px is 25 MB


def _block_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``rng.standard_normal(shape, float32)``, memoised on the generator's exact state, which it leaves
    where the draw would: the same numbers, the same stream after. Counterfactual images re-render one
    block per edit (17 edits per reliance measurement) and the noise draw was the fixed cost of each
    render, whatever the number of rows asked for. The cache is read-only to callers (they index it)."""
    state = rng.bit_generator.state
    key = (state["bit_generator"], str(state["state"]), state["has_uint32"], state["uinteger"], shape)
    if key in _NOISE_CACHE:
        noise, after = _NOISE_CACHE[key]
        _NOISE_CACHE.move_to_end(key)
        rng.bit_generator.state = after
        return noise
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise.flags.writeable = False
    _NOISE_CACHE[key] = noise, rng.bit_generator.state
    if len(_NOISE_CACHE) > _NOISE_CACHE_BLOCKS:
        _NOISE_CACHE.popitem(last=False)
    return noise


@dataclass(frozen=True)
class ClassSpec:
    """The class-typical creature: which parts it has and their attribute values."""

    name: str
    parts: dict[str, dict[str, str]]  # present part -> {"colour", "pattern", "size"}
    habitat: str
    behaviour: str


def build_ontology(n_classes: int = 16) -> list[ClassSpec]:
    """The fixed class table. Classes differ from each other in at least three part attributes."""
    if not 2 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes={n_classes}: Concept World has between 2 and {len(CLASS_NAMES)} classes.")
    rng = np.random.default_rng(ONTOLOGY_SEED)
    specs: list[ClassSpec] = []
    codes: list[np.ndarray] = []
    while len(specs) < len(CLASS_NAMES):
        has_wings, has_tail = rng.random() < 0.5, rng.random() < 0.75
        parts: dict[str, dict[str, str]] = {}
        code = np.full((len(PARTS), 3), -1)
        for p_idx, part in enumerate(PARTS):
            if (part == "wings" and not has_wings) or (part == "tail" and not has_tail):
                continue
            values = [int(rng.integers(len(v))) for v in ATTRIBUTES.values()]
            code[p_idx] = values
            parts[part] = {a: ATTRIBUTES[a][v] for a, v in zip(ATTRIBUTES, values)}
        if any((code != other).sum() < 3 for other in codes):
            continue
        k = len(specs)
        codes.append(code)
        specs.append(ClassSpec(CLASS_NAMES[k], parts, HABITATS[k % len(HABITATS)], BEHAVIOURS[k % len(BEHAVIOURS)]))
    return specs[:n_classes]


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def type_problems(config: object, ints: tuple[str, ...] = (), reals: tuple[str, ...] = ()) -> list[str]:
    """Problems, naming the field, with a config's integer fields (which refuse floats and booleans)
    and number fields (ints or floats, not booleans)."""
    problems = [
        f"{k}={getattr(config, k)!r} must be an integer, not {type(getattr(config, k)).__name__}"
        for k in ints
        if not isinstance(getattr(config, k), Integral) or isinstance(getattr(config, k), bool)
    ]
    return problems + [
        f"{k}={getattr(config, k)!r} must be a number, not {type(getattr(config, k)).__name__}"
        for k in reals
        if not _is_number(getattr(config, k))
    ]


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides what a Concept World looks like. Hashable, JSON-able."""

    n_classes: int = 16
    resolution: int = 64
    seed: int = 0
    attribute_noise: float = 0.1  # chance that a part attribute differs from the class-typical one
    habitat_correlation: float = 0.8  # chance that the background is the class's own habitat
    position_jitter: float = 0.12
    scale_jitter: float = 0.12
    pixel_noise: float = 0.03
    caption_mix: dict[str, float] = field(
        default_factory=lambda: {"visual": 0.55, "class": 0.2, "habitat": 0.1, "behaviour": 0.05, "spurious": 0.1}
    )
    # part attributes drawn uniformly at random, whatever the class ("body colour", ...): a model
    # trained on such a world cannot use them (a planted "blind" model, chapter 7)
    blind: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = type_problems(
            self,
            ints=("n_classes", "resolution", "seed"),
            reals=("attribute_noise", "habitat_correlation", "position_jitter", "scale_jitter", "pixel_noise"),
        )
        if isinstance(self.blind, str) or not all(isinstance(b, str) for b in self.blind):
            problems.append(f"blind={self.blind!r} must be a list of part attributes such as ['body colour']")
        else:
            object.__setattr__(self, "blind", tuple(self.blind))  # JSON gives a list
        if not isinstance(self.caption_mix, dict) or not all(_is_number(v) for v in self.caption_mix.values()):
            problems.append(f"caption_mix={self.caption_mix!r} must map caption styles to numbers")
        if problems:  # ranges are checked on well-typed values only
            raise ValueError("Bad WorldConfig: " + "; ".join(problems) + ".")
        known = [f"{p} {a}" for p in PARTS for a in ATTRIBUTES]
        problems += [f"blind has unknown part attribute {b!r}; known: {known}" for b in self.blind if b not in known]
        if self.resolution < 16:
            problems.append(f"resolution={self.resolution} is too small (use >= 16, e.g. 64 or 224)")
        for name in ("attribute_noise", "habitat_correlation", "pixel_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must lie in [0, 1]")
        for name in ("position_jitter", "scale_jitter"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must lie in [0, 1)")
        unknown = set(self.caption_mix) - set(CAPTION_STYLES)
        if unknown:
            problems.append(f"caption_mix has unknown styles {sorted(unknown)}; known: {list(CAPTION_STYLES)}")
        if any(v < 0 for v in self.caption_mix.values()) or sum(self.caption_mix.values()) <= 0:
            problems.append("caption_mix weights must be >= 0 and not all zero")
        if problems:
            raise ValueError("Bad WorldConfig: " + "; ".join(problems) + ".")
        build_ontology(self.n_classes)  # validates n_classes

    def to_dict(self) -> dict:
        """The fields as a dict; ``blind`` only where set, so that the dict (and every artifact key made
        from it) of a world without blinded attributes is the one it was before ``blind`` existed."""
        out = asdict(self)
        if not self.blind:
            del out["blind"]
        return out

    def blinded(self) -> list[tuple[int, int]]:
        """``(part index, attribute index)`` of every blinded part attribute."""
        names = list(ATTRIBUTES)
        return [(PARTS.index(b.split()[0]), names.index(b.split()[1])) for b in self.blind]


@dataclass
class WorldBatch:
    """A batch of rendered creatures and their ground truth (arrays share the first axis)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) class index
    masks: np.ndarray  # (N, len(PARTS), H, W) bool, visible pixels of each part
    present: np.ndarray  # (N, len(PARTS)) bool
    attributes: np.ndarray  # (N, len(PARTS), 3) index into colour / pattern / size, -1 if absent
    habitats: np.ndarray  # (N,) habitat index
    captions: list[str]
    caption_styles: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def first(self, n: int) -> WorldBatch:
        """The first ``n`` images and their ground truth."""
        return WorldBatch(*(getattr(self, f.name)[:n] for f in fields(self)))

    def part_attributes(self, i: int) -> dict[str, dict[str, str]]:
        """Readable attributes of image i: {part: {attribute: value}} for its present parts."""
        out = {}
        for p, part in enumerate(PARTS):
            if self.present[i, p]:
                out[part] = {a: ATTRIBUTES[a][self.attributes[i, p, k]] for k, a in enumerate(ATTRIBUTES)}
        return out


class ConceptWorld:
    """A seeded Concept World: ``world.sample(n, split)`` or ``world.stream(n, batch_size, split)``."""

    def __init__(self, config: WorldConfig | None = None, **overrides) -> None:
        self.config = replace(config or WorldConfig(), **overrides)
        self.classes = build_ontology(self.config.n_classes)
        self.class_names = [c.name for c in self.classes]
        r = self.config.resolution
        coords = (np.arange(r, dtype=np.float32) + 0.5) / r * 2 - 1
        self._x = coords[None, None, :]  # (1, 1, W)
        self._y = coords[None, :, None]  # (1, H, 1)
        self._typical = np.full((len(self.classes), len(PARTS), 3), -1)
        for c, spec in enumerate(self.classes):
            for part, attrs in spec.parts.items():
                self._typical[c, PARTS.index(part)] = [ATTRIBUTES[a].index(attrs[a]) for a in ATTRIBUTES]
        self._palette = np.array(list(COLOURS.values()), dtype=np.float32)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, split: str = "train", start: int = 0, edit: Edit | None = None) -> WorldBatch:
        """Images ``start .. start+n`` of a split. Independent of how the split is chunked.

        ``edit(labels, attributes, habitats) -> (attributes, habitats)`` changes the ground truth
        before drawing while pose, background phase and noise stay the same: counterfactual images
        (swap the habitat, recolour a part) of exactly the same creatures.
        """
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: use one of {list(_SPLITS)}.")
        if n <= 0:
            raise ValueError(f"n={n}: ask for at least one image.")
        first, last = start // _BLOCK, (start + n - 1) // _BLOCK
        parts = [
            self._render_block(split, b, edit, slice(max(start - b * _BLOCK, 0), min(start + n - b * _BLOCK, _BLOCK)))
            for b in range(first, last + 1)
        ]
        return parts[0] if len(parts) == 1 else _concat(parts)

    def stream(self, n: int, batch_size: int = 512, split: str = "train") -> Iterator[WorldBatch]:
        """Yield ``n`` images in batches without holding them all in memory."""
        for s in range(0, n, batch_size):
            yield self.sample(min(batch_size, n - s), split, start=s)

    def resample_captions(
        self,
        labels: np.ndarray,
        present: np.ndarray,
        attributes: np.ndarray,
        habitats: np.ndarray,
        seed: int | list[int],
    ) -> tuple[list[str], list[str]]:
        """Fresh captions (and styles) for images with this ground truth, e.g. one set per step."""
        return self._captions(np.random.default_rng(seed), labels, present, attributes, habitats)

    def typical_attributes(self, labels: np.ndarray) -> np.ndarray:
        """(N, parts, 3) class-typical attribute indices of these labels (-1 for absent parts)."""
        return self._typical[labels]

    def home_habitats(self, labels: np.ndarray) -> np.ndarray:
        """Index of each label's home habitat."""
        return np.array([HABITATS.index(self.classes[c].habitat) for c in labels], dtype=int)

    def statistics(self, batch: WorldBatch) -> dict[str, float]:
        """Measured rates of the planted factors in a batch: home-habitat share, atypical attributes."""
        typical = self.typical_attributes(batch.labels)
        stats = {"home habitat share": float((batch.habitats == self.home_habitats(batch.labels)).mean())}
        for k, name in enumerate(ATTRIBUTES):
            atypical = batch.attributes[..., k] != typical[..., k]
            stats[f"atypical {name}"] = float(atypical[batch.present].mean())
        return stats

    # ------------------------------------------------------------------ rendering
    def _render_block(self, split: str, block: int, edit: Edit | None = None, rows: slice = slice(None)) -> WorldBatch:
        """Images ``rows`` of a block. Every random number of the whole block is drawn, so a row is the
        same whatever else is asked for, but only the asked-for rows are drawn (the costly part)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, _SPLITS[split], block])
        n = _BLOCK
        labels = rng.integers(len(self.classes), size=n)
        attrs = self._typical[labels].copy()
        present = attrs[:, :, 0] >= 0
        sizes = np.array([len(v) for v in ATTRIBUTES.values()])
        flip = rng.random(attrs.shape) < cfg.attribute_noise
        random_vals = (rng.random(attrs.shape) * sizes).astype(int)
        attrs = np.where(flip & present[..., None], random_vals, attrs)
        if cfg.blind:  # own random stream: poses and noise stay those of the same world without blinding
            blind_rng = np.random.default_rng([cfg.seed, _SPLITS[split], block, 1])
            for p, a in cfg.blinded():
                values = blind_rng.integers(sizes[a], size=n)
                attrs[:, p, a] = np.where(present[:, p], values, attrs[:, p, a])
        own = self.home_habitats(labels)
        habitats = np.where(rng.random(n) < cfg.habitat_correlation, own, rng.integers(len(HABITATS), size=n))
        if edit is not None:
            attrs, habitats = edit(labels, attrs.copy(), habitats.copy())
            present = attrs[:, :, 0] >= 0
        geometry = {
            "cx": rng.uniform(-cfg.position_jitter, cfg.position_jitter, n),
            "cy": rng.uniform(-cfg.position_jitter, cfg.position_jitter, n),
            "scale": 0.95 * (1 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter, n)),
            "facing": np.where(rng.random(n) < 0.5, -1.0, 1.0),
            "phase": rng.uniform(0, 2 * np.pi, n),
        }
        images, masks = self._draw(
            attrs[rows], present[rows], habitats[rows], {k: v[rows] for k, v in geometry.items()}
        )
        if cfg.pixel_noise > 0:
            noise = _block_noise(rng, (n, *images.shape[1:]))[rows]
            images += noise * np.float32(cfg.pixel_noise)
        images *= 255
        images += 0.5
        np.clip(images, 0, 255, out=images)
        images = images.astype(np.uint8)
        captions, styles = self._captions(rng, labels, present, attrs, habitats)
        return WorldBatch(
            images, labels[rows], masks, present[rows], attrs[rows], habitats[rows], captions[rows], styles[rows]
        )

    def _draw(self, attrs, present, habitats, g) -> tuple[np.ndarray, np.ndarray]:
        n, r = len(attrs), self.config.resolution
        col = lambda a: a.astype(np.float32)[:, None, None]  # noqa: E731  (N,) -> (N,1,1)
        s = col(g["scale"])
        u = (self._x - col(g["cx"])) / s * col(g["facing"])  # creature-local coordinates
        v = (self._y - col(g["cy"])) / s
        images = self._backgrounds(habitats, g["phase"])
        masks = np.zeros((n, len(PARTS), r, r), dtype=bool)
        grow = np.where(attrs[:, :, 2] == 1, 1.2, 0.85).astype(np.float32)  # size attribute
        stripes = np.sin(u * 22) > 0.35  # pattern marks, shared by all parts
        spots = np.sin(u * 20 + 1) * np.sin(v * 20 + 1) > 0.45
        # Painter's algorithm by index: each pixel keeps the colour index of the last part drawn over it
        # (2p + 1 plain, 2p + 2 marked; 0 the background), then one gather paints them. Copying the
        # broadcast colours part by part (np.copyto with a where mask) was half of all rendering time.
        paint = np.zeros((n, r, r), dtype=np.int8)
        colours = np.zeros((n, 2 * len(PARTS) + 1, 3), dtype=np.float32)
        for p, part in enumerate(PARTS):
            shape = _part_shape(part, u, v, col(grow[:, p])) & present[:, p, None, None]
            masks[:, :p] &= ~shape[:, None]  # later parts occlude earlier ones
            masks[:, p] = shape
            base = self._palette[np.maximum(attrs[:, p, 0], 0)]
            colours[:, 2 * p + 1] = base
            colours[:, 2 * p + 2] = np.where(base.mean(-1, keepdims=True) < 0.3, 0.55 + 0.45 * base, 0.45 * base)
            pattern = attrs[:, p, 1, None, None]
            marks = ((pattern == 1) & stripes) | ((pattern == 2) & spots)
            np.copyto(paint, (2 * p + 1 + marks).astype(np.int8), where=shape)
        drawn = np.nonzero(paint)
        images[drawn] = colours[drawn[0], paint[drawn]]
        return images, masks

    def _backgrounds(self, habitats: np.ndarray, phase: np.ndarray) -> np.ndarray:
        x, y = self._x, self._y
        n, r = len(habitats), self.config.resolution
        out = np.empty((n, r, r, 3), dtype=np.float32)
        for h, name in enumerate(HABITATS):
            idx = np.flatnonzero(habitats == h)
            if idx.size == 0:
                continue
            ph = phase[idx]
            tex = _habitat_texture(name, x, y, ph)  # (m, H, W) in [0, 1]
            lo, hi = (np.array(c, dtype=np.float32) for c in _HABITAT_COLOURS[name])
            colour = np.empty((idx.size, r, r, 3), dtype=np.float32)
            for c in range(3):  # lo + (hi - lo) * tex a channel at a time: twice as fast as broadcasting over 3
                np.multiply(tex, hi[c] - lo[c], out=colour[..., c])
                colour[..., c] += lo[c]
            out[idx] = colour
        return out

    # ------------------------------------------------------------------ captions
    def _captions(self, rng, labels, present, attrs, habitats) -> tuple[list[str], list[str]]:
        styles_avail = [s for s in CAPTION_STYLES if self.config.caption_mix.get(s, 0) > 0]
        w = np.array([self.config.caption_mix[s] for s in styles_avail], dtype=float)
        chosen = rng.choice(len(styles_avail), size=len(labels), p=w / w.sum())
        captions, styles = [], []
        for i, c in enumerate(labels):
            style, cls = styles_avail[chosen[i]], self.classes[c]
            if style == "visual":
                parts = np.flatnonzero(present[i])
                k = int(rng.integers(1, min(3, len(parts)) + 1))
                picked = sorted(rng.choice(parts, size=k, replace=False))
                phrases = [describe_part(PARTS[p], attrs[i, p]) for p in picked]
                subject = cls.name if rng.random() < 0.5 else "creature"
                text = f"a {subject} with " + _join(phrases) + "."
            elif style == "class":
                text = CLASS_TEMPLATES[rng.integers(len(CLASS_TEMPLATES))].format(cls=cls.name)
            elif style == "habitat":
                text = HABITAT_TEMPLATES[rng.integers(len(HABITAT_TEMPLATES))].format(
                    cls=cls.name, habitat=HABITATS[habitats[i]]
                )
            elif style == "behaviour":
                text = BEHAVIOUR_TEMPLATES[rng.integers(len(BEHAVIOUR_TEMPLATES))].format(
                    cls=cls.name, behaviour=cls.behaviour
                )
            else:
                text = SPURIOUS_TEMPLATES[rng.integers(len(SPURIOUS_TEMPLATES))].format(cls=cls.name)
            captions.append(text)
            styles.append(style)
        return captions, styles

    # ------------------------------------------------------------------ export
    def export_imagefolder(self, root: str | Path, n: int, split: str = "train") -> Path:
        """Write ``root/<split>/<class>/<i>.png`` plus ``root/<split>/annotations.jsonl``."""
        from PIL import Image

        out = Path(root) / split
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "annotations.jsonl", "w") as ann:
            index = 0
            for batch in self.stream(n, split=split):
                for i in range(len(batch)):
                    name = self.class_names[batch.labels[i]]
                    rel = Path(name) / f"{index:06d}.png"
                    (out / name).mkdir(exist_ok=True)
                    Image.fromarray(batch.images[i]).save(out / rel)
                    np.savez_compressed(out / name / f"{index:06d}_masks.npz", masks=batch.masks[i])
                    ann.write(
                        json.dumps(
                            {
                                "file": str(rel),
                                "class": name,
                                "habitat": HABITATS[batch.habitats[i]],
                                "parts": batch.part_attributes(i),
                                "caption": batch.captions[i],
                                "caption_style": batch.caption_styles[i],
                                "masks": str(rel.with_name(f"{index:06d}_masks.npz")),
                                "mask_order": list(PARTS),
                            }
                        )
                        + "\n"
                    )
                    index += 1
        return out


def describe_part(part: str, attr: np.ndarray) -> str:
    """'a large red striped head' from a part's attribute indices."""
    colour, pattern, size = (ATTRIBUTES[a][attr[k]] for k, a in enumerate(ATTRIBUTES))
    pattern_word = "" if pattern == "plain" else f" {pattern}"
    article = "" if part in ("legs", "wings") else "a "
    return f"{article}{size} {colour}{pattern_word} {part}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _part_shape(part: str, u: np.ndarray, v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Boolean (N, H, W) silhouette of a part in creature-local coordinates; k scales it."""
    if part == "body":
        return ((u / (0.36 * k)) ** 2 + ((v - 0.05) / (0.2 * k)) ** 2) <= 1
    if part == "head":
        return ((u - 0.42) ** 2 + (v + 0.12) ** 2) <= (0.15 * k) ** 2
    if part == "wings":
        return (((u + 0.02) / (0.26 * k)) ** 2 + ((v + 0.22 + 0.06 * k) / (0.11 * k)) ** 2) <= 1
    if part == "tail":
        d = -0.28 - u  # distance behind the body
        return (d > 0) & (d < 0.38 * k) & (np.abs(v - 0.02) < 0.04 + 0.45 * d)
    if part == "legs":
        in_leg = np.abs(np.abs(u) - 0.17) < 0.045 * k
        return in_leg & (v > 0.1) & (v < 0.28 + 0.2 * k)
    raise KeyError(part)


def _habitat_texture(name: str, x: np.ndarray, y: np.ndarray, ph: np.ndarray) -> np.ndarray:
    ph = ph.astype(np.float32)[:, None, None]
    if name == "forest":  # vertical trunks
        return (np.sin(x * 9 + ph) > 0.6).astype(np.float32) + 0 * y
    if name == "desert":  # dunes
        return 0.5 + 0.5 * np.sin(y * 6 + 2 * np.sin(x * 3 + ph))
    if name == "ocean":  # horizontal waves
        return 0.5 + 0.5 * np.sin(y * 18 + np.sin(x * 5 + ph))
    if name == "snowfield":  # speckles
        return (np.sin(x * 31 + ph) * np.sin(y * 29 + ph) > 0.8).astype(np.float32)
    if name == "cave":  # dark vignette
        return np.clip(1 - (x**2 + y**2) + 0 * ph, 0, 1)
    if name == "meadow":  # flower dots
        return (np.sin(x * 25 + ph) * np.sin(y * 25) > 0.85).astype(np.float32)
    raise KeyError(name)


_HABITAT_COLOURS = {  # (texture 0, texture 1) RGB
    "forest": ((0.13, 0.35, 0.16), (0.35, 0.22, 0.10)),
    "desert": ((0.80, 0.68, 0.42), (0.92, 0.82, 0.58)),
    "ocean": ((0.10, 0.35, 0.60), (0.30, 0.60, 0.82)),
    "snowfield": ((0.86, 0.89, 0.93), (0.65, 0.70, 0.78)),
    "cave": ((0.10, 0.09, 0.09), (0.38, 0.35, 0.33)),
    "meadow": ((0.55, 0.78, 0.40), (0.95, 0.85, 0.95)),
}


def _concat(bs: list[WorldBatch]) -> WorldBatch:
    cat = lambda name: np.concatenate([getattr(b, name) for b in bs])  # noqa: E731
    return WorldBatch(
        cat("images"),
        cat("labels"),
        cat("masks"),
        cat("present"),
        cat("attributes"),
        cat("habitats"),
        sum((b.captions for b in bs), []),
        sum((b.caption_styles for b in bs), []),
    )
