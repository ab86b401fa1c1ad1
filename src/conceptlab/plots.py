"""Figures shared by the chapters: image grids with masks, curves, confusion matrices, heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .world import PARTS, WorldBatch

PART_COLOURS = dict(zip(PARTS, sns.color_palette("bright", len(PARTS))))


def sample_grid(
    batch: WorldBatch, class_names: Sequence[str], n: int = 12, cols: int = 6, show_masks: bool = True
) -> plt.Figure:
    """Images with each part's mask outlined in its own colour, titled with class and habitat."""
    from .world import HABITATS

    n = min(n, len(batch))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for ax, i in zip(axes.flat, range(n)):
        ax.imshow(batch.images[i])
        if show_masks:
            for p, part in enumerate(PARTS):
                if batch.masks[i, p].any():
                    ax.contour(batch.masks[i, p], levels=[0.5], colors=[PART_COLOURS[part]], linewidths=1.2)
        ax.set_title(f"{class_names[batch.labels[i]]}\n{HABITATS[batch.habitats[i]]}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if show_masks:
        handles = [plt.Line2D([], [], color=c, label=p) for p, c in PART_COLOURS.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(PARTS), frameon=False)
    fig.tight_layout(rect=(0, 0.05 if show_masks else 0, 1, 1))
    return fig


def dataset_overview(batch: WorldBatch, class_names: Sequence[str]) -> plt.Figure:
    """Counts of classes, habitats and caption styles in a batch."""
    from .world import HABITATS

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    columns = (
        ([class_names[c] for c in batch.labels], "images per class"),
        ([HABITATS[h] for h in batch.habitats], "habitats"),
        (batch.caption_styles, "caption styles"),
    )
    for k, (ax, (values, title)) in enumerate(zip(axes, columns)):
        sns.countplot(x=values, ax=ax, color=f"C{k}")
        ax.set_title(title)
    axes[0].tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


def curve(
    history: Sequence[dict],
    y: str = "loss",
    x: str = "step",
    smooth: int = 20,
    ax: plt.Axes | None = None,
    label: str | None = None,
) -> plt.Axes:
    """A training curve with a running mean over ``smooth`` points."""
    df = pd.DataFrame(history)
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    ax.plot(df[x], df[y], alpha=0.25, color="C0" if label is None else None)
    ax.plot(df[x], df[y].rolling(smooth, min_periods=1).mean(), label=label or f"{y} (running mean)")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    return ax


def confusion(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], ax: plt.Axes | None = None
) -> plt.Axes:
    """Row-normalised confusion matrix as a seaborn heatmap."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=range(len(class_names)), normalize="true")
    size = 0.45 * len(class_names) + 2
    ax = ax or plt.subplots(figsize=(size, size * 0.85))[1]
    sns.heatmap(
        cm,
        ax=ax,
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=class_names,
        yticklabels=class_names,
        cbar_kws={"label": "share of true class"},
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return ax


def upsample_map(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized bilinearly to ``shape`` (H, W): the map's grid spans the whole model input."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(heat), dtype=torch.float32)[None, None]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(ax: plt.Axes, image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> plt.Axes:
    """Draw ``heat`` (h, w) over ``image`` (H, W, 3). ``image`` must be what the model saw
    (:func:`conceptlab.data.model_view` for a photo), so that the map lands on the pixels it explains."""
    ax.imshow(image)
    ax.imshow(upsample_map(heat, image.shape[:2]), cmap="jet", alpha=alpha)
    ax.axis("off")
    return ax


def heatmap_grid(
    images: np.ndarray,
    maps: np.ndarray,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    alpha: float = 0.55,
) -> plt.Figure:
    """Overlay ``maps`` (R, C, h, w) on ``images`` (R, H, W, 3): row = image, column = concept.

    ``images`` are the model's views (see :func:`overlay`); pick rows across classes with
    :func:`conceptlab.data.spread_over_classes`.
    """
    r, c = maps.shape[:2]
    fig, axes = plt.subplots(r, c + 1, figsize=(1.7 * (c + 1), 1.8 * r), squeeze=False)
    for i in range(r):
        axes[i, 0].imshow(images[i])
        for j in range(c):
            overlay(axes[i, j + 1], images[i], maps[i, j], alpha)
        if row_titles is not None:
            axes[i, 0].set_title(row_titles[i], fontsize=8)
    if col_titles is not None:
        for j, t in enumerate(col_titles):
            axes[0, j + 1].set_title(t, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


LABELS = {
    "top1": "top-1",
    "top5": "top-5",
    "fvu": "FVU",
    "l0": "L0",
    "auroc": "AUROC",
    "lr": "learning rate",
    "r@5": "recall@5",
    "r@10": "recall@10",
    "r@20": "recall@20",
}


def human_label(name: object) -> object:
    """``"pointing_game"`` -> ``"pointing game"``; known abbreviations spelt as readers expect."""
    if not isinstance(name, str):
        return name
    return LABELS.get(name, LABELS.get(name.lower(), name.replace("_", " ")))


def table(frame: pd.DataFrame | pd.Series, digits: int = 3) -> pd.DataFrame:
    """A table for the page: human labels on both axes, floats rounded to ``digits``."""
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    shown = frame.rename(index=human_label, columns=human_label)
    shown.index.name, shown.columns.name = human_label(frame.index.name), human_label(frame.columns.name)
    return shown.round(digits)


def mask_outlines(fig: plt.Figure, masks: np.ndarray, color: str = "white") -> plt.Figure:
    """Outline ``masks`` (R, C, H, W) bool on the map panels of a :func:`heatmap_grid` figure (empty
    masks draw nothing): where the map should be, beside where it is."""
    r, c = masks.shape[:2]
    axes = np.asarray(fig.axes).reshape(r, c + 1)
    for i in range(r):
        for j in range(c):
            if masks[i, j].any():
                axes[i, j + 1].contour(masks[i, j].astype(float), levels=[0.5], colors=color, linewidths=0.8)
    return fig
