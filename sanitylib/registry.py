"""The method and metric registries: one spec per saliency method and per similarity metric.

Every function of sanitylib that takes a method (``explain``, the randomization runners, the
figures) accepts, wherever it accepts a name:

* a **registered name**: a built-in (``"gradient"``, ``"guided_backprop"``, ...) or a name given
  to :func:`register_method`;
* a **callable** ``fn(model, x, target) -> Tensor``: ``x`` is an ``(N, C, H, W)`` batch, ``target``
  an ``(N,)`` long tensor of classes, the result has the shape of ``x`` (or ``(N, 1, H, W)``,
  tiled over the channels); it is named by ``fn.__name__``;
* a **captum** ``Attribution`` **class** (e.g. ``captum.attr.Saliency``): constructed on the
  model and called as ``attribute(x, target=target)``;
* a :class:`MethodSpec`.

Built-in methods are registered here by :mod:`sanitylib.attribution` the same way a user's are,
with their options (the paper's settings) and the passes the batched engine shares between
them (:class:`Passes`).  Metrics work the same way (:func:`register_metric`, a callable
``metric(a, b) -> (N,)`` on raw maps, or a registered name).

This module imports nothing from sanitylib but :mod:`sanitylib.utils`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MethodSpec", "Passes", "Metric", "check_map_size", "check_method_options",
           "check_methods_fit", "method_list", "register_method",
           "unregister_method", "get_method", "resolve_method", "resolve_methods", "method_names",
           "method_label", "register_metric", "unregister_metric", "get_metric", "resolve_metric",
           "resolve_metrics", "metric_names", "metric_label", "LabelView"]  # fmt: skip


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Passes:
    """How the batched engine (:mod:`sanitylib.engine`) computes a built-in method from passes
    shared with other methods.

    Attributes:
        kind: ``"x"`` (one backward pass on the images), ``"ig"`` (an integration path),
            ``"noise"`` (noisy copies of the image), ``"ig_noise"`` (integration paths of noisy
            copies) or ``"input"`` (no pass: a function of the input only).
        plain: needs the plain gradient d logit / d x on the images (kind ``"x"``).
        guided: needs the guided backward pass (kind ``"x"``).
        layer: needs the activation and gradient of the method's GradCAM layer (kind ``"x"``).
        statistic: ``"mean"`` or ``"var"`` over the noisy gradients (kind ``"noise"``).
        combine: kind ``"x"``: ``(x, grad, cam, guided) -> map`` (``cam`` the GradCAM map,
            ``None`` where not needed); kind ``"input"``: ``(x) -> map``.
    """

    kind: str
    plain: bool = False
    guided: bool = False
    layer: bool = False
    statistic: str = "mean"
    combine: Callable[..., Tensor] | None = None


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One saliency method.

    Attributes:
        name: the name in tables (the ``method`` column) and figures.
        fn: the computation.  User methods: ``fn(model, x, target, **options) -> Tensor`` (plus
            ``seed=`` if ``fn`` takes a ``seed`` argument).  Built-ins:
            ``fn(model, x, target, ctx, **options)`` with ``ctx`` holding ``seed``,
            ``batch_size``, ``noise`` and ``image_ids``.
        label: human-readable name for figures.
        options: the options and their defaults (the paper's settings for built-ins).
        validate: ``validate(settings) -> None``, raising ``ValueError`` for invalid options.
        passes: how the batched engine shares passes (built-ins); ``None``: the engine calls
            ``fn`` once per model state, in chunks of ``batch_size`` images.
        guided: a modified-backprop method: :func:`sanitylib.check_guided_backprop` guards it
            (captum's rule would silently fall back to the gradient on non-``nn.ReLU``
            activations).
        layer_option: name of the option holding a GradCAM-style layer (resolved on the model).
        batch_size: images per call of a user method (``None``: the runner's batch size).
        builtin: registered by sanitylib itself.
        origin: the user's callable or captum class (its identity keys the result cache).
        model_check: ``model_check(model) -> None``, raising ``ValueError`` (naming the method)
            for a model the method cannot explain (e.g. the attention methods on a CNN); called
            by :func:`sanitylib.explain` and :meth:`sanitylib.RunSpec.build` before any work.
    """

    name: str
    fn: Callable[..., Tensor]
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[dict], None] | None = None
    passes: Passes | None = None
    guided: bool = False
    layer_option: str | None = None
    batch_size: int | None = None
    builtin: bool = False
    origin: Any = None
    model_check: Callable[[nn.Module], Any] | None = None

    def settings(self, options: Mapping[str, Any] | None = None) -> dict:
        """The defaults updated with ``options``; ``ValueError`` for unknown or invalid ones."""
        options = dict(options or {})
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {self.name!r}; "
                             f"valid: {sorted(self.options) or 'none'}")  # fmt: skip
        settings = {**self.options, **options}
        if self.validate is not None:
            self.validate(settings)
        return settings

    def __reduce__(self):
        # a built-in pickles by name (its functions are lambdas, and a table's run specification
        # holds it: ``df.to_pickle``, multiprocessing); a user's spec as a dataclass (its
        # callables pickle by reference, as Python pickles functions)
        if self.builtin and _METHODS.get(self.name) is self:
            return get_method, (self.name,)
        return super().__reduce__()

    @property
    def takes_seed(self) -> bool:
        return "seed" in _parameters(self.fn)

    @property
    def draws_noise(self) -> bool:
        """A built-in that draws noise (SmoothGrad, VarGrad, IG-SmoothGrad): seeded per image by
        its index in the batch it is given (:func:`sanitylib.attribution.unit_noise`)."""
        return self.builtin and self.passes is not None and self.passes.kind in ("noise", "ig_noise")

    def __repr__(self) -> str:
        return f"MethodSpec({self.name!r}, label={self.label!r}{', builtin' if self.builtin else ''})"


