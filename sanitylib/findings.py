"""The paper's claims as checkable statements: "paper vs this book" tables.

Each :class:`Claim` names a method, a metric, a window of randomization stages and a criterion
(a threshold, optionally relative to the method's "different images" noise floor).
:func:`evaluate_claims` measures every claim on a run's tidy table and returns one row per claim
with the authors' number, ours, the criterion and whether it holds here.  The chapters print
these tables and the replication tests use the same windows, so the two cannot drift apart.

Windows over the ``K`` stages of a schedule (top block first):

* ``"top"``: cascading, stages ``1 .. ceil(K/4) - 1`` (randomized down to the top quarter,
  leaving out the logits-only stage: Mixed_7c .. Mixed_6e on InceptionV3); independent, the
  top quarter of the blocks, each randomized alone (Logits .. Mixed_7a).
* ``"bottom"``: the last ``ceil(K/4)`` stages (cascading: nearly everything randomized;
  independent: one of the bottom blocks alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

__all__ = ["Claim", "CASCADING_CLAIMS", "INDEPENDENT_CLAIMS", "stage_window", "window_mean",
           "evaluate_claims"]  # fmt: skip

WINDOWS = ("top", "bottom")


@dataclass(frozen=True)
class Claim:
    """One of the paper's statements, with how this book tests it.

    Attributes:
        text: the claim in words.
        method: method name (``sanitylib.METHODS``).
        metric: metric name (``sanitylib.METRICS``).
        window: ``"top"`` or ``"bottom"`` (see the module docstring).
        op: ``">="`` (stays similar) or ``"<="`` (changes).
        threshold: the criterion's threshold.
        relative_to_floor: the threshold is added to the method's mean "different images"
            floor (e.g. "within 0.1 of unrelated maps").
        paper: the authors' numbers (paper-protocol.md section 6), as text.
    """

    text: str
    method: str
    metric: str
    window: str
    op: str
    threshold: float
    relative_to_floor: bool = False
    paper: str = ""

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.op not in (">=", "<="):
            raise ValueError(f"op must be '>=' or '<=', got {self.op!r}")

    def criterion(self) -> str:
        base = "floor + " if self.relative_to_floor else ""
        return f"{self.op} {base}{self.threshold:g}"


CASCADING_CLAIMS: tuple[Claim, ...] = (
    Claim("Guided BackProp stays similar while the top blocks are randomized", "guided_backprop",
          "spearman_abs", "top", ">=", 0.7,
          paper="≈0.99 through Mixed_7a, 0.95 at 6e (8 images)"),
    Claim("Guided GradCAM stays similar while the top blocks are randomized", "guided_gradcam",
          "spearman_abs", "top", ">=", 0.7, paper="0.77 (7c), 0.82 (6d) (1 image)"),
    Claim("Gradient's map changes (signed ranks unrelated)", "gradient", "spearman", "top", "<=",
          0.1, relative_to_floor=True, paper="≈0 from Mixed_7c on (1 image)"),
    Claim("GradCAM changes once its layer's block is randomized", "gradcam", "spearman_abs",
          "top", "<=", 0.5, paper="0.60 at 7c, then noisy 0.6–0.9 (1 image)"),
    Claim("Integrated Gradients looks similar in absolute value", "integrated_gradients",
          "spearman_abs", "top", ">=", 0.5, paper="0.60 (7c), 0.62 (6d) (1 image)"),
    Claim("… but its sign pattern is destroyed", "integrated_gradients", "spearman", "top", "<=",
          0.1, relative_to_floor=True, paper="≈0 from Mixed_7c on (1 image)"),
    Claim("Gradient⊙Input looks similar in absolute value", "input_x_gradient", "spearman_abs",
          "top", ">=", 0.5, paper="0.75 (7c), 0.75 (6d) (1 image)"),
    Claim("… but its sign pattern is destroyed", "input_x_gradient", "spearman", "top", "<=", 0.1,
          relative_to_floor=True, paper="≈0 from Mixed_7c on (1 image)"),
    Claim("Guided BackProp changes once the bottom blocks are randomized", "guided_backprop",
          "spearman_abs", "bottom", "<=", 0.5, paper="0.12 at Conv2d_2a/1a (8 images)"),
)  # fmt: skip

INDEPENDENT_CLAIMS: tuple[Claim, ...] = (
    Claim("Guided BackProp ignores a top block randomized alone", "guided_backprop",
          "spearman_abs", "top", ">=", 0.7,
          paper="qualitative: insensitive to higher layers (§3.2, Fig. 3)"),
    Claim("Gradient's signed map changes with a top block randomized alone", "gradient",
          "spearman", "top", "<=", 0.1, relative_to_floor=True,
          paper="qualitative: sensitive to every layer (§3.2, Fig. 3)"),
    Claim("GradCAM changes with a top block randomized alone", "gradcam", "spearman_abs", "top",
          "<=", 0.5, paper="qualitative: sensitive above its layer (§3.2)"),
    Claim("Guided BackProp changes with a bottom block randomized alone", "guided_backprop",
          "spearman_abs", "bottom", "<=", 0.5,
          paper="qualitative: lower layers change the map (§3.2)"),
)  # fmt: skip


def stage_window(stages: Sequence[str], window: str, schedule: str) -> list[str]:
    """The stage names of ``window`` (``"top"`` or ``"bottom"``) for a schedule's stages."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    k = len(stages)
    if k == 0:
        raise ValueError("no stages")
    q = math.ceil(k / 4)
    if window == "bottom":
        return list(stages[k - q :])
    if schedule == "cascading":
        return list(stages[1:q]) or list(stages[:1])
    return list(stages[:q])


