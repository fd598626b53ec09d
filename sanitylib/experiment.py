"""Randomization experiments: config -> runner -> tidy table (+ maps for figures).

:func:`cascading_randomization` and :func:`independent_randomization` compare every method's
maps on the trained model with its maps after each randomization stage and return a tidy
:class:`pandas.DataFrame` with one row per (stage, method, image, metric).  Maps of a few images
are kept for figures in ``df.attrs["maps"]`` (a :class:`MapStore`).  The maps come from the
batched engine (:mod:`sanitylib.engine`; ``engine="reference"`` runs ``explain`` per method and
stage instead).  Finished groups of images (every stage) are cached on disk (atomically) under a
key of the full configuration, so a rerun loads them and an interrupted run resumes after its
last finished group.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__
from .attribution import METHODS, explain, predict
from .data import atomic_save, cache_dir
from .engine import (GroupMaps, MapFeatures, Metric, _group_size, compare, compute_maps,
                     iter_state_maps, rows_per_image)  # fmt: skip
from .metrics import METRICS, noise_floor
from .models import get_info
from .randomize import (Perturbation, Stage, cascading_stages, get_blocks, independent_stages,
                        randomized, snapshot)  # fmt: skip

__all__ = ["DEFAULT_METRICS", "MapStore", "run_randomization", "cascading_randomization",
           "independent_randomization", "summarize", "config_key", "explain_methods"]  # fmt: skip

DEFAULT_METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
ORIGINAL = "original"


class MapStore:
    """Raw maps kept for figures: ``store[stage][method]`` is ``(n, C, H, W)`` for the images
    ``store.images`` (indices into the batch).  Stage ``"original"`` is the trained model."""

    def __init__(self, images: Sequence[int]) -> None:
        self.images = list(images)
        self.stages: dict[str, dict[str, Tensor]] = {}

    def __getitem__(self, stage: str) -> dict[str, Tensor]:
        return self.stages[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    def __deepcopy__(self, memo) -> "MapStore":  # pandas copies attrs; maps are read-only
        return self

    def __repr__(self) -> str:
        return f"MapStore(images={self.images}, stages={list(self.stages)})"


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _tensor_hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def _identify(obj, model: nn.Module):
    """A JSON-friendly identity for cache keys: modules by their path in ``model``, callables
    by their qualified name, code, defaults and closure values (so two closures from one
    factory, or a function redefined in a notebook, do not collide)."""
    if isinstance(obj, nn.Module):
        for name, m in model.named_modules():
            if m is obj:
                return f"<module {name}>"
        return f"<foreign module {type(obj).__name__} {_tensor_hash(obj.state_dict().values())}>"
    if callable(obj) and hasattr(obj, "__code__"):
        cells = [_identify(c.cell_contents, model) for c in (obj.__closure__ or ())]
        return [obj.__qualname__, hashlib.sha256(obj.__code__.co_code).hexdigest()[:16],
                repr(obj.__defaults__), cells]  # fmt: skip
    if isinstance(obj, dict):
        return {str(k): _identify(v, model) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_identify(v, model) for v in obj]
    if isinstance(obj, Tensor):
        return f"<tensor {_tensor_hash([obj])}>"
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else repr(obj)


def config_key(config: dict) -> str:
    """sha256 of a JSON-serializable configuration (sorted keys), 24 hex characters."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _store_indices(store_maps, n: int) -> list[int]:
    if isinstance(store_maps, int):
        return list(range(min(store_maps, n)))
    idx = [int(i) for i in store_maps]
    if any(i < 0 or i >= n for i in idx):
        raise ValueError(f"store_maps indices must lie in [0, {n}), got {idx}")
    return idx


