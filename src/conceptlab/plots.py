"""Figures shared by the chapters: image grids with masks, curves, confusion matrices, heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .world import PARTS, WorldBatch

PART_COLOURS = dict(zip(PARTS, sns.color_palette("bright", len(PARTS))))


def sample_grid(batch: WorldBatch, class_names: Sequence[str], n: int = 12, cols: int = 6,
                show_masks: bool = True) -> plt.Figure:
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
    columns = (([class_names[c] for c in batch.labels], "images per class"),
               ([HABITATS[h] for h in batch.habitats], "habitats"), (batch.caption_styles, "caption styles"))
    for k, (ax, (values, title)) in enumerate(zip(axes, columns)):
        sns.countplot(x=values, ax=ax, color=f"C{k}")
        ax.set_title(title)
    axes[0].tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


def curve(history: Sequence[dict], y: str = "loss", x: str = "step", smooth: int = 20,
          ax: plt.Axes | None = None, label: str | None = None) -> plt.Axes:
    """A training curve with a running mean over ``smooth`` points."""
    df = pd.DataFrame(history)
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    ax.plot(df[x], df[y], alpha=0.25, color="C0" if label is None else None)
    ax.plot(df[x], df[y].rolling(smooth, min_periods=1).mean(), label=label or f"{y} (running mean)")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    return ax


def confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
              ax: plt.Axes | None = None) -> plt.Axes:
    """Row-normalised confusion matrix as a seaborn heatmap."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=range(len(class_names)), normalize="true")
    size = 0.45 * len(class_names) + 2
    ax = ax or plt.subplots(figsize=(size, size * 0.85))[1]
    sns.heatmap(cm, ax=ax, cmap="Blues", vmin=0, vmax=1, xticklabels=class_names, yticklabels=class_names,
                cbar_kws={"label": "share of true class"})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return ax


def heatmap_grid(images: np.ndarray, maps: np.ndarray, row_titles: Sequence[str] | None = None,
                 col_titles: Sequence[str] | None = None, alpha: float = 0.55) -> plt.Figure:
    """Overlay ``maps`` (R, C, h, w) on ``images`` (R, H, W, 3): row = image, column = concept."""
    import torch
    import torch.nn.functional as F

    r, c = maps.shape[:2]
    size = images.shape[1]
    up = F.interpolate(torch.as_tensor(maps, dtype=torch.float32).reshape(r * c, 1, *maps.shape[2:]),
                       size=(size, size), mode="bilinear", align_corners=False).reshape(r, c, size, size).numpy()
    fig, axes = plt.subplots(r, c + 1, figsize=(1.7 * (c + 1), 1.8 * r), squeeze=False)
    for i in range(r):
        axes[i, 0].imshow(images[i])
        for j in range(c):
            axes[i, j + 1].imshow(images[i])
            axes[i, j + 1].imshow(up[i, j], cmap="jet", alpha=alpha)
        if row_titles is not None:
            axes[i, 0].set_title(row_titles[i], fontsize=8)
    if col_titles is not None:
        for j, t in enumerate(col_titles):
            axes[0, j + 1].set_title(t, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
