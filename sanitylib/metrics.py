"""Batched, device-agnostic similarity metrics between explanation maps (protocol section 4).

Everything works on (N, ...) batches in pure torch (CPU or CUDA) and returns one float64
value per image. Reference equivalences (checked in tests/test_metrics.py):

* ``spearman`` == ``scipy.stats.spearmanr`` (ties get average ranks),
* ``pearson`` == ``scipy.stats.pearsonr``,
* ``ssim`` == ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=True, channel_axis=-1)``,
* ``hog`` == ``skimage.feature.hog(orientations=9, pixels_per_cell=(16, 16),
  cells_per_block=(3, 3), block_norm='L2-Hys', channel_axis=-1)``.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .postprocess import (_safe_div, _sparse_span, abs_normalize, check_maps, diverging_normalize,
                          percentile_position, unit_normalize)
from .registry import Metric, _register_builtin_metric, resolve_metric
from .utils import check_seed

__all__ = ["METRICS", "METRIC_LABELS", "similarity", "rankdata", "ranks_of_sorted", "sort_rows",
           "pearson", "spearman", "is_constant", "ssim", "hog", "MapFeatures", "compare",
           "FLOOR_KINDS", "different_images_floor", "random_mask_floor", "noise_floor"]  # fmt: skip

#: The built-in metrics (registered below; :func:`sanitylib.metric_names` lists users' too).
METRICS = ("spearman_abs", "spearman", "ssim", "hog_pearson", "hog_spearman")
#: Their labels in figures.
METRIC_LABELS = {
    "spearman_abs": "Spearman (absolute)", "spearman": "Spearman (no absolute value)",
    "ssim": "SSIM", "hog_spearman": "HOG (Spearman)", "hog_pearson": "HOG (Pearson)",
}  # fmt: skip
_PREPARE = {
    "spearman_abs": abs_normalize,
    "spearman": diverging_normalize,
    "ssim": unit_normalize,
    "hog_pearson": unit_normalize,
    "hog_spearman": unit_normalize,
}
_ON_CONSTANT = ("zero", "nan", "raise")
_CHUNK_ELEMS = 1 << 24  # bound on the elements of one chunk of images


def _chunks(n_per_item: int) -> int:
    """Number of images per chunk so that one chunk holds at most ``_CHUNK_ELEMS`` elements."""
    return max(1, _CHUNK_ELEMS // max(1, n_per_item))


def _check_pair(a: Tensor, b: Tensor, ndims: tuple[int, ...] = (3, 4)) -> None:
    """Validate two map batches: finite floating tensors of equal shape with ndim in ``ndims``."""
    check_maps(a, "a", ndims)
    check_maps(b, "b", ndims)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------- correlations
def _check_rows(x: Tensor, name: str, fn: str) -> None:
    """``ValueError`` unless ``x`` is a 2-D ``(N, D)`` tensor.  (Finite values are checked on
    the results, without a pass of torch's thread pool: :func:`rankdata` on the sorted ends,
    :func:`pearson` on the correlations; a forked child must not wait on its parent's pool.)"""
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a 2-D (N, D) tensor, got {shape}")


def _non_finite(fn: str, what: str) -> ValueError:
    # NaN has no rank (it was ranked above every number) and no correlation
    return ValueError(f"{fn}: {what} contains NaN or infinite values")


def is_constant(x: Tensor) -> Tensor:
    """True for each row of ``x`` (N, D) whose values are all equal -> (N,) bool."""
    return (x == x[:, :1]).all(1)


#: Values per row from which the CPU paths below work one row at a time, so that a row's
#: values, keys and indices stay in the core's cache (several times faster on 224x224 maps
#: than whole-array operations); shorter rows are handled all at once.
_ROW_MIN = 1 << 12


def _radix_order(x: np.ndarray, order: np.ndarray) -> None:
    """The sort order of one float32 row (stable) by a two-pass LSD radix sort: numpy's stable
    sort of 16-bit integers is a radix sort, applied to the low and then the high half of each
    value's order-preserving 32-bit key.  Finite values; -0.0 and 0.0 get the same key."""
    u = (x + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 is +0.0
    key = u ^ np.where(u >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    low = np.argsort(key.astype(np.uint16), kind="stable")
    high = np.argsort((key >> 16).astype(np.uint16).take(low), kind="stable")
    np.take(low, high, out=order)


def _argsort_rows(xn: np.ndarray, order: np.ndarray, values: np.ndarray) -> None:
    """Sort order and sorted values of a block of rows, written into ``order`` and ``values``."""
    if xn.shape[1] < _ROW_MIN:
        order[...] = np.argsort(xn, axis=1)
        values[...] = np.take_along_axis(xn, order, axis=1)
        return
    for x, o, v in zip(xn, order, values):
        if x.dtype == np.float32:
            _radix_order(x, o)
        else:
            o[...] = np.argsort(x)
        np.take(x, o, out=v)


def _sorted_ranks(new: np.ndarray, d: int) -> np.ndarray:
    """Average rank of each sorted element, from ``new`` (flat bool over rows of length ``d``,
    True at the first element of each tie group; groups never span rows)."""
    start = np.flatnonzero(new)  # flat position of each group's first element
    count = np.diff(start, append=new.size)
    return ((start % d) + (count + 1) / 2.0)[np.cumsum(new) - 1]  # mean of ranks start+1..start+count


def _ranks_rows(s: np.ndarray, order: np.ndarray, out: np.ndarray) -> None:
    """:func:`ranks_of_sorted` of a block of rows in numpy, written into ``out`` (float64)."""
    n, d = s.shape
    steps = np.arange(1.0, d + 1.0)  # no ties: the rank of the k-th smallest value is k
    if d >= _ROW_MIN:
        new = np.ones(d, dtype=bool)
        for si, oi, ri in zip(s, order, out):
            np.not_equal(si[1:], si[:-1], out=new[1:])  # first element of each tie group
            ri[oi] = steps if new.all() else _sorted_ranks(new, d)
        return
    new = np.ones((n, d), dtype=bool)
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])
    ranks = np.broadcast_to(steps, (n, d)) if new.all() else _sorted_ranks(new.ravel(), d).reshape(n, d)
    np.put_along_axis(out, order, ranks, axis=1)


def _pearson_rows(x: np.ndarray, y: np.ndarray, r: np.ndarray, const: np.ndarray) -> None:
    """Pearson correlation of long float64 rows, one row at a time (:func:`pearson`'s CPU
    path): ``r`` the correlations (0.0 where undefined), ``const`` whether a row of ``x`` or
    ``y`` is constant or a centered row is zero.  Sums by numpy's pairwise summation, not BLAS
    (``np.dot`` wakes the BLAS library's threads, which then spin and slow down the passes)."""
    for i, (a, b) in enumerate(zip(x, y)):
        ac, bc = a - a.mean(), b - b.mean()
        den = math.sqrt(np.square(ac).sum() * np.square(bc).sum())
        const[i] = den == 0 or bool((a == a[0]).all()) or bool((b == b[0]).all())
        r[i] = 0.0 if const[i] else np.multiply(ac, bc, out=ac).sum() / den


_POOL: dict[tuple[int, int], object] = {}
_PARALLEL_MIN = 1 << 17  # elements; below this a thread hand-off costs more than it saves


def _by_rows(fn: Callable, *arrays: np.ndarray) -> None:
    """``fn(*arrays)`` on blocks of rows, split over ``torch.get_num_threads()`` threads when the
    arrays are large (numpy's sorts and most of its array operations run without the GIL), as
    torch's own operations would use them; serial otherwise."""
    n = len(arrays[0])
    k = min(torch.get_num_threads(), n)
    if k < 2 or arrays[0].size < _PARALLEL_MIN:
        fn(*arrays)
        return
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), k)  # a forked child gets a pool of its own (its parent's threads are gone)
    pool = _POOL.get(key)
    if pool is None:  # one private pool per process and thread count, reused (no global state)
        pool = _POOL[key] = ThreadPoolExecutor(k - 1, thread_name_prefix="sanitylib-rows")
    cuts = np.linspace(0, n, k + 1).astype(int)
    parts = [[a[lo:hi] for a in arrays] for lo, hi in zip(cuts[:-1], cuts[1:])]
    futures = [pool.submit(fn, *p) for p in parts[1:]]
    fn(*parts[0])
    for f in futures:
        f.result()


