"""Randomization experiments: config -> runner -> tidy table (+ maps for figures).

:func:`cascading_randomization` and :func:`independent_randomization` compare every method's
maps on the trained model with its maps after each randomization stage and return a tidy
:class:`pandas.DataFrame` with one row per (stage, method, image, metric).  Maps of a few images
are kept for figures in ``df.attrs["maps"]`` (a :class:`MapStore`).  Finished stages are cached
on disk (atomically) under a key of the full configuration, so a rerun loads them and an
interrupted run resumes after its last finished stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__
from .attribution import METHODS, explain, predict
from .data import cache_dir
from .metrics import METRICS, is_constant, noise_floor, similarity
from .models import get_info
from .postprocess import abs_normalize
from .randomize import (Perturbation, cascading_stages, get_blocks, independent_stages,
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


def _atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _store_indices(store_maps, n: int) -> list[int]:
    if isinstance(store_maps, int):
        return list(range(min(store_maps, n)))
    idx = [int(i) for i in store_maps]
    if any(i < 0 or i >= n for i in idx):
        raise ValueError(f"store_maps indices must lie in [0, {n}), got {idx}")
    return idx


def run_randomization(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str],
    schedule: str = "cascading",
    blocks=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    seed: int = 0,
    perturbation: Perturbation | None = None,
    target: str = "current",
    method_options: dict[str, dict] | None = None,
    image_names: Sequence[str] | None = None,
    store_maps: int | Sequence[int] = 2,
    batch_size: int = 32,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    label: str | None = None,
) -> pd.DataFrame:
    """Run a randomization schedule and compare maps with the trained model's maps.

    Args:
        model: any classifier returning logits (e.g. from :func:`sanitylib.load_model`); it is
            restored bit-exactly afterwards.
        x: ``(N, C, H, W)`` preprocessed images.
        methods: names from :data:`sanitylib.attribution.METHODS`.
        schedule: ``"cascading"`` (blocks 1..k, top first) or ``"independent"`` (block k alone).
        blocks: blocks to randomize, top to bottom (default: the model's declared blocks, or
            its parameterized top-level children in reverse execution order).
        metrics: names from :data:`sanitylib.metrics.METRICS`.
        seed: seeds the per-block generators and the noise of stochastic methods (the same
            noise is used for the trained and the randomized model: common random numbers).
        perturbation: how blocks are randomized (default: the paper's re-initialization).
        target: ``"current"`` (argmax of the randomized model, as the authors) or
            ``"original"`` (the trained model's prediction).
        method_options: per-method options for :func:`sanitylib.explain`.
        image_names: names for the ``image_name`` column.
        store_maps: number of leading images (or explicit indices) whose maps are kept.
        cache: ``True`` (the sanitylib cache), a folder, or ``False``.
        progress: show a tqdm progress bar over stages x methods.
        label: a free-text label stored in the table (e.g. the model name).

    Returns:
        Tidy table with columns ``schedule, stage_index, stage, method, image, image_name,
        metric, value, constant, target, original_target, perturbation, model``; the maps in
        ``df.attrs["maps"]``; the noise floors of the trained model's maps
        (:func:`sanitylib.metrics.noise_floor`: pairs of different images, random masks) in
        ``df.attrs["floor"]`` (``None`` with a single image).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; known: {', '.join(METRICS)}")
    if schedule not in ("cascading", "independent"):
        raise ValueError(f"unknown schedule {schedule!r}; known: 'cascading', 'independent'")
    if target not in ("current", "original"):
        raise ValueError(f"target must be 'current' or 'original', got {target!r}")
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

    folder = None
    if cache:
        init = perturbation.init
        config = {
            "version": __version__, "source": _source_hash(), "schedule": schedule,
            "model": [label, _tensor_hash(model.state_dict().values())],
            "x": _tensor_hash([x]), "methods": list(methods), "metrics": list(metrics),
            "blocks": [[b.name, list(b.modules)] for b in blocks_], "seed": seed,
            "perturbation": [perturbation.kind, perturbation.sigma, perturbation.relative,
                             _identify(init, model)],
            "target": target, "options": _identify(method_options, model), "kept": kept,
            "names": names,
        }  # fmt: skip
        root = Path(cache) if not isinstance(cache, bool) else cache_dir("runs")
        folder = root / config_key(config)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))

    def maps_for(m: nn.Module, tgt: Tensor) -> dict[str, Tensor]:
        out = {}
        for meth in methods:
            out[meth] = explain(m, x, meth, target=tgt, seed=seed, batch_size=batch_size,
                                **method_options.get(meth, {}))  # fmt: skip
            bar.update(1)
        return out

    bar = tqdm(total=(len(stages) + 1) * len(methods), disable=not progress,
               desc=f"{schedule} randomization ({label})", unit="map")  # fmt: skip
    store = MapStore(kept)
    rows: list[dict] = []
    original: dict[str, Tensor] | None = None
    orig_const: dict[str, Tensor] = {}
    orig_target = predict(model, x, batch_size).argmax(1)
    original_file = folder / "original.pt" if folder else None
    floor = None
    if original_file is not None and original_file.exists():
        saved = torch.load(original_file, weights_only=False)
        store.stages[ORIGINAL], floor = saved["maps"], saved["floor"]
        bar.update(len(methods))
    snap = snapshot(model)
    for k, stage in enumerate(stages):
        stage_file = folder / f"stage_{k:03d}.pt" if folder else None
        if stage_file is not None and stage_file.exists():
            saved = torch.load(stage_file, weights_only=False)
            rows += saved["rows"]
            store.stages[stage.name] = saved["maps"]
            bar.update(len(methods))
            continue
        if original is None:
            bar.set_postfix_str("trained model")
            original = maps_for(model, orig_target)
            orig_const = {m: is_constant(abs_normalize(v).flatten(1)) for m, v in original.items()}
            store.stages[ORIGINAL] = {m: v[kept].half().cpu() for m, v in original.items()}
            floor = noise_floor(original, metrics, seed=seed) if len(x) > 1 else None
            if original_file is not None:
                _atomic_save({"maps": store.stages[ORIGINAL], "floor": floor}, original_file)
        bar.set_postfix_str(f"stage {stage.name}")
        with randomized(model, stage.blocks, perturbation, seed, snap=snap) as rmodel:
            cur = predict(rmodel, x, batch_size).argmax(1) if target == "current" else orig_target
            maps = maps_for(rmodel, cur)
        stage_rows = []
        for meth, rmaps in maps.items():
            const = (is_constant(abs_normalize(rmaps).flatten(1)) | orig_const[meth]).tolist()
            for metric in metrics:
                vals = similarity(original[meth], rmaps, metric).tolist()
                for i, v in enumerate(vals):
                    stage_rows.append({
                        "schedule": schedule, "stage_index": k, "stage": stage.name,
                        "method": meth, "image": i, "image_name": names[i], "metric": metric,
                        "value": float(v), "constant": bool(const[i]), "target": int(cur[i]),
                        "original_target": int(orig_target[i]),
                        "perturbation": perturbation.describe(), "model": label,
                    })  # fmt: skip
        stage_maps = {m: v[kept].half().cpu() for m, v in maps.items()}
        if stage_file is not None:
            _atomic_save({"rows": stage_rows, "maps": stage_maps}, stage_file)
        rows += stage_rows
        store.stages[stage.name] = stage_maps
    bar.close()
    df = pd.DataFrame(rows)
    df.attrs["maps"] = store
    df.attrs["stages"] = [s.name for s in stages]
    df.attrs["floor"] = floor
    return df


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
                    batch_size: int = 32, progress: bool = True) -> dict[str, Tensor]:  # fmt: skip
    """Maps of several methods on the same images (each for the model's predicted class),
    with a progress bar: ``{method: (N, C, H, W)}``."""
    method_options = method_options or {}
    target = predict(model, x, batch_size).argmax(1)
    out = {}
    for m in tqdm(methods, desc="saliency maps", unit="method", disable=not progress):
        out[m] = explain(model, x, m, target=target, seed=seed, batch_size=batch_size,
                         **method_options.get(m, {}))  # fmt: skip
    return out
