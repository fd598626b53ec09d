"""A run's result: the tidy table, and the parts that are not rows (maps, floors, activations).

:func:`sanitylib.run_randomization` returns a :class:`ResultTable`: a :class:`pandas.DataFrame`
(one row per stage, method, image and metric; everything pandas does works on it) whose other
parts are attributes: ``table.maps`` (the kept maps, a :class:`MapStore`), ``table.floor`` (the
noise floors), ``table.activations``, ``table.stages``, ``table.order``, ``table.spec`` (the
:class:`sanitylib.RunSpec` that produced it) and ``table.skipped_blocks``.

They survive what users do with tables: filtering (``df[df.method == "gradient"]``, ``.loc``,
``.query``, ``.head``, sorting), ``pd.concat`` of pieces of the same run, and ``merge`` with a
plain table.  A table that combines *different* runs (``pd.concat`` or ``merge`` of two results)
has no single set of maps: reading its ``.maps`` raises an error that says so, instead of
handing back one run's maps for the other's rows.  (``DataFrame.attrs``, which earlier versions
used, is dropped or compared element-wise by several pandas operations.)

A table pickles with its parts (``df.to_pickle``, multiprocessing): the built-in methods and
metrics of its specification by name, a user's callables by reference, as Python pickles
functions (a lambda cannot be pickled).  sanitylib itself never unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd
from torch import Tensor

__all__ = ["MapStore", "RunParts", "ResultTable", "NoRunParts", "parts_of", "stage_order",
           "RUN_COLUMNS", "NOISE_RUN_COLUMNS", "check_one_run"]

#: Columns that tell runs apart in a table of several (``pd.concat`` of two results):
#: :func:`sanitylib.summarize` and the figures never pool rows that differ in them.
RUN_COLUMNS = ("model", "schedule", "perturbation")
#: The same for the weight-noise tables (:func:`sanitylib.sensitivity.noise_sensitivity`), whose
#: ``perturbation`` varies with sigma within one run.
NOISE_RUN_COLUMNS = ("model", "kind", "relative")


def check_one_run(df: pd.DataFrame, what: str, columns: Sequence[str] = RUN_COLUMNS) -> None:
    """``ValueError`` when ``df`` holds rows of several runs (more than one value in one of
    ``columns``): ``what`` (e.g. a figure) would average them together."""
    for c in columns:
        if c in df.columns and df[c].nunique(dropna=False) > 1:
            values = list(dict.fromkeys(df[c]))
            raise ValueError(f"df holds several runs ({c}: {values}); {what} draws one: select "
                             f"it first, e.g. df[df[{c!r}] == {values[0]!r}]")


class MapStore:
    """Raw maps kept for figures: ``store[stage][method]`` is ``(n, C, H, W)`` float32 for the
    images ``store.images`` (indices into the batch).  Stage ``"original"`` is the trained model."""

    def __init__(self, images: Sequence[int]) -> None:
        self.images = list(images)
        self.stages: dict[str, dict[str, Tensor]] = {}

    def __getitem__(self, stage: str) -> dict[str, Tensor]:
        return self.stages[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    def __deepcopy__(self, memo) -> "MapStore":  # the maps are read-only
        return self

    def __repr__(self) -> str:
        return f"MapStore(images={self.images}, stages={list(self.stages)})"


@dataclass(frozen=True, eq=False)
class RunParts:
    """Everything of a run that is not a table row (compared by identity)."""

    maps: MapStore
    floor: pd.DataFrame | None
    stages: list[str]
    order: str
    spec: Any = None
    activations: pd.DataFrame | None = None
    skipped_blocks: Mapping[str, str] = field(default_factory=dict)

    def __deepcopy__(self, memo) -> "RunParts":
        return self


class NoRunParts(AttributeError):
    """The table has no run parts: it combines several runs, or was built by hand."""


def _parts_of(obj) -> RunParts | None:
    return getattr(obj, "_parts", None) if isinstance(obj, pd.DataFrame) else None


class ResultTable(pd.DataFrame):
    """The tidy table of a randomization run with its parts as attributes (see the module's
    docstring).  Columns: ``schedule, stage_index, stage, method, image, image_name, metric,
    value, constant, target, original_target, perturbation, model``."""

    _metadata = ["_parts"]

    @property
    def _constructor(self):
        return ResultTable

    def __finalize__(self, other, method: str | None = None, **kwargs):
        self = super().__finalize__(other, method=method, **kwargs)
        if method == "concat":  # pieces of one run keep it; pieces of several runs have none
            parts = {id(p): p for p in (_parts_of(o) for o in other.objs)}
            object.__setattr__(self, "_parts", next(iter(parts.values())) if len(parts) == 1 else None)
        elif method == "merge":
            left, right = _parts_of(other.left), _parts_of(other.right)
            same = left is None or right is None or left is right
            object.__setattr__(self, "_parts", (left or right) if same else None)
        return self

    def _part(self, name: str):
        parts = getattr(self, "_parts", None)
        if parts is None:
            raise NoRunParts(
                f"this table has no {name}: it combines several runs (pd.concat or merge of two "
                "results) or was not returned by a run; keep each run's table and read its ."
                f"{name} there")  # fmt: skip
        return getattr(parts, name)

    @property
    def maps(self) -> MapStore:
        """The kept maps (``maps[stage][method]`` is ``(n, C, H, W)``)."""
        return self._part("maps")

    @property
    def floor(self) -> pd.DataFrame | None:
        """The noise floors of the trained model's maps (:func:`sanitylib.noise_floor`), or
        ``None`` (one image, or ``floor=False``)."""
        return self._part("floor")

    @property
    def activations(self) -> pd.DataFrame | None:
        """Per-stage activation scales (``activations=True``), else ``None``."""
        return self._part("activations")

    @property
    def stages(self) -> list[str]:
        """The stages' names in the order they are reported."""
        return self._part("stages")

    @property
    def order(self) -> str:
        """``"top_down"`` or ``"bottom_up"``."""
        return self._part("order")

    @property
    def spec(self):
        """The :class:`sanitylib.RunSpec` of the run."""
        return self._part("spec")

    @property
    def skipped_blocks(self) -> Mapping[str, str]:
        """Inferred blocks left out of the run, with the reason (they cannot change the output)."""
        return self._part("skipped_blocks")

    @property
    def has_parts(self) -> bool:
        return getattr(self, "_parts", None) is not None

    @classmethod
    def of(cls, df: pd.DataFrame, parts: RunParts) -> "ResultTable":
        out = cls(df)
        object.__setattr__(out, "_parts", parts)
        return out


def parts_of(df: pd.DataFrame, name: str):
    """``df.<name>`` for a :class:`ResultTable`; a clear error for any other table."""
    if isinstance(df, ResultTable):
        return getattr(df, name)
    raise NoRunParts(f"expected the table returned by a randomization run (it carries .{name}), "
                     f"got a plain {type(df).__name__}")  # fmt: skip


def stage_order(df: pd.DataFrame) -> list[str]:
    """The stages of a run's table in the order they are reported: ``df.stages`` for a
    :class:`ResultTable` that has its parts, else the order of ``stage_index``."""
    if isinstance(df, ResultTable) and df.has_parts:
        return list(df.stages)
    if df.attrs.get("stages"):
        return list(df.attrs["stages"])
    col = df.sort_values("stage_index")["stage"] if "stage_index" in df else df["stage"]
    return list(dict.fromkeys(col))
