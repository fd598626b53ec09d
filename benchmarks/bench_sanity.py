"""Side-by-side benchmark: sanitylib's batched engine vs Quantus 0.6 MPRT vs a plain captum loop.

One process, identical work on every side, printed side by side (see ``benchmarks/README.md``):

1. **Quantus MPRT** (``quantus==0.6.*``) vs sanitylib on what both can express: per-module
   top-down cascading randomization with PyTorch's default re-initialization (every module with
   ``reset_parameters``, Quantus's 99 steps on EfficientNet-Lite0, ``torch.manual_seed(seed+1)``
   before each reset, as Quantus does), the Gradient method, Spearman after Quantus's
   pre-processing (signed channel sum, max-normalization, absolute value), 8 images at
   224x224 (``--quantus-images``; 16 for the full-size run).  sanitylib runs through its public
   API only: user-given blocks (the module paths), a user initializer
   (``Perturbation(init=callable)``) and a custom ``Metric``.  The two sets of correlations must
   agree.
2. **A captum loop** as a careful user writes it (per stage: one call for all images for the
   methods captum batches natively, per image for the ``NoiseTunnel`` methods; captum's own
   batching options ``internal_batch_size`` and ``nt_samples_batch_size``; scipy and
   scikit-image metrics) vs sanitylib's ``run_randomization`` on the paper's full method set and
   all four metrics, 3 images (``--captum-images``; 8 for the full-size run), block-level
   cascading randomization with the paper's initializer.
3. **Efficiency**: the time of the bare forward+backward passes the work needs (plain
   ``torch.autograd.grad`` to the input, no hooks, same chunking) when the forward pass of the
   modules a state leaves unchanged is reused (module granularity, as sanitylib's replay),
   measured in the same run,
   divided by sanitylib's total time; the naive bare passes (every state's full forward pass)
   over sanitylib's time is ``speedup_vs_naive_passes``.

Device: ``--device auto`` (default) runs every side on CUDA when present: model and images on
the GPU, ``torch.cuda.synchronize()`` at the edges of every timer, sanitylib's chunks and
captum's batching options sized to the free memory (``sanitylib.engine.auto_batch_size``), the
same precision for every side (IEEE fp32 unless ``--tf32``; cudnn.benchmark off), peak memory
per side reported.

Fairness: every side runs under the same allocator setting (``--memory``, made for the whole
process before any side runs), the same pinned torch and BLAS/OpenMP thread counts
(``--threads``, set in the environment before numpy and torch load), after a warm-up at every
batch size used; each workload is repeated ``--repeats`` times in ABBA order and the median
(and range) is reported.

Agreement: every value sanitylib computes is compared with the baseline's.  Against a
baseline in sanitylib's own memory format (Quantus and the captum loop in the default format
when sanitylib runs in it, the captum loop in channels-last when sanitylib runs channels-last)
the tolerance is strict (``TOL_QUANTUS``, ``TOL_DETERMINISTIC``): the same arithmetic, so a
difference is the algorithm's.  Against a baseline in the other format the documented bounds
between formats apply (:func:`sanitylib.memory_format.agreement`): in partly randomized states
float32 resolves these values only to a few 1e-2 in either format (a change of batch size moves
them as much).

Ends with ``RESULT speedup_vs_quantus=<x> speedup_vs_captum_loop=<y>
speedup_vs_captum_loop_channels_last=<w> efficiency=<z> speedup_vs_naive_passes=<n>
max_abs_diff=<d> max_abs_diff_other_format=<o>`` (medians; ``max_abs_diff`` against the
baselines in sanitylib's format).  Exits with status 1 if the numbers disagree.

Run: ``make bench`` (installs the ``bench`` extra) or ``.venv/bin/python benchmarks/bench_sanity.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass


def _pin_threads(argv: list[str]) -> int:
    """Pin BLAS/OpenMP threads before numpy and torch load (``--threads``, default 2)."""
    n = 2
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(n)
    return n


THREADS = _pin_threads(sys.argv[1:]) if __name__ == "__main__" else 0

import numpy as np  # noqa: E402
import torch  # noqa: E402

# ----------------------------------------------------------------------------- settings

SEED = 0
QUANTUS_SEED = 42
#: The paper's method set (every method of Adebayo et al. section 3, VarGrad from App. A.7).
METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
           "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam")  # fmt: skip
METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
STOCHASTIC = ("smoothgrad", "vargrad", "ig_smoothgrad")
#: Sample and step counts: the paper's proportions (IG 50, SmoothGrad 50, VarGrad 25,
#: IG-SmoothGrad 25 x 50) scaled down to fit the 10-minute budget on 2 CPU cores.
#: Integrated Gradients uses captum's ``riemann_trapezoid`` rule on both sides.
METHOD_OPTIONS = {
    "integrated_gradients": {"n_steps": 10, "rule": "riemann_trapezoid"},
    "smoothgrad": {"n_samples": 10},
    "vargrad": {"n_samples": 5},
    "ig_smoothgrad": {"n_samples": 2, "n_steps": 10, "rule": "riemann_trapezoid"},
}
#: ``--smoke``: the smallest counts, for checking the script itself (tests/test_bench_sanity.py);
#: its figures are not the benchmark's.
SMOKE_METHOD_OPTIONS = {
    "integrated_gradients": {"n_steps": 2, "rule": "riemann_trapezoid"},
    "smoothgrad": {"n_samples": 2},
    "vargrad": {"n_samples": 2},
    "ig_smoothgrad": {"n_samples": 2, "n_steps": 2, "rule": "riemann_trapezoid"},
}
#: Coarse blocks of EfficientNet-Lite0 for the cascade of comparison 2 (top first).
CAPTUM_BLOCKS = (
    ("logits", ("_fc",)),
    ("head", ("_conv_head", "_bn1")),
    ("blocks 11-15", tuple(f"_blocks.{i}" for i in range(15, 10, -1))),
    ("blocks 5-10", tuple(f"_blocks.{i}" for i in range(10, 4, -1))),
    ("blocks 0-4, stem", tuple(f"_blocks.{i}" for i in range(4, -1, -1)) + ("_conv_stem", "_bn0")),
)
#: captum's batching options in the loop (IG's rows, SmoothGrad's samples, IG-SG's rows): 32 on
#: the CPU, sanitylib's chunk size on CUDA (set by ``main``), so both sides batch alike.
BATCH = 32
#: Rows per forward/backward chunk of sanitylib and of the bare passes (set by ``main``:
#: ``sanitylib.engine.auto_batch_size``, 16 on the CPU, sized to the free memory on CUDA).
CHUNK = 16
#: Memory formats of the bare passes (:mod:`sanitylib.memory_format`): the bound is the faster.
BARE_FORMATS = ("contiguous", "channels_last")
#: Agreement required (absolute difference of correlations / SSIM values).
TOL_QUANTUS = 1e-4
TOL_DETERMINISTIC = 2e-3


#: The device every side runs on (set by ``main``: ``--device``).
DEVICE = torch.device("cpu")


@dataclass
class Timing:
    wall: float
    cpu: float
    peak_gib: float = float("nan")  # CUDA: peak memory allocated during the block


def sync() -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): every timer's edge."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@contextlib.contextmanager
def timed(out: dict, key: str):
    """Append the wall and process-CPU seconds of the block to ``out[key]`` (one per repetition);
    on CUDA synchronized at both ends, with the peak memory allocated during the block."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    sync()
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        sync()
        t = Timing(time.perf_counter() - w, time.process_time() - c)
        if DEVICE.type == "cuda":
            t.peak_gib = torch.cuda.max_memory_allocated(DEVICE) / 2**30
        out.setdefault(key, []).append(t)
        peak = f", peak {t.peak_gib:.2f} GiB" if DEVICE.type == "cuda" else ""
        print(f"  [{key} #{len(out[key])}: {t.wall:.1f} s wall, {t.cpu:.1f} s cpu{peak}]", flush=True)


