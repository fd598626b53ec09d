"""The result cache: a run's identity, its files, slices, safe loading, validation, recovery.

A run's results live in one folder of the cache (``~/.cache/sanitylib/runs/<key>`` or
``$SANITYLIB_CACHE``), named by :func:`config_key` of :func:`run_config`: the run's
specification (:meth:`sanitylib.RunSpec.describe`), the model's weights, buffers and code, the
images, the code of every user callable (methods, metrics, initializer), the weights every block
takes when randomized, and the versions of sanitylib (and its source), torch and captum.  The key
is the same in every process (no ``hash()``-ordered values enter it).

**Staleness is impossible by design, not by listing state.**  A key cannot see every state a
user's code reads (a module-level dict, an object's attribute, a helper in another file).  So
every cached group of images is *validated* before it is served: the trained model's maps of the
group are recomputed (what the noise floor needs anyway; about ``1 / (stages + 1)`` of the
group's work) and must equal the stored ones, and every user metric must give the stored values
on the stored maps.  A group that fails is reported, recomputed and replaced.

A group is computed in slices of stages (about :data:`SLICES_PER_GROUP`), each saved
atomically, so an interrupted run resumes from its finished slices, in this process or a new
one.  Files hold only tensors and plain values and are read with ``torch.load(weights_only=True)``
(nothing is unpickled); an unreadable or inconsistent file is reported and recomputed.  A cache
folder that cannot be written is read from where it has results, and the rest is computed
without being stored (one warning).
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
import torch
import torch.fx
from torch import Tensor, nn

from .utils import __version__, atomic_save, atomic_write, cache_dir, load_cached, source_hash, tensor_hash

__all__ = ["CodeNotIdentified", "config_key", "run_config", "RunCache", "GroupFiles",
           "slice_plan", "SLICES_PER_GROUP", "CACHE_LAYOUT", "FINGERPRINT_TOLERANCE"]  # fmt: skip

#: A group of images is computed (with the cache on) in about this many slices of stages, each
#: saved when done: the most an interruption loses is one slice.
SLICES_PER_GROUP = 5
#: Version of the cache's layout (part of the key).  3: the run specification's fields, the
#: randomized weights, float32 kept maps, the validation fingerprint in every group file.
CACHE_LAYOUT = 3
#: A cached group is served only if the trained model's maps, recomputed now, equal the stored
#: ones within this fraction of each map's largest magnitude (the same order as the batch-size
#: effect of :data:`sanitylib.engine.MAP_TOLERANCE`'s note; identical in practice, since the
#: recomputation uses the same chunks).  A change of what the methods compute that moves no
#: trained map by more than this is not detected.
FINGERPRINT_TOLERANCE = 1e-5
ORIGINAL = "original"
#: Keys of every table row (a stored row without them is a damaged file).
ROW_KEYS = frozenset({"schedule", "stage_index", "stage", "method", "image", "image_name",
                      "metric", "value", "constant", "target", "original_target",
                      "perturbation", "model"})  # fmt: skip


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
        h.update(_code_hash(c).encode() if isinstance(c, types.CodeType) else _stable_repr(c).encode())
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    return h.hexdigest()[:16]


def _stable_repr(c) -> str:
    """``repr`` of a code constant, the same in every process: a (frozen)set's elements are
    sorted (their order follows ``hash()``, which changes with ``PYTHONHASHSEED`` for strings:
    ``Conv2d.__init__`` holds ``frozenset({'zeros', 'reflect', ...})``)."""
    if isinstance(c, (set, frozenset)):
        return f"{type(c).__name__}({{{', '.join(sorted(_stable_repr(v) for v in c))}}})"
    if isinstance(c, tuple):
        return "(" + ", ".join(_stable_repr(v) for v in c) + ",)"
    return repr(c)


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



# ----------------------------------------------------------------------------- identity of a run


def _randomized_weights(model: nn.Module, spec) -> str:
    """Hash of the weights every block of the run takes when randomized (all blocks at once;
    each block draws from its own generator): what a user's initializer computes is checked by
    its output, whatever state it reads."""
    from .randomize import _members, _named_tensors, randomized

    blocks = list(spec.blocks)
    with randomized(model, blocks, spec.perturbation, spec.seed) as m:
        tensors = [t for b in blocks for member in _members(m, b)
                   for t in _named_tensors(member).values()]  # fmt: skip
        return tensor_hash(tensors)


def run_config(spec, model: nn.Module, x: Tensor, memory_format: str = "contiguous") -> dict | None:
    """The cache key's configuration of running ``spec`` on ``model`` and ``x`` with the passes
    in ``memory_format`` (resolved: :mod:`sanitylib.memory_format`; it changes the numbers at
    the level of float rounding), or ``None`` (with a warning saying why) when some code that
    determines the result cannot be identified."""
    ident = _Identifier(model)
    try:
        code = ident.model_identity()
        tensors = [t for _, t in model.named_parameters()] + [b for _, b in model.named_buffers()]
        dev = next((t.device for t in model.parameters()), x.device)
        run = spec.describe()
        for k in ("floor", "activations"):  # which parts are produced, not their values
            run.pop(k)
        run["method_options"] = ident.value(spec.options(), "method_options")
        config = {
            "layout": CACHE_LAYOUT, "version": __version__, "source": source_hash(),
            "torch": torch.__version__, "captum": _package_version("captum"),
            "run": run,
            "model": {"weights": tensor_hash(tensors), "classes": code["classes"],
                      "modules": code["modules"]},
            "x": tensor_hash([x]), "device": dev.type, "memory_format": memory_format,
            "code": {
                "methods": [None if sp.builtin else
                            [ident.value(sp.origin if sp.origin is not None else sp.fn,
                                         f"method {sp.name!r}"),
                             ident.value(dict(sp.options), f"the options of method {sp.name!r}"),
                             ident.value(sp.validate, f"the validation of method {sp.name!r}"),
                             sp.batch_size, sp.guided] for sp in spec.methods],
                "metrics": [None if m.builtin else
                            [ident.value(m.prepare, f"metric {m.name!r}"),
                             ident.value(m.compare, f"metric {m.name!r}")] for m in spec.metrics],
                "perturbation": [spec.perturbation.kind, spec.perturbation.sigma,
                                 spec.perturbation.relative,
                                 ident.value(spec.perturbation.init, "the perturbation's initializer")],
            },
            "randomized": _randomized_weights(model, spec),
        }  # fmt: skip
    except Exception as err:  # noqa: BLE001 - CodeNotIdentified, or anything unexpected
        reason = str(err) if isinstance(err, CodeNotIdentified) else \
            f"the configuration could not be identified ({type(err).__name__}: {err})"
        warnings.warn(f"result cache not used for this run: {reason}; the results are computed "
                      "and not stored", RuntimeWarning, stacklevel=4)  # fmt: skip
        return None
    return config


# ----------------------------------------------------------------------------- files


def slice_plan(n_stages: int) -> list[list[int]]:
    """Stages' indices per slice: about :data:`SLICES_PER_GROUP` slices, at least one stage each."""
    size = max(1, math.ceil(n_stages / SLICES_PER_GROUP))
    return [list(range(lo, min(n_stages, lo + size))) for lo in range(0, n_stages, size)]


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
    if any(r.keys() != ROW_KEYS for r in rows):
        return "table rows with missing or unexpected columns"
    return None


