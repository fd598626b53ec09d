"""Randomization experiments: specification -> runner -> tidy table (+ maps for figures).

:func:`cascading_randomization` and :func:`independent_randomization` compare every method's
maps on the trained model with its maps after each randomization stage and return a
:class:`~sanitylib.result.ResultTable`: a tidy :class:`pandas.DataFrame` with one row per
(stage, method, image, metric) whose kept maps, noise floors and activation scales are
attributes (``df.maps``, ``df.floor``, ``df.activations``; see :mod:`sanitylib.result`).  The
maps come from the batched engine (:mod:`sanitylib.engine`; ``engine="reference"`` runs
``explain`` per method and stage instead).

Every run is described by a :class:`sanitylib.RunSpec` (:mod:`sanitylib.spec`: validated once)
and cached by :mod:`sanitylib.cache` (identity, files, slices, validation, recovery).
"""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .attribution import check_seed, explain, predict
from .cache import CodeNotIdentified, GroupFiles, RunCache, cached_group, config_key, slice_plan
from .diagnostics import activation_scales
from .engine import GroupMaps, auto_batch_size, compute_maps, image_groups, iter_state_maps, rows_per_image
from .memory_format import as_format, check_memory_format, choose, converted
from .metrics import MapFeatures, compare, noise_floor
from .randomize import Perturbation, evaluating, randomized, snapshot
from .result import RUN_COLUMNS, MapStore, ResultTable, RunParts
from .spec import DEFAULT_METRICS, RunSettings, RunSpec

__all__ = ["DEFAULT_METRICS", "MapStore", "ResultTable", "RunSpec", "RunSettings", "run",
           "run_randomization", "cascading_randomization", "independent_randomization",
           "summarize", "config_key", "explain_methods", "CodeNotIdentified"]  # fmt: skip

ORIGINAL = "original"