def med(v) -> float:
    """NaN-free median of a list of numbers."""
    return float(np.median(np.asarray(v, dtype=float)))


def nan_safe_max_diff(a, b) -> float:
    """Largest |a - b| where both are numbers; ``inf`` when the NaN positions differ (a NaN on
    one side only is a disagreement) or the shapes differ."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    ok = ~np.isnan(a)
    return float(np.abs(a[ok] - b[ok]).max()) if ok.any() else 0.0


def load_batch(model, n: int) -> torch.Tensor:
    """``n`` images at 224x224: scikit-image's photos (shipped offline), then their mirror images."""
    import sanitylib as sl

    photos = sl.load_photos(model, names=list(sl.data.PHOTOS), verbose=False).x
    x = torch.cat([photos, photos.flip(-1)])
    while len(x) < n:
        x = torch.cat([x, x.flip(-2)])
    return x[:n].contiguous().to(DEVICE)


# ----------------------------------------------------------------------------- 1: Quantus


def quantus_blocks(model) -> list[str]:
    """Quantus's randomization steps: every module with ``reset_parameters``, top down."""
    return [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]


def quantus_reset(seed: int):
    """Quantus's re-initialization as a sanitylib initializer ``(module, generator)``."""

    def reset_parameters_like_quantus(module, generator) -> None:
        torch.manual_seed(seed + 1)  # Quantus re-seeds the global RNG before every layer
        module.reset_parameters()

    return reset_parameters_like_quantus


