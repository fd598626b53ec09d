"""Tests for sanitylib.metrics against scipy / scikit-image references."""

import math
import os

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage import data, transform
from skimage.feature import hog as sk_hog
from skimage.metrics import structural_similarity as sk_ssim

from reference import ref_abs, ref_div, ref_unit, to_t
from sanitylib import metrics as M


# ---------------------------------------------------------------- references and data


def ref_hog(im: np.ndarray) -> np.ndarray:
    kw = dict(orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3), block_norm="L2-Hys")
    return sk_hog(im, **kw, channel_axis=-1) if im.ndim == 3 else sk_hog(im, **kw)


def ref_ssim(a: np.ndarray, b: np.ndarray, dr: float) -> float:
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=True, data_range=dr)
    return sk_ssim(a, b, **kw, channel_axis=-1) if a.ndim == 3 else sk_ssim(a, b, **kw)


def photo_maps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two batches (3, H, W, 3) of saliency-like maps: photo gradients vs photo minus blur."""
    imgs = [transform.resize(i, (size, size), anti_aliasing=True) for i in (data.chelsea(), data.coffee(), data.astronaut())]
    grad = np.stack([np.gradient(i, axis=0) + np.gradient(i, axis=1) for i in imgs])
    hp = np.stack([i - ndimage.gaussian_filter(i, sigma=(2, 2, 0)) for i in imgs])
    return grad, hp


@pytest.fixture(scope="module")
def pair64() -> tuple[np.ndarray, np.ndarray]:
    """(5, 64, 64, 3) pairs: 3 photo-based + 2 random (one quantized, with many ties)."""
    rng = np.random.default_rng(0)
    a, b = photo_maps(64)
    ra, rb = rng.normal(size=(2, 64, 64, 3)), rng.normal(size=(2, 64, 64, 3))
    ra[1], rb[1] = np.round(ra[1]), np.round(rb[1])
    return np.concatenate([a, ra]), np.concatenate([b, rb])


@pytest.fixture(scope="module")
def pair299() -> tuple[np.ndarray, np.ndarray]:
    a, b = photo_maps(299)
    return a[:1], b[:1]


def mnist_like(seed: int, n: int = 4) -> np.ndarray:
    """(n, 28, 28) maps with ~80 % exact zeros."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 28, 28)) * (rng.random((n, 28, 28)) > 0.8)


# ---------------------------------------------------------------- rank / correlation primitives
def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    cases = [
        np.round(rng.normal(size=(6, 500)), 1),  # rounded values
        np.clip(rng.normal(size=(6, 500)), -0.5, 0.5),  # clipped maps
        mnist_like(2, 6).reshape(6, -1),  # 80 % zeros
        rng.normal(size=(3, 257)),  # no ties
        np.array([[1.0, 1.0, 1.0], [3.0, -1.0, 3.0]]),  # constant row, ties at the end
    ]
    for x in cases:
        r = M.rankdata(torch.from_numpy(x))
        assert r.dtype == torch.float64
        np.testing.assert_array_equal(r.numpy(), stats.rankdata(x, axis=1))
    np.testing.assert_array_equal(M.rankdata(torch.from_numpy(cases[0]).float()).numpy(), stats.rankdata(cases[0].astype(np.float32), axis=1))