def _stages(df: pd.DataFrame) -> list[str]:
    return df.attrs.get("stages") or list(dict.fromkeys(df.sort_values("stage_index")["stage"]))


def window_mean(df: pd.DataFrame, method: str, metric: str, window: str,
                stages: Sequence[str] | None = None) -> float:  # fmt: skip
    """Mean over images and over the window's stages of one method and metric (``stages``: the
    schedule's full stage list, if ``df`` holds only some of them)."""
    schedule = str(df["schedule"].iloc[0])
    names = stage_window(list(stages or _stages(df)), window, schedule)
    v = df[(df["method"] == method) & (df["metric"] == metric) & df["stage"].isin(names)]["value"]
    if v.empty:
        raise ValueError(f"no rows for method {method!r}, metric {metric!r} in window {names}")
    return float(v.mean())


def evaluate_claims(df: pd.DataFrame, floor: pd.DataFrame | None = None,
                    claims: Sequence[Claim] | None = None,
                    stages: Sequence[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Measure each claim on a run's tidy table (claims whose method or metric did not run are
    left out).

    Args:
        df: table of :func:`sanitylib.cascading_randomization` or
            :func:`sanitylib.independent_randomization`.
        floor: table of :func:`sanitylib.metrics.noise_floor` (needed by floor-relative claims).
        claims: default: :data:`CASCADING_CLAIMS` or :data:`INDEPENDENT_CLAIMS` by schedule.
        stages: the schedule's full stage list, if ``df`` holds only its first stages.

    Returns:
        One row per claim: ``claim, method, metric, stages, paper, this book, floor,
        criterion, holds``.
    """
    schedule = str(df["schedule"].iloc[0])
    if claims is None:
        claims = CASCADING_CLAIMS if schedule == "cascading" else INDEPENDENT_CLAIMS
    stages = list(stages or _stages(df))
    rows = []
    for c in claims:
        if c.method not in set(df["method"]) or c.metric not in set(df["metric"]):
            continue
        value = window_mean(df, c.method, c.metric, c.window, stages)
        fl = math.nan
        if floor is not None:
            sel = floor[(floor["kind"] == "different images") & (floor["method"] == c.method)
                        & (floor["metric"] == c.metric)]["value"]  # fmt: skip
            fl = float(sel.mean()) if len(sel) else math.nan
        if c.relative_to_floor and math.isnan(fl):
            raise ValueError(f"claim {c.text!r} needs the noise floor of {c.method}/{c.metric}")
        limit = c.threshold + (fl if c.relative_to_floor else 0.0)
        holds = value >= limit if c.op == ">=" else value <= limit
        names = stage_window(stages, c.window, schedule)
        rows.append({
            "claim": c.text, "method": c.method, "metric": c.metric,
            "stages": names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}",
            "paper": c.paper, "this book": value, "floor": fl, "criterion": c.criterion(),
            "holds": bool(holds),
        })  # fmt: skip
    return pd.DataFrame(rows)