def run_quantus(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    import quantus

    metric = quantus.MPRT(
        layer_order="top_down", similarity_func=quantus.similarity_func.correlation_spearman,
        abs=True, normalise=True, skip_layers=False, seed=QUANTUS_SEED,
        return_average_correlation=False, disable_warnings=True, display_progressbar=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(model=model, x_batch=x.cpu().numpy(), y_batch=y.cpu().numpy(), a_batch=None,
                      explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
                      device=str(DEVICE), batch_size=64)  # fmt: skip


def run_sanitylib_quantus_task(model, x: torch.Tensor, memory_format: str | None = None,
                               n_blocks: int | None = None):
    """The Quantus workload through sanitylib's public API (``memory_format``: sanitylib's
    setting, ``None`` = its default; ``n_blocks``: only the first steps of the cascade, for
    tests/regression_cases.py)."""
    import sanitylib as sl
    from sanitylib import Metric
    from sanitylib.metrics import pearson, rankdata

    spearman_quantus = Metric(
        "spearman_quantus",  # Quantus: sum channels (signed), normalise by max, abs; Spearman
        prepare=lambda maps: rankdata(maps.sum(1).abs().flatten(1)),
        compare=lambda a, b: pearson(a, b, on_constant="nan"),
    )
    return sl.run_randomization(  # the allocator setting is the process's (--memory)
        model, x, ["gradient"], "cascading", blocks=quantus_blocks(model)[:n_blocks],
        metrics=[spearman_quantus], seed=QUANTUS_SEED,
        perturbation=sl.Perturbation(init=quantus_reset(QUANTUS_SEED)), target="original",
        store_maps=0, cache=False, progress=False, floor=False, batch_size=CHUNK,
        memory_format=memory_format,
    )  # fmt: skip


# ----------------------------------------------------------------------------- 2: captum loop


def _np_abs(m: np.ndarray) -> np.ndarray:
    """The paper's ABS normalization of a (C, H, W) map (sanitylib.abs_normalize)."""
    s = np.abs(m).sum(0)
    lo, q = s.min(), np.percentile(s, 99)
    return np.clip((s - lo) / (q - lo), 0, 1) if q > lo else np.zeros_like(s)


def _np_div(m: np.ndarray) -> np.ndarray:
    """The paper's diverging normalization (sanitylib.diverging_normalize)."""
    s = m.sum(0)
    span = abs(np.percentile(s, 99))
    return np.clip((s + span) / (2 * span), -1, 1) if span > 0 else np.full_like(s, 0.5)


def _np_unit(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if a.min() == a.max() or b.min() == b.max():
        return 0.0  # undefined for a constant map: sanitylib's on_constant="zero"
    return float(spearmanr(a.ravel(), b.ravel())[0])


class NumpyFeatures:
    """A map post-processed for the four metrics (scipy / scikit-image), computed once."""

    def __init__(self, m: np.ndarray) -> None:
        from skimage.feature import hog

        self.abs, self.div = _np_abs(m), _np_div(m)
        self.unit = np.ascontiguousarray(_np_unit(m).transpose(1, 2, 0))
        self.hog = hog(self.unit, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3),
                       block_norm="L2-Hys", channel_axis=-1)  # fmt: skip

    def compare(self, other: "NumpyFeatures") -> dict[str, float]:
        from skimage.metrics import structural_similarity

        return {
            "spearman_abs": _spearman(self.abs, other.abs),
            "spearman": _spearman(self.div, other.div),
            "ssim": float(structural_similarity(self.unit, other.unit, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=True,
                                                data_range=2.0, channel_axis=-1)),
            "hog_spearman": _spearman(self.hog, other.hog),
        }  # fmt: skip


def captum_map(model, xi: torch.Tensor, method: str, target: int, layer, index: int) -> torch.Tensor:
    """One image's map with captum, the paper's settings (METHOD_OPTIONS) and captum's own
    batching options.  The noise of SmoothGrad, VarGrad and IG-SmoothGrad comes from the global
    RNG seeded per image (``index``) before each call, as a careful user does for common random
    numbers across models; with sanitylib's seed this is the very noise sanitylib draws
    (``sanitylib.attribution.unit_noise``), so every method's numbers can be compared."""
    from sanitylib.utils import derive_seed

    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    if method not in STOCHASTIC:
        return captum_batch(model, xi, method, [target], layer)
    sigma = 0.15 * float(xi.max() - xi.min())
    o = METHOD_OPTIONS
    torch.manual_seed(derive_seed(SEED, "noise", index))
    if method in ("smoothgrad", "vargrad"):
        n = o[method]["n_samples"]
        return NoiseTunnel(Saliency(model)).attribute(
            xi, nt_type=method, nt_samples=n, nt_samples_batch_size=min(n, BATCH), stdevs=sigma,
            target=target, abs=False)  # fmt: skip
    if method == "ig_smoothgrad":
        s = o["ig_smoothgrad"]
        return NoiseTunnel(IntegratedGradients(model)).attribute(
            xi, nt_type="smoothgrad", nt_samples=s["n_samples"],
            nt_samples_batch_size=max(1, BATCH // s["n_steps"]), stdevs=sigma, baselines=0.0,
            target=target, n_steps=s["n_steps"], method=s["rule"], internal_batch_size=BATCH)  # fmt: skip
    raise ValueError(method)


def captum_batch(model, x: torch.Tensor, method: str, targets: list[int], layer) -> torch.Tensor:
    """Maps of every image at once for the methods captum batches natively (a list of
    targets): Gradient, Input x Gradient, IG, Guided BackProp, GradCAM, Guided GradCAM."""
    import torch.nn.functional as F
    from captum.attr import (GuidedBackprop, GuidedGradCam, InputXGradient, IntegratedGradients,
                             LayerGradCam, Saliency)  # fmt: skip

    o = METHOD_OPTIONS
    if method == "gradient":
        return Saliency(model).attribute(x, target=targets, abs=False)
    if method == "input_x_gradient":
        return InputXGradient(model).attribute(x, target=targets)
    if method == "integrated_gradients":
        s = o["integrated_gradients"]
        return IntegratedGradients(model).attribute(
            x, baselines=0.0, target=targets, n_steps=s["n_steps"], method=s["rule"],
            internal_batch_size=max(BATCH, len(x)))  # fmt: skip
    if method == "guided_backprop":
        return GuidedBackprop(model).attribute(x, target=targets)
    if method == "gradcam":  # the paper's GradCAM: ReLU, each map divided by its own peak,
        # bilinear upsampling, tiled over the channels
        cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
        peak = cam.detach().amax(dim=(1, 2, 3), keepdim=True)
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-30), torch.zeros_like(cam))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return cam.expand(-1, x.shape[1], -1, -1)
    if method == "guided_gradcam":  # captum's GuidedGradCam with the paper's bilinear upsampling
        return GuidedGradCam(model, layer).attribute(x, target=targets, interpolate_mode="bilinear")
    raise ValueError(method)


def run_captum_loop(model, x: torch.Tensor, stages, perturbation, fmt: str = "contiguous") -> dict:
    """Per stage: captum maps of every image at once for the methods captum batches natively
    (a list of targets), per image for the NoiseTunnel methods (their noise is seeded per image
    through the global RNG); scipy/scikit-image metrics per map.  ``fmt="channels_last"``: each
    model state converted after its weights are drawn, the images in channels-last."""
    from sanitylib.attribution import predict
    from sanitylib.memory_format import as_format, converted
    from sanitylib.models import get_info, get_submodule
    from sanitylib.randomize import randomized, snapshot

    layer = get_submodule(model, get_info(model).gradcam_layer)
    x = as_format(x, fmt)
    snap = snapshot(model)
    model.eval()
    original: dict[tuple[str, int], NumpyFeatures] = {}
    values: dict[tuple[str, str, int, str], float] = {}
    for k, stage in enumerate([None, *stages]):
        ctx = (randomized(model, stage.blocks, perturbation, SEED, snap=snap) if stage is not None
               else contextlib.nullcontext(model))  # fmt: skip
        with ctx as m, converted(m, fmt):
            targets = predict(m, x).argmax(1).tolist()
            batched = {method: captum_batch(m, x, method, targets, layer).detach()
                       for method in METHODS if method not in STOCHASTIC}  # fmt: skip
            for i in range(len(x)):
                xi = x[i:i + 1]
                for method in METHODS:
                    a = (batched[method][i] if method in batched else
                         captum_map(m, xi, method, targets[i], layer, i).detach()[0]).cpu().numpy()
                    feats = NumpyFeatures(a)
                    if stage is None:
                        original[(method, i)] = feats
                        continue
                    for metric, v in original[(method, i)].compare(feats).items():
                        values[(stage.name, method, i, metric)] = v
    return values


def run_captum_loop_channels_last(model, x: torch.Tensor, stages, perturbation) -> dict:
    """The same captum loop with channels-last tensors, as a user who knows the format writes
    it (the model's 4-D weights in channels-last, as ``model.to(memory_format=torch.channels_last)``
    makes them, the images ``.contiguous(memory_format=torch.channels_last)``): a secondary line
    that separates what the memory format gives from what sanitylib's algorithm gives.  Each
    state's weights are drawn in the default format and then converted (an in-place random fill
    follows the memory order: drawn into channels-last tensors they would differ from
    sanitylib's); the model's storages come back afterwards
    (:func:`sanitylib.memory_format.converted`)."""
    return run_captum_loop(model, x, stages, perturbation, "channels_last")


def run_sanitylib_full(model, x: torch.Tensor, stages_blocks, perturbation):
    import sanitylib as sl

    return sl.run_randomization(  # the allocator setting is the process's (--memory)
        model, x, list(METHODS), "cascading", blocks=stages_blocks, metrics=METRICS, seed=SEED,
        perturbation=perturbation, target="current", method_options=METHOD_OPTIONS,
        store_maps=0, cache=False, progress=False, floor=False, batch_size=CHUNK,
    )  # fmt: skip


# ----------------------------------------------------------------------------- 3: bare passes


def backward(sel: torch.Tensor, inp: torch.Tensor, extra: int, keep: bool = True) -> None:
    """The bare backward passes of one chunk: ``1 + extra`` gradients of ``sel`` to ``inp``
    through the same graph (``extra``: Guided BackProp's); ``keep`` retains the graph after."""
    for i in range(extra + 1):
        torch.autograd.grad(sel, inp, retain_graph=keep or i < extra)


def bare_passes(model, rows: list[tuple[torch.Tensor, torch.Tensor, int]], states: list,
                switch, snap: dict, fmt: str = "contiguous") -> float:  # fmt: skip
    """Seconds of the bare passes in the model ``states``: per state, per chunk
    ``(inputs, targets, extra_backwards)``, one forward and one backward to the input (plus
    ``extra_backwards`` more backward passes through the same graph: Guided BackProp's), in the
    memory format ``fmt`` (``"channels_last"``: the model's weights and the inputs converted,
    :mod:`sanitylib.memory_format`).  Switching states is not timed; the model is restored
    afterwards.  The allocator setting is the process's (``--memory``), as for every side."""
    from sanitylib.memory_format import as_format, converted
    from sanitylib.randomize import restore

    def passes(inp: torch.Tensor, tgt: torch.Tensor, extra: int) -> None:
        inp = as_format(inp.detach(), fmt).requires_grad_(True)
        backward(model(inp).gather(1, tgt[:, None]).sum(), inp, extra, keep=False)

    t = 0.0
    try:
        with converted(model, fmt):
            passes(*max(rows, key=lambda r: len(r[0])))  # untimed: grows the heap once
        for state in states:
            switch(state)  # drawn in the default format (a random fill follows the memory order)
            with converted(model, fmt):  # untimed: the weights' conversion
                sync()
                t0 = time.perf_counter()
                for inp, tgt, extra in rows:
                    passes(inp, tgt, extra)
                sync()
                t += time.perf_counter() - t0
    finally:
        restore(model, snap)
    return t


def efficientnet_ops(model) -> list[tuple[tuple[str, ...], object]]:
    """EfficientNet-Lite0's forward pass (``sanitylib.models.EfficientNetLite0``) as a chain of
    module-level operations ``(module paths, fn)``: ``fn(outs)`` computes the next output from
    the outputs so far (``outs[0]`` is the input; a block's skip connection reads its input).
    Module granularity, as sanitylib's replay: a state that changes one module of a block
    recomputes from that module on, not the whole block."""
    m = model
    ops: list = []

    def op(paths: tuple[str, ...], fn) -> None:
        ops.append((paths, fn))

    op(("_conv_stem",), lambda o: m._conv_stem(o[-1]))
    op(("_bn0",), lambda o: m._bn0(o[-1]))
    op((), lambda o: m._stem_act(o[-1]))
    for i, b in enumerate(m._blocks):
        p, start = f"_blocks.{i}.", len(ops)  # outs[start] is the block's input
        if b._block_args.expand_ratio != 1:
            op((p + "_expand_conv",), lambda o, b=b: b._expand_conv(o[-1]))
            op((p + "_bn0",), lambda o, b=b: b._bn0(o[-1]))
            op((), lambda o, b=b: b._swish(o[-1]))
        op((p + "_depthwise_conv",), lambda o, b=b: b._depthwise_conv(o[-1]))
        op((p + "_bn1",), lambda o, b=b: b._bn1(o[-1]))
        op((), lambda o, b=b: b._swish(o[-1]))
        if b.has_se:
            raise ValueError("efficientnet_ops: squeeze-and-excitation blocks are not written out")
        op((p + "_project_conv",), lambda o, b=b: b._project_conv(o[-1]))
        op((p + "_bn2",), lambda o, b=b: b._bn2(o[-1]))
        a = b._block_args
        if b.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
            op((), lambda o, start=start: o[-1] + o[start])
    op(("_conv_head",), lambda o: m._conv_head(o[-1]))
    op(("_bn1",), lambda o: m._bn1(o[-1]))
    op((), lambda o: m._head_act(o[-1]))
    op(("_fc",), lambda o: m._fc(m._dropout(m._avg_pooling(o[-1]).flatten(1))))
    return ops


def first_changed(ops: list, blocks) -> int:
    """Index of the first operation using a module of ``blocks`` (a state's randomized blocks;
    a block path covers the modules under it)."""
    paths = [p for b in blocks for p in b.modules]
    for i, (mods, _) in enumerate(ops):
        if any(p == q or q.startswith(p + ".") or p.startswith(q + ".") for p in paths for q in mods):
            return i
    return len(ops)


def bare_replay_passes(model, chunks: list, states: list, pert, seed: int,
                       picked: list[int], fmt: str = "contiguous") -> tuple[float, float]:  # fmt: skip
    """The passes the work needs when the forward pass of the unchanged operations is reused:
    per chunk, one full forward pass in the trained model (its graph kept) and, in each model
    state ``picked``, the forward pass from the first operation using a changed module (module
    granularity, :func:`efficientnet_ops`, as sanitylib's replay) and the backward passes to the
    input.  Plain autograd, no hooks; in the memory format ``fmt`` (as :func:`bare_passes`).
    Returns the seconds of the trained-model passes and of the picked states' passes (switching
    states is not timed; the model is restored afterwards)."""
    from sanitylib.randomize import ModelStates

    switch = ModelStates(model, states, pert, seed)  # copies only the blocks that change
    try:  # the states' weights drawn above, in the default format; then the conversion
        return _bare_replay_passes(model, chunks, states, switch, picked, fmt)
    finally:
        switch.restore()


def _bare_replay_passes(model, chunks, states, switch, picked, fmt) -> tuple[float, float]:
    from sanitylib.memory_format import as_format, converted

    ops = efficientnet_ops(model)
    t0 = ts = 0.0
    with converted(model, fmt):
        for n, (inp, tgt, extra) in enumerate([chunks[0], *chunks]):  # the first: warm-up
            switch.set(0)
            inp = as_format(inp.detach(), fmt).requires_grad_(True)
            sync()
            start = time.perf_counter()
            hs, h = [inp], None
            for _, f in ops:
                hs.append(f(hs))
            backward(hs[-1].gather(1, tgt[:, None]).sum(), inp, extra)
            sync()
            t0 += (time.perf_counter() - start) * (n > 0)
            if n == 0:
                with torch.no_grad():
                    if not torch.allclose(hs[-1], model(inp), atol=1e-4, rtol=1e-4):
                        raise RuntimeError("efficientnet_ops() do not compute the trained model")
            for k in picked:
                switch.set(k)
                c = first_changed(ops, states[k])
                sync()
                start = time.perf_counter()
                outs = hs[:c + 1]  # the unchanged operations' outputs (and the input)
                for _, f in ops[c:]:
                    outs.append(f(outs))
                h = outs[-1]
                del outs
                backward(h.gather(1, tgt[:, None]).sum(), inp, extra)
                sync()
                ts += (time.perf_counter() - start) * (n > 0)
                if n == 0:  # the operations must be the model's forward pass in this state
                    with torch.no_grad():
                        if not torch.allclose(h, model(inp), atol=1e-4, rtol=1e-4):
                            raise RuntimeError("efficientnet_ops() do not compute the model")
            del hs, h
    return t0, ts


def spread(states: list, k: int) -> tuple[list, list]:
    """``k`` states spread over ``states``, split in two halves (timed before and after)."""
    k = max(2, min(k, len(states)))
    picked = [states[round(i * (len(states) - 1) / (k - 1))] for i in range(k)]
    return picked[0::2], picked[1::2]


def side_by_side(T: dict, model, snap: dict, rows: list, states: list, k: int, switch,
                 runs: list[tuple[str, object]], replay: dict,
                 repeats: int = 3) -> tuple[list, float, float, int]:  # fmt: skip
    """Time each ``(name, fn)`` of ``runs`` ``repeats`` times into ``T[name]`` in ABBA order
    (A B, B A, A B, ...; restoring the model after each), between two halves of the bare passes: the naive ones (:func:`bare_passes`) of ``k`` states
    spread over ``states``, and the replay-aware ones (:func:`bare_replay_passes`) of
    ``replay["k"]`` states spread over the randomized ones, on ``replay["groups"]`` (pairs of a
    chunk subset and its scale to all chunks of its kind).

    The bare passes run in both memory formats (:data:`BARE_FORMATS`; the first half in one
    order, the second in the other).  Returns the runs' results, both bare-pass times per format
    scaled to all the work (``{format: seconds}``), and the number of states whose naive passes
    were measured."""
    from sanitylib.randomize import restore

    before, after = spread(states, k)
    sb = replay["states"]
    r_before, r_after = spread(list(range(1, len(sb))), replay["k"])

    def strict(picked: list[int], fmt: str) -> list[tuple[float, float]]:
        return [bare_replay_passes(model, chunks, sb, replay["pert"], replay["seed"], picked, fmt)
                for chunks, _ in replay["groups"]]  # fmt: skip

    t = {f: bare_passes(model, rows, before, switch, snap, f) for f in BARE_FORMATS}
    s_before = {f: strict(r_before, f) for f in BARE_FORMATS[::-1]}
    results: dict[str, object] = {}
    for r in range(repeats):
        for name, fn in (runs if r % 2 == 0 else runs[::-1]):
            with timed(T, name):
                out = fn()
            results.setdefault(name, out)  # the values of the first repetition are compared
            restore(model, snap)
    results = [results[name] for name, _ in runs]
    for f in BARE_FORMATS[::-1]:
        t[f] += bare_passes(model, rows, after, switch, snap, f)
    s_after = {f: strict(r_after, f) for f in BARE_FORMATS}
    measured = len(before) + len(after)
    per_state = (len(sb) - 1) / (len(r_before) + len(r_after))
    t_strict = {f: sum(scale * ((b0 + a0) / 2 + (bs + as_) * per_state)
                       for (_, scale), (b0, bs), (a0, as_) in zip(replay["groups"], s_before[f], s_after[f]))
                for f in BARE_FORMATS}  # fmt: skip
    return results, {f: v * len(states) / measured for f, v in t.items()}, t_strict, measured


def formats_line(naive: dict[str, float], reuse: dict[str, float]) -> str:
    """The bare passes per memory format and which one is the bound (the faster)."""
    parts = [f"{f}: naive {naive[f]:.1f} s, reuse {reuse[f]:.1f} s" for f in BARE_FORMATS]
    best = min(reuse, key=reuse.get)
    ratio = reuse["contiguous"] / reuse["channels_last"]
    return (f"per format: {'; '.join(parts)}; contiguous / channels-last {ratio:.2f}; bound: {best}")


def _chunks(x: torch.Tensor, y: torch.Tensor, per_image: int, extra: int = 0) -> list:
    """Rows of ``per_image`` points per image, cut into sanitylib's chunks (:data:`CHUNK` rows;
    ``extra``: more backward passes through each chunk's graph)."""
    B = CHUNK
    rows = x.repeat_interleave(per_image, 0)
    tg = y.repeat_interleave(per_image, 0)
    return [(rows[i:i + B], tg[i:i + B], extra) for i in range(0, len(rows), B)]


# ----------------------------------------------------------------------------- main


def batch_sizes(n_quantus: int, n_captum: int) -> list[int]:
    """Every number of rows a forward/backward pass sees below: Quantus's batches (64 rows at
    most), sanitylib's chunks and their remainders, captum's batched calls (the images, IG's
    ``internal_batch_size`` chunks) and NoiseTunnel's per-image batches."""
    from sanitylib.engine import rows_per_image

    B = CHUNK

    sizes = {1, 2, min(n_quantus, 64), n_quantus % 64 or 64, n_captum, B}
    per = rows_per_image(METHODS, METHOD_OPTIONS)
    for rows in (n_quantus, n_captum, n_captum * (per["plain"] - 1), n_captum * per["total"]):
        sizes.add(rows % B or B)
    ig = n_captum * METHOD_OPTIONS["integrated_gradients"]["n_steps"]
    ib = max(BATCH, n_captum)
    sizes |= {min(ib, ig), ig % ib or ib}
    sizes |= {METHOD_OPTIONS["smoothgrad"]["n_samples"], METHOD_OPTIONS["vargrad"]["n_samples"]}
    s = METHOD_OPTIONS["ig_smoothgrad"]
    nt = max(1, BATCH // s["n_steps"])
    sizes |= {min(BATCH, nt * s["n_steps"]), (s["n_samples"] % nt or nt) * s["n_steps"]}
    return sorted(v for v in sizes if v > 0)


def warm_up(model, sizes: list[int]) -> None:
    """One forward and backward pass at every batch size used, in both memory formats (the first
    pass of a shape pays one-off costs that no side should be charged for)."""
    from sanitylib.memory_format import as_format, converted

    x = torch.zeros(max(sizes), 3, 224, 224, device=DEVICE)
    for fmt in BARE_FORMATS:
        with converted(model, fmt):
            for n in sizes:
                xi = as_format(x[:n].clone(), fmt).requires_grad_(True)
                torch.autograd.grad(model(xi)[:, 0].sum(), xi)
    sync()


def versions() -> dict[str, str]:
    import captum
    import scipy
    import skimage

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "captum": captum.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
           "scikit-image": skimage.__version__}  # fmt: skip
    try:
        import quantus

        out["quantus"] = quantus.__version__
    except ImportError:
        out["quantus"] = "not installed"
    return out


def device_line() -> str:
    from sanitylib.utils import cpu_info

    cpu = cpu_info()["model"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = ""
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        gpu = (f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()}; ")  # fmt: skip
    return (f"{gpu}CPU: {cpu}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}, load average at start {load:.2f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantus-images", type=int, default=8,
                    help="images of workload 1 (default 8: 792 values; 16: 1,584)")
    ap.add_argument("--captum-images", type=int, default=3,
                    help="images of workload 2 (default 3: 540 values; 8: 1,440)")
    ap.add_argument("--captum-blocks", type=int, default=len(CAPTUM_BLOCKS),
                    help=f"coarse blocks of workload 2's cascade, from the top (default all "
                         f"{len(CAPTUM_BLOCKS)}; fewer only to check the script quickly)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3,
                    help="repetitions of each side, interleaved in ABBA order (median, range)")
    ap.add_argument("--bare-states", type=int, default=0,
                    help="model states whose bare passes are timed (the rest is scaled; "
                         "0: a tenth of the states, at least 2)")  # fmt: skip
    ap.add_argument("--skip-quantus", action="store_true")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--skip-channels-last-loop", action="store_true",
                    help="leave out the secondary line of workload 2 (the captum loop in "
                         "channels-last)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest sample and step counts (SMOKE_METHOD_OPTIONS): checks that "
                         "the script runs and agrees, its figures are not the benchmark's")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2,
                    help="torch, OpenMP and BLAS threads, equal for every side (default 2)")
    ap.add_argument("--memory", choices=("keep", "default"), default="keep",
                    help="allocator setting of the whole process, hence of every side: 'keep' "
                         "(freed CPU memory kept, sanitylib.allocator) or 'default' (glibc's)")  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where every side runs: 'auto' (CUDA when present), 'cpu' or 'cuda'")
    ap.add_argument("--tf32", action="store_true",
                    help="on CUDA, TF32 convolutions and matmuls for every side (default: IEEE "
                         "fp32, the reference numerics)")  # fmt: skip
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    for name in ("repeats", "quantus_images", "captum_images", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.captum_blocks <= len(CAPTUM_BLOCKS):
        ap.error(f"--captum-blocks must be between 1 and {len(CAPTUM_BLOCKS)}, got {args.captum_blocks}")
    if args.bare_states < 0:
        ap.error(f"--bare-states must be >= 0, got {args.bare_states}")
    if args.smoke:
        METHOD_OPTIONS.clear()
        METHOD_OPTIONS.update(SMOKE_METHOD_OPTIONS)
    global DEVICE
    DEVICE = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")  # fmt: skip
    torch.set_num_threads(args.threads)
    if args.memory == "default":  # no side may opt in on its own
        os.environ["SANITYLIB_KEEP_FREED_MEMORY"] = "0"
    torch.manual_seed(0)

    import sanitylib as sl
    from sanitylib.allocator import keep_freed_memory
    from sanitylib.cli import restore_tf32, set_precision, tf32_state

    t_start = time.perf_counter()
    print("sanitylib benchmark: sanitylib vs Quantus MPRT vs a plain captum loop")
    print(device_line())
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "OPENBLAS_NUM_THREADS")}  # fmt: skip
    print(f"threads: torch {torch.get_num_threads()}, " + ", ".join(f"{k}={v}" for k, v in threads.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    ctx = keep_freed_memory() if args.memory == "keep" else contextlib.nullcontext(False)
    precision = tf32_state() if DEVICE.type == "cuda" else None
    try:
        with ctx as kept:
            print(f"allocator (every side, the whole process): "
                  f"{'freed CPU memory kept' if kept else 'glibc defaults'}"
                  f"{'' if kept or args.memory == 'default' else ' (keeping was asked for but is not possible here)'}")  # fmt: skip
            if DEVICE.type == "cuda":  # the same numerics for every side, set once
                rec = set_precision(DEVICE, fast=args.tf32)
                torch.backends.cudnn.benchmark = False
                print(f"precision (every side): {'TF32' if rec['tf32'] else 'IEEE fp32 (TF32 off)'}"
                      f" convolutions and matmuls, cudnn.benchmark off, cudnn.deterministic "
                      f"{torch.backends.cudnn.deterministic}")  # fmt: skip
            print(f"repetitions: {args.repeats}, ABBA order; medians [min-max]")
            status = _main(args, sl)
    finally:
        if precision is not None:
            restore_tf32(precision)
    print(f"total benchmark time: {time.perf_counter() - t_start:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    return status


def _main(args, sl) -> int:
    from sanitylib import memory_format as mf
    from sanitylib.engine import auto_batch_size, rows_per_image
    from sanitylib.models import Block
    from sanitylib.randomize import cascading_stages, randomize_, restore, snapshot

    global BATCH, CHUNK
    with contextlib.redirect_stdout(sys.stderr):
        model = sl.load_model("efficientnet_lite0", device=DEVICE)
    model.eval()
    probe = load_batch(model, 1)
    CHUNK = auto_batch_size(model, probe)  # 16 on the CPU; sized to the free memory on CUDA
    BATCH = 32 if DEVICE.type == "cpu" else CHUNK
    print(f"device: {DEVICE}; rows per chunk (sanitylib and the bare passes): {CHUNK}; captum's "
          f"batching options: {BATCH}")  # fmt: skip
    sizes = batch_sizes(args.quantus_images, args.captum_images)
    print(f"warm-up at every batch size used: {sizes}")
    warm_up(model, sizes)
    T: dict[str, list[Timing]] = {}
    res: dict = {}
    bare: dict[str, float] = {}  # naive: every state's full forward and backward passes
    strict: dict[str, float] = {}  # reusing the forward pass of unchanged modules
    bare_f: dict[str, dict[str, float]] = {}  # the same per memory format (the bound: the faster)
    strict_f: dict[str, dict[str, float]] = {}
    ok = True
    snap = snapshot(model)

    # -- 1: Quantus MPRT vs sanitylib -----------------------------------------------------
    if not args.skip_quantus:
        x = load_batch(model, args.quantus_images)
        y = sl.predict(model, x).argmax(1)
        blocks = quantus_blocks(model)
        n_states = len(blocks) + 1
        print(f"\n[1] Quantus {versions()['quantus']} MPRT vs sanitylib: {len(x)} images "
              f"224x224, {len(blocks)} per-module top-down steps, Gradient, Spearman")  # fmt: skip
        q_blocks = [Block(b, (b,)) for b in blocks]
        q_states = [()] + [st.blocks for st in cascading_stages(q_blocks)]
        pert = sl.Perturbation(init=quantus_reset(QUANTUS_SEED))

        def q_switch(state):
            restore(model, snap)
            randomize_(model, state, pert, QUANTUS_SEED)

        rows = _chunks(x, y, 1)
        replay = {"states": q_states, "pert": pert, "seed": QUANTUS_SEED, "k": 20,
                  "groups": [(rows, 1.0)]}  # fmt: skip
        (scores, df), bare_f["q"], strict_f["q"], measured = side_by_side(
            T, model, snap, rows, q_states, args.bare_states or max(2, n_states // 10), q_switch,
            [("quantus", lambda: run_quantus(model, x, y)),
             ("sanitylib_q", lambda: run_sanitylib_quantus_task(model, x))], replay,
            args.repeats)  # fmt: skip
        bare["q"], strict["q"] = min(bare_f["q"].values()), min(strict_f["q"].values())
        print(f"  [bare passes: {bare['q'] * measured / n_states:.1f} s for {measured} of "
              f"{n_states} states -> {bare['q']:.1f} s; reusing unchanged modules: "
              f"{strict['q']:.1f} s (from {replay['k']} states); {formats_line(bare_f['q'], strict_f['q'])}]")  # fmt: skip
        def per_step(table) -> list[np.ndarray]:
            return [table[table.stage == name].sort_values("image")["value"].to_numpy() for name in blocks]

        theirs_all = [np.asarray(scores[name], dtype=float) for name in blocks]
        n_values = sum(len(v) for v in theirs_all)
        expected = len(blocks) * len(x)
        q_fmt = mf.choose(model, x)
        res["sl_fmt_q"] = q_fmt
        # Quantus runs in the default format.  When sanitylib's passes run channels-last, the
        # strict comparison is with an (untimed) sanitylib run in the default format, the timed
        # run is held to the documented bounds between formats.
        same = df if q_fmt == "contiguous" else run_sanitylib_quantus_task(model, x, "contiguous")
        ours_all = per_step(same)
        res["diff_quantus"] = nan_safe_max_diff(np.concatenate(ours_all), np.concatenate(theirs_all)) \
            if all(len(a) == len(b) for a, b in zip(ours_all, theirs_all)) else float("inf")
        print(f"  max |sanitylib - Quantus| over {n_values} values ({len(blocks)} steps x "
              f"{len(x)} images; NaN positions compared; sanitylib in Quantus's memory format, "
              f"contiguous{'' if q_fmt == 'contiguous' else ', untimed'}): {res['diff_quantus']:.2e} "
              f"(tolerance {TOL_QUANTUS:g})")  # fmt: skip
        if n_values != expected or len(df) != expected or (args.quantus_images == 16 and n_values != 1584):
            print(f"  ERROR: {n_values} Quantus values and {len(df)} sanitylib rows, expected {expected}")
            ok = False
        if not res["diff_quantus"] <= TOL_QUANTUS:
            print("  ERROR: sanitylib and Quantus disagree")
            ok = False
        if q_fmt != "contiguous":
            timed = per_step(df)
            if all(len(a) == len(b) for a, b in zip(timed, theirs_all)):
                agree = mf.agreement(np.concatenate(timed), np.concatenate(theirs_all))
            else:
                agree = {"ok": False, "max": float("inf"), "quantile": float("inf")}
            res["diff_quantus_other"] = agree["max"]
            print(f"  max |sanitylib (timed, {q_fmt}) - Quantus| over the same values: "
                  f"{agree['max']:.2e} ({mf.METRIC_QUANTILE:.0%} quantile {agree['quantile']:.1e}; another "
                  f"memory format: bounds {mf.METRIC_TOLERANCE:g} (quantile) and "
                  f"{mf.METRIC_TOLERANCE_MAX:g} (every value), sanitylib.memory_format)")  # fmt: skip
            if not agree["ok"]:
                print("  ERROR: sanitylib (timed) and Quantus disagree beyond the bounds between formats")
                ok = False

    # -- 2: plain captum loop vs sanitylib ------------------------------------------------
    if not args.skip_captum:
        x = load_batch(model, args.captum_images)
        blocks = [Block(n, m) for n, m in CAPTUM_BLOCKS[:args.captum_blocks]]
        stages = cascading_stages(blocks)
        pert = sl.Perturbation()  # the paper's re-initialization
        n_states = len(stages) + 1
        print(f"\n[2] captum loop (batched where captum batches) vs sanitylib: {len(x)} images, "
              f"{len(METHODS)} methods ({', '.join(METHODS)}), {len(METRICS)} metrics, "
              f"{len(stages)} cascade stages")  # fmt: skip
        print(f"  settings: {METHOD_OPTIONS}")
        per = rows_per_image(METHODS, METHOD_OPTIONS)
        y = sl.predict(model, x).argmax(1)
        img_rows = _chunks(x, y, 1, per["guided"])  # the images (+ Guided BackProp's backward)
        path_rows = _chunks(x, y, per["plain"] - 1)  # integration paths and noise samples
        rows = img_rows + path_rows
        c_states = [()] + [st.blocks for st in stages]

        def c_switch(state):
            restore(model, snap)
            randomize_(model, state, pert, SEED)

        picked, _ = spread(path_rows, 8)  # 4 path chunks, spread out
        replay = {"states": c_states, "pert": pert, "seed": SEED, "k": n_states - 1,
                  "groups": [(img_rows, 1.0), (picked, len(path_rows) / len(picked))]}  # fmt: skip
        runs = [("captum_loop", lambda: run_captum_loop(model, x, stages, pert)),
                ("sanitylib_c", lambda: run_sanitylib_full(model, x, blocks, pert))]
        if not args.skip_channels_last_loop:  # the secondary line: the loop in channels-last
            runs.append(("captum_loop_cl", lambda: run_captum_loop_channels_last(model, x, stages, pert)))
        (values, df, *values_cl), bare_f["c"], strict_f["c"], measured = side_by_side(
            T, model, snap, rows, c_states, args.bare_states or 2, c_switch, runs, replay,
            args.repeats)  # fmt: skip
        bare["c"], strict["c"] = min(bare_f["c"].values()), min(strict_f["c"].values())
        print(f"  [bare passes: {bare['c'] * measured / n_states:.1f} s for {measured} of "
              f"{n_states} states -> {bare['c']:.1f} s; {per['total']} passes per image and state; "
              f"reusing unchanged modules: {strict['c']:.1f} s (from {len(picked)} of "
              f"{len(path_rows)} path chunks); {formats_line(bare_f['c'], strict_f['c'])}]")  # fmt: skip
        expected = len(stages) * len(METHODS) * len(x) * len(METRICS)
        keys = [(r.stage, r.method, r.image, r.metric) for r in df.itertuples()]
        missing = [k for k in keys if k not in values]
        ours = np.array([r.value for r in df.itertuples()], dtype=float)
        # On the CPU captum's NoiseTunnel, seeded per image, draws sanitylib's very noise, so
        # every value is compared.  On CUDA it cannot: NoiseTunnel draws all samples in one call
        # from the global CUDA generator, sanitylib one sample at a time from its own (Philox
        # streams depend on the call sizes), so the noise methods' values are computed (the
        # same work) and counted, their NaN positions compared, their differences shown apart.
        noisy = np.array([k[1] in STOCHASTIC for k in keys]) if DEVICE.type == "cuda" \
            else np.zeros(len(keys), dtype=bool)
        # Agreement.  Against the loop in sanitylib's own memory format: the same arithmetic,
        # so a strict tolerance checks the algorithm.  Against a loop in the other format: the
        # documented bounds between formats (sanitylib.memory_format.agreement: most values
        # within METRIC_TOLERANCE, every one within METRIC_TOLERANCE_MAX), because in partly
        # randomized states float32 resolves these values only that far in either format.
        sl_fmt = res["sl_fmt"] = mf.choose(model, x)
        print(f"  sanitylib's memory format (sanitylib.memory_format.choose): {sl_fmt}")
        loops = [("captum loop", "contiguous", "diff_captum", values)]
        if values_cl:
            loops.append(("captum loop in channels-last", "channels_last", "diff_captum_cl", values_cl[0]))
        for j, (name, loop_fmt, key, vals) in enumerate(loops):
            theirs_j = np.array([vals.get(k, np.nan) for k in keys], dtype=float)
            complete = len(vals) == len(values) and not [k for k in keys if k not in vals]
            same_nan = np.array_equal(np.isnan(ours[~noisy]), np.isnan(theirs_j[~noisy]))
            res[key] = nan_safe_max_diff(ours[~noisy], theirs_j[~noisy]) if complete and same_nan \
                else float("inf")  # fmt: skip
            what_ = ("every method, stage, image and metric" if not noisy.any() else
                     f"{int((~noisy).sum())} of them: the deterministic methods")  # fmt: skip
            over = f"over {len(values)} values ({what_}; NaN positions compared)" if j == 0 \
                else "over the same values"
            if loop_fmt == sl_fmt:
                ok_j = res[key] <= TOL_DETERMINISTIC
                bound = f"same memory format: tolerance {TOL_DETERMINISTIC:g}"
            else:
                agree = mf.agreement(ours[~noisy], theirs_j[~noisy]) if complete else {"ok": False, "quantile": float("inf")}
                ok_j = agree["ok"] and res[key] < float("inf")
                res[key + "_q"] = agree["quantile"]
                bound = (f"{mf.METRIC_QUANTILE:.0%} quantile {agree['quantile']:.1e}; another memory "
                         f"format: bounds {mf.METRIC_TOLERANCE:g} (quantile) and "
                         f"{mf.METRIC_TOLERANCE_MAX:g} (every value), sanitylib.memory_format")  # fmt: skip
            print(f"  max |sanitylib - {name}| {over}: {res[key]:.2e} ({bound})")
            if j == 0 and noisy.any():
                gap = nan_safe_max_diff(ours[noisy], theirs_j[noisy])
                mean_gap = float(np.nanmean(ours[noisy]) - np.nanmean(theirs_j[noisy]))
                print(f"  noise methods ({int(noisy.sum())} values, different noise draws on CUDA): "
                      f"max |difference| {gap:.2f}, difference of means {mean_gap:+.3f} (not compared)")
            d = np.where(np.isnan(ours) | np.isnan(theirs_j), -1.0, np.abs(ours - theirs_j))
            d[noisy] = -1.0
            for i in np.argsort(-d)[:3]:
                print("    largest: |d|={:.1e} stage={} method={} image={} metric={} sanitylib={:.6f} "
                      "{}={:.6f}".format(d[i], *keys[i], ours[i], name, theirs_j[i]))
            if not ok_j:
                print(f"  ERROR: sanitylib and the {name} disagree")
                ok = False
        if sl_fmt != "contiguous" and not values_cl:
            print("  note: no loop in sanitylib's memory format ran (--skip-channels-last-loop): "
                  "only the bounds between formats were checked")  # fmt: skip
        if len(values) != expected or len(df) != expected or missing or \
                (args.captum_images == 8 and len(values) != 1440):
            print(f"  ERROR: {len(values)} captum values and {len(df)} sanitylib rows, expected {expected}")
            ok = False

    # -- table ----------------------------------------------------------------------------
    def fmt(v: list[float]) -> str:
        return f"{med(v):.2f} [{min(v):.2f}-{max(v):.2f}]"

    print("\nside by side (wall-clock seconds, medians over the repetitions; process CPU seconds "
          "in the [..] lines above)")  # fmt: skip
    print("  bare passes: 'naive' = every state's full forward and backward passes; 'reuse' = the "
          "forward pass of the modules a state leaves unchanged computed once, at module "
          "granularity (as sanitylib's replay)")  # fmt: skip
    print(f"  {'workload':<38} {'baseline':>9} {'sanitylib':>9} {'naive':>7} {'reuse':>7} "
          f"{'speedup [range]':>20} {'efficiency [range]':>20} {'vs naive':>8}")  # fmt: skip
    rows_out = [("1 Quantus MPRT (Gradient, 99 steps)", "quantus", "sanitylib_q", "q"),
                ("2 captum loop (9 methods, 4 metrics)", "captum_loop", "sanitylib_c", "c"),
                ("2b captum loop in channels-last", "captum_loop_cl", "sanitylib_c", "c")]
    speedup: dict[str, list[float]] = {}
    for label, base, ours_, key in rows_out:
        if base not in T:
            continue
        name = key if base != "captum_loop_cl" else "c_cl"
        speedup[name] = [b.wall / o.wall for b, o in zip(T[base], T[ours_])]
        eff = [strict[key] / o.wall for o in T[ours_]]
        print(f"  {label:<38} {med([t.wall for t in T[base]]):>9.1f} "
              f"{med([t.wall for t in T[ours_]]):>9.1f} {bare[key]:>7.1f} {strict[key]:>7.1f} "
              f"{fmt(speedup[name]):>20} {fmt(eff):>20} {bare[key] / med([t.wall for t in T[ours_]]):>8.2f}")  # fmt: skip
        if DEVICE.type == "cuda":
            print(f"  {'':<38} peak GPU memory: baseline {max(t.peak_gib for t in T[base]):.2f} "
                  f"GiB, sanitylib {max(t.peak_gib for t in T[ours_]):.2f} GiB")  # fmt: skip
    if speedup:
        sl_keys = [k for k in ("sanitylib_q", "sanitylib_c") if k in T]
        sl_total = [sum(T[k][r].wall for k in sl_keys) for r in range(args.repeats)]
        efficiency = [sum(strict.values()) / t for t in sl_total]
        naive = [sum(bare.values()) / t for t in sl_total]
        print(f"  efficiency = replay-aware bare passes (per workload the faster memory format) / "
              f"sanitylib time, both workloads: {fmt(efficiency)} (1.0 = sanitylib as fast as the "
              f"passes it cannot avoid)")  # fmt: skip
        for f in BARE_FORMATS:  # the same against each format's bound, for the record
            e = [sum(v[f] for v in strict_f.values()) / t for t in sl_total]
            print(f"    against the {f} bound alone: {fmt(e)}")
        print(f"  speedup_vs_naive_passes = every state's full passes / sanitylib time: {fmt(naive)} "
              "(above 1: forward replay skips work a naive algorithm does)")  # fmt: skip
    print(f"device: {DEVICE}{'' if DEVICE.type == 'cpu' else ' (' + torch.cuda.get_device_name(DEVICE) + ')'}, "
          f"{torch.get_num_threads()} torch threads (every side)")  # fmt: skip
    if speedup:  # both workloads: the full line; one (--skip-...): its fields only
        fields = {"speedup_vs_quantus": speedup.get("q"), "speedup_vs_captum_loop": speedup.get("c"),
                  "speedup_vs_captum_loop_channels_last": speedup.get("c_cl")}
        line = " ".join(f"{k}={med(v):.2f}" for k, v in fields.items() if v is not None)
        # max_abs_diff: against the baselines in sanitylib's own memory format (the algorithm's
        # agreement); max_abs_diff_other_format: against a baseline in the other format (the
        # documented bounds between formats apply), 0 when none ran
        same, other = [res.get("diff_quantus", 0.0)], [res.get("diff_quantus_other", 0.0)]
        sl_fmt = res.get("sl_fmt", "contiguous")
        for key, loop_fmt in (("diff_captum", "contiguous"), ("diff_captum_cl", "channels_last")):
            if key in res:
                (same if loop_fmt == sl_fmt else other).append(res[key])
        print(f"RESULT {line} efficiency={med(efficiency):.2f} "
              f"speedup_vs_naive_passes={med(naive):.2f} max_abs_diff={max(same):.1e} "
              f"max_abs_diff_other_format={max(other):.1e}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
