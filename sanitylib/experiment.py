"""Randomization experiments: config -> runner -> tidy table (+ maps for figures).

:func:`cascading_randomization` and :func:`independent_randomization` compare every method's
maps on the trained model with its maps after each randomization stage and return a tidy
:class:`pandas.DataFrame` with one row per (stage, method, image, metric).  Maps of a few images
are kept for figures in ``df.attrs["maps"]`` (a :class:`MapStore`).  The maps come from the
batched engine (:mod:`sanitylib.engine`; ``engine="reference"`` runs ``explain`` per method and
stage instead).

Results are cached on disk under a key of everything that determines them (see
:func:`run_randomization`, ``cache``): the model's weights *and code*, sanitylib's source, the
methods, metrics, options and images.  A group of images is computed in slices of stages, each
saved atomically as soon as it is done, so an interrupted run resumes from its last finished
slice; the files hold only tensors and plain values and are read without unpickling any code.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import math
import os
import site
import sys
import sysconfig
import types
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.fx
from torch import Tensor, nn
from tqdm import tqdm

from .attribution import check_batch_size, check_input, check_seed, explain, predict
from .engine import (AMP_DTYPES, GroupMaps, auto_batch_size, compute_maps, image_groups,
                     iter_state_maps, rows_per_image)  # fmt: skip
from .diagnostics import activation_scales
from .metrics import MapFeatures, compare, noise_floor
from .models import Block, get_info
from .registry import MethodSpec, resolve_methods, resolve_metrics
from .randomize import (Perturbation, Stage, check_schedule, evaluating, get_blocks, randomized,
                        schedule_stages, snapshot)  # fmt: skip
from .utils import __version__, atomic_save, atomic_write, cache_dir, load_cached, source_hash, tensor_hash

__all__ = ["DEFAULT_METRICS", "MapStore", "run_randomization", "cascading_randomization",
           "independent_randomization", "summarize", "config_key", "explain_methods",
           "CodeNotIdentified", "SLICES_PER_GROUP"]  # fmt: skip

DEFAULT_METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
ORIGINAL = "original"
#: A group of images is computed (with ``cache`` on) in about this many slices of stages, each
#: saved when done: the most an interruption loses is one slice.
SLICES_PER_GROUP = 5
#: Version of the cache's file layout (part of the key).
CACHE_LAYOUT = 2


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


# ----------------------------------------------------------------------------- code identity


class CodeNotIdentified(Exception):
    """Raised while building a cache key when some code that determines the result cannot be
    identified; the message says what.  The runner then computes without the cache."""


_PLAIN = (bool, int, float, str, type(None))
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # training flag, parameters, hooks, ...
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_NOT_IN_KEY = frozenset({"sanity_info"})  # sanitylib's description of a model: metadata only
_CLASS_SKIP = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                         "__annotations__", "__firstlineno__", "__static_attributes__",
                         "__slotnames__", "__orig_bases__", "__parameters__",
                         "__abstractmethods__", "_abc_impl", "__match_args__"})  # fmt: skip
_C_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType,
                types.WrapperDescriptorType, types.MethodWrapperType,
                types.ClassMethodDescriptorType, types.GetSetDescriptorType,
                types.MemberDescriptorType)  # fmt: skip
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class created by a class statement (or type())
_LIBRARY_ROOTS = tuple(sorted({
    os.path.realpath(p) for p in [
        *(sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")),
        *(site.getsitepackages() if hasattr(site, "getsitepackages") else []),
        site.getusersitepackages() if hasattr(site, "getusersitepackages") else None,
    ] if p
}))  # fmt: skip


@functools.lru_cache(maxsize=None)
def _in_library(file: str | None) -> bool:
    return bool(file) and os.path.realpath(file).startswith(_LIBRARY_ROOTS)


def _is_library(obj) -> bool:
    """Code of an installed package or of the standard library (it changes only with a
    version, which the key records) or of sanitylib (its source is in the key as a whole);
    anything else is user code: a notebook cell, ``exec``, a script, a checkout."""
    module = getattr(obj, "__module__", None) or ""
    if module == "__main__":
        return False
    if module.split(".")[0] == "sanitylib":
        return True
    if isinstance(obj, types.FunctionType):
        return _in_library(obj.__code__.co_filename)
    files = [f.__code__.co_filename for f in _class_functions(obj)]
    if files:  # where the class body's functions were compiled ("<string>" for exec)
        return all(_in_library(f) for f in files)
    return _in_library(getattr(sys.modules.get(module), "__file__", None))


def _class_functions(c: type, named: bool = False) -> list:
    """The Python functions of a class body (methods, static and class methods, properties'
    getters), sorted by name; ``(name, function)`` pairs with ``named``."""
    out = []
    for k, v in sorted(vars(c).items()):
        v = getattr(v, "__func__", v)  # staticmethod, classmethod
        for f in (v,) if isinstance(v, types.FunctionType) else (getattr(v, "fget", None),):
            if isinstance(f, types.FunctionType):
                out.append((k, f) if named else f)
    return out


@functools.lru_cache(maxsize=None)
def _library_version(module: str) -> str | None:
    """Version of the installed distribution that provides ``module`` (``None``: unknown)."""
    from importlib.metadata import version

    top = module.split(".")[0]
    if top == "sanitylib":
        return f"sanitylib {__version__} {source_hash()}"
    if top in sys.stdlib_module_names or top == "builtins":
        return "python " + sys.version.split()[0]
    try:
        dists = _distributions().get(top) or [top]
        return f"{dists[0]} {version(dists[0])}"
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=None)
def _distributions() -> dict:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _code_hash(code: types.CodeType) -> str:
    """Hash of what a code object computes: its bytecode, constants (nested functions
    included) and names; not its file name or line numbers (a function defined in a notebook
    cell keeps its identity across kernels)."""
    h = hashlib.sha256(code.co_code)
    for c in code.co_consts:
        h.update(_code_hash(c).encode() if isinstance(c, types.CodeType) else repr(c).encode())
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    return h.hexdigest()[:16]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Identifier:
    """JSON-friendly identities of the things a result depends on, for cache keys.

    What runs is identified, not its text: a function by its bytecode, constants, names,
    defaults, closure values and (for user code) the global functions, classes and constants it
    refers to; a class by the identities of everything in its body and of its bases; a module
    of ``model`` by its path, class and attributes (hooks and an instance-level ``forward``
    included).  A function redefined in a notebook cell with the same code keeps its identity;
    any change of what it computes changes it.  Whatever cannot be identified raises
    :class:`CodeNotIdentified`, naming it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.classes: dict[type, str] = {}
        self.functions: dict[int, object] = {}
        self.active: set[int] = set()
        self.keep: list = []  # identified objects stay alive (their ids key the memos)

    # -- values ---------------------------------------------------------------------------

    def value(self, obj, where: str):
        if isinstance(obj, _PLAIN):
            return obj
        if isinstance(obj, enum.Enum):
            return f"<enum {type(obj).__module__}.{type(obj).__qualname__}.{obj.name}>"
        if isinstance(obj, Tensor):
            return f"<tensor {tensor_hash([obj])}>"
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return ["<array>", self.value(obj.tolist(), where)]
            data = hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()[:20]
            return f"<array {obj.dtype} {obj.shape} {data}>"
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(obj)
        if isinstance(obj, (types.GenericAlias, types.UnionType)) or type(obj).__module__ == "typing":
            return ["<typing>", repr(obj)]
        if isinstance(obj, nn.Module):
            if id(obj) in self.paths:
                return f"<module {self.paths[id(obj)]}>"
            return [f"<foreign module {type(obj).__qualname__}>", self.cls(type(obj)),
                    tensor_hash(obj.state_dict().values())]  # fmt: skip
        if isinstance(obj, type):
            return self.cls(obj)
        if isinstance(obj, types.FunctionType):
            return self.function(obj)
        if isinstance(obj, types.MethodType):
            return ["<bound>", self.value(obj.__func__, where), self.value(obj.__self__, where)]
        if isinstance(obj, functools.partial):
            return ["<partial>", self.value(obj.func, where), self.value(obj.args, where),
                    self.value(obj.keywords, where)]  # fmt: skip
        if isinstance(obj, (staticmethod, classmethod)):
            return [type(obj).__name__, self.value(obj.__func__, where)]
        if isinstance(obj, property):
            return ["<property>"] + [self.value(f, where) for f in (obj.fget, obj.fset, obj.fdel)]
        if isinstance(obj, _C_CALLABLES):
            bound = getattr(obj, "__self__", None)
            qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "?")
            owner = getattr(obj, "__objclass__", None) or (bound if isinstance(bound, type) else type(bound))
            module = getattr(obj, "__module__", None) or getattr(owner, "__module__", "")
            name = f"<builtin {module}.{qualname}>"
            if bound is None or isinstance(bound, (type, types.ModuleType)):
                return name
            return [name, self.value(bound, where)]  # e.g. tensor.mul: the tensor matters
        if id(obj) in self.active:
            return "<cycle>"
        self.active.add(id(obj))
        try:
            return self._compound(obj, where)
        finally:
            self.active.discard(id(obj))

    def _compound(self, obj, where: str):
        if isinstance(obj, dict):
            return [[self.value(k, where), self.value(v, f"{where}[{k!r}]")]
                    for k, v in obj.items()]  # fmt: skip
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return [type(obj).__qualname__, [self.value(v, where) for v in obj]]
        if isinstance(obj, (list, tuple)):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, (set, frozenset)):
            return sorted((self.value(v, where) for v in obj), key=repr)
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        text = repr(obj)
        if callable(obj):
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:  # functools.wraps-style wrappers, lru_cache, ...
                return ["<wrapped>", kind, self.value(wrapped, where)]
            if isinstance(obj, torch.jit.ScriptFunction):
                return ["<script>", str(obj.code)]
            if isinstance(inspect.getattr_static(type(obj), "__call__", None), types.FunctionType):
                return self._object(obj, where)  # a Python __call__: its code and the state
            if " at 0x" not in text:  # a C callable that its repr describes (a ufunc, ...)
                return [kind, text]
            raise CodeNotIdentified(f"{where} is a {kind} object: a callable whose code cannot "
                                    "be identified")  # fmt: skip
        if not type(obj).__flags__ & _HEAPTYPE and hasattr(type(obj), "__get__"):
            return [kind, text if " at 0x" not in text else obj.__doc__]  # a C descriptor
        if hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
            return self._object(obj, where)
        if " at 0x" not in text:
            return [kind, text]
        raise CodeNotIdentified(f"{where} is a {kind} object that cannot be identified")

    def _object(self, obj, where: str):
        """An instance: its class and its state (``vars`` and slots)."""
        state = dict(getattr(obj, "__dict__", {}))
        for c in type(obj).__mro__:
            slots = getattr(c, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    state[slot] = getattr(obj, slot)
        return ["<object>", self.cls(type(obj)), self.value(state, where)]

    # -- code -----------------------------------------------------------------------------

    def function(self, fn: types.FunctionType):
        if id(fn) in self.functions:
            return self.functions[id(fn)]
        self.keep.append(fn)
        name = f"{fn.__module__}.{fn.__qualname__}"
        self.functions[id(fn)] = f"<recursive {name}>"
        where = f"function {name}"
        cells = []
        for c in fn.__closure__ or ():
            try:
                cells.append(self.value(c.cell_contents, f"a closure value of {where}"))
            except ValueError:  # an empty cell
                cells.append("<empty>")
        refs = []
        if not _is_library(fn):
            for g in sorted(_global_names(fn.__code__)):
                v = fn.__globals__.get(g, _MISSING)
                if isinstance(v, types.FunctionType) and not _is_library(v):
                    refs.append([g, self.function(v)])
                elif isinstance(v, type) and not _is_library(v):
                    refs.append([g, self.cls(v)])
                elif isinstance(v, _PLAIN):
                    refs.append([g, v])
                elif isinstance(v, tuple) and all(isinstance(u, _PLAIN) for u in v):
                    refs.append([g, list(v)])
        ident = [name, _code_hash(fn.__code__),
                 self.value(fn.__defaults__, f"a default of {where}"),
                 self.value(fn.__kwdefaults__, f"a default of {where}"), cells, refs]  # fmt: skip
        self.functions[id(fn)] = ident
        return ident

    def cls(self, c: type) -> str:
        """Digest of a user's class: its body (every function, property and class attribute)
        and its bases; a class of an installed package (torch, torchvision, ...) by its name,
        the package's version and the bytecode of its methods (and its bases'); a C type by its
        name."""
        if c in self.classes:
            return self.classes[c]
        name = f"{c.__module__}.{c.__qualname__}"
        if c is object or not c.__flags__ & _HEAPTYPE:
            self.classes[c] = name
            return name
        if _is_library(c):  # an installed package's class: its version and methods' bytecode
            code = [[k, _code_hash(f.__code__)] for k, f in _class_functions(c, named=True)]
            bases = [self.cls(b) for b in c.__bases__]
            self.classes[c] = f"{name} ({_library_version(c.__module__)}) {_digest([code, bases])}"
            return self.classes[c]
        self.classes[c] = f"<recursive {name}>"
        body = []
        for k, v in sorted(vars(c).items()):
            if k in _CLASS_SKIP:
                continue
            body.append([k, self.value(v, f"{name}.{k}")])
        self.classes[c] = f"{name} {_digest([body, [self.cls(b) for b in c.__bases__]])}"
        return self.classes[c]

    def model_identity(self) -> dict:
        """Everything about ``model`` but its tensors' values: every submodule's path, class,
        attributes (an instance-level ``forward``, hooks), parameter and buffer names."""
        modules = []
        for path, m in self.model.named_modules():
            where = f"{type(m).__qualname__} module {path or '(the model)'}"
            attrs: list = []
            if isinstance(m, (torch.jit.ScriptModule, torch.fx.GraphModule)):
                try:
                    attrs = [["code", str(m.code)]]
                except Exception as err:  # noqa: BLE001
                    raise CodeNotIdentified(f"the TorchScript code of {where} cannot be read "
                                            f"({err})") from None
            else:
                for k, v in sorted(vars(m).items()):
                    if k not in _MODULE_INTERNALS and k not in _NOT_IN_KEY:
                        attrs.append([k, self.value(v, f"attribute {k!r} of {where}")])
            hooks = [[h, self.value(list(getattr(m, h, {}).values()), f"a hook of {where}")]
                     for h in _HOOKS if getattr(m, h, None)]  # fmt: skip
            modules.append([path, self.cls(type(m)), attrs, hooks, list(m._parameters),
                            list(m._buffers), sorted(m._non_persistent_buffers_set)])  # fmt: skip
        classes = sorted({self.cls(type(m)) for m in self.model.modules()})
        return {"classes": classes, "modules": _digest(modules)}


_MISSING = object()


def config_key(config: dict) -> str:
    """sha256 of a JSON-serializable configuration (sorted keys), 24 hex characters."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


# ----------------------------------------------------------------------------- arguments


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_arguments(model, x, schedule, blocks, seed, perturbation, target, method_options,
                     image_names, store_maps, batch_size, cache, progress, label, engine, amp,
                     group_size, floor, order="top_down") -> None:  # fmt: skip
    """Every argument of :func:`run_randomization` is checked before any work; each error names
    the argument and what was expected."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_input(model, x)
    check_seed(seed)
    check_schedule(schedule, order)
    if target not in ("current", "original"):
        raise ValueError(f"target must be 'current' or 'original', got {target!r}")
    if engine not in ("batched", "reference"):
        raise ValueError(f"engine must be 'batched' or 'reference', got {engine!r}")
    if blocks is not None and not isinstance(blocks, (str, Block)):
        if not isinstance(blocks, (list, tuple)) or not blocks:
            raise ValueError("blocks must be None (the model's blocks) or a non-empty list of "
                             f"Block objects, block names or module paths, got {blocks!r}")  # fmt: skip
    if perturbation is not None and not isinstance(perturbation, Perturbation):
        raise ValueError(f"perturbation must be a sanitylib.Perturbation or None, got {perturbation!r}")
    if method_options is not None and not (isinstance(method_options, dict) and
                                            all(isinstance(v, dict) for v in method_options.values())):
        raise ValueError("method_options must be a dict {method name: {option: value}}, got "
                         f"{method_options!r}")  # fmt: skip
    if image_names is not None:
        if isinstance(image_names, (str, bytes)) or not hasattr(image_names, "__len__"):
            raise ValueError(f"image_names must be a list of names, one per image, got {image_names!r}")
        if len(image_names) != len(x):
            raise ValueError(f"image_names has {len(image_names)} entries for {len(x)} images")
    if _is_int(store_maps):
        if store_maps < 0:
            raise ValueError(f"store_maps must be an int >= 0 or a list of image indices, got {store_maps!r}")
    elif isinstance(store_maps, (str, bytes, bool)) or not hasattr(store_maps, "__iter__") \
            or not all(_is_int(i) for i in store_maps):
        raise ValueError(f"store_maps must be an int >= 0 or a list of image indices, got {store_maps!r}")
    check_batch_size(batch_size)
    check_batch_size(group_size, "group_size")
    if not isinstance(cache, (bool, str, os.PathLike)):
        raise ValueError(f"cache must be True, False or a folder (str or path), got {cache!r}")
    for name, v in (("progress", progress), ("floor", floor)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"label must be a string or None, got {label!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    if amp and engine != "batched":
        raise ValueError("amp needs engine='batched'")


def _store_indices(store_maps, n: int) -> list[int]:
    if _is_int(store_maps):
        return list(range(min(int(store_maps), n)))
    idx = [int(i) for i in store_maps]
    if any(i < 0 or i >= n for i in idx):
        raise ValueError(f"store_maps indices must lie in [0, {n}), got {idx}")
    return idx


# ----------------------------------------------------------------------------- computation


def _compute_group(model: nn.Module, x: Tensor, images: list[int], methods: Sequence[MethodSpec],
                   stages: Sequence[Stage], engine: str, kw: dict, slices=None):  # fmt: skip
    """Maps of ``x[images]`` on the trained model (state 0) and after every stage: a
    :class:`GroupMaps`.

    With ``slices`` (the cached path: ``(todo, targets0)``, ``todo`` a list of ``(j, stages'
    indices)``), an iterator of ``(j, GroupMaps)`` instead, one per slice of ``todo``: slice 0
    starts with the trained model (state 0), a later slice holds its stages only.  The noise of
    stochastic methods is seeded per image and every block has its own generator, so a slice's
    maps equal those of one call over every state; with ``target="original"`` the trained
    model's classes ``targets0`` (from slice 0) are passed on."""
    if slices is not None:
        return _iter_slices(model, x, images, methods, stages, kw, *slices)
    if engine == "batched":
        states = [()] + [st.blocks for st in stages]
        return _one_group(model, x, methods, states, images, kw)
    return _reference_group(model, x, images, methods, stages, **kw)


def _one_group(model, x, methods, states, images, kw) -> GroupMaps:
    it = iter_state_maps(model, x, methods, states, groups=[images], **kw)
    try:
        return next(it)
    finally:
        it.close()  # restores the model now


def _iter_slices(model, x, images, methods, stages, kw, todo, targets0):
    for j, ks in todo:
        states = ([()] if j == 0 else []) + [stages[k].blocks for k in ks]
        kwj = dict(kw)
        if j > 0 and kw["target"] == "original":
            full = torch.zeros(len(x), dtype=torch.long, device=x.device)
            full[images] = targets0.to(x.device)
            kwj["target"] = full
        gm = _one_group(model, x, methods, states, images, kwj)
        if j == 0:
            targets0 = gm.targets[0]
        yield j, gm


def _reference_group(model: nn.Module, x: Tensor, images: list[int], methods: Sequence[MethodSpec],
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
            out[meth.name] = explain(m, x, meth, target=tgt, seed=seed, batch_size=bs,
                                     **method_options.get(meth.name, {}))  # fmt: skip
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


def _slice_plan(n_stages: int) -> list[list[int]]:
    """Stages' indices per slice: about :data:`SLICES_PER_GROUP` slices, at least one stage each."""
    size = max(1, math.ceil(n_stages / SLICES_PER_GROUP))
    return [list(range(lo, min(n_stages, lo + size))) for lo in range(0, n_stages, size)]


# ----------------------------------------------------------------------------- cache files


def _plain_records(df: pd.DataFrame) -> list[dict]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in df.to_dict("records")]  # fmt: skip


def _maps_problem(maps, images: Sequence[int], state_names: Sequence[str], methods) -> str | None:
    if not isinstance(maps, dict) or sorted(maps) != sorted(images):
        return "unexpected images in its maps"
    for i in images:
        if not isinstance(maps[i], dict) or list(maps[i]) != list(state_names) or not all(
                isinstance(maps[i][s], dict) and sorted(maps[i][s]) == sorted(methods)
                and all(isinstance(t, Tensor) for t in maps[i][s].values()) for s in state_names):
            return "unexpected stages or methods in its maps"
    return None


def _rows_problem(rows, n: int) -> str | None:
    if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, dict) for r in rows):
        return f"expected {n} table rows"
    return None