def test_pearson_spearman_rows_match_scipy():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(4, 300)), 1)
    y = x + rng.normal(size=(4, 300))
    p = M.pearson(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    s = M.spearman(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for i in range(4):
        assert p[i] == pytest.approx(stats.pearsonr(x[i], y[i])[0], abs=1e-12)
        assert s[i] == pytest.approx(stats.spearmanr(x[i], y[i])[0], abs=1e-12)


def test_is_constant():
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 1e-9], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert M.is_constant(x).tolist() == [True, False, True]


# ---------------------------------------------------------------- spearman metrics
@pytest.mark.parametrize("metric,ref", [("spearman_abs", ref_abs), ("spearman", ref_div)])
def test_spearman_metrics_match_scipy(pair64, pair299, metric, ref):
    for a, b in (pair64, pair299, (mnist_like(4), mnist_like(5))):
        out = M.similarity(to_t(a), to_t(b), metric)
        assert out.shape == (len(a),) and out.dtype == torch.float64
        want = [stats.spearmanr(ref(x).ravel(), ref(y).ravel())[0] for x, y in zip(a, b)]
        np.testing.assert_allclose(out.numpy(), want, atol=1e-6)


# ---------------------------------------------------------------- SSIM
@pytest.mark.parametrize("dr", [2.0, 1.0])
def test_ssim_matches_skimage(pair64, dr):
    a, b = pair64
    out = M.similarity(to_t(a), to_t(b), "ssim", ssim_data_range=dr)
    want = [ref_ssim(ref_unit(x), ref_unit(y), dr) for x, y in zip(a, b)]
    np.testing.assert_allclose(out.numpy(), want, atol=1e-4)
    # 1-channel maps, prepared (N, H, W) input, float32
    a1, b1 = (np.stack([ref_unit(x[..., 0]) for x in v]).astype(np.float32) for v in (a, b))
    out1 = M.similarity(torch.from_numpy(a1), torch.from_numpy(b1), "ssim", normalize=False, ssim_data_range=dr)
    np.testing.assert_allclose(out1.numpy(), [ref_ssim(x, y, dr) for x, y in zip(a1, b1)], atol=1e-4)


def test_ssim_full_size(pair299):
    a, b = pair299
    out = M.similarity(to_t(a), to_t(b), "ssim")
    np.testing.assert_allclose(out.numpy(), [ref_ssim(ref_unit(a[0]), ref_unit(b[0]), 2.0)], atol=1e-4)


# ---------------------------------------------------------------- HOG
def test_hog_vectors_match_skimage(pair64):
    a, _ = pair64
    u = np.stack([ref_unit(x) for x in a])
    for maps, t in ((u, to_t(u)), (u[..., 0], torch.from_numpy(u[..., 0])), (u.astype(np.float32), to_t(u.astype(np.float32)))):
        h = M.hog(t)
        want = np.stack([ref_hog(x) for x in maps])
        assert h.shape == want.shape == (5, 81 * 4) and h.dtype == torch.float64
        assert np.abs(h.numpy() - want).max() < 1e-4
    # odd size: remainder pixels beyond the last full cell are ignored
    odd = u[:2, :61, :57]
    assert np.abs(M.hog(to_t(odd)).numpy() - np.stack([ref_hog(x) for x in odd])).max() < 1e-4


def test_strongest_channel_takes_the_first_on_ties():
    """HOG's per-pixel channel choice equals ``argmax`` over the channels (first on ties), also
    where magnitudes tie exactly: integer maps, a channel repeated, a channel mirrored."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (4, 3, 20, 20), generator=g).double()
    x[1, 2] = x[1, 0]  # equal gradients in channels 0 and 2
    x[2, 1] = -x[2, 0]  # equal magnitudes, opposite directions
    g_row, g_col = M._gradients(x)
    best = torch.hypot(g_row, g_col).argmax(1, keepdim=True)
    r, c = M._strongest_channel(g_row, g_col)
    assert torch.equal(r, g_row.gather(1, best)[:, 0]) and torch.equal(c, g_col.gather(1, best)[:, 0])
    ties = (torch.hypot(g_row, g_col) == torch.hypot(g_row, g_col).amax(1, keepdim=True)).sum(1) > 1
    assert ties.float().mean() > 0.2  # the case is exercised
    assert torch.equal(M._strongest_channel(g_row[:, :1], g_col[:, :1])[0], g_row[:, 0])


def test_hog_metrics_match_scipy_full_size(pair64, pair299):
    for a, b in (pair64, pair299):
        ha = [ref_hog(ref_unit(x)) for x in a]
        hb = [ref_hog(ref_unit(y)) for y in b]
        if a.shape[1] == 299:
            assert ha[0].shape == (20736,)
            assert np.abs(M.hog(M.unit_normalize(to_t(a))).numpy()[0] - ha[0]).max() < 1e-4
        for metric, corr in (("hog_pearson", stats.pearsonr), ("hog_spearman", stats.spearmanr)):
            out = M.similarity(to_t(a), to_t(b), metric)
            np.testing.assert_allclose(out.numpy(), [corr(x, y)[0] for x, y in zip(ha, hb)], atol=1e-4)


# ---------------------------------------------------------------- identical maps, constant maps, chunking
@pytest.mark.parametrize("metric", M.METRICS)
def test_identical_maps_give_one(pair64, metric):
    a = to_t(pair64[0])
    out = M.similarity(a, a.clone(), metric)
    assert out.shape == (5,)
    torch.testing.assert_close(out, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("metric", ["spearman_abs", "spearman", "hog_pearson", "hog_spearman"])
def test_constant_map_policy(pair64, metric):
    a, b = to_t(pair64[0][:3]), to_t(pair64[1][:3])
    a[1] = 0.0  # all-zero explanation
    out = M.similarity(a, b, metric)
    assert out[1] == 0.0 and not out.isnan().any()
    assert out[0] == M.similarity(a[:1], b[:1], metric)[0]
    nan = M.similarity(a, b, metric, on_constant="nan")
    assert nan[1].isnan() and nan[[0, 2]].eq(out[[0, 2]]).all()
    with pytest.raises(ValueError, match=r"constant map/vector at images \[1\]"):
        M.similarity(a, b, metric, on_constant="raise")


def test_ssim_of_constant_maps_is_defined():
    z = torch.zeros(2, 3, 32, 32)
    assert M.similarity(z, z, "ssim").eq(1).all()


def test_chunking_does_not_change_results(pair64, monkeypatch):
    a, b = to_t(pair64[0]), to_t(pair64[1])
    before = {m: M.similarity(a, b, m) for m in M.METRICS}
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 1)  # one image per chunk
    for m in M.METRICS:
        torch.testing.assert_close(M.similarity(a, b, m), before[m], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- input validation
def test_bad_input_messages():
    x = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown metric 'pearson'.*spearman_abs, spearman, ssim, hog_pearson, hog_spearman"):
        M.similarity(x, x, "pearson")
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 64, 64\) and \(2, 3, 64, 32\)"):
        M.similarity(x, x[..., :32], "ssim")
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^b contains NaN values: 1 of 2 images"):
        M.similarity(x, bad, "spearman")
    with pytest.raises(ValueError, match=r"^a must be 4-D.*got shape \(2, 64, 64\)"):
        M.similarity(x[:, 0], x[:, 0], "spearman_abs")
    with pytest.raises(ValueError, match="floating dtype"):
        M.similarity(x.long(), x.long(), "ssim")
    with pytest.raises(ValueError, match="on_constant"):
        M.similarity(x, x, "spearman", on_constant="ignore")
    with pytest.raises(ValueError, match="at least 48x48"):
        M.similarity(x[..., :40], x[..., :40], "hog_pearson")
    with pytest.raises(ValueError, match="at least 11x11"):
        M.similarity(x[..., :8, :8], x[..., :8, :8], "ssim")
    # 3-D prepared maps are accepted with normalize=False and compared as given: Spearman of the
    # signed values (spearman_abs would take absolute values first if it normalized)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    b = b + a  # related maps: a clear positive correlation
    got = M.similarity(a, b, "spearman_abs", normalize=False)
    want = [stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert abs(float(M.similarity(a[:, None], b[:, None], "spearman_abs")[0]) - want[0]) > 0.05


# ----------------------------------------------------------------------------- noise floors
def test_different_images_floor_is_every_pair_against_scipy():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(4, 20, 20, 3))
    maps[1] = maps[0] + 0.3 * rng.normal(size=(20, 20, 3))  # one related pair
    got = M.different_images_floor(to_t(maps), "spearman_abs").numpy()
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    want = [stats.spearmanr(ref_abs(maps[i]).ravel(), ref_abs(maps[j]).ravel())[0] for i, j in pairs]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0] > 0.5 and np.abs(got[1:]).max() < 0.3
    with pytest.raises(ValueError, match="at least 2"):
        M.different_images_floor(to_t(maps[:1]), "spearman")


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_random_mask_floor_is_seeded_and_near_zero_for_rank_correlations(kind):
    a = M.random_mask_floor((3, 32, 32), "spearman", n=8, kind=kind, seed=1)
    b = M.random_mask_floor((3, 32, 32), "spearman", n=8, kind=kind, seed=1)
    c = M.random_mask_floor((3, 32, 32), "spearman", n=8, kind=kind, seed=2)
    assert a.shape == (8,) and torch.equal(a, b) and not torch.equal(a, c)
    # 1024 pixels: the std of Spearman's rho between independent maps is ~1/sqrt(1023) = 0.031
    assert abs(float(a.mean())) < 0.04 and float(a.abs().max()) < 0.15


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_random_masks_are_standard_normal_or_uniform_on_minus_one_one(kind, monkeypatch):
    """The masks themselves (seen by the similarity they are passed to, as raw maps): standard
    normal, or uniform on [-1, 1] (not [0, 1]: Spearman of the diverging normalization cannot
    tell the two apart, so the floor values alone do not test the range), two independent
    masks per pair."""
    seen = []
    real = M.similarity

    def spy(a, b, metric, **kwargs):
        seen.append((a, b, kwargs))
        return real(a, b, metric, **kwargs)

    monkeypatch.setattr(M, "similarity", spy)
    out = M.random_mask_floor((3, 32, 32), "spearman", n=8, kind=kind, seed=1)
    assert len(seen) == 1, "random_mask_floor no longer passes its masks to similarity"
    a, b, kwargs = seen[0]
    assert a.shape == b.shape == (8, 3, 32, 32) and kwargs.get("normalize", True)
    torch.testing.assert_close(out, real(a, b, "spearman"), rtol=0, atol=0)
    m = torch.stack([a, b]).double()
    assert abs(float(m.mean())) < 0.02  # 49152 values: std of the mean 0.0045 (normal)
    if kind == "uniform":
        assert float(m.min()) >= -1 and float(m.max()) <= 1
        assert float(m.min()) < -0.99 and float(m.max()) > 0.99
        assert float(m.std()) == pytest.approx(1 / math.sqrt(3), rel=0.02)
    else:
        assert float(m.std()) == pytest.approx(1.0, rel=0.02)
        assert float(m.min()) < -3.5 and float(m.max()) > 3.5
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.03


def test_random_mask_floor_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        M.random_mask_floor((3, 8, 8), "spearman", kind="poisson")
    with pytest.raises(ValueError, match="shape"):
        M.random_mask_floor((8, 8), "spearman")
    with pytest.raises(ValueError, match="unknown metric"):
        M.random_mask_floor((3, 8, 8), "pearson_abs")


def test_noise_floor_table():
    rng = np.random.default_rng(0)
    maps = {"a": to_t(rng.normal(size=(3, 48, 48, 3))), "b": to_t(rng.normal(size=(3, 48, 48, 3)))}
    t = M.noise_floor(maps, ["spearman", "ssim"], n_masks=5)
    assert set(t.columns) == {"kind", "method", "metric", "pair", "value"}
    diff = t[t["kind"] == "different images"]
    assert len(diff) == 2 * 2 * 3  # methods x metrics x pairs
    masks = t[t["kind"] == "random masks"]
    assert len(masks) == 2 * 5 and set(masks["method"]) == {"random masks"}
    one = diff[(diff["method"] == "a") & (diff["metric"] == "ssim")]["value"].to_numpy()
    np.testing.assert_allclose(one, M.different_images_floor(maps["a"], "ssim").numpy())


def _ranks_in_child(x, queue):
    queue.put(M.rankdata(x).numpy())  # numpy: pickled, not shared through file descriptors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_row_parallel_ranks_survive_fork():
    """The CPU rank sorts run on a private thread pool; a forked child (whose copy of the pool
    has no threads) must get a pool of its own, not wait forever on its parent's."""
    import multiprocessing as mp

    x = torch.randn(8, 50176, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = M.rankdata(x)  # creates the parent's pool
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_ranks_in_child, args=(x, queue))
        child.start()
        try:
            got = queue.get(timeout=60)  # a child waiting on its parent's pool never answers
            child.join(timeout=60)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
    finally:
        torch.set_num_threads(old)
    assert child.exitcode == 0 and np.array_equal(got, want.numpy())


@pytest.mark.parametrize("ties", [False, True])
def test_rank_paths_agree(ties):
    """ranks_of_sorted has a numpy path (CPU, split over threads, no-tie shortcut) and a torch
    path (CUDA, or tensors that require grad): both give scipy's average ranks."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40000, generator=g, dtype=torch.float64)
    if ties:
        x = (x * 4).round()
    s, order = M.sort_rows(x)
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the split path (6 x 40,000 values is above its threshold)
    try:
        cpu = M.ranks_of_sorted(s, order)
    finally:
        torch.set_num_threads(old)
    via_torch = M.ranks_of_sorted(s.clone().requires_grad_(True), order).detach()
    want = torch.from_numpy(stats.rankdata(x.numpy(), axis=1))
    assert torch.equal(cpu, want) and torch.equal(via_torch, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [300, 5000])
def test_sort_rows_paths(dtype, d):
    """sort_rows: short rows all at once by argsort, long rows one at a time (float32 by a
    radix sort of their keys): the values of np.sort, a permutation that gives them, and
    scipy's average ranks, with negative values, ties, -0.0 next to 0.0, subnormals and
    extreme magnitudes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, d, generator=g).to(dtype)
    x[0] = (x[0] * 3).round()  # many ties
    x[1, : d // 3] = 0.0
    x[1, d // 3: d // 2] = -0.0
    x[2, :4] = torch.tensor([1e-40, -1e-40, 3e38, -3e38]).to(dtype)  # subnormals (float32), extremes
    x[3] = x[3].abs()
    x[4] = 7.0  # constant
    s, order = M.sort_rows(x)
    assert s.dtype == dtype and order.dtype == torch.int64
    assert torch.equal(s, torch.from_numpy(np.sort(x.numpy(), axis=1)))
    assert torch.equal(torch.sort(order, dim=1).values, torch.arange(d).expand(5, d))
    assert torch.equal(x.gather(1, order), s)
    want = torch.from_numpy(stats.rankdata(x.numpy(), axis=1))
    assert torch.equal(M.rankdata(x), want)


@pytest.mark.parametrize("d", [300, 5000])
def test_pearson_paths_agree(d):
    """pearson's numpy path (CPU, long rows) and torch path (CUDA, tensors that require grad,
    short rows) agree with scipy, constant rows follow the policy on both."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    y = 0.3 * x + torch.randn(5, d, generator=g, dtype=torch.float64)
    y[1] = -x[1] * 2 + 5  # exactly -1
    x[2] = 0.1  # constant in x
    y[3] = -4.25  # constant in y
    x[4] = x[4] * 1e6 + 1e9  # a large offset: centering must keep the precision
    want = [stats.pearsonr(a, b)[0] if k not in (2, 3) else math.nan
            for k, (a, b) in enumerate(zip(x.numpy(), y.numpy()))]
    want = torch.tensor(want, dtype=torch.float64)
    for on_constant in ("nan", "zero"):
        cpu = M.pearson(x, y, on_constant=on_constant)
        via_torch = M.pearson(x.clone().requires_grad_(True), y, on_constant=on_constant).detach()
        exp = want if on_constant == "nan" else want.nan_to_num(0.0)
        assert torch.allclose(cpu, exp, atol=1e-12, rtol=0, equal_nan=True)
        assert torch.allclose(via_torch, exp, atol=1e-12, rtol=0, equal_nan=True)
    with pytest.raises(ValueError, match="constant"):
        M.pearson(x, y, on_constant="raise")


# ---------------------------------------------------------------- bfloat16 maps
def test_bfloat16_maps_score_as_their_exact_float32_copies(pair64):
    """A bfloat16 model's maps: numpy (ranks, correlations) and scipy (SSIM's filters) have no
    bfloat16, which used to raise 'Got unsupported ScalarType BFloat16' after every pass of a
    run.  float32 holds bfloat16 values exactly, so the scores are those of the copies, and a
    bfloat16 model runs end to end."""
    import sanitylib as sl
    from reference import TinyCNN

    a, b = (to_t(v).bfloat16() for v in pair64)
    for metric in M.METRICS:
        assert torch.equal(M.similarity(a, b, metric), M.similarity(a.float(), b.float(), metric)), metric
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN().eval().bfloat16()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    df = sl.cascading_randomization(model, x, ["gradient"], metrics=["spearman_abs", "ssim"],
                                    progress=False, cache=False)  # fmt: skip
    assert len(df) == 2 * 2 * len(df.stages) and df["value"].notna().all()


def test_ssim_data_range_must_be_a_positive_number():
    """0, negative values and NaN gave NaN or meaningless scores; a string a TypeError."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="data_range must be a finite number > 0"):
            M.similarity(a, b, "ssim", ssim_data_range=bad)
    assert torch.isfinite(M.similarity(a, b, "ssim", ssim_data_range=1)).all()


# ---------------------------------------------------------------- found by a user probe
def _pair(shape=(3, 3, 64, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + torch.randn(shape, generator=g)


def test_half_precision_maps_are_scored_as_float32():
    """float16 maps were normalized and HOG-ed in float16 (HOG values off by up to 2e-2; skimage
    works in float32); bfloat16 ones were already upcast."""
    a, b = (t.half() for t in _pair())
    for metric in M.METRICS:
        assert torch.equal(M.similarity(a, b, metric), M.similarity(a.float(), b.float(), metric))
    assert torch.equal(M.hog(M.unit_normalize(a)), M.hog(M.unit_normalize(a).float()))
    assert torch.equal(M.rankdata(a.flatten(1).bfloat16()), M.rankdata(a.flatten(1).bfloat16().float()))


@pytest.mark.parametrize("fn", [M.rankdata, lambda x: M.spearman(x, x), lambda x: M.pearson(x, x)])
def test_correlations_refuse_nan_and_wrong_shapes(fn):
    x = torch.rand(2, 10)
    x[1, 3] = math.nan  # it was ranked above every number
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(x)
    with pytest.raises(ValueError, match=r"2-D \(N, D\)"):
        fn(torch.rand(2, 3, 4))


def test_map_features_need_4d_maps():
    """(N, H, W) maps had H read as the channels (summed over), silently."""
    with pytest.raises(ValueError, match="4-D"):
        M.MapFeatures(torch.rand(2, 16, 16))


def test_noise_floor_does_not_depend_on_the_order_of_the_methods():
    a3, _ = _pair((3, 3, 48, 48))
    a1 = a3[:, :1]
    one = M.noise_floor({"gradient": a3, "gradcam": a1}, ["spearman", "ssim"])
    other = M.noise_floor({"gradcam": a1, "gradient": a3}, ["spearman", "ssim"])
    masks = [t[t["method"] == "random masks"].reset_index(drop=True) for t in (one, other)]
    import pandas as pd

    pd.testing.assert_frame_equal(*masks)
    three = M.noise_floor({"gradient": a3}, ["spearman", "ssim"])
    pd.testing.assert_frame_equal(masks[0], three[three["method"] == "random masks"].reset_index(drop=True))


def test_user_metric_objects_cannot_pass_for_a_built_in():
    import sanitylib as sl

    def always_one(a, b):
        return torch.ones(len(a))

    a, b = _pair((2, 3, 48, 48))
    with pytest.raises(ValueError, match="built-in metric 'ssim'"):  # its rows read "SSIM"
        M.similarity(a, b, sl.Metric("ssim", None, always_one))
    with pytest.raises(ValueError, match="builtin=True is for sanitylib's own"):  # ran the built-in
        M.similarity(a, b, sl.Metric("hog_pearson", None, always_one, builtin=True))
    mine = sl.Metric("always_one", None, always_one)
    assert M.similarity(a, b, mine).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="apply to the built-in metrics"):  # ignored, silently
        M.similarity(a, b, mine, on_constant="nan")
    with pytest.raises(ValueError, match="on_constant must be one of"):
        M.similarity(a, b, mine, on_constant="zeros")


def test_user_metric_non_finite_values_are_announced():
    import sanitylib as sl

    def half_nan(a, b):
        return torch.tensor([0.5, math.nan])

    a, b = _pair((2, 3, 48, 48))
    with pytest.warns(RuntimeWarning, match="'half_nan' returned 1 non-finite value"):
        v = sl.Metric("half_nan", None, half_nan)(a, b)
    assert v[0] == 0.5 and math.isnan(v[1])
