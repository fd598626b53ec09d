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
ReLU-type operation runs outside an ``nn.ReLU`` module.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .models import get_info, get_submodule

__all__ = ["METHODS", "PAPER_SETTINGS", "GuidedBackpropError", "explain", "predict",
           "check_guided_backprop", "check_input", "derive_seed", "resolve_settings",
           "unit_noise"]  # fmt: skip

METHODS = (
    "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
    "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam", "edge_detector",
)  # fmt: skip

#: The authors' hyper-parameters (paper-protocol.md section 3); options of :func:`explain`.
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


class GuidedBackpropError(RuntimeError):
    """Guided BackProp would not apply to every ReLU of the model (it would silently return
    something closer to the plain gradient)."""


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (e.g. ``derive_seed(0, "noise", 3)``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- checks


def check_input(model: nn.Module, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite float ``(N, C, H, W)`` batch suited to
    ``model`` (shape and value range are checked for built-in models)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    info = get_info(model)
    if info is None:
        return
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


_RELU_FUNCS = {
    F.relu: "F.relu", F.relu_: "F.relu_", torch.relu: "torch.relu", torch.relu_: "torch.relu_",
    Tensor.relu: "Tensor.relu", Tensor.relu_: "Tensor.relu_", F.relu6: "F.relu6",
    F.hardtanh: "F.hardtanh (ReLU6)", F.hardtanh_: "F.hardtanh_", F.leaky_relu: "F.leaky_relu",
    F.threshold: "F.threshold",
}  # fmt: skip


class _ReluTracer(TorchFunctionMode):
    """Records ReLU-type calls made outside ``nn.ReLU`` modules during a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.inside_relu = 0
        self.n_relu_modules = 0
        self.outside: dict[str, int] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name, module)))
            self.handles.append(module.register_forward_hook(self._post(module)))

    def _pre(self, name: str, module: nn.Module) -> Callable:
        def hook(*_):
            self.stack.append(name or type(module).__name__)
            if isinstance(module, nn.ReLU):
                self.inside_relu += 1
                self.n_relu_modules += 1

        return hook

    def _post(self, module: nn.Module) -> Callable:
        def hook(*_):
            self.stack.pop()
            if isinstance(module, nn.ReLU):
                self.inside_relu -= 1

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCS and not self.inside_relu:
            where = f"{_RELU_FUNCS[func]} in {self.stack[-1] if self.stack else '<model>'}"
            self.outside[where] = self.outside.get(where, 0) + 1
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


_GBP_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, x: Tensor) -> tuple:
    return (tuple(x.shape[1:]), tuple((n, id(m)) for n, m in model.named_modules()))


@torch.no_grad()
def check_guided_backprop(model: nn.Module, x: Tensor) -> int:
    """Check that Guided BackProp (captum's ``nn.ReLU`` hooks) covers every ReLU the forward
    pass of ``model`` on ``x[:1]`` executes.  Returns the number of ReLU-module calls.

    Raises:
        GuidedBackpropError: a ReLU-type function ran outside an ``nn.ReLU`` module (functional
            ``F.relu``, ``nn.ReLU6``, ...), or the model executed no ReLU at all; in both cases
            captum's Guided BackProp would silently degrade towards the plain gradient.
    """
    key = _fingerprint(model, x)
    if _GBP_CHECKED.get(model) == key:
        return -1
    tracer = _ReluTracer(model)
    try:
        with tracer:
            model(x[:1])
    finally:
        tracer.remove()
    if tracer.outside:
        calls = "; ".join(f"{k} (x{v})" for k, v in list(tracer.outside.items())[:6])
        more = len(tracer.outside) - 6
        raise GuidedBackpropError(
            f"Guided BackProp would not apply to {sum(tracer.outside.values())} ReLU-type "
            f"call(s) that run outside nn.ReLU modules: {calls}{f' and {more} more' if more > 0 else ''}. "
            "captum only modifies the backward pass of nn.ReLU modules, so the result would "
            "silently mix in the plain gradient. Fix the model: use nn.ReLU modules instead of "
            "functional calls (sanitylib.load_model does this for its models), and replace "
            "nn.ReLU6 with sanitylib.models.convert_relu6(model)."
        )
    if tracer.n_relu_modules == 0:
        raise GuidedBackpropError(
            "Guided BackProp needs ReLU activations, but the forward pass executed no nn.ReLU "
            "module: on this model it would equal the plain gradient."
        )
    _GBP_CHECKED[model] = key
    return tracer.n_relu_modules


# ----------------------------------------------------------------------------- helpers


def resolve_settings(method: str, options: dict) -> dict:
    """:data:`PAPER_SETTINGS` of ``method`` updated with ``options``; raises ``ValueError`` for
    an unknown method or option."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    settings = dict(PAPER_SETTINGS.get(method, {}))
    unknown = set(options) - set(settings)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {method!r}; "
                         f"valid: {sorted(settings) or 'none'}")  # fmt: skip
    settings.update(options)
    return settings


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


def _targets(model: nn.Module, x: Tensor, target, batch_size: int) -> Tensor:
    if target is None:
        return predict(model, x, batch_size).argmax(1)
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)
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


def _ig_weights(n_steps: int, rule: str, device) -> tuple[Tensor, Tensor]:
    """Path points (alphas) and weights of the Riemann sum for Integrated Gradients."""
    if rule == "paper":  # PAIR: mean of the gradients at linspace(0, 1, n), both ends included
        return torch.linspace(0, 1, n_steps, device=device), torch.full(
            (n_steps,), 1.0 / n_steps, device=device)  # fmt: skip
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(rule)
    return (torch.tensor(alphas(n_steps), device=device),
            torch.tensor(step_sizes(n_steps), device=device))  # fmt: skip


def _integrated_gradients(model, x, target, n_steps, baseline, rule, batch_size) -> Tensor:
    alphas, weights = _ig_weights(n_steps, rule, x.device)
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


def _layer(model: nn.Module, layer) -> nn.Module:
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


def _gradcam(model, x, target, layer, batch_size) -> Tensor:
    from captum.attr import LayerGradCam

    cam_attr = LayerGradCam(model, _layer(model, layer))
    out = []
    for xc, tc in zip(x.split(batch_size), target.split(batch_size)):
        cam = cam_attr.attribute(xc, target=tc, relu_attributions=True)  # (n, 1, h, w)
        if cam.ndim != 4:
            raise ValueError(f"GradCAM layer output must be (N, K, h, w), got {tuple(cam.shape)}")
        peak = cam.amax(dim=(1, 2, 3), keepdim=True)
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-30), torch.zeros_like(cam))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out.append(cam.expand(-1, x.shape[1], -1, -1))
    return torch.cat(out).detach()


