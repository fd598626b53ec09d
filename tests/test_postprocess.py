"""Tests for sanitylib.postprocess against numpy ports of the paper's normalizations."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data, transform

from reference import ref_abs, ref_div, ref_unit, to_t
from sanitylib import postprocess as P


# ---------------------------------------------------------------- numpy references (protocol section 4)


def photo_maps(size: int = 64) -> np.ndarray:
    """Three 'saliency-like' maps (N, H, W, 3): photo minus a blurred copy (signed, heavy-tailed)."""
    out = []
    for img in (data.chelsea(), data.coffee(), data.astronaut()):
        im = transform.resize(img, (size, size), anti_aliasing=True)
        out.append(im - ndimage.gaussian_filter(im, sigma=(2, 2, 0)))
    return np.stack(out)


@pytest.fixture(scope="module")
def maps3() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([photo_maps(64), rng.normal(size=(2, 64, 64, 3))])


# ---------------------------------------------------------------- normalizations
@pytest.mark.parametrize("fn,ref", [(P.abs_normalize, ref_abs), (P.diverging_normalize, ref_div)])
def test_normalize_matches_reference_3ch_and_1ch(maps3, fn, ref):
    out = fn(to_t(maps3))
    assert out.shape == (5, 64, 64) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), np.stack([ref(e) for e in maps3]), atol=1e-12)
    mnist = np.random.default_rng(1).normal(size=(4, 28, 28)) * (np.random.default_rng(2).random((4, 28, 28)) > 0.8)
    np.testing.assert_allclose(fn(to_t(mnist)).numpy(), np.stack([ref(e) for e in mnist]), atol=1e-12)


def test_unit_normalize(maps3):
    out = P.unit_normalize(to_t(maps3))
    assert out.shape == (5, 3, 64, 64)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), np.stack([ref_unit(e) for e in maps3]), atol=1e-12)
    assert out.amin((1, 2, 3)).eq(0).all() and out.amax((1, 2, 3)).eq(1).all()


def test_abs_top_percent_are_ties_at_one(maps3):
    out = P.abs_normalize(to_t(maps3)).flatten(1)
    n_ones = (out == 1).sum(1)
    assert (n_ones >= 0.01 * out.shape[1] - 1).all() and (n_ones <= 0.011 * out.shape[1] + 1).all()


def test_float32_full_size_and_dtype_preserved():
    e = photo_maps(299).astype(np.float32)
    out = P.abs_normalize(to_t(e))
    assert out.dtype == torch.float32 and out.shape == (3, 299, 299)
    np.testing.assert_allclose(out.numpy(), np.stack([ref_abs(x.astype(np.float64)) for x in e]), atol=1e-5)


def test_row_quantile_matches_numpy_and_chunks(monkeypatch):
    x = torch.randn(7, 1001, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for q in (0.0, 12.5, 50.0, 99.0, 100.0):
        np.testing.assert_allclose(P.row_quantile(x, q).numpy(), np.percentile(x.numpy(), q, axis=1), rtol=1e-13)
    monkeypatch.setattr(P, "_MAX_SORT_ELEMS", 2000)  # forces chunks of 1 row
    np.testing.assert_allclose(P.row_quantile(x, 99.0).numpy(), torch.quantile(x, 0.99, dim=1).numpy(), rtol=1e-13)
    with pytest.raises(ValueError, match="percentile"):
        P.row_quantile(x, 101.0)


# ---------------------------------------------------------------- degenerate maps
def test_constant_and_zero_maps_are_defined():
    z3, z1 = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    c3 = torch.full((2, 3, 8, 8), 0.7)
    for x in (z3, z1, c3):
        assert P.abs_normalize(x).eq(0).all()
        assert P.unit_normalize(x).eq(0).all()
    assert P.diverging_normalize(z3).eq(0.5).all()
    assert P.diverging_normalize(z1).eq(0).all()
    # a zero image next to a normal one does not affect the normal one
    mixed = torch.cat([z3[:1], torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))])
    out = P.abs_normalize(mixed)
    assert not out.isnan().any() and out[0].eq(0).all() and out[1].max() == 1



def _sparse(n_on: int = 30, sign: bool = False) -> torch.Tensor:
    """Two 3-channel maps with ``n_on`` of 4,096 pixels non-zero (< 1 %): e.g. Guided GradCAM
    where the CAM is zero almost everywhere."""
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(2, 3, 64, 64)
    idx = torch.randperm(64 * 64, generator=g)[:n_on]
    v = torch.rand(2, 3, n_on, generator=g) + 0.1
    a.view(2, 3, -1)[:, :, idx] = v * (torch.randint(0, 2, v.shape, generator=g) * 2 - 1 if sign else 1)
    return a


def test_sparse_maps_keep_their_salient_pixels():
    """A map with at least 99 % of its pixels at the minimum has p99 == min: it was normalized
    to all zeros (a constant), so two identical sparse maps scored 0 on both Spearman metrics and
    were drawn black.  The maximum takes the percentile's place there."""
    from sanitylib import metrics as M

    a = _sparse()
    for fn in (P.abs_normalize, P.diverging_normalize):
        out = fn(a)
        assert len(out[0].unique()) > 2  # not a constant
    m = a.abs().sum(1)[0].numpy()
    np.testing.assert_allclose(P.abs_normalize(a)[0].numpy(), (m - m.min()) / (m.max() - m.min()),
                               rtol=1e-6)  # fmt: skip
    s = a.sum(1)[0].numpy()
    span = np.abs(s).max()
    np.testing.assert_allclose(P.diverging_normalize(a)[0].numpy(), (s + span) / (2 * span), rtol=1e-6)
    for metric in ("spearman_abs", "spearman"):
        assert M.similarity(a, a.clone(), metric).tolist() == [1.0, 1.0]
        b = _sparse(sign=True)  # the run's path (one sort per map) equals similarity's
        f_a, f_b = M.MapFeatures(a), M.MapFeatures(b)
        torch.testing.assert_close(M.compare(metric, f_a, f_b), M.similarity(a, b, metric).double(),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert not M.MapFeatures(a).abs_constant().any()
    assert M.MapFeatures(torch.zeros(2, 3, 8, 8)).abs_constant().all()
    # not sparse (more than 1 % non-zero): the percentile rule, as before
    dense = _sparse(n_on=200)
    np.testing.assert_allclose(P.abs_normalize(dense)[0].numpy(),
                               ref_abs(dense[0].permute(1, 2, 0).numpy()), rtol=1e-6)  # fmt: skip

# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize("fn", [P.abs_normalize, P.diverging_normalize, P.unit_normalize])
def test_bad_input(fn):
    with pytest.raises(ValueError, match=r"4-D.*\(N, C, H, W\).*got shape \(2, 8, 8\)"):
        fn(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="floating dtype.*int64"):
        fn(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    x = torch.zeros(3, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN values: 1 of 3 images \(indices \[1\]\)"):
        fn(x)
    x[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="contains inf values: 1 of 3"):
        fn(x)


def test_check_maps_accepts_finite_values_whose_sum_overflows():
    """The check sums the maps first (a finite sum proves every value finite); a sum that
    overflows is not taken for a bad value: the value-by-value check decides."""
    big = torch.full((2, 3, 8, 8), 3e38)  # float32: the sum is inf, every value finite
    assert not torch.isfinite(big.sum())
    P.check_maps(big)
    big[1, 2, 0, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"contains inf values: 1 of 2 images \(indices \[1\]\)"):
        P.check_maps(big)


def test_check_maps_name_and_ndims():
    with pytest.raises(ValueError, match=r"^b must be 3-D or 4-D .*got shape \(8, 8\)"):
        P.check_maps(torch.zeros(8, 8), "b", (3, 4))
    # ndims decides: the same 3-D maps are accepted with (3, 4), rejected by the default (4,)
    assert P.check_maps(torch.zeros(2, 8, 8), "b", (3, 4)) is None
    with pytest.raises(ValueError, match=r"^maps must be 4-D .*got shape \(2, 8, 8\)"):
        P.check_maps(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"^b must be 3-D .*got shape \(2, 3, 8, 8\)"):
        P.check_maps(torch.zeros(2, 3, 8, 8), "b", (3,))
    # the other checks apply to accepted shapes too
    bad = torch.zeros(2, 8, 8)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^b contains NaN values: 1 of 2 images \(indices \[1\]\)"):
        P.check_maps(bad, "b", (3, 4))
    with pytest.raises(ValueError, match="^b is empty"):
        P.check_maps(torch.zeros(0, 8, 8), "b", (3, 4))
    with pytest.raises(ValueError, match="^b must be a torch.Tensor, got ndarray"):
        P.check_maps(np.zeros((2, 8, 8)), "b", (3, 4))
