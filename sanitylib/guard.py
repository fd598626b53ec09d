"""The Guided BackProp guard: a modified-backprop method must modify every ReLU of the model.

captum's ``GuidedBackprop``, ``Deconvolution`` and ``GuidedGradCam`` hook only ``nn.ReLU``
modules.  On a model with functional ReLUs (torchvision's Inception v3) or ``nn.ReLU6``
(EfficientNet-Lite) they silently return the plain gradient.  :func:`check_guided_backprop`
traces one forward pass and raises :class:`GuidedBackpropError` if any ReLU-type operation runs
outside an ``nn.ReLU`` module, whatever its form (one rule for every form it can see), and warns
(:class:`GuidedBackpropWarning`) where other nonlinearities run beside the ReLUs.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .randomize import evaluating

__all__ = ["GuidedBackpropError", "GuidedBackpropWarning", "check_guided_backprop"]


def _model_fingerprint(model: nn.Module) -> tuple:
    """What a forward pass of ``model`` runs, by identity: every module (name, object, its
    class's ``forward`` and an instance-level ``forward`` assigned to it).  Changes when
    ``model.forward`` is reassigned or a submodule replaced (not when weights change)."""
    return tuple((n, id(m), id(type(m).forward), id(m.__dict__.get("forward")))
                 for n, m in model.named_modules(remove_duplicate=False))  # fmt: skip


def _fingerprint(model: nn.Module, x: Tensor) -> tuple:
    return (tuple(x.shape[1:]), x.dtype, _model_fingerprint(model))


class GuidedBackpropError(RuntimeError):
    """Guided BackProp would not apply to every ReLU of the model (it would silently return
    something closer to the plain gradient)."""


class GuidedBackpropWarning(UserWarning):
    """The model runs nonlinearities other than ReLU (Hardswish, SiLU, sigmoid, ...) beside its
    ``nn.ReLU`` modules: Guided BackProp's rule applies to the ReLUs only."""


_RELU_FUNCS = {
    F.relu: "F.relu", F.relu_: "F.relu_", torch.relu: "torch.relu", torch.relu_: "torch.relu_",
    Tensor.relu: "Tensor.relu", Tensor.relu_: "Tensor.relu_", F.relu6: "F.relu6",
    F.hardtanh: "F.hardtanh (ReLU6)", F.hardtanh_: "F.hardtanh_", F.leaky_relu: "F.leaky_relu",
    F.threshold: "F.threshold",
}  # fmt: skip

#: Nonlinearity modules other than ReLU: Guided BackProp leaves their backward pass plain.
_OTHER_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.ELU,
                  nn.SELU, nn.CELU, nn.PReLU, nn.RReLU, nn.Softplus, nn.Mish, nn.Softsign,
                  nn.Tanhshrink, nn.LogSigmoid, nn.GLU, nn.Hardshrink, nn.Softshrink)  # fmt: skip
_OTHER_FUNCS = {
    F.hardswish: "F.hardswish", F.hardsigmoid: "F.hardsigmoid", F.silu: "F.silu",
    F.gelu: "F.gelu", F.elu: "F.elu", F.elu_: "F.elu_", F.selu: "F.selu", F.celu: "F.celu",
    F.prelu: "F.prelu", F.rrelu: "F.rrelu", F.softplus: "F.softplus", F.mish: "F.mish",
    F.softsign: "F.softsign", F.tanhshrink: "F.tanhshrink", F.logsigmoid: "F.logsigmoid",
    F.glu: "F.glu", torch.sigmoid: "torch.sigmoid", torch.sigmoid_: "torch.sigmoid_",
    Tensor.sigmoid: "Tensor.sigmoid", Tensor.sigmoid_: "Tensor.sigmoid_",
    torch.tanh: "torch.tanh", torch.tanh_: "torch.tanh_", Tensor.tanh: "Tensor.tanh",
    Tensor.tanh_: "Tensor.tanh_", torch.maximum: "torch.maximum",
    Tensor.maximum: "Tensor.maximum", torch.fmax: "torch.fmax", Tensor.fmax: "Tensor.fmax",
}  # fmt: skip
_CLAMPS = {torch.clamp: "torch.clamp", torch.clip: "torch.clip", torch.clamp_: "torch.clamp_",
           torch.clip_: "torch.clip_", Tensor.clamp: "Tensor.clamp", Tensor.clip: "Tensor.clip",
           Tensor.clamp_: "Tensor.clamp_", Tensor.clip_: "Tensor.clip_",
           torch.clamp_min: "torch.clamp_min", torch.clamp_min_: "torch.clamp_min_",
           Tensor.clamp_min: "Tensor.clamp_min",
           Tensor.clamp_min_: "Tensor.clamp_min_"}  # fmt: skip
