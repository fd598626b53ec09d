"""The paper's post-processing of raw explanation maps (protocol section 4).

Raw maps are batches ``(N, C, H, W)`` (C=3 for ImageNet, C=1 for MNIST). All
functions are pure torch, batched over N and device-agnostic; degenerate
(constant / all-zero) images get a documented finite value, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_maps", "row_quantile", "abs_normalize", "diverging_normalize", "unit_normalize"]

_MAX_SORT_ELEMS = 1 << 24  # elements sorted at once by row_quantile


def check_maps(maps: Tensor, name: str = "maps", ndims: tuple[int, ...] = (4,)) -> None:
    """Raise ``ValueError`` unless ``maps`` is a finite floating tensor with ndim in ``ndims``.

    Raw explanation maps must be 4-D ``(N, C, H, W)`` (the default).
    """
    if not isinstance(maps, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want} ((N, C, H, W) for raw maps), got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {maps.dtype}")
    if maps.shape[0] == 0 or maps[0].numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(maps.shape)}")
    if bool(torch.isfinite(maps.sum())):  # a finite sum proves every value finite (one pass)
        return
    for bad, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
        per_image = test(maps).flatten(1).any(1)
        if per_image.any():
            n, idx = int(per_image.sum()), per_image.nonzero().flatten()[:10].tolist()
            raise ValueError(
                f"{name} contains {bad} values: {n} of {maps.shape[0]} images (indices {idx})"
            )


def percentile_position(d: int, q: float) -> tuple[int, int, float]:
    """Where percentile ``q`` in [0, 100] of ``d`` sorted values lies, with linear interpolation
    (``numpy.percentile``'s default): ``s[lo] + frac * (s[hi] - s[lo])``."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = q / 100.0 * (d - 1)
    lo = int(pos)
    return lo, min(lo + 1, d - 1), pos - lo


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row percentile ``q`` in [0, 100] of ``x`` (N, D) -> (N,).

    Linear interpolation, identical to ``numpy.percentile`` / ``torch.quantile``; sort-based
    and chunked over rows, so it has no input-size limit.
    """
    d = x.shape[1]
    lo, hi, frac = percentile_position(d, q)
    out = []
    for chunk in x.split(max(1, _MAX_SORT_ELEMS // d)):
        s = chunk.sort(dim=1).values
        out.append(s[:, lo] + frac * (s[:, hi] - s[:, lo]))
    return torch.cat(out)


def _safe_div(num: Tensor, den: Tensor, fill: float) -> Tensor:
    """``num / den`` broadcast over (N, ...) with ``fill`` wherever ``den == 0`` (den: (N,))."""
    den = den.view(-1, *([1] * (num.ndim - 1)))
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, fill))


def _max_abs_normalize(e: Tensor) -> Tensor:
    """``E / max|E|`` per image for (N, H, W); all-zero images -> zeros."""
    return _safe_div(e, e.abs().flatten(1).amax(1), 0.0)


def _sparse_span(span: Tensor, peak: Tensor) -> Tensor:
    """The percentile span, or ``peak`` where the span is 0 but the map is not constant: a
    sparse map (at least 99 % of its pixels at the minimum, e.g. Guided GradCAM where the CAM is
    zero almost everywhere) keeps its salient pixels instead of being erased to a constant (the
    authors' formula divides by 0 there)."""
    return torch.where(span == 0, peak, span)


def abs_normalize(maps: Tensor, percentile: float = 99.0) -> Tensor:
    """ABS normalization (Spearman ABS, grey visualizations): (N, C, H, W) -> (N, H, W) in [0, 1].

    C > 1: ``m = sum_c |E_c|``, then ``(m - min) / (p99 - min)`` clipped to [0, 1] per image,
    so the top 1 % become ties at 1; where ``p99 == min`` (a sparse map) ``max`` takes the
    place of ``p99``. C == 1: ``|E| / max|E|``.  An all-zero image, and for C > 1 a constant
    one, maps to all zeros (C == 1: a constant non-zero image maps to all ones).
    """
    check_maps(maps)
    if maps.shape[1] == 1:
        return _max_abs_normalize(maps[:, 0].abs())
    m = maps.abs().sum(1)
    flat = m.flatten(1)
    mn = flat.amin(1)
    span = _sparse_span(row_quantile(flat, percentile) - mn, flat.amax(1) - mn)
    return _safe_div(m - mn.view(-1, 1, 1), span, 0.0).clamp(0.0, 1.0)


def diverging_normalize(maps: Tensor, percentile: float = 99.0) -> Tensor:
    """Diverging normalization (Spearman without ABS): (N, C, H, W) -> (N, H, W).

    C > 1: ``s = sum_c E_c``, ``span = |p99(s)|`` (percentile of the signed values), output
    ``clip((s + span) / (2 span), -1, 1)``; where ``p99(s) == 0`` (a sparse map) ``max|s|``
    takes its place; an all-zero image gets the neutral value 0.5 everywhere.
    C == 1: ``E / max|E|`` in [-1, 1]; an all-zero image maps to zeros.
    """
    check_maps(maps)
    if maps.shape[1] == 1:
        return _max_abs_normalize(maps[:, 0])
    s = maps.sum(1)
    flat = s.flatten(1)
    span = _sparse_span(row_quantile(flat, percentile).abs(), flat.abs().amax(1))
    sp = span.view(-1, 1, 1)
    return _safe_div(s + sp, 2 * span, 0.5).clamp(-1.0, 1.0)


def unit_normalize(maps: Tensor) -> Tensor:
    """0-1 normalization (input to SSIM and HOG): (N, C, H, W) -> (N, C, H, W) in [0, 1].

    Global per-image min-max over all channels together (no absolute value).
    A constant image maps to zeros.
    """
    check_maps(maps)
    flat = maps.flatten(1)
    mn, mx = flat.amin(1), flat.amax(1)
    return _safe_div(maps - mn.view(-1, 1, 1, 1), mx - mn, 0.0)
