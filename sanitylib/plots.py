"""Figures: map grids (absolute and diverging) and similarity curves.

Every function returns a :class:`matplotlib.figure.Figure` and never calls ``plt.show()``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from torch import Tensor

from . import attribution as _attribution  # noqa: F401  (registers the built-in methods)
from . import metrics as _metrics  # noqa: F401  (registers the built-in metrics)
from . import registry
from .postprocess import abs_normalize, diverging_normalize
from .result import RUN_COLUMNS, check_one_run, stage_order

__all__ = ["METHOD_LABELS", "METRIC_LABELS", "use_book_style", "to_display", "method_grid",
           "stage_grid", "pick_stages", "similarity_curves", "similarity_panels", "stage_heatmap",
           "abs_vs_diverging_grid", "paired_method_grid", "similarity_bars",
           "training_curves", "activation_heatmap", "DIVERGING_CMAP"]  # fmt: skip

#: ``{method: label}`` and ``{metric: label}`` views of the registries (users' methods and
#: metrics included); a name that is not registered is its own label.
METHOD_LABELS = registry.METHOD_LABELS
METRIC_LABELS = registry.METRIC_LABELS
# the paper's methods take tab10 (in registration order), the transformer methods Dark2
_COLORS = dict(zip(registry.method_names(builtin=True),
                   [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]))
#: users' methods take these, in the order a figure lists them (matplotlib's default cycle
#: would give the first one the Gradient's blue)
_USER_COLORS = plt.get_cmap("tab20b").colors


def _method_colors(methods: Sequence[str]) -> dict:
    """A colour per method of a figure: the built-ins' own, distinct ones for users' methods."""
    out, k = {}, 0
    for m in methods:
        if m in _COLORS:
            out[m] = _COLORS[m]
        else:
            out[m] = _USER_COLORS[(4 * k + k // 5 + 2) % len(_USER_COLORS)]  # 5 hues, then shades
            k += 1
    return out

#: The diverging colormap of signed maps and signed tables (negative blue, 0 white, positive
#: red).  Matplotlib's ``RdBu_r`` ends in near-black dark red and dark blue, which are hard to
#: tell apart in small thumbnails; here both ends stay bright (relative luminance about 0.1 and
#: 0.15) and of clearly different hue, with white in the middle.  Not registered with matplotlib
#: (no process-global change): pass it as ``cmap=DIVERGING_CMAP``.
DIVERGING_CMAP = LinearSegmentedColormap.from_list(
    "sanitylib_diverging", ["#1f4fd1", "#8fa9e8", "#ffffff", "#f0988f", "#d7301f"])


def _names(methods) -> list[str]:
    """Method names of a list of names, callables, captum classes or specs."""
    if methods is None:
        return None
    return [m if isinstance(m, str) else registry.resolve_method(m).name for m in methods]


def _selection(df: pd.DataFrame, metrics, methods, *, metric_arg: str = "metrics") -> tuple:
    """The metrics and methods a figure draws: those given, checked against the table (a name
    the table lacks would draw an empty panel or an all-NaN line), else the table's own."""
    if not isinstance(df, pd.DataFrame) or not {"metric", "method", "value"} <= set(df.columns):
        raise ValueError("df must be a table of sanitylib's runners (columns 'metric', 'method' "
                         f"and 'value'), got {type(df).__name__}")
    if not len(df):
        raise ValueError("df is empty: there is nothing to draw")
    out = []
    for arg, col, given in ((metric_arg, "metric", metrics), ("methods", "method", methods)):
        have = list(dict.fromkeys(df[col]))
        if given is None:
            out.append(have)
            continue
        given = [given] if isinstance(given, str) else list(given)
        if not given:
            raise ValueError(f"{arg} is empty: name at least one of {have}")
        missing = [g for g in given if g not in set(have)]
        if missing:
            raise ValueError(f"{arg}: {missing} not in the table, which has {have}")
        out.append(given)
    return tuple(out)


def _luminance(rgba) -> float:
    """WCAG relative luminance of an sRGB colour (0 black, 1 white)."""
    c = np.asarray(rgba[:3], dtype=float)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


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
        ax.imshow(img, cmap=DIVERGING_CMAP, vmin=-1, vmax=1)
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


