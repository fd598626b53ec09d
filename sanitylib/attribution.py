"""Saliency methods with the paper's hyper-parameters, on top of captum.

``explain(model, x, method)`` returns a map with the shape of ``x``.  Defaults follow the
authors' code (PAIR ``saliency`` 0.0.4), not captum's: signed gradients, Integrated Gradients
with 50 steps on ``linspace(0, 1, 50)`` and a zero baseline, SmoothGrad with
``sigma = 0.15 * (max - min)`` per image and 50 samples, VarGrad and IG-SmoothGrad with 25
samples, GradCAM with ReLU and bilinear upsampling.  Noise is drawn from seeded
``torch.Generator`` s (one per image), never from the global RNG, so two calls with the same seed
use the same noise (common random numbers across models).

Modified-backprop methods (Guided BackProp, Guided GradCAM) are guarded: captum only hooks
``nn.ReLU`` modules, and on a model with functional ReLUs (torchvision's Inception v3) or
``nn.ReLU6`` (EfficientNet-Lite) it silently returns the plain gradient.  Before using them,
:func:`check_guided_backprop` traces a forward pass and raises :class:`GuidedBackpropError` if any
ReLU-type operation runs outside an ``nn.ReLU`` module (one rule for every form it can see:
``F.relu``, ``torch.relu``, ``F.relu6``/``hardtanh``, ``F.leaky_relu``, ``F.threshold``,
``clamp(min=0)``/``clamp_min(0)``, ``torch.maximum(h, 0)``, ``torch.where(h > 0, h, 0)``,
``h * (h > 0)``), and warns (:class:`GuidedBackpropWarning`) where other nonlinearities
(Hardswish, SiLU, GELU, sigmoid, the elementwise maximum of two tensors, ...) run beside the
ReLUs: the guided rule applies to the ReLUs only.

Every entry point checks its input against the model up front (:func:`check_input`,
:func:`probe_model`: one cached forward pass of one image) and runs the model in eval mode,
restoring the user's ``training`` flags and buffers afterwards
(:func:`sanitylib.randomize.evaluating`).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .guard import GuidedBackpropError, GuidedBackpropWarning, _fingerprint, check_guided_backprop
from .models import get_info, get_submodule
from .randomize import evaluating
from .registry import MethodSpec, Passes, _register_builtin, check_methods_fit, resolve_method
from .utils import MAX_SEED, check_seed, derive_seed  # noqa: F401  (re-exported)

__all__ = ["METHODS", "PAPER_SETTINGS", "GuidedBackpropError", "GuidedBackpropWarning",
           "ProbabilityOutputWarning", "ModelProbe", "explain", "predict", "check_guided_backprop",
           "check_input", "check_targets", "probe_model", "resolve_targets", "run_method",
           "unit_noise", "Context", "check_seed", "check_model", "check_baseline", "image_seed"]  # fmt: skip

#: The built-in methods (registered below; :func:`sanitylib.method_names` lists users' too).
METHODS = (
    "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
    "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam", "edge_detector",
)  # fmt: skip

#: The authors' hyper-parameters (the paper's Appendix and the authors' code); options of :func:`explain`.
PAPER_SETTINGS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 50, "baseline": 0.0, "rule": "paper"},
    "smoothgrad": {"n_samples": 50, "noise_level": 0.15},
    "vargrad": {"n_samples": 25, "noise_level": 0.15},
    "ig_smoothgrad": {"n_samples": 25, "noise_level": 0.15, "n_steps": 50, "baseline": 0.0,
                      "rule": "paper"},
    "gradcam": {"layer": None},
    "guided_gradcam": {"layer": None},
}  # fmt: skip

DEFAULT_BATCH_SIZE = 32


class ProbabilityOutputWarning(UserWarning):
    """The model seems to return probabilities (or log-probabilities), not logits."""


# ----------------------------------------------------------------------------- checks


def check_model(model) -> None:
    """``ValueError`` naming ``model`` unless it is a ``torch.nn.Module`` (a plain function is
    refused: sanitylib needs its parameters, modules and modes)."""
    if not isinstance(model, nn.Module):
        hint = (" (wrap a function in an nn.Module whose forward calls it)"
                if callable(model) else "")  # fmt: skip
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def check_baseline(baseline, x: Tensor, name: str = "baseline") -> None:
    """``ValueError`` naming ``name`` unless the Integrated Gradients ``baseline`` (a number or
    a tensor) broadcasts to ``x``'s shape ``(N, C, H, W)`` (e.g. ``(C, H, W)``, ``(1, C, 1, 1)``
    or ``(N, C, H, W)``) and is finite."""
    if isinstance(baseline, Tensor):
        try:
            shape = torch.broadcast_shapes(tuple(baseline.shape), tuple(x.shape))
        except RuntimeError:
            shape = None
        if shape != tuple(x.shape):
            raise ValueError(f"{name} of shape {tuple(baseline.shape)} does not broadcast to the "
                             f"input's shape {tuple(x.shape)}; pass a number or a tensor of shape "
                             "(C, H, W), (1, C, 1, 1) or (N, C, H, W)")  # fmt: skip
        if not torch.isfinite(baseline).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _check_noise_tensor(noise, x: Tensor, spec) -> None:
    """``explain``'s explicit ``noise``: a finite ``(N, S, C, H, W)`` tensor for ``x`` ``(N, C,
    H, W)``, for a method that draws noise (it was broadcast, indexed out of range, or silently
    ignored by the other methods)."""
    if not spec.draws_noise:
        raise ValueError(f"noise: method {spec.name!r} draws no noise (noise is for SmoothGrad, "
                         "VarGrad and IG-SmoothGrad)")  # fmt: skip
    if not isinstance(noise, Tensor):
        raise ValueError(f"noise must be a tensor (N, S, C, H, W), got {type(noise).__name__}")
    if noise.ndim != 5 or noise.shape[0] != len(x) or noise.shape[1] < 1 \
            or tuple(noise.shape[2:]) != tuple(x.shape[1:]):  # fmt: skip
        raise ValueError(f"noise must have shape (N, S, C, H, W) = ({len(x)}, S, "
                         f"{', '.join(map(str, x.shape[1:]))}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(noise.shape)}")  # fmt: skip
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or infinite values")


def check_input(model: nn.Module, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite, non-empty float ``(N, C, H, W)`` batch
    suited to ``model``: shape and value range are checked for built-in models, the dtype
    against the model's parameters, and one forward pass of ``x[:1]`` (:func:`probe_model`,
    cached) must succeed and return logits ``(1, classes)``."""
    check_model(model)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"x must hold at least one image, got an empty batch of shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    info = get_info(model)
    if info is not None:
        if tuple(x.shape[1:]) != tuple(info.input_size):
            raise ValueError(
                f"{info.name} expects inputs of shape (N, {', '.join(map(str, info.input_size))}), "
                f"got {tuple(x.shape)}; preprocess with sanitylib.load_photos(model, ...)"
            )
        lo, hi = info.value_range
        tol = 0.05 * (hi - lo)
        if float(x.min()) < lo - tol or float(x.max()) > hi + tol:
            raise ValueError(
                f"{info.name} expects preprocessed inputs in [{lo:.2f}, {hi:.2f}], got values in "
                f"[{float(x.min()):.2f}, {float(x.max()):.2f}] (raw 0-255 pixels?); preprocess "
                "with sanitylib.load_photos(model, ...)"
            )
    probe_model(model, x)


