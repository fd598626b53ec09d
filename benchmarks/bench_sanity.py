"""Side-by-side benchmark: sanitylib's batched engine vs Quantus 0.6 MPRT vs a plain captum loop.

One process, identical work on every side, printed side by side (see ``benchmarks/README.md``):

1. **Quantus MPRT** (``quantus==0.6.*``) vs sanitylib on what both can express: per-module
   top-down cascading randomization with PyTorch's default re-initialization (every module with
   ``reset_parameters``, Quantus's 99 steps on EfficientNet-Lite0, ``torch.manual_seed(seed+1)``
   before each reset, as Quantus does), the Gradient method, Spearman after Quantus's
   pre-processing (signed channel sum, max-normalization, absolute value), >= 16 images at
   224x224.  sanitylib runs through its public API only: user-given blocks (the module paths),
   a user initializer (``Perturbation(init=callable)``) and a custom ``Metric``.  The two sets
   of correlations must agree.
2. **A plain captum loop** (per stage, per image, per method; captum's own batching options
   ``internal_batch_size`` and ``nt_samples_batch_size``; scipy and scikit-image metrics) vs
   sanitylib's ``run_randomization`` on the paper's full method set and all four metrics,
   >= 8 images, block-level cascading randomization with the paper's initializer.
3. **Efficiency**: the time of the bare forward+backward passes the work needs (plain
   ``torch.autograd.grad`` to the input, no hooks, same chunking), measured in the same run,
   divided by sanitylib's total time.

Ends with ``RESULT speedup_vs_quantus=<x> speedup_vs_captum_loop=<y> efficiency=<z>
max_abs_diff=<d>``.  Exits with status 1 if the numbers disagree.

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

import numpy as np
import torch

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
#: Coarse blocks of EfficientNet-Lite0 for the cascade of comparison 2 (top first).
CAPTUM_BLOCKS = (
    ("logits", ("_fc",)),
    ("head", ("_conv_head", "_bn1")),
    ("blocks 11-15", tuple(f"_blocks.{i}" for i in range(15, 10, -1))),
    ("blocks 5-10", tuple(f"_blocks.{i}" for i in range(10, 4, -1))),
    ("blocks 0-4, stem", tuple(f"_blocks.{i}" for i in range(4, -1, -1)) + ("_conv_stem", "_bn0")),
)
BATCH = 32  # captum's batching options in the loop (IG's 10 rows, SmoothGrad's 10, IG-SG's 20)
#: Agreement required (absolute difference of correlations / SSIM values).
TOL_QUANTUS = 1e-4
TOL_DETERMINISTIC = 2e-3


@dataclass
class Timing:
    wall: float
    cpu: float


@contextlib.contextmanager
def timed(out: dict, key: str):
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        out[key] = Timing(time.perf_counter() - w, time.process_time() - c)
        print(f"  [{key}: {out[key].wall:.1f} s wall, {out[key].cpu:.1f} s cpu]", flush=True)


def load_batch(model, n: int) -> torch.Tensor:
    """``n`` images at 224x224: scikit-image's photos (shipped offline), then their mirror images."""
    import sanitylib as sl

    photos = sl.load_photos(model, names=list(sl.data.PHOTOS), verbose=False).x
    x = torch.cat([photos, photos.flip(-1)])
    while len(x) < n:
        x = torch.cat([x, x.flip(-2)])
    return x[:n].contiguous()


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
        return metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                      explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
                      device="cpu", batch_size=64)  # fmt: skip


