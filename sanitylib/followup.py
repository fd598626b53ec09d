"""Tests and controls from the papers that followed Adebayo et al. (2018).

* :func:`random_logit` (Sixt, Granz & Landgraf 2020): explain the predicted class and a random
  other class; a method whose map does not depend on the class fails.
* :func:`backward_convergence` (Sixt et al. 2020): the cosine similarity of the backward signals
  of random output directions at each block; modified-backprop rules converge to one direction
  (a rank-1 chain), so the map stops depending on the later layers.
* :func:`input_invariance` (Kindermans et al. 2019): a constant input shift compensated in the
  first convolution's bias (the outputs are unchanged) must not change the explanation.
* :func:`smprt` and :func:`emprt` (Hedström et al. 2023): smoothed and entropy-based model
  parameter randomization tests.
* :func:`activation_scales` (Binder et al. 2023, defined in :mod:`sanitylib.diagnostics`, which the
  runners use): how each block's output scale changes under a randomization schedule.
* :func:`input_times_random` (the paper's section 5.2 control): ``x * u`` against ``x * v`` for
  random ``u``, ``v``.

Every function returns a tidy :class:`pandas.DataFrame` like the runners (one row per image and
measurement), draws its randomness from explicit ``torch.Generator`` objects seeded with
:func:`sanitylib.utils.derive_seed`, checks its arguments before any work and leaves the user's
model as it was (weights, buffers, ``training`` flags).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .attribution import (DEFAULT_BATCH_SIZE, Context, check_guided_backprop, check_input,
                          check_seed, explain, predict, probe_model, resolve_targets,
                          run_method)  # fmt: skip
from .diagnostics import _block_outputs, activation_scales
from .experiment import run_randomization
from .metrics import similarity
from .models import get_info, get_submodule
from .randomize import Perturbation, evaluating, get_blocks, randomized
from .registry import MethodSpec, check_map_size, check_method_options, resolve_methods, resolve_metrics
from .utils import derive_seed

__all__ = ["random_logit", "random_targets", "backward_convergence", "input_invariance",
           "shift_compensated", "smprt", "smoothed_method", "emprt", "histogram_entropy",
           "activation_scales", "input_times_random", "RULES"]  # fmt: skip

#: Backward rules of :func:`backward_convergence`.
RULES = ("gradient", "guided_backprop")


# ----------------------------------------------------------------------------- helpers


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _check_float(name: str, v, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _names(image_names, n: int) -> list[str]:
    if image_names is None:
        return [str(i) for i in range(n)]
    if isinstance(image_names, (str, bytes)) or len(image_names) != n:
        raise ValueError(f"image_names must be a list of {n} names, one per image, got {image_names!r}")
    return [str(v) for v in image_names]


def _device_x(model: nn.Module, x: Tensor) -> Tensor:
    dev = next((p.device for p in model.parameters()), x.device)
    return x.detach().to(dev)


def _methods(methods, method_options, image_names, n: int) -> tuple[list, dict, list[str]]:
    """Resolved method specs (their options checked before any work, a misspelled method name
    among them refused), the options of the methods and the image names."""
    specs = resolve_methods(methods)
    method_options = dict(check_method_options(method_options, specs))
    return specs, method_options, _names(image_names, n)


def _metric_rows(a: Tensor, b: Tensor, metrics, base: dict, names: list[str]) -> list[dict]:
    rows = []
    for fn in metrics:
        vals = similarity(a, b, fn.name if fn.builtin else fn).tolist()
        for i, v in enumerate(vals):
            rows.append({**base, "image": i, "image_name": names[i], "metric": fn.name,
                         "value": float(v)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- random logit


def random_targets(n_classes: int, target: Tensor, seed: int = 0) -> Tensor:
    """One random class per image, different from ``target[i]`` ``(N,)``: drawn uniformly from
    the other ``n_classes - 1`` classes by a generator seeded with
    ``derive_seed(seed, "random_logit", i)`` (independent of the batch's composition)."""
    n_classes = _check_int("n_classes", n_classes, 2)
    check_seed(seed)
    target = torch.as_tensor(target)  # a list or an array, as explain takes them
    if target.ndim != 1 or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must be one int class per image (N,), got {target!r}")
    out = []
    for i, t in enumerate(target.tolist()):
        gen = torch.Generator().manual_seed(derive_seed(seed, "random_logit", i))
        r = int(torch.randint(n_classes - 1, (1,), generator=gen))
        out.append(r + (r >= t))
    return torch.tensor(out, dtype=torch.long, device=target.device)


def random_logit(model: nn.Module, x: Tensor, methods: Sequence,
                 metrics: Sequence = ("spearman_abs", "spearman", "ssim"), *, seed: int = 0,
                 target=None, random_target=None, method_options: dict | None = None,
                 image_names: Sequence[str] | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """Random-logit test (Sixt et al. 2020): the similarity of each method's map for the
    explained class and for a random other class.  A map that barely changes (similarity near
    1) does not depend on the class, so it cannot explain the class.

    Args:
        model: a classifier returning logits (restored afterwards).
        x: ``(N, C, H, W)`` inputs.
        methods: registered names, callables ``fn(model, x, target)`` or captum classes.
        metrics: registered metrics (the paper's post-processing) or callables ``f(a, b) -> (N,)``.
        seed: seeds the random classes (:func:`random_targets`) and stochastic methods.
        target: explained classes (default: the model's predictions).
        random_target: the other classes (default: :func:`random_targets`); must differ from
            ``target``.
        method_options: ``{method: {option: value}}``.
        image_names: names for the ``image_name`` column.
        batch_size: rows per pass.
        progress: show a progress bar.

    Returns:
        Columns ``test, method, image, image_name, metric, value, target, random_target``.
    """
    _check_model(model)
    batch_size = _check_int("batch_size", batch_size)
    check_input(model, x)
    check_seed(seed)
    specs, method_options, names = _methods(methods, method_options, image_names, len(x))
    fns = resolve_metrics(metrics)
    check_map_size(fns, x)
    x = _device_x(model, x)
    n_classes = probe_model(model, x).n_classes
    with evaluating(model):
        t = resolve_targets(model, x, target, batch_size)
        if random_target is None:
            r = random_targets(n_classes, t, seed)
        else:
            r = resolve_targets(model, x, random_target, batch_size)
            if bool((r == t).any()):
                raise ValueError("random_target must differ from target for every image")
        rows = []
        for sp in tqdm(specs, desc="random logit", disable=not progress):
            opts = method_options.get(sp.name, {})
            a = explain(model, x, sp, t, seed=seed, batch_size=batch_size, **opts)
            b = explain(model, x, sp, r, seed=seed, batch_size=batch_size, **opts)
            for row in _metric_rows(a, b, fns, {"test": "random_logit", "method": sp.name}, names):
                row["target"], row["random_target"] = int(t[row["image"]]), int(r[row["image"]])
                rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- convergence


class _PositiveGrad(torch.autograd.Function):
    """Identity forward; backward keeps the positive part of the incoming gradient (with the
    ReLU's own mask behind it this is Guided BackProp's rule)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        return g.clamp(min=0)


def backward_convergence(model: nn.Module, x: Tensor, rules: Sequence[str] = RULES,
                         blocks=None, *, n_directions: int = 8, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Cosine-similarity convergence (Sixt et al. 2020, section 4) of backward rules.

    For ``n_directions`` random output directions ``u_k`` (standard normal over the logits,
    from a seeded generator), the backward signal ``d(u_k . logits)/d a_l`` is computed under
    each rule at the output of every block ``l`` and at the input.  The mean cosine similarity
    over all pairs of directions is near 0 for the gradient (different directions give
    different signals) and rises towards 1 for Guided BackProp as the signal travels down: the
    chain of positive-part rules converges to a rank-1 map, so the explanation no longer
    depends on the later layers or on the class.

    Returns:
        Columns ``rule, depth, layer, image, cosine`` (``depth`` 0 is the output block, the
        last depth the input).
    """
    _check_model(model)
    check_input(model, x)
    check_seed(seed)
    if isinstance(rules, str):
        rules = [rules]
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:
        raise ValueError(f"rules must be a non-empty list of {RULES}, got {rules!r}")
    n_directions = _check_int("n_directions", n_directions, 2)
    x = _device_x(model, x)
    blocks_ = get_blocks(model, blocks, x)
    rows = []
    with evaluating(model):
        n_classes = probe_model(model, x).n_classes
        gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, "convergence"))
        u = torch.randn((n_directions, n_classes), generator=gen, device=x.device)
        if "guided_backprop" in rules:
            check_guided_backprop(model, x)
        for rule in rules:
            extra = []
            if rule == "guided_backprop":
                extra = [m.register_forward_hook(lambda _m, _i, out: _PositiveGrad.apply(out))
                         for m in model.modules() if isinstance(m, nn.ReLU)]  # fmt: skip
            outs, hooks = _block_outputs(model, blocks_)
            try:
                for i in range(len(x)):
                    xi = x[i:i + 1].expand(n_directions, *x.shape[1:]).clone().requires_grad_(True)
                    with torch.enable_grad():
                        logits = model(xi)
                        names = [b.name for b in blocks_ if b.name in outs]
                        acts = [outs[n] for n in names] + [xi]
                        grads = torch.autograd.grad((logits * u).sum(), acts, allow_unused=True)
                    for depth, (name, g) in enumerate(zip(names + ["input"], grads)):
                        if g is None:
                            continue
                        v = F.normalize(g.flatten(1).double(), dim=1)
                        cos = v @ v.T
                        iu = torch.triu_indices(n_directions, n_directions, 1)
                        rows.append({"rule": rule, "depth": depth, "layer": name, "image": i,
                                     "cosine": float(cos[iu[0], iu[1]].mean())})  # fmt: skip
                    outs.clear()
            finally:
                for h in hooks + extra:
                    h.remove()
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- input invariance


