"""Batched saliency engine: the maps of many methods, images and model states from shared passes.

The work of a sanity check is forward and backward passes; everything else is overhead.  The
engine computes exactly what :func:`sanitylib.explain` computes per method, with less work:

* **Method specs.**  Each method's :class:`sanitylib.registry.MethodSpec` says which shared
  passes it needs (:class:`sanitylib.registry.Passes`); the engine reads the specs, not method
  names.  A method without passes (a user's callable or captum class) is called once per model
  state on chunks of the group's images, with the targets of that state.
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
  On the CPU, where the user opts in (:func:`sanitylib.allocator.keep_freed_memory`, or
  ``SANITYLIB_KEEP_FREED_MEMORY=1``), freed memory stays in the process for the next pass:
  without it, glibc maps every large activation afresh from the OS and page faults cost more than
  the arithmetic.  sanitylib does not change the allocator on its own (it is process-global).
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
  pass; off by default (see benchmarks/README.md for its measured effect on the metrics).
* **Memory format** (``memory_format``): the passes of a model with ``nn.Conv2d`` layers on 4-D
  images run channels-last on the CPU and CUDA (:mod:`sanitylib.memory_format`: the rule, the
  measured speed, the setting ``"contiguous"`` that reproduces earlier numbers bit for bit).  The
  model's 4-D weights are converted for each group of images and their original storages put
  back afterwards; the maps come back in the default format.  Methods without shared passes
  (users' callables) are called on the converted model, with the images as given.  Random
  weights are drawn before the conversion (an in-place random fill follows the memory order, so
  a channels-last tensor would get other weights from the same generator); models whose blocks
  share tensors, re-drawn at every switch, run in the default format.

The model states (:class:`sanitylib.randomize.ModelStates`) and forward replay
(:mod:`sanitylib.replay`) live in their own modules, the map features and metrics in
:mod:`sanitylib.metrics`.

Results equal :func:`sanitylib.explain` per method up to float rounding: rows are batched with
other rows than in ``explain`` (convolution kernels can round differently per batch size) and
sums are accumulated in float64.  Measured on EfficientNet-Lite0 (``tests/test_engine.py``):
every map within ``1e-4 * max|map|`` of ``explain`` (typically 1e-6), metrics within 1e-3.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import allocator
from . import memory_format as mf
from .attribution import (DEFAULT_BATCH_SIZE, Context, cam_to_map, check_guided_backprop,
                          check_baseline, check_input, check_seed, check_targets, gradcam_layer, ig_weights,
                          predict, probe_model, resolve_targets, run_method,
                          unit_noise)  # fmt: skip
from .models import Block
from .randomize import ModelStates, Perturbation, evaluating, restore, snapshot
from .registry import MethodSpec, check_method_options, resolve_methods
from .replay import Recorder, ReplayMismatch

__all__ = ["MAP_TOLERANCE", "CPU_BATCH_SIZE", "CPU_SMALL_INPUT_ROWS", "compute_maps", "iter_state_maps", "GroupMaps",
           "auto_batch_size", "rows_per_image", "AMP_DTYPES", "image_groups"]  # fmt: skip


#: Documented agreement with :func:`sanitylib.explain`: max |engine - explain| <= MAP_TOLERANCE *
#: max |explain| per method and image (float32, no autocast), when both pass their rows through
#: the model in batches the backend treats alike.  Float rounding can exceed it on networks with
#: clipping activations: a rounding difference flips a ReLU6 gate and changes a few pixels a lot.
#: Measured on EfficientNet-Lite0 (torch 2.14, CPU): the input gradient of 16-row batches
#: differs from that of 1- to 15-row batches by 1.4e-3 of the map's maximum (the CPU backward
#: changes algorithm at 16 rows), and float32 from float64 by 2.3e-2, in every batch size.
#: Both computations in the same memory format; between the formats (channels-last is the
#: default for convolutional models) see :data:`sanitylib.memory_format.MAP_TOLERANCE`.
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
#: Rows per chunk on the CPU for small inputs: the chunk grows so that it holds no more input
#: elements than :data:`CPU_BATCH_SIZE` images of 3x224x224, up to this many rows.  Small models
#: pay a per-call cost that 16 rows do not amortize: measured on the MNIST models (28x28, one
#: thread, freed memory kept, a weight-noise cascade of 10 digits and 9 methods), 64-row chunks
#: took 2.1x less time than 16-row chunks for the MLP (6.0 -> 2.9 s) and 1.2x less for the CNN
#: (10.1 -> 8.4 s), 128 rows no less; the table values moved by 5e-6 (MLP) and 0 (CNN).
CPU_SMALL_INPUT_ROWS = 64
_CPU_REFERENCE_ELEMENTS = 3 * 224 * 224
_CPU_GROUP_BYTES = 2 << 30  # results of one image group kept at once on the CPU
_RELU_HOOK_TAG = "_sanitylib_guided"


# ----------------------------------------------------------------------------- method plan


@dataclass
class _Plan:
    """What the methods need: their specs and settings and the shared row sets."""

    specs: dict[str, MethodSpec]
    settings: dict[str, dict]
    layers: dict[str, nn.Module]  # method -> GradCAM layer module
    x_grad: bool  # a plain backward pass on the images is needed
    guided: bool  # a guided backward pass on the images is needed
    noise: list[tuple[float, list[tuple[str, str, int]]]]  # (level, [(method, statistic, n)])
    n_unit: int  # noise samples drawn per image
    custom: list[str]  # methods without shared passes: called per model state

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def kind(self, m: str) -> str | None:
        p = self.specs[m].passes
        return None if p is None else p.kind

    def of_kind(self, kind: str) -> list[str]:
        return [m for m in self.specs if self.kind(m) == kind]

    @staticmethod
    def make(model: nn.Module | None, methods: Sequence, options: dict) -> "_Plan":
        specs = {s.name: s for s in resolve_methods(methods)}
        options = check_method_options(options, list(specs.values()))  # a typo is refused
        settings = {m: s.settings(options.get(m, {})) for m, s in specs.items()}
        layers = {}
        if model is not None:
            layers = {m: gradcam_layer(model, settings[m][s.layer_option]) for m, s in specs.items()
                      if s.passes is not None and s.passes.layer}  # fmt: skip
        noise: dict[float, list[tuple[str, str, int]]] = {}
        n_unit = 0
        for m, s in specs.items():
            if s.draws_noise:
                n_unit = max(n_unit, int(settings[m]["n_samples"]))
            if s.passes is not None and s.passes.kind == "noise":
                noise.setdefault(float(settings[m]["noise_level"]), []).append(
                    (m, s.passes.statistic, int(settings[m]["n_samples"])))
        passes = [s.passes for s in specs.values() if s.passes is not None and s.passes.kind == "x"]
        return _Plan(specs, settings, layers,
                     x_grad=any(p.plain or p.layer for p in passes),
                     guided=any(p.guided for p in passes),
                     noise=sorted(noise.items()), n_unit=n_unit,
                     custom=[m for m, s in specs.items() if s.passes is None])  # fmt: skip


def rows_per_image(methods: Sequence, method_options: dict[str, dict] | None = None) -> dict:
    """Gradient evaluations per image and model state that the engine computes (after sharing):
    ``{"plain": .., "guided": .., "custom": .., "total": ..}``; a plain evaluation is one forward
    and one backward pass of one input row, a guided one a second backward pass through it, a
    custom one a call of a user method on one image."""
    plan = _Plan.make(None, methods, method_options or {})
    s = plan.settings
    plain = int(bool(plan.of_kind("x")))
    plain += sum(int(s[m]["n_steps"]) for m in plan.of_kind("ig"))
    plain += sum(max(n for _, _, n in consumers) for _, consumers in plan.noise)
    plain += sum(int(s[m]["n_samples"]) * int(s[m]["n_steps"]) for m in plan.of_kind("ig_noise"))
    guided = int(plan.guided)
    custom = len(plan.custom)
    return {"plain": plain, "guided": guided, "custom": custom, "total": plain + guided + custom}


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
        # weighted sum of the chunk's rows by BLAS in g's precision, accumulated across chunks in
        # float64 (about 10x faster than converting the chunk to float64 first)
        part = torch.tensordot(self.weights[lo:hi].to(g.dtype), g, dims=1).double()
        self.acc[s] = part if s not in self.acc else self.acc[s] + part
        if hi == self.n:
            self.sink(s, self.acc.pop(s).to(g.dtype) * (self.z - self.base))


class _NoiseJob(_Job):
    """SmoothGrad (mean) and VarGrad (variance) of one image from one noise prefix."""

    def __init__(self, image: int, xi: Tensor, unit: Tensor, sigma: float,
                 consumers: list[tuple[str, str, int]], sink: Callable[[int, str, Tensor], None]) -> None:  # fmt: skip
        self.image, self.xi, self.unit, self.sigma = image, xi, unit, sigma
        self.consumers = consumers
        self.n = max(n for _, _, n in consumers)
        self.sink, self.acc = sink, {}

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.xi + self.unit[lo:hi] * self.sigma

    def add(self, s: int, lo: int, hi: int, g: Tensor) -> None:
        acc = self.acc.setdefault(s, {})
        for method, statistic, n in self.consumers:
            if lo >= n:
                continue
            a = g[: min(hi, n) - lo].double()
            s1 = a.sum(0)
            s2 = (a * a).sum(0) if statistic == "var" else None
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


# ----------------------------------------------------------------------------- sizes


def auto_batch_size(model: nn.Module, x: Tensor, *, amp: str | None = None, factor: float = 2.0,
                    fraction: float = 0.6, cap: int = 1024) -> int:  # fmt: skip
    """Rows per forward/backward chunk.  On the CPU :data:`CPU_BATCH_SIZE` for images of
    3x224x224 elements or more; for smaller inputs as many rows as hold the input elements of
    that many such images, at most :data:`CPU_SMALL_INPUT_ROWS` (64 rows for 28x28 digits).  On
    CUDA, as many rows as fit in ``fraction`` of the free memory, from the peak memory of a
    probe pass on 2 rows (``factor`` for the recorded graph kept across model states)."""
    if x.device.type != "cuda":
        per_row = max(1, x[0].numel()) if x.ndim > 0 and len(x) else _CPU_REFERENCE_ELEMENTS
        fit = CPU_BATCH_SIZE * _CPU_REFERENCE_ELEMENTS // per_row
        return int(min(CPU_SMALL_INPUT_ROWS, max(CPU_BATCH_SIZE, fit)))
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


def image_groups(x: Tensor, n_states: int, n_methods: int, group_size: int | None = None) -> list[list[int]]:
    """Consecutive groups of image indices computed together: ``group_size`` images, or as
    many as their maps in every state fit in memory (:func:`_auto_group_size`)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
    gs = group_size or _auto_group_size(x, n_states, n_methods, None)
    return [list(range(i, min(len(x), i + gs))) for i in range(0, len(x), gs)]


