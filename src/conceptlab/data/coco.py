"""COCO-format instance annotations as concepts with masks (LaViSE's real path).

:class:`CocoImages` reads an instances JSON with pycocotools: the concepts are the data set's
categories, an image's region of a category is the union of its instances' masks (polygon or
RLE). Every annotation is checked when the file is read, so a bad one stops the run with its id
before any training (pycocotools would fail only later, with a bare ``KeyError``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..lavise import Concept


def square(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the shortest side to ``size`` and crop the centre square (what the CNN sees)."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def annotation_problems(dataset: dict, limit: int = 5) -> list[str]:
    """What makes a COCO instances dict unusable for masks, in words (at most ``limit`` examples each):
    annotations without a ``segmentation``, with an unknown category or an unknown image."""
    categories = {c["id"] for c in dataset.get("categories", [])}
    images = {i["id"] for i in dataset.get("images", [])}
    bad: dict[str, list[str]] = {"no 'segmentation'": [], "an unknown category_id": [], "an unknown image_id": []}
    for a in dataset.get("annotations", []):
        where = f"id {a.get('id')} (image {a.get('image_id')})"
        if not a.get("segmentation"):
            bad["no 'segmentation'"].append(where)
        if a.get("category_id") not in categories:
            bad["an unknown category_id"].append(where)
        if a.get("image_id") not in images:
            bad["an unknown image_id"].append(where)
    return [
        f"{len(ids)} annotation(s) with {what}: {', '.join(ids[:limit])}{', ...' if len(ids) > limit else ''}"
        for what, ids in bad.items()
        if ids
    ]


class CocoImages:
    """Photographs with COCO instance annotations (polygon or RLE masks, read with pycocotools).

    Concepts are the data set's categories (group: the supercategory); an image's region of a
    category is the union of its instances' masks. Images and masks are resized (shortest side)
    and centre-cropped to ``size`` pixels, as the CNN sees them. ``image_ids`` picks images
    (default: every image with at least one annotation). Implements LaViSE's ``ConceptImages``.
    """

    def __init__(
        self, image_dir: str | Path, annotations: str | Path, size: int = 224, image_ids: Sequence[int] | None = None
    ) -> None:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO(str(annotations))
        problems = annotation_problems(self.coco.dataset)
        if problems:
            raise ValueError(f"{annotations} cannot give concept masks: " + "; ".join(problems) + ".")
        self.image_dir, self.size = Path(image_dir), size
        self.categories = sorted(self.coco.getCatIds())
        cats = self.coco.loadCats(self.categories)
        self.concepts = [Concept(c["name"], c.get("supercategory") or "object") for c in cats]
        self.keep = np.arange(len(self.categories))
        annotated = sorted({a["image_id"] for a in self.coco.dataset.get("annotations", [])})
        self.image_ids = list(annotated if image_ids is None else image_ids)
        if not self.image_ids:
            raise ValueError(f"{annotations} has no annotated images.")

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, positions: Sequence[int] | np.ndarray) -> CocoImages:
        """The images at ``positions`` (same concepts)."""
        out = object.__new__(CocoImages)
        out.__dict__.update(self.__dict__, image_ids=[self.image_ids[i] for i in positions])
        return out

    def with_concepts(self, keep: np.ndarray) -> CocoImages:
        """The same images with the concepts where ``keep`` is true."""
        out = object.__new__(CocoImages)
        out.__dict__.update(
            self.__dict__, keep=self.keep[np.asarray(keep)], concepts=[c for c, k in zip(self.concepts, keep) if k]
        )
        return out

    def images(self, idx: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 images."""
        out = []
        for i in np.asarray(idx):
            info = self.coco.loadImgs(self.image_ids[i])[0]
            with Image.open(self.image_dir / info["file_name"]) as img:
                out.append(np.asarray(square(img.convert("RGB"), self.size, Image.Resampling.BILINEAR)))
        return np.stack(out)

    def regions(self, idx: np.ndarray, size: int | None = None) -> np.ndarray:
        """(n, categories, s, s) bool: each category's mask (the union of its instances)."""
        size = size or self.size
        out = np.zeros((len(np.asarray(idx)), len(self.categories), size, size), dtype=bool)
        for n, i in enumerate(np.asarray(idx)):
            info = self.coco.loadImgs(self.image_ids[i])[0]
            for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])):
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = Image.fromarray(self.coco.annToMask(ann) * 255)
                small = square(square(mask, self.size, Image.Resampling.NEAREST), size, Image.Resampling.NEAREST)
                out[n, self.categories.index(ann["category_id"])] |= np.asarray(small) > 127
        return out

    def composition(self, idx: np.ndarray) -> np.ndarray:
        """(n, K, categories) 0/1: concept k is category ``keep[k]``."""
        eye = np.eye(len(self.categories), dtype=np.float32)[self.keep]
        return np.broadcast_to(eye, (len(np.asarray(idx)), *eye.shape)).copy()


def split_coco(data: CocoImages, n_train: int, n_eval: int, seed: int = 0) -> tuple[CocoImages, CocoImages]:
    """Seeded disjoint subsets of the annotated images: ``n_train`` to train the explainer (at most
    four fifths) and ``n_eval`` to explain filters on (at least one image each)."""
    if len(data) < 2:
        raise ValueError("The COCO annotations need at least two annotated images (train and evaluate).")
    order = np.random.default_rng(seed).permutation(len(data))
    n_ev = min(n_eval, max(1, len(data) // 5))
    return data.subset(order[n_ev:][:n_train]), data.subset(order[:n_ev])


__all__ = ["CocoImages", "annotation_problems", "split_coco", "square"]