def _metric_fns(metrics: Sequence) -> list[tuple[str, object]]:
    """``(name, metric)`` for names of :data:`METRICS`, :class:`sanitylib.engine.Metric` objects
    and callables ``f(a, b) -> (N,)`` on raw maps."""
    out = []
    for m in metrics:
        if isinstance(m, str):
            if m not in METRICS:
                raise ValueError(f"unknown metrics [{m!r}]; known: {', '.join(METRICS)}, a "
                                 "sanitylib.engine.Metric, or a callable (a, b) -> (N,)")  # fmt: skip
            out.append((m, m))
        elif isinstance(m, Metric):
            out.append((m.name, m))
        elif callable(m):
            out.append((getattr(m, "__name__", "custom"), m))
        else:
            raise ValueError(f"a metric must be a name, a Metric or a callable, got {m!r}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names {names}")
    return out


def _compute_group(model: nn.Module, x: Tensor, images: list[int], methods: Sequence[str],
                   stages: Sequence[Stage], engine: str, kw: dict) -> GroupMaps:  # fmt: skip
    """Maps of ``x[images]`` on the trained model (state 0) and after every stage."""
    if engine == "batched":
        states = [()] + [st.blocks for st in stages]
        return next(iter_state_maps(model, x, methods, states, groups=[images], **kw))
    return _reference_group(model, x, images, methods, stages, **kw)


def _reference_group(model: nn.Module, x: Tensor, images: list[int], methods: Sequence[str],
                     stages: Sequence[Stage], *, perturbation: Perturbation, seed: int,
                     target: str, method_options: dict, batch_size: int | None,
                     on_rows: Callable[[int], None], amp=None) -> GroupMaps:  # fmt: skip
    """The straightforward computation: ``explain`` per method, stage by stage (on all images:
    ``explain`` seeds the noise by the position in its batch)."""
    if amp:
        raise ValueError("amp needs engine='batched'")
    if images != list(range(len(x))):
        raise ValueError("the reference engine computes all images at once")
    bs = batch_size or 32

    def maps_for(m: nn.Module, tgt: Tensor) -> dict[str, Tensor]:
        out = {}
        for meth in methods:
            out[meth] = explain(m, x, meth, target=tgt, seed=seed, batch_size=bs,
                                **method_options.get(meth, {}))  # fmt: skip
            on_rows(1)
        return out

    model.eval()
    orig_target = predict(model, x, bs).argmax(1)
    maps = [maps_for(model, orig_target)]
    targets = [orig_target]
    snap = snapshot(model)
    for stage in stages:
        with randomized(model, stage.blocks, perturbation, seed, snap=snap) as rmodel:
            cur = predict(rmodel, x, bs).argmax(1) if target == "current" else orig_target
            maps.append(maps_for(rmodel, cur))
            targets.append(cur)
    return GroupMaps(list(images), torch.stack(targets), maps)