def pick_stages(store_or_stages, n: int = 7) -> list[str]:
    """``n`` randomization stages spread evenly from the first to the last (the trained model,
    ``"original"``, left out), for a grid that fits a page: e.g. the figure of a chapter."""
    names = [s for s in (store_or_stages.stages if hasattr(store_or_stages, "stages")
                         else store_or_stages) if s != "original"]  # fmt: skip
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n >= len(names):
        return names
    idx = np.unique(np.linspace(0, len(names) - 1, n).round().astype(int))
    return [names[i] for i in idx]


def stage_grid(store, image: int, methods: Sequence[str], visualization: str = "abs",
               picture: np.ndarray | None = None, title: str | None = None,
               size: float = 1.1, stages: Sequence[str] | None = None) -> Figure:  # fmt: skip
    """Rows = methods, columns = the trained model then each randomization stage, for one
    image (paper Fig. 2).  ``store`` is ``df.maps`` of a randomization run.

    ``stages``: the stages to show, in this order (default: every stored stage; the trained
    model ``"original"`` is always first).  :func:`pick_stages` chooses a few spread evenly.
    """
    methods = _names(methods)
    if image not in store.images:
        raise ValueError(f"maps of image {image} were not stored; stored: {store.images}")
    k = store.images.index(image)
    if stages is None:
        stages = list(store.stages)
    else:
        unknown = [s for s in stages if s not in store]
        if unknown:
            raise ValueError(f"stages: {unknown} were not stored; stored: {list(store.stages)}")
        stages = ["original"] * ("original" in store) + [s for s in stages if s != "original"]
    cols = len(stages) + (picture is not None)
    fig, axes = plt.subplots(len(methods), cols, figsize=(size * cols, size * len(methods) + 0.5),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    small = 7 if cols > 10 else 9
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
                axes[0, c + off].set_title(s, rotation=45 if cols > 10 else 0, fontsize=small)
        axes[r, 0].set_ylabel(METHOD_LABELS.get(m, m), rotation=0, ha="right", fontsize=small)
    if title:
        fig.suptitle(title)
    return fig


def _stage_axis(df: pd.DataFrame) -> tuple[list[str], str, bool]:
    """Stage names in order, the x-axis label and whether the schedule is cumulative."""
    stages = stage_order(df)
    schedule = df["schedule"].iloc[0] if "schedule" in df and len(df) else "cascading"
    if schedule == "independent":
        return list(stages), "block randomized (alone; the others trained)", False
    if schedule == "cascading":
        return list(stages), "randomized from the top down to", True
    return list(stages), "stage", True


def _floor_stats(floor: pd.DataFrame | Mapping[str, float] | None, metric: str,
                 method: str | None) -> tuple[float, float] | None:  # fmt: skip
    """(mean, std) of a noise floor for one metric (and method; ``None``: random masks)."""
    if floor is None:
        return None
    if not isinstance(floor, pd.DataFrame):  # {metric: value}
        return (float(floor[metric]), 0.0) if metric in floor else None
    key = "random masks" if method is None else method
    v = floor[(floor["metric"] == metric) & (floor["method"] == key)]["value"]
    return (float(v.mean()), float(v.std(ddof=0))) if len(v) else None


def _ylim(metric: str, *values) -> tuple[float, float]:
    """The y-range of a similarity panel: the metric's usual range, widened to hold every
    finite value of ``values`` (arrays), so that no point or band is drawn off the axes."""
    lo, hi = (-0.5 if metric in ("spearman", "hog_pearson", "hog_spearman") else -0.1), 1.05
    v = np.concatenate([np.ravel(np.asarray(a, dtype=float)) for a in values] or [np.empty(0)])
    v = v[np.isfinite(v)]
    if v.size:
        pad = 0.05 * max(hi - lo, float(v.max() - v.min()))
        lo, hi = min(lo, float(v.min()) - pad), max(hi, float(v.max()) + pad)
    return lo, hi


def similarity_curves(df: pd.DataFrame, metrics: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None, title: str | None = None,
                      floor: pd.DataFrame | Mapping[str, float] | None = None) -> Figure:  # fmt: skip
    """Mean +- population std over images of each metric against the randomization stage, one
    panel per metric, one line per method, with the trained model as a first point at 1.0 and a
    dashed line where randomization starts (paper Figs. 4-5).  Independent randomization is not
    a trend: its blocks are drawn as separate points (mean, with error bars; methods offset
    sideways), not joined by lines.

    ``floor``: the table of :func:`sanitylib.metrics.noise_floor` (the random-mask floor is drawn
    as a grey band, mean +- std; per-method floors are in :func:`similarity_panels`), or a dict
    metric -> value.
    """
    metrics, methods = _selection(df, metrics, _names(methods))
    check_one_run(df, "a figure of similarity against the stage")
    stages, xlabel, cumulative = _stage_axis(df)
    x = np.arange(len(stages) + 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.5), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    colors = _method_colors(methods)
    for ax, metric in zip(axes[0], metrics):
        sub = df[df["metric"] == metric]
        drawn = []
        for j, m in enumerate(methods):
            g = sub[sub["method"] == m].groupby("stage")["value"]
            mean = np.r_[registry.metric_identity(metric), g.mean().reindex(stages).to_numpy()]
            std = np.r_[0.0, g.std(ddof=0).reindex(stages).to_numpy()]
            drawn += [mean - std, mean + std]
            color = colors[m]
            label = METHOD_LABELS.get(m, m)
            if cumulative:
                ax.plot(x, mean, marker="o", ms=3, lw=1.4, color=color, label=label)
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, lw=0)
            else:  # one point per block, no line: the blocks are not an ordered dose
                dx = (j - (len(methods) - 1) / 2) * min(0.08, 0.7 / max(len(methods), 1))
                ax.errorbar(x + dx, mean, yerr=std, fmt="o", ms=3, lw=0.8, capsize=0,
                            color=color, label=label)
        fl = _floor_stats(floor, metric, None)
        if fl is not None:
            half = max(fl[1], 0.01)
            ax.axhspan(fl[0] - half, fl[0] + half, color="0.55", alpha=0.3, lw=0,
                       label="random masks (noise floor)")
        ax.axvline(0.5, ls="--", color="0.4", lw=1)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(["original", *stages], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(*_ylim(metric, *drawn))
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel("similarity to the trained model's map")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def similarity_panels(df: pd.DataFrame, floor: pd.DataFrame, metrics: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None, title: str | None = None,
                      size: tuple[float, float] = (2.3, 1.45)) -> Figure:  # fmt: skip
    """Small multiples, rows = methods, columns = metrics: each curve (mean +- std over images)
    with its own noise floors: the method's maps of two *different* images under the trained
    model (coloured band, mean +- std over pairs) and two random masks (grey dashed line).
    A curve inside its coloured band means "as dissimilar as unrelated maps"."""
    metrics, methods = _selection(df, metrics, _names(methods))
    check_one_run(df, "a figure of similarity against the stage")
    stages, xlabel, cumulative = _stage_axis(df)
    x = np.arange(len(stages) + 1)
    fig, axes = plt.subplots(len(methods), len(metrics), squeeze=False, sharex=True,
                             figsize=(size[0] * len(metrics) + 0.8, size[1] * len(methods) + 0.9),
                             constrained_layout=True)  # fmt: skip
    colors = _method_colors(methods)
    for r, m in enumerate(methods):
        color = colors[m]
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            g = df[(df["metric"] == metric) & (df["method"] == m)].groupby("stage")["value"]
            mean = np.r_[registry.metric_identity(metric), g.mean().reindex(stages).to_numpy()]
            std = np.r_[0.0, g.std(ddof=0).reindex(stages).to_numpy()]
            if cumulative:
                ax.plot(x, mean, marker="o", ms=2, lw=1.2, color=color)
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
            else:  # independent randomization: separate blocks, separate points
                ax.errorbar(x, mean, yerr=std, fmt="o", ms=2.5, lw=0.8, capsize=0, color=color)
            own = _floor_stats(floor, metric, m)
            if own is not None:
                half = max(own[1], 0.01)
                ax.axhspan(own[0] - half, own[0] + half, color=color, alpha=0.25, lw=0)
            masks = _floor_stats(floor, metric, None)
            if masks is not None:
                ax.axhline(masks[0], color="0.35", ls="--", lw=0.8)
            ax.axvline(0.5, ls=":", color="0.5", lw=0.8)
            ax.set_ylim(*_ylim(metric, mean - std, mean + std))
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=8)
            if c == 0:
                ax.set_ylabel(METHOD_LABELS.get(m, m), fontsize=8)
            if r == len(methods) - 1:
                ax.set_xticks(x)
                ax.set_xticklabels(["original", *stages], rotation=90, fontsize=5)
    fig.supxlabel(f"{xlabel}   (coloured band: two different images; dashed: random masks)",
                  fontsize=8)  # fmt: skip
    if title:
        fig.suptitle(title)
    return fig


