"""Image data sets for the real-model path: an ImageFolder tree or the CUB-200-2011 layout.

Both give an :class:`ImageSet` of file paths, integer labels and readable class names,
which the chapters turn into model inputs with the model's own preprocess.

Checks made when a data set is read:

- hidden entries (``.name``) and macOS ``__MACOSX`` folders are ignored, never made classes;
- a file that PIL cannot open as an image is **skipped with a warning naming it** (so one
  bad download does not stop a run); a file that opens but fails to decode later stops the run
  with an error naming it (:func:`load_images`);
- a train and a test folder must hold the same classes (:func:`check_same_classes`): an
  ImageFolder label is the class folder's rank, so one missing folder would shift every label.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _readable(paths: list[Path]) -> list[bool]:
    """Whether PIL can open and verify each file as an image (no full decode); warns once naming the others."""
    ok = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.verify()
            ok.append(True)
        except (OSError, UnidentifiedImageError, SyntaxError):
            ok.append(False)
    bad = [str(p) for p, good in zip(paths, ok) if not good]
    if bad:
        warnings.warn(
            f"Skipped {len(bad)} file(s) that are not readable images: {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}. Replace or delete them to use them.",
            UserWarning,
            stacklevel=3,
        )
    return ok


def load_image_folder(root: str | Path) -> ImageSet:
    """``root/<class>/<image>`` (torchvision ImageFolder layout); hidden entries and unreadable files skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data root {root} does not exist: pass data_root=<folder with one folder per class>.")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d))
    paths, labels = [], []
    for k, d in enumerate(folders):
        files = sorted(f for f in d.iterdir() if _visible(f) and f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {root}.")
    ok = _readable(paths)
    keep = [p for p, good in zip(paths, ok) if good]
    kept = np.array([lab for lab, good in zip(labels, ok) if good])
    empty = [d.name for k, d in enumerate(folders) if not (kept == k).any()]
    if empty:
        warnings.warn(f"Class folders without images under {root}: {empty[:10]}.", UserWarning, stacklevel=2)
    return ImageSet(keep, kept, [readable_class_name(d.name) for d in folders])


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
    paths = [root / "images" / files[i].strip() for i in keep]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} images listed in {root / 'images.txt'} are missing, e.g. "
            f"{absent[:3]}: is {root / 'images'} complete?"
        )
    ok = _readable(paths)
    return ImageSet(
        [p for p, good in zip(paths, ok) if good],
        np.array([class_ids.index(labels[i].strip()) for i, good in zip(keep, ok) if good]),
        [readable_class_name(classes[c].strip()) for c in class_ids],
    )


def load_dataset(dataset: str, data_root: str | Path, split: str = "test") -> ImageSet:
    """``dataset`` is ``'imagefolder'`` or ``'cub'``."""
    if dataset == "imagefolder":
        return load_image_folder(data_root)
    if dataset == "cub":
        return load_cub(data_root, split)
    raise ValueError(f"dataset={dataset!r}: use 'world', 'imagefolder' or 'cub'.")


def check_same_classes(train: ImageSet, test: ImageSet, train_source: str = "train", test_source: str = "test") -> None:
    """Refuse a train/test pair whose classes differ (labels index the class list), listing the difference."""
    if list(train.class_names) == list(test.class_names):
        return
    only_train = sorted(set(train.class_names) - set(test.class_names))
    only_test = sorted(set(test.class_names) - set(train.class_names))
    detail = (
        f"only in {train_source}: {only_train[:10]}; only in {test_source}: {only_test[:10]}"
        if only_train or only_test
        else "the same names in another order"
    )
    raise ValueError(
        f"{train_source} and {test_source} must hold the same classes ({detail}). "
        "Give both folders one sub-folder per class, with the same names."
    )


def load_train_test(
    dataset: str, data_root: str | Path, train_root: str | Path | None = None
) -> tuple[ImageSet, ImageSet]:
    """Training and test images: CUB's own split, or ``train_root`` and ``data_root`` ImageFolders (checked
    to hold the same classes). Without ``train_root`` an ImageFolder serves as both (say so in results)."""
    if dataset == "cub":
        return load_cub(data_root, "train"), load_cub(data_root, "test")
    test = load_dataset(dataset, data_root)
    if train_root is None:
        return test, test
    train = load_dataset(dataset, train_root)
    check_same_classes(train, test, f"train_root {train_root}", f"data_root {data_root}")
    return train, test


def spread_over_classes(labels: Sequence[int] | np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` examples spanning as many classes as possible (for example grids).

    Round-robin over the classes in a seeded order, a seeded random example of each class per round,
    so the first ``min(n, classes)`` indices are of distinct classes.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in rng.permutation(np.unique(labels))]
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for pool in pools:
            if pool and len(out) < n:
                out.append(int(pool.pop()))
    return np.array(out, dtype=int)


def model_view(img: Image.Image, preprocess: Callable) -> np.ndarray:
    """The pixels the model sees, as uint8 (H, W, 3): ``preprocess``'s geometric steps (e.g. resize the
    shortest side + centre crop) without tensor conversion and normalisation, for drawing maps on."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise TypeError("preprocess must be a torchvision Compose (open_clip's is) to derive the display image.")
    for step in steps:
        if isinstance(step, (T.ToTensor, T.PILToTensor)):
            break
        if not isinstance(step, T.Normalize):
            img = step(img)
    return np.array(img.convert("RGB"))


def load_images(paths: list[Path], preprocess, size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Model inputs (through ``preprocess``) and, with ``size``, uint8 RGB display images of exactly what
    the model saw (:func:`model_view`), resized to ``size`` x ``size`` (the view is square)."""
    tensors, arrays = [], []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"Image {p} cannot be decoded ({err}): replace or delete the file and rerun.") from err
        tensors.append(preprocess(img))
        if size:
            view = Image.fromarray(model_view(img, preprocess))
            arrays.append(np.asarray(view if view.size == (size, size) else view.resize((size, size))))
    return torch.stack(tensors), (np.stack(arrays) if arrays else np.empty(0))


# ---------------------------------------------------------------------------- chapter evaluation sets
@dataclass
class EvalSet:
    """Model inputs, labels, images for display and (Concept World only) part masks of a chapter's data."""

    images: torch.Tensor  # preprocessed (N, 3, S, S)
    labels: np.ndarray
    display: np.ndarray  # uint8 (N, H, W, 3)
    class_names: list[str]
    masks: np.ndarray | None = None  # (N, parts, H, W) bool on Concept World


def load_eval_set(
    model,
    preprocess,
    n: int,
    dataset: str = "world",
    data_root: str | Path | None = None,
    split: str = "test",
    world=None,
    seed: int = 0,
    start: int = 0,
) -> EvalSet:
    """``n`` images of Concept World (``dataset="world"``) or of a real data set (``imagefolder``/``cub``)."""
    from ..models import images_to_tensor

    if dataset == "world":
        if world is None:
            raise ValueError("dataset='world' needs the ConceptWorld.")
        batch = world.sample(n, split, start=start)
        return EvalSet(
            images_to_tensor(batch.images, model), batch.labels, batch.images, world.class_names, batch.masks
        )
    if data_root is None:
        raise ValueError(f"dataset={dataset!r} needs data_root=<folder>.")
    data = load_dataset(dataset, data_root, split if dataset == "cub" else "test").subset(n, seed)
    images, display = load_images(data.paths, preprocess, size=224)
    return EvalSet(images, data.labels, display, data.class_names)
