"""Batched saliency engine: the maps of many methods, images and model states from shared passes.

The work of a sanity check is forward and backward passes; everything else is overhead.  The
engine computes exactly what :func:`sanitylib.explain` computes per method, with less work:

* **Shared passes.**  Gradient, Gradient x Input and GradCAM come from one backward pass on the
  images (the GradCAM layer's activation and its gradient are read off the same pass); Guided
  BackProp is a second backward pass through the *same* forward graph, with the gradient at the
  output of every ``nn.ReLU`` module clamped at zero (what captum's ``GuidedBackprop`` does on
  those modules, so :func:`sanitylib.attribution.check_guided_backprop` guards it the same way);
  Guided GradCAM is the product of the Guided BackProp and GradCAM maps.  SmoothGrad, VarGrad and
  IG-SmoothGrad of an image use prefixes of one seeded noise stream
  (:func:`sanitylib.attribution.unit_noise`), so SmoothGrad and VarGrad with the same noise level
  share their noisy gradients.
* **Batching.**  The rows (images x integration steps x noise samples, of every method) of a
  group of images are cut into chunks of ``batch_size`` rows: automatic on CUDA (from the free
  memory), :data:`CPU_BATCH_SIZE` on the CPU, or given.  Tensors stay on the model's device.
  On the CPU the engine keeps freed memory for the next pass while it runs
  (:func:`sanitylib.allocator.keep_freed_memory`): without it, glibc maps every large activation
  afresh from the OS and page faults cost more than the arithmetic.
* **Model states inside the chunk loop.**  For each chunk the engine walks through every model
  state (trained model, then each randomization stage; per-block random weights are drawn once
  and swapped in by copying).  The first state's forward pass is recorded; later states replay
  the recorded outputs of the modules that finish before the first operation touching a changed
  parameter or buffer (the blocks a cascade stage leaves unchanged) and only compute the rest.
  Replay is exact (same operations on the same inputs); it is switched off automatically for
  models it cannot follow (forward hooks, data-dependent module calls, in-place changes of
  recorded outputs).
  Replay is on by default on CUDA, and on the CPU where freed memory is kept
  (see :data:`REPLAY_ON_CPU`).
* **Mixed precision** (``amp="bfloat16"`` or ``"float16"``): optional autocast of the forward
  pass; off by default (see the book's status page for its measured effect on the metrics).

Results equal :func:`sanitylib.explain` per method up to float rounding: rows are batched with
other rows than in ``explain`` (convolution kernels can round differently per batch size) and
sums are accumulated in float64.  Measured on EfficientNet-Lite0 (``tests/test_engine.py``):
every map within ``1e-4 * max|map|`` of ``explain`` (typically 1e-6), metrics within 1e-3.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .allocator import keep_freed_memory
from .attribution import (DEFAULT_BATCH_SIZE, METHODS, _edge_detector, _ig_weights, _layer,
                          check_guided_backprop, check_input, predict, resolve_settings,
                          unit_noise)  # fmt: skip
from .metrics import METRICS, _gaussian_window, hog, pearson, rankdata, sort_rows
from .models import Block, get_submodule
from .postprocess import _safe_div, unit_normalize
from .randomize import Perturbation, randomize_, restore, snapshot

__all__ = ["MAP_TOLERANCE", "CPU_BATCH_SIZE", "compute_maps", "iter_state_maps", "GroupMaps",
           "auto_batch_size", "rows_per_image", "AMP_DTYPES", "MapFeatures", "Metric", "compare"]  # fmt: skip

#: Documented agreement with :func:`sanitylib.explain`: max |engine - explain| <= MAP_TOLERANCE *
#: max |explain| per method and image (float32, no autocast).
MAP_TOLERANCE = 1e-4
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Forward replay by default on the CPU too, provided freed memory is kept
#: (:func:`sanitylib.allocator.keeps_freed_memory`).  Replay keeps the first state's graph alive
#: while the other states run; with glibc's default thresholds every later pass then maps fresh
#: memory, which made each pass about 2x slower (EfficientNet-Lite0, 32 rows, 1 thread).  With
#: freed memory kept, replay saved 23 % of the engine's time on the benchmark's cascade
#: (EfficientNet-Lite0, 2 images, 9 methods, 16-row chunks, 2 threads: 22.7 s -> 17.4 s).
REPLAY_ON_CPU = True
#: Rows per chunk on the CPU.  Measured on EfficientNet-Lite0 (224x224, 2 cores, forward and
#: backward to the input, freed memory kept): 39-40 ms per row from 8 to 32 rows, 42 at 4, 61 at
#: 1; with glibc's default thresholds 16 rows stay at 39-51 ms but 32 rows cost 78-130 ms.
CPU_BATCH_SIZE = 16
_CPU_GROUP_BYTES = 2 << 30  # results of one image group kept at once on the CPU
_RELU_HOOK_TAG = "_sanitylib_guided"


# ----------------------------------------------------------------------------- method plan


@dataclass
class _Plan:
    """What the methods need: settings per method and the shared row sets."""

    methods: tuple[str, ...]
    settings: dict[str, dict]
    layers: dict[str, nn.Module]  # method -> GradCAM layer module
    x_grad: bool  # a plain backward pass on the images is needed
    guided: bool  # a guided backward pass on the images is needed
    noise: list[tuple[float, list[tuple[str, int]]]]  # (level, [(method, n_samples)])
    n_unit: int  # noise samples drawn per image

    @staticmethod
    def make(model: nn.Module, methods: Sequence[str], options: dict[str, dict]) -> "_Plan":
        methods = tuple(dict.fromkeys(methods))
        settings = {m: resolve_settings(m, dict(options.get(m, {}))) for m in methods}
        layers = {m: _layer(model, settings[m]["layer"]) for m in methods
                  if m in ("gradcam", "guided_gradcam")}  # fmt: skip
        noise: dict[float, list[tuple[str, int]]] = {}
        n_unit = 0
        for m in ("smoothgrad", "vargrad"):
            if m in settings:
                s = settings[m]
                noise.setdefault(float(s["noise_level"]), []).append((m, int(s["n_samples"])))
                n_unit = max(n_unit, int(s["n_samples"]))
        if "ig_smoothgrad" in settings:
            n_unit = max(n_unit, int(settings["ig_smoothgrad"]["n_samples"]))
        for m, s in settings.items():
            for key in ("n_samples", "n_steps"):
                if key in s and int(s[key]) < 1:
                    raise ValueError(f"{m}: {key} must be >= 1, got {s[key]}")
        return _Plan(methods, settings, layers,
                     x_grad=any(m in settings for m in ("gradient", "input_x_gradient", "gradcam",
                                                        "guided_gradcam")),
                     guided=any(m in settings for m in ("guided_backprop", "guided_gradcam")),
                     noise=sorted(noise.items()), n_unit=n_unit)  # fmt: skip


def rows_per_image(methods: Sequence[str], method_options: dict[str, dict] | None = None) -> dict:
    """Gradient evaluations per image and model state that the engine computes (after sharing):
    ``{"plain": .., "guided": .., "total": ..}``; a plain evaluation is one forward and one
    backward pass of one input row, a guided one a second backward pass through it."""
    options = method_options or {}
    settings = {m: resolve_settings(m, dict(options.get(m, {}))) for m in dict.fromkeys(methods)}
    plain = int(any(m in settings for m in ("gradient", "input_x_gradient", "gradcam",
                                            "guided_gradcam", "guided_backprop")))  # fmt: skip
    if "integrated_gradients" in settings:
        plain += int(settings["integrated_gradients"]["n_steps"])
    levels: dict[float, int] = {}
    for m in ("smoothgrad", "vargrad"):
        if m in settings:
            lv = float(settings[m]["noise_level"])
            levels[lv] = max(levels.get(lv, 0), int(settings[m]["n_samples"]))
    plain += sum(levels.values())
    if "ig_smoothgrad" in settings:
        s = settings["ig_smoothgrad"]
        plain += int(s["n_samples"]) * int(s["n_steps"])
    guided = int(any(m in settings for m in ("guided_backprop", "guided_gradcam")))
    return {"plain": plain, "guided": guided, "total": plain + guided}


# ----------------------------------------------------------------------------- jobs


class _Job:
    """A run of input rows whose gradients feed one map (per model state)."""

    n: int = 0
    image: int = 0

    def rows(self, lo: int, hi: int) -> Tensor:
        raise NotImplementedError

    def add(self, s: int, lo: int, hi: int, g: Tensor) -> None:
        raise NotImplementedError


class _IGJob(_Job):
    """Integrated Gradients of one input point ``z`` (``explain``'s path and weights)."""

    def __init__(self, image: int, z: Tensor, base: Tensor, alphas: Tensor, weights: Tensor,
                 sink: Callable[[int, Tensor], None]) -> None:  # fmt: skip
        self.image, self.z, self.base, self.alphas, self.weights = image, z, base, alphas, weights
        self.n, self.sink, self.acc = len(alphas), sink, {}

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.base + self.alphas[lo:hi].view(-1, 1, 1, 1) * (self.z - self.base)

    def add(self, s: int, lo: int, hi: int, g: Tensor) -> None:
        part = (self.weights[lo:hi].view(-1, 1, 1, 1) * g).double().sum(0)
        self.acc[s] = part if s not in self.acc else self.acc[s] + part
        if hi == self.n:
            self.sink(s, self.acc.pop(s).to(g.dtype) * (self.z - self.base))


class _NoiseJob(_Job):
    """SmoothGrad (mean) and VarGrad (variance) of one image from one noise prefix."""

    def __init__(self, image: int, xi: Tensor, unit: Tensor, sigma: float,
                 consumers: list[tuple[str, int]], sink: Callable[[int, str, Tensor], None]) -> None:  # fmt: skip
        self.image, self.xi, self.unit, self.sigma = image, xi, unit, sigma
        self.consumers = consumers
        self.n = max(n for _, n in consumers)
        self.sink, self.acc = sink, {}

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.xi + self.unit[lo:hi] * self.sigma

    def add(self, s: int, lo: int, hi: int, g: Tensor) -> None:
        acc = self.acc.setdefault(s, {})
        for method, n in self.consumers:
            if lo >= n:
                continue
            a = g[: min(hi, n) - lo].double()
            s1 = a.sum(0)
            s2 = (a * a).sum(0) if method == "vargrad" else None
            if method in acc:
                acc[method] = (acc[method][0] + s1, None if s2 is None else acc[method][1] + s2)
            else:
                acc[method] = (s1, s2)
            if min(hi, n) == n:
                s1, s2 = acc.pop(method)
                mean = s1 / n
                self.sink(s, method, (mean if s2 is None else s2 / n - mean * mean).to(g.dtype))
        if not acc:
            self.acc.pop(s, None)


# ----------------------------------------------------------------------------- replay


class _Call:
    __slots__ = ("module", "start", "end", "out", "version")

    def __init__(self, module: nn.Module, start: int) -> None:
        self.module, self.start, self.end, self.out, self.version = module, start, -1, None, -1


class _ReplayMismatch(RuntimeError):
    """The forward pass did not follow the recorded module calls."""


class _UseTracker(TorchFunctionMode):
    """Records the first time each parameter or buffer of the model enters an operation."""

    def __init__(self, rec: "_Recorder") -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ids, first = self.rec.tensor_ids, self.rec.first_use
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, Tensor) and id(t) in ids and id(t) not in first:
                    first[id(t)] = self.rec.clock
        return func(*args, **kwargs)