_MAXES = {torch.max: "torch.max", Tensor.max: "Tensor.max"}


def _is_zero(v) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and float(v) == 0
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == 0


def _all_zero(v) -> bool:
    """A zero number or a tensor of zeros (of any shape)."""
    if isinstance(v, Tensor):
        return v.numel() > 0 and not bool(v.any())
    return _is_zero(v)


_ELEMENTWISE_MAX = {torch.maximum: "torch.maximum", Tensor.maximum: "Tensor.maximum",
                    torch.fmax: "torch.fmax", Tensor.fmax: "Tensor.fmax", **_MAXES}  # fmt: skip
#: Comparisons with zero: ``True`` where the mask keeps the positive part (``h > 0``).
_COMPARISONS = {torch.gt: True, Tensor.gt: True, Tensor.__gt__: True, torch.ge: True,
                Tensor.ge: True, Tensor.__ge__: True, torch.greater: True, torch.lt: False,
                Tensor.lt: False, Tensor.__lt__: False, torch.le: False, Tensor.le: False,
                Tensor.__le__: False}  # fmt: skip
_WHERES = {torch.where: "torch.where", Tensor.where: "Tensor.where"}
_MULS = {torch.mul: "torch.mul", Tensor.mul: "Tensor.mul", Tensor.__mul__: "*",
         Tensor.__rmul__: "*"}  # fmt: skip


def _relu_form(func, args: tuple, kwargs: dict, masks: dict) -> str | None:
    """The name of a ReLU written without ``F.relu`` (``clamp(min=0)``, ``clamp_min(0)``,
    ``torch.maximum(h, 0)``, ``torch.where(h > 0, h, 0)``, ``h * (h > 0)``), or ``None``.
    ``masks`` maps ``id(mask)`` to ``(mask, h, positive)`` for the comparisons of a tensor
    ``h`` with zero seen so far."""
    if func in _CLAMPS:
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        return f"{_CLAMPS[func]}(min=0)" if _is_zero(lo) else None
    if func in _ELEMENTWISE_MAX:
        a = args[0] if args else kwargs.get("input")
        b = kwargs.get("other", args[1] if len(args) > 1 else None)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and (_all_zero(a) or _all_zero(b)):
            return f"{_ELEMENTWISE_MAX[func]}(h, 0)"
        return None

    def mask_of(m):
        rec = masks.get(id(m)) if isinstance(m, Tensor) else None
        return rec if rec is not None and rec[0] is m else None

    if func in _WHERES:
        if func is torch.where:
            if len(args) + len(kwargs) < 3:
                return None
            cond = args[0] if args else kwargs.get("condition")
            a = args[1] if len(args) > 1 else kwargs.get("input")
            b = args[2] if len(args) > 2 else kwargs.get("other")
        else:
            a = args[0] if args else None
            cond = args[1] if len(args) > 1 else kwargs.get("condition")
            b = args[2] if len(args) > 2 else kwargs.get("other")
        rec = mask_of(cond)
        if rec is not None and ((rec[2] and a is rec[1] and _all_zero(b))
                                or (not rec[2] and _all_zero(a) and b is rec[1])):
            return f"{_WHERES[func]}(h > 0, h, 0)"
        return None
    if func in _MULS and len(args) >= 2:
        for h, m in ((args[0], args[1]), (args[1], args[0])):
            rec = mask_of(m)
            if rec is not None and rec[2] and h is rec[1]:
                return "h * (h > 0)"
    return None


def _other_nonlinearity(func, args: tuple, kwargs: dict) -> str | None:
    """The name of a non-ReLU nonlinearity call (the elementwise max of two tensors
    included), or ``None``."""
    name = _OTHER_FUNCS.get(func)
    if name is not None:
        return name
    if func in _MAXES:
        other = kwargs.get("other", args[1] if len(args) > 1 else None)
        return f"{_MAXES[func]}(a, b)" if isinstance(other, Tensor) else None
    return None