def stage_heatmap(df: pd.DataFrame, metric: str, methods: Sequence[str] | None = None,
                  title: str | None = None, annotate: bool = True) -> Figure:  # fmt: skip
    """Methods x stages heatmap of the mean similarity over images for one metric (diverging
    colours, -1 blue to 1 red), annotated with the values; suited to independent
    randomization, where the stages are not ordered by cumulative damage."""
    (metric,), methods = _selection(df, [metric], _names(methods), metric_arg="metric")
    check_one_run(df, "stage_heatmap")
    stages, xlabel, _ = _stage_axis(df)
    sub = df[df["metric"] == metric]
    mean = sub.groupby(["method", "stage"])["value"].mean().unstack().reindex(index=methods,
                                                                             columns=stages)
    fig, ax = plt.subplots(figsize=(0.42 * len(stages) + 2.2, 0.36 * len(methods) + 1.4),
                           constrained_layout=True)  # fmt: skip
    im = ax.imshow(mean.to_numpy(dtype=float), cmap=DIVERGING_CMAP, vmin=-1, vmax=1, aspect="auto")
    if annotate:
        for (i, j), v in np.ndenumerate(mean.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if _luminance(DIVERGING_CMAP((v + 1) / 2)) < 0.25
                        else "black")  # fmt: skip
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels([METHOD_LABELS.get(m, m) for m in methods], fontsize=7)
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax, shrink=0.8, label=METRIC_LABELS.get(metric, metric))
    ax.set_title(title or METRIC_LABELS.get(metric, metric))
    return fig


