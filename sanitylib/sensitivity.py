"""Weight-noise sensitivity: how fast do saliency maps change as noise is added to the weights?

The extension of the course report (Gaussian noise on the weights), done with replicates:

* :func:`noise_sensitivity` adds zero-mean Gaussian noise (or multiplicative noise) to the
  weights and biases, cascading from the logits down, for every ``sigma`` (absolute, or relative
  to each parameter tensor's standard deviation) and several independent noise draws, and
  returns one tidy table (the columns of :func:`sanitylib.cascading_randomization` plus
  ``sigma, relative, kind, draw``).  Within a draw the stochastic methods use common random
  numbers: the trained and the noisy model see the same SmoothGrad noise.
* :func:`same_model_floor`: what the stochastic methods score against *themselves* with
  independent noise draws (the report's unseeded setting), i.e. how low a curve can fall without
  any change in the weights.
* :func:`floor_by_samples`: that floor as a function of a stochastic method's sample count
  (e.g. IG-SmoothGrad at the course report's 25 samples of 50-step IG).
* :func:`sensitivity_summary`: per method and ``sigma``, the area under the similarity curve
  (mean similarity over the stages; lower = more sensitive), the similarity once every layer is
  noisy, and the curve's shape (mean second difference: < 0 concave, > 0 convex), each with a
  bootstrap confidence interval over (image, draw) units.
* :func:`sigma_half`: the ``sigma`` at which the fully-noisy similarity falls to one half.

The course report's conclusions are checked on a summary by the chapter layer
(:data:`sanitylib.book.NOISE_CLAIMS`, :func:`sanitylib.book.evaluate_claims`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from torch import Tensor, nn
from tqdm import tqdm

from .attribution import check_seed, derive_seed
from .experiment import explain_methods, run_randomization
from .metrics import similarity
from .randomize import Perturbation
from .result import NOISE_RUN_COLUMNS, check_one_run, stage_order
from .registry import (check_map_size, metric_identity, metric_names, resolve_methods,
                       resolve_metrics)
from .spec import _is_int

__all__ = ["noise_sensitivity", "same_model_floor", "floor_by_samples", "unit_curves", "sensitivity_summary",
           "sigma_half", "bootstrap_ci"]  # fmt: skip

UNIT = ["image", "draw"]


def noise_sensitivity(model: nn.Module, x: Tensor, methods: Sequence[str],
                      sigmas: Sequence[float], *, relative: bool = False, kind: str = "gaussian",
                      draws: int = 3, seed: int = 0,
                      metrics: Sequence[str] = ("spearman", "spearman_abs"),
                      method_options: dict[str, dict] | None = None, blocks=None,
                      target: str = "current", image_names: Sequence[str] | None = None,
                      cache=True, progress: bool = True, label: str | None = None,
                      ) -> pd.DataFrame:  # fmt: skip
    """Cascading weight noise for every ``sigma`` and ``draws`` independent noise draws.

    Args:
        model: trained classifier (restored bit-exactly afterwards).
        x: ``(N, C, H, W)`` inputs.
        methods: saliency methods.
        sigmas: noise levels (standard deviations; relative to each parameter tensor's std if
            ``relative``).
        kind: ``"gaussian"`` (``w + N(0, sigma^2)``) or ``"multiplicative"``
            (``w * (1 + N(0, sigma^2))``).
        draws: independent noise draws per sigma (draw ``d`` uses seed
            ``derive_seed(seed, "draw", d)`` for the weights and the methods' noise).
        metrics, method_options, blocks, target, image_names, cache, label: as in
            :func:`sanitylib.cascading_randomization`.

    Returns:
        The tidy tables of every run, concatenated, with columns ``sigma, relative, kind,
        draw`` added; ``df.attrs["stages"]`` holds the stage order.
    """
    sigmas = _positive_levels(sigmas)
    check_seed(seed)  # -1 and 1.5 went into derive_seed; same_model_floor refused them
    if not _is_int(draws) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if kind not in ("gaussian", "multiplicative"):
        raise ValueError(f"kind must be 'gaussian' or 'multiplicative', got {kind!r}")
    tables = []
    runs = [(s, d) for s in sigmas for d in range(draws)]
    for sigma, d in tqdm(runs, desc=f"weight noise ({kind}{', relative' if relative else ''})",
                         unit="run", disable=not progress):  # fmt: skip
        pert = Perturbation(kind, sigma=float(sigma), relative=relative)
        df = run_randomization(model, x, methods, "cascading", blocks, metrics,
                               seed=derive_seed(seed, "draw", d), perturbation=pert,
                               target=target, method_options=method_options,
                               image_names=image_names, store_maps=0, cache=cache,
                               progress=False, label=label)  # fmt: skip
        stages = df.stages
        tables.append(df.assign(sigma=float(sigma), relative=relative, kind=kind, draw=d))
    out = pd.concat(tables, ignore_index=True)
    out.attrs["stages"] = stages
    return out


def _positive_levels(sigmas) -> list[float]:
    """``sigmas`` (a list, tuple, numpy array, ...) as floats, each finite and positive;
    ``ValueError`` naming ``sigmas`` otherwise."""
    def level(v) -> float | None:
        if isinstance(v, (bool, str, bytes)):
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if 0 < f < math.inf else None

    try:
        vals = None if isinstance(sigmas, (str, bytes)) else [level(v) for v in sigmas]
    except TypeError:  # not iterable
        vals = None
    if not vals or any(v is None for v in vals):
        raise ValueError(f"sigmas must be a non-empty list of finite positive numbers, got {sigmas!r}")
    if len(set(vals)) != len(vals):  # each level's rows twice, averaged as if independent
        raise ValueError(f"sigmas must be distinct, got {sigmas!r}")
    return vals


def same_model_floor(model: nn.Module, x: Tensor, methods: Sequence[str], *,
                     metrics: Sequence[str] = ("spearman", "spearman_abs"), draws: int = 3,
                     seed: int = 0, method_options: dict[str, dict] | None = None,
                     progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """Similarity of each method's maps on the *same* model under independent noise draws.

    Every pair of the ``draws`` seeds ``derive_seed(seed, "draw", d)`` is compared, per image:
    deterministic methods score exactly 1; SmoothGrad, VarGrad and IG-SmoothGrad score what
    unseeded noise alone costs.  Columns ``method, metric, image, pair, value``.
    """
    if not _is_int(draws) or draws < 2:
        raise ValueError(f"draws must be an int: the same-model floor needs at least 2 draws "
                         f"(it compares pairs of them), got {draws!r}")  # fmt: skip
    check_seed(seed)
    specs = resolve_methods(methods)  # a name alone is a list of one; unknown names refused
    fns = resolve_metrics(metrics)  # before any work, as the methods' options (explain_methods)
    check_map_size(fns, x)
    maps = [explain_methods(model, x, methods, method_options, seed=derive_seed(seed, "draw", d),
                            progress=progress) for d in range(draws)]  # fmt: skip
    rows = []
    pairs = [(i, j) for i in range(draws) for j in range(i + 1, draws)]
    for p, (i, j) in enumerate(pairs):
        for m in (sp.name for sp in specs):  # the maps are keyed by name (callables too)
            for metric in fns:
                vals = similarity(maps[i][m], maps[j][m], metric).tolist()
                rows += [{"method": m, "metric": metric.name, "image": k, "pair": p,
                          "value": float(v)} for k, v in enumerate(vals)]  # fmt: skip
    return pd.DataFrame(rows)


def floor_by_samples(model: nn.Module, x: Tensor, method: str, sample_counts: Sequence[int], *,
                     options: dict | None = None, metrics: Sequence[str] = ("spearman",),
                     draws: int = 2, seed: int = 0, progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """The same-model floor (:func:`same_model_floor`) of one stochastic ``method`` for every
    number of noise samples in ``sample_counts``; ``options`` are its other settings (e.g.
    ``{"n_steps": 50}`` for IG-SmoothGrad).

    Returns:
        Columns ``n_samples, method, metric, image, pair, value`` (one row per image and pair of
        draws).
    """
    counts = list(sample_counts)
    if not counts or not all(_is_int(n) and n >= 1 for n in counts):  # 2.9 ran 2, True ran 1
        raise ValueError(f"sample_counts must be positive integers, got {counts}")
    counts = [int(n) for n in counts]
    if options and "n_samples" in options:
        raise ValueError("options must not set n_samples: it is taken from sample_counts")
    out = []
    for n in tqdm(counts, disable=not progress, desc=f"{method} floor by sample count"):
        opts = {method: {**(options or {}), "n_samples": n}}
        fl = same_model_floor(model, x, [method], metrics=metrics, draws=draws, seed=seed,
                              method_options=opts)  # fmt: skip
        out.append(fl.assign(n_samples=n))
    df = pd.concat(out, ignore_index=True)
    return df[["n_samples", *[c for c in df.columns if c != "n_samples"]]]


def unit_curves(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One similarity curve per (method, sigma, image, draw): a wide table with the stages as
    columns, preceded by the trained model's value (column ``"original"``: 1 for the built-in
    metrics, NaN for a user's, whose value for identical maps is unknown).

    A table of several runs (models, noise kinds, absolute and relative sigmas: ``pd.concat`` of
    :func:`noise_sensitivity` tables) is refused: their curves were averaged together."""
    check_one_run(df, "unit_curves", NOISE_RUN_COLUMNS)
    stages = stage_order(df)
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise ValueError(f"no rows for metric {metric!r}")
    index = ["method", "sigma", *UNIT]
    dup = sub.duplicated([*index, "stage"])
    if dup.any():
        raise ValueError(f"df has {int(dup.sum())} repeated (method, sigma, image, draw, stage) "
                         "rows: it combines runs that unit_curves would average together")
    wide = sub.pivot(index=index, columns="stage", values="value")
    wide = wide.reindex(columns=stages)
    wide.insert(0, "original", metric_identity(metric))
    return wide


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of ``values`` (resampled with a seeded
    generator); NaN without at least 2 values (one value gave an interval of width 0)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def sensitivity_summary(df: pd.DataFrame, metric: str = "spearman", *, n_boot: int = 2000,
                        level: float = 0.95, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Per (method, sigma): ``auc`` (mean similarity over the noisy stages: the normalized area
    under the curve; lower = more sensitive), ``final`` (similarity with every layer noisy) and
    ``curvature`` (mean second difference of the curve including the trained model's 1.0:
    negative = concave, positive = convex), each with a bootstrap interval over the
    (image, draw) units, and ``shape`` (``"concave"``/``"convex"`` when the interval excludes 0,
    else ``"neither"``); ``rank`` orders the methods per sigma from most (1) to least sensitive
    by ``auc``.

    The interval resamples (image, draw) units as if independent: the images of one draw share
    its noisy weights, so it is conditional on the draws, and too narrow where the draws differ
    much (a user probe measured 2 of 12 intervals covering the mean over other seeds on a tiny
    random CNN; on the book's MNIST models, 9 or 10 of 10 (MLP) and 8 of 8 (CNN)).  Fewer than 2 units give NaN intervals
    and ``shape`` ``"neither"``.  Built-in metrics only: the ranking reads higher as more
    similar, which a user's metric (e.g. a distance) need not be."""
    if metric_identity(metric) != 1.0:
        raise ValueError(f"sensitivity_summary takes a built-in similarity metric ("
                         f"{', '.join(metric_names(builtin=True))}); {metric!r} is not one, and "
                         "its direction (is higher more similar?) is unknown")
    wide = unit_curves(df, metric)
    values = wide.to_numpy(dtype=float)
    per_unit = pd.DataFrame({
        "auc": np.nanmean(values[:, 1:], axis=1),
        "final": values[:, -1],
        "curvature": np.nanmean(np.diff(values, n=2, axis=1), axis=1),
    }, index=wide.index)  # fmt: skip
    rows = []
    for (method, sigma), g in per_unit.groupby(level=["method", "sigma"], sort=False):
        row = {"method": method, "sigma": float(sigma), "n": len(g)}
        for col in ("auc", "final", "curvature"):
            lo, hi = bootstrap_ci(g[col].to_numpy(), n_boot=n_boot, level=level,
                                  seed=derive_seed(seed, method, sigma, col) % 2**32)  # fmt: skip
            row.update({col: float(g[col].mean()), f"{col}_lo": lo, f"{col}_hi": hi})
        row["shape"] = ("concave" if row["curvature_hi"] < 0 else
                        "convex" if row["curvature_lo"] > 0 else "neither")  # fmt: skip
        rows.append(row)
    out = pd.DataFrame(rows)
    out["rank"] = out.groupby("sigma")["auc"].rank(method="min").astype(int)
    return out.sort_values(["sigma", "rank"]).reset_index(drop=True)


def sigma_half(summary: pd.DataFrame, column: str = "final", level: float = 0.5) -> pd.Series:
    """Per method, the smallest ``sigma`` at which ``summary[column]`` falls to ``level``, by
    linear interpolation between the measured sigmas (NaN if it never does, the smallest sigma
    if it is already below)."""
    out = {}
    for method, g in summary.sort_values("sigma").groupby("method", sort=False):
        s, v = g["sigma"].to_numpy(float), g[column].to_numpy(float)
        below = np.nonzero(v <= level)[0]
        if below.size == 0:
            out[method] = math.nan
        elif below[0] == 0:
            out[method] = float(s[0])
        else:
            k = below[0]
            t = (v[k - 1] - level) / (v[k - 1] - v[k])
            out[method] = float(s[k - 1] + t * (s[k] - s[k - 1]))
    return pd.Series(out, name=f"sigma_half_{column}")