# ----------------------------------------------------------------------------- model probe


@dataclass(frozen=True)
class ModelProbe:
    """What one forward pass of one image says about a model (:func:`probe_model`)."""

    n_classes: int
    probabilities: bool  # the outputs look like (log-)probabilities, not logits
    #: the probed image ``x[:1]`` (a copy, on the model's device) and the model's output on it,
    #: for checks that compare another pass with this one (:mod:`sanitylib.memory_format`)
    input: Tensor | None = field(default=None, compare=False, repr=False)
    output: Tensor | None = field(default=None, compare=False, repr=False)


_PROBED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_WARNED_PROBS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_TO_DTYPE = {torch.float32: "x.float()", torch.float64: "x.double()", torch.float16: "x.half()",
             torch.bfloat16: "x.bfloat16()"}  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if hasattr(m, "in_channels") or isinstance(m, nn.Linear):
            return name, m
    return None


def _forward_failure(model: nn.Module, x: Tensor, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    msg = (f"x of shape {tuple(x.shape)} and dtype {_dtype_name(x.dtype)} does not fit the model: "
           f"its forward pass failed with {type(err).__name__}: {first}")  # fmt: skip
    layer = _first_layer(model)
    if layer is not None:
        name, m = layer
        if hasattr(m, "in_channels") and m.in_channels != x.shape[1]:
            msg += (f". The model's first layer ({name or type(model).__name__}: "
                    f"{type(m).__name__}) expects {m.in_channels} input channels, x has "
                    f"{x.shape[1]}: expected shape (N, {m.in_channels}, H, W)")  # fmt: skip
        elif isinstance(m, nn.Linear) and m.in_features != x[0].numel():
            msg += (f". The model's first layer ({name or type(model).__name__}: Linear) expects "
                    f"{m.in_features} input features, x has {x[0].numel()} per image")  # fmt: skip
    return msg


def probe_model(model: nn.Module, x: Tensor) -> ModelProbe:
    """Check ``model`` against the batch ``x`` with one forward pass of ``x[:1]`` (no grad, eval
    mode, the user's modes and buffers restored), cached per model instance, forward code,
    submodules, input shape and dtype.

    Raises:
        ValueError: ``x``'s dtype differs from the model's parameters', or the forward pass
            fails on ``x`` (wrong channel count, size, ...): the message says what the model
            expects; or the output is not ``(1, classes)``.
        TypeError: the model does not return a tensor (a tuple, a dict): it must return logits.

    Warns:
        ProbabilityOutputWarning: (once per model) the output rows are probabilities (in [0, 1],
            summing to 1) or log-probabilities; saliency of those differs from the paper's
            saliency of logits.
    """
    key = _fingerprint(model, x)
    hit = _PROBED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = sorted({p.dtype for p in params}, key=str)
    if dtypes and x.dtype not in dtypes:
        want = dtypes[0]
        raise ValueError(
            f"x has dtype {_dtype_name(x.dtype)} but the model's parameters are "
            f"{'/'.join(_dtype_name(d) for d in dtypes)}; convert with "
            f"{_TO_DTYPE.get(want, f'x.to({want})')}"
        )
    xp = x[:1].detach()
    if params and xp.device != params[0].device:
        xp = xp.to(params[0].device)  # the engine moves x to the model's device itself
    xp = xp.clone()  # the user's images stay untouched whatever the model does to its input
    try:
        with evaluating(model), torch.no_grad():
            out = model(xp)
    except (RuntimeError, AssertionError) as err:  # torch's shape, dtype and size errors
        # (torchvision checks an image's size with torch._assert: an AssertionError)
        raise ValueError(_forward_failure(model, x, err)) from err
    given = x[:1].detach().to(xp.device)
    if not bool(((xp == given) | (xp.isnan() & given.isnan())).all()):
        raise ValueError(
            "the model's forward pass modifies its input in place (e.g. x.sub_(mean) or "
            "x.clamp_(...)): the saliency of an input the model overwrites is not defined, and "
            "the passes give the input to autograd. Use out-of-place operations "
            "(x = (x - mean) / std)")
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model must return logits (N, classes) as a single Tensor, got "
            f"{type(out).__name__}; wrap it so that forward returns the logits (e.g. the first "
            "element of a tuple, or output.logits)"
        )
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
        raise ValueError(f"the model must return logits (N, classes), got an output of shape "
                         f"{tuple(out.shape)} for x[:1] of shape {tuple(xp.shape)}")  # fmt: skip
    o = out.detach().double()
    probs = bool(torch.isfinite(o).all()) and out.shape[1] > 1 and (
        bool(((o >= 0) & (o <= 1)).all() and ((o.sum(1) - 1).abs() <= 1e-4).all())
        or bool((o <= 0).all() and ((o.exp().sum(1) - 1).abs() <= 1e-4).all()))  # fmt: skip
    if probs and model not in _WARNED_PROBS:
        _WARNED_PROBS.add(model)
        warnings.warn(
            "the model's outputs look like probabilities (rows in [0, 1] summing to 1) or "
            "log-probabilities, not logits: saliency of softmax outputs differs from the paper's "
            "saliency of logits (each class's map then mixes in every other class). Explain the "
            "model without its final softmax if you can.", ProbabilityOutputWarning, stacklevel=3)
    probe = ModelProbe(int(out.shape[1]), probs, xp, out.detach())
    _PROBED[model] = (key, probe)
    return probe