def run_randomization(
    model: nn.Module,
    x: Tensor,
    methods: Sequence,
    schedule: str = "cascading",
    blocks=None,
    metrics: Sequence = DEFAULT_METRICS,
    seed: int = 0,
    perturbation: Perturbation | None = None,
    target: str = "current",
    method_options: dict[str, dict] | None = None,
    image_names: Sequence[str] | None = None,
    store_maps: int | Sequence[int] = 2,
    batch_size: int | None = None,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    label: str | None = None,
    *,
    engine: str = "batched",
    amp: str | None = None,
    group_size: int | None = None,
    floor: bool = True,
    order: str = "top_down",
    activations: bool = False,
    image_ids: Sequence[int] | None = None,
    memory_format: str | None = None,
) -> ResultTable:
    """Run a randomization schedule and compare maps with the trained model's maps.

    Args:
        model: any classifier returning logits (e.g. from :func:`sanitylib.load_model`).  It runs
            in eval mode; afterwards every module's ``training`` flag, every parameter and every
            buffer are as they were (bit-exactly), also after an error.
        x: ``(N, C, H, W)`` preprocessed images.
        methods: registered names (:data:`sanitylib.METHODS` and :func:`sanitylib.register_method`),
            callables ``fn(model, x, target) -> Tensor`` or captum ``Attribution`` classes (see
            :mod:`sanitylib.registry`); a user method is called once per model state, in chunks
            of images.
        schedule: ``"cascading"`` (blocks 1..k, top first) or ``"independent"`` (block k alone).
        blocks: blocks to randomize, top to bottom (default: the model's declared blocks, or
            its parameterized top-level children in reverse execution order); an int ``K``
            (the first ``K`` of those, from the top); or a non-empty list of
            :class:`~sanitylib.models.Block`, block names or dotted module paths (a single one
            may be given alone).
        metrics: registered names (:data:`sanitylib.METRICS` and :func:`sanitylib.register_metric`),
            :class:`sanitylib.Metric` objects (``prepare`` runs once on the trained model's
            maps), or callables ``f(a, b) -> (N,)`` on raw ``(N, C, H, W)`` maps (named by
            ``f.__name__``).
        seed: an int in ``[0, 2**63 - 1]`` (numpy integers accepted); seeds the per-block generators and the noise of stochastic methods (the
            same noise is used for the trained and the randomized model: common random numbers).
        perturbation: how blocks are randomized (default: the paper's re-initialization;
            ``Perturbation(init=callable)`` for any initializer ``(module, generator)``).
        target: ``"current"`` (argmax of the randomized model, as the authors) or
            ``"original"`` (the trained model's prediction).
        method_options: per-method options for :func:`sanitylib.explain`, ``{method name:
            {option: value}}``; a key that is neither a method of the run nor a registered
            method (a typo) is refused.
        image_names: names for the ``image_name`` column.
        store_maps: number of leading images (or explicit indices) whose maps are kept.
        batch_size: rows per forward/backward chunk (default: automatic, see
            :func:`sanitylib.engine.auto_batch_size`).
        cache: ``True`` (the sanitylib cache), a folder, or ``False``.  The key covers the
            run's specification (:meth:`sanitylib.RunSpec.describe`), the model's weights,
            buffers and code (every submodule's class, as the bytecode that runs, its
            attributes, hooks and an instance-level ``forward``), the images, the code of user
            methods, metrics and initializers, the weights every block takes when randomized,
            the device type and the versions of sanitylib (and its source), torch and captum;
            it is the same in every process.  Every cached group is validated before it is
            served (the trained model's maps are recomputed and must equal the stored ones;
            user metrics must give the stored values), so state the key cannot see (a global
            variable, a helper in another file) never yields stale numbers; see
            :mod:`sanitylib.cache`.  Groups are saved in slices of stages, so an interrupted run
            resumes from its finished slices, also in a new process; unreadable files are
            reported and recomputed; a read-only folder is read, not written.
        progress: show a tqdm progress bar.
        label: a free-text label stored in the table (e.g. the model name).
        engine: ``"batched"`` (:mod:`sanitylib.engine`: shared passes, batched rows, forward
            replay) or ``"reference"`` (``explain`` per method and stage; slow, for checks).
        amp: ``None`` (default), ``"bfloat16"`` or ``"float16"``: autocast of the forward
            passes (batched engine; changes the numbers slightly).  Methods without shared
            passes (users' callables and captum classes, the attention methods) run in the
            model's own precision: their maps do not change, only the targets (``"current"``)
            come from the autocast forward pass.
        group_size: images computed together (default: automatic).
        floor: compute the noise floors (``df.floor``).
        order: ``"top_down"`` (the paper: the output block first) or ``"bottom_up"`` (the input
            block first, Hedström et al. 2023); with ``"independent"`` it only orders the stages.
        activations: also measure, per stage, how much each block's output scale changes
            (:func:`sanitylib.diagnostics.activation_scales`, Binder et al. 2023) into
            ``df.activations``.
        image_ids: each image's index in a larger collection (distinct ints >= 0; default
            ``0..N-1``): the ``image`` column and the noise seeds use it, so a run on a subset
            of the images (a shard, :mod:`sanitylib.distributed`) gives the full run's rows.
        memory_format: ``"auto"``, ``"contiguous"`` or ``"channels_last"`` (default ``None``:
            ``$SANITYLIB_MEMORY_FORMAT``, else ``"auto"``): the memory format of the passes
            (:mod:`sanitylib.memory_format`: channels-last for convolutional models on the CPU
            and CUDA; ``"contiguous"`` reproduces earlier numbers bit for bit).

    Returns:
        A :class:`~sanitylib.result.ResultTable`: a tidy DataFrame with columns ``schedule,
        stage_index, stage, method, image, image_name, metric, value, constant, target,
        original_target, perturbation, model`` (``constant``: the metric's correlation was
        undefined, a constant map or HOG vector, and the row scores 0; SSIM and users' metrics
        never), and as attributes the kept maps ``df.maps``
        (float32), the noise floors of the trained model's maps ``df.floor``
        (:func:`sanitylib.metrics.noise_floor`: pairs of different images, random masks;
        ``None`` with a single image or ``floor=False``), ``df.activations``, ``df.stages``,
        ``df.order``, ``df.spec`` and ``df.skipped_blocks`` (inferred blocks left out because
        they cannot change the output).  They survive filtering, sorting and joining with
        plain tables (see :mod:`sanitylib.result`).

    Raises:
        ValueError: for an invalid argument, before any work, naming the argument.
    """
    settings = RunSettings(batch_size=batch_size, group_size=group_size, progress=progress, cache=cache,
                           memory_format=memory_format)  # fmt: skip
    spec = RunSpec.build(model, x, methods, schedule=schedule, blocks=blocks, metrics=metrics,
                         seed=seed, perturbation=perturbation, target=target,
                         method_options=method_options, image_names=image_names,
                         store_maps=store_maps, label=label, engine=engine, amp=amp, floor=floor,
                         order=order, activations=activations, image_ids=image_ids)  # fmt: skip
    return run(spec, model, x, settings)


