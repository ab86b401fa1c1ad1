"""Image data sets for the real-model path: an ImageFolder tree or the CUB-200-2011 layout.

Both give an :class:`ImageSet` of file paths, integer labels and readable class names,
which the chapters turn into model inputs with the model's own preprocess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSet:
    """Paths, labels and class names of a real image data set."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of at most ``n`` images."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return ImageSet([self.paths[i] for i in idx], self.labels[idx], self.class_names)


def readable_class_name(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'black footed albatross'."""
    return re.sub(r"^\d+[._]", "", folder).replace("_", " ").strip().lower()


def load_image_folder(root: str | Path) -> ImageSet:
    """``root/<class>/<image>`` (torchvision ImageFolder layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data root {root} does not exist: pass data_root=<folder with one folder per class>.")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for k, d in enumerate(folders):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {root}.")
    return ImageSet(paths, np.array(labels), [readable_class_name(d.name) for d in folders])


def load_cub(root: str | Path, split: str = "test") -> ImageSet:
    """CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``classes.txt``, ``train_test_split.txt``."""
    root = Path(root)
    need = ["images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt"]
    missing = [f for f in need if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"{root} is not a CUB_200_2011 folder: missing {missing}.")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r}: use 'train', 'test' or 'all'.")
    read = lambda f: dict(line.split(maxsplit=1) for line in (root / f).read_text().splitlines() if line.strip())  # noqa: E731
    files, labels, is_train = read("images.txt"), read("image_class_labels.txt"), read("train_test_split.txt")
    classes = read("classes.txt")
    class_ids = sorted(classes, key=int)
    keep = [i for i in sorted(files, key=int) if split == "all" or (is_train[i].strip() == "1") == (split == "train")]
    return ImageSet([root / "images" / files[i].strip() for i in keep],
                    np.array([class_ids.index(labels[i].strip()) for i in keep]),
                    [readable_class_name(classes[c].strip()) for c in class_ids])


def load_dataset(dataset: str, data_root: str | Path, split: str = "test") -> ImageSet:
    """``dataset`` is ``'imagefolder'`` or ``'cub'``."""
    if dataset == "imagefolder":
        return load_image_folder(data_root)
    if dataset == "cub":
        return load_cub(data_root, split)
    raise ValueError(f"dataset={dataset!r}: use 'world', 'imagefolder' or 'cub'.")


def load_images(paths: list[Path], preprocess, size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Model inputs (through ``preprocess``) and uint8 RGB arrays (resized to ``size``) for display."""
    tensors, arrays = [], []
    for p in paths:
        img = Image.open(p).convert("RGB")
        tensors.append(preprocess(img))
        if size:
            arrays.append(np.asarray(img.resize((size, size))))
    return torch.stack(tensors), (np.stack(arrays) if arrays else np.empty(0))
