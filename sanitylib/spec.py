"""The run specification: *what* a randomization run computes, validated once.

:class:`RunSpec` is one frozen object holding every field that determines a run's numbers
(methods, metrics, schedule, blocks, order, perturbation, target, seed, method options, the
images' ids and names, the kept maps, floor, activations, automatic mixed precision, engine,
label).  :meth:`RunSpec.build` checks every argument before any work (each error names the
argument and what was expected) and normalizes it (numpy integers to ``int``, a single block to
a list, options restricted to the run's methods).  The result cache takes its identity from
:meth:`RunSpec.describe` (:mod:`sanitylib.cache`), and so does the command line's
``config.json``: one set of fields for both.

:class:`RunSettings` holds *how* a run is executed (batch size, group size, progress bar, cache
folder, memory format); none of it changes the numbers beyond the engine's documented float
rounding (:data:`sanitylib.engine.MAP_TOLERANCE`), so none of it enters the run's identity; the
memory format the run resolves to does enter the cache's key (:func:`sanitylib.cache.run_config`),
so results of the two formats are kept apart.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from .attribution import MAX_SEED, check_batch_size, check_input, check_seed
from .engine import AMP_DTYPES
from .memory_format import check_memory_format
from .models import Block, get_info
from .randomize import Perturbation, Stage, check_schedule, get_blocks, schedule_stages
from .registry import (Metric, MethodSpec, check_map_size, check_method_options, check_methods_fit,
                       resolve_methods, resolve_metrics)  # fmt: skip

__all__ = ["RunSpec", "RunSettings", "DEFAULT_METRICS", "MAX_SEED", "normalize_seed",
           "check_method_options"]

DEFAULT_METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
#: Fields of :meth:`RunSpec.describe` that choose which parts are produced, not their values:
#: left out of the cache's identity (the floor and activations are stored apart).
NOT_IN_IDENTITY = ("floor", "activations")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def normalize_seed(seed, name: str = "seed") -> int:
    """``seed`` as a plain ``int`` (numpy integers accepted); ``ValueError`` naming ``name``
    unless it is an integer in ``[0, MAX_SEED]`` (:func:`sanitylib.attribution.check_seed`)."""
    check_seed(seed, name)
    return int(seed)


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def _check_choice(name: str, v, choices: Sequence[str]) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be {' or '.join(repr(c) for c in choices)}, got {v!r}")
    return v


def _kept(store_maps, n: int) -> tuple[int, ...]:
    msg = f"store_maps must be an int >= 0 or a list of image indices, got {store_maps!r}"
    if _is_int(store_maps):
        if store_maps < 0:
            raise ValueError(msg)
        return tuple(range(min(int(store_maps), n)))
    if isinstance(store_maps, (str, bytes, bool)) or not hasattr(store_maps, "__iter__"):
        raise ValueError(msg)
    idx = list(store_maps)
    if not all(_is_int(i) for i in idx):
        raise ValueError(msg)
    idx = [int(i) for i in idx]
    if any(i < 0 or i >= n for i in idx):
        raise ValueError(f"store_maps indices must lie in [0, {n}), got {idx}")
    return tuple(idx)


@dataclass(frozen=True)
class RunSettings:
    """How a run is executed; nothing here changes its numbers beyond the engine's documented
    tolerance, so nothing here enters the cache's identity.

    Attributes:
        batch_size: rows per forward/backward chunk (``None``: automatic).
        group_size: images computed together (``None``: automatic).
        progress: show a tqdm progress bar.
        cache: ``True`` (the sanitylib cache folder), a folder, or ``False``.
        memory_format: ``"auto"``, ``"contiguous"`` or ``"channels_last"``; ``None`` (default):
            ``$SANITYLIB_MEMORY_FORMAT``, else ``"auto"`` (:mod:`sanitylib.memory_format`;
            ``"contiguous"`` reproduces the numbers of earlier versions bit for bit).
    """

    batch_size: int | None = None
    group_size: int | None = None
    progress: bool = True
    cache: bool | str | os.PathLike = True
    memory_format: str | None = None

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        check_batch_size(self.group_size, "group_size")
        if not isinstance(self.cache, (bool, str, os.PathLike)):
            raise ValueError(f"cache must be True, False or a folder (str or path), got {self.cache!r}")
        _check_bool("progress", self.progress)
        check_memory_format(self.memory_format)
        for k in ("batch_size", "group_size"):
            v = getattr(self, k)
            if v is not None:
                object.__setattr__(self, k, int(v))




def _plain(v):
    """``v`` with its read-only mappings (at any depth of read-only mappings) as dicts."""
    return {k: _plain(w) for k, w in v.items()} if isinstance(v, MappingProxyType) else v


def _unpickle_spec(state: dict) -> "RunSpec":
    """The :class:`RunSpec` of ``RunSpec.__reduce__``'s state: read-only mappings again."""
    state = dict(state)
    state["method_options"] = MappingProxyType(
        {k: MappingProxyType(v) for k, v in state["method_options"].items()})
    state["skipped_blocks"] = MappingProxyType(state["skipped_blocks"])
    return RunSpec(**state)