class _ShiftCompensated(nn.Module):
    """A convolution whose input is shifted by a constant: ``conv(x + c) - (conv(c) - conv(0))``
    equals ``conv(x)`` exactly in exact arithmetic.  ``conv(c) - conv(0)`` is the folded bias:
    the constant ``sum(W * c)`` inside the image and, where the convolution pads with zeros,
    the part of it that falls inside the image."""

    def __init__(self, conv: nn.Module, shift: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("shift", shift.reshape(1, -1, *([1] * (conv.weight.ndim - 2))))
        self._bias: dict[tuple, Tensor] = {}

    def folded_bias(self, like: Tensor) -> Tensor:
        key = tuple(like.shape[1:]) + (like.dtype, like.device)
        if key not in self._bias:
            with torch.no_grad():
                ones = torch.ones((1, *like.shape[1:]), dtype=like.dtype, device=like.device)
                self._bias[key] = self.conv(ones * self.shift) - self.conv(ones * 0)
        return self._bias[key]

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.conv(x) - self.folded_bias(x)


def _first_conv(model: nn.Module, x: Tensor) -> tuple[str, Tensor]:
    """Dotted path and recorded input of the first convolution that runs on ``x``."""
    seen: list[tuple[str, Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp, n=n: seen.append((n, inp[0].detach()))
                                         if not seen else None)
             for n, m in model.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd) and n]  # fmt: skip
    try:
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("input_invariance needs a model whose first layer is a convolution "
                         "(nn.Conv1d/2d/3d or a subclass); none ran in a forward pass")  # fmt: skip
    return seen[0]