def _trained_problem(d: dict, G: int, methods: Sequence[str]) -> str | None:
    t, tr, fp = d.get("targets0"), d.get("trained"), d.get("fingerprint")
    if not isinstance(t, Tensor) or t.shape != (G,) or not isinstance(tr, dict) \
            or sorted(tr) != sorted(methods) \
            or not all(isinstance(v, Tensor) and v.shape[:1] == (G,) for v in tr.values()):
        return "no trained maps"
    if not isinstance(fp, dict) or not all(
            isinstance(v, dict) and all(isinstance(u, Tensor) for u in v.values()) for v in fp.values()):
        return "no fingerprint"
    return None


class GroupFiles:
    """The cache files of one group of images: ``images_AAAA_BBBB.pt`` once the group is
    finished (its rows, kept maps, the trained model's maps and classes and the metrics'
    fingerprint), ``images_AAAA_BBBB.partJJ.pt`` per finished slice while it is not (slice 0
    also holds the trained model's maps, classes and fingerprint)."""

    def __init__(self, cache: "RunCache", images: list[int], spec, plan: list[list[int]]) -> None:
        self.cache, self.images, self.plan = cache, list(images), plan
        self.stem = f"images_{images[0]:04d}_{images[-1]:04d}"
        self.methods = spec.method_names
        self.kept = [i for i in images if i in spec.kept]
        self.n_metrics, self.state_names = len(spec.metrics), spec.state_names
        self.final = cache.folder / f"{self.stem}.pt"

    def part(self, j: int) -> Path:
        return self.cache.folder / f"{self.stem}.part{j:02d}.pt"

    def n_rows(self, n_stages: int) -> int:
        return n_stages * len(self.methods) * self.n_metrics * len(self.images)

    def slice_states(self, j: int) -> list[str]:
        return ([ORIGINAL] if j == 0 else []) + [self.state_names[k + 1] for k in self.plan[j]]

    def load_final(self) -> dict | None:
        def problem(d) -> str | None:
            if not isinstance(d, dict) or not {"rows", "maps", "trained", "targets0"} <= d.keys():
                return "not a group file"
            return (_rows_problem(d["rows"], self.n_rows(len(self.state_names) - 1))
                    or _maps_problem(d["maps"], self.kept, self.state_names, self.methods)
                    or _trained_problem(d, len(self.images), self.methods))

        return load_cached(self.final, problem)

    def load_part(self, j: int) -> dict | None:
        def problem(d) -> str | None:
            if not isinstance(d, dict) or not {"stages", "rows", "maps"} <= d.keys():
                return "not a slice file"
            if d["stages"] != self.slice_states(j):
                return "other stages"
            if j == 0 and (p := _trained_problem(d, len(self.images), self.methods)):
                return p
            return (_rows_problem(d["rows"], self.n_rows(len(self.plan[j])))
                    or _maps_problem(d["maps"], self.kept, d["stages"], self.methods))

        return load_cached(self.part(j), problem)

    def remove_parts(self) -> None:
        if self.cache.writable:
            for p in self.cache.folder.glob(f"{self.stem}.part*.pt"):
                p.unlink(missing_ok=True)

    def remove_all(self) -> None:
        self.remove_parts()
        if self.cache.writable:
            self.final.unlink(missing_ok=True)