# ----------------------------------------------------------------------------- helpers


def unit_noise(xi: Tensor, n: int, seed: int, index: int) -> Tensor:
    """``(n, *xi.shape)`` standard normal noise of image ``index`` (``xi``: its ``(C, H, W)``
    input), from a generator seeded with ``derive_seed(seed, "noise", index)``.

    Samples are drawn one at a time, so the first ``k`` samples do not depend on ``n``
    (SmoothGrad, VarGrad and IG-SmoothGrad of one image share a prefix of one stream: common
    random numbers across methods, sample counts, devices and batch compositions)."""
    gen = torch.Generator(device=xi.device).manual_seed(derive_seed(seed, "noise", index))
    out = torch.empty((n, *xi.shape), dtype=xi.dtype, device=xi.device)
    for k in range(n):
        out[k] = torch.randn(xi.shape, generator=gen, device=xi.device, dtype=xi.dtype)
    return out


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Logits ``(N, classes)`` of ``model`` on ``x``, computed in chunks."""
    return torch.cat([model(c) for c in x.split(batch_size)])


def check_targets(target, n_classes: int | None = None, name: str = "target") -> Tensor:
    """``target`` (an int, a sequence of ints or an integer tensor/array) as a 1-D long tensor,
    each entry in ``[0, n_classes)``; ``ValueError`` naming ``name`` otherwise (bools, floats,
    strings and negative indices are refused, not converted)."""
    what = (f"{name} must be a class index (an int), a sequence of them or an integer tensor"
            f"{f' with values in [0, {n_classes})' if n_classes else ''}")  # fmt: skip
    if isinstance(target, (bool, str, bytes)) or target is None:
        raise ValueError(f"{what}, got {target!r}")
    if isinstance(target, numbers.Integral):
        t = torch.tensor([int(target)])
    else:
        if isinstance(target, (list, tuple)) and any(isinstance(v, (bool, str)) for v in target):
            raise ValueError(f"{what}, got {target!r}")
        try:
            t = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{what}, got {target!r}") from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{what}, got a {t.dtype} value {target!r}")
        t = t.reshape(-1).long()
    if t.numel() and n_classes is not None and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        bad = sorted({int(v) for v in t if not 0 <= int(v) < n_classes})
        raise ValueError(f"{name} must be in [0, {n_classes}) (the model returns {n_classes} "
                         f"logits; negative indices are not allowed), got {bad[:5]}")  # fmt: skip
    return t


def resolve_targets(model: nn.Module, x: Tensor, target, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """The ``(N,)`` classes to explain: ``target`` (an int, a sequence or a tensor with one entry
    per image, each in ``[0, classes)``) or, for ``None``, the argmax of the model's logits on
    ``x`` (the caller chooses the model's mode)."""
    if target is None:
        return predict(model, x, batch_size).argmax(1)
    t = check_targets(target, probe_model(model, x).n_classes).to(x.device)
    if t.numel() == 1:
        t = t.expand(len(x))
    if t.numel() != len(x):
        raise ValueError(f"target must be an int or have one entry per image ({len(x)}), "
                         f"got {t.numel()}")  # fmt: skip
    return t


def _gradients(model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """d logit[target] / d x for every row of x, in chunks of ``batch_size`` rows."""
    out = []
    for xc, tc in zip(x.split(batch_size), target.split(batch_size)):
        xc = xc.detach().requires_grad_(True)
        logits = model(xc)
        sel = logits.gather(1, tc[:, None]).sum()
        out.append(torch.autograd.grad(sel, xc)[0])
    return torch.cat(out)


def ig_weights(n_steps: int, rule: str, device) -> tuple[Tensor, Tensor]:
    """Path points (alphas) and weights of the Riemann sum for Integrated Gradients."""
    if rule == "paper":  # PAIR: mean of the gradients at linspace(0, 1, n), both ends included
        return torch.linspace(0, 1, n_steps, device=device), torch.full(
            (n_steps,), 1.0 / n_steps, device=device)  # fmt: skip
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(rule)
    return (torch.tensor(alphas(n_steps), device=device),
            torch.tensor(step_sizes(n_steps), device=device))  # fmt: skip


def _integrated_gradients(model, x, target, n_steps, baseline, rule, batch_size) -> Tensor:
    alphas, weights = ig_weights(n_steps, rule, x.device)
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    out = []
    for i in range(len(x)):  # one image's path at a time, the path itself batched
        path = base[i] + alphas.view(-1, 1, 1, 1) * (x[i] - base[i])
        g = _gradients(model, path, target[i].expand(n_steps), batch_size)
        out.append((weights.view(-1, 1, 1, 1) * g).sum(0) * (x[i] - base[i]))
    return torch.stack(out)


def _noise_tunnel(base: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor,
                  n_samples: int, noise_level: float, kind: str, seed: int,
                  noise: Tensor | None, chunk: int) -> Tensor:  # fmt: skip
    """SmoothGrad (``kind="mean"``) or VarGrad (``kind="var"``) around ``base``.

    The noise of image ``i`` has standard deviation ``noise_level * (x_i.max() - x_i.min())``
    and is :func:`unit_noise` ``(x_i, n_samples, seed, i)`` times that, unless ``noise``
    ``(N, S, C, H, W)`` (unit-free, added as is) is given.
    """
    out = []
    for i in range(len(x)):
        if noise is not None:
            eps = noise[i].to(x.device, x.dtype)
        else:
            sigma = noise_level * float(x[i].max() - x[i].min())
            eps = unit_noise(x[i], n_samples, seed, i) * sigma
        s1 = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        s2 = torch.zeros_like(s1) if kind == "var" else None
        for e in eps.split(chunk):
            a = base(x[i] + e, target[i].expand(len(e))).double()
            s1 += a.sum(0)
            if s2 is not None:
                s2 += (a * a).sum(0)
        mean = s1 / len(eps)
        out.append((mean if s2 is None else s2 / len(eps) - mean * mean).to(x.dtype))
    return torch.stack(out)


def gradcam_layer(model: nn.Module, layer) -> nn.Module:
    """The module GradCAM reads: ``layer`` (a module or dotted path) or, for ``None``, the
    model's declared GradCAM layer (:class:`sanitylib.models.ModelInfo`)."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        info = get_info(model)
        if info is None or not info.gradcam_layer:
            raise ValueError(
                "GradCAM needs a layer: pass layer='<dotted module path>' or a module (the "
                "last convolutional block's output, e.g. 'Mixed_7c' on Inception v3)"
            )
        layer = info.gradcam_layer
    return get_submodule(model, layer)


def cam_to_map(cam: Tensor, like: Tensor) -> Tensor:
    """GradCAM's post-processing, as the authors: the ReLU'd ``(n, 1, h, w)`` CAM divided by its
    peak (all-zero stays zero), bilinear upsampling to ``like``'s size, tiled over its channels."""
    peak = cam.amax(dim=(1, 2, 3), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-30), torch.zeros_like(cam))
    cam = F.interpolate(cam, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, like.shape[1], -1, -1)


def _gradcam(model, x, target, layer, batch_size) -> Tensor:
    from captum.attr import LayerGradCam

    module = gradcam_layer(model, layer)
    cam_attr = LayerGradCam(model, module)
    out = []
    for xc, tc in zip(x.split(batch_size), target.split(batch_size)):
        cam = cam_attr.attribute(xc, target=tc, relu_attributions=True)  # (n, 1, h, w)
        if cam.ndim != 4:  # captum sums the layer's output over dim 1: the CAM has its ndim
            name = layer if isinstance(layer, str) else type(module).__name__
            raise ValueError(f"GradCAM needs a layer whose output is a (N, K, h, w) feature map; "
                             f"layer {name!r} returns a {cam.ndim}-D output: pick a convolutional "
                             "layer")  # fmt: skip
        out.append(cam_to_map(cam, xc))
    return torch.cat(out).detach()


def _guided_backprop(model, x, target, batch_size) -> Tensor:
    from captum.attr import GuidedBackprop

    gbp = GuidedBackprop(model)
    return torch.cat([gbp.attribute(xc, target=tc).detach()
                      for xc, tc in zip(x.split(batch_size), target.split(batch_size))])  # fmt: skip


def edge_detector(x: Tensor) -> Tensor:
    """Sobel edge magnitude of the grey image, tiled over the channels (a model-independent
    "explanation", paper Fig. 1)."""
    from skimage.filters import sobel

    gray = x.detach().mean(1).cpu().double().numpy()
    edges = torch.stack([torch.from_numpy(sobel(g)) for g in gray]).to(x.device, x.dtype)
    return edges[:, None].expand(-1, x.shape[1], -1, -1).contiguous()


# ----------------------------------------------------------------------------- built-in methods


@dataclass(frozen=True)
class Context:
    """What a method needs besides its options: the noise seed, the rows per pass, optional
    explicit noise ``(N, S, C, H, W)`` and the index of each image (``image_ids``, default
    ``0..N-1``: the images' positions) that seeds its noise."""

    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    noise: Tensor | None = None
    image_ids: tuple[int, ...] | None = None


def image_seed(seed: int, index: int) -> int:
    """The seed a user method with a ``seed`` argument receives for image ``index`` of a run
    seeded with ``seed``: ``derive_seed(seed, "noise", index)``, the seed of the built-in
    methods' noise of that image (:func:`unit_noise`)."""
    return derive_seed(seed, "noise", index)


def check_batch_size(value, name: str = "batch_size") -> None:
    """``ValueError`` naming ``name`` unless ``value`` is None or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or value < 1):
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


def _check_int(settings: dict, key: str, lo: int = 1) -> None:
    v = settings[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")


def _check_noise_level(settings: dict) -> None:
    v = settings["noise_level"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 10:
        raise ValueError(f"noise_level must be a finite number in [0, 10] (the noise's standard "
                         f"deviation as a fraction of each image's value range), got {v!r}")  # fmt: skip


def _check_ig(settings: dict) -> None:
    _check_int(settings, "n_steps")
    rule = settings["rule"]
    valid = ("paper", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
             "gausslegendre")  # fmt: skip
    if rule not in valid:
        raise ValueError(f"rule must be one of {valid}, got {rule!r}")
    b = settings["baseline"]
    if not isinstance(b, (int, float, Tensor)) or isinstance(b, bool):
        raise ValueError(f"baseline must be a number or a tensor broadcastable to x, got {b!r}")
    if not isinstance(b, Tensor) and not math.isfinite(b):  # NaN maps, silently
        raise ValueError(f"baseline must be finite, got {b!r}")


def _check_noise(settings: dict) -> None:
    _check_int(settings, "n_samples")
    _check_noise_level(settings)


def _check_ig_noise(settings: dict) -> None:
    _check_noise(settings)
    _check_ig(settings)


def _builtin(name: str, label: str, fn: Callable, passes: Passes, validate=None, *,
             guided: bool = False, layer: bool = False) -> MethodSpec:  # fmt: skip
    return _register_builtin(MethodSpec(
        name, fn, label, dict(PAPER_SETTINGS.get(name, {})), validate, passes, guided,
        "layer" if layer else None, None, True, None))  # fmt: skip


def _ig_fn(model, x, t, ctx: Context, *, n_steps, baseline, rule) -> Tensor:
    return _integrated_gradients(model, x, t, n_steps, baseline, rule, ctx.batch_size)


def _noise_fn(kind: str) -> Callable:
    def fn(model, x, t, ctx: Context, *, n_samples, noise_level) -> Tensor:
        def grad(inp: Tensor, tgt: Tensor) -> Tensor:
            return _gradients(model, inp, tgt, ctx.batch_size)

        return _noise_tunnel(grad, x, t, n_samples, noise_level, kind, ctx.seed, ctx.noise,
                             ctx.batch_size)  # fmt: skip

    return fn


def _ig_smoothgrad_fn(model, x, t, ctx: Context, *, n_samples, noise_level, n_steps, baseline,
                      rule) -> Tensor:  # fmt: skip
    def ig(inp: Tensor, tgt: Tensor) -> Tensor:
        return _integrated_gradients(model, inp, tgt, n_steps, baseline, rule, ctx.batch_size)

    return _noise_tunnel(ig, x, t, n_samples, noise_level, "mean", ctx.seed, ctx.noise,
                         max(1, ctx.batch_size // n_steps))  # fmt: skip


# The order of registration is the order of the figures' colours.
_builtin("gradient", "Gradient", lambda model, x, t, ctx: _gradients(model, x, t, ctx.batch_size),
         Passes("x", plain=True, combine=lambda x, g, cam, gbp: g))
_builtin("input_x_gradient", "Gradient⊙Input",
         lambda model, x, t, ctx: _gradients(model, x, t, ctx.batch_size) * x,
         Passes("x", plain=True, combine=lambda x, g, cam, gbp: g * x))
_builtin("integrated_gradients", "Integrated Gradients", _ig_fn, Passes("ig"), _check_ig)
_builtin("smoothgrad", "SmoothGrad", _noise_fn("mean"), Passes("noise", statistic="mean"),
         _check_noise)
_builtin("vargrad", "VarGrad", _noise_fn("var"), Passes("noise", statistic="var"), _check_noise)
_builtin("ig_smoothgrad", "IG-SmoothGrad", _ig_smoothgrad_fn, Passes("ig_noise"), _check_ig_noise)
_builtin("guided_backprop", "Guided BackProp",
         lambda model, x, t, ctx: _guided_backprop(model, x, t, ctx.batch_size),
         Passes("x", guided=True, combine=lambda x, g, cam, gbp: gbp), guided=True)
_builtin("gradcam", "GradCAM",
         lambda model, x, t, ctx, *, layer: _gradcam(model, x, t, layer, ctx.batch_size),
         Passes("x", plain=True, layer=True, combine=lambda x, g, cam, gbp: cam), layer=True)
# the authors' elementwise product, with bilinear GradCAM
_builtin("guided_gradcam", "Guided GradCAM",
         lambda model, x, t, ctx, *, layer: (_guided_backprop(model, x, t, ctx.batch_size)
                                             * _gradcam(model, x, t, layer, ctx.batch_size)),
         Passes("x", plain=True, guided=True, layer=True, combine=lambda x, g, cam, gbp: gbp * cam),
         guided=True, layer=True)  # fmt: skip
_builtin("edge_detector", "Edge detector", lambda model, x, t, ctx: edge_detector(x),
         Passes("input", combine=edge_detector))


# ----------------------------------------------------------------------------- running a method


def _check_map(spec: MethodSpec, out, x: Tensor) -> Tensor:
    """A user method's output as an ``(n, C, H, W)`` map of ``x``'s dtype (``(n, 1, H, W)`` is
    tiled over the channels)."""
    if isinstance(out, tuple) and len(out) == 1:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"method {spec.name!r} must return a Tensor, got {type(out).__name__}")
    if out.ndim == 4 and out.shape[1] == 1 and x.shape[1] != 1 and out.shape[2:] == x.shape[2:]:
        out = out.expand(-1, x.shape[1], -1, -1)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"method {spec.name!r} returned shape {tuple(out.shape)} for input "
                         f"{tuple(x.shape)}; a saliency map must have the input's shape "
                         "(or (N, 1, H, W))")  # fmt: skip
    if not torch.isfinite(out).all():
        raise ValueError(f"method {spec.name!r} returned NaN or infinite values")
    return out.detach().to(x.device, x.dtype)


def run_method(spec: MethodSpec, model: nn.Module, x: Tensor, target: Tensor, settings: dict,
               ctx: Context = Context()) -> Tensor:  # fmt: skip
    """One method's maps ``(N, C, H, W)`` of ``x`` for the classes ``target`` ``(N,)``, with
    resolved ``settings`` (:meth:`MethodSpec.settings`); the straightforward computation, one
    method at a time (:mod:`sanitylib.engine` shares passes between built-ins).  Modified-backprop
    methods are guarded (:func:`check_guided_backprop`)."""
    if spec.guided:
        check_guided_backprop(model, x)
    if spec.builtin:
        return spec.fn(model, x, target, ctx, **settings)
    kwargs = dict(settings)
    out = []
    if spec.takes_seed:
        # one image per call with its own seed: the result does not depend on how the images
        # are batched (nor on the batch size), as for the built-in methods
        ids = ctx.image_ids if ctx.image_ids is not None else range(len(x))
        if len(ids) != len(x):
            raise ValueError(f"image_ids has {len(ids)} entries for {len(x)} images")
        for i, k in enumerate(ids):
            xc, tc = x[i: i + 1], target[i: i + 1]
            with torch.enable_grad():
                out.append(_check_map(spec, spec.fn(model, xc.detach(), tc, **kwargs,
                                                    seed=image_seed(ctx.seed, int(k))), xc))  # fmt: skip
        return torch.cat(out)
    step = spec.batch_size or ctx.batch_size
    for xc, tc in zip(x.split(step), target.split(step)):
        with torch.enable_grad():
            out.append(_check_map(spec, spec.fn(model, xc.detach(), tc, **kwargs), xc))
    return torch.cat(out)


# ----------------------------------------------------------------------------- explain


def explain(
    model: nn.Module,
    x: Tensor,
    method: str | Callable | type | MethodSpec,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noise: Tensor | None = None,
    **options,
) -> Tensor:
    """Saliency map of ``model`` for ``x`` with the paper's settings.

    Args:
        model: any classifier returning logits ``(N, classes)``; run in eval mode, its
            ``training`` flags and buffers are restored afterwards.
        x: ``(N, C, H, W)`` preprocessed input.
        method: a registered name (:data:`METHODS` or :func:`sanitylib.register_method`), a
            callable ``fn(model, x, target) -> Tensor`` or a captum ``Attribution`` class (see
            :mod:`sanitylib.registry`).
        target: class to explain per image (an int or one int per image, in
            ``[0, classes)``); default: argmax of the model's logits (in eval mode).
        seed: seed of the noise of SmoothGrad, VarGrad and IG-SmoothGrad (passed to user
            methods that take a ``seed`` argument).
        batch_size: maximum number of rows (images x steps x samples) per forward/backward pass
            (images per call for user methods).
        noise: optional ``(N, S, C, H, W)`` noise for the stochastic methods (used as is).
        **options: method options overriding the defaults (the paper's settings,
            :data:`PAPER_SETTINGS`): ``n_steps``, ``baseline``, ``rule`` (``"paper"`` or a
            captum method such as ``"riemann_trapezoid"``) for IG; ``n_samples`` and
            ``noise_level`` for the noise methods; ``layer`` (dotted path or module) for GradCAM;
            a user method's registered options.

    Returns:
        ``(N, C, H, W)`` float tensor on ``x``'s device (GradCAM is tiled over channels).
    """
    check_model(model)
    spec = resolve_method(method)
    settings = spec.settings(options)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_seed(seed)
    check_methods_fit(model, [spec])  # e.g. an attention method on a model without attention
    check_input(model, x)
    if "baseline" in settings and spec.builtin:
        check_baseline(settings["baseline"], x)
    if noise is not None:
        _check_noise_tensor(noise, x, spec)
    dev = next((p.device for p in model.parameters()), x.device)
    if x.device != dev:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {dev}; move it "
                         f"with x.to({str(dev)!r})")  # fmt: skip
    x = x.detach()
    with evaluating(model):  # the user's training flags and buffers are restored on exit
        if spec.passes is not None and spec.passes.kind == "input":
            t = torch.zeros(len(x), dtype=torch.long, device=x.device)  # a function of x alone
        else:
            t = resolve_targets(model, x, target, batch_size)
        with torch.enable_grad():  # also inside a caller's torch.no_grad()
            return run_method(spec, model, x, t, settings, Context(int(seed), batch_size, noise))