def _check_shift(shift) -> None:
    """``ValueError`` naming ``shift`` unless it is a real number, a sequence of real numbers
    or a floating-point tensor (strings, bools and complex numbers are refused, not converted)."""
    what = "shift must be a finite number or one number per channel (a sequence or a tensor)"
    if isinstance(shift, Tensor):
        if shift.is_complex() or shift.dtype == torch.bool:
            raise ValueError(f"{what}, got a {shift.dtype} tensor")
        return
    items = list(shift) if isinstance(shift, (list, tuple)) else [shift]
    if not items or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in items):
        raise ValueError(f"{what}, got {shift!r}")


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(model, parent) if parent else model, name, new)


def shift_compensated(model: nn.Module, x: Tensor, shift) -> tuple[nn.Module, Tensor]:
    """A copy of ``model`` for inputs shifted by the constant ``shift`` (a number or one
    number per channel), with its first convolution compensated (Kindermans et al. 2019):
    ``copy(x + shift)`` equals ``model(x)``.  The user's model is not modified.

    The shift the first convolution sees is measured on ``x`` (a model that rescales its input
    first, like torchvision's Inception v3 with ``transform_input``, sees a rescaled shift) and
    must be a constant per channel.  Works with or without a bias and for convolutions nested
    anywhere in the model (torchvision ResNet, Inception, VGG, EfficientNet-Lite0).

    Returns:
        ``(copy, x + shift)``.
    """
    _check_model(model)
    _check_shift(shift)
    check_input(model, x)
    x = _device_x(model, x)
    c = torch.as_tensor(shift, dtype=x.dtype, device=x.device) if not isinstance(shift, Tensor) \
        else shift.to(x.device, x.dtype)
    if c.ndim > 1 or (c.ndim == 1 and c.numel() not in (1, x.shape[1])) or not torch.isfinite(c).all():
        raise ValueError(f"shift must be a finite number or one number per channel "
                         f"({x.shape[1]}), got {shift!r}")  # fmt: skip
    c = c.reshape(-1).expand(x.shape[1]).clone()
    xs = x + c.reshape(1, -1, *([1] * (x.ndim - 2)))
    path, inp = _first_conv(model, x)
    _, inp_s = _first_conv(model, xs)
    delta = (inp_s - inp).transpose(0, 1).flatten(1)  # (C', everything else)
    seen = delta.mean(1)
    scale = float(inp.abs().max()) + float(c.abs().max()) + 1e-12
    if float((delta - seen[:, None]).abs().max()) > 1e-4 * scale:
        raise ValueError(f"the first convolution ({path!r}) does not see the shift as a constant "
                         "per channel (the model transforms its input non-linearly before it)")  # fmt: skip
    copy_ = copy.deepcopy(model)
    conv = get_submodule(copy_, path)
    _set_submodule(copy_, path, _ShiftCompensated(conv, seen))
    info = get_info(copy_)
    if info is not None:  # the copy takes shifted inputs
        lo, hi = info.value_range
        copy_.sanity_info = dataclasses.replace(
            info, name=f"{info.name} (input shifted)",
            value_range=(lo + float(c.min()), hi + float(c.max())))  # fmt: skip
    return copy_, xs


