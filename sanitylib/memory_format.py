"""Memory format of the passes: channels-last or PyTorch's default (contiguous, NCHW).

A 4-D tensor ``(N, C, H, W)`` is stored either row by row per channel (``contiguous``, PyTorch's
default) or with the channels innermost (``channels_last``, NHWC).  Convolutions on the CPU
(oneDNN) and on CUDA (cuDNN) run faster on channels-last activations, and the activations stay
channels-last from layer to layer once the input *and* the convolution weights are in that
format (channels-last input with contiguous weights was slower than either on the CPU).

**The rule** (:func:`choose`, no timing involved, so the choice never depends on the load of the
machine): with the setting ``"auto"`` (the default) the passes run channels-last when

* the images are 4-D ``(N, C, H, W)`` floating-point tensors,
* the model has at least one ``nn.Conv2d`` and no ``nn.MultiheadAttention`` (a vision
  transformer's patch embedding is one convolution; the rest of it is matrix products), and
* the model runs on the CPU or on CUDA,
* every method is one of sanitylib's: a user's method (a registered function, a callable, a
  captum class) is the user's code, which may assume the default layout (``g.view(len(g), -1)``
  on its gradients raises on channels-last ones), so a run with one keeps the default format
  unless ``"channels_last"`` is asked for, and
* its forward pass works on channels-last activations: one pass of the first image in each
  format, without gradients, in eval mode (:func:`channels_last_failure`, cached per model,
  forward code, device and input shape), must succeed and give the same logits up to rounding.
  A user's model may not: ``x.view(-1, 320)`` after a convolution (the classic PyTorch MNIST
  example) raises on a channels-last tensor, and code that reads storage by hand
  (``as_strided``, ``data_ptr``) would silently compute something else.  Such a model runs in
  the default format, announced once per model with a :class:`MemoryFormatWarning` that says
  why; forcing ``"channels_last"`` on it raises ``ValueError`` before any work starts;

otherwise (MLPs, transformers, other devices) in the default format.  Measured on the
project's 2-core machine (torch 2.14, 16 rows, forward and backward to the input, process CPU
seconds, medians): EfficientNet-Lite0 at 224x224 1.3x faster (2.07 -> 1.56 s), the MNIST CNN
1.7x (50 -> 29 ms); the benchmark and ``benchmarks/README.md`` record the engine-level figures.

**The numbers** change at the level of float rounding: a convolution sums in another order,
as a change of batch size or of thread count does in one format.  Measured on
EfficientNet-Lite0 with its shipped weights, input gradients of the trained model differed by
1.9e-4 of the map's maximum, 3.2e-3 in randomized states (the order of the batch-size effect
documented at :data:`sanitylib.engine.MAP_TOLERANCE`).  A *table value* can move more: in a
partly randomized network a rounding difference flips ReLU6 gates, and the rank correlation of
two nearly unrelated maps follows.  On the benchmark's workload (EfficientNet-Lite0, 9 methods
with the benchmark's sample counts, its 5 cascade stages, 2 photos, 360 values) the formats
differed by at most 2.5e-2 with one thread and 4.7e-2 with two (90 % of the values within
1.4e-3 / 3.2e-3), while *in the default format alone* rows of 8 instead of 16 moved the same
values by up to 2.8e-2 (90 % within 1.2e-3): the format changes the table no more than float32
arithmetic already resolves it.  Hence two documented bounds, per run (:func:`agreement`):
most values within :data:`METRIC_TOLERANCE` (the :data:`METRIC_QUANTILE` quantile of the
differences) and every value within :data:`METRIC_TOLERANCE_MAX`; maps within
:data:`MAP_TOLERANCE` of their maximum.  ``tests/test_memory_format.py`` checks every built-in
method and metric, trained, partly and fully randomized.  Where a verdict must not depend on
the last two digits, compare it with the run's noise floor, not with a fixed number.  The cache
keeps results of the two formats apart (the resolved format is part of its key).

**The setting**: ``memory_format="auto" | "contiguous" | "channels_last"`` of the runners
(:class:`sanitylib.RunSettings`, :func:`sanitylib.run_randomization`,
:func:`sanitylib.engine.iter_state_maps`, ...) or, when that is ``None``, the environment
variable ``SANITYLIB_MEMORY_FORMAT`` (same values).  ``"contiguous"`` reproduces the numbers of
sanitylib before the rule bit for bit (``tests/test_regression_tables.py`` runs with it).

**The user's model comes back exactly**: :func:`converted` changes the storage of the model's
4-D parameters and buffers for the duration of the passes (``tensor.data``, so every parameter
and buffer object, and the references other code holds to them, stay the same) and puts the
original storages back afterwards, also on error: values, strides, storages, ``requires_grad``
and training flags are those the model came with.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .attribution import probe_model
from .guard import _fingerprint
from .randomize import evaluating

__all__ = ["FORMATS", "ENV_VAR", "MAP_TOLERANCE", "METRIC_TOLERANCE", "METRIC_QUANTILE",
           "METRIC_TOLERANCE_MAX", "MemoryFormatWarning", "check_memory_format", "setting",
           "choose", "channels_last_failure", "torch_format", "converted", "as_format",
           "agreement"]  # fmt: skip

#: Documented agreement of the two formats, per map: max |channels_last - contiguous| <=
#: MAP_TOLERANCE * max |contiguous| for every built-in method, model state and image.  Measured
#: (torch 2.14, CPU, one thread, ``tests/test_memory_format.py``'s workloads): EfficientNet-Lite0
#: 1.5e-2 (IG-SmoothGrad with blocks 5 and up randomized; 3.2e-3 with the stem randomized), the
#: MNIST CNN 1.4e-2 (VarGrad in a randomized state: the variance of nearly equal noisy gradients
#: cancels, so the rounding of the gradients shows relative to the small variance); maps of the
#: trained models 2e-4 or less.
MAP_TOLERANCE = 2e-2
#: Documented agreement of the two formats, per run's table: at least a fraction
#: :data:`METRIC_QUANTILE` of the values (a metric of a method, state and image) within
#: METRIC_TOLERANCE of each other (absolute difference).  Measured: 90 % quantile 3.2e-3 on the
#: benchmark's workload with two threads (1.4e-3 with one; a change of batch size in the default
#: format alone: 1.2e-3), 1.3e-3 at most on ``tests/test_memory_format.py``'s workloads.
METRIC_TOLERANCE = 5e-3
#: The fraction of a table's values that :data:`METRIC_TOLERANCE` bounds.
METRIC_QUANTILE = 0.9
#: Documented agreement of the two formats for *every* value of a table.  Measured: 4.7e-2
#: (Gradient x Input's Spearman with blocks 5-10 of EfficientNet-Lite0 randomized, two threads;
#: 2.5e-2 with one), the same order as a change of batch size in the default format (2.8e-2).
METRIC_TOLERANCE_MAX = 0.1
#: The settings: ``"auto"`` (the rule of :func:`choose`), or a format forced for every model.
FORMATS = ("auto", "contiguous", "channels_last")
#: Environment variable read when no setting is given (``auto`` when unset or empty).
ENV_VAR = "SANITYLIB_MEMORY_FORMAT"
_DEVICES = ("cpu", "cuda")
_TORCH = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: How far the probe's channels-last logits may be from the default format's, relative to the
#: largest logit: rounding moves them by ~1e-6 in float32 (1e-3 in half precision); reading
#: the storage in the wrong order moves them by the size of the logits.
_PROBE_RTOL = {torch.float16: 3e-2, torch.bfloat16: 3e-2}
_PROBE_RTOL_DEFAULT = 1e-3
_PROBED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class MemoryFormatWarning(UserWarning):
    """The ``"auto"`` rule would run the passes channels-last, but the model's forward pass does
    not work on channels-last activations: its passes run in the default format (slower, the
    numbers unaffected).  The message says why."""


def check_memory_format(value, name: str = "memory_format") -> str | None:
    """``value`` if it is ``None`` or one of :data:`FORMATS`; otherwise ``ValueError`` naming
    ``name``."""
    if value is not None and (not isinstance(value, str) or value not in FORMATS):
        raise ValueError(f"{name} must be None or one of {', '.join(repr(f) for f in FORMATS)}, "
                         f"got {value!r}")  # fmt: skip
    return value


def setting(value: str | None = None) -> str:
    """The effective setting: ``value``, else ``$SANITYLIB_MEMORY_FORMAT``, else ``"auto"``
    (either checked, the error naming where the bad value came from)."""
    if value is not None:
        return check_memory_format(value)
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return "auto"
    return check_memory_format(env, f"the environment variable {ENV_VAR}")


def _device(model: nn.Module, x: Tensor) -> torch.device:
    return next((t.device for t in model.parameters()), x.device)


def choose(model: nn.Module, x: Tensor, value: str | None = None, methods: Sequence = ()) -> str:
    """The format of the passes of ``model`` on images like ``x``: ``"contiguous"`` or
    ``"channels_last"``.  A forced setting (``value`` or the environment variable) is returned
    as it is for 4-D inputs (a non-4-D input is always ``"contiguous"``: channels-last is defined
    for 4-D tensors only; a model that cannot run channels-last is refused); ``"auto"`` applies
    the module's rule.  ``methods``: the run's resolved methods
    (:class:`sanitylib.MethodSpec`), a user's among them keeping the default format."""
    s = setting(value)
    if not isinstance(x, Tensor) or x.ndim != 4:
        return "contiguous"
    if s == "contiguous":
        return s
    if s == "channels_last":
        why = channels_last_failure(model, x)
        if why is not None:
            source = "memory_format" if value is not None else f"the environment variable {ENV_VAR}"
            raise ValueError(f"{source} is 'channels_last', but the model cannot run channels-last: "
                             f"{why}. Use 'auto' or 'contiguous'.")  # fmt: skip
        return s
    if not x.is_floating_point() or _device(model, x).type not in _DEVICES:
        return "contiguous"
    modules = list(model.modules())
    has_conv = any(isinstance(m, nn.Conv2d) for m in modules)
    attention = any(isinstance(m, nn.MultiheadAttention) for m in modules)
    if not has_conv or attention or any(not sp.builtin for sp in methods):
        return "contiguous"
    why = channels_last_failure(model, x)
    if why is not None:
        if model not in _WARNED:
            _WARNED.add(model)
            warnings.warn(f"{type(model).__name__} runs in the default (contiguous) memory format, "
                          f"not channels-last: {why}. The numbers are unaffected; the passes are "
                          "slower (sanitylib.memory_format).", MemoryFormatWarning, stacklevel=3)  # fmt: skip
        return "contiguous"
    return "channels_last"


