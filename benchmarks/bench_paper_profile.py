"""Time the ``paper`` profile (InceptionV3, 200 images, 17 blocks, the paper's settings for every
method) with and without IG-SmoothGrad, next to the bare-pass bound.

What it measures
----------------
The model-randomization run of the ``paper`` profile (:data:`sanitylib.book.profiles.PROFILES`,
``randomization``: all nine methods, no overrides, so every method runs with the authors'
settings of :data:`sanitylib.attribution.PAPER_SETTINGS`: Integrated Gradients 50 steps,
SmoothGrad 50 samples, VarGrad 25, IG-SmoothGrad 25 noise samples x 50 steps; Gradient,
Gradient x Input, Guided BackProp, GradCAM and Guided GradCAM), as one
:func:`sanitylib.run_randomization` call: the cascading schedule over InceptionV3's blocks (17
blocks, 18 model states with the trained one), all four metrics (Spearman with and without
absolute values, SSIM, HOG), no cache, no noise floor, no stored maps.  It runs twice ("parts",
``--parts``): with all nine methods, and without IG-SmoothGrad (the eight methods of the book's
randomization chapters).  Each part is timed once (wall clock; on CUDA synchronized before and
after, with the peak GPU memory allocated during it).

The paper profile's model is ``"auto"`` (InceptionV3 when its weights can be obtained, else
EfficientNet-Lite0); this script always takes the InceptionV3 architecture: with the ImageNet
weights when they are in the torch hub cache (``--weights cached``, the default: no download and
no file written), or downloaded into it (``--weights download``), otherwise randomly initialized
(``--weights random``, or announced as a FALLBACK).  The amount of work and so the timing do not
depend on the weights (only which classes are explained, which changes nothing in the passes).

Images (299x299, the paper's Inception preprocessing): the paper's 200 ImageNet validation images
from ``$SANITYLIB_IMAGE_DIR`` when it holds them (:func:`sanitylib.load_paper_imagenet`), else the
first ``--images`` image files of that folder; without the variable, scikit-image's 8 photos
(shipped offline) and their mirrored copies (left-right, up-down, both: 32 distinct images, then
repeated).  Every substitution is printed.

Cost model
----------
Per image and model state the engine computes (after sharing passes between methods,
:func:`sanitylib.engine.rows_per_image`):

* plain rows (one forward and one backward pass of one input row each):
  1 (the image itself: Gradient, Gradient x Input, GradCAM and the targets)
  + 50 (Integrated Gradients) + 50 (SmoothGrad and VarGrad share one noise stream: max(50, 25))
  + 1,250 (IG-SmoothGrad: 25 x 50) = **1,351** with IG-SmoothGrad, **101** without;
* guided rows: 1 (a second backward pass through the image's graph: Guided BackProp and Guided
  GradCAM).

A part's passes are (plain + guided) x images x states: 200 images and 18 states give
4,867,200 passes with IG-SmoothGrad, 367,200 without.

The **bare-pass bound** of a part is what those passes would cost at bare speed: plain
``torch.autograd.grad`` of the sum of the target logits to the input, no hooks, no metrics, in
chunks of ``min(batch size, images x plain rows)`` rows (the largest chunk the engine can form),
after a warm-up, median of ``--repeats`` repetitions (synchronized on CUDA).  A plain row costs
one forward plus one backward pass per row; a guided row is counted as one more backward pass
through the same (retained) graph, measured as such (the ReLU gradient clamp of Guided
BackProp is not included: it is elementwise and small).  The bound counts a full forward pass for
every row and state: it does not replay the forward pass of unchanged blocks, as sanitylib does
(on CUDA always, on the CPU where freed memory is kept), so ``efficiency = bound / sanitylib``
can exceed 1 when forward replay saves more than sanitylib's overhead (hooks, metrics,
bookkeeping) costs.  Chunk remainders are counted at the full chunk's per-row rate.

Precision: IEEE fp32 on CUDA (:func:`sanitylib.cli.set_precision` with ``fast=False``), TF32
with ``--tf32``; the previous setting is restored at the end.  Nothing else global is changed
(the random weights are drawn inside ``torch.random.fork_rng``; threads, allocator and cuDNN
flags are left as they are and printed); nothing is written to disk.  On the CPU sanitylib keeps
freed memory (and replays forward passes) only where the environment opts in
(``SANITYLIB_KEEP_FREED_MEMORY=1``); the bare passes then run with it as well.

Output: per part the sanitylib seconds, the bound, the efficiency, passes per second and the
peak GPU memory; an extrapolation (linear, from the measured per image-and-state rate) to the
full 200 images and to the 50,000 ImageNet validation images; and a last line::

    PAPER_PROFILE device=.. images=.. states=.. with_igsg_s=.. without_igsg_s=.. bound_with_s=..
    bound_without_s=.. efficiency_with=.. efficiency_without=..

(one line; the fields of a part not run are left out).

Run
---
On a GPU (the full profile)::

    .venv/bin/python benchmarks/bench_paper_profile.py --device cuda

On a CPU, reduced (the full profile would take days)::

    .venv/bin/python benchmarks/bench_paper_profile.py --device cpu --images 1 --blocks 2 \
        --parts without

``--scale-samples F`` multiplies every sample and step count by ``F`` (at least 2 each) and
``--image-size S`` resizes the images to ``S x S`` (InceptionV3 takes ``S >= 75``): testing knobs
for quick checks (``tests/test_bench_paper_profile.py``), *not* the paper's settings (announced
when used).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import sanitylib as sl
from sanitylib.book.profiles import PROFILES
from sanitylib.cli import _positive as _positive_int, _seed  # the command line's argument types
from sanitylib.cli import restore_tf32, set_precision, tf32_state
from sanitylib.engine import auto_batch_size, rows_per_image

#: The metrics of every randomization chapter.
METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
IGSG = "ig_smoothgrad"
#: Sample and step options scaled by ``--scale-samples``.
COUNT_OPTIONS = ("n_steps", "n_samples")
#: Extrapolation targets: the paper's images, and the ImageNet validation set.
EXTRAPOLATE = (("the paper's 200 images", 200), ("the 50,000 ImageNet validation images", 50_000))
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


# ----------------------------------------------------------------------------- arguments


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Time the paper profile (InceptionV3, the paper's settings) with and without "
                    "IG-SmoothGrad, next to the bare-pass bound.")  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--images", type=_positive_int, default=200,
                    help="number of images (default 200, the paper's)")
    ap.add_argument("--blocks", type=_positive_int, default=None,
                    help="randomize the top K blocks (default: all of the model's, 17)")
    ap.add_argument("--parts", choices=("both", "with", "without"), default="both",
                    help="with IG-SmoothGrad, without, or both (default)")
    ap.add_argument("--tf32", action="store_true",
                    help="TF32 convolutions and matmuls on CUDA (default: IEEE fp32)")
    ap.add_argument("--batch-size", type=_positive_int, default=None, metavar="ROWS",
                    help="rows per chunk (default: sanitylib.engine.auto_batch_size)")
    ap.add_argument("--seed", type=_seed, default=0, help="seed of the run (default 0)")
    ap.add_argument("--weights", choices=("cached", "download", "random"), default="cached",
                    help="InceptionV3 weights: from the torch hub cache if there (default), "
                         "downloaded, or random (timing does not depend on them)")
    ap.add_argument("--repeats", type=_positive_int, default=3,
                    help="repetitions of each bare-pass measurement (median; default 3)")
    ap.add_argument("--scale-samples", type=_fraction, default=1.0, metavar="F",
                    help="TESTING KNOB: multiply every sample and step count by F (at least 2 "
                         "each); not the paper's settings")
    ap.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                    help="TESTING KNOB: resize the images to S x S (InceptionV3 takes S >= 75; "
                         "default: the paper's 299)")
    ap.add_argument("--no-warmup-run", action="store_true",
                    help="skip the small sanitylib run that warms its code paths up")
    return ap


def resolve_device(ap: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda requested but CUDA is not available "
                 f"(torch {torch.__version__}); use --device cpu or auto")  # fmt: skip
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ----------------------------------------------------------------------------- helpers


def sync(dev: torch.device) -> None:
    """Wait for queued CUDA kernels (every timer's edge); nothing on the CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from sanitylib.utils import cpu_info

    return cpu_info()["model"]


def fmt_s(s: float) -> str:
    if s >= 86_400:
        return f"{s:,.0f} s ({s / 86_400:.1f} days)"
    if s >= 3_600:
        return f"{s:,.0f} s ({s / 3_600:.1f} h)"
    return f"{s:,.1f} s"


def num(v: float) -> str:
    """A number for the PAPER_PROFILE line (plain, no thousands separators)."""
    return f"{v:.6g}"


def cpu_memory_context():
    """sanitylib's CPU allocator setting where the environment opts in (the same setting the
    engine uses, so that the bare passes and sanitylib run alike); otherwise nothing."""
    if sl.allocator.opted_in():
        return sl.keep_freed_memory()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- model, images


def load_inception(weights: str, seed: int, dev: torch.device):
    """InceptionV3 through :func:`sanitylib.load_model`; returns ``(model, description)``."""
    from torchvision.models import Inception_V3_Weights

    fname = os.path.basename(Inception_V3_Weights.IMAGENET1K_V1.url)
    cached = Path(torch.hub.get_dir(), "checkpoints", fname)
    model = None
    if weights == "download" or (weights == "cached" and cached.is_file()):
        try:
            model = sl.load_model("inception_v3", pretrained=True)
            desc = f"InceptionV3, ImageNet weights ({model.sanity_info.source})"
        except sl.WeightsUnavailableError as err:
            print(f"FALLBACK: InceptionV3 ImageNet weights unavailable ({str(err).split(':')[0]}); "
                  "using the architecture with random weights.")  # fmt: skip
    elif weights == "cached":
        print(f"FALLBACK: InceptionV3 ImageNet weights are not in the torch hub cache ({cached}); "
              "using the architecture with random weights (--weights download fetches them).")
    if model is None:
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.manual_seed(seed)
            model = sl.load_model("inception_v3", pretrained=False)
        desc = f"InceptionV3 architecture, random weights (seed {seed})"
        print("NOTE: timing does not depend on the weights: the same passes run either way.")
    return model.to(dev).eval(), desc


def _flip_variants(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x``, then its left-right, up-down and both-way mirror images, then repeats, to ``n``."""
    variants = torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-1, -2)])
    reps = -(-n // len(variants))
    return torch.cat([variants] * reps)[:n].contiguous()


def load_images(model, n: int, dev: torch.device) -> tuple[torch.Tensor, str]:
    folder = os.environ.get("SANITYLIB_IMAGE_DIR") or None
    batch = None
    if folder is not None:
        try:
            batch = sl.load_paper_imagenet(folder, model, n=n, verbose=False)
        except FileNotFoundError as err:
            print(f"FALLBACK: the paper's ImageNet images are not all in $SANITYLIB_IMAGE_DIR "
                  f"({str(err).splitlines()[0]}); taking the folder's first image files.")
            try:  # listed here, so that only the first n files are read
                files = sorted(p.stem for p in Path(folder).iterdir()
                               if p.suffix.lower() in _IMAGE_SUFFIXES)[:n]  # fmt: skip
                if files:
                    batch = sl.load_photos(model, folder=folder, ids=files, verbose=False)
                else:
                    print(f"FALLBACK: no image files in {folder}; using scikit-image's photos.")
            except OSError as err2:  # FileNotFoundError included
                print(f"FALLBACK: cannot read images from {folder} ({err2}); using "
                      "scikit-image's photos.")
    if batch is None:
        batch = sl.load_photos(model, names=list(sl.data.PHOTOS), verbose=False)
        source = f"scikit-image's {len(batch)} photos (offline, no $SANITYLIB_IMAGE_DIR)"
    else:
        source = batch.source
    x = batch.x
    if len(x) < n:
        print(f"NOTE: {len(x)} images available; their mirrored copies (left-right, up-down, "
              f"both) and then repeats fill up the {n} images.")
        x = _flip_variants(x, n)
        source += f", mirrored/repeated to {n}"
    return x[:n].to(dev), source


# ----------------------------------------------------------------------------- work plan


def method_settings(methods, options: dict, scale: float) -> dict[str, dict]:
    """Per-method options of the run: the profile's, with the counts scaled by ``scale``."""
    out = {m: dict(options.get(m, {})) for m in methods}
    if scale != 1.0:
        for m in methods:
            full = sl.get_method(m).settings(options.get(m, {}))
            for k in COUNT_OPTIONS:
                if k in full:
                    out[m][k] = max(2, int(round(full[k] * scale)))
    return {m: o for m, o in out.items() if o}


def counts(methods, options: dict) -> str:
    parts = []
    for m in methods:
        s = sl.get_method(m).settings(options.get(m, {}))
        c = "x".join(str(s[k]) for k in ("n_samples", "n_steps") if k in s)
        parts.append(f"{m}({c})" if c else m)
    return ", ".join(parts)


def chunk_sizes(x: torch.Tensor, n_states: int, methods, options: dict, bs: int) -> set[int]:
    """Row counts of the chunks the engine is expected to run: image groups as the engine forms
    them (on CUDA from the free memory now); per group the images' own chunk(s), then the
    integration and noise rows in chunks of ``bs``."""
    x_methods = [m for m in methods if (p := sl.get_method(m).passes) is not None and p.kind == "x"]
    plain = rows_per_image(methods, options)["plain"]
    job_rows = plain - (1 if x_methods else 0)
    sizes = set()
    for g in (len(gr) for gr in sl.engine.image_groups(x, n_states, len(methods))):
        for total in ((g if x_methods else 0), g * job_rows):
            if total >= bs:
                sizes.add(bs)
            if total % bs:
                sizes.add(total % bs)
    return sizes


# ----------------------------------------------------------------------------- bare passes


def bare_rows(x: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    idx = torch.arange(rows, device=x.device) % len(x)
    return x[idx].detach().clone(), targets[idx]


def bare_pass(model, rows: torch.Tensor, tgt: torch.Tensor, dev: torch.device) -> tuple[float, ...]:
    """Seconds of one forward + backward pass of ``rows`` to the input and of a second backward
    pass through the same graph (no hooks)."""
    rows = rows.detach().requires_grad_(True)
    sync(dev)
    t0 = time.perf_counter()
    with torch.enable_grad():
        out = model(rows)
        sel = out.gather(1, tgt[:, None]).sum()
        g1 = torch.autograd.grad(sel, rows, retain_graph=True)[0]
        sync(dev)
        t1 = time.perf_counter()
        g2 = torch.autograd.grad(sel, rows)[0]
        sync(dev)
        t2 = time.perf_counter()
    del out, sel, g1, g2, rows
    return t1 - t0, t2 - t1


def measure_bare(model, x, targets, rows: int, repeats: int, dev) -> tuple[float, float]:
    """Median seconds per row of a plain pass (forward + backward) and of the extra backward
    pass of a guided row, in chunks of ``rows`` rows (after one warm-up pass)."""
    r, t = bare_rows(x, targets, rows)
    bare_pass(model, r, t, dev)  # warm-up at this size
    plain, extra = zip(*(bare_pass(model, r, t, dev) for _ in range(repeats)))
    return statistics.median(plain) / rows, statistics.median(extra) / rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    dev = resolve_device(ap, args.device)

    prev_tf32 = tf32_state()
    try:
        precision = set_precision(dev, fast=args.tf32)
        return _main(ap, args, dev, precision)
    finally:
        restore_tf32(prev_tf32)


def _main(ap, args, dev: torch.device, precision: dict) -> int:
    t_start = time.perf_counter()
    profile = PROFILES["paper"]
    all_methods, profile_options = profile.randomization
    model, model_desc = load_inception(args.weights, args.seed, dev)
    info = model.sanity_info
    n_blocks = len(info.blocks)
    k = n_blocks if args.blocks is None else args.blocks
    if k > n_blocks:
        ap.error(f"argument --blocks: InceptionV3 has {n_blocks} blocks, got {k}")
    blocks = list(info.blocks[:k])
    n_states = k + 1
    x, source = load_images(model, args.images, dev)
    if args.image_size is not None and args.image_size != x.shape[-1]:
        if args.image_size < 75:
            ap.error(f"argument --image-size: InceptionV3 needs at least 75, got {args.image_size}")
        x = F.interpolate(x, size=(args.image_size,) * 2, mode="bilinear", antialias=True,
                          align_corners=False).clamp(*info.value_range)  # fmt: skip
        # sanitylib checks inputs against the declared size: this model object's info follows
        model.sanity_info = replace(info, input_size=(x.shape[1], *x.shape[-2:]))
        source += f", resized to {args.image_size}x{args.image_size} (TESTING KNOB)"
    n = len(x)
    if args.batch_size is not None:
        bs, bs_how = args.batch_size, "given (--batch-size)"
    else:
        bs, bs_how = auto_batch_size(model, x), "sanitylib.engine.auto_batch_size"
    with torch.no_grad():
        targets = sl.predict(model, x, batch_size=bs).argmax(1)

    parts = {"with": list(all_methods), "without": [m for m in all_methods if m != IGSG]}
    if args.parts != "both":
        parts = {args.parts: parts[args.parts]}
    options = {p: method_settings(ms, profile_options, args.scale_samples)
               for p, ms in parts.items()}  # fmt: skip

    print("=" * 78)
    print("paper profile benchmark (sanitylib)")
    print(f"device: {dev.type} ({device_name(dev)})")
    print(f"torch {torch.__version__}, sanitylib {sl.__version__}, "
          f"python {platform.python_version()}, torch threads {torch.get_num_threads()}")
    if dev.type == "cuda":
        print(f"precision: {'TF32' if precision.get('tf32') else 'IEEE fp32'} "
              f"(cudnn.benchmark={precision.get('cudnn_benchmark')}, "
              f"cudnn.deterministic={precision.get('cudnn_deterministic')}); restored at the end")
        total = torch.cuda.get_device_properties(dev).total_memory
        print(f"GPU memory: {total / 2**30:.1f} GiB")
    else:
        kept = sl.allocator.opted_in() and sl.allocator.keeps_freed_memory()
        print(f"precision: fp32 (CPU); freed memory kept (and forward replay): "
              f"{'yes' if kept else 'no'} (SANITYLIB_KEEP_FREED_MEMORY=1 opts in)")
    print(f"model: {model_desc}; {n_blocks} blocks, randomizing the top {k} -> {n_states} states "
          f"(cascading, top down)")  # fmt: skip
    print(f"images: {n} at {tuple(x.shape[1:])}; {source}")
    print(f"batch size: {bs} rows per chunk ({bs_how}), passed to every run")
    print(f"metrics: {', '.join(METRICS)}; seed {args.seed}")
    if args.image_size is not None and args.image_size != 299:
        print(f"TESTING KNOB: --image-size {args.image_size}: not the paper's 299x299 inputs; the "
              "figures are not the paper profile's")
    if args.scale_samples != 1.0:
        print(f"TESTING KNOB: --scale-samples {args.scale_samples:g}: sample and step counts are "
              f"NOT the paper's; the figures are not the paper profile's")
    for p, ms in parts.items():
        rpi = rows_per_image(ms, options[p])
        print(f"part {p} IG-SmoothGrad: {counts(ms, options[p])}")
        print(f"  per image and state: {rpi['plain']} plain + {rpi['guided']} guided = "
              f"{rpi['total']} passes; x {n} images x {n_states} states = "
              f"{rpi['total'] * n * n_states:,} passes")

    # ---- bare passes (warm-up at every chunk size the runs use, then the measurement)
    print("-" * 78)
    sizes = set()
    for p, ms in parts.items():
        sizes |= chunk_sizes(x, n_states, ms, options[p], bs)
    bare_size = {p: min(bs, n * rows_per_image(ms, options[p])["plain"]) for p, ms in parts.items()}
    with cpu_memory_context():
        t = time.perf_counter()
        warm = sorted(sizes | set(bare_size.values()))
        for size in warm:
            r, tg = bare_rows(x, targets, size)
            bare_pass(model, r, tg, dev)
            del r, tg
        print(f"warm-up: one bare pass at each chunk size {warm} "
              f"({time.perf_counter() - t:.1f} s)")
        per_row = {}
        for size in sorted(set(bare_size.values())):
            per_row[size] = measure_bare(model, x, targets, size, args.repeats, dev)
            print(f"bare pass, {size}-row chunks: {per_row[size][0] * 1e3:.2f} ms per row "
                  f"(forward + backward), guided extra backward {per_row[size][1] * 1e3:.2f} ms "
                  f"per row (median of {args.repeats})")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_warmup_run:  # sanitylib's own code paths (hooks, replay, metrics) once
        small = {m: {k_: 2 for k_ in COUNT_OPTIONS if k_ in sl.get_method(m).options}
                 for m in all_methods}  # fmt: skip
        small = {m: o for m, o in small.items() if o}
        t = time.perf_counter()
        sl.run_randomization(model, x[:1], list(all_methods), "cascading", blocks=blocks[:1],
                             metrics=METRICS, cache=False, progress=False, floor=False,
                             store_maps=0, batch_size=bs, seed=args.seed, method_options=small)
        sync(dev)
        print(f"warm-up: sanitylib on 1 image, 1 block, 2 samples/steps "
              f"({time.perf_counter() - t:.1f} s)")

    # ---- the parts
    results = {}
    for p, ms in parts.items():
        print("-" * 78)
        print(f"part {p} IG-SmoothGrad ({len(ms)} methods):", flush=True)
        rpi = rows_per_image(ms, options[p])
        passes = rpi["total"] * n * n_states
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        df = sl.run_randomization(model, x, ms, "cascading", blocks=blocks, metrics=METRICS,
                                  cache=False, progress=True, floor=False, store_maps=0,
                                  batch_size=bs, seed=args.seed, method_options=options[p])
        sync(dev)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        expected_rows = (n_states - 1) * len(ms) * n * len(METRICS)
        if len(df) != expected_rows:
            print(f"ERROR: {len(df)} result rows, expected {expected_rows}", file=sys.stderr)
            return 1
        plain_s, extra_s = per_row[bare_size[p]]
        bound = n * n_states * (rpi["plain"] * plain_s + rpi["guided"] * extra_s)
        results[p] = dict(secs=secs, bound=bound, passes=passes, peak=peak, rpi=rpi)
        print(f"  sanitylib:         {fmt_s(secs)} ({len(df):,} result rows)")
        print(f"  bare-pass bound:   {fmt_s(bound)} ({n} x {n_states} x ({rpi['plain']} x "
              f"{plain_s * 1e3:.2f} ms + {rpi['guided']} x {extra_s * 1e3:.2f} ms))")
        print(f"  efficiency:        {bound / secs:.3f} (bound / sanitylib)")
        print(f"  passes per second: {passes / secs:,.1f} ({passes:,} passes)")
        print("  peak GPU memory:   "
              + (f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"))

    # ---- extrapolation
    print("-" * 78)
    print("EXTRAPOLATION (linear in the images, from the measured time per image and state; "
          "not measured):")
    for p, r in results.items():
        per_img_state = r["secs"] / (n * n_states)
        for label, m in EXTRAPOLATE:
            line = (f"  {p} IG-SmoothGrad, {label}: {fmt_s(per_img_state * m * n_states)} "
                    f"at {n_states} states")
            if n_states < n_blocks + 1:
                line += (f"; {fmt_s(per_img_state * m * (n_blocks + 1))} at the full {n_blocks + 1}"
                         f" states (rougher: later states re-run more of the network)")
            print(line)
    print(f"total wall time of this script: {fmt_s(time.perf_counter() - t_start)}")

    fields = [f"device={dev.type}", f"images={n}", f"states={n_states}"]
    keys = {"with": "with_igsg", "without": "without_igsg"}
    for p in ("with", "without"):
        if p in results:
            fields.append(f"{keys[p]}_s={num(results[p]['secs'])}")
    for p in ("with", "without"):
        if p in results:
            fields.append(f"bound_{p}_s={num(results[p]['bound'])}")
    for p in ("with", "without"):
        if p in results:
            fields.append(f"efficiency_{p}={num(results[p]['bound'] / results[p]['secs'])}")
    print("PAPER_PROFILE " + " ".join(fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