def sort_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x.sort(dim=1)`` of a finite (N, D) tensor -> (values, indices); the order of equal
    values is unspecified.  On the CPU in numpy: long float32 rows (``D >= 4096``) one at a
    time by a radix sort of their 32-bit keys (:func:`_radix_order`), other rows by numpy's
    ``argsort``; large inputs are split by rows over the torch threads.  Measured on an AMD
    EPYC, one thread, (8, 50176) float32: 0.72 ms per row (numpy's ``argsort`` with the gather
    of the values 2.5 ms, ``torch.sort`` 3.7 ms)."""
    if x.device.type != "cpu" or x.requires_grad:
        return x.sort(dim=1)
    xn = x.detach().contiguous().numpy()
    order = np.empty(xn.shape, dtype=np.int64)
    values = np.empty_like(xn)
    _by_rows(_argsort_rows, xn, order, values)
    return torch.from_numpy(values), torch.from_numpy(order)


def rankdata(x: Tensor) -> Tensor:
    """Average ranks (1-based, ties averaged, like ``scipy.stats.rankdata``) per row of (N, D) -> float64."""
    _check_rows(x, "x", "rankdata")
    s, order = sort_rows(_upcast_half(x))
    # NaN and infinities sort to an end (NaN with its sign bit set below -inf)
    if s.is_floating_point() and s.numel() and not bool(torch.isfinite(s[:, [0, -1]]).all()):
        raise _non_finite("rankdata", "x")
    return ranks_of_sorted(s, order)


def ranks_of_sorted(s: Tensor, order: Tensor) -> Tensor:
    """Average ranks (as :func:`rankdata`) from rows sorted by :func:`sort_rows`: the sorted
    values ``s`` (N, D) and the sort order -> (N, D) float64.  On the CPU computed in numpy,
    split by rows over the torch threads like :func:`sort_rows`."""
    n, d = s.shape
    if s.device.type == "cpu" and not s.requires_grad:
        out = np.empty((n, d), dtype=np.float64)
        _by_rows(_ranks_rows, s.detach().contiguous().numpy(), order.contiguous().numpy(), out)
        return torch.from_numpy(out)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # first element of each tie group (groups never span rows)
    flat = new.flatten()
    group = flat.cumsum(0) - 1  # global tie-group id of each sorted element
    start = flat.nonzero().squeeze(1)  # flat position of each group's first element
    count = torch.diff(start, append=start.new_tensor([n * d]))
    avg = (start % d).double() + (count + 1).double() / 2  # mean of ranks start+1 .. start+count
    return torch.empty(n, d, dtype=torch.float64, device=s.device).scatter_(1, order, avg[group].view(n, d))


def _apply_policy(r: Tensor, const: Tensor, on_constant: str) -> Tensor:
    """Replace correlations of rows flagged in ``const`` according to the constant-map policy."""
    if on_constant not in _ON_CONSTANT:
        raise ValueError(f"on_constant must be one of {_ON_CONSTANT}, got {on_constant!r}")
    if not const.any():
        return r
    if on_constant == "raise":
        idx = const.nonzero().flatten().tolist()
        raise ValueError(f"correlation undefined: constant map/vector at images {idx[:20]} "
                         f"({len(idx)} of {len(const)}); use on_constant='zero' or 'nan'")
    return r.masked_fill(const, 0.0 if on_constant == "zero" else math.nan)


def pearson(x: Tensor, y: Tensor, *, on_constant: str = "zero") -> Tensor:
    """Pearson correlation of matching rows of ``x``, ``y`` (N, D) -> (N,) float64.

    A row that is constant in ``x`` or ``y`` has no defined correlation (scipy gives nan):
    ``on_constant='zero'`` returns 0.0 for it, ``'nan'`` returns NaN, ``'raise'`` raises.
    """
    _check_rows(x, "x", "pearson")
    _check_rows(y, "y", "pearson")
    if x.shape != y.shape:
        raise ValueError(f"pearson expects two (N, D) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    on_cpu = x.device.type == "cpu" and y.device.type == "cpu"
    if on_cpu and not (x.requires_grad or y.requires_grad) and x.shape[1] >= _ROW_MIN:
        r, const = np.empty(len(x)), np.empty(len(x), dtype=bool)
        _by_rows(_pearson_rows, x.contiguous().numpy(), y.contiguous().numpy(), r, const)
        r, const = torch.from_numpy(r), torch.from_numpy(const)
    else:
        xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        den = (xc.square().sum(1) * yc.square().sum(1)).sqrt()
        const = is_constant(x) | is_constant(y) | (den == 0)
        r = (xc * yc).sum(1) / torch.where(const, torch.ones_like(den), den)
    if bool((r.isnan() & ~const).any()):  # a NaN or an infinity in the row
        raise _non_finite("pearson", "x or y")
    return _apply_policy(r.clamp(-1.0, 1.0), const, on_constant)


def spearman(x: Tensor, y: Tensor, *, on_constant: str = "zero") -> Tensor:
    """Spearman rank correlation (average ranks for ties) of matching rows (N, D) -> (N,) float64.

    Constant rows follow the ``on_constant`` policy of :func:`pearson`.
    """
    _check_rows(x, "x", "spearman")
    _check_rows(y, "y", "spearman")
    if x.shape != y.shape:
        raise ValueError(f"spearman expects two (N, D) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return pearson(rankdata(x), rankdata(y), on_constant=on_constant)


# ----------------------------------------------------------------------------- SSIM
def _gaussian_window(sigma: float, truncate: float, device: torch.device) -> Tensor:
    """1-D normalized Gaussian taps as in ``scipy.ndimage.gaussian_filter`` (radius int(truncate*sigma+0.5))."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(a: Tensor, b: Tensor, *, data_range: float = 2.0, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of maps (N, H, W) or (N, C, H, W) -> (N,) float64 (channel mean of per-channel SSIM).

    Equals skimage ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=True, data_range=...)``: 11x11 Gaussian window (truncate 3.5),
    K1=0.01, K2=0.03, sample covariance NP/(NP-1), and the mean over the image with a
    5-pixel border cropped, which is exactly a 'valid' convolution.
    """
    _check_pair(a, b)
    for name, v in (("data_range", data_range), ("sigma", sigma)):  # 0 or NaN: NaN scores
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"ssim: {name} must be a finite number > 0, got {v!r}")
    if a.ndim == 3:
        a, b = a[:, None], b[:, None]
    c, h, w = a.shape[1:]
    win = _gaussian_window(sigma, 3.5, a.device)
    k = win.numel()
    if min(h, w) < k:
        raise ValueError(f"SSIM needs maps of at least {k}x{k} pixels, got {h}x{w}")
    cov_norm = k * k / (k * k - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    kh, kw = win.view(1, 1, k, 1), win.view(1, 1, 1, k)
    out = []
    for xa, xb in zip(a.split(_chunks(5 * c * h * w)), b.split(_chunks(5 * c * h * w))):
        x, y = xa.double().flatten(0, 1)[:, None], xb.double().flatten(0, 1)[:, None]
        stats = F.conv2d(F.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1).flatten(0, 1)[:, None], kh), kw)
        ux, uy, uxx, uyy, uxy = stats.view(-1, 5, h - k + 1, w - k + 1).unbind(1)
        vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        out.append(s.flatten(1).mean(1).view(-1, c).mean(1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- HOG
def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences with zero borders along rows and columns of (..., H, W)."""
    g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    return g_row, g_col