class _Recorder:
    """Records the module calls of one forward pass (their order, nesting and outputs) and
    replays, in a later forward pass, the outputs of the calls that end before the first
    operation using a changed tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for _, m in model.named_modules()]
        self.tensor_ids = {id(t) for t in model.state_dict(keep_vars=True).values()}
        self.recording = False
        self.calls: list[_Call] = []
        self.first_use: dict[int, int] = {}
        self.clock = 0
        self._stack: list[_Call] = []
        self.handles = []
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """Replay needs plain modules without other forward hooks (they could change outputs)."""
        from torch.nn.modules import module as M

        if M._global_forward_hooks or M._global_forward_pre_hooks:
            return False
        for m in model.modules():
            if isinstance(m, torch.jit.ScriptModule) or m._forward_hooks or m._forward_pre_hooks:
                return False
        return True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.calls, self._stack = [], []

    def last_out(self, module: nn.Module) -> Tensor | None:
        """Output of the last recorded call of ``module`` (``None`` if not replayable)."""
        for c in reversed(self.calls):
            if c.module is module:
                return c.out
        return None

    def _pre(self, module, args) -> None:
        if self.recording:
            c = _Call(module, self.clock)
            self.clock += 1
            self.calls.append(c)
            self._stack.append(c)

    def _post(self, module, args, out) -> None:
        if self.recording:
            c = self._stack.pop()
            c.end = self.clock
            self.clock += 1
            if isinstance(out, Tensor):
                c.out, c.version = out, out._version

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.calls, self._stack, self.first_use, self.clock = [], [], {}, 0
        self.recording = True
        try:
            with _UseTracker(self):
                yield
        finally:
            self.recording = False
        for c in self.calls:  # an output changed in place later in the pass cannot be replayed
            if c.out is not None and c.out._version != c.version:
                c.out = None

    def cut(self, changed: Sequence[Tensor]) -> float:
        """Clock of the first operation of the recorded pass that used one of ``changed``."""
        times = [self.first_use[id(t)] for t in changed if id(t) in self.first_use]
        return min(times) if times else math.inf

    def plan(self, cut: float) -> dict[nn.Module, list[_Call | None]]:
        """Per module, its calls in a replayed pass: a recorded call to replay or ``None``."""
        expected: dict[nn.Module, list[_Call | None]] = {}
        skip_until = -1
        for c in self.calls:
            if c.start < skip_until:
                continue  # inside a replayed call: never runs
            if c.end < cut and c.out is not None:
                expected.setdefault(c.module, []).append(c)
                skip_until = c.end
            else:
                expected.setdefault(c.module, []).append(None)
        return {m: v for m, v in expected.items() if any(c is not None for c in v)}

    @contextlib.contextmanager
    def replay(self, plan: dict[nn.Module, list[_Call | None]]) -> Iterator[None]:
        queues = {m: list(v) for m, v in plan.items()}
        saved = {}
        for m, queue in queues.items():
            saved[m] = m.__dict__.get("forward")
            original = m.forward

            def forward(*args, _q=queue, _orig=original, **kwargs):
                if not _q:
                    raise _ReplayMismatch("more module calls than recorded")
                c = _q.pop(0)
                return _orig(*args, **kwargs) if c is None else c.out

            m.forward = forward
        try:
            yield
        finally:
            for m, prev in saved.items():
                if prev is None:
                    del m.forward
                else:
                    m.forward = prev
        if any(c is not None for q in queues.values() for c in q):
            raise _ReplayMismatch("recorded module calls were not replayed")
        for v in plan.values():
            for c in v:
                if c is not None and c.out._version != c.version:
                    raise _ReplayMismatch("a replayed output was modified in place")


# ----------------------------------------------------------------------------- model states


class _States:
    """Switches the model between states (sets of randomized blocks) by copying tensors.

    Each block's random tensors are drawn once with :func:`sanitylib.randomize.randomize_`
    (its own generator), so a state equals ``randomized(model, blocks, perturbation, seed)``.
    Blocks sharing tensors fall back to re-randomizing the whole state at every switch."""

    def __init__(self, model: nn.Module, states: Sequence[Sequence[Block]],
                 perturbation: Perturbation, seed: int) -> None:  # fmt: skip
        self.model, self.states, self.perturbation, self.seed = model, states, perturbation, seed
        self.tensors: dict[str, list[Tensor]] = {}
        self.trained: dict[str, list[Tensor]] = {}
        self.random: dict[str, list[Tensor]] = {}
        blocks = {b.name: b for st in states for b in st}
        seen: dict[int, str] = {}
        self.shared = False
        for name, b in blocks.items():
            ts = []
            for path in b.modules:
                for t in get_submodule(model, path).state_dict(keep_vars=True).values():
                    if id(t) in seen and seen[id(t)] != name:
                        self.shared = True
                    if id(t) not in {id(u) for u in ts}:
                        ts.append(t)
                    seen[id(t)] = name
            self.tensors[name] = ts
            self.trained[name] = [t.detach().clone() for t in ts]
        if not self.shared:
            with torch.no_grad():
                for name, b in blocks.items():
                    randomize_(model, [b], perturbation, seed)
                    self.random[name] = [t.detach().clone() for t in self.tensors[name]]
                    for t, v in zip(self.tensors[name], self.trained[name]):
                        t.copy_(v)
        self.current: set[str] = set()
        self.dirty: dict[int, Tensor] = {}

    @torch.no_grad()
    def set(self, k: int) -> None:
        """Put the model in state ``k``."""
        want = {b.name for b in self.states[k]}
        if self.shared:
            for name in self.current:
                self._write(name, self.trained[name])
            randomize_(self.model, self.states[k], self.perturbation, self.seed)
            for name in want:
                for t in self.tensors[name]:
                    self.dirty[id(t)] = t
        else:
            for name in self.current - want:
                self._write(name, self.trained[name])
            for name in want - self.current:
                self._write(name, self.random[name])
        self.current = want

    def _write(self, name: str, values: list[Tensor]) -> None:
        # in-place copies bump the version counters: autograd refuses to reuse a recorded
        # graph that saved a changed tensor, a safety net for the replay logic
        for t, v in zip(self.tensors[name], values):
            t.copy_(v)
            self.dirty[id(t)] = t

    @torch.no_grad()
    def restore(self) -> None:
        """Put every block back to its trained tensors."""
        for name in self.tensors if self.shared else self.current:
            self._write(name, self.trained[name])
        self.current = set()

    def clean(self) -> None:
        """Forget earlier writes (called when a forward pass is recorded)."""
        self.dirty = {}


# ----------------------------------------------------------------------------- sizes


def auto_batch_size(model: nn.Module, x: Tensor, *, amp: str | None = None, factor: float = 2.0,
                    fraction: float = 0.6, cap: int = 1024) -> int:  # fmt: skip
    """Rows per forward/backward chunk: :data:`CPU_BATCH_SIZE` on the CPU; on CUDA, as many rows
    as fit in ``fraction`` of the free memory, from the peak memory of a probe pass on 2 rows
    (``factor`` for the recorded graph kept across model states)."""
    if x.device.type != "cuda":
        return CPU_BATCH_SIZE
    dev = x.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    rows = x[:1].detach().expand(2, *x.shape[1:]).clone().requires_grad_(True)
    with _autocast(dev, amp):
        out = model(rows)
    torch.autograd.grad(out[:, 0].sum(), rows)
    per_row = max(1, (torch.cuda.max_memory_allocated(dev) - base) // 2)
    del out, rows
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return int(max(1, min(cap, fraction * free / (factor * per_row))))


def _autocast(device: torch.device, amp: str | None):
    if not amp:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _group_size(x: Tensor, n_states: int, n_methods: int, budget: int | None) -> int:
    """Images per group: their maps in every state (float32) must fit in ``budget`` bytes."""
    per_image = (n_states * (n_methods + 1) + 8) * x[0].numel() * 4
    if budget is None:
        if x.device.type == "cuda":
            budget = int(0.25 * torch.cuda.mem_get_info(x.device)[0])
        else:
            budget = _CPU_GROUP_BYTES
    return int(max(1, min(len(x), budget // per_image)))


# ----------------------------------------------------------------------------- engine


@dataclass
class GroupMaps:
    """Maps of a group of images in every model state.

    Attributes:
        images: indices of the group's images in the full batch.
        targets: ``(S, G)`` class explained per state and image.
        maps: ``maps[s][method]`` is ``(G, C, H, W)`` (on the model's device).
    """

    images: list[int]
    targets: Tensor
    maps: list[dict[str, Tensor]]


class _Engine:
    def __init__(self, model: nn.Module, methods: Sequence[str], method_options: dict[str, dict],
                 seed: int, batch_size: int | None, amp: str | None, reuse: bool,
                 on_rows: Callable[[int], None] | None) -> None:  # fmt: skip
        self.model, self.seed, self.amp = model, seed, amp or None
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
        self.plan = _Plan.make(model, methods, method_options)
        self.batch_size = batch_size
        self.reuse = reuse
        self.on_rows = on_rows or (lambda n: None)
        self.guided_on = False
        self.capture = False
        self.n_relu = 0
        self.layer_out: dict[int, Tensor] = {}
        self.layer_modules = {id(m): m for m in self.plan.layers.values()}
        self.relu_registered = 0
        self.image_ids: list[int] | None = None

    # -- hooks ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self, recorder: bool) -> Iterator["_Recorder | None"]:
        handles = []
        rec = None
        try:
            if recorder:
                rec = _Recorder(self.model)
            for layer in self.layer_modules.values():
                handles.append(layer.register_forward_hook(self._layer_hook))
            if self.plan.guided:
                for m in self.model.modules():
                    if isinstance(m, nn.ReLU):
                        handles.append(m.register_forward_hook(self._relu_hook))
            yield rec
        finally:
            for h in handles:
                h.remove()
            if rec is not None:
                rec.remove()
            self.layer_out = {}

    def _layer_hook(self, module, args, out) -> None:
        if self.capture:
            if not isinstance(out, Tensor) or out.ndim != 4:
                raise ValueError("GradCAM layer output must be (N, K, h, w), got "
                                 f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")  # fmt: skip
            self.layer_out[id(module)] = out

    def _relu_hook(self, module, args, out) -> None:
        if not (self.capture and isinstance(out, Tensor) and out.requires_grad):
            return
        if getattr(out, _RELU_HOOK_TAG, False):
            return  # a replayed output: hooked when it was recorded
        out.register_hook(self._guided_grad)
        setattr(out, _RELU_HOOK_TAG, True)
        self.relu_registered += 1

    def _guided_grad(self, g: Tensor) -> Tensor | None:
        return g.clamp(min=0) if self.guided_on else None

    # -- passes ---------------------------------------------------------------------------

    def _forward(self, rows: Tensor) -> Tensor:
        with torch.enable_grad(), _autocast(rows.device, self.amp):
            out = self.model(rows)
        if not isinstance(out, Tensor) or out.ndim != 2:
            raise ValueError(f"the model must return logits (N, classes), got {type(out).__name__}")
        return out

    def _state_passes(self, rows: Tensor, states: _States, rec: _Recorder | None, n_states: int,
                      target_of: Callable[[int, Tensor], Tensor], capture: bool,
                      consume: Callable[..., None]) -> None:  # fmt: skip
        """Forward and backward passes of ``rows`` in every model state (stage-inner loop)."""
        rows = rows.detach().requires_grad_(True)
        reuse = rec is not None and n_states > 1
        self.capture = capture
        keep = reuse or (capture and self.plan.guided)
        try:
            for k in range(n_states):
                states.set(k)
                self.layer_out = {}
                self.relu_registered = 0
                if k == 0 and reuse:
                    states.clean()
                    with rec.record():
                        logits = self._forward(rows)
                elif reuse:
                    plan = rec.plan(rec.cut(list(states.dirty.values())))
                    with rec.replay(plan):
                        logits = self._forward(rows)
                else:
                    logits = self._forward(rows)
                if capture and self.plan.guided and k == 0 and self.relu_registered == 0:
                    raise RuntimeError("Guided BackProp: no ReLU output was hooked")
                if capture:
                    for lid, module in self.layer_modules.items():
                        if lid not in self.layer_out:  # nested in a replayed call
                            if rec is None or rec.last_out(module) is None:
                                raise _ReplayMismatch("GradCAM layer output not available")
                            self.layer_out[lid] = rec.last_out(module)
                tgt = target_of(k, logits)
                sel = logits.gather(1, tgt[:, None]).sum()
                grads: tuple = (None,)
                acts: dict = {}
                if not capture or self.plan.x_grad:
                    layers = list(self.layer_out.values()) if capture else []
                    grads = torch.autograd.grad(sel, [rows, *layers], retain_graph=keep,
                                                allow_unused=True)  # fmt: skip
                    acts = dict(zip(self.layer_out.keys(), zip(layers, grads[1:])))
                    del layers
                gbp = None
                if capture and self.plan.guided:
                    self.guided_on = True
                    try:
                        gbp = torch.autograd.grad(sel, rows, retain_graph=reuse)[0]
                    finally:
                        self.guided_on = False
                consume(k, grads[0], acts, gbp)
                evaluations = len(rows) * (1 if gbp is None else 2)  # as rows_per_image counts
                del logits, sel, grads, acts, gbp
                self.on_rows(evaluations)
        finally:
            self.capture = False
            if rec is not None:
                rec.calls = []

    # -- one group of images --------------------------------------------------------------

    def run_group(self, x: Tensor, images: Sequence[int], states: _States, n_states: int,
                  fixed_targets: Tensor | None, rec: _Recorder | None) -> GroupMaps:  # fmt: skip
        """All maps of the images ``x[images]`` in every state."""
        p, dev = self.plan, x.device
        idx = list(images)
        xg = x[idx]
        G, shape = len(idx), xg.shape[1:]
        bs = self.batch_size
        out: list[dict[str, Tensor]] = [dict() for _ in range(n_states)]
        for s in range(n_states):
            for m in p.methods:
                out[s][m] = torch.empty((G, *shape), dtype=x.dtype, device=dev)
        targets = torch.empty((n_states, G), dtype=torch.long, device=dev)
        if fixed_targets is not None:
            targets[:] = fixed_targets[idx].to(dev)

        # 1) the images themselves: targets, gradient, Gradient x Input, GradCAM, Guided BackProp
        need_x = p.x_grad or p.guided
        if need_x or fixed_targets is None:
            for lo in range(0, G, bs):
                hi = min(G, lo + bs)

                def target_of(k: int, logits: Tensor, lo=lo, hi=hi) -> Tensor:
                    if fixed_targets is None:
                        targets[k, lo:hi] = logits.detach().argmax(1)
                    return targets[k, lo:hi]

                def consume(k: int, g: Tensor, acts: dict, gbp: Tensor | None, lo=lo, hi=hi) -> None:
                    self._x_maps(out[k], xg[lo:hi], lo, hi, g, acts, gbp)

                if need_x:
                    self._state_passes(xg[lo:hi], states, rec, n_states, target_of, True, consume)
                else:
                    with torch.no_grad():
                        for k in range(n_states):
                            states.set(k)
                            target_of(k, self._forward(xg[lo:hi]))

        # 2) integration paths and noise samples, batched across images and methods
        jobs = self._jobs(x, idx, xg, out, n_states)
        total = sum(j.n for j in jobs)
        pos = [0, 0]  # job index, row within job
        for start in range(0, total, bs):
            size = min(bs, total - start)
            segs, parts = [], []
            while size > 0:
                job = jobs[pos[0]]
                take = min(size, job.n - pos[1])
                segs.append((job, pos[1], pos[1] + take))
                parts.append(job.rows(pos[1], pos[1] + take))
                size -= take
                pos[1] += take
                if pos[1] == job.n:
                    pos[0], pos[1] = pos[0] + 1, 0
            rows = torch.cat(parts)
            img = torch.tensor([j.image for j, lo, hi in segs for _ in range(hi - lo)], device=dev)

            def target_of(k: int, logits: Tensor, img=img) -> Tensor:
                return targets[k, img]

            def consume(k: int, g: Tensor, acts: dict, gbp, segs=segs) -> None:
                off = 0
                for job, lo, hi in segs:
                    job.add(k, lo, hi, g[off: off + hi - lo])
                    off += hi - lo

            self._state_passes(rows, states, rec, n_states, target_of, False, consume)

        if "edge_detector" in p.settings:
            edges = _edge_detector(xg)
            for s in range(n_states):
                out[s]["edge_detector"] = edges
        return GroupMaps(idx, targets, out)

    def _x_maps(self, out: dict[str, Tensor], xc: Tensor, lo: int, hi: int, g: Tensor,
                acts: dict, gbp: Tensor | None) -> None:  # fmt: skip
        p = self.plan
        if "gradient" in out:
            out["gradient"][lo:hi] = g
        if "input_x_gradient" in out:
            out["input_x_gradient"][lo:hi] = g * xc
        if "guided_backprop" in out:
            out["guided_backprop"][lo:hi] = gbp
        for m in ("gradcam", "guided_gradcam"):
            if m not in out:
                continue
            a, da = acts[id(p.layers[m])]
            cam = _cam(a, da, xc)
            out[m][lo:hi] = cam if m == "gradcam" else gbp * cam

    def _jobs(self, x: Tensor, idx: list[int], xg: Tensor, out: list[dict[str, Tensor]],
              n_states: int) -> list[_Job]:  # fmt: skip
        p, jobs = self.plan, []
        units = {}
        if p.n_unit:
            ids = self.image_ids
            units = {g: unit_noise(xg[g], p.n_unit, self.seed, i if ids is None else ids[i])
                     for g, i in enumerate(idx)}  # fmt: skip
        span = {g: float(xg[g].max() - xg[g].min()) for g in range(len(idx))}
        if "integrated_gradients" in p.settings:
            s = p.settings["integrated_gradients"]
            alphas, weights = _ig_weights(int(s["n_steps"]), s["rule"], x.device)
            base = torch.as_tensor(s["baseline"], dtype=x.dtype, device=x.device).expand_as(x)
            for g, i in enumerate(idx):
                def sink(k: int, m: Tensor, g=g) -> None:
                    out[k]["integrated_gradients"][g] = m

                jobs.append(_IGJob(g, xg[g], base[i], alphas, weights, sink))
        for level, consumers in p.noise:
            for g in range(len(idx)):
                def sink(k: int, method: str, m: Tensor, g=g) -> None:
                    out[k][method][g] = m

                jobs.append(_NoiseJob(g, xg[g], units[g], level * span[g], consumers, sink))
        if "ig_smoothgrad" in p.settings:
            s = p.settings["ig_smoothgrad"]
            n = int(s["n_samples"])
            alphas, weights = _ig_weights(int(s["n_steps"]), s["rule"], x.device)
            acc: dict[tuple[int, int], list] = {}
            for g in range(len(idx)):
                def sink(k: int, m: Tensor, g=g) -> None:
                    a = acc.setdefault((k, g), [torch.zeros_like(m, dtype=torch.float64), 0])
                    a[0] += m.double()
                    a[1] += 1
                    if a[1] == n:
                        out[k]["ig_smoothgrad"][g] = (acc.pop((k, g))[0] / n).to(m.dtype)

                sigma = float(s["noise_level"]) * span[g]
                for j in range(n):
                    z = xg[g] + units[g][j] * sigma
                    base = torch.as_tensor(s["baseline"], dtype=x.dtype, device=x.device)
                    base = base.expand_as(z[None])[0]
                    jobs.append(_IGJob(g, z, base, alphas, weights, sink))
        return jobs


def _cam(a: Tensor, da: Tensor | None, xc: Tensor) -> Tensor:
    """``explain``'s GradCAM from the layer activation ``a`` and its gradient ``da``:
    captum LayerGradCam with ReLU, divided by its peak, bilinear upsampling, channels tiled."""
    if da is None:
        da = torch.zeros_like(a)
    a, da = a.detach().to(xc.dtype), da.to(xc.dtype)
    cam = F.relu((da.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    peak = cam.amax(dim=(1, 2, 3), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-30), torch.zeros_like(cam))
    cam = F.interpolate(cam, size=xc.shape[-2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, xc.shape[1], -1, -1)


# ----------------------------------------------------------------------------- metrics


class MapFeatures:
    """Post-processed forms of a batch of raw maps ``(N, C, H, W)``, computed once and cached,
    so that the trained model's maps are prepared once per run and not once per stage.

    The paper's normalizations are monotone, so one sort per map gives both the 99th
    percentile and the ranks (``abs_normalize`` followed by ``rankdata`` would sort twice).
    Every value equals :func:`sanitylib.metrics.similarity`'s (``tests/test_engine.py``)."""

    def __init__(self, maps: Tensor) -> None:
        # a finite sum proves every value finite (cheaper than isfinite on every value)
        if not torch.isfinite(maps.sum()) and not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or infinite values")
        self.maps = maps
        self._cache: dict[str, object] = {}

    def _get(self, key: str, fn: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def abs_ranks(self) -> tuple[Tensor, Tensor]:
        """Ranks ``(N, H*W)`` of ``abs_normalize(maps)`` and whether each map is constant."""
        return self._get("abs", lambda: _normalized_ranks(self.maps, "abs"))

    def abs_constant(self) -> Tensor:
        """``is_constant(abs_normalize(maps).flatten(1))`` -> (N,) bool, without a full sort
        unless the ranks are cached anyway: the ABS map is constant iff its 99th percentile
        equals its minimum (then every pixel maps to 0)."""
        if "abs" in self._cache:
            return self.abs_ranks()[1]

        def make():
            n, c = self.maps.shape[:2]
            if c == 1:
                v = self.maps[:, 0].abs().flatten(1)
                return v.amin(1) == v.amax(1)
            v = self.maps.abs().sum(1).flatten(1)
            d = v.shape[1]
            pos = 99.0 / 100.0 * (d - 1)
            lo = int(pos)
            hi, frac = min(lo + 1, d - 1), pos - lo
            # sorted values s: s[k] == min iff more than k values equal the minimum, so the
            # percentile s[lo] + frac * (s[hi] - s[lo]) is found without sorting or selecting
            mn = v.amin(1, keepdim=True)
            at_min = v == mn
            n_min = at_min.sum(1)
            above = v.masked_fill(at_min, math.inf).amin(1)  # smallest value above the minimum
            mn = mn[:, 0]
            s_lo = torch.where(n_min > lo, mn, above)
            s_hi = torch.where(n_min > hi, mn, above)
            # s[lo] > min (n_min <= lo): the percentile is above the minimum; s_lo is then a
            # lower bound of the true s[lo] (> min), so the test below is False as it must be
            return (n_min > lo) & ((s_lo + frac * (s_hi - s_lo)) - mn == 0)
        return self._get("abs_const", make)

    def div_ranks(self) -> Tensor:
        """Ranks ``(N, H*W)`` of ``diverging_normalize(maps)``."""
        return self._get("div", lambda: _normalized_ranks(self.maps, "div"))[0]

    def unit(self) -> Tensor:
        return self._get("unit", lambda: unit_normalize(self.maps))

    def ssim_stats(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """SSIM's per-map terms (float64, channels flattened): the unit map ``u``, its local
        mean ``mu``, ``mu**2`` and the local sample variance."""
        def make():
            u = self.unit().double().flatten(0, 1)
            mu, muu = _gauss_valid(u), _gauss_valid(u * u)
            mu2 = mu * mu
            return u, mu, mu2, muu.sub_(mu2).mul_(_SSIM_COV_NORM)
        return self._get("ssim", make)

    def hog(self) -> Tensor:
        return self._get("hog", lambda: hog(self.unit()))

    def hog_ranks(self) -> Tensor:
        return self._get("hog_ranks", lambda: rankdata(self.hog()))


def _normalized_ranks(maps: Tensor, kind: str, percentile: float = 99.0) -> tuple[Tensor, Tensor]:
    """One sort per map: the ``abs`` or diverging normalization of
    :mod:`sanitylib.postprocess` evaluated on the sorted values, then average ranks."""
    n, c = maps.shape[:2]
    if c == 1:
        v = maps[:, 0].flatten(1)
        v = v.abs() if kind == "abs" else v
        s, order = sort_rows(v)
        peak = torch.maximum(s[:, 0].abs(), s[:, -1].abs())
        vals = _safe_div(s, peak, 0.0)
    else:
        v = (maps.abs().sum(1) if kind == "abs" else maps.sum(1)).flatten(1)
        s, order = sort_rows(v)
        d = s.shape[1]
        pos = percentile / 100.0 * (d - 1)
        lo = int(pos)
        hi, frac = min(lo + 1, d - 1), pos - lo
        q = s[:, lo] + frac * (s[:, hi] - s[:, lo])  # == row_quantile(v, percentile)
        if kind == "abs":
            mn = s[:, 0]
            vals = _safe_div(s - mn.view(-1, 1), q - mn, 0.0).clamp(0.0, 1.0)
        else:
            span = q.abs()
            vals = _safe_div(s + span.view(-1, 1), 2 * span, 0.5).clamp(-1.0, 1.0)
    return _ranks_of_sorted(vals, order), vals[:, 0] == vals[:, -1]


def _ranks_of_sorted(s: Tensor, order: Tensor) -> Tensor:
    """Average ranks (as :func:`sanitylib.metrics.rankdata`) from sorted rows and the sort order."""
    n, d = s.shape
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    flat = new.flatten()
    group = flat.cumsum(0) - 1
    start = flat.nonzero().squeeze(1)
    count = torch.diff(start, append=start.new_tensor([n * d]))
    avg = (start % d).double() + (count + 1).double() / 2
    return torch.empty(n, d, dtype=torch.float64, device=s.device).scatter_(1, order, avg[group].view(n, d))


_SSIM_WIN = 11  # skimage's Gaussian window: sigma 1.5, truncate 3.5
_SSIM_COV_NORM = _SSIM_WIN**2 / (_SSIM_WIN**2 - 1)  # sample covariance


def _gauss_valid(u: Tensor, sigma: float = 1.5) -> Tensor:
    """SSIM's Gaussian window (11 taps, truncate 3.5) over ``(M, H, W)`` float64 maps, 'valid'
    region; scipy's C filter on the CPU (much faster than float64 convolutions in torch)."""
    win = _gaussian_window(sigma, 3.5, u.device)
    k, r = win.numel(), win.numel() // 2
    if u.device.type == "cpu":
        from scipy.ndimage import correlate1d

        a = correlate1d(u.numpy(), win.numpy(), axis=1, mode="constant")[:, r:-r]
        a = correlate1d(a, win.numpy(), axis=2, mode="constant")[:, :, r:-r]
        return torch.from_numpy(a.copy())  # contiguous: strided torch ops are slow
    return F.conv2d(F.conv2d(u[:, None], win.view(1, 1, k, 1)), win.view(1, 1, 1, k))[:, 0]


def _ssim(fa: MapFeatures, fb: MapFeatures, data_range: float = 2.0) -> Tensor:
    """:func:`sanitylib.metrics.ssim` of the unit-normalized maps, from cached per-map terms
    (one Gaussian filtering per pair)."""
    if min(fa.maps.shape[-2:]) < _SSIM_WIN:
        raise ValueError(f"SSIM needs maps of at least {_SSIM_WIN}x{_SSIM_WIN} pixels")
    x, ux, ux2, vx = fa.ssim_stats()
    y, uy, uy2, vy = fb.ssim_stats()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    p = ux * uy
    num = (2 * p + c1).mul_(_gauss_valid(x * y).sub_(p).mul_(2 * _SSIM_COV_NORM).add_(c2))
    den = (ux2 + uy2 + c1).mul_(vx + vy + c2)
    return num.div_(den).flatten(1).mean(1).view(-1, fa.maps.shape[1]).mean(1)


def compare(metric: str, fa: MapFeatures, fb: MapFeatures) -> Tensor:
    """:func:`sanitylib.metrics.similarity` ``(a, b, metric)`` (defaults) from features -> (N,)."""
    if metric == "spearman_abs":
        return pearson(fa.abs_ranks()[0], fb.abs_ranks()[0], on_constant="zero")
    if metric == "spearman":
        return pearson(fa.div_ranks(), fb.div_ranks(), on_constant="zero")
    if metric == "ssim":
        return _ssim(fa, fb)
    if metric == "hog_spearman":
        return pearson(fa.hog_ranks(), fb.hog_ranks(), on_constant="zero")
    if metric == "hog_pearson":
        return pearson(fa.hog(), fb.hog(), on_constant="zero")
    raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Metric:
    """A custom similarity for :func:`sanitylib.run_randomization`: ``prepare`` maps raw maps
    ``(N, C, H, W)`` to anything (computed once for the trained model's maps), ``compare`` two
    prepared batches to ``(N,)`` values."""

    name: str
    prepare: Callable[[Tensor], object]
    compare: Callable[[object, object], Tensor]


# ----------------------------------------------------------------------------- public API


def iter_state_maps(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str],
    states: Sequence[Sequence[Block]],
    *,
    perturbation: Perturbation | None = None,
    seed: int = 0,
    target: str | Tensor = "current",
    method_options: dict[str, dict] | None = None,
    batch_size: int | None = None,
    group_size: int | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    amp: str | None = None,
    reuse_forward: bool | None = None,
    image_ids: Sequence[int] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[GroupMaps]:
    """Maps of every method in every model state, one group of images at a time.

    Args:
        model: classifier returning logits; restored bit-exactly (and to its train/eval mode)
            when the iterator finishes or is closed, also on error.
        x: ``(N, C, H, W)`` images (moved to the model's device).
        methods: names from :data:`sanitylib.attribution.METHODS`.
        states: each state is the tuple of blocks randomized in it (``()``: the trained model).
        perturbation: how blocks are randomized (default: the paper's re-initialization).
        seed: seeds the block generators and the noise (as ``explain(seed=...)``).
        target: ``"current"`` (argmax of each state's logits), ``"original"`` (argmax of the
            first state), or a ``(N,)`` tensor of classes.
        method_options: per-method options of :func:`sanitylib.explain`.
        batch_size: rows per forward/backward chunk (default :func:`auto_batch_size`).
        group_size: images per group (default: as many as the results fit in 1 GiB on the CPU
            or a quarter of the free GPU memory); ``groups`` gives the groups explicitly.
        amp: ``None``, ``"bfloat16"`` or ``"float16"`` (autocast of the forward passes).
        reuse_forward: replay the recorded forward activations that a state leaves unchanged
            (default ``None``: on CUDA, and on the CPU where freed memory is kept; see
            :data:`REPLAY_ON_CPU`).
        image_ids: index of each image for its noise seed (default ``0..N-1``, as ``explain``).
        on_rows: called with the number of rows after each pass (progress).

    Yields:
        :class:`GroupMaps` per group, in order.
    """
    if not len(methods):
        raise ValueError("methods must not be empty")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    check_input(model, x)
    if not states:
        raise ValueError("states must not be empty")
    dev = next((t.device for t in model.parameters()), x.device)
    x = x.detach().to(dev)
    perturbation = perturbation or Perturbation()
    engine = _Engine(model, methods, dict(method_options or {}), seed, None, amp, reuse_forward,
                     on_rows)  # fmt: skip
    if image_ids is not None:
        engine.image_ids = [int(i) for i in image_ids]
        if len(engine.image_ids) != len(x):
            raise ValueError(f"image_ids has {len(engine.image_ids)} entries for {len(x)} images")
    if engine.plan.guided:
        engine.n_relu = check_guided_backprop(model, x)
    else:
        engine.n_relu = 0
    was_training = model.training
    model.eval()
    fixed = None
    if isinstance(target, Tensor):
        fixed = target.to(dev).long().reshape(-1)
        if len(fixed) != len(x):
            raise ValueError(f"target has {len(fixed)} entries for {len(x)} images")
    elif target not in ("current", "original"):
        raise ValueError(f"target must be 'current', 'original' or a tensor, got {target!r}")
    snap = snapshot(model)
    memory = contextlib.ExitStack()
    kept = dev.type == "cpu" and memory.enter_context(keep_freed_memory())
    switch = None
    try:
        switch = _States(model, states, perturbation, seed)
        if target == "original":
            switch.set(0)
            fixed = predict(model, x, batch_size or DEFAULT_BATCH_SIZE).argmax(1)
        engine.batch_size = batch_size or auto_batch_size(model, x, amp=engine.amp)
        if groups is None:
            gs = group_size or _group_size(x, len(states), len(engine.plan.methods), None)
            groups = [list(range(i, min(len(x), i + gs))) for i in range(0, len(x), gs)]
        if reuse_forward is None:
            reuse_forward = dev.type != "cpu" or (REPLAY_ON_CPU and kept)
        use_rec = reuse_forward and len(states) > 1 and _Recorder.supported(model)
        for images in groups:
            with engine.hooks(use_rec) as rec:
                try:
                    result = engine.run_group(x, images, switch, len(states), fixed, rec)
                except _ReplayMismatch as err:
                    warnings.warn(f"forward replay switched off for this model ({err})",
                                  stacklevel=2)  # fmt: skip
                    use_rec = False
                    result = engine.run_group(x, images, switch, len(states), fixed, None)
            switch.restore()  # the caller sees the trained model between groups
            yield result
    finally:
        with memory:
            if switch is not None:
                switch.restore()
            restore(model, snap)
            model.train(was_training)


def compute_maps(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str],
    target: int | Sequence[int] | Tensor | None = None,
    *,
    method_options: dict[str, dict] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    amp: str | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """Maps of several methods for the model as it is, from shared, batched passes:
    ``{method: (N, C, H, W)}``, equal to ``explain(model, x, method, target, seed=seed,
    **method_options[method])`` per method (see :data:`MAP_TOLERANCE`).

    ``target``: class per image (int, sequence or tensor); default: the model's argmax."""
    check_input(model, x)
    dev = next((t.device for t in model.parameters()), x.device)
    if target is None:
        t = predict(model, x.to(dev), batch_size or DEFAULT_BATCH_SIZE).argmax(1)
    else:
        t = torch.as_tensor(target, device=dev).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(len(x))
        if t.numel() != len(x):
            raise ValueError(f"target must be an int or have one entry per image ({len(x)}), "
                             f"got {t.numel()}")  # fmt: skip
    maps: dict[str, list[Tensor]] = {m: [] for m in dict.fromkeys(methods)}
    for gm in iter_state_maps(model, x, methods, [()], seed=seed, target=t,
                              method_options=method_options, batch_size=batch_size,
                              amp=amp, reuse_forward=False, on_rows=on_rows):  # fmt: skip
        for m in maps:
            maps[m].append(gm.maps[0][m])
    return {m: torch.cat(v) for m, v in maps.items()}