def _modules_in_copy(options: dict, model: nn.Module, copy: nn.Module) -> dict:
    """``options`` with every module of ``model`` among its values (a GradCAM ``layer`` given
    as a module) replaced by the module at the same path in ``copy``, a copy of ``model``."""
    paths = {id(m): n for n, m in model.named_modules()}
    return {k: copy.get_submodule(paths[id(v)]) if isinstance(v, nn.Module) and id(v) in paths
            else v for k, v in options.items()}  # fmt: skip


def input_invariance(model: nn.Module, x: Tensor, methods: Sequence, shift=1.0,
                     metrics: Sequence = ("spearman_abs", "spearman"), *, seed: int = 0,
                     method_options: dict | None = None, image_names: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                     tolerance: float = 1e-3) -> pd.DataFrame:  # fmt: skip
    """Input invariance (Kindermans et al. 2019): explain ``model`` on ``x`` and the
    shift-compensated copy (:func:`shift_compensated`) on ``x + shift``.  The two models compute
    the same function of the image, so an input-invariant method returns the same map; the
    gradient is invariant, Gradient⊙Input and Integrated Gradients with a zero baseline are not.

    Rows carry the requested ``metrics`` and ``relative_change`` (``||m' - m|| / ||m||`` on the
    raw maps; 0 for an invariant method).  ``df.attrs["output_change"]`` holds the largest
    absolute change of the logits (checked against ``tolerance`` times the logits' scale, a
    ``RuntimeError`` otherwise) and ``df.attrs["layer"]`` the compensated convolution.

    Returns:
        Columns ``test, method, image, image_name, metric, value, shift``.
    """
    check_input(model, x)  # the model, then x (a list, a wrong shape or dtype): before any work
    check_seed(seed)
    batch_size = _check_int("batch_size", batch_size)
    _check_shift(shift)
    specs, method_options, names = _methods(methods, method_options, image_names, len(x))
    fns = resolve_metrics(metrics)
    check_map_size(fns, x)
    tolerance = _check_float("tolerance", tolerance, 0.0)
    x = _device_x(model, x)
    shifted, xs = shift_compensated(model, x, shift)
    path, _ = _first_conv(model, x)
    with evaluating(model), evaluating(shifted):
        y, ys = predict(model, x, batch_size), predict(shifted, xs, batch_size)
        change = float((y - ys).abs().max())
        if change > tolerance * (float(y.abs().max()) + 1e-12):
            raise RuntimeError(f"the shift-compensated model's logits differ by {change:.3g}")
        t = y.argmax(1)
        rows = []
        for sp in tqdm(specs, desc="input invariance", disable=not progress):
            opts = method_options.get(sp.name, {})
            a = explain(model, x, sp, t, seed=seed, batch_size=batch_size, **opts)
            b = explain(shifted, xs, sp, t, seed=seed, batch_size=batch_size,
                        **_modules_in_copy(opts, model, shifted))  # fmt: skip
            base = {"test": "input_invariance", "method": sp.name}
            rel = ((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)).tolist()
            rows += [{**base, "image": i, "image_name": names[i], "metric": "relative_change",
                      "value": float(v)} for i, v in enumerate(rel)]  # fmt: skip
            rows += _metric_rows(a, b, fns, base, names)
    df = pd.DataFrame(rows)
    df["shift"] = str(shift)
    df.attrs["output_change"] = change
    df.attrs["layer"] = path
    return df