# ----------------------------------------------------------------------------- MNIST chapters


def abs_vs_diverging_grid(store, image: int, methods: Sequence[str],
                          picture: np.ndarray | None = None, title: str | None = None,
                          size: float = 1.1) -> Figure:  # fmt: skip
    """:func:`stage_grid` in the absolute (top) and the diverging (bottom) visualization, one
    above the other so that each panel keeps a readable size at the page's width: rows =
    methods, columns = the input (``picture``), the trained model, then each randomization
    stage.  ``size``: inches per map."""
    methods = _names(methods)
    if image not in store.images:
        raise ValueError(f"maps of image {image} were not stored; stored: {store.images}")
    k = store.images.index(image)
    stages = list(store.stages)
    cols = len(stages) + (picture is not None)
    fig = plt.figure(figsize=(size * cols + 1.6, 2 * (size * len(methods) + 0.5) + 0.4),
                     constrained_layout=True)  # fmt: skip
    for sub, vis in zip(fig.subfigures(2, 1, hspace=0.03), ("abs", "diverging")):
        axes = sub.subplots(len(methods), cols, squeeze=False)
        for r, m in enumerate(methods):
            off = 0
            if picture is not None:
                if r == 0:  # the input once, at the top of its column
                    axes[r, 0].imshow(picture)
                else:  # an empty frame that still carries the method's label
                    axes[r, 0].set_frame_on(False)
                axes[r, 0].set_xticks([])
                axes[r, 0].set_yticks([])
                off = 1
            for c, s in enumerate(stages):
                _show(axes[r, c + off], to_display(store[s][m][k : k + 1], vis)[0], vis)
                if r == 0:
                    axes[0, c + off].set_title(s, rotation=30, fontsize=8)
            axes[r, 0].set_ylabel(METHOD_LABELS.get(m, m), rotation=0, ha="right", fontsize=8)
        sub.suptitle("absolute" if vis == "abs" else "diverging (red +, blue −)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def paired_method_grid(images: np.ndarray, maps_a: Mapping[str, Tensor],
                       maps_b: Mapping[str, Tensor], labels: Sequence[str] = ("A", "B"),
                       visualization: str = "abs", row_names: Sequence[str] | None = None,
                       title: str | None = None, size: float = 1.0) -> Figure:  # fmt: skip
    """Two models' maps of the same images, one above the other: for each image a row with
    model A's maps and a row with model B's (columns = the input, then one per method of
    ``maps_a``); used for the data randomization test (true vs random labels)."""
    methods = list(maps_a)
    missing = [m for m in methods if m not in maps_b]
    if missing:
        raise ValueError(f"maps_b lacks the methods {missing}")
    n = len(images)
    fig, axes = plt.subplots(2 * n, len(methods) + 1, squeeze=False, constrained_layout=True,
                             figsize=(size * (len(methods) + 1) + 0.6, size * 2 * n + 0.5))  # fmt: skip
    shown = [{m: to_display(maps[m], visualization) for m in methods} for maps in (maps_a, maps_b)]
    for i in range(n):
        for j in range(2):
            r = 2 * i + j
            ax = axes[r, 0]
            if j == 0:
                ax.imshow(images[i])
            else:
                ax.axis("off")
            ax.set_xticks([])
            ax.set_yticks([])
            for c, m in enumerate(methods):
                _show(axes[r, c + 1], shown[j][m][i], visualization)
            name = f"{row_names[i]}\n" if row_names is not None and j == 0 else ""
            axes[r, 1].set_ylabel(f"{name}{labels[j]}", fontsize=7, rotation=0, ha="right",
                                  va="center")  # fmt: skip
    axes[0, 0].set_title("Input")
    for c, m in enumerate(methods):
        name = METHOD_LABELS.get(m, m)
        axes[0, c + 1].set_title(name.replace(" ", "\n", 1) if len(name) > 12 else name, fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def similarity_bars(df: pd.DataFrame, metrics: Sequence[str] = ("spearman_abs", "spearman"),
                    methods: Sequence[str] | None = None, panel: str = "model",
                    reference: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                    reference_label: str = "paper", title: str | None = None) -> Figure:  # fmt: skip
    """Bar plot of the mean ± population std over images of each metric per method, one panel
    per value of the column ``panel`` (paper Fig. 6).

    ``reference``: ``{panel value: {method: (one value per metric)}}`` drawn as black markers
    (e.g. the authors' numbers).
    """
    metrics, all_methods = _selection(df, metrics, _names(methods))
    if panel not in df.columns:
        raise ValueError(f"panel: the table has no column {panel!r} (columns: {list(df.columns)})")
    panels = list(dict.fromkeys(df[panel]))
    fig, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True, constrained_layout=True,
                             figsize=(0.55 * len(all_methods) * len(panels) + 1.8, 3.4))  # fmt: skip
    width = 0.8 / len(metrics)
    shades = ["#2b5d8a", "#9ec3e0", "#c97b2a", "#f0c48a"]
    drawn = []
    for ax, p in zip(axes[0], panels):
        sub = df[df[panel] == p]
        check_one_run(sub, f"similarity_bars (panel {p!r})", [c for c in RUN_COLUMNS if c != panel])
        ms = [m for m in all_methods if m in set(sub["method"])]
        x = np.arange(len(ms))
        for j, metric in enumerate(metrics):
            g = sub[sub["metric"] == metric].groupby("method")["value"]
            mean = g.mean().reindex(ms).to_numpy(dtype=float)
            std = g.std(ddof=0).reindex(ms).to_numpy(dtype=float)
            off = (j - (len(metrics) - 1) / 2) * width
            ax.bar(x + off, mean, width, yerr=std, capsize=2, color=shades[j % len(shades)],
                   label=METRIC_LABELS.get(metric, metric), error_kw={"lw": 0.8})  # fmt: skip
            if reference is not None and p in reference:
                ref = [reference[p].get(m, (np.nan,) * len(metrics))[j] for m in ms]
                ax.scatter(x + off, ref, marker="D", s=14, color="black", zorder=3,
                           label=f"{reference_label}" if j == 0 else None)  # fmt: skip
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([METHOD_LABELS.get(m, m) for m in ms], rotation=50, ha="right",
                           fontsize=7)  # fmt: skip
        g = sub[sub["metric"].isin(metrics)].groupby(["metric", "method"])["value"]
        drawn += [g.mean() - g.std(ddof=0), g.mean() + g.std(ddof=0)]
        ax.set_title(str(p))
    axes[0, 0].set_ylim(*_ylim("spearman", *drawn))  # the panels share it
    axes[0, 0].set_ylabel("rank correlation")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                    target: float | None = None, chance: float | None = None,
                    title: str | None = None) -> Figure:  # fmt: skip
    """Running training accuracy (solid: the mean over the epoch's batches, which lags the
    model's accuracy at the end of the epoch), the exact end-of-epoch training accuracy where the
    history has it (crosses), and test accuracy (dashed) per epoch, one colour per model;
    ``histories`` maps a label to the ``history`` of :func:`sanitylib.training.train_mnist_model`.
    Optional horizontal lines mark a target training accuracy and the chance level."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2), constrained_layout=True)
    for k, (label, hist) in enumerate(histories.items()):
        color = plt.get_cmap("tab10").colors[k % 10]
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["running_train_accuracy"] for h in hist], color=color, lw=1.4,
                label=f"{label}: train")  # fmt: skip
        ax.plot(ep, [h["test_accuracy"] for h in hist], color=color, lw=1.2, ls="--",
                label=f"{label}: test")  # fmt: skip
        # the exact training accuracy at the end of an epoch, where it was measured (what a
        # stopping rule uses; the running mean lags it)
        exact = [(h["epoch"], h["train_accuracy"]) for h in hist if h.get("train_accuracy") is not None]
        if exact:
            ax.plot(*zip(*exact), color=color, ls="none", marker="x", ms=6,
                    label=f"{label}: train, end of epoch")  # fmt: skip
    if target is not None:
        ax.axhline(target, color="0.4", lw=0.8, ls=":")
    if chance is not None:
        ax.axhline(chance, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    if title:
        ax.set_title(title)
    return fig


def sensitivity_curves(df: pd.DataFrame, metric: str = "spearman",
                       methods: Sequence[str] | None = None,
                       floor: pd.DataFrame | None = None, title: str | None = None,
                       size: tuple[float, float] = (3.0, 2.8)) -> Figure:  # fmt: skip
    """Weight-noise curves (:func:`sanitylib.sensitivity.noise_sensitivity`): one panel per
    sigma, one line per method, mean over (image, draw) units with a 95 % confidence band
    (normal approximation, +-1.96 standard errors).  ``floor`` (the table of
    :func:`sanitylib.sensitivity.same_model_floor`) adds each stochastic method's same-model
    floor as a dashed line: what independent noise draws alone score."""
    (metric,), methods = _selection(df, [metric], _names(methods), metric_arg="metric")
    from .sensitivity import unit_curves

    wide = unit_curves(df, metric)
    methods = [m for m in methods if m in set(wide.index.get_level_values("method"))]
    sigmas = sorted(wide.index.get_level_values("sigma").unique())
    relative = bool(df["relative"].iloc[0]) if "relative" in df else False
    kind = str(df["kind"].iloc[0]) if "kind" in df else "gaussian"
    x = np.arange(wide.shape[1])
    fig, axes = plt.subplots(1, len(sigmas), figsize=(size[0] * len(sigmas) + 1.6, size[1]),
                             squeeze=False, sharey=True, constrained_layout=True)  # fmt: skip
    colors = _method_colors(methods)
    lines = []
    for ax, sigma in zip(axes[0], sigmas):
        for m in methods:
            v = wide.xs((m, sigma), level=("method", "sigma")).to_numpy(dtype=float)
            mean = np.nanmean(v, 0)
            half = 1.96 * np.nanstd(v, 0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0 * mean
            color = colors[m]
            ax.plot(x, mean, marker="o", ms=3, lw=1.4, color=color, label=METHOD_LABELS.get(m, m))
            ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.15, lw=0)
            lines += [mean - half, mean + half]
            if floor is not None:
                fv = floor[(floor["method"] == m) & (floor["metric"] == metric)]["value"]
                if len(fv) and fv.mean() < 0.999:
                    ax.axhline(fv.mean(), color=color, ls="--", lw=1)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(list(wide.columns), rotation=45, ha="right", fontsize=7)
        name = "sigma / std" if relative else "sigma"
        ax.set_title(f"{kind} noise, {name} = {sigma:g}")
        ax.set_xlabel("noise added from the top down to")
    lo, hi = _ylim("spearman_abs", *lines)  # the panels share it; every value on the axes
    axes[0, 0].set_ylim(min(lo, -0.2), hi)
    axes[0, 0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)}\nto the trained model's map")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if floor is not None:
        handles.append(plt.Line2D([], [], color="0.3", ls="--", lw=1))
        labels.append("same model, other noise draw")
    axes[0, -1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                       frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title)
    return fig


def sensitivity_forest(summaries: Mapping[str, pd.DataFrame], value: str = "auc",
                       title: str | None = None) -> Figure:  # fmt: skip
    """One panel per setting (e.g. ``"MLP, absolute sigma"``): each method's ``value`` (from
    :func:`sanitylib.sensitivity.sensitivity_summary`) with its bootstrap interval, one marker
    per sigma (darker = larger sigma).  Lower AUC = more sensitive to the weights."""
    labels = list(summaries)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.3 * len(labels), 3.2), squeeze=False,
                             sharex=True, constrained_layout=True)  # fmt: skip
    for ax, lab in zip(axes[0], labels):
        s = summaries[lab]
        methods = list(dict.fromkeys(s.sort_values("auc")["method"]))
        sigmas = sorted(s["sigma"].unique())
        shades = plt.get_cmap("viridis")(np.linspace(0.85, 0.1, len(sigmas)))
        for k, (sigma, shade) in enumerate(zip(sigmas, shades)):
            g = s[s["sigma"] == sigma].set_index("method").reindex(methods)
            y = np.arange(len(methods)) + (k - (len(sigmas) - 1) / 2) * 0.18
            err = np.vstack([g[value] - g[f"{value}_lo"], g[f"{value}_hi"] - g[value]])
            ax.errorbar(g[value], y, xerr=err, fmt="o", ms=3.5, color=shade, lw=1, capsize=2,
                        label=f"{sigma:g}")  # fmt: skip
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels([METHOD_LABELS.get(m, m) for m in methods], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(lab)
        ax.set_xlabel("area under the similarity curve" if value == "auc" else value)
        ax.axvline(0, color="0.8", lw=0.8)
        # below the panel (outside the axes), so that it never covers a point or an interval
        ax.legend(title="sigma", fontsize=6, title_fontsize=6, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2), ncol=len(sigmas), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def activation_heatmap(tables: Mapping[str, pd.DataFrame], span: float = 2.0,
                       title: str | None = None) -> Figure:  # fmt: skip
    """One panel per table of :func:`sanitylib.diagnostics.activation_scales` (e.g.
    ``{"top-down": ..., "bottom-up": ...}``): blocks (rows, in the table's order) x stages
    (columns), coloured by ``log10(ratio)`` of each block's output RMS to the trained model's,
    from ``-span`` (blue, smaller) through 0 (white, the trained scale) to ``span`` (red).

    The stage axis has one tick per stage, labelled with whole numbers: in a cascading schedule
    the number of blocks randomized so far (``stage_index + 1``), otherwise the stage's name.
    """
    if not tables:
        raise ValueError("tables must hold at least one activation_scales table")
    if not span > 0:
        raise ValueError(f"span must be positive, got {span!r}")
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.2), squeeze=False,
                             sharey=True, constrained_layout=True)  # fmt: skip
    im = None
    for ax, (label, act) in zip(axes[0], tables.items()):
        missing = {"stage_index", "stage", "block", "ratio"} - set(act.columns)
        if missing:
            raise ValueError(f"tables[{label!r}] lacks the columns {sorted(missing)} (expected "
                             "a sanitylib.diagnostics.activation_scales table)")
        mat = act.pivot_table(index="block", columns="stage_index", values="ratio", sort=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            im = ax.imshow(np.log10(mat.to_numpy(dtype=float)), cmap=DIVERGING_CMAP,
                           vmin=-span, vmax=span, aspect="auto")  # fmt: skip
        ax.set_yticks(range(len(mat.index)), list(mat.index), fontsize=7)
        cascading = "schedule" not in act.columns or (act["schedule"] == "cascading").all()
        if cascading:
            ticks = [str(int(k) + 1) for k in mat.columns]
            ax.set_xlabel("blocks randomized so far")
            ax.set_xticks(range(len(mat.columns)), ticks, fontsize=7)
        else:
            names = act.drop_duplicates("stage_index").set_index("stage_index")["stage"]
            ax.set_xlabel("randomized block")
            ax.set_xticks(range(len(mat.columns)), [str(names[k]) for k in mat.columns],
                          rotation=60, ha="right", fontsize=7)  # fmt: skip
        ax.set_title(label)
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 (RMS / trained RMS)")
    if title:
        fig.suptitle(title)
    return fig