def run_randomization(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str],
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
) -> pd.DataFrame:
    """Run a randomization schedule and compare maps with the trained model's maps.

    Args:
        model: any classifier returning logits (e.g. from :func:`sanitylib.load_model`); it is
            restored bit-exactly afterwards.
        x: ``(N, C, H, W)`` preprocessed images.
        methods: names from :data:`sanitylib.attribution.METHODS`.
        schedule: ``"cascading"`` (blocks 1..k, top first) or ``"independent"`` (block k alone).
        blocks: blocks to randomize, top to bottom (default: the model's declared blocks, or
            its parameterized top-level children in reverse execution order); a list of
            :class:`~sanitylib.models.Block`, block names or dotted module paths.
        metrics: names from :data:`sanitylib.metrics.METRICS`, :class:`sanitylib.engine.Metric`
            objects (``prepare`` runs once on the trained model's maps), or callables
            ``f(a, b) -> (N,)`` on raw ``(N, C, H, W)`` maps (named by ``f.__name__``).
        seed: seeds the per-block generators and the noise of stochastic methods (the same
            noise is used for the trained and the randomized model: common random numbers).
        perturbation: how blocks are randomized (default: the paper's re-initialization;
            ``Perturbation(init=callable)`` for any initializer ``(module, generator)``).
        target: ``"current"`` (argmax of the randomized model, as the authors) or
            ``"original"`` (the trained model's prediction).
        method_options: per-method options for :func:`sanitylib.explain`.
        image_names: names for the ``image_name`` column.
        store_maps: number of leading images (or explicit indices) whose maps are kept.
        batch_size: rows per forward/backward chunk (default: automatic, see
            :func:`sanitylib.engine.auto_batch_size`).
        cache: ``True`` (the sanitylib cache), a folder, or ``False``.
        progress: show a tqdm progress bar.
        label: a free-text label stored in the table (e.g. the model name).
        engine: ``"batched"`` (:mod:`sanitylib.engine`: shared passes, batched rows, forward
            replay) or ``"reference"`` (``explain`` per method and stage; slow, for checks).
        amp: ``None`` (default), ``"bfloat16"`` or ``"float16"``: autocast of the forward
            passes (batched engine; changes the numbers slightly, see the status page).
        group_size: images computed together (default: automatic); also the unit of the cache.
        floor: compute the noise floors (``df.attrs["floor"]``).

    Returns:
        Tidy table with columns ``schedule, stage_index, stage, method, image, image_name,
        metric, value, constant, target, original_target, perturbation, model``; the maps in
        ``df.attrs["maps"]``; the noise floors of the trained model's maps
        (:func:`sanitylib.metrics.noise_floor`: pairs of different images, random masks) in
        ``df.attrs["floor"]`` (``None`` with a single image or ``floor=False``).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    fns = _metric_fns(metrics)
    if schedule not in ("cascading", "independent"):
        raise ValueError(f"unknown schedule {schedule!r}; known: 'cascading', 'independent'")
    if target not in ("current", "original"):
        raise ValueError(f"target must be 'current' or 'original', got {target!r}")
    if engine not in ("batched", "reference"):
        raise ValueError(f"engine must be 'batched' or 'reference', got {engine!r}")
    if not methods or not metrics:
        raise ValueError("methods and metrics must not be empty")
    method_options = dict(method_options or {})
    perturbation = perturbation or Perturbation()
    model.eval()
    blocks_ = get_blocks(model, blocks, x)
    stages = (cascading_stages if schedule == "cascading" else independent_stages)(blocks_)
    info = get_info(model)
    label = label or (info.name if info else type(model).__name__)
    names = list(image_names) if image_names is not None else [str(i) for i in range(len(x))]
    if len(names) != len(x):
        raise ValueError(f"image_names has {len(names)} entries for {len(x)} images")
    kept = _store_indices(store_maps, len(x))
    dev = next((t.device for t in model.parameters()), x.device)
    x = x.detach().to(dev)
    n_states = len(stages) + 1
    if engine == "reference":
        groups = [list(range(len(x)))]
    else:
        gs = group_size or _group_size(x, n_states, len(methods), None)
        groups = [list(range(i, min(len(x), i + gs))) for i in range(0, len(x), gs)]

    folder = None
    if cache:
        init = perturbation.init
        config = {
            "version": __version__, "source": _source_hash(), "schedule": schedule,
            "model": [label, _tensor_hash(model.state_dict().values())],
            "x": _tensor_hash([x]), "methods": list(methods),
            "metrics": [m if isinstance(m, str) else
                        [m.name, _identify(m.prepare, model), _identify(m.compare, model)]
                        if isinstance(m, Metric) else _identify(m, model) for m in metrics],
            "blocks": [[b.name, list(b.modules)] for b in blocks_], "seed": seed,
            "perturbation": [perturbation.kind, perturbation.sigma, perturbation.relative,
                             _identify(init, model)],
            "target": target, "options": _identify(method_options, model), "kept": kept,
            "names": names, "engine": engine, "amp": amp,
        }  # fmt: skip
        root = Path(cache) if not isinstance(cache, bool) else cache_dir("runs")
        folder = root / config_key(config)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))

    per_state = rows_per_image(methods, method_options)["total"] if engine == "batched" else len(methods)
    bar = tqdm(total=per_state * len(x) * n_states if engine == "batched" else len(methods) * n_states,
               disable=not progress, desc=f"{schedule} randomization ({label})",
               unit="pass" if engine == "batched" else "map")  # fmt: skip
    kw = dict(perturbation=perturbation, seed=seed, target=target, method_options=method_options,
              batch_size=batch_size, amp=amp, on_rows=bar.update)  # fmt: skip
    describe = perturbation.describe()
    state_names = [ORIGINAL] + [st.name for st in stages]
    rows: list[dict] = []
    stored: dict[int, dict[str, dict[str, Tensor]]] = {}  # image -> state -> method -> map
    original: dict[int, dict[str, Tensor]] = {}  # image -> method -> trained model's map
    for images in groups:
        gfile = folder / f"images_{images[0]:04d}_{images[-1]:04d}.pt" if folder else None
        if gfile is not None and gfile.exists():
            saved = torch.load(gfile, weights_only=False)
            rows += saved["rows"]
            stored.update(saved["maps"])
            bar.update(per_state * len(images) * n_states if engine == "batched" else
                       len(methods) * n_states)  # fmt: skip
            continue
        bar.set_postfix_str(f"images {images[0]}-{images[-1]}")
        gm = _compute_group(model, x, images, methods, stages, engine, kw)
        group_rows = _group_rows(gm, methods, fns, stages, names, schedule, describe, label)
        group_maps = {i: {st: {m: gm.maps[k][m][g:g + 1].half().cpu() for m in methods}
                          for k, st in enumerate(state_names)}
                      for g, i in enumerate(gm.images) if i in kept}  # fmt: skip
        if floor:
            for g, i in enumerate(gm.images):
                original[i] = {m: gm.maps[0][m][g:g + 1] for m in methods}
        if gfile is not None:
            atomic_save({"rows": group_rows, "maps": group_maps}, gfile)
        rows += group_rows
        stored.update(group_maps)
        del gm
    bar.close()

    floor_df = None
    named = [m for m in metrics if isinstance(m, str)]
    if floor and len(x) > 1 and named:
        ffile = folder / "floor.pt" if folder else None
        if ffile is not None and ffile.exists():
            floor_df = torch.load(ffile, weights_only=False)
        else:
            missing = [i for i in range(len(x)) if i not in original]
            if missing:  # images loaded from the cache: recompute the trained model's maps
                maps0 = explain_methods(model, x[missing], methods, method_options, seed,
                                        batch_size, progress=False, image_ids=missing)  # fmt: skip
                for j, i in enumerate(missing):
                    original[i] = {m: maps0[m][j:j + 1] for m in methods}
            orig_all = {m: torch.cat([original[i][m] for i in range(len(x))]) for m in methods}
            floor_df = noise_floor(orig_all, named, seed=seed)
            if ffile is not None:
                atomic_save(floor_df, ffile)

    order = {m: j for j, m in enumerate(methods)}
    morder = {n: j for j, (n, _) in enumerate(fns)}
    rows.sort(key=lambda r: (r["stage_index"], order[r["method"]], morder[r["metric"]], r["image"]))
    df = pd.DataFrame(rows)
    store = MapStore(kept)
    for st in state_names:
        store.stages[st] = {m: torch.cat([stored[i][st][m] for i in kept]) if kept else
                            torch.empty(0) for m in methods}  # fmt: skip
    df.attrs["maps"] = store
    df.attrs["stages"] = [s.name for s in stages]
    df.attrs["floor"] = floor_df
    return df


def _group_rows(gm: GroupMaps, methods: Sequence[str], fns, stages: Sequence[Stage],
                names: Sequence[str], schedule: str, describe: str, label: str) -> list[dict]:  # fmt: skip
    """Table rows of one group of images: every stage, method, metric and image.  The trained
    model's maps are post-processed once (:class:`sanitylib.engine.MapFeatures`)."""
    rows = []
    G = len(gm.images)
    orig = {m: MapFeatures(gm.maps[0][m]) for m in methods}
    prepared = {(m, n): f.prepare(orig[m].maps) for m in methods for n, f in fns
                if isinstance(f, Metric)}  # fmt: skip
    targets = gm.targets.tolist()
    for k, stage in enumerate(stages, start=1):
        for meth in methods:
            feats = MapFeatures(gm.maps[k][meth])
            const = (feats.abs_constant() | orig[meth].abs_constant()).tolist()
            for metric, fn in fns:
                if isinstance(fn, str):
                    vals = compare(fn, orig[meth], feats)
                elif isinstance(fn, Metric):
                    vals = fn.compare(prepared[(meth, metric)], fn.prepare(feats.maps))
                else:
                    vals = fn(orig[meth].maps, feats.maps)
                vals = vals.tolist()
                for g in range(G):
                    i = gm.images[g]
                    rows.append({
                        "schedule": schedule, "stage_index": k - 1, "stage": stage.name,
                        "method": meth, "image": i, "image_name": names[i], "metric": metric,
                        "value": float(vals[g]), "constant": bool(const[g]),
                        "target": int(targets[k][g]), "original_target": int(targets[0][g]),
                        "perturbation": describe, "model": label,
                    })  # fmt: skip
    return rows