def _strongest_channel(g_row: Tensor, g_col: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel, the gradient ``(N, H, W)`` of the channel with the largest magnitude (the first
    one on ties, as ``argmax``); selected by comparisons, because ``argmax`` over the channel
    dimension of ``(N, C, H, W)`` is ~15x slower on the CPU."""
    r, c = g_row[:, 0], g_col[:, 0]
    if g_row.shape[1] == 1:
        return r, c
    mag = torch.hypot(g_row, g_col)
    best = mag[:, 0]
    for i in range(1, g_row.shape[1]):
        better = mag[:, i] > best
        r, c = torch.where(better, g_row[:, i], r), torch.where(better, g_col[:, i], c)
        best = torch.where(better, mag[:, i], best)
    return r, c


def hog(maps: Tensor, *, orientations: int = 9, cell: int = 16, block: int = 3) -> Tensor:
    """HOG feature vectors of maps (N, H, W) or (N, C, H, W) -> (N, D) float64.

    Same values and order as skimage ``hog(img, orientations=9, pixels_per_cell=(16, 16),
    cells_per_block=(3, 3), block_norm='L2-Hys', channel_axis=-1)`` on (H, W, C) images:
    per pixel the channel with the largest gradient magnitude, orientation in [0, 180) hard-binned,
    cells are non-overlapping tiles from the origin (remainder pixels ignored), cell value =
    magnitude sum / cell area, 3x3-cell blocks with stride 1, L2-Hys (eps 1e-5, clip 0.2).
    """
    check_maps(maps, "maps", (3, 4))
    x = _upcast_half(maps[:, None] if maps.ndim == 3 else maps)  # skimage computes these in float32
    c, h, w = x.shape[1:]
    nr, nc = h // cell, w // cell
    if nr < block or nc < block:
        raise ValueError(f"HOG needs maps of at least {block * cell}x{block * cell} pixels, got {h}x{w}")
    edges = torch.arange(1, orientations, dtype=torch.float64, device=x.device) * (180.0 / orientations)
    cell_id = torch.arange(nr * nc, device=x.device).view(nr, 1, nc, 1).expand(nr, cell, nc, cell)
    cell_id = cell_id.reshape(1, -1) * (orientations + 1)
    out = []
    for chunk in x.split(_chunks(4 * c * h * w)):
        g_row, g_col = _strongest_channel(*_gradients(chunk))  # in the input dtype, as skimage
        g_row, g_col = (g[:, : nr * cell, : nc * cell].double() for g in (g_row, g_col))
        mag = torch.hypot(g_row, g_col)
        ori = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
        # bin i holds [edge_i, edge_{i+1}); an orientation rounded to 180.0 falls in the dropped bin 9
        bins = torch.bucketize(ori, edges, right=True) + (ori >= 180.0).long()
        idx = cell_id + bins.reshape(len(chunk), -1)
        hist = torch.zeros(len(chunk), nr * nc * (orientations + 1), dtype=torch.float64, device=x.device)
        hist.scatter_add_(1, idx, mag.reshape(len(chunk), -1))
        hist = hist.view(-1, nr, nc, orientations + 1)[..., :orientations] / (cell * cell)
        blocks = hist.unfold(1, block, 1).unfold(2, block, 1).permute(0, 1, 2, 4, 5, 3)
        blocks = blocks.reshape(len(chunk), -1, block * block * orientations)
        eps = 1e-5
        v = blocks / (blocks.square().sum(-1, keepdim=True) + eps**2).sqrt()
        v = v.clamp(max=0.2)
        v = v / (v.square().sum(-1, keepdim=True) + eps**2).sqrt()
        out.append(v.flatten(1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- public entry point
def _upcast_half(maps: Tensor) -> Tensor:
    """bfloat16 and float16 maps (a half-precision model's) as float32, which holds them
    exactly: the ranks, the correlations and SSIM's filters run in numpy and scipy, which have
    no bfloat16, and the normalizations and HOG's gradients in float16 would round (skimage's
    HOG works in float32 or more; HOG values moved by up to 2e-2)."""
    return maps.float() if maps.dtype in (torch.bfloat16, torch.float16) else maps


def similarity(
    a: Tensor,
    b: Tensor,
    metric: str,
    *,
    normalize: bool = True,
    on_constant: str = "zero",
    ssim_data_range: float = 2.0,
) -> Tensor:
    """Per-image similarity of two batches of maps -> (N,) float64.

    ``normalize=True``: ``a``, ``b`` are raw maps (N, C, H, W) and the paper's post-processing
    is applied first ("spearman_abs": abs_normalize, "spearman": diverging_normalize, "ssim" /
    "hog_*": unit_normalize). ``normalize=False``: prepared maps (N, H, W) or (N, C, H, W).

    Metrics: Spearman over all pixels ("spearman_abs", "spearman"); SSIM ("ssim");
    Pearson ("hog_pearson", paper text) or Spearman ("hog_spearman", authors' code) of HOG
    vectors. ``on_constant`` ('zero' | 'nan' | 'raise') decides the correlation of a constant
    map or HOG vector, which is undefined: 'zero' (default) means "no shared rank information".
    A user metric (registered name, callable ``metric(a, b) -> (N,)`` or
    :class:`sanitylib.Metric`) is called on the maps as given.
    ``ssim_data_range`` defaults to 2.0, which reproduces the authors' code: skimage 0.15
    inferred data_range 2.0 (= 1 - (-1)) for float images; 1.0 is the principled value for
    [0, 1] maps.
    """
    if on_constant not in _ON_CONSTANT:
        raise ValueError(f"on_constant must be one of {_ON_CONSTANT}, got {on_constant!r}")
    if not (isinstance(metric, str) and metric in METRICS):
        spec = resolve_metric(metric)  # a user metric (registered name, callable or Metric)
        if spec.builtin:
            return similarity(a, b, spec.name, normalize=normalize, on_constant=on_constant,
                              ssim_data_range=ssim_data_range)
        if on_constant != "zero" or ssim_data_range != 2.0:  # they were ignored, silently
            raise ValueError(f"on_constant and ssim_data_range apply to the built-in metrics; "
                             f"{spec.name!r} is called on the maps as given")
        _check_pair(a, b, (4,) if normalize else (3, 4))
        return spec(a, b)
    _check_pair(a, b, (4,) if normalize else (3, 4))
    a, b = _upcast_half(a), _upcast_half(b)
    if normalize:
        a, b = _PREPARE[metric](a), _PREPARE[metric](b)
    if metric == "ssim":
        return ssim(a, b, data_range=ssim_data_range)
    if metric.startswith("hog"):
        a, b = hog(a), hog(b)
    corr = pearson if metric == "hog_pearson" else spearman
    step = _chunks(a[0].numel())
    r = torch.cat([corr(x.flatten(1), y.flatten(1), on_constant="nan")  # NaN <=> constant (inputs are finite)
                   for x, y in zip(a.split(step), b.split(step))])
    return _apply_policy(r, r.isnan(), on_constant)


# ----------------------------------------------------------------------------- features


class MapFeatures:
    """Post-processed forms of a batch of raw maps ``(N, C, H, W)``, computed once and cached,
    so that the trained model's maps are prepared once per run and not once per stage.

    The paper's normalizations are monotone, so one sort per map gives both the 99th
    percentile and the ranks (``abs_normalize`` followed by ``rankdata`` would sort twice).
    Every value equals :func:`sanitylib.metrics.similarity`'s (``tests/test_engine.py``)."""

    def __init__(self, maps: Tensor) -> None:
        check_maps(maps, "maps", (4,))  # (N, H, W) read H as the channels, silently
        self.maps = _upcast_half(maps)
        self._cache: dict[str, object] = {}

    def _get(self, key: str, fn: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def abs_ranks(self) -> tuple[Tensor, Tensor]:
        """Ranks ``(N, H*W)`` of ``abs_normalize(maps)`` and whether each map is constant."""
        return self._get("abs", lambda: _normalized_ranks(self.maps, "abs"))

    def abs_constant(self) -> Tensor:
        """``is_constant(abs_normalize(maps).flatten(1))`` -> (N,) bool, without a sort unless
        the ranks are cached anyway: the ABS map is constant iff the map of ``|E|`` (summed
        over channels) is (a sparse map keeps its salient pixels: :func:`abs_normalize`)."""
        if "abs" in self._cache:
            return self.abs_ranks()[1]

        def make():
            v = self.maps.abs().sum(1).flatten(1)  # C == 1: |E| itself
            return v.amin(1) == v.amax(1)
        return self._get("abs_const", make)

    def constant(self, metric: str) -> Tensor:
        """Whether ``metric``'s correlation is undefined for each map -> (N,) bool: the ranks
        or HOG vector it correlates are constant (:func:`compare` scores such a row 0).  SSIM and
        users' metrics: never."""
        if metric == "spearman_abs":
            return self.abs_constant()
        if metric in _FEATURE_OF and metric != "ssim":
            v = _FEATURE_OF[metric](self)
            return v.amin(1) == v.amax(1)
        return torch.zeros(len(self.maps), dtype=torch.bool, device=self.maps.device)

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

    def prepare(self, metrics: Sequence[str]) -> "MapFeatures":
        """Compute now what :func:`compare` needs for the built-in ``metrics`` (and the ABS
        maps' constancy); other names are skipped.  Returns ``self``."""
        self.abs_constant()
        for name in metrics:
            if name in _FEATURE_OF:
                _FEATURE_OF[name](self)
        return self

    def repeat(self, n: int) -> "MapFeatures":
        """The features of ``n`` copies of the maps one after the other, ``(n * N, C, H, W)``:
        the maps and every feature computed so far tiled (copied), not computed again; a
        feature not computed yet is computed on the tiled maps.  ``n == 1`` returns ``self``."""
        if n == 1:
            return self

        def tiled(v):
            if isinstance(v, tuple):
                return tuple(tiled(t) for t in v)
            return v.repeat(n, *([1] * (v.ndim - 1)))

        out = MapFeatures.__new__(MapFeatures)  # the maps were checked when self was made
        out.maps = tiled(self.maps)
        out._cache = {key: tiled(v) for key, v in self._cache.items()}
        return out


#: What each built-in metric reads from :class:`MapFeatures`: :func:`compare` correlates it
#: (Pearson; SSIM combines its terms instead) and :meth:`MapFeatures.prepare` computes it.
_FEATURE_OF: dict[str, Callable[[MapFeatures], object]] = {
    "spearman_abs": lambda f: f.abs_ranks()[0], "spearman": MapFeatures.div_ranks,
    "ssim": MapFeatures.ssim_stats, "hog_pearson": MapFeatures.hog,
    "hog_spearman": MapFeatures.hog_ranks,
}  # fmt: skip


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
        lo, hi, frac = percentile_position(s.shape[1], percentile)
        q = s[:, lo] + frac * (s[:, hi] - s[:, lo])  # == row_quantile(v, percentile)
        if kind == "abs":
            mn = s[:, 0]
            span = _sparse_span(q - mn, s[:, -1] - mn)
            vals = _safe_div(s - mn.view(-1, 1), span, 0.0).clamp(0.0, 1.0)
        else:
            span = _sparse_span(q.abs(), torch.maximum(s[:, 0].abs(), s[:, -1].abs()))
            vals = _safe_div(s + span.view(-1, 1), 2 * span, 0.5).clamp(-1.0, 1.0)
    return ranks_of_sorted(vals, order), vals[:, 0] == vals[:, -1]


_SSIM_WIN = 11  # skimage's Gaussian window: sigma 1.5, truncate 3.5
_SSIM_COV_NORM = _SSIM_WIN**2 / (_SSIM_WIN**2 - 1)  # sample covariance


def _gauss_valid(u: Tensor, sigma: float = 1.5) -> Tensor:
    """SSIM's Gaussian window (11 taps, truncate 3.5) over ``(M, H, W)`` float64 maps, 'valid'
    region; scipy's C filter on the CPU (much faster than float64 convolutions in torch), the
    maps split over the torch threads (scipy's filter runs without the GIL; each map is filtered
    alone, so the values do not depend on the split: 2 threads halved the time of 27 maps of
    224x224)."""
    win = _gaussian_window(sigma, 3.5, u.device)
    k, r = win.numel(), win.numel() // 2
    if u.device.type == "cpu":
        un = u.contiguous().numpy()
        out = np.empty((un.shape[0], un.shape[1] - 2 * r, un.shape[2] - 2 * r), dtype=un.dtype)
        _by_rows(functools.partial(_gauss_rows, win=win.numpy()), un, out)
        return torch.from_numpy(out)
    return F.conv2d(F.conv2d(u[:, None], win.view(1, 1, k, 1)), win.view(1, 1, 1, k))[:, 0]


def _gauss_rows(u: np.ndarray, out: np.ndarray, win: np.ndarray) -> None:
    """:func:`_gauss_valid` of the maps ``u`` (M, H, W) into ``out`` (one block of rows)."""
    from scipy.ndimage import correlate1d

    r = len(win) // 2
    a = correlate1d(u, win, axis=1, mode="constant")[:, r:-r]
    out[...] = correlate1d(a, win, axis=2, mode="constant")[:, :, r:-r]


def ssim_features(fa: MapFeatures, fb: MapFeatures, data_range: float = 2.0) -> Tensor:
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
    """:func:`similarity` ``(a, b, metric)`` (defaults) of a built-in metric from the maps'
    :class:`MapFeatures` -> (N,) float64."""
    if metric == "ssim":
        return ssim_features(fa, fb)
    if metric in _FEATURE_OF:  # Spearman of the ranks, or Pearson / Spearman of the HOG vectors
        feature = _FEATURE_OF[metric]
        return pearson(feature(fa), feature(fb), on_constant="zero")
    raise ValueError(f"compare() takes a built-in metric ({', '.join(METRICS)}), got {metric!r}")


def _builtin_metric(name: str) -> Metric:
    def compare_maps(a: Tensor, b: Tensor) -> Tensor:
        return similarity(a, b, name)

    compare_maps.__qualname__ = f"similarity[{name}]"
    return _register_builtin_metric(Metric(name, None, compare_maps, METRIC_LABELS[name], True,
                                           min_size=_MIN_SIZE.get(name, 0)))


#: The smallest maps each built-in metric takes: HOG's default 3x3-cell blocks of 16-pixel cells
#: (:func:`hog`), SSIM's 11-pixel Gaussian window (:func:`ssim`).
_MIN_SIZE = {"hog_pearson": 3 * 16, "hog_spearman": 3 * 16, "ssim": _SSIM_WIN}


for _name in METRICS:
    _builtin_metric(_name)


# ----------------------------------------------------------------------------- noise floors
FLOOR_KINDS = ("different images", "random masks")


def different_images_floor(maps: Tensor, metric: str, *, on_constant: str = "zero") -> Tensor:
    """Similarity of the maps of *different* images under one model: every unordered pair
    ``(i, j)``, ``i < j``, of the ``(N, C, H, W)`` raw maps -> ``(N*(N-1)/2,)`` float64.

    This is what "unrelated maps" score for this method and metric on these images (maps
    share a centre bias, a frame or an image-independent pattern); a randomized model's map
    is only "as dissimilar as it gets" when it scores near this floor.
    """
    check_maps(maps, "maps", (4,))
    if len(maps) < 2:
        raise ValueError("the different-images floor needs maps of at least 2 images")
    i, j = torch.triu_indices(len(maps), len(maps), offset=1, device=maps.device)
    return similarity(maps[i], maps[j], metric, on_constant=on_constant)


def random_mask_floor(shape: tuple[int, ...], metric: str, *, n: int = 16, kind: str = "gaussian",
                      seed: int = 0, device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Similarity of ``n`` pairs of independent random masks of map shape ``(C, H, W)`` -> ``(n,)``.

    The paper's calibration (App. B): two Gaussian (``kind="gaussian"``) or uniform [-1, 1]
    (``kind="uniform"``) masks, post-processed like maps.  The masks come from a generator
    seeded with ``seed``, never the global RNG.
    """
    if kind not in ("gaussian", "uniform"):
        raise ValueError(f"kind must be 'gaussian' or 'uniform', got {kind!r}")
    if len(shape) != 3:
        raise ValueError(f"shape must be a map shape (C, H, W), got {tuple(shape)}")
    if n < 1:
        raise ValueError("n must be >= 1")
    check_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (2, n, *shape)
    if kind == "gaussian":
        masks = torch.randn(size, generator=gen, device=device)
    else:
        masks = torch.rand(size, generator=gen, device=device) * 2 - 1
    return similarity(masks[0], masks[1], metric)


def noise_floor(maps: dict[str, Tensor], metrics: Sequence[str], *, seed: int = 0,
                n_masks: int = 16) -> "pd.DataFrame":  # fmt: skip
    """Both noise floors as a tidy table with columns ``kind, method, metric, pair, value``.

    ``metrics``: names, callables or :class:`sanitylib.Metric` s.
    ``maps`` is ``{method: (N, C, H, W)}`` of the *trained* model (N >= 2): the
    ``"different images"`` floor has one row per image pair and method; the ``"random masks"``
    floor has ``n_masks`` rows per metric, with ``method`` set to ``"random masks"``, of masks
    shaped as the maps with the most channels (e.g. ``(3, H, W)`` next to GradCAM's
    ``(1, H, W)``), whatever the order of ``maps``.
    """
    import pandas as pd

    check_seed(seed)
    metrics = [m if isinstance(m, str) else resolve_metric(m) for m in metrics]
    rows = []
    shape = None
    for method, m in maps.items():
        # the masks' (C, H, W): the most channels (the last method's shape, as before, made the
        # floor depend on the order of maps)
        shape = max(shape or (), tuple(m.shape[1:]))
        for metric in metrics:
            name = metric if isinstance(metric, str) else metric.name
            for p, v in enumerate(different_images_floor(m.float(), metric).tolist()):
                rows.append({"kind": FLOOR_KINDS[0], "method": method, "metric": name,
                             "pair": p, "value": float(v)})  # fmt: skip
    if shape is None:
        raise ValueError("maps must not be empty")
    for metric in metrics:
        vals = random_mask_floor(shape, metric, n=n_masks, seed=seed)
        name = metric if isinstance(metric, str) else metric.name
        rows += [{"kind": FLOOR_KINDS[1], "method": "random masks", "metric": name, "pair": p,
                  "value": float(v)} for p, v in enumerate(vals.tolist())]  # fmt: skip
    return pd.DataFrame(rows)


def floor_mean(floor: "pd.DataFrame | None", method: str, metric: str,
               kind: str = FLOOR_KINDS[0]) -> float:  # fmt: skip
    """Mean of one method's and metric's rows of a :func:`noise_floor` table (``kind``: one of
    :data:`FLOOR_KINDS`; default the ``"different images"`` floor); NaN when ``floor`` is
    ``None`` or has no such rows."""
    if kind not in FLOOR_KINDS:
        raise ValueError(f"kind must be one of {FLOOR_KINDS}, got {kind!r}")
    if floor is None:
        return math.nan
    sel = floor[(floor["kind"] == kind) & (floor["method"] == method)
                & (floor["metric"] == metric)]["value"]  # fmt: skip
    return float(sel.mean()) if len(sel) else math.nan


__all__.append("floor_mean")
