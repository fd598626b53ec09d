"""Figures: map grids (absolute and diverging) and similarity curves.

Every function returns a :class:`matplotlib.figure.Figure` and never calls ``plt.show()``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from .postprocess import abs_normalize, diverging_normalize

__all__ = ["METHOD_LABELS", "METRIC_LABELS", "use_book_style", "to_display", "method_grid",
           "stage_grid", "similarity_curves"]  # fmt: skip

METHOD_LABELS = {
    "gradient": "Gradient", "input_x_gradient": "Gradient⊙Input",
    "integrated_gradients": "Integrated Gradients", "smoothgrad": "SmoothGrad",
    "vargrad": "VarGrad", "ig_smoothgrad": "IG-SmoothGrad", "guided_backprop": "Guided BackProp",
    "gradcam": "GradCAM", "guided_gradcam": "Guided GradCAM", "edge_detector": "Edge detector",
}  # fmt: skip
METRIC_LABELS = {
    "spearman_abs": "Spearman (absolute)", "spearman": "Spearman (no absolute value)",
    "ssim": "SSIM", "hog_spearman": "HOG (Spearman)", "hog_pearson": "HOG (Pearson)",
}  # fmt: skip
_COLORS = dict(zip(METHOD_LABELS, plt.get_cmap("tab10").colors))


def use_book_style() -> None:
    """Readable defaults for the book's figures."""
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "font.size": 9,
                         "axes.titlesize": 9, "axes.spines.top": False,
                         "axes.spines.right": False})  # fmt: skip


def to_display(maps: Tensor, visualization: str) -> np.ndarray:
    """``(N, C, H, W)`` raw maps -> ``(N, H, W)`` images for display: ``"abs"`` in [0, 1]
    (paper's absolute normalization), ``"diverging"`` in [-1, 1] (0 = no attribution)."""
    maps = maps.float()
    if visualization == "abs":
        return abs_normalize(maps).cpu().numpy()
    if visualization == "diverging":
        d = diverging_normalize(maps)
        d = d if maps.shape[1] == 1 else 2 * d - 1  # 3-channel version lives in [0, 1]
        return d.clamp(-1, 1).cpu().numpy()
    raise ValueError(f"visualization must be 'abs' or 'diverging', got {visualization!r}")


def _show(ax, img: np.ndarray, visualization: str) -> None:
    if visualization == "abs":
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def method_grid(images: np.ndarray, maps: Mapping[str, Tensor], visualization: str = "abs",
                row_labels: Sequence[str] | None = None, title: str | None = None,
                size: float = 1.35) -> Figure:  # fmt: skip
    """Rows = images, columns = the input then one map per method (paper Fig. 1).

    Args:
        images: ``(N, H, W, 3)`` uint8 images (e.g. ``ImageBatch.images``).
        maps: method -> ``(N, C, H, W)`` raw maps.
        visualization: ``"abs"`` (grey) or ``"diverging"`` (red positive, blue negative).
    """
    methods = list(maps)
    n = len(images)
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(size * (len(methods) + 1), size * n + 0.4),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    shown = {m: to_display(maps[m], visualization) for m in methods}
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i])
        for j, m in enumerate(methods):
            _show(axes[i, j + 1], shown[m][i], visualization)
    axes[0, 0].set_title("Input")
    for j, m in enumerate(methods):
        axes[0, j + 1].set_title(METHOD_LABELS.get(m, m))
    if title:
        fig.suptitle(title)
    return fig


def stage_grid(store, image: int, methods: Sequence[str], visualization: str = "abs",
               picture: np.ndarray | None = None, title: str | None = None,
               size: float = 1.1) -> Figure:  # fmt: skip
    """Rows = methods, columns = the trained model then each randomization stage, for one
    image (paper Fig. 2).  ``store`` is ``df.attrs["maps"]`` of a randomization run."""
    if image not in store.images:
        raise ValueError(f"maps of image {image} were not stored; stored: {store.images}")
    k = store.images.index(image)
    stages = list(store.stages)
    cols = len(stages) + (picture is not None)
    fig, axes = plt.subplots(len(methods), cols, figsize=(size * cols, size * len(methods) + 0.5),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    for r, m in enumerate(methods):
        off = 0
        if picture is not None:
            axes[r, 0].imshow(picture)
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            off = 1
        for c, s in enumerate(stages):
            _show(axes[r, c + off], to_display(store[s][m][k : k + 1], visualization)[0], visualization)
            if r == 0:
                axes[0, c + off].set_title(s, rotation=45, fontsize=7)
        axes[r, 0].set_ylabel(METHOD_LABELS.get(m, m), rotation=0, ha="right", fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def similarity_curves(df: pd.DataFrame, metrics: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None, title: str | None = None,
                      floor: Mapping[str, float] | None = None) -> Figure:  # fmt: skip
    """Mean +- population std over images of each metric against the randomization stage, one
    panel per metric, one line per method, with the trained model as a first point at 1.0 and a
    dashed line where randomization starts (paper Figs. 4-5).  ``floor`` maps a metric to a
    noise-floor value drawn as a grey band."""
    metrics = list(metrics or df["metric"].unique())
    methods = list(methods or df["method"].unique())
    stages = df.attrs.get("stages") or list(dict.fromkeys(df.sort_values("stage_index")["stage"]))
    x = np.arange(len(stages) + 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for ax, metric in zip(axes[0], metrics):
        sub = df[df["metric"] == metric]
        for m in methods:
            g = sub[sub["method"] == m].groupby("stage")["value"]
            mean = np.r_[1.0, g.mean().reindex(stages).to_numpy()]
            std = np.r_[0.0, g.std(ddof=0).reindex(stages).to_numpy()]
            color = _COLORS.get(m)
            ax.plot(x, mean, marker="o", ms=3, lw=1.4, color=color, label=METHOD_LABELS.get(m, m))
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        if floor and metric in floor:
            ax.axhspan(floor[metric] - 0.02, floor[metric] + 0.02, color="0.6", alpha=0.3, lw=0)
        ax.axvline(0.5, ls="--", color="0.4", lw=1)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(["original", *stages], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-0.5 if metric in ("spearman", "hog_pearson", "hog_spearman") else -0.1, 1.05)
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.set_xlabel("randomized from the top down to")
    axes[0, 0].set_ylabel("similarity to the trained model's map")
    axes[0, -1].legend(fontsize=7, loc="lower left", frameon=False)
    if title:
        fig.suptitle(title)
    return fig