# ----------------------------------------------------------------------------- sMPRT / eMPRT


def smoothed_method(method, n_samples: int = 50, noise_level: float = 0.1, seed: int = 0,
                    noise: Tensor | None = None, options: dict | None = None) -> MethodSpec:
    """``method`` averaged over ``n_samples`` noisy copies of each input (sMPRT's smoothing,
    Hedström et al. 2023): ``mean_k method(x + sigma * e_k)`` with ``sigma = noise_level *
    (max(x_i) - min(x_i))`` per image and unit noise ``e_k`` ``(n_samples, C, H, W)`` from a
    generator seeded with ``derive_seed(seed, "smprt")``, the same for every image and model
    state (common random numbers; independent of the batch).  ``noise`` gives ``e`` explicitly.

    Returns:
        A :class:`MethodSpec` under the method's own name, usable by the runners.
    """
    spec = resolve_methods([method])[0]
    n_samples = _check_int("n_samples", n_samples)
    noise_level = _check_float("noise_level", noise_level, 0.0, 10.0)
    check_seed(seed)
    opts = spec.settings(options or {})
    if noise is not None and (not isinstance(noise, Tensor) or noise.ndim != 4 or len(noise) != n_samples):
        raise ValueError(f"noise must be a (n_samples={n_samples}, C, H, W) tensor, got "
                         f"{getattr(noise, 'shape', noise)!r}")  # fmt: skip
    cache: dict = {}

    def unit(xc: Tensor) -> Tensor:
        if noise is not None:
            return noise.to(xc.device, xc.dtype)
        key = (tuple(xc.shape[1:]), xc.device, xc.dtype)
        if key not in cache:
            gen = torch.Generator(device=xc.device).manual_seed(derive_seed(seed, "smprt"))
            cache[key] = torch.randn((n_samples, *xc.shape[1:]), generator=gen,
                                     device=xc.device, dtype=xc.dtype)  # fmt: skip
        return cache[key]

    def smooth(model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        e = unit(x)
        total = torch.zeros_like(x)
        for k in range(n_samples):  # the noisy inputs may leave the model's usual input range
            total += run_method(spec, model, x + sigma * e[k], target, opts, ctx)
        return total / n_samples

    if spec.takes_seed or spec.draws_noise:
        # a seeded method (a user's with a seed argument, or SmoothGrad and the other built-ins
        # that draw noise, seeded by each image's index in the batch it is given): the runners
        # call the smoothed method one image at a time with that image's seed (see run_method),
        # passed on to the method, so that its noise does not depend on the batch
        def smoothed(model: nn.Module, x: Tensor, target: Tensor, seed: int) -> Tensor:
            return smooth(model, x, target, Context(seed, DEFAULT_BATCH_SIZE))
    else:
        def smoothed(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
            return smooth(model, x, target, Context(seed, DEFAULT_BATCH_SIZE))

    return MethodSpec(spec.name, smoothed, spec.label, {}, None, None, spec.guided,
                      None, spec.batch_size, False, smoothed)  # fmt: skip


def smprt(model: nn.Module, x: Tensor, methods: Sequence, blocks=None,
          metrics: Sequence = ("spearman_abs",), *, n_samples: int = 50, noise_level: float = 0.1,
          order: str = "bottom_up", seed: int = 0, noise: Tensor | None = None,
          method_options: dict | None = None, **kwargs) -> pd.DataFrame:  # fmt: skip
    """Smooth MPRT (Hedström et al. 2023): the cascading randomization test where every map
    (of the trained and of each randomized model) is first averaged over ``n_samples`` noisy
    copies of the input (:func:`smoothed_method`; the paper's ``N = 50``, noise ``0.1`` of
    each input's range), which removes the gradient's shattering noise before comparing.

    The order defaults to bottom-up (the paper's recommendation); the explained class is the
    trained model's prediction (``target="original"``, as in the paper).  ``kwargs`` go to
    :func:`sanitylib.run_randomization` (``perturbation``, ``cache``, ``image_names``, ...).

    Returns:
        The runner's table with ``test = "smprt"``.
    """
    _check_model(model)
    if not isinstance(methods, (list, tuple)):
        methods = [methods]

    method_options = check_method_options(method_options, resolve_methods(list(methods)))
    specs = [smoothed_method(m, n_samples, noise_level, seed, noise,
                             dict(method_options.get(resolve_methods([m])[0].name, {})) or None)
             for m in methods]  # fmt: skip
    kwargs.setdefault("target", "original")
    kwargs.setdefault("cache", False)
    kwargs.setdefault("floor", False)
    df = run_randomization(model, x, specs, "cascading", blocks, metrics, seed, order=order, **kwargs)
    df.insert(0, "test", "smprt")
    return df


def histogram_entropy(maps: Tensor, n_bins: int = 100) -> Tensor:
    """Shannon entropy (nats) of the histogram of each map's values ``(N,)``: ``n_bins``
    equal bins between the map's minimum and maximum (``numpy.histogram``), as eMPRT's
    complexity (Hedström et al. 2023; Quantus ``discrete_entropy``).  A constant map has
    entropy 0."""
    n_bins = _check_int("n_bins", n_bins, 2)
    if not isinstance(maps, Tensor) or maps.ndim < 2:
        raise ValueError(f"maps must be an (N, ...) tensor, got {getattr(maps, 'shape', maps)!r}")
    out = []
    for m in maps.detach().flatten(1).double().cpu().numpy():
        h, _ = np.histogram(m, bins=n_bins)
        p = h[h > 0] / h.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(out, dtype=torch.float64)


def emprt(model: nn.Module, x: Tensor, methods: Sequence, blocks=None, *, n_bins: int = 100,
          seed: int = 0, perturbation: Perturbation | Sequence[Perturbation] | None = None,
          target: str = "original",
          method_options: dict | None = None, image_names: Sequence[str] | None = None,
          batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """Efficient MPRT (Hedström et al. 2023): the relative rise of the explanation's
    complexity (:func:`histogram_entropy`) from the trained to the fully randomized model,
    ``(H(e_random) - H(e_trained)) / H(e_trained)``.  No similarity measure is needed; higher is
    better (a map that becomes noise when the model does gains entropy).

    The histogram takes every value of the raw map, all ``C x H x W`` of them; Quantus's
    ``explain`` sums the channels first, so on 3-channel maps of the built-in methods the two
    differ (a user probe measured -0.058 here against -0.004 channel-summed on one image);
    they agree on single-channel maps and on a method that sums its channels itself.

    Every block is randomized (the end of a cascade in either order).  ``target``:
    ``"original"`` (the trained model's class, as in the paper) or ``"current"``.
    ``perturbation``: one :class:`~sanitylib.Perturbation` (default: the paper's
    re-initialization) or several, each scored against the same trained model's maps
    (computed once).

    Returns:
        Columns ``test, method, image, image_name, metric, value, entropy_trained,
        entropy_random, perturbation`` with ``metric = "emprt"`` and ``perturbation`` the
        perturbation's :meth:`~sanitylib.Perturbation.describe`, in the order given.
    """
    _check_model(model)
    batch_size = _check_int("batch_size", batch_size)
    check_input(model, x)
    check_seed(seed)
    if target not in ("original", "current"):
        raise ValueError(f"target must be 'original' or 'current', got {target!r}")
    perturbations = _perturbations(perturbation)
    specs, method_options, names = _methods(methods, method_options, image_names, len(x))
    n_bins = _check_int("n_bins", n_bins, 2)
    x = _device_x(model, x)
    blocks_ = get_blocks(model, blocks, x)
    rows = []
    with evaluating(model):
        t = predict(model, x, batch_size).argmax(1)
        h0 = {sp.name: histogram_entropy(explain(model, x, sp, t, seed=seed, batch_size=batch_size,
                                                 **method_options.get(sp.name, {})), n_bins)
              for sp in tqdm(specs, desc="eMPRT (trained)", disable=not progress)}  # fmt: skip
        for pert in perturbations:
            with randomized(model, blocks_, pert, seed) as rm:
                tr = t if target == "original" else predict(rm, x, batch_size).argmax(1)
                for sp in tqdm(specs, desc="eMPRT (random)", disable=not progress):
                    h1 = histogram_entropy(explain(rm, x, sp, tr, seed=seed, batch_size=batch_size,
                                                   **method_options.get(sp.name, {})), n_bins)  # fmt: skip
                    for i in range(len(x)):
                        e0, e1 = float(h0[sp.name][i]), float(h1[i])
                        rows.append({"test": "emprt", "method": sp.name, "image": i,
                                     "image_name": names[i], "metric": "emprt",
                                     "value": (e1 - e0) / e0 if e0 > 0 else math.nan,
                                     "entropy_trained": e0, "entropy_random": e1,
                                     "perturbation": pert.describe()})  # fmt: skip
    return pd.DataFrame(rows)


def _perturbations(perturbation) -> list[Perturbation]:
    """``emprt``'s ``perturbation`` as a non-empty list (``None``: the paper's re-initialization)."""
    one = perturbation is None or isinstance(perturbation, Perturbation)
    items = [perturbation] if one else perturbation
    if not one and not (isinstance(items, (list, tuple)) and items):
        raise ValueError("perturbation must be a sanitylib.Perturbation, a non-empty list or tuple "
                         f"of them, or None, got {perturbation!r}")
    for p in items:
        if p is not None and not isinstance(p, Perturbation):
            raise ValueError(f"perturbation must be a sanitylib.Perturbation or None, got {p!r}")
    out = [Perturbation() if p is None else p for p in items]
    labels = [p.describe() for p in out]  # the rows' perturbation column tells them apart
    if len(set(labels)) < len(labels):
        raise ValueError(f"perturbation: two of them have the same description {labels}; give "
                         "custom initializers distinct function names")
    return out


# ----------------------------------------------------------------------------- section 5.2


def input_times_random(x: Tensor, metrics: Sequence = ("spearman_abs", "spearman", "ssim"), *,
                       seed: int = 0, distribution: str = "normal") -> pd.DataFrame:
    """The paper's section 5.2 control: ``x * u`` against ``x * v`` for independent random
    "gradients" ``u``, ``v`` (standard normal or uniform in [-1, 1], from seeded generators,
    per image).  High similarity shows that the input multiplier alone makes maps look alike.

    Returns:
        Columns ``test, method, image, image_name, metric, value``.
    """
    check_input_shape = isinstance(x, Tensor) and x.ndim == 4 and x.is_floating_point() and len(x)
    if not check_input_shape:
        raise ValueError(f"x must be a non-empty float (N, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', x)!r}")  # fmt: skip
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    check_seed(seed)
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")
    fns = resolve_metrics(metrics)
    check_map_size(fns, x)

    def draw(tag: str, i: int) -> Tensor:
        gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, "input_x_random", tag, i))
        if distribution == "normal":
            return torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)
        return torch.rand(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) * 2 - 1

    u = torch.stack([draw("u", i) for i in range(len(x))])
    v = torch.stack([draw("v", i) for i in range(len(x))])
    return pd.DataFrame(_metric_rows(x * u, x * v, fns, {"test": "input_times_random",
                                                          "method": "input_x_random"},
                                     _names(None, len(x))))  # fmt: skip
