"""Chapter 9 (vision transformers): its models, its summary table and its verdict words.

* :func:`train_chapter_models`: the chapter-4 CNN and the vision transformer on the same
  training digits (true labels), and the transformer's random-label twin, with the profile's
  recipes (trained once, then loaded from the checkpoint cache).
* :func:`test_values`: one value per (test, method, image) from the runners' tables: what each
  sanity check measures, on one scale (the absolute Spearman correlation with the reference map;
  high = the map did not change).
* :func:`verdicts` and :func:`verdict_grid`: the summary table "method x test: passes / fails /
  how sure": a method passes a test when its mean similarity is at most
  :data:`~sanitylib.book.claims.CHANGE_THRESHOLD`, and the verdict is *sure* when the whole 95 %
  Student-t interval of the mean over images lies on the same side of the threshold.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from ..data import MnistData
from ..mnist import train_models
from ..result import stage_order
from .claims import CHANGE_THRESHOLD

__all__ = ["TESTS", "train_chapter_models", "test_values", "verdicts", "verdict_grid",
           "vit_recipe"]  # fmt: skip

#: The summary table's tests, in its column order, with what each compares.
TESTS = {
    "head randomized": "cascading: only the classification head randomized",
    "all randomized": "cascading: every block randomized (the last stage)",
    "one block randomized": "independent: each encoder block randomized alone (mean over blocks)",
    "random labels": "data randomization: the true-label vs the random-label model",
    "random class": "random logit: the predicted class vs a random other class",
}


def vit_recipe(cfg):
    """The profile ``cfg`` with its MNIST training fields set to the transformer's recipe
    (``vit_epochs``, ``vit_lr``, ``vit_random_epochs``), for :func:`sanitylib.mnist.train_models`:
    the same optimizer, schedule, batch size and memorization rule as the CNN's."""
    return replace(cfg, mnist_epochs=cfg.vit_epochs, mnist_lr=cfg.vit_lr,
                   mnist_random_epochs=cfg.vit_random_epochs)  # fmt: skip


def train_chapter_models(cfg, data: MnistData, progress: bool = True
                         ) -> tuple[dict[tuple[str, str], nn.Module], MnistData]:  # fmt: skip
    """The chapter's trained models ``{(name, labels): model}``: ``("mnist_cnn", "true")`` (the
    chapter-4 CNN and recipe), ``("mnist_vit", "true")`` on the same digits, and
    ``("mnist_vit", "random")``: the random-label twin (seed ``cfg.seed + 1``, same optimizer
    and schedule, at most ``cfg.vit_random_epochs`` epochs, stopping at ``cfg.mnist_memorize``)
    on the first ``cfg.vit_random_n_train`` digits.

    Returns:
        ``(models, random_data)``: the models and the digits the random-label twin trained on.
    """
    out = dict(train_models(cfg, data, names=("mnist_cnn",), labels=("true",), progress=progress))
    out.update(train_models(vit_recipe(cfg), data, names=("mnist_vit",), labels=("true",),
                            progress=progress))  # fmt: skip
    n = cfg.vit_random_n_train
    random_data = data
    if n is not None and n < len(data.y_train):
        random_data = MnistData(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test,
                                source=f"{data.source} [first {n} training images only]")
    out.update(train_models(vit_recipe(cfg), random_data, names=("mnist_vit",),
                            labels=("random",), progress=progress))  # fmt: skip
    return out, random_data


def _per_image(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    return df[df["metric"] == metric]


def test_values(cascade: pd.DataFrame, independent: pd.DataFrame, data_random: pd.DataFrame,
                random_logit: pd.DataFrame, metric: str = "spearman_abs") -> pd.DataFrame:
    """One similarity per (test, method, image) for the :data:`TESTS`: the cascade's
    ``"head"`` stage and its last stage, the independent run's mean over its encoder-block
    stages (each block randomized alone), the data randomization table, the random-logit table.

    Returns:
        Columns ``test, method, image, value``.
    """
    rows = []
    c = _per_image(cascade, metric)
    stages = stage_order(cascade)
    for test, stage in (("head randomized", stages[0]), ("all randomized", stages[-1])):
        sub = c[c["stage"] == stage]
        rows += [{"test": test, "method": r.method, "image": int(r.image), "value": float(r.value)}
                 for r in sub.itertuples()]  # fmt: skip
    ind = _per_image(independent, metric)
    ind = ind[ind["stage"].str.startswith("encoder_layer")]
    for (method, image), v in ind.groupby(["method", "image"], sort=False)["value"].mean().items():
        rows.append({"test": "one block randomized", "method": method, "image": int(image),
                     "value": float(v)})  # fmt: skip
    for test, df in (("random labels", data_random), ("random class", random_logit)):
        sub = _per_image(df, metric)
        rows += [{"test": test, "method": r.method, "image": int(r.image), "value": float(r.value)}
                 for r in sub.itertuples()]  # fmt: skip
    return pd.DataFrame(rows)


def verdicts(values: pd.DataFrame, threshold: float = CHANGE_THRESHOLD,
             level: float = 0.95) -> pd.DataFrame:  # fmt: skip
    """Per (test, method): the mean similarity over images, its Student-t interval at ``level``
    (``mean ± t s / sqrt(n)``), ``verdict`` (``"passes"``: mean at most ``threshold``, the map
    changed; ``"fails"``) and ``sure`` (the whole interval on the verdict's side of the
    threshold; a test whose every value is identical is sure).

    Raises:
        ValueError: ``level`` outside (0, 1).
    """
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rows = []
    for (test, method), v in values.groupby(["test", "method"], sort=False)["value"]:
        a = v.to_numpy(dtype=float)
        mean, n = float(a.mean()), len(a)
        sd = float(a.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
        if n > 1 and sd == 0:
            half = 0.0
        low, high = mean - half, mean + half
        passes = mean <= threshold
        sure = bool(high <= threshold) if passes else bool(low > threshold)
        rows.append({"test": test, "method": method, "mean": mean, "low": low, "high": high,
                     "n": n, "verdict": "passes" if passes else "fails", "sure": sure})  # fmt: skip
    return pd.DataFrame(rows)


def verdict_grid(table: pd.DataFrame, methods: Sequence[str] | None = None,
                 labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The summary table: one row per method, one column per test (in :data:`TESTS` order),
    each cell ``"passes, sure (0.12 [0.05, 0.19])"``: the verdict, how sure, the mean
    similarity and its interval."""
    def cell(r) -> str:
        how = "sure" if r["sure"] else "unsure"
        interval = f" [{r['low']:.2f}, {r['high']:.2f}]" if np.isfinite(r["low"]) else ""
        return f"{r['verdict']}, {how} ({r['mean']:.2f}{interval})"

    t = table.assign(cell=table.apply(cell, axis=1))
    grid = t.pivot(index="method", columns="test", values="cell")
    order = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    grid = grid.reindex(index=[m for m in order if m in grid.index],
                        columns=[c for c in TESTS if c in grid.columns])
    if labels:
        grid.index = [labels.get(m, m) for m in grid.index]
    grid.index.name = "method"
    return grid