class RunCache:
    """The folder of one run in the cache (see the module's docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writable = True

    @classmethod
    def open(cls, spec, model: nn.Module, x: Tensor, setting,
             memory_format: str = "contiguous") -> "RunCache | None":  # fmt: skip
        """The run's folder for the ``cache`` setting (``True``: sanitylib's cache folder, or
        a folder) and the passes' resolved ``memory_format``, or ``None``: the cache is off, or
        the run's code cannot be identified, or no folder can be had (a warning says which)."""
        if setting is False:
            return None
        config = run_config(spec, model, x, memory_format)
        if config is None:
            return None
        if isinstance(setting, bool):
            try:
                root = cache_dir("runs")
            except OSError as err:
                warnings.warn(f"sanitylib cache: cannot create the cache folder ({err}); the "
                              "results are computed and not stored", RuntimeWarning, stacklevel=3)
                return None
        else:
            root = Path(setting)
        cache = cls(root / config_key(config))
        try:
            cache.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if not cache.folder.is_dir():
                warnings.warn(f"sanitylib cache: cannot create {cache.folder} ({err}); the "
                              "results are computed and not stored", RuntimeWarning, stacklevel=3)
                return None
            cache._read_only(err)
        text = json.dumps(config, indent=1, default=str)
        cache.write(cache.folder / "config.json", lambda tmp: Path(tmp).write_text(text))
        return cache

    def _read_only(self, err: OSError) -> None:
        if self.writable:
            self.writable = False
            warnings.warn(f"sanitylib cache: {self.folder} cannot be written ({err}); results "
                          "found there are used, the rest is computed and not stored",
                          RuntimeWarning, stacklevel=4)  # fmt: skip

    def write(self, path: Path, write: Callable[[str], None]) -> None:
        if self.writable:
            try:
                atomic_write(path, write)
            except OSError as err:
                self._read_only(err)

    def save(self, obj, path: Path) -> None:
        if self.writable:
            try:
                atomic_save(obj, path)
            except OSError as err:
                self._read_only(err)


# ----------------------------------------------------------------------------- validation