_METHODS: dict[str, MethodSpec] = {}


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    return name


def _is_captum_class(obj: object) -> bool:
    if not isinstance(obj, type):
        return False
    try:
        from captum.attr import Attribution
    except ImportError:  # pragma: no cover - captum is a dependency
        return False
    return issubclass(obj, Attribution)


_CAPTUM_GUIDED = ("GuidedBackprop", "Deconvolution", "GuidedGradCam")


def _captum_fn(cls: type) -> Callable[..., Tensor]:
    def captum_method(model: nn.Module, x: Tensor, target: Tensor, **options) -> Tensor:
        try:
            attr = cls(model)
        except TypeError as err:
            raise TypeError(
                f"captum.{cls.__name__}(model) failed ({err}); methods that need more than the "
                "model (a layer, a baseline function) can be passed as a callable "
                "fn(model, x, target), e.g. lambda m, x, t: LayerGradCam(m, m.layer4).attribute(x, t)"
            ) from None
        out = attr.attribute(x, target=target, **options)
        return out[0] if isinstance(out, tuple) else out

    captum_method.__qualname__ = f"captum.{cls.__name__}"
    return captum_method


def _check_callable_options(name: str, fn: Callable, options: dict) -> None:
    """``fn`` can be called as sanitylib calls it, ``fn(model, x, target, **options)`` (plus
    ``seed=`` where it takes one): every option is a keyword it takes, every other argument
    after the first three has a default, and ``seed`` is not an option (sanitylib passes each
    image's seed).  Checked at registration: it failed at the first call, inside a run."""
    params = _parameters(fn)
    if not params:  # a signature that cannot be read: called as documented
        return
    if "seed" in options:
        raise TypeError(f"method {name!r}: options must not set 'seed': sanitylib passes each "
                        "image's seed to a function that takes one")  # fmt: skip
    kw = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in kw]
        if unknown:
            raise TypeError(f"method {name!r}: fn takes no keyword argument {unknown[0]!r} "
                            f"(options {sorted(options)}; fn's parameters: {list(params)})")  # fmt: skip
    rest = list(params.values())[3:]
    missing = [p.name for p in rest if p.default is p.empty and p.name not in options
               and p.name != "seed" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise TypeError(f"method {name!r}: fn's argument {missing[0]!r} has no default and is no "
                        "option: sanitylib calls fn(model, x, target, **options); give it a "
                        "default or an option value")  # fmt: skip


def _user_spec(name: str, fn: Callable, label: str | None, options: Mapping | None,
               validate: Callable | None, batch_size: int | None, guided: bool | None) -> MethodSpec:  # fmt: skip
    if _is_captum_class(fn):
        origin = fn
        guided = fn.__name__ in _CAPTUM_GUIDED if guided is None else guided
        fn = _captum_fn(fn)
    elif isinstance(fn, type) or not callable(fn):
        raise TypeError(f"a method must be a registered name, a callable fn(model, x, target) or a "
                        f"captum Attribution class, got {fn!r}")  # fmt: skip
    else:
        origin = fn
        params = [p for p in _parameters(fn).values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if params and len(params) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise TypeError(f"method {name!r}: fn must take (model, x, target), got a function of "
                            f"{len(params)} positional argument(s)")  # fmt: skip
        _check_callable_options(name, fn, dict(options or {}))
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return MethodSpec(name, fn, label or name, dict(options or {}), validate, None,
                      bool(guided), None, batch_size, False, origin)  # fmt: skip


def register_method(name: str, fn: Callable | type | MethodSpec, label: str | None = None, *,
                    options: Mapping[str, Any] | None = None,
                    validate: Callable[[dict], None] | None = None,
                    batch_size: int | None = None, guided: bool | None = None) -> MethodSpec:  # fmt: skip
    """Make a saliency method usable by name everywhere (``explain``, the runners, the figures).

    Args:
        name: the name (the ``method`` column of the tables).  Registering a name again replaces
            the earlier registration (re-running a notebook cell); built-in names are protected.
        fn: ``fn(model, x, target, **options) -> Tensor`` of the shape of ``x`` (or
            ``(N, 1, H, W)``), or a captum ``Attribution`` class.  ``fn`` receives batches of
            images; if it takes a ``seed`` argument, the run's seed is passed.
        label: name in figures (default ``name``).
        options: options ``fn`` accepts and their defaults (``method_options`` override them).
        validate: ``validate(settings)`` raising ``ValueError`` for invalid options.
        batch_size: images per call (default: the runner's batch size).
        guided: a modified-backprop method to guard like Guided BackProp (default: ``True`` for
            captum's ``GuidedBackprop``, ``Deconvolution`` and ``GuidedGradCam``).

    Returns:
        The :class:`MethodSpec`.
    """
    _check_name(name, "method")
    old = _METHODS.get(name)
    if old is not None and old.builtin:
        raise ValueError(f"{name!r} is a built-in method; register yours under another name")
    if isinstance(fn, MethodSpec):
        spec = fn
        if spec.builtin:  # it would become a protected built-in under the new name
            raise ValueError(f"fn: {spec.name!r} is a built-in method: use it by its name, or "
                             f"register a function that calls sl.explain(model, x, "
                             f"{spec.name!r}, target) under {name!r}")  # fmt: skip
        given = [k for k, v in (("options", options), ("validate", validate),
                                ("batch_size", batch_size), ("guided", guided)) if v is not None]
        if given:  # they were dropped silently
            raise ValueError(f"{', '.join(given)}: a MethodSpec carries its own; build the spec "
                             "with them, or register its function")  # fmt: skip
        if spec.name != name or label is not None:
            spec = MethodSpec(**{**spec.__dict__, "name": name, "label": label or spec.label})
    else:
        spec = _user_spec(name, fn, label, options, validate, batch_size, guided)
    _METHODS[name] = spec
    return spec


def _register_builtin(spec: MethodSpec) -> MethodSpec:
    """Register a built-in method (used by :mod:`sanitylib.attribution`)."""
    _METHODS[spec.name] = spec
    return spec


def _unregister(registry: dict, name: str, what: str) -> None:
    spec = registry.get(name)
    if spec is None:
        raise ValueError(f"no {what} {name!r} is registered")
    if spec.builtin:
        raise ValueError(f"{name!r} is a built-in {what} and cannot be removed")
    del registry[name]


def unregister_method(name: str) -> None:
    """Remove a user method from the registry."""
    _unregister(_METHODS, name, "method")


def get_method(name: str) -> MethodSpec:
    """The registered :class:`MethodSpec` of ``name``."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(_METHODS)} "
                         "(or pass a callable fn(model, x, target) or a captum Attribution class, "
                         "or sanitylib.register_method it)") from None


def _not_builtin(name: str, registry: dict, what: str) -> str:
    """``name`` of a user's callable, refused (``ValueError``) when it is a built-in's name: its
    rows would appear in the tables under the built-in's name."""
    spec = registry.get(name)
    if spec is not None and spec.builtin:
        raise ValueError(f"a callable named {name!r} would appear in the tables as the built-in "
                         f"{what} {name!r}; rename the function or register it under another "
                         f"name (sanitylib.register_{what}('my_{name}', fn))")  # fmt: skip
    return name


def resolve_method(method: str | Callable | type | MethodSpec) -> MethodSpec:
    """The :class:`MethodSpec` of a name, callable, captum class or spec."""
    if isinstance(method, MethodSpec):
        return method
    if isinstance(method, str):
        return get_method(method)
    if _is_captum_class(method):
        return _user_spec(_not_builtin(method.__name__, _METHODS, "method"), method, None, None,
                          None, None, None)  # fmt: skip
    if callable(method) and not isinstance(method, type):
        name = getattr(method, "__name__", None) or type(method).__name__
        return _user_spec(_not_builtin(name, _METHODS, "method"), method, None, None, None, None,
                          False)  # fmt: skip
    raise TypeError(f"a method must be a registered name, a callable fn(model, x, target), a "
                    f"captum Attribution class or a MethodSpec, got {method!r}")  # fmt: skip


def method_list(methods: str | Callable | Sequence) -> list | Sequence:
    """``methods`` as given, a single name, callable, captum class or spec as a list of one
    (a name is not a list of letters)."""
    if isinstance(methods, (str, MethodSpec)) or callable(methods):
        return [methods]
    return methods


def check_methods_fit(model: nn.Module, specs: Sequence[MethodSpec]) -> None:
    """Each method's check of the model (``MethodSpec.model_check``: an attention method on a
    model without attention is refused), before any work."""
    for sp in specs:
        if sp.model_check is not None:
            sp.model_check(model)


def resolve_methods(methods: str | Callable | Sequence, what: str = "methods") -> list[MethodSpec]:
    """Specs of a list of methods (a single name or callable counts as a list of one); the
    names must be distinct."""
    methods = method_list(methods)
    if not isinstance(methods, Sequence) or isinstance(methods, (bytes, bytearray)):
        raise TypeError(f"{what} must be a list of method names, callables or captum classes, "
                        f"got {type(methods).__name__}")  # fmt: skip
    specs = [resolve_method(m) for m in methods]
    if not specs:
        raise ValueError(f"{what} must not be empty")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: duplicate method names {dup} (two callables with the same "
                         "__name__? register them under distinct names)")  # fmt: skip
    return specs


def method_names(builtin: bool | None = None) -> tuple[str, ...]:
    """Registered method names, built-ins first (``builtin=True``/``False`` to filter)."""
    return tuple(n for n, s in _METHODS.items() if builtin is None or s.builtin == builtin)


def method_label(method: str | Callable | type | MethodSpec) -> str:
    """The figure label of a method (a name not registered is its own label)."""
    if isinstance(method, str):
        spec = _METHODS.get(method)
        return spec.label if spec is not None else method
    return resolve_method(method).label


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True, eq=False)
class Metric:
    """A similarity metric between two batches of raw maps ``(N, C, H, W)``.

    ``prepare`` maps raw maps to anything (computed once for the trained model's maps, default:
    the maps themselves), ``compare`` two prepared batches to ``(N,)`` values.  A plain callable
    ``metric(a, b) -> (N,)`` is a Metric with ``prepare=None``.  ``min_size``: the smallest
    height and width of the maps it takes (0: any); the runners check it against the images
    before any pass (the maps have the images' height and width).
    """

    name: str
    prepare: Callable[[Tensor], Any] | None
    compare: Callable[[Any, Any], Tensor]
    label: str | None = None
    builtin: bool = False
    origin: Any = None
    min_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"min_size must be an int >= 0 (pixels; 0: any size), got {self.min_size!r}")

    def __reduce__(self):  # a built-in pickles by name, as MethodSpec
        if self.builtin and _METRICS.get(self.name) is self:
            return get_metric, (self.name,)
        return super().__reduce__()

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """Values ``(N,)`` for raw maps ``a``, ``b``."""
        prep = self.prepare or (lambda m: m)
        return self.values(prep(a), prep(b), len(a))

    def values(self, pa: Any, pb: Any, n: int) -> Tensor:
        """``compare(pa, pb)`` checked to be ``(n,)`` numbers."""
        out = self.compare(pa, pb)
        out = torch.as_tensor(out).detach().reshape(-1) if not isinstance(out, Tensor) else out.detach()
        if out.shape != (n,):
            raise ValueError(f"metric {self.name!r} must return shape ({n},), got {tuple(out.shape)}")
        out = out.double().cpu()
        bad = int((~torch.isfinite(out)).sum())
        if bad:  # kept (e.g. scipy's NaN for a constant map), but said: means skip NaN
            warnings.warn(f"metric {self.name!r} returned {bad} non-finite value(s) of {n}; "
                          "summaries and figures leave NaN out (summarize's n counts the rest)",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return out


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable[[Tensor, Tensor], Tensor] | Metric,
                    label: str | None = None) -> Metric:  # fmt: skip
    """Make a metric ``fn(a, b) -> (N,)`` on raw ``(N, C, H, W)`` maps usable by name
    everywhere (runners, noise floors, figures); a :class:`Metric` is registered as is."""
    _check_name(name, "metric")
    old = _METRICS.get(name)
    if old is not None and old.builtin:
        raise ValueError(f"{name!r} is a built-in metric; register yours under another name")
    if isinstance(fn, Metric):
        spec = Metric(name, fn.prepare, fn.compare, label or fn.label or name, False, fn.origin or fn,
                      fn.min_size)  # fmt: skip
    elif callable(fn) and not isinstance(fn, type):
        spec = Metric(name, None, fn, label or name, False, fn)
    else:
        raise TypeError(f"a metric must be a callable metric(a, b) -> (N,) or a Metric, got {fn!r}")
    _METRICS[name] = spec
    return spec