def run_sanitylib_quantus_task(model, x: torch.Tensor):
    """The Quantus workload through sanitylib's public API."""
    import sanitylib as sl
    from sanitylib import Metric
    from sanitylib.metrics import pearson, rankdata

    spearman_quantus = Metric(
        "spearman_quantus",  # Quantus: sum channels (signed), normalise by max, abs; Spearman
        prepare=lambda maps: rankdata(maps.sum(1).abs().flatten(1)),
        compare=lambda a, b: pearson(a, b, on_constant="nan"),
    )
    with sl.keep_freed_memory():  # sanitylib's CPU setting, opted in (process-global)
        return sl.run_randomization(
            model, x, ["gradient"], "cascading", blocks=quantus_blocks(model),
            metrics=[spearman_quantus], seed=QUANTUS_SEED,
            perturbation=sl.Perturbation(init=quantus_reset(QUANTUS_SEED)), target="original",
            store_maps=0, cache=False, progress=False, floor=False,
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

    import torch.nn.functional as F
    from captum.attr import (GuidedBackprop, GuidedGradCam, InputXGradient, IntegratedGradients,
                             LayerGradCam, NoiseTunnel, Saliency)  # fmt: skip

    sigma = 0.15 * float(xi.max() - xi.min())
    o = METHOD_OPTIONS
    if method == "gradient":
        return Saliency(model).attribute(xi, target=target, abs=False)
    if method == "input_x_gradient":
        return InputXGradient(model).attribute(xi, target=target)
    if method == "integrated_gradients":
        s = o["integrated_gradients"]
        return IntegratedGradients(model).attribute(
            xi, baselines=0.0, target=target, n_steps=s["n_steps"], method=s["rule"],
            internal_batch_size=BATCH)  # fmt: skip
    if method in STOCHASTIC:
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
    if method == "guided_backprop":
        return GuidedBackprop(model).attribute(xi, target=target)
    if method == "gradcam":  # the paper's GradCAM: ReLU, divided by its peak, bilinear, tiled
        cam = LayerGradCam(model, layer).attribute(xi, target=target, relu_attributions=True)
        peak = float(cam.detach().max())
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        cam = F.interpolate(cam, size=xi.shape[-2:], mode="bilinear", align_corners=False)
        return cam.expand(-1, xi.shape[1], -1, -1)
    if method == "guided_gradcam":  # captum's GuidedGradCam with the paper's bilinear upsampling
        return GuidedGradCam(model, layer).attribute(xi, target=target, interpolate_mode="bilinear")
    raise ValueError(method)


def run_captum_loop(model, x: torch.Tensor, stages, perturbation) -> dict:
    """Per stage, per image, per method: captum maps, scipy/scikit-image metrics."""
    from sanitylib.attribution import predict
    from sanitylib.models import get_info, get_submodule
    from sanitylib.randomize import randomized, snapshot

    layer = get_submodule(model, get_info(model).gradcam_layer)
    snap = snapshot(model)
    model.eval()
    original: dict[tuple[str, int], NumpyFeatures] = {}
    values: dict[tuple[str, str, int, str], float] = {}
    for k, stage in enumerate([None, *stages]):
        ctx = (randomized(model, stage.blocks, perturbation, SEED, snap=snap) if stage is not None
               else contextlib.nullcontext(model))  # fmt: skip
        with ctx as m:
            targets = predict(m, x).argmax(1).tolist()
            for i in range(len(x)):
                xi = x[i:i + 1]
                for method in METHODS:
                    a = captum_map(m, xi, method, targets[i], layer, i).detach()[0].numpy()
                    feats = NumpyFeatures(a)
                    if stage is None:
                        original[(method, i)] = feats
                        continue
                    for metric, v in original[(method, i)].compare(feats).items():
                        values[(stage.name, method, i, metric)] = v
    return values


def run_sanitylib_full(model, x: torch.Tensor, stages_blocks, perturbation):
    import sanitylib as sl

    with sl.keep_freed_memory():  # sanitylib's CPU setting, opted in (process-global)
        return sl.run_randomization(
            model, x, list(METHODS), "cascading", blocks=stages_blocks, metrics=METRICS, seed=SEED,
            perturbation=perturbation, target="current", method_options=METHOD_OPTIONS,
            store_maps=0, cache=False, progress=False, floor=False,
        )  # fmt: skip


# ----------------------------------------------------------------------------- 3: bare passes


def backward(sel: torch.Tensor, inp: torch.Tensor, extra: int, keep: bool = True) -> None:
    """The bare backward passes of one chunk: ``1 + extra`` gradients of ``sel`` to ``inp``
    through the same graph (``extra``: Guided BackProp's); ``keep`` retains the graph after."""
    for i in range(extra + 1):
        torch.autograd.grad(sel, inp, retain_graph=keep or i < extra)


def bare_passes(model, rows: list[tuple[torch.Tensor, torch.Tensor, int]], states: list,
                switch, snap: dict) -> float:  # fmt: skip
    """Seconds of the bare passes in the model ``states``: per state, per chunk
    ``(inputs, targets, extra_backwards)``, one forward and one backward to the input (plus
    ``extra_backwards`` more backward passes through the same graph: Guided BackProp's).
    Switching states is not timed; the model is restored afterwards.  Run with freed memory
    kept (``sanitylib.allocator``), as sanitylib runs: the passes at their fastest."""
    from sanitylib.allocator import keep_freed_memory
    from sanitylib.randomize import restore

    def passes(inp: torch.Tensor, tgt: torch.Tensor, extra: int) -> None:
        inp = inp.detach().requires_grad_(True)
        backward(model(inp).gather(1, tgt[:, None]).sum(), inp, extra, keep=False)

    t = 0.0
    with keep_freed_memory():
        try:
            passes(*max(rows, key=lambda r: len(r[0])))  # untimed: grows the heap once
            for state in states:
                switch(state)
                t0 = time.perf_counter()
                for inp, tgt, extra in rows:
                    passes(inp, tgt, extra)
                t += time.perf_counter() - t0
        finally:
            restore(model, snap)
    return t


def efficientnet_pieces(model) -> list[tuple[tuple[str, ...], object]]:
    """EfficientNet-Lite0's forward pass as a chain of pieces ``(module paths, fn)``: stem, the
    16 blocks, head, pooling and logits (``sanitylib.models.EfficientNetLite0``)."""
    m = model
    pieces = [(("_conv_stem", "_bn0"), lambda h: m._stem_act(m._bn0(m._conv_stem(h))))]
    for i, b in enumerate(m._blocks):
        pieces.append(((f"_blocks.{i}",), lambda h, b=b: b(h, drop_connect_rate=None)))
    pieces.append((("_conv_head", "_bn1"), lambda h: m._head_act(m._bn1(m._conv_head(h)))))
    pieces.append((("_fc",), lambda h: m._fc(m._dropout(m._avg_pooling(h).flatten(1)))))
    return pieces


def first_changed(pieces: list, blocks) -> int:
    """Index of the first piece holding a module of ``blocks`` (a state's randomized blocks)."""
    paths = [p for b in blocks for p in b.modules]
    for i, (mods, _) in enumerate(pieces):
        if any(p == q or p.startswith(q + ".") for p in paths for q in mods):
            return i
    return len(pieces)


def bare_replay_passes(model, chunks: list, states: list, pert, seed: int,
                       picked: list[int]) -> tuple[float, float]:  # fmt: skip
    """The passes the work needs when the forward pass of the unchanged pieces is reused:
    per chunk, one full forward pass in the trained model (its graph kept) and, in each model
    state ``picked``, the forward pass from the first changed piece (block granularity: at least
    what sanitylib's op-level replay recomputes) and the backward passes to the input.  Plain
    autograd, no hooks.  Returns the seconds of the trained-model passes and of the picked
    states' passes (switching states is not timed; the model is restored afterwards)."""
    from sanitylib.allocator import keep_freed_memory
    from sanitylib.randomize import ModelStates

    pieces = efficientnet_pieces(model)
    switch = ModelStates(model, states, pert, seed)  # copies only the blocks that change
    t0 = ts = 0.0

    with keep_freed_memory():
        try:
            for n, (inp, tgt, extra) in enumerate([chunks[0], *chunks]):  # the first: warm-up
                switch.set(0)
                inp = inp.detach().requires_grad_(True)
                start = time.perf_counter()
                hs, h = [inp], None
                for _, f in pieces:
                    hs.append(f(hs[-1]))
                backward(hs[-1].gather(1, tgt[:, None]).sum(), inp, extra)
                t0 += (time.perf_counter() - start) * (n > 0)
                for k in picked:
                    switch.set(k)
                    c = first_changed(pieces, states[k])
                    start = time.perf_counter()
                    h = hs[c]
                    for _, f in pieces[c:]:
                        h = f(h)
                    backward(h.gather(1, tgt[:, None]).sum(), inp, extra)
                    ts += (time.perf_counter() - start) * (n > 0)
                    if n == 0:  # the pieces must be the model's forward pass in this state
                        with torch.no_grad():
                            if not torch.allclose(h, model(inp), atol=1e-4, rtol=1e-4):
                                raise RuntimeError("efficientnet_pieces() do not compute the model")
                del hs, h
        finally:
            switch.restore()
    return t0, ts


def spread(states: list, k: int) -> tuple[list, list]:
    """``k`` states spread over ``states``, split in two halves (timed before and after)."""
    k = max(2, min(k, len(states)))
    picked = [states[round(i * (len(states) - 1) / (k - 1))] for i in range(k)]
    return picked[0::2], picked[1::2]


def side_by_side(T: dict, model, snap: dict, rows: list, states: list, k: int, switch,
                 runs: list[tuple[str, object]], replay: dict) -> tuple[list, float, float, int]:  # fmt: skip
    """Time each ``(name, fn)`` of ``runs`` into ``T[name]`` (restoring the model after each),
    between two halves of the bare passes: the naive ones (:func:`bare_passes`) of ``k`` states
    spread over ``states``, and the replay-aware ones (:func:`bare_replay_passes`) of
    ``replay["k"]`` states spread over the randomized ones, on ``replay["groups"]`` (pairs of a
    chunk subset and its scale to all chunks of its kind).

    Returns the runs' results, both bare-pass times scaled to all the work, and the number of
    states whose naive passes were measured."""
    from sanitylib.randomize import restore

    before, after = spread(states, k)
    sb = replay["states"]
    r_before, r_after = spread(list(range(1, len(sb))), replay["k"])

    def strict(picked: list[int]) -> list[tuple[float, float]]:
        return [bare_replay_passes(model, chunks, sb, replay["pert"], replay["seed"], picked)
                for chunks, _ in replay["groups"]]  # fmt: skip

    t = bare_passes(model, rows, before, switch, snap)
    s_before = strict(r_before)
    results = []
    for name, fn in runs:
        with timed(T, name):
            results.append(fn())
        restore(model, snap)
    t += bare_passes(model, rows, after, switch, snap)
    s_after = strict(r_after)
    measured = len(before) + len(after)
    per_state = (len(sb) - 1) / (len(r_before) + len(r_after))
    t_strict = sum(scale * ((b0 + a0) / 2 + (bs + as_) * per_state)
                   for (_, scale), (b0, bs), (a0, as_) in zip(replay["groups"], s_before, s_after))  # fmt: skip
    return results, t * len(states) / measured, t_strict, measured


def _chunks(x: torch.Tensor, y: torch.Tensor, per_image: int, extra: int = 0) -> list:
    """Rows of ``per_image`` points per image, cut into sanitylib's CPU chunks (``extra``: more
    backward passes through each chunk's graph)."""
    from sanitylib.engine import CPU_BATCH_SIZE as B

    rows = x.repeat_interleave(per_image, 0)
    tg = y.repeat_interleave(per_image, 0)
    return [(rows[i:i + B], tg[i:i + B], extra) for i in range(0, len(rows), B)]


# ----------------------------------------------------------------------------- main


def warm_up(model) -> None:
    """One forward and backward pass at every chunk size used below (the first pass of a shape
    pays one-off costs that no side should be charged for)."""
    x = torch.zeros(20, 3, 224, 224)
    for n in (1, 2, 8, 10, 16, 20):
        xi = x[:n].clone().requires_grad_(True)
        torch.autograd.grad(model(xi)[:, 0].sum(), xi)


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
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}, load average at start {load:.2f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantus-images", type=int, default=16)
    ap.add_argument("--captum-images", type=int, default=8)
    ap.add_argument("--bare-states", type=int, default=0,
                    help="model states whose bare passes are timed (the rest is scaled; "
                         "0: a quarter of the states, at least 2)")  # fmt: skip
    ap.add_argument("--skip-quantus", action="store_true")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--baselines-keep-memory", action="store_true",
                    help="run Quantus and the captum loop with freed memory kept too "
                         "(sanitylib.allocator), as a user tuning glibc would")  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import sanitylib as sl
    from sanitylib.engine import rows_per_image
    from sanitylib.models import Block
    from sanitylib.randomize import cascading_stages, randomize_, restore, snapshot

    def baseline(fn, *a):
        from sanitylib.allocator import keep_freed_memory

        with keep_freed_memory() if args.baselines_keep_memory else contextlib.nullcontext():
            return fn(*a)

    t_start = time.perf_counter()
    print("sanitylib benchmark: sanitylib vs Quantus MPRT vs a plain captum loop")
    print(device_line())
    from sanitylib.allocator import keeps_freed_memory

    print(f"freed CPU memory kept (sanitylib.allocator): sanitylib and bare passes "
          f"{keeps_freed_memory()}, baselines {args.baselines_keep_memory and keeps_freed_memory()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    with contextlib.redirect_stdout(sys.stderr):
        model = sl.load_model("efficientnet_lite0")
    model.eval()
    warm_up(model)
    T: dict[str, Timing] = {}
    res: dict[str, float] = {}
    bare: dict[str, float] = {}  # naive: every state's full forward and backward passes
    strict: dict[str, float] = {}  # reusing the forward pass of unchanged blocks
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
        (scores, df), bare["q"], strict["q"], measured = side_by_side(
            T, model, snap, rows, q_states, args.bare_states or max(2, n_states // 10), q_switch,
            [("quantus", lambda: baseline(run_quantus, model, x, y)),
             ("sanitylib_q", lambda: run_sanitylib_quantus_task(model, x))], replay)  # fmt: skip
        print(f"  [bare passes: {bare['q'] * measured / n_states:.1f} s for {measured} of "
              f"{n_states} states -> {bare['q']:.1f} s; reusing unchanged blocks: "
              f"{strict['q']:.1f} s (from {replay['k']} states)]")  # fmt: skip
        diffs = []
        for name in blocks:
            ours = df[df.stage == name].sort_values("image")["value"].to_numpy()
            theirs = np.asarray(scores[name], dtype=float)
            diffs.append(np.nanmax(np.abs(ours - theirs)) if len(ours) == len(theirs) else np.inf)
            if np.isnan(ours).any() != np.isnan(theirs).any():
                diffs[-1] = np.inf
        res["diff_quantus"] = float(np.max(diffs))
        print(f"  max |sanitylib - Quantus| over {len(blocks)} steps x {len(x)} images: "
              f"{res['diff_quantus']:.2e} (tolerance {TOL_QUANTUS:g})")  # fmt: skip
        if not res["diff_quantus"] <= TOL_QUANTUS:
            print("  ERROR: sanitylib and Quantus disagree")
            ok = False

    # -- 2: plain captum loop vs sanitylib ------------------------------------------------
    if not args.skip_captum:
        x = load_batch(model, args.captum_images)
        blocks = [Block(n, m) for n, m in CAPTUM_BLOCKS]
        stages = cascading_stages(blocks)
        pert = sl.Perturbation()  # the paper's re-initialization
        n_states = len(stages) + 1
        print(f"\n[2] plain captum loop vs sanitylib: {len(x)} images, {len(METHODS)} methods "
              f"({', '.join(METHODS)}), {len(METRICS)} metrics, {len(stages)} cascade stages")  # fmt: skip
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
        (values, df), bare["c"], strict["c"], measured = side_by_side(
            T, model, snap, rows, c_states, args.bare_states or 2, c_switch,
            [("captum_loop", lambda: baseline(run_captum_loop, model, x, stages, pert)),
             ("sanitylib_c", lambda: run_sanitylib_full(model, x, blocks, pert))], replay)  # fmt: skip
        print(f"  [bare passes: {bare['c'] * measured / n_states:.1f} s for {measured} of "
              f"{n_states} states -> {bare['c']:.1f} s; {per['total']} passes per image and state; "
              f"reusing unchanged blocks: {strict['c']:.1f} s (from {len(picked)} of "
              f"{len(path_rows)} path chunks)]")  # fmt: skip
        diffs = []
        for r in df.itertuples():
            v = values[(r.stage, r.method, r.image, r.metric)]
            diffs.append((abs(r.value - v), r.stage, r.method, r.metric, r.image, r.value, v))
        diffs.sort(reverse=True)
        res["diff_captum"] = float(diffs[0][0])
        print(f"  max |sanitylib - captum loop| over {len(diffs)} values (every method, stage, "
              f"image and metric): {res['diff_captum']:.2e} (tolerance {TOL_DETERMINISTIC:g})")  # fmt: skip
        for d in diffs[:3]:
            print("    largest: |d|={:.1e} stage={} method={} metric={} image={} sanitylib={:.6f} "
                  "captum loop={:.6f}".format(*d))
        if not res["diff_captum"] <= TOL_DETERMINISTIC:
            print("  ERROR: sanitylib and the captum loop disagree")
            ok = False

    # -- table ----------------------------------------------------------------------------
    print("\nside by side (wall-clock seconds; process CPU seconds in the [..] lines above)")
    print("  bare passes: 'naive' = every state's full forward and backward passes; 'reuse' = the "
          "forward pass of the blocks a state leaves unchanged computed once (what sanitylib "
          "needs)")  # fmt: skip
    print(f"  {'workload':<38} {'baseline':>9} {'sanitylib':>9} {'naive':>7} {'reuse':>7} "
          f"{'speedup':>8} {'eff. naive':>10} {'eff. reuse':>10}")  # fmt: skip
    rows_out = [("1 Quantus MPRT (Gradient, 99 steps)", "quantus", "sanitylib_q", "q"),
                ("2 captum loop (9 methods, 4 metrics)", "captum_loop", "sanitylib_c", "c")]
    speedup: dict[str, float] = {}
    for label, base, ours, key in rows_out:
        if base not in T:
            continue
        speedup[key] = T[base].wall / T[ours].wall
        print(f"  {label:<38} {T[base].wall:>9.1f} {T[ours].wall:>9.1f} {bare[key]:>7.1f} "
              f"{strict[key]:>7.1f} {speedup[key]:>8.2f} {bare[key] / T[ours].wall:>10.2f} "
              f"{strict[key] / T[ours].wall:>10.2f}")  # fmt: skip
    if speedup:
        sl_total = sum(T[k].wall for k in ("sanitylib_q", "sanitylib_c") if k in T)
        efficiency = sum(bare.values()) / sl_total
        print(f"  efficiency = naive bare passes / sanitylib time, both workloads: {efficiency:.2f} "
              "(the RESULT figure: the passes every model state needs, as for Quantus's 0.79)")  # fmt: skip
        print(f"  against the bare passes with the unchanged blocks' forward pass reused: "
              f"{sum(strict.values()) / sl_total:.2f} (sanitylib's overhead: metrics, "
              "bookkeeping, hooks)")  # fmt: skip
    print(f"total benchmark time: {time.perf_counter() - t_start:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"device: cpu, {torch.get_num_threads()} torch threads (every side; this benchmark "
          "does not use a GPU)")  # fmt: skip
    if "quantus" in T and "captum_loop" in T:
        d = max(res["diff_quantus"], res["diff_captum"])
        print(f"RESULT speedup_vs_quantus={speedup['q']:.2f} "
              f"speedup_vs_captum_loop={speedup['c']:.2f} "
              f"efficiency={efficiency:.2f} max_abs_diff={d:.1e}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