def cascading_randomization(model: nn.Module, x: Tensor, methods: Sequence[str], blocks=None,
                            metrics: Sequence[str] = DEFAULT_METRICS, seed: int = 0,
                            **kwargs) -> pd.DataFrame:  # fmt: skip
    """Cascading randomization (paper section 3.1): at stage k, blocks 1..k from the top are
    randomized.  See :func:`run_randomization` for the arguments and the table."""
    return run_randomization(model, x, methods, "cascading", blocks, metrics, seed, **kwargs)


def independent_randomization(model: nn.Module, x: Tensor, methods: Sequence[str], blocks=None,
                              metrics: Sequence[str] = DEFAULT_METRICS, seed: int = 0,
                              **kwargs) -> pd.DataFrame:  # fmt: skip
    """Independent randomization (paper section 3.2): at stage k only block k is randomized.
    See :func:`run_randomization` for the arguments and the table."""
    return run_randomization(model, x, methods, "independent", blocks, metrics, seed, **kwargs)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and population std (as the authors' ``np.std``) over images, per stage, method
    and metric, in stage order."""
    g = df.groupby(["stage_index", "stage", "method", "metric"], sort=True)["value"]
    out = g.agg(mean="mean", std=lambda v: float(v.std(ddof=0)), n="count").reset_index()
    return out


def explain_methods(model: nn.Module, x: Tensor, methods: Sequence[str],
                    method_options: dict[str, dict] | None = None, seed: int = 0,
                    batch_size: int | None = None, progress: bool = True, *,
                    amp: str | None = None, image_ids: Sequence[int] | None = None,
                    ) -> dict[str, Tensor]:  # fmt: skip
    """Maps of several methods on the same images (each for the model's predicted class):
    ``{method: (N, C, H, W)}``, from the batched engine's shared passes (equal to
    :func:`sanitylib.explain` per method up to :data:`sanitylib.engine.MAP_TOLERANCE`).

    ``image_ids`` are the images' indices for the noise seeds (default ``0..N-1``, as
    ``explain``)."""
    model.eval()
    dev = next((t.device for t in model.parameters()), x.device)
    x = x.detach().to(dev)
    target = predict(model, x, batch_size or 32).argmax(1)
    total = rows_per_image(methods, method_options)["total"] * len(x)
    with tqdm(total=total, desc="saliency maps", unit="pass", disable=not progress) as bar:
        if image_ids is None:
            return compute_maps(model, x, methods, target, method_options=method_options,
                                seed=seed, batch_size=batch_size, amp=amp, on_rows=bar.update)
        if len(image_ids) != len(x):
            raise ValueError(f"image_ids has {len(image_ids)} entries for {len(x)} images")
        gm = next(iter_state_maps(model, x, methods, [()], seed=seed, target=target,
                                  method_options=method_options, batch_size=batch_size, amp=amp,
                                  image_ids=image_ids, reuse_forward=False, on_rows=bar.update))
        return {m: v.clone() for m, v in gm.maps[0].items()}