def channels_last_failure(model: nn.Module, x: Tensor) -> str | None:
    """Why ``model``'s forward pass does not work on channels-last activations, or ``None``
    when it does.

    The channels-last pass of the image that :func:`sanitylib.attribution.probe_model` (the
    runners' input check, whose default-format pass it reuses) probed: without gradients, in
    eval mode, the model converted by :func:`converted` (every mode, parameter and buffer comes
    back as it was); it must succeed and give the same logits up to rounding.  A model that
    fails the input check says nothing about the format (``None``: the runners report it).
    Cached per model instance, forward code, submodules, device, input shape and dtype.

    Returns:
        ``None``, or a sentence: the channels-last pass's error (e.g. ``x.view`` on a
        non-contiguous tensor) or how far its logits were from the default format's.
    """
    dev = _device(model, x)
    key = (_fingerprint(model, x), str(dev))
    hit = _PROBED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:  # the default format's pass: the runners' input check, cached
        probe = probe_model(model, x)
    except (ValueError, TypeError):  # the model's own failure, not the format's
        return None
    ref = probe.output
    try:
        with evaluating(model), torch.no_grad(), converted(model, "channels_last"):
            # a copy: the user's images stay untouched
            out = model(probe.input.clone(memory_format=torch.channels_last))
    except Exception as err:  # noqa: BLE001 - any failure here is the format's
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = f"its forward pass fails on channels-last activations ({type(err).__name__}: {first})"
        if "view" in first:
            why += "; a .reshape (or torch.flatten) instead of the .view would let it run channels-last"
    else:
        why = None
        if (isinstance(ref, Tensor) and isinstance(out, Tensor) and ref.is_floating_point()
                and bool(torch.isfinite(ref).all())):
            if out.shape != ref.shape:
                why = (f"its output has shape {tuple(out.shape)} on channels-last activations, "
                       f"{tuple(ref.shape)} in the default format")  # fmt: skip
            else:
                r, o = ref.double(), out.double()
                scale = float(r.abs().max()) if r.numel() else 0.0
                diff = float((o - r).abs().max()) if r.numel() else 0.0
                rtol = _PROBE_RTOL.get(ref.dtype, _PROBE_RTOL_DEFAULT)
                if not diff <= rtol * max(scale, 1e-12):
                    why = (f"its logits on channels-last activations differ from the default "
                           f"format's by {diff:.3g} (largest logit {scale:.3g}): it reads the "
                           "activations' storage in a fixed order (as_strided, data_ptr, ...)")  # fmt: skip
    _PROBED[model] = (key, why)
    return why