class _GroupFiles:
    """The cache files of one group of images: ``images_AAAA_BBBB.pt`` once the group is
    finished (its rows and kept maps), ``images_AAAA_BBBB.partJJ.pt`` per finished slice while
    it is not (slice 0 also holds the trained model's maps and classes, float32)."""

    def __init__(self, folder: Path, images: list[int], kept: list[int], methods: list[str],
                 n_metrics: int, state_names: list[str], plan: list[list[int]]) -> None:  # fmt: skip
        self.stem = f"images_{images[0]:04d}_{images[-1]:04d}"
        self.folder, self.images, self.methods, self.plan = folder, images, methods, plan
        self.kept = [i for i in images if i in kept]
        self.n_metrics, self.state_names = n_metrics, state_names
        self.final = folder / f"{self.stem}.pt"

    def part(self, j: int) -> Path:
        return self.folder / f"{self.stem}.part{j:02d}.pt"

    def n_rows(self, n_stages: int) -> int:
        return n_stages * len(self.methods) * self.n_metrics * len(self.images)

    def load_final(self) -> dict | None:
        def problem(d) -> str | None:
            if not isinstance(d, dict) or not {"rows", "maps"} <= d.keys():
                return "not a group file"
            return (_rows_problem(d["rows"], self.n_rows(len(self.state_names) - 1))
                    or _maps_problem(d["maps"], self.kept, self.state_names, self.methods))

        return load_cached(self.final, problem)

    def slice_states(self, j: int) -> list[str]:
        return ([ORIGINAL] if j == 0 else []) + [self.state_names[k + 1] for k in self.plan[j]]

    def load_part(self, j: int) -> dict | None:
        G = len(self.images)

        def problem(d) -> str | None:
            if not isinstance(d, dict) or not {"stages", "rows", "maps"} <= d.keys():
                return "not a slice file"
            if d["stages"] != self.slice_states(j):
                return "other stages"
            if j == 0:
                t, tr = d.get("targets0"), d.get("trained")
                if not isinstance(t, Tensor) or t.shape != (G,) or not isinstance(tr, dict) \
                        or sorted(tr) != sorted(self.methods) \
                        or not all(isinstance(v, Tensor) and v.shape[:1] == (G,) for v in tr.values()):
                    return "no trained maps"
            return (_rows_problem(d["rows"], self.n_rows(len(self.plan[j])))
                    or _maps_problem(d["maps"], self.kept, d["stages"], self.methods))

        return load_cached(self.part(j), problem)

    def remove_parts(self) -> None:
        for p in self.folder.glob(f"{self.stem}.part*.pt"):
            p.unlink(missing_ok=True)


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
) -> pd.DataFrame:
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
            its parameterized top-level children in reverse execution order); a non-empty list
            of :class:`~sanitylib.models.Block`, block names or dotted module paths (a single
            one may be given alone).
        metrics: registered names (:data:`sanitylib.METRICS` and :func:`sanitylib.register_metric`),
            :class:`sanitylib.Metric` objects (``prepare`` runs once on the trained model's
            maps), or callables ``f(a, b) -> (N,)`` on raw ``(N, C, H, W)`` maps (named by
            ``f.__name__``).
        seed: an int; seeds the per-block generators and the noise of stochastic methods (the
            same noise is used for the trained and the randomized model: common random numbers).
        perturbation: how blocks are randomized (default: the paper's re-initialization;
            ``Perturbation(init=callable)`` for any initializer ``(module, generator)``).
        target: ``"current"`` (argmax of the randomized model, as the authors) or
            ``"original"`` (the trained model's prediction).
        method_options: per-method options for :func:`sanitylib.explain`.
        image_names: names for the ``image_name`` column.
        store_maps: number of leading images (or explicit indices) whose maps are kept.
        batch_size: rows per forward/backward chunk (default: automatic, see
            :func:`sanitylib.engine.auto_batch_size`).
        cache: ``True`` (the sanitylib cache), a folder, or ``False``.  The key covers the
            model's weights and buffers, its code (every submodule's class, as the bytecode
            that runs, its attributes, hooks and an instance-level ``forward``), the images,
            the methods (a user's function by its code, defaults, closure and the global
            functions and constants it uses), options, metrics, blocks, perturbation, seed,
            target, schedule, kept maps, image names, engine, amp, the device type and the
            versions of sanitylib (and its source), torch and captum.  When some code cannot be
            identified, a warning says what and the run computes without the cache.  A group of
            images is saved in slices of stages (about :data:`SLICES_PER_GROUP`), so an
            interrupted run resumes from its last finished slice; unreadable files are reported
            and recomputed.
        progress: show a tqdm progress bar.
        label: a free-text label stored in the table (e.g. the model name).
        engine: ``"batched"`` (:mod:`sanitylib.engine`: shared passes, batched rows, forward
            replay) or ``"reference"`` (``explain`` per method and stage; slow, for checks).
        amp: ``None`` (default), ``"bfloat16"`` or ``"float16"``: autocast of the forward
            passes (batched engine; changes the numbers slightly).
        group_size: images computed together (default: automatic).
        floor: compute the noise floors (``df.attrs["floor"]``).
        order: ``"top_down"`` (the paper: the output block first) or ``"bottom_up"`` (the input
            block first, Hedström et al. 2023); with ``"independent"`` it only orders the stages.
        activations: also measure, per stage, how much each block's output scale changes
            (:func:`sanitylib.diagnostics.activation_scales`, Binder et al. 2023) into
            ``df.attrs["activations"]``.
        image_ids: each image's index in a larger collection (distinct ints >= 0; default
            ``0..N-1``): the ``image`` column and the noise seeds use it, so a run on a subset
            of the images (a shard, :mod:`sanitylib.distributed`) gives the full run's rows.

    Returns:
        Tidy table with columns ``schedule, stage_index, stage, method, image, image_name,
        metric, value, constant, target, original_target, perturbation, model``; the maps in
        ``df.attrs["maps"]``; the noise floors of the trained model's maps
        (:func:`sanitylib.metrics.noise_floor`: pairs of different images, random masks) in
        ``df.attrs["floor"]`` (``None`` with a single image or ``floor=False``).

    Raises:
        ValueError: for an invalid argument, before any work, naming the argument.
    """
    specs = resolve_methods(methods)
    fns = resolve_metrics(metrics)
    _check_arguments(model, x, schedule, blocks, seed, perturbation, target, method_options,
                     image_names, store_maps, batch_size, cache, progress, label, engine, amp,
                     group_size, floor, order)  # fmt: skip
    if not isinstance(activations, bool):
        raise ValueError(f"activations must be True or False, got {activations!r}")
    if image_ids is not None:
        if isinstance(image_ids, (str, bytes)) or not hasattr(image_ids, "__len__") or \
                len(image_ids) != len(x) or not all(_is_int(i) and i >= 0 for i in image_ids) \
                or len({int(i) for i in image_ids}) != len(x):
            raise ValueError(f"image_ids must be {len(x)} distinct ints >= 0, one per image, "
                             f"got {image_ids!r}")  # fmt: skip
        if engine != "batched":
            raise ValueError("image_ids needs engine='batched'")
        image_ids = [int(i) for i in image_ids]
    method_options = dict(method_options or {})
    for sp in specs:
        sp.settings(method_options.get(sp.name, {}))  # invalid options fail before any work
    if isinstance(blocks, (str, Block)):
        blocks = [blocks]
    kept = _store_indices(store_maps, len(x))
    with evaluating(model):
        df = _run(model, x, specs, fns, schedule, blocks, seed, perturbation or Perturbation(),
                  target, method_options, image_names, kept, batch_size, cache, progress,
                  label, engine, amp, group_size, floor, order, image_ids)  # fmt: skip
        df.attrs["order"] = order
        if activations:
            df.attrs["activations"] = activation_scales(
                model, x, blocks, schedule=schedule, order=order, seed=seed,
                perturbation=perturbation, batch_size=batch_size)  # fmt: skip
        return df


def _run(model, x, specs, fns, schedule, blocks, seed, perturbation, target, method_options,
         image_names, kept, batch_size, cache, progress, label, engine, amp, group_size,
         floor, order="top_down", image_ids=None) -> pd.DataFrame:  # fmt: skip
    methods = [sp.name for sp in specs]
    blocks_ = get_blocks(model, blocks, x)
    stages = schedule_stages(blocks_, schedule, order)
    if order == "bottom_up":  # the cache key lists the blocks in the order they are randomized
        blocks_ = blocks_[::-1]
    info = get_info(model)
    label = label or (info.name if info else type(model).__name__)
    ids = image_ids if image_ids is not None else list(range(len(x)))
    names = list(image_names) if image_names is not None else [str(i) for i in ids]
    dev = next((t.device for t in model.parameters()), x.device)
    x = x.detach().to(dev)
    n_states = len(stages) + 1
    if engine == "reference":
        groups = [list(range(len(x)))]
    else:
        groups = image_groups(x, n_states, len(methods), group_size)

    folder = None
    if cache is not False:
        config = _cache_config(model, x, dev, specs, fns, schedule, blocks_, seed, perturbation,
                               target, method_options, kept, names, engine, amp, label)  # fmt: skip
        if config is not None and image_ids is not None:
            config["image_ids"] = ids  # they seed the noise (absent from the key by default)
        if config is not None:
            root = Path(cache) if not isinstance(cache, bool) else cache_dir("runs")
            folder = root / config_key(config)
            folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config, indent=1, default=str)
            atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))

    per_state = rows_per_image(specs, method_options)["total"] if engine == "batched" else len(methods)
    bar = tqdm(total=per_state * len(x) * n_states if engine == "batched" else len(methods) * n_states,
               disable=not progress, desc=f"{schedule} randomization ({label})",
               unit="pass" if engine == "batched" else "map")  # fmt: skip

    def advance(n_images: int, n: int) -> None:
        bar.update(per_state * n_images * n if engine == "batched" else len(methods) * n)

    if engine == "batched" and batch_size is None:  # once per run: every group and slice alike
        engine_bs = auto_batch_size(model, x, amp=amp)
    else:
        engine_bs = batch_size
    kw = dict(perturbation=perturbation, seed=seed, target=target, method_options=method_options,
              batch_size=engine_bs, amp=amp, on_rows=bar.update)  # fmt: skip
    if image_ids is not None:
        kw["image_ids"] = ids
    describe = perturbation.describe()
    state_names = [ORIGINAL] + [st.name for st in stages]
    table = functools.partial(_group_rows, methods=methods, fns=fns, names=names,
                              schedule=schedule, describe=describe, label=label, ids=ids)  # fmt: skip
    rows: list[dict] = []
    stored: dict[int, dict[str, dict[str, Tensor]]] = {}  # image -> state -> method -> map
    original: dict[int, dict[str, Tensor]] = {}  # image -> method -> trained model's map

    def keep_maps(gm: GroupMaps, names_: Sequence[str]) -> dict:
        return {i: {st: {m: gm.maps[k][m][g:g + 1].half().cpu() for m in methods}
                    for k, st in enumerate(names_)}
                for g, i in enumerate(gm.images) if i in kept}  # fmt: skip

    try:
        for images in groups:
            bar.set_postfix_str(f"images {images[0]}-{images[-1]}")
            if folder is not None and engine == "batched":
                files = _GroupFiles(folder, images, kept, methods, len(fns), state_names,
                                    _slice_plan(len(stages)))  # fmt: skip
                g_rows, g_maps, trained = _cached_group(model, x, images, specs, stages, kw,
                                                        files, table, keep_maps, advance)  # fmt: skip
                rows += g_rows
                stored.update(g_maps)
                if floor and trained is not None:
                    for g, i in enumerate(images):
                        original[i] = {m: trained[m][g:g + 1] for m in methods}
                continue
            files = _GroupFiles(folder, images, kept, methods, len(fns), state_names, []) \
                if folder is not None else None
            saved = files.load_final() if files is not None else None
            if saved is not None:
                rows += saved["rows"]
                stored.update(saved["maps"])
                advance(len(images), n_states)
                continue
            gm = _compute_group(model, x, images, specs, stages, engine, kw)
            group_rows = table(gm, stages=stages)
            group_maps = keep_maps(gm, state_names)
            if floor:
                for g, i in enumerate(gm.images):
                    original[i] = {m: gm.maps[0][m][g:g + 1] for m in methods}
            if files is not None:
                atomic_save({"rows": group_rows, "maps": group_maps}, files.final)
            rows += group_rows
            stored.update(group_maps)
            del gm
    finally:
        bar.close()

    floor_df = None
    if floor and len(x) > 1:
        ffile = folder / "floor.pt" if folder else None

        def floor_problem(d) -> str | None:
            if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or not all(
                    isinstance(r, dict) for r in d["rows"]):
                return "not a noise-floor table"
            return None

        saved = load_cached(ffile, floor_problem) if ffile is not None else None
        if saved is not None:
            floor_df = pd.DataFrame(saved["rows"])
        else:
            missing = [i for i in range(len(x)) if i not in original]
            if missing:  # images loaded from the cache: recompute the trained model's maps
                maps0 = explain_methods(model, x[missing], specs, method_options, seed,
                                        batch_size, progress=False,
                                        image_ids=[ids[i] for i in missing])  # fmt: skip
                for j, i in enumerate(missing):
                    original[i] = {m: maps0[m][j:j + 1] for m in methods}
            orig_all = {m: torch.cat([original[i][m] for i in range(len(x))]) for m in methods}
            floor_df = noise_floor(orig_all, fns, seed=seed)
            if ffile is not None:
                atomic_save({"rows": _plain_records(floor_df)}, ffile)

    order = {m: j for j, m in enumerate(methods)}
    morder = {f.name: j for j, f in enumerate(fns)}
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


def _cache_config(model, x, dev, specs, fns, schedule, blocks_, seed, perturbation, target,
                  method_options, kept, names, engine, amp, label) -> dict | None:  # fmt: skip
    """The cache key's configuration, or ``None`` (with a warning saying why) when some code
    that determines the result cannot be identified."""
    ident = _Identifier(model)
    try:
        code = ident.model_identity()
        tensors = [t for _, t in model.named_parameters()] + [b for _, b in model.named_buffers()]
        config = {
            "layout": CACHE_LAYOUT, "version": __version__, "source": source_hash(),
            "torch": torch.__version__, "captum": _package_version("captum"),
            "schedule": schedule,
            "model": {"label": label, "weights": tensor_hash(tensors), "classes": code["classes"],
                      "modules": code["modules"]},
            "x": tensor_hash([x]), "device": dev.type,
            "methods": [sp.name if sp.builtin else
                        [sp.name, ident.value(sp.origin if sp.origin is not None else sp.fn,
                                              f"method {sp.name!r}"),
                         ident.value(dict(sp.options), f"the options of method {sp.name!r}"),
                         ident.value(sp.validate, f"the validation of method {sp.name!r}"),
                         sp.batch_size, sp.guided] for sp in specs],
            "metrics": [m.name if m.builtin else
                        [m.name, ident.value(m.prepare, f"metric {m.name!r}"),
                         ident.value(m.compare, f"metric {m.name!r}")]
                        for m in fns],
            "blocks": [[b.name, list(b.modules)] for b in blocks_], "seed": int(seed),
            "perturbation": [perturbation.kind, perturbation.sigma, perturbation.relative,
                             ident.value(perturbation.init, "the perturbation's initializer")],
            "target": target, "options": ident.value(method_options, "method_options"),
            "kept": kept, "names": names, "engine": engine, "amp": amp,
        }  # fmt: skip
    except Exception as err:  # noqa: BLE001 - CodeNotIdentified, or anything unexpected
        reason = str(err) if isinstance(err, CodeNotIdentified) else \
            f"the configuration could not be identified ({type(err).__name__}: {err})"
        warnings.warn(f"result cache not used for this run: {reason}; the results are computed "
                      "and not stored", RuntimeWarning, stacklevel=4)  # fmt: skip
        return None
    return config


def _cached_group(model, x, images, specs, stages, kw, files: _GroupFiles, table, keep_maps,
                  advance) -> tuple[list[dict], dict, dict | None]:  # fmt: skip
    """One group through the cache, slice by slice: ``(rows, kept maps, trained maps)`` (the
    trained model's maps ``{method: (G, C, H, W)}``, ``None`` when the finished group was
    loaded: the noise floor then recomputes them)."""
    saved = files.load_final()
    if saved is not None:
        files.remove_parts()  # left over by an interruption just after the group was saved
        advance(len(images), len(stages) + 1)
        return saved["rows"], saved["maps"], None
    plan, dev = files.plan, x.device
    parts: dict[int, dict] = {}
    for j in range(len(plan)):
        part = files.load_part(j)
        if part is not None:
            parts[j] = part
            advance(len(images), len(part["stages"]))
    trained = targets0 = feats = None
    if 0 in parts:
        trained = {m: t.to(dev) for m, t in parts[0]["trained"].items()}
        targets0 = parts[0]["targets0"].to(dev)
    todo = [(j, plan[j]) for j in range(len(plan)) if j not in parts]
    if todo:
        for j, gm in _compute_group(model, x, images, specs, stages, "batched", kw,
                                    slices=(todo, targets0)):  # fmt: skip
            first = 1 if j == 0 else 0
            if j == 0:
                trained = {m: v for m, v in gm.maps[0].items()}
                targets0 = gm.targets[0]
            if feats is None:
                feats = {m: MapFeatures(trained[m]) for m in trained}
            view = GroupMaps(gm.images, torch.cat([targets0[None], gm.targets[first:]]),
                             [trained] + gm.maps[first:])  # fmt: skip
            part = {"stages": files.slice_states(j),
                    "rows": table(view, stages=[stages[k] for k in plan[j]], first=plan[j][0],
                                  orig=feats),
                    "maps": keep_maps(gm, files.slice_states(j))}  # fmt: skip
            if j == 0:
                part["trained"] = {m: v.detach().float().cpu().clone() for m, v in trained.items()}
                part["targets0"] = targets0.detach().cpu().clone()
            atomic_save(part, files.part(j))
            parts[j] = part
            del gm, view
    rows = [r for j in range(len(plan)) for r in parts[j]["rows"]]
    maps = {i: {st: mp for j in range(len(plan)) for st, mp in parts[j]["maps"][i].items()}
            for i in files.kept}  # fmt: skip
    atomic_save({"rows": rows, "maps": maps}, files.final)
    files.remove_parts()
    return rows, maps, trained


def _group_rows(gm: GroupMaps, methods: Sequence[str], fns, stages: Sequence[Stage],
                names: Sequence[str], schedule: str, describe: str, label: str, first: int = 0,
                orig: dict[str, MapFeatures] | None = None,
                ids: Sequence[int] | None = None) -> list[dict]:  # fmt: skip
    """Table rows of one group of images: every stage, method, metric and image (``gm.maps[0]``
    the trained model's maps, ``gm.maps[k]`` those of ``stages[k - 1]``, the schedule's stage
    ``first + k - 1``).  The trained model's maps are post-processed once
    (:class:`sanitylib.metrics.MapFeatures`; ``orig`` when already done)."""
    rows = []
    G = len(gm.images)
    orig = orig or {m: MapFeatures(gm.maps[0][m]) for m in methods}
    prepared = {(m, f.name): (f.prepare or (lambda v: v))(orig[m].maps) for m in methods
                for f in fns if not f.builtin}  # fmt: skip
    targets = gm.targets.tolist()
    for k, stage in enumerate(stages, start=1):
        for meth in methods:
            feats = MapFeatures(gm.maps[k][meth])
            const = (feats.abs_constant() | orig[meth].abs_constant()).tolist()
            for fn in fns:
                metric = fn.name
                if fn.builtin:
                    vals = compare(metric, orig[meth], feats)
                else:
                    vals = fn.values(prepared[(meth, metric)],
                                     (fn.prepare or (lambda v: v))(feats.maps), G)
                vals = vals.tolist()
                for g in range(G):
                    i = gm.images[g]
                    rows.append({
                        "schedule": schedule, "stage_index": first + k - 1, "stage": stage.name,
                        "method": meth, "image": int(i if ids is None else ids[i]),
                        "image_name": names[i], "metric": metric,
                        "value": float(vals[g]), "constant": bool(const[g]),
                        "target": int(targets[k][g]), "original_target": int(targets[0][g]),
                        "perturbation": describe, "model": label,
                    })  # fmt: skip
    return rows


def cascading_randomization(model: nn.Module, x: Tensor, methods: Sequence, blocks=None,
                            metrics: Sequence = DEFAULT_METRICS, seed: int = 0,
                            **kwargs) -> pd.DataFrame:  # fmt: skip
    """Cascading randomization (paper section 3.1): at stage k, blocks 1..k from the top are
    randomized.  See :func:`run_randomization` for the arguments and the table."""
    return run_randomization(model, x, methods, "cascading", blocks, metrics, seed, **kwargs)


def independent_randomization(model: nn.Module, x: Tensor, methods: Sequence, blocks=None,
                              metrics: Sequence = DEFAULT_METRICS, seed: int = 0,
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


def explain_methods(model: nn.Module, x: Tensor, methods: Sequence,
                    method_options: dict[str, dict] | None = None, seed: int = 0,
                    batch_size: int | None = None, progress: bool = True, *,
                    amp: str | None = None, image_ids: Sequence[int] | None = None,
                    ) -> dict[str, Tensor]:  # fmt: skip
    """Maps of several methods on the same images (each for the model's predicted class):
    ``{method: (N, C, H, W)}``, from the batched engine's shared passes (equal to
    :func:`sanitylib.explain` per method up to :data:`sanitylib.engine.MAP_TOLERANCE`).

    The model runs in eval mode; its ``training`` flags and buffers are restored afterwards.
    ``image_ids`` are the images' indices for the noise seeds (default ``0..N-1``, as
    ``explain``)."""
    check_seed(seed)
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
                                    seed=seed, batch_size=batch_size, amp=amp, on_rows=bar.update)
            it = iter_state_maps(model, x, methods, [()], seed=seed, target=target,
                                 method_options=method_options, batch_size=batch_size, amp=amp,
                                 image_ids=image_ids, reuse_forward=False, on_rows=bar.update)  # fmt: skip
            try:
                gm = next(it)
            finally:
                it.close()
            return {m: v.clone() for m, v in gm.maps[0].items()}