def run(spec: RunSpec, model: nn.Module, x: Tensor, settings: RunSettings | None = None) -> ResultTable:
    """Run ``spec`` (built for ``model`` and ``x`` by :meth:`RunSpec.build`) and return its
    :class:`~sanitylib.result.ResultTable`.  ``settings``: how to run (default
    :class:`RunSettings`: automatic batch and group sizes, progress bar, cache on)."""
    settings = settings or RunSettings()
    with evaluating(model):
        runner = _Runner(spec, model, x, settings)
        return runner.result()


#: Map values of the stages whose maps :meth:`_Runner.rows` post-processes together (the raw
#: maps of one method; their features take about 15 times as much memory, transient).
_STAGE_BATCH_ELEMS = 1 << 22


def _stage_batches(n_stages: int, group_elems: int) -> list[list[int]]:
    """The stages ``1..n_stages`` in consecutive batches of at most ``_STAGE_BATCH_ELEMS``
    map values (a group's maps of one method hold ``group_elems``); at least one per batch."""
    step = max(1, _STAGE_BATCH_ELEMS // max(1, group_elems))
    return [list(range(lo, min(n_stages, lo + step - 1) + 1)) for lo in range(1, n_stages + 1, step)]


class _Runner:
    """One run of a :class:`RunSpec`: the maps per group of images (through the cache when it is
    on), the table rows, the kept maps, the noise floors and the activation scales."""

    def __init__(self, spec: RunSpec, model: nn.Module, x: Tensor, settings: RunSettings) -> None:
        self.spec, self.model, self.settings = spec, model, settings
        dev = next((t.device for t in model.parameters()), x.device)
        self.x = x.detach().to(dev)
        self.stages = spec.stages
        self.methods = spec.method_names
        n_states = len(self.stages) + 1
        batched = spec.engine == "batched"
        self.groups = (image_groups(self.x, n_states, len(self.methods), settings.group_size)
                       if batched else [list(range(len(x)))])  # fmt: skip
        options = spec.options()
        self.per_state = rows_per_image(spec.methods, options)["total"] if batched else len(self.methods)
        self.bar = tqdm(total=self.per_state * (len(x) if batched else 1) * n_states,
                        disable=not settings.progress, desc=f"{spec.schedule} randomization ({spec.label})",
                        unit="pass" if batched else "map")  # fmt: skip
        bs = settings.batch_size
        if batched and bs is None:  # once per run: every group and slice alike
            bs = auto_batch_size(model, self.x, amp=spec.amp)
        # the passes' memory format, resolved once (sanitylib.memory_format); part of the cache key
        self.memory_format = choose(model, self.x, settings.memory_format, spec.methods)
        self.kw = dict(perturbation=spec.perturbation, seed=spec.seed, target=spec.target,
                       method_options=options, batch_size=bs, amp=spec.amp,
                       on_rows=self.bar.update, memory_format=self.memory_format)  # fmt: skip
        if spec.custom_ids:
            self.kw["image_ids"] = list(spec.image_ids)

    # ------------------------------------------------------------------ maps

    def _states(self, images: list[int], states, target=None, progress: bool = True) -> GroupMaps:
        kw = dict(self.kw) if target is None else {**self.kw, "target": target}
        if not progress:
            kw["on_rows"] = None
        it = iter_state_maps(self.model, self.x, self.spec.methods, states, groups=[images], **kw)
        try:
            return next(it)
        finally:
            it.close()  # restores the model now

    def trained(self, images: list[int]) -> GroupMaps:
        """The trained model's maps of ``images`` (state 0 alone), without progress."""
        return self._states(images, [()], progress=False)

    def slices(self, images: list[int], todo, targets0):
        """``(j, GroupMaps)`` per slice ``(j, stages' indices)`` of ``todo``: slice 0 starts with
        the trained model (state 0), a later slice holds its stages only.  The noise is seeded
        per image and every block has its own generator, so a slice's maps equal those of one
        call over every state; with ``target="original"`` the trained model's classes
        ``targets0`` (from slice 0) are passed on."""
        for j, ks in todo:
            states = ([()] if j == 0 else []) + [self.stages[k].blocks for k in ks]
            target = None
            if j > 0 and self.spec.target == "original":
                target = torch.zeros(len(self.x), dtype=torch.long, device=self.x.device)
                target[images] = targets0.to(self.x.device)
            gm = self._states(images, states, target)
            if j == 0:
                targets0 = gm.targets[0]
            yield j, gm

    def _reference(self) -> GroupMaps:
        """The straightforward computation: ``explain`` per method, stage by stage (on all
        images: ``explain`` seeds the noise by the position in its batch), in the run's memory
        format (the model converted and the images given in it; the maps returned in the
        default format).  Each state is converted after its weights are drawn: an in-place
        random fill follows the memory order."""
        spec, model, fmt = self.spec, self.model, self.memory_format
        x = as_format(self.x, fmt)
        bs = self.settings.batch_size or 32
        options = spec.options()

        def maps_for(m: nn.Module, tgt: Tensor) -> dict[str, Tensor]:
            out = {}
            for meth in spec.methods:
                out[meth.name] = explain(m, x, meth, target=tgt, seed=spec.seed, batch_size=bs,
                                         **options.get(meth.name, {})).contiguous()  # fmt: skip
                self.bar.update(1)
            return out

        with converted(model, fmt):
            orig = predict(model, x, bs).argmax(1)
            maps, targets = [maps_for(model, orig)], [orig]
        snap = snapshot(model)
        for stage in self.stages:
            with randomized(model, stage.blocks, spec.perturbation, spec.seed, snap=snap) as rmodel, \
                    converted(rmodel, fmt):
                cur = predict(rmodel, x, bs).argmax(1) if spec.target == "current" else orig
                maps.append(maps_for(rmodel, cur))
                targets.append(cur)
        return GroupMaps(list(range(len(x))), torch.stack(targets), maps)

    # ------------------------------------------------------------------ table

    @staticmethod
    def features(trained: dict[str, Tensor]) -> dict[str, MapFeatures]:
        return {m: MapFeatures(t) for m, t in trained.items()}

    def rows(self, gm: GroupMaps, stages, first: int = 0, orig: dict[str, MapFeatures] | None = None) -> list[dict]:
        """Table rows of one group of images: every stage, method, metric and image
        (``gm.maps[0]`` the trained model's maps, ``gm.maps[k]`` those of ``stages[k - 1]``, the
        schedule's stage ``first + k - 1``).  The trained model's maps are post-processed once
        (:class:`sanitylib.metrics.MapFeatures`; ``orig`` when already done).  The built-in
        metrics compare several stages' maps at once (:func:`_stage_batches`): every map is
        post-processed and compared on its own, so the values are those of one stage at a time,
        bit for bit, with fewer and larger operations (split better over the threads).  A user's
        metric is called once per stage, on the group's maps, as before."""
        spec, out = self.spec, []
        G = len(gm.images)
        orig = orig or self.features(gm.maps[0])
        builtin = [f.name for f in spec.metrics if f.builtin]
        prepared = {(m, f.name): (f.prepare or (lambda v: v))(orig[m].maps) for m in self.methods
                    for f in spec.metrics if not f.builtin}  # fmt: skip
        values: dict[tuple[int, str, str], list] = {}  # (stage k, method, metric) -> G values
        # (stage k, method, metric) -> G flags: the correlation was undefined (scored 0)
        const: dict[tuple[int, str, str], list] = {}
        for meth in self.methods:
            ref = orig[meth].prepare(builtin)
            for ks in _stage_batches(len(stages), gm.maps[0][meth].numel()):
                n = len(ks)
                feats = MapFeatures(torch.cat([gm.maps[k][meth] for k in ks]) if n > 1 else gm.maps[ks[0]][meth])
                tiled = ref.repeat(n)
                for name in builtin:
                    v = compare(name, tiled, feats).view(n, G).tolist()
                    c = (feats.constant(name) | tiled.constant(name)).view(n, G).tolist()
                    values.update({(k, meth, name): v[j] for j, k in enumerate(ks)})
                    const.update({(k, meth, name): c[j] for j, k in enumerate(ks)})
            for fn in spec.metrics:
                if not fn.builtin:
                    for k in range(1, len(stages) + 1):
                        b = (fn.prepare or (lambda v: v))(gm.maps[k][meth])
                        values[k, meth, fn.name] = fn.values(prepared[(meth, fn.name)], b, G).tolist()
                        const[k, meth, fn.name] = [False] * G
        targets = gm.targets.tolist()
        describe = spec.perturbation.describe()
        for k, stage in enumerate(stages, start=1):
            for meth in self.methods:
                for fn in spec.metrics:
                    vals = values[k, meth, fn.name]
                    for g in range(G):
                        i = gm.images[g]
                        out.append({
                            "schedule": spec.schedule, "stage_index": first + k - 1, "stage": stage.name,
                            "method": meth, "image": spec.image_ids[i], "image_name": spec.image_names[i],
                            "metric": fn.name, "value": float(vals[g]), "constant": bool(const[k, meth, fn.name][g]),
                            "target": int(targets[k][g]), "original_target": int(targets[0][g]),
                            "perturbation": describe, "model": spec.label,
                        })  # fmt: skip
        return out

    def keep(self, gm: GroupMaps, names: Sequence[str]) -> dict:
        """The kept images' maps of ``gm``, float32 on the CPU: ``{image: {state: {method: map}}}``."""
        return {i: {st: {m: gm.maps[k][m][g:g + 1].detach().float().cpu().clone() for m in self.methods}
                    for k, st in enumerate(names)}
                for g, i in enumerate(gm.images) if i in self.spec.kept}  # fmt: skip

    def advance(self, n_images: int, n_states: int) -> None:
        self.bar.update(self.per_state * (n_images if self.spec.engine == "batched" else 1) * n_states)

    # ------------------------------------------------------------------ the run

    def result(self) -> ResultTable:
        spec = self.spec
        cache = RunCache.open(spec, self.model, self.x, self.settings.cache, self.memory_format)
        rows: list[dict] = []
        stored: dict[int, dict] = {}  # image -> state -> method -> map
        trained: dict[int, dict[str, Tensor]] = {}  # image -> method -> trained model's map
        try:
            for images in self.groups:
                self.bar.set_postfix_str(f"images {images[0]}-{images[-1]}")
                if cache is not None and spec.engine == "batched":
                    files = GroupFiles(cache, images, spec, slice_plan(len(self.stages)))
                    g_rows, g_maps, g_trained = cached_group(self, files)
                else:
                    gm = self._reference() if spec.engine == "reference" else \
                        self._states(images, [()] + [st.blocks for st in self.stages])
                    g_rows, g_maps, g_trained = self.rows(gm, self.stages), self.keep(gm, spec.state_names), gm.maps[0]
                    del gm
                rows += g_rows
                stored.update(g_maps)
                for g, i in enumerate(images):
                    trained[i] = {m: g_trained[m][g:g + 1] for m in self.methods}
        finally:
            self.bar.close()
        floor = None
        if spec.floor and len(self.x) > 1:
            floor = noise_floor({m: torch.cat([trained[i][m] for i in range(len(self.x))]) for m in self.methods},
                                list(spec.metrics), seed=spec.seed)  # fmt: skip
        order = {m: j for j, m in enumerate(self.methods)}
        morder = {f.name: j for j, f in enumerate(spec.metrics)}
        rows.sort(key=lambda r: (r["stage_index"], order[r["method"]], morder[r["metric"]], r["image"]))
        store = MapStore(list(spec.kept))
        for st in spec.state_names:
            store.stages[st] = {m: torch.cat([stored[i][st][m] for i in spec.kept]) if spec.kept else
                                torch.empty(0) for m in self.methods}  # fmt: skip
        activations = None
        if spec.activations:
            activations = activation_scales(self.model, self.x, list(spec.blocks), schedule=spec.schedule,
                                            order=spec.order, seed=spec.seed, perturbation=spec.perturbation,
                                            batch_size=self.settings.batch_size)  # fmt: skip
        parts = RunParts(maps=store, floor=floor, stages=[s.name for s in self.stages], order=spec.order,
                         spec=spec, activations=activations, skipped_blocks=dict(spec.skipped_blocks))
        return ResultTable.of(pd.DataFrame(rows), parts)


def cascading_randomization(model: nn.Module, x: Tensor, methods: Sequence, blocks=None,
                            metrics: Sequence = DEFAULT_METRICS, seed: int = 0,
                            **kwargs) -> ResultTable:  # fmt: skip
    """Cascading randomization (paper section 3.1): at stage k, blocks 1..k from the top are
    randomized.  See :func:`run_randomization` for the arguments and the table."""
    return run_randomization(model, x, methods, "cascading", blocks, metrics, seed, **kwargs)


def independent_randomization(model: nn.Module, x: Tensor, methods: Sequence, blocks=None,
                              metrics: Sequence = DEFAULT_METRICS, seed: int = 0,
                              **kwargs) -> ResultTable:  # fmt: skip
    """Independent randomization (paper section 3.2): at stage k only block k is randomized.
    See :func:`run_randomization` for the arguments and the table."""
    return run_randomization(model, x, methods, "independent", blocks, metrics, seed, **kwargs)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and population std (as the authors' ``np.std``) over images, per stage, method
    and metric, in stage order; ``n`` counts the values.

    A table of several runs (``pd.concat`` of results) is summarized per run: the columns of
    :data:`sanitylib.result.RUN_COLUMNS` it has (``model``, ``schedule``, ``perturbation``) come first and are
    part of the grouping, so a cascading and an independent run, or two models of different
    labels, are never averaged together (two models are told apart by their label: give the
    runs ``label=``; a model without one is named by its class).  Runs that differ only in their
    seed are pooled (``n`` counts both)."""
    missing = {"stage_index", "stage", "method", "metric", "value"} - set(df.columns)
    if missing:
        raise ValueError(f"df lacks the columns {sorted(missing)} (expected a table of "
                         "sanitylib's runners)")
    keys = [c for c in RUN_COLUMNS if c in df.columns]
    g = df.groupby([*keys, "stage_index", "stage", "method", "metric"], sort=True,
                   dropna=False)["value"]
    out = g.agg(mean="mean", std=lambda v: float(v.std(ddof=0)), n="count").reset_index()
    return pd.DataFrame(out)


def explain_methods(model: nn.Module, x: Tensor, methods: Sequence,
                    method_options: dict[str, dict] | None = None, seed: int = 0,
                    batch_size: int | None = None, progress: bool = True, *,
                    amp: str | None = None, image_ids: Sequence[int] | None = None,
                    memory_format: str | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Maps of several methods on the same images (each for the model's predicted class):
    ``{method: (N, C, H, W)}``, from the batched engine's shared passes (equal to
    :func:`sanitylib.explain` per method up to :data:`sanitylib.engine.MAP_TOLERANCE`).

    The model runs in eval mode; its ``training`` flags and buffers are restored afterwards.
    ``image_ids`` are the images' indices for the noise seeds (default ``0..N-1``, as
    ``explain``); ``memory_format`` as in :func:`run_randomization`."""
    check_seed(seed)
    check_memory_format(memory_format)
    if image_ids is not None and len(image_ids) != len(x):
        raise ValueError(f"image_ids has {len(image_ids)} entries for {len(x)} images")
    with evaluating(model):
        dev = next((t.device for t in model.parameters()), x.device)
        x = x.detach().to(dev)
        target = predict(model, x, batch_size or 32).argmax(1)
        total = rows_per_image(methods, method_options)["total"] * len(x)
        with tqdm(total=total, desc="saliency maps", unit="pass", disable=not progress) as bar:
            if image_ids is None:
                return compute_maps(model, x, methods, target, method_options=method_options,
                                    seed=seed, batch_size=batch_size, amp=amp, on_rows=bar.update,
                                    memory_format=memory_format)  # fmt: skip
            it = iter_state_maps(model, x, methods, [()], seed=seed, target=target,
                                 method_options=method_options, batch_size=batch_size, amp=amp,
                                 image_ids=image_ids, reuse_forward=False, on_rows=bar.update,
                                 memory_format=memory_format)  # fmt: skip
            try:
                gm = next(it)
            finally:
                it.close()
            return {m: v.clone() for m, v in gm.maps[0].items()}