@dataclass(frozen=True, eq=False)
class RunSpec:
    """What a randomization run computes (see the module's docstring).  Build it with
    :meth:`build`, which validates and normalizes every field; the runners
    (:func:`sanitylib.run_randomization`, the command line, :mod:`sanitylib.distributed`,
    :func:`sanitylib.smprt`, ...) all go through it.

    Attributes:
        methods, metrics: the resolved methods and metrics, in table order.
        schedule: ``"cascading"`` or ``"independent"``; order: ``"top_down"`` or ``"bottom_up"``.
        blocks: the model's blocks to randomize, top to bottom (resolved on the model).
        skipped_blocks: inferred blocks left out, ``{name: reason}`` (they cannot change the
            output: no parameters, or never run in the forward pass).
        perturbation, target, seed, method_options: as in :func:`sanitylib.run_randomization`.
        image_ids: each image's index in the collection (``0..N-1`` by default).
        image_names: one name per image; kept: indices (into the batch) of the kept maps.
        floor, activations: produce the noise floors / activation scales.
        amp, engine, label: autocast dtype, ``"batched"`` or ``"reference"``, the model's label.
    """

    methods: tuple[MethodSpec, ...]
    metrics: tuple[Metric, ...]
    schedule: str
    order: str
    blocks: tuple[Block, ...]
    perturbation: Perturbation
    target: str
    seed: int
    method_options: Mapping[str, Mapping[str, Any]]
    image_ids: tuple[int, ...]
    image_names: tuple[str, ...]
    kept: tuple[int, ...]
    floor: bool = True
    activations: bool = False
    amp: str | None = None
    engine: str = "batched"
    label: str = ""
    custom_ids: bool = False
    skipped_blocks: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, model: nn.Module, x: Tensor, methods: Sequence, *, schedule: str = "cascading",
              blocks=None, metrics: Sequence = DEFAULT_METRICS, seed: int = 0,
              perturbation: Perturbation | None = None, target: str = "current",
              method_options: Mapping[str, Mapping] | None = None,
              image_names: Sequence[str] | None = None, store_maps=2, label: str | None = None,
              engine: str = "batched", amp: str | None = None, floor: bool = True,
              order: str = "top_down", activations: bool = False,
              image_ids: Sequence[int] | None = None) -> "RunSpec":  # fmt: skip
        """Validate and normalize every argument of :func:`sanitylib.run_randomization` that
        determines the result, for ``model`` and ``x`` ``(N, C, H, W)``.

        Raises:
            ValueError: naming the argument and what was expected; before any work.
        """
        specs = tuple(resolve_methods(methods))
        fns = tuple(resolve_metrics(metrics))
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_methods_fit(model, specs)  # e.g. an attention method on a model without attention
        check_input(model, x)
        check_map_size(fns, x)
        seed = normalize_seed(seed)
        check_schedule(schedule, order)
        _check_choice("target", target, ("current", "original"))
        _check_choice("engine", engine, ("batched", "reference"))
        if perturbation is None:
            perturbation = Perturbation()
        elif not isinstance(perturbation, Perturbation):
            raise ValueError(f"perturbation must be a sanitylib.Perturbation or None, got {perturbation!r}")
        options = check_method_options(method_options, specs)
        n = len(x)
        if image_names is not None:
            if isinstance(image_names, (str, bytes)) or not hasattr(image_names, "__len__"):
                raise ValueError(f"image_names must be a list of names, one per image, got {image_names!r}")
            if len(image_names) != n:
                raise ValueError(f"image_names has {len(image_names)} entries for {n} images")
        kept = _kept(store_maps, n)
        floor, activations = _check_bool("floor", floor), _check_bool("activations", activations)
        if label is not None and not isinstance(label, str):
            raise ValueError(f"label must be a string or None, got {label!r}")
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
        if amp and engine != "batched":
            raise ValueError("amp needs engine='batched'")
        custom_ids = image_ids is not None
        if custom_ids:
            if isinstance(image_ids, (str, bytes)) or not hasattr(image_ids, "__len__") or \
                    len(image_ids) != n or not all(_is_int(i) and i >= 0 for i in image_ids) \
                    or len({int(i) for i in image_ids}) != n:
                raise ValueError(f"image_ids must be {n} distinct ints >= 0, one per image, "
                                 f"got {image_ids!r}")  # fmt: skip
            if engine != "batched":
                raise ValueError("image_ids needs engine='batched'")
            ids = tuple(int(i) for i in image_ids)
        else:
            ids = tuple(range(n))
        if _is_int(blocks) and blocks < 1:
            raise ValueError(f"blocks: the number of top blocks must be >= 1, got {blocks}")
        if blocks is not None and not isinstance(blocks, (str, Block)) and not _is_int(blocks):
            if not isinstance(blocks, (list, tuple)) or not blocks:
                raise ValueError("blocks must be None (the model's blocks), the number of top "
                                 "blocks or a non-empty list of Block objects, block names or "
                                 f"module paths, got {blocks!r}")  # fmt: skip
        if isinstance(blocks, (str, Block)):
            blocks = [blocks]
        resolved, skipped = get_blocks(model, blocks, x, return_skipped=True)
        info = get_info(model)
        return cls(methods=specs, metrics=fns, schedule=schedule, order=order,
                   blocks=tuple(resolved), perturbation=perturbation, target=target, seed=seed,
                   method_options=options, image_ids=ids,
                   image_names=tuple(str(v) for v in image_names) if image_names is not None
                   else tuple(str(i) for i in ids),
                   kept=kept, floor=floor, activations=activations, amp=amp, engine=engine,
                   label=label or (info.name if info else type(model).__name__),
                   custom_ids=custom_ids, skipped_blocks=MappingProxyType(dict(skipped)))  # fmt: skip

    def __reduce__(self):
        # the read-only mappings (method_options, skipped_blocks) cannot be pickled: rebuild
        # them from plain dicts (``df.to_pickle`` of a result table holds its spec)
        return _unpickle_spec, ({f.name: _plain(getattr(self, f.name)) for f in fields(self)},)

    # ------------------------------------------------------------------ derived

    @property
    def method_names(self) -> list[str]:
        return [sp.name for sp in self.methods]

    @property
    def stages(self) -> list[Stage]:
        """The schedule's stages, in the order they are randomized and reported."""
        return schedule_stages(self.blocks, self.schedule, self.order)

    @property
    def state_names(self) -> list[str]:
        """``"original"`` (the trained model) and then every stage's name."""
        return ["original"] + [st.name for st in self.stages]

    def options(self) -> dict[str, dict]:
        """The method options as plain dicts (``{method: {option: value}}``)."""
        return {k: dict(v) for k, v in self.method_options.items()}

    def describe(self) -> dict:
        """The run's fields as JSON-friendly values (names, numbers, strings): the command line's
        ``config.json`` and, with the code identities of user callables and the model's
        identity added, the result cache's key (:func:`sanitylib.cache.run_config`)."""
        blocks = list(self.blocks)
        if self.order == "bottom_up":  # listed in the order they are randomized
            blocks = blocks[::-1]
        return {
            "schedule": self.schedule, "order": self.order,
            "methods": self.method_names, "metrics": [m.name for m in self.metrics],
            "blocks": [[b.name, list(b.modules)] for b in blocks],
            "perturbation": self.perturbation.describe(), "target": self.target,
            "seed": self.seed, "method_options": self.options(),
            "image_ids": list(self.image_ids) if self.custom_ids else None,
            "image_names": list(self.image_names), "kept": list(self.kept),
            "floor": self.floor, "activations": self.activations, "amp": self.amp,
            "engine": self.engine, "label": self.label,
        }  # fmt: skip

    def __repr__(self) -> str:
        return (f"RunSpec({self.schedule}, {self.order}, methods={self.method_names}, "
                f"metrics={[m.name for m in self.metrics]}, {len(self.blocks)} blocks, "
                f"{len(self.image_ids)} images, seed={self.seed})")