def _guided_backprop(model, x, target, batch_size) -> Tensor:
    from captum.attr import GuidedBackprop

    check_guided_backprop(model, x)
    gbp = GuidedBackprop(model)
    return torch.cat([gbp.attribute(xc, target=tc).detach()
                      for xc, tc in zip(x.split(batch_size), target.split(batch_size))])  # fmt: skip


def _edge_detector(x: Tensor) -> Tensor:
    from skimage.filters import sobel

    gray = x.detach().mean(1).cpu().double().numpy()
    edges = torch.stack([torch.from_numpy(sobel(g)) for g in gray]).to(x.device, x.dtype)
    return edges[:, None].expand(-1, x.shape[1], -1, -1).contiguous()


# ----------------------------------------------------------------------------- explain


def explain(
    model: nn.Module,
    x: Tensor,
    method: str,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noise: Tensor | None = None,
    **options,
) -> Tensor:
    """Saliency map of ``model`` for ``x`` with the paper's settings.

    Args:
        model: any classifier returning logits (put in eval mode by the caller or by
            :func:`sanitylib.load_model`).
        x: ``(N, C, H, W)`` preprocessed input.
        method: one of :data:`METHODS`.
        target: class to explain per image; default: argmax of the model's current logits.
        seed: seed of the noise of SmoothGrad, VarGrad and IG-SmoothGrad.
        batch_size: maximum number of rows (images x steps x samples) per forward/backward pass.
        noise: optional ``(N, S, C, H, W)`` noise for the stochastic methods (used as is).
        **options: method hyper-parameters overriding :data:`PAPER_SETTINGS`: ``n_steps``,
            ``baseline``, ``rule`` (``"paper"`` or a captum method such as
            ``"riemann_trapezoid"``) for IG; ``n_samples`` and ``noise_level`` for the noise
            methods; ``layer`` (dotted path or module) for GradCAM.

    Returns:
        ``(N, C, H, W)`` float tensor on ``x``'s device (GradCAM is tiled over channels).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    check_input(model, x)
    settings = resolve_settings(method, options)
    if method == "edge_detector":
        return _edge_detector(x)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x = x.detach()
    t = _targets(model, x, target, batch_size)

    def grad(inp: Tensor, tgt: Tensor) -> Tensor:
        return _gradients(model, inp, tgt, batch_size)

    if method == "gradient":
        return grad(x, t)
    if method == "input_x_gradient":
        return grad(x, t) * x
    if method == "integrated_gradients":
        return _integrated_gradients(model, x, t, settings["n_steps"], settings["baseline"],
                                     settings["rule"], batch_size)  # fmt: skip
    if method in ("smoothgrad", "vargrad"):
        return _noise_tunnel(grad, x, t, settings["n_samples"], settings["noise_level"],
                             "mean" if method == "smoothgrad" else "var", seed, noise,
                             batch_size)  # fmt: skip
    if method == "ig_smoothgrad":
        def ig(inp: Tensor, tgt: Tensor) -> Tensor:
            return _integrated_gradients(model, inp, tgt, settings["n_steps"],
                                         settings["baseline"], settings["rule"], batch_size)

        return _noise_tunnel(ig, x, t, settings["n_samples"], settings["noise_level"], "mean",
                             seed, noise, max(1, batch_size // settings["n_steps"]))  # fmt: skip
    if method == "guided_backprop":
        return _guided_backprop(model, x, t, batch_size)
    if method == "gradcam":
        return _gradcam(model, x, t, settings["layer"], batch_size)
    # guided_gradcam: the authors' elementwise product, with bilinear GradCAM
    return _guided_backprop(model, x, t, batch_size) * _gradcam(
        model, x, t, settings["layer"], batch_size)