def metric_fingerprint(metrics, trained: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Every user metric's values between the trained model's maps and their mirror images
    ``{metric: {method: (G,)}}``: stored with a group, recomputed before it is served (a metric
    that reads changed state gives other values).  Built-in metrics are sanitylib's code, keyed
    by its source."""
    out = {}
    for f in metrics:
        if f.builtin:
            continue
        prep = f.prepare or (lambda v: v)
        out[f.name] = {m: f.values(prep(t), prep(t.flip(-1)), len(t)).float().cpu() for m, t in trained.items()}
    return out


def _validation_problem(stored: dict, fresh_maps: dict[str, Tensor], fresh_targets: Tensor,
                        metrics) -> str | None:  # fmt: skip
    """Why a stored group does not match what the run computes now (``None``: it matches)."""
    if not torch.equal(stored["targets0"].cpu(), fresh_targets.cpu()):
        return "the trained model's predicted classes differ"
    for m, old in stored["trained"].items():
        new = fresh_maps[m].detach().float().cpu()
        if new.shape != old.shape:
            return f"the trained model's {m} maps have another shape"
        scale = old.flatten(1).abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        diff = (new - old).flatten(1).abs().amax(1) / scale
        if not bool(((diff <= FINGERPRINT_TOLERANCE) | (new == old).flatten(1).all(1)).all()):
            return (f"the trained model's {m} maps differ from the stored ones by up to "
                    f"{float(diff.max()):.2g} of their maximum")  # fmt: skip
    fp = metric_fingerprint(metrics, stored["trained"])
    for name, per in fp.items():
        old = stored["fingerprint"].get(name, {})
        for m, v in per.items():
            if m not in old or not np.allclose(v.numpy(), old[m].numpy(), rtol=1e-6, atol=1e-9,
                                               equal_nan=True):  # fmt: skip
                return f"metric {name!r} gives other values on the stored maps"
    return None


def cached_group(runner, files: GroupFiles) -> tuple[list[dict], dict, dict[str, Tensor]]:
    """One group through the cache, slice by slice: ``(rows, kept maps, trained maps)``, the
    trained model's maps ``{method: (G, C, H, W)}`` (float32, CPU when loaded).

    ``runner`` computes (:class:`sanitylib.experiment`'s runner): ``trained(images)``,
    ``slices(images, todo, targets0)``, ``rows(view, stages, first, orig)``, ``keep(gm, names)``,
    ``advance(n_images, n_states)``.  Stored results are validated first (see the module's
    docstring); a group that fails is reported and recomputed."""
    images, plan, spec = files.images, files.plan, runner.spec
    saved = files.load_final()
    parts: dict[int, dict] = {}
    if saved is None:
        for j in range(len(plan)):
            part = files.load_part(j)
            if part is not None:
                parts[j] = part
        if 0 not in parts:  # later slices cannot be validated without the first one
            parts = {}
    stored = saved if saved is not None else parts.get(0)
    if stored is not None:
        gm = runner.trained(images)
        problem = _validation_problem(stored, gm.maps[0], gm.targets[0], spec.metrics)
        if problem is not None:
            warnings.warn(f"sanitylib cache: the stored results of images {images[0]}-{images[-1]} "
                          f"in {files.cache.folder} no longer match what the run computes now "
                          f"({problem}): something they depend on changed outside the cache key "
                          "(a global variable, an object's attribute, a helper in another file); "
                          "they are recomputed", RuntimeWarning, stacklevel=3)  # fmt: skip
            files.remove_all()
            saved, parts = None, {}
        del gm
    if saved is not None:
        files.remove_parts()  # left over by an interruption just after the group was saved
        runner.advance(len(images), len(runner.stages) + 1)
        return saved["rows"], saved["maps"], saved["trained"]
    dev = runner.x.device
    for j, part in parts.items():
        runner.advance(len(images), len(part["stages"]))
    trained = targets0 = feats = fingerprint = None
    if 0 in parts:
        trained = {m: t.to(dev) for m, t in parts[0]["trained"].items()}
        targets0, fingerprint = parts[0]["targets0"].to(dev), parts[0]["fingerprint"]
    todo = [(j, plan[j]) for j in range(len(plan)) if j not in parts]
    for j, gm in runner.slices(images, todo, targets0):
        first = 1 if j == 0 else 0
        if j == 0:
            trained = dict(gm.maps[0])
            targets0 = gm.targets[0]
            fingerprint = metric_fingerprint(spec.metrics, {m: v.detach().float().cpu() for m, v in trained.items()})
        if feats is None:
            feats = runner.features(trained)
        view = type(gm)(gm.images, torch.cat([targets0[None], gm.targets[first:]]),
                        [trained] + gm.maps[first:])  # fmt: skip
        part = {"stages": files.slice_states(j),
                "rows": runner.rows(view, [runner.stages[k] for k in plan[j]], plan[j][0], feats),
                "maps": runner.keep(gm, files.slice_states(j))}  # fmt: skip
        if j == 0:
            part["trained"] = {m: v.detach().float().cpu().clone() for m, v in trained.items()}
            part["targets0"] = targets0.detach().cpu().clone()
            part["fingerprint"] = fingerprint
        files.cache.save(part, files.part(j))
        parts[j] = part
        del gm, view
    rows = [r for j in range(len(plan)) for r in parts[j]["rows"]]
    maps = {i: {st: mp for j in range(len(plan)) for st, mp in parts[j]["maps"][i].items()}
            for i in files.kept}  # fmt: skip
    final = {"rows": rows, "maps": maps, "trained": parts[0]["trained"],
             "targets0": parts[0]["targets0"], "fingerprint": parts[0]["fingerprint"]}  # fmt: skip
    files.cache.save(final, files.final)
    files.remove_parts()
    return rows, maps, final["trained"]
