"""Command line: ``python -m sanitylib run ...`` (also the ``sanitylib`` console script).

``sanitylib run`` runs a model-randomization schedule over a set of images and writes
``OUT/results.parquet`` (the tidy table of :func:`sanitylib.run_randomization`) and
``OUT/config.json`` (the configuration, its key and the versions).  The images are cut into
shards (:mod:`sanitylib.distributed`); each finished shard is saved under ``OUT/shards/`` at
once, so an interrupted run continues where it stopped, and under
``torchrun --nproc_per_node N -m sanitylib run ...`` the shards are shared among the ranks.
The merged table is the same for any number of processes.

This module is an entry point, not part of the library's API: it reads the run profiles of
the chapter layer (:mod:`sanitylib.book.profiles`) lazily, inside :func:`main`; nothing in
the library imports it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "set_precision", "tf32_state", "restore_tf32", "PROFILE_NAMES",
           "EXIT_USAGE"]  # fmt: skip

PROFILE_NAMES = ("smoke", "book", "paper")
#: Exit status for a bad argument (as argparse).
EXIT_USAGE = 2
#: Default images per shard.
DEFAULT_SHARD_SIZE = 4


class UsageError(ValueError):
    """A bad command-line argument (its message names the argument)."""


def _flag_error(flag: str, err: Exception) -> UsageError:
    """``UsageError`` ``"FLAG: message"`` for an error raised while checking ``FLAG``'s value;
    a message that already starts with the flag or the argument's name (``"--methods: ..."``,
    ``"blocks: ..."``) does not repeat it."""
    msg = str(err)
    for prefix in (f"{flag}: ", f"{flag.lstrip('-').replace('-', '_')}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return UsageError(f"{flag}: {msg}")


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return items


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**63), got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**63), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``sanitylib`` argument parser (sub-command ``run``)."""
    parser = argparse.ArgumentParser(
        prog="sanitylib", description="Sanity checks for saliency maps (Adebayo et al., 2018).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run a model-randomization schedule and write a results table",
        description="Run a model-randomization schedule over images; write OUT/results.parquet "
                    "and OUT/config.json.  Under torchrun the images' shards are shared among "
                    "the ranks; an interrupted run resumes from its finished shards.")  # fmt: skip
    run.add_argument("--profile", choices=PROFILE_NAMES, default="book",
                     help="defaults for the model, images, methods and their settings "
                          "(the book's profiles; default: book)")  # fmt: skip
    run.add_argument("--schedule", choices=("cascading", "independent"), default="cascading")
    run.add_argument("--model", default=None,
                     help="model name for sanitylib.load_model (default: the profile's)")
    run.add_argument("--images", default=None, metavar="DIR",
                     help="folder of image files, sorted by name (default: the profile's "
                          "scikit-image photos)")  # fmt: skip
    run.add_argument("--n-images", type=_positive, default=None, metavar="N",
                     help="use the first N images")
    run.add_argument("--methods", type=_csv, default=None, metavar="A,B,...",
                     help="saliency methods (default: the profile's)")
    run.add_argument("--metrics", type=_csv, default=None, metavar="A,B,...",
                     help="similarity metrics (default: spearman_abs,spearman,ssim,hog_spearman)")
    run.add_argument("--blocks", default=None, metavar="K|A,B,...",
                     help="blocks to randomize: a number K (the K top blocks) or block names "
                          "(default: every block of the model)")  # fmt: skip
    run.add_argument("--target", choices=("current", "original"), default="current")
    run.add_argument("--seed", type=_seed, default=None, help="seed of every random draw "
                     "(default: the profile's)")  # fmt: skip
    run.add_argument("--out", required=True, metavar="DIR", help="output folder")
    run.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, metavar="N",
                     help=f"images per shard (default {DEFAULT_SHARD_SIZE}); part of the "
                          "run's configuration")  # fmt: skip
    run.add_argument("--max-shards", type=_positive, default=None, metavar="N",
                     help="stop after N shards per process (resume by running again)")
    run.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or "
                     "'cuda' (under torchrun: the rank's local GPU)")  # fmt: skip
    run.add_argument("--fast", action="store_true",
                     help="on CUDA, allow TF32 convolutions and matmuls (default: IEEE fp32, "
                          "the reference numerics)")  # fmt: skip
    run.add_argument("--batch-size", type=_positive, default=None, metavar="ROWS",
                     help="rows per forward/backward chunk (default: automatic)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run; returns the exit status
    (0: done or stopped by ``--max-shards``; 2: bad argument)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as err:
        print(f"sanitylib {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# ----------------------------------------------------------------------------- run


def set_precision(device, fast: bool = False) -> dict:
    """Set the float32 precision of CUDA convolutions and matmuls (process-global: an entry
    point's choice): IEEE fp32 by default (the reference numerics; torch enables TF32 for
    convolutions on Ampere and newer by default), TF32 with ``fast``.  Returns the settings
    for the record.  On the CPU nothing changes."""
    import torch

    device = torch.device(device)
    out = {"device": device.type, "tf32": False}
    if device.type != "cuda":
        return out
    _set_tf32(fast)
    out.update(tf32=bool(fast), gpu=torch.cuda.get_device_name(device),
               cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
               cudnn_benchmark=bool(torch.backends.cudnn.benchmark))  # fmt: skip
    return out


def tf32_state() -> tuple:
    """The current float32 precision settings of CUDA matmuls and cuDNN convolutions (to restore
    them with :func:`restore_tf32`)."""
    import torch

    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        return ("new", torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)  # fmt: skip
    return ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def restore_tf32(state: tuple) -> None:
    """Set back what :func:`tf32_state` returned."""
    import torch

    api, matmul, conv = state
    if api == "new":
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def _set_tf32(fast: bool) -> None:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions, with torch's newer
    ``fp32_precision`` settings where they exist (mixing them with the legacy ``allow_tf32``
    flags is an error in recent torch)."""
    import torch

    if tf32_state()[0] == "new":
        mode = "tf32" if fast else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("sanitylib", "torch", "torchvision", "captum", "numpy", "scipy", "scikit-image",
                 "pandas", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _resolve(args) -> dict:
    """The run's settings from the profile and the arguments; every argument is checked here,
    before any model or image is loaded."""
    from .book.profiles import get_profile  # the chapter layer's profiles (entry point only)
    from .data import _IMAGE_SUFFIXES, PHOTOS
    from .models import DIGIT_MODELS, MODELS
    from .registry import resolve_methods, resolve_metrics
    from .experiment import DEFAULT_METRICS

    prof = get_profile(args.profile)
    methods, options = prof.randomization
    if args.methods is not None:
        methods = tuple(args.methods)
    try:
        specs = resolve_methods(list(methods), "--methods")
    except (ValueError, TypeError) as err:
        raise _flag_error("--methods", err) from None
    names = [s.name for s in specs]
    options = {m: dict(o) for m, o in options.items() if m in names}
    for sp in specs:
        try:
            sp.settings(options.get(sp.name, {}))
        except (ValueError, TypeError) as err:
            raise UsageError(f"--methods: {sp.name}: {err}") from None
    metrics = tuple(args.metrics) if args.metrics is not None else tuple(DEFAULT_METRICS)
    try:
        metrics = tuple(m.name for m in resolve_metrics(list(metrics)))
    except (ValueError, TypeError) as err:
        raise _flag_error("--metrics", err) from None
    model = args.model or prof.model
    if model not in (*MODELS, "auto"):
        raise UsageError(f"--model: unknown model {model!r}; known: {', '.join(MODELS)}, auto")
    if model in DIGIT_MODELS:
        photo = [m for m in MODELS if m not in DIGIT_MODELS]
        raise UsageError(f"--model: {model} takes 28x28 MNIST digits, and `sanitylib run` runs on "
                         "photos (the profile's or --images); run the MNIST models from Python "
                         f"(sanitylib.mnist, the book's chapters 4-6), or pick one of "
                         f"{', '.join(photo)}, auto")  # fmt: skip
    if args.images is not None:
        folder = Path(args.images)
        if not folder.is_dir():
            raise UsageError(f"--images: {folder} is not a folder")
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"--images: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) "
                             f"in {folder}")  # fmt: skip
        # the files by name; their content is checked shard by shard (_image_digests)
        images = {"folder": str(folder.resolve()), "files": files}
    elif prof.image_folder:
        raise UsageError(f"--images: the {prof.name!r} profile reads its images from a folder "
                         f"({prof.image_folder}); pass --images DIR")  # fmt: skip
    else:
        unknown = [p for p in prof.photos if p not in PHOTOS]
        if unknown:
            raise UsageError(f"profile photos {unknown} are not shipped")
        images = {"photos": list(prof.photos)}
    n_total = len(images.get("files") or images["photos"])
    n = args.n_images or prof.n_images or n_total
    if n > n_total:
        raise UsageError(f"--n-images: {n} requested, only {n_total} images available")
    for k in ("files", "photos"):
        if k in images:
            images[k] = images[k][:n]
    if "files" in images:
        _check_files(Path(images["folder"]), images["files"])
    blocks = None
    if args.blocks is not None:
        text = args.blocks.strip()
        if text.isascii() and text.isdigit():
            if int(text) < 1:
                raise UsageError(f"--blocks: expected a number >= 1 or block names, got {text!r}")
            blocks = int(text)
        else:
            try:
                blocks = _csv(text)
            except argparse.ArgumentTypeError as err:
                raise _flag_error("--blocks", err) from None
    if not args.out.strip():  # Path("") is the current folder
        raise UsageError("--out: expected a folder name, got an empty string")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    device = args.device
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no CUDA device")
    return {"profile": prof.name, "schedule": args.schedule, "model": model, "images": images,
            "n_images": n, "methods": list(names), "method_options": options,
            "metrics": list(metrics), "blocks": blocks, "target": args.target,
            "seed": int(args.seed if args.seed is not None else prof.seed),
            "shard_size": args.shard_size, "device": device, "fast": bool(args.fast),
            "batch_size": args.batch_size}  # fmt: skip


def _check_files(folder: Path, files: list[str]) -> None:
    """The run's image files, before any work: one file per name (the images are looked up by
    name without extension, so ``a.jpg`` next to ``a.png`` would give one of them twice), and
    every file an image that can be opened (its header is read; a non-image in the middle of the
    folder, such as a macOS ``._a.png``, would otherwise stop the run after some shards)."""
    from PIL import Image

    stems: dict[str, str] = {}
    for f in files:
        other = stems.setdefault(Path(f).stem, f)
        if other != f:
            raise UsageError(f"--images: {other} and {f} share the name {Path(f).stem!r} (images "
                             "are named without their extension); rename or remove one")  # fmt: skip
    for f in files:
        try:
            with Image.open(folder / f) as im:
                im.size  # noqa: B018 - the header is read
        except (OSError, ValueError) as err:
            raise UsageError(f"--images: {folder / f} cannot be read as an image "
                             f"({type(err).__name__}: {err})") from None  # fmt: skip


def _load_images(settings: dict, model, idx: list[int]):
    """Preprocessed images ``idx`` of the run: ``(x, names)``."""
    from .data import load_photos

    im = settings["images"]
    if "files" in im:
        b = load_photos(model, folder=im["folder"], ids=[im["files"][i] for i in idx], verbose=False)
    else:
        b = load_photos(model, names=[im["photos"][i] for i in idx], verbose=False)
    return b.x, list(b.names)


def _image_digests(settings: dict, idx: list[int]) -> list[str]:
    """What identifies images ``idx`` of the run, by content: the sha256 of each file's bytes
    (a photo replaced by another of the same name and byte size differs), or of a shipped
    photo's pixels."""
    import hashlib

    import numpy as np

    from .data import PHOTOS

    im = settings["images"]
    out = []
    for i in idx:
        if "files" in im:
            data = (Path(im["folder"]) / im["files"][i]).read_bytes()
        else:
            a = np.ascontiguousarray(PHOTOS[im["photos"][i]]())
            data = repr((a.shape, str(a.dtype))).encode() + a.tobytes()
        out.append(hashlib.sha256(data).hexdigest()[:32])
    return out


def _same_on_every_rank(dist, what: dict) -> None:
    """Refuse (``UsageError``, before any work) ranks started with other arguments: every rank
    compares its run key and output folder with rank 0's (a rank with another ``--seed`` would
    otherwise compute its shards and leave them in the folder, and one with another ``--out``
    would fail after its work)."""
    if dist.backend is None:
        return
    import torch.distributed as tdist

    got: list = [None] * dist.world
    tdist.all_gather_object(got, what)
    bad = [r for r, w in enumerate(got) if w != got[0]]
    if bad:
        raise UsageError(f"ranks {bad} were started with other arguments than rank 0 (run key "
                         f"and --out: {got[bad[0]]} against {got[0]}); start every rank with the "
                         "same command")  # fmt: skip


def _run(args) -> int:
    import torch

    from .distributed import (_file_key, distributed_context, finished_shards, plan_shards,
                              run_shards, write_shard)  # fmt: skip
    from .experiment import config_key, run_randomization
    from .models import WeightsUnavailableError, get_info, load_model
    from .randomize import get_blocks
    from .spec import RunSpec
    from .utils import atomic_write, source_hash, tensor_hash

    s = _resolve(args)
    out = Path(args.out)
    with distributed_context(s["device"]) as dist:
        device = torch.device(s["device"])
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        precision = set_precision(device, s["fast"])
        say = print if dist.rank == 0 else (lambda *a, **k: None)
        try:
            model = load_model(s["model"], device=device)
        except WeightsUnavailableError as err:  # offline: a message, not a traceback
            raise UsageError(f"--model: {err}") from None
        info = get_info(model)
        try:
            x0, _ = _load_images(s, model, [0])
        except (ValueError, OSError) as err:  # a file that is not an image, or cannot be read
            raise _flag_error("--images", err) from None
        try:
            # None: every block; K: the top K (more than the model has is an error); or names
            blocks = [b.name for b in get_blocks(model, s["blocks"], x0.to(device))]
        except (ValueError, AttributeError, KeyError) as err:
            raise _flag_error("--blocks", err) from None
        # what is computed: the run specification's fields (the same as the cache's identity),
        # built once here on the first image; the images themselves are named by "images"
        label = info.name if info else s["model"]
        try:  # e.g. a method the model cannot take (attention rollout on a CNN)
            spec = RunSpec.build(model, x0.to(device), s["methods"], schedule=s["schedule"],
                                 blocks=blocks, metrics=s["metrics"], seed=s["seed"],
                                 target=s["target"], method_options=s["method_options"],
                                 store_maps=0, label=label, floor=False)  # fmt: skip
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
        run_fields = {k: v for k, v in spec.describe().items()
                      if k not in ("image_ids", "image_names", "kept", "floor", "activations")}
        config = {k: v for k, v in s.items()
                  if k in ("profile", "model", "images", "n_images", "shard_size")}
        config.update(model=label, run=run_fields, blocks=blocks, methods=s["methods"],
                      device=device.type, precision={k: v for k, v in precision.items()
                                                      if k in ("device", "tf32")},
                      sanitylib_source=source_hash(),
                      torch=torch.__version__,
                      # the weights themselves: a package upgrade between the sessions of a
                      # resumed run would otherwise mix two models' numbers in one table
                      weights=tensor_hash([*model.parameters(), *model.buffers()]))  # fmt: skip
        key = config_key(config)
        _same_on_every_rank(dist, {"key": key, "out": str(out.resolve())})
        cfile = out / "config.json"
        if cfile.exists():
            try:
                old = json.loads(cfile.read_text()).get("key")
            except (OSError, ValueError):
                old = None
            if old != key:
                raise UsageError(f"--out: {out} holds a run with another configuration (key "
                                 f"{old}, this run {key}); use another folder or delete it")
        shards = plan_shards(s["n_images"], s["shard_size"])
        results = out / "results.parquet"
        try:  # a folder without config.json may still hold another run's files
            finished_shards(out / "shards", len(shards), key)
            if results.exists() and _file_key(results) != key:
                raise ValueError(f"{results} was written by a run with another configuration "
                                 f"(this run {key}): use another output folder or delete it")
        except ValueError as err:
            raise UsageError(f"--out: {err}") from None
        dist.barrier()  # every rank checked the old record before rank 0 replaces it
        record = {"key": key, "config": config, "versions": _versions(),
                  "run": {"world_size": dist.world, "backend": dist.backend,
                          "precision": precision, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "host": platform.node()}}  # fmt: skip
        if dist.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            # an earlier merge goes until this run's merge replaces it: shards recomputed
            # because their images changed (same names, other content) must not leave it behind
            results.unlink(missing_ok=True)
            text = json.dumps(record, indent=1, default=str)
            atomic_write(cfile, lambda tmp: Path(tmp).write_text(text))
            say(f"sanitylib run: {config['model']} ({s['schedule']}, {len(blocks)} blocks), "
                f"{s['n_images']} images, methods {', '.join(s['methods'])}; key {key}")

        def compute(idx: list[int]):
            x, names = _load_images(s, model, idx)
            df = run_randomization(
                model, x.to(device), s["methods"], s["schedule"], blocks, s["metrics"],
                s["seed"], target=s["target"], method_options=s["method_options"],
                image_names=names, store_maps=0, batch_size=s["batch_size"], cache=False,
                progress=not args.quiet and dist.rank == 0, label=config["model"],
                floor=False, image_ids=idx)  # fmt: skip
            import pandas as pd

            return pd.DataFrame(df)  # the rows only: maps and floors are not part of the table

        meta = {"versions": _versions()}
        merged = run_shards(compute, shards, out / "shards",
                            key, dist, max_shards=args.max_shards, meta=meta, log=print,
                            identify=lambda idx: _image_digests(s, idx))  # fmt: skip
        if merged is None:
            return 0
        order = {m: j for j, m in enumerate(s["methods"])}
        morder = {m: j for j, m in enumerate(s["metrics"])}
        merged = merged.sort_values(
            ["stage_index", "method", "metric", "image"],
            key=lambda c: c.map(order) if c.name == "method" else
            c.map(morder) if c.name == "metric" else c, kind="stable").reset_index(drop=True)  # fmt: skip
        write_shard(merged, results, key, {"config": config})
        record["run"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record["rows"] = len(merged)
        if device.type == "cuda":  # this rank's peak, the others' similar
            record["run"]["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        text = json.dumps(record, indent=1, default=str)
        atomic_write(cfile, lambda tmp: Path(tmp).write_text(text))
        say(f"wrote {out / 'results.parquet'} ({len(merged)} rows) and {cfile}")
    return 0