def torch_format(fmt: str) -> torch.memory_format:
    """``torch.contiguous_format`` or ``torch.channels_last`` for a resolved format name."""
    if fmt not in _TORCH:
        raise ValueError(f"fmt must be 'contiguous' or 'channels_last', got {fmt!r}")
    return _TORCH[fmt]


def as_format(t: Tensor, fmt: str) -> Tensor:
    """``t`` in format ``fmt`` (itself when it is already; a 4-D tensor only is converted)."""
    if fmt == "contiguous" or t.ndim != 4:
        return t
    return t.contiguous(memory_format=_TORCH[fmt])


@contextlib.contextmanager
def converted(model: nn.Module, fmt: str) -> Iterator[nn.Module]:
    """``model`` with its 4-D parameters and buffers in format ``fmt`` inside the block.

    Each tensor's storage is swapped (``t.data = ...``), not the tensor object, so code holding
    the model's parameters and buffers (hooks, :class:`sanitylib.randomize.ModelStates`, the
    replay's recorder) keeps working on the live tensors; values written into them inside the
    block stay there until the block ends.  On exit, also on error, every swapped tensor gets
    its original storage back (with its original strides and values: nothing wrote into it in
    between).  ``"contiguous"`` changes nothing."""
    torch_format(fmt)
    if fmt == "contiguous":
        yield model
        return
    saved: list[tuple[Tensor, Tensor]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if id(t) in seen or t.ndim != 4 or t.is_contiguous(memory_format=_TORCH[fmt]):
                    continue
                seen.add(id(t))
                saved.append((t, t.data))
                t.data = t.data.contiguous(memory_format=_TORCH[fmt])
        yield model
    finally:
        with torch.no_grad():
            for t, orig in reversed(saved):
                t.data = orig


def agreement(a, b) -> dict:
    """How two runs' table values agree, measured against the documented bounds between formats.

    ``a`` and ``b``: the ``value`` columns of two tables of the same run in two formats (or any
    two array-likes of the same length, in the same row order).  Returns ``{"n", "quantile",
    "max", "ok"}``: the number of values compared, the :data:`METRIC_QUANTILE` quantile and the
    maximum of the absolute differences, and whether the quantile is within
    :data:`METRIC_TOLERANCE`, the maximum within :data:`METRIC_TOLERANCE_MAX` and both have NaN
    in the same places (a constant map's correlation is NaN in either format)."""
    import numpy as np

    u, v = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if u.shape != v.shape:
        raise ValueError(f"a and b must have the same number of values, got {u.size} and {v.size}")
    same_nan = bool(np.array_equal(np.isnan(u), np.isnan(v)))
    d = np.abs(u - v)[~(np.isnan(u) | np.isnan(v))]
    q = float(np.quantile(d, METRIC_QUANTILE)) if d.size else 0.0
    worst = float(d.max()) if d.size else 0.0
    return {"n": int(u.size), "quantile": q, "max": worst,
            "ok": same_nan and q <= METRIC_TOLERANCE and worst <= METRIC_TOLERANCE_MAX}