def _auto_group_size(x: Tensor, n_states: int, n_methods: int, budget: int | None) -> int:
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
        self.fmt = "contiguous"  # the passes' memory format (sanitylib.memory_format)

    # -- hooks ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self, recorder: bool) -> Iterator["Recorder | None"]:
        handles = []
        rec = None
        try:
            if recorder:
                rec = Recorder(self.model)
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

    def _layer_hook(self, module, args, out) -> Tensor | None:
        if self.capture:
            if not isinstance(out, Tensor) or out.ndim != 4:
                raise ValueError("GradCAM layer output must be (N, K, h, w), got "
                                 f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")  # fmt: skip
            self.layer_out[id(module)] = out
            # the rest of the model gets a copy (as captum's layer hooks do): an in-place
            # operation after the layer (``nn.ReLU(inplace=True)`` after a convolution, as in
            # torchvision's VGG and ResNet) would otherwise overwrite the kept activation and
            # make GradCAM read the ReLU's output and its gradient instead of the layer's
            return out.clone()
        return None

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
        rows = mf.as_format(rows, self.fmt)  # itself when it already is (the passes' leaves)
        with torch.enable_grad(), _autocast(rows.device, self.amp):
            out = self.model(rows)
        if not isinstance(out, Tensor) or out.ndim != 2:
            raise ValueError(f"the model must return logits (N, classes), got {type(out).__name__}")
        return out

    def _state_passes(self, rows: Tensor, states: ModelStates, rec: Recorder | None, n_states: int,
                      target_of: Callable[[int, Tensor], Tensor], capture: bool,
                      consume: Callable[..., None]) -> None:  # fmt: skip
        """Forward and backward passes of ``rows`` in every model state (stage-inner loop)."""
        rows = mf.as_format(rows.detach(), self.fmt).requires_grad_(True)
        reuse = rec is not None and n_states > 1
        self.capture = capture
        keep = reuse or (capture and self.plan.guided)
        with torch.enable_grad():  # also inside a caller's torch.no_grad()
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
                                    raise ReplayMismatch("GradCAM layer output not available")
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
                    if self.fmt != "contiguous":  # the maps in the default format
                        grads = tuple(None if g is None else g.contiguous() for g in grads)
                        acts = {i: (a.detach().contiguous(), None if da is None else da.contiguous())
                                for i, (a, da) in acts.items()}  # fmt: skip
                        gbp = None if gbp is None else gbp.contiguous()
                    consume(k, grads[0], acts, gbp)
                    evaluations = len(rows) * (1 if gbp is None else 2)  # as rows_per_image counts
                    del logits, sel, grads, acts, gbp
                    self.on_rows(evaluations)
            finally:
                self.capture = False
                if rec is not None:
                    rec.calls = []

    # -- one group of images --------------------------------------------------------------

    def run_group(self, x: Tensor, images: Sequence[int], states: ModelStates, n_states: int,
                  fixed_targets: Tensor | None, rec: Recorder | None) -> GroupMaps:  # fmt: skip
        """All maps of the images ``x[images]`` in every state."""
        p, dev = self.plan, x.device
        idx = list(images)
        xg = x[idx]
        G, shape = len(idx), xg.shape[1:]
        bs = self.batch_size
        out: list[dict[str, Tensor]] = [dict() for _ in range(n_states)]
        for s in range(n_states):
            for m in p.methods:
                if p.kind(m) not in (None, "input"):
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

        for m in p.of_kind("input"):
            maps = p.specs[m].passes.combine(xg)
            for s in range(n_states):
                out[s][m] = maps

        # 3) methods without shared passes (users' callables, captum classes), state by state
        if p.custom:
            ids = self.image_ids
            ctx = Context(self.seed, bs, None, tuple(i if ids is None else ids[i] for i in idx))
            for k in range(n_states):
                states.set(k)
                for m in p.custom:
                    out[k][m] = run_method(p.specs[m], self.model, xg, targets[k], p.settings[m], ctx)
                    self.on_rows(G)
        return GroupMaps(idx, targets, out)

    def _x_maps(self, out: dict[str, Tensor], xc: Tensor, lo: int, hi: int, g: Tensor,
                acts: dict, gbp: Tensor | None) -> None:  # fmt: skip
        p = self.plan
        for m in p.of_kind("x"):
            cam = None
            if p.specs[m].passes.layer:
                a, da = acts[id(p.layers[m])]
                cam = _cam(a, da, xc)
            out[m][lo:hi] = p.specs[m].passes.combine(xc, g, cam, gbp)

    def _jobs(self, x: Tensor, idx: list[int], xg: Tensor, out: list[dict[str, Tensor]],
              n_states: int) -> list[_Job]:  # fmt: skip
        p, jobs = self.plan, []
        units = {}
        if p.n_unit:
            ids = self.image_ids
            units = {g: unit_noise(xg[g], p.n_unit, self.seed, i if ids is None else ids[i])
                     for g, i in enumerate(idx)}  # fmt: skip
        span = {g: float(xg[g].max() - xg[g].min()) for g in range(len(idx))}
        for m in p.of_kind("ig"):
            s = p.settings[m]
            alphas, weights = ig_weights(int(s["n_steps"]), s["rule"], x.device)
            base = torch.as_tensor(s["baseline"], dtype=x.dtype, device=x.device).expand_as(x)
            for g, i in enumerate(idx):
                def sink(k: int, mp: Tensor, g=g, m=m) -> None:
                    out[k][m][g] = mp

                jobs.append(_IGJob(g, xg[g], base[i], alphas, weights, sink))
        for level, consumers in p.noise:
            for g in range(len(idx)):
                def sink(k: int, method: str, m: Tensor, g=g) -> None:
                    out[k][method][g] = m

                jobs.append(_NoiseJob(g, xg[g], units[g], level * span[g], consumers, sink))
        for m in p.of_kind("ig_noise"):
            s = p.settings[m]
            n = int(s["n_samples"])
            alphas, weights = ig_weights(int(s["n_steps"]), s["rule"], x.device)
            acc: dict[tuple[int, int], list] = {}
            for g in range(len(idx)):
                def sink(k: int, mp: Tensor, g=g, m=m, n=n, acc=acc) -> None:
                    a = acc.setdefault((k, g), [torch.zeros_like(mp, dtype=torch.float64), 0])
                    a[0] += mp.double()
                    a[1] += 1
                    if a[1] == n:
                        out[k][m][g] = (acc.pop((k, g))[0] / n).to(mp.dtype)

                sigma = float(s["noise_level"]) * span[g]
                for j in range(n):
                    z = xg[g] + units[g][j] * sigma
                    base = torch.as_tensor(s["baseline"], dtype=x.dtype, device=x.device)
                    base = base.expand_as(z[None])[0]
                    jobs.append(_IGJob(g, z, base, alphas, weights, sink))
        return jobs


def _cam(a: Tensor, da: Tensor | None, xc: Tensor) -> Tensor:
    """``explain``'s GradCAM from the layer activation ``a`` and its gradient ``da``: captum
    LayerGradCam with ReLU, then :func:`sanitylib.attribution.cam_to_map`."""
    if da is None:
        da = torch.zeros_like(a)
    a, da = a.detach().to(xc.dtype), da.to(xc.dtype)
    cam = torch.relu((da.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return cam_to_map(cam, xc)


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
    memory_format: str | None = None,
) -> Iterator[GroupMaps]:
    """Maps of every method in every model state, one group of images at a time.

    Args:
        model: classifier returning logits; run in eval mode, restored bit-exactly (every
            parameter and buffer, every module's train/eval flag) when the iterator finishes or
            is closed, also on error.
        x: ``(N, C, H, W)`` images (moved to the model's device).
        methods: registered names, callables or captum classes (:mod:`sanitylib.registry`).
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
        memory_format: ``"auto"``, ``"contiguous"`` or ``"channels_last"`` (default ``None``:
            ``$SANITYLIB_MEMORY_FORMAT``, else ``"auto"``): the passes' memory format, see
            :mod:`sanitylib.memory_format` (``"contiguous"``: the numbers of earlier versions
            bit for bit).  The model is converted per group and comes back as it was.

    Yields:
        :class:`GroupMaps` per group, in order.
    """
    check_seed(seed)
    check_input(model, x)
    mf.check_memory_format(memory_format)
    if not states:
        raise ValueError("states must not be empty")
    dev = next((t.device for t in model.parameters()), x.device)
    x = x.detach().to(dev)
    perturbation = perturbation or Perturbation()
    engine = _Engine(model, methods, dict(method_options or {}), seed, None, amp, reuse_forward,
                     on_rows)  # fmt: skip
    engine.fmt = mf.choose(model, x, memory_format, list(engine.plan.specs.values()))
    if image_ids is not None:
        engine.image_ids = [int(i) for i in image_ids]
        if len(engine.image_ids) != len(x):
            raise ValueError(f"image_ids has {len(engine.image_ids)} entries for {len(x)} images")
    for m in engine.plan.of_kind("ig") + engine.plan.of_kind("ig_noise"):
        check_baseline(engine.plan.settings[m]["baseline"], x, f"method_options[{m!r}]['baseline']")
    if engine.plan.guided:
        engine.n_relu = check_guided_backprop(model, x)
    else:
        engine.n_relu = 0
    fixed = None
    if isinstance(target, Tensor):
        fixed = check_targets(target, probe_model(model, x).n_classes).to(dev)
        if len(fixed) != len(x):
            raise ValueError(f"target has {len(fixed)} entries for {len(x)} images")
    elif not isinstance(target, str) or target not in ("current", "original"):
        raise ValueError(f"target must be 'current', 'original' or a tensor, got {target!r}")
    snap = snapshot(model)
    memory = contextlib.ExitStack()
    # eval mode inside; every module's own training flag back on exit (buffers: ``snap``)
    memory.enter_context(evaluating(model, buffers=False))
    kept = False
    if dev.type == "cpu":  # freed memory kept only where the user opted in (process-global)
        kept = memory.enter_context(allocator.if_opted_in())
    switch = None
    try:
        switch = ModelStates(model, states, perturbation, seed)
        if switch.shared:
            # blocks sharing tensors are re-randomized in place at every switch, and an in-place
            # random fill follows the memory order: channels-last would draw other weights
            engine.fmt = "contiguous"
        if target == "original":
            switch.set(0)
            fixed = predict(model, x, batch_size or DEFAULT_BATCH_SIZE).argmax(1)
        engine.batch_size = batch_size or auto_batch_size(model, x, amp=engine.amp)
        if groups is None:
            groups = image_groups(x, len(states), len(engine.plan.methods), group_size)
        if reuse_forward is None:
            reuse_forward = dev.type != "cpu" or (REPLAY_ON_CPU and kept)
        use_rec = reuse_forward and len(states) > 1 and Recorder.supported(model)
        for images in groups:
            # the model in the passes' format for the group; its own storages back before the
            # caller sees it (and the trained weights: the caller sees the trained model)
            with mf.converted(model, engine.fmt):
                with engine.hooks(use_rec) as rec:
                    try:
                        result = engine.run_group(x, images, switch, len(states), fixed, rec)
                    except ReplayMismatch as err:
                        warnings.warn(f"forward replay switched off for this model ({err})",
                                      stacklevel=2)  # fmt: skip
                        use_rec = False
                        result = engine.run_group(x, images, switch, len(states), fixed, None)
                switch.restore()
            yield result
    finally:
        with memory:
            if switch is not None:
                switch.restore()
            restore(model, snap)


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
    memory_format: str | None = None,
) -> dict[str, Tensor]:
    """Maps of several methods for the model as it is, from shared, batched passes:
    ``{method: (N, C, H, W)}``, equal to ``explain(model, x, method, target, seed=seed,
    **method_options[method])`` per method (see :data:`MAP_TOLERANCE`).

    ``target``: class per image (int, sequence or tensor, in ``[0, classes)``); default: the
    model's argmax.  The model runs in eval mode; its training flags and buffers are restored.
    ``memory_format``: as in :func:`iter_state_maps`."""
    check_seed(seed)
    check_input(model, x)
    dev = next((t.device for t in model.parameters()), x.device)
    maps: dict[str, list[Tensor]] = {spec.name: [] for spec in resolve_methods(methods)}
    with evaluating(model):
        t = resolve_targets(model, x.to(dev), target, batch_size or DEFAULT_BATCH_SIZE)
        for gm in iter_state_maps(model, x, methods, [()], seed=seed, target=t,
                                  method_options=method_options, batch_size=batch_size,
                                  amp=amp, reuse_forward=False, on_rows=on_rows,
                                  memory_format=memory_format):  # fmt: skip
            for m in maps:
                maps[m].append(gm.maps[0][m])
    return {m: torch.cat(v) for m, v in maps.items()}