def _register_builtin_metric(spec: Metric) -> Metric:
    _METRICS[spec.name] = spec
    return spec


def unregister_metric(name: str) -> None:
    """Remove a user metric from the registry."""
    _unregister(_METRICS, name, "metric")


def get_metric(name: str) -> Metric:
    try:
        return _METRICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; registered metrics: {', '.join(_METRICS)} "
                         "(or pass a callable metric(a, b) -> (N,) or a sanitylib.Metric)") from None


def metric_identity(name: str) -> float:
    """The value of a map compared with itself under metric ``name``: 1 for the built-in
    similarity metrics; NaN (unknown) for a user's (a distance scores 0 there)."""
    spec = _METRICS.get(name)
    return 1.0 if spec is not None and spec.builtin else math.nan


def check_map_size(metrics: Sequence[Metric], x: Tensor, name: str = "metrics") -> None:
    """``ValueError`` naming ``name`` when a metric needs larger maps than ``x``'s images
    (:attr:`sanitylib.Metric.min_size`; the maps have the images' height and width), before
    any pass is run."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        return  # not images: the input checks say so
    h, w = (int(v) for v in x.shape[-2:])
    small = [m for m in metrics if m.min_size and min(h, w) < m.min_size]
    if small:
        fit = [m.name for m in metrics if m not in small]
        raise ValueError(
            f"{name}: " + "; ".join(f"{m.name!r} needs maps of at least {m.min_size}x{m.min_size} "
                                    "pixels" for m in small)
            + f", and the maps have the images' size, {h}x{w}. Leave "
            + ("it" if len(small) == 1 else "them") + " out"
            + (f", e.g. {name}={fit}" if fit else f" ({name}=['spearman_abs', 'spearman'])"))


def resolve_metric(metric: str | Callable | Metric) -> Metric:
    if isinstance(metric, Metric):
        if _METRICS.get(metric.name) is not metric:  # a user's Metric object
            if metric.builtin:  # it ran the built-in of its name, ignoring the user's compare
                raise ValueError(f"Metric {metric.name!r}: builtin=True is for sanitylib's own "
                                 "metrics; build yours without it")
            _not_builtin(metric.name, _METRICS, "metric")  # its rows would pass for the built-in's
        return metric if metric.label else Metric(metric.name, metric.prepare, metric.compare,
                                                  metric.name, metric.builtin, metric.origin,
                                                  metric.min_size)  # fmt: skip
    if isinstance(metric, str):
        return get_metric(metric)
    if callable(metric) and not isinstance(metric, type):
        name = _not_builtin(getattr(metric, "__name__", None) or type(metric).__name__, _METRICS,
                            "metric")  # fmt: skip
        return Metric(name, None, metric, name, False, metric)
    raise TypeError(f"a metric must be a registered name, a callable metric(a, b) -> (N,) or a "
                    f"sanitylib.Metric, got {metric!r}")  # fmt: skip


def resolve_metrics(metrics: str | Callable | Sequence) -> list[Metric]:
    if isinstance(metrics, (str, Metric)) or callable(metrics):
        metrics = [metrics]
    if not isinstance(metrics, Sequence):
        raise TypeError(f"metrics must be a list of metric names or callables, got "
                        f"{type(metrics).__name__}")  # fmt: skip
    specs = [resolve_metric(m) for m in metrics]
    if not specs:
        raise ValueError("metrics must not be empty")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate metric names {dup}")
    return specs


def metric_names(builtin: bool | None = None) -> tuple[str, ...]:
    return tuple(n for n, s in _METRICS.items() if builtin is None or s.builtin == builtin)


def metric_label(metric: str | Callable | Metric) -> str:
    if isinstance(metric, str):
        spec = _METRICS.get(metric)
        return spec.label if spec is not None and spec.label else metric
    return resolve_metric(metric).label or resolve_metric(metric).name


class LabelView(Mapping):
    """A read-only ``{name: label}`` view of a registry (e.g. ``sanitylib.plots.METHOD_LABELS``);
    names that are not registered map to themselves via :meth:`get`."""

    def __init__(self, registry: dict) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> str:
        spec = self._registry[name]
        return spec.label or spec.name

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._registry))

    def __len__(self) -> int:
        return len(self._registry)

    def get(self, name, default=None):
        return self[name] if name in self._registry else (name if default is None else default)

    def __repr__(self) -> str:
        return repr(dict(self))


METHOD_LABELS = LabelView(_METHODS)
METRIC_LABELS = LabelView(_METRICS)


def check_method_options(method_options, specs: Sequence[MethodSpec]) -> Mapping[str, Mapping[str, Any]]:
    """``method_options`` (``{method name: {option: value}}``) checked against the run's methods
    ``specs``: a key that is neither a method of the run nor a registered method (a typo) is
    refused, naming the run's methods; every method's options are validated.  Returns the
    options of the run's methods only (read-only)."""
    if method_options is None:
        method_options = {}
    if not (isinstance(method_options, Mapping) and all(isinstance(v, Mapping) for v in method_options.values())):
        raise ValueError("method_options must be a dict {method name: {option: value}}, got "
                         f"{method_options!r}")  # fmt: skip
    run = [sp.name for sp in specs]
    unknown = [k for k in method_options if k not in run and k not in method_names()]
    if unknown:
        raise ValueError(f"method_options: {', '.join(repr(k) for k in unknown)} is not a method "
                         f"of this run ({', '.join(run)}) nor a registered method; check the "
                         "spelling")  # fmt: skip
    out = {}
    for sp in specs:  # invalid options fail before any work
        opts = dict(method_options.get(sp.name, {}))
        sp.settings(opts)
        if opts:
            out[sp.name] = MappingProxyType(opts)
    return MappingProxyType(out)