class _ReluTracer(TorchFunctionMode):
    """Records, during a forward pass, ReLU-type calls made outside ``nn.ReLU`` modules and the
    other nonlinearities (modules and functions) that run outside ``nn.ReLU`` modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.inside_relu = 0
        self.inside_other = 0
        self.n_relu_modules = 0
        self.outside: dict[str, int] = {}
        self.others: dict[str, list] = {}  # kind -> [calls, places]
        self.masks: dict[int, tuple] = {}  # id(h > 0) -> (mask, h, positive): ReLU by masking
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name, module)))
            self.handles.append(module.register_forward_hook(self._post(module)))

    def _where(self) -> str:
        return self.stack[-1] if self.stack else "<model>"

    def _other(self, kind: str, where: str) -> None:
        entry = self.others.setdefault(kind, [0, []])
        entry[0] += 1
        if where not in entry[1]:
            entry[1].append(where)

    def _pre(self, name: str, module: nn.Module) -> Callable:
        def hook(*_):
            self.stack.append(name or type(module).__name__)
            if isinstance(module, nn.ReLU):
                self.inside_relu += 1
                self.n_relu_modules += 1
            elif isinstance(module, _OTHER_MODULES):
                if not (self.inside_relu or self.inside_other):
                    self._other(f"nn.{type(module).__name__}", self._where())
                self.inside_other += 1

        return hook

    def _post(self, module: nn.Module) -> Callable:
        def hook(*_):
            self.stack.pop()
            if isinstance(module, nn.ReLU):
                self.inside_relu -= 1
            elif isinstance(module, _OTHER_MODULES):
                self.inside_other -= 1

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_relu:
            relu = _RELU_FUNCS.get(func) or _relu_form(func, args, kwargs, self.masks)
            if relu is not None:
                where = f"{relu} in {self._where()}"
                self.outside[where] = self.outside.get(where, 0) + 1
            elif not self.inside_other:
                kind = _other_nonlinearity(func, args, kwargs)
                if kind is not None:
                    self._other(kind, self._where())
        out = func(*args, **kwargs)
        if func in _COMPARISONS and len(args) == 2 and isinstance(args[0], Tensor) \
                and _is_zero(args[1]) and isinstance(out, Tensor):
            self.masks[id(out)] = (out, args[0], _COMPARISONS[func])
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


_GBP_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_WARNED_GBP: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def check_guided_backprop(model: nn.Module, x: Tensor) -> int:
    """Check that Guided BackProp (captum's ``nn.ReLU`` hooks) covers every ReLU the forward
    pass of ``model`` on ``x[:1]`` executes (in eval mode; the model's modes and buffers are
    restored).  Returns the number of ReLU-module calls (``-1``: checked before, for the same
    model instance, forward code, submodules and input shape).

    Raises:
        GuidedBackpropError: a ReLU-type operation ran outside an ``nn.ReLU`` module, whatever
            its form: ``F.relu``/``torch.relu``/``Tensor.relu``, ``F.relu6``/``F.hardtanh``
            (``nn.ReLU6``), ``F.leaky_relu``, ``F.threshold``, ``clamp(min=0)``/``clamp_min(0)``
            (with or without a ``max``), ``torch.maximum(h, 0)``, ``torch.where(h > 0, h, 0)``
            and ``h * (h > 0)``; or the model executed no ReLU at all.  In both cases captum's
            Guided BackProp would silently degrade towards the plain gradient.

    Warns:
        GuidedBackpropWarning: (once per model) other nonlinearities (Hardswish, Hardsigmoid,
            SiLU, GELU, sigmoid, tanh, the elementwise maximum of two tensors, ...) run beside
            the ReLUs: the guided rule applies only to the ReLUs, the others pass the plain
            gradient.
    """
    key = _fingerprint(model, x)
    if _GBP_CHECKED.get(model) == key:
        return -1
    tracer = _ReluTracer(model)
    try:
        with evaluating(model), tracer:
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
    if tracer.others and _WARNED_GBP.get(model) != key[2]:  # once per model (and its code)
        _WARNED_GBP[model] = key[2]
        items = list(tracer.others.items())
        parts = []
        for kind, (n, places) in items[:6]:
            shown = ", ".join(places[:3]) + (", ..." if len(places) > 3 else "")
            parts.append(f"{kind} x{n} (in {shown})")
        more = f" and {len(items) - 6} more kinds" if len(items) > 6 else ""
        warnings.warn(
            f"Guided BackProp applies its rule only to the {tracer.n_relu_modules} nn.ReLU call(s) "
            f"of this model; {sum(n for n, _ in tracer.others.values())} call(s) of other "
            f"nonlinearities keep their plain gradient: {'; '.join(parts)}{more}. The map mixes "
            "guided and plain backward passes: it is not Guided BackProp as in the paper "
            "(which used ReLU networks).", GuidedBackpropWarning, stacklevel=3)
    _GBP_CHECKED[model] = key
    return tracer.n_relu_modules
