"""Tests for sanitylib.engine: the batched engine equals the straightforward computation.

References: ``explain`` per method (itself checked against captum in test_attribution.py), the
``engine="reference"`` runner (``explain`` per method and stage) and ``metrics.similarity``.
Documented tolerances: maps within ``MAP_TOLERANCE * max|map|`` of ``explain`` (observed: 0 for
single-pass methods, ~1e-7 for the float64-accumulated Integrated Gradients); metric values of
the batched and the reference runner within 1e-6 (observed 0 on the tiny CNN, < 1e-5 on
EfficientNet-Lite0 where IG rounding moves a few ranks); forward replay is bit-exact.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sanitylib as sl
from sanitylib import engine as EN
from sanitylib import metrics as MT
from sanitylib import replay as RP
from sanitylib.attribution import GuidedBackpropError, explain, unit_noise
from sanitylib.metrics import METRICS, is_constant, pearson, rankdata, similarity
from sanitylib.models import Block
from sanitylib.postprocess import abs_normalize
from sanitylib.randomize import Perturbation, cascading_stages, get_blocks
from sanitylib import randomize as R

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]

ALL = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
       "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam", "edge_detector"]  # fmt: skip
CHEAP = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},
         "vargrad": {"n_samples": 2}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 3}}  # fmt: skip


class TinyCNN(nn.Module):
    def __init__(self, functional: bool = False, inplace: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        if self.functional:  # conv2's parameters used without calling the module
            h = F.conv2d(h, self.conv2.weight, self.conv2.bias, padding=1)
        else:
            h = self.conv2(h)
        return self.fc(self.pool(self.relu2(h)).flatten(1))


def tiny_model(**kw) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = TinyCNN(**kw).eval()
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def xt():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def photos(effnet):
    return sl.load_photos(effnet, names=["chelsea", "coffee"], verbose=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def raw_cam_has_negatives(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether GradCAM's CAM before its ReLU is negative somewhere, for every image."""
    from captum.attr import LayerGradCam

    y = sl.predict(model, x).argmax(1)
    raw = LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=False).detach()
    return bool((raw.flatten(1).amin(1) < 0).all())


# ---------------------------------------------------------------- maps equal explain
def test_every_method_equals_explain_on_efficientnet(effnet, photos):
    """One engine call (shared passes, rows of both images mixed in chunks of 5) against
    ``explain`` per method and image."""
    x = photos.x
    # GradCAM on a layer whose raw CAM is partly negative, so that its ReLU matters
    opts = dict(CHEAP, gradcam={"layer": "_blocks.14"})
    assert raw_cam_has_negatives(effnet, effnet._blocks[14], x)
    got = EN.compute_maps(effnet, x, ALL, method_options=opts, batch_size=5, seed=3)
    for m in ALL:
        ref = explain(effnet, x, m, seed=3, **opts.get(m, {}))
        assert got[m].shape == ref.shape and got[m].dtype == ref.dtype
        for i in range(len(x)):
            assert rel_err(got[m][i], ref[i]) <= EN.MAP_TOLERANCE, m
    # the shared passes are not a shortcut: the methods really differ
    assert rel_err(got["guided_backprop"], got["gradient"]) > 0.1
    assert rel_err(got["vargrad"], got["smoothgrad"]) > 0.1


def test_explain_methods_uses_the_engine_and_matches_explain(tiny_, xt):
    # GradCAM layers whose raw CAM is partly negative (relu2's is positive: the ReLU would not matter)
    opts = dict(CHEAP, gradcam={"layer": "bn1"}, guided_gradcam={"layer": "conv1"})
    assert raw_cam_has_negatives(tiny_, tiny_.bn1, xt) and raw_cam_has_negatives(tiny_, tiny_.conv1, xt)
    got = sl.explain_methods(tiny_, xt, ALL, opts, seed=1, progress=False)
    for m in ALL:
        ref = explain(tiny_, xt, m, seed=1, **opts.get(m, {}))
        assert rel_err(got[m], ref) <= EN.MAP_TOLERANCE, m
    # image_ids: noise of the images at their positions in a larger batch
    sub = sl.explain_methods(tiny_, xt[1:], ["smoothgrad"], opts, seed=1, progress=False,
                             image_ids=[1, 2])  # fmt: skip
    assert rel_err(sub["smoothgrad"], got["smoothgrad"][1:]) <= EN.MAP_TOLERANCE


@pytest.fixture(scope="module")
def tiny_():
    return tiny_model()


def test_gradcam_layer_followed_by_an_inplace_relu(xt):
    """GradCAM of a layer whose output an ``nn.ReLU(inplace=True)`` then overwrites (torchvision's
    VGG and ResNet): the engine kept the overwritten tensor and read the ReLU's output and its
    gradient instead of the layer's (maps 1.0 apart, normalized), in ``explain_methods`` and in
    the runners' stored maps and metrics; ``explain`` (captum) was right."""
    model = tiny_model(inplace=True)  # bn1 -> relu1(inplace=True)
    opts = {"gradcam": {"layer": "bn1"}, "guided_gradcam": {"layer": "bn1"}}
    assert raw_cam_has_negatives(model, model.bn1, xt)  # so that reading after the ReLU differs
    got = sl.explain_methods(model, xt, ["gradcam", "guided_gradcam"], opts, progress=False)
    refs = {m: explain(model, xt, m, **opts[m]) for m in opts}
    for m in opts:
        assert rel_err(got[m], refs[m]) <= EN.MAP_TOLERANCE, m
    for schedule in ("cascading", "independent"):  # the stored maps of the trained model and
        df = sl.run_randomization(model, xt, list(opts), schedule, method_options=opts,  # replay
                                  metrics=["spearman"], cache=False, progress=False,
                                  store_maps=len(xt), floor=False)  # fmt: skip
        for m in opts:
            assert rel_err(df.maps["original"][m], refs[m]) <= EN.MAP_TOLERANCE, (schedule, m)


def test_common_random_numbers_prefix_and_sharing():
    """VarGrad's (and IG-SmoothGrad's) noise is a prefix of SmoothGrad's stream, for any
    shape (one draw per sample), so SmoothGrad and VarGrad can share their noisy gradients."""
    xi = torch.rand(3, 7, 5)
    long, short = unit_noise(xi, 5, 0, 4), unit_noise(xi, 3, 0, 4)
    assert torch.equal(long[:3], short)
    assert not torch.equal(unit_noise(xi, 3, 0, 5), short)  # other image, other noise
    assert not torch.equal(unit_noise(xi, 3, 1, 4), short)  # other seed, other noise
    rows = EN.rows_per_image(["smoothgrad", "vargrad"], {"smoothgrad": {"n_samples": 50}})
    assert rows == {"plain": 50, "guided": 0, "custom": 0, "total": 50}  # VarGrad's 25 are shared
    rows = EN.rows_per_image(["gradient", "input_x_gradient", "gradcam", "guided_backprop",
                              "guided_gradcam", "integrated_gradients"])  # fmt: skip
    assert rows == {"plain": 51, "guided": 1, "custom": 0, "total": 52}


# ---------------------------------------------------------------- stages
def _tables(model, x, methods, opts, **kw):
    common = dict(methods=methods, method_options=opts, cache=False, progress=False, seed=2)
    common.update(kw)
    return (sl.run_randomization(model, x, engine="batched", group_size=2, batch_size=7, **common),
            sl.run_randomization(model, x, engine="reference", **common))  # fmt: skip


@pytest.mark.parametrize("schedule", ["cascading", "independent"])
def test_runner_equals_reference_on_tiny(xt, schedule):
    opts = dict(CHEAP, gradcam={"layer": "relu2"}, guided_gradcam={"layer": "relu2"})
    model = tiny_model()
    metrics = ["spearman_abs", "spearman", "ssim"]
    a, r = _tables(model, xt, ALL[:-1], opts, schedule=schedule, metrics=metrics)
    key = ["stage", "method", "metric", "image", "target", "original_target", "constant"]
    assert a[key].equals(r[key])
    np.testing.assert_allclose(a["value"], r["value"], rtol=0, atol=1e-6)
    for st in ["original", "fc", "conv2", "conv1"]:
        for m in ALL[:-1]:
            assert rel_err(a.maps[st][m].float(), r.maps[st][m].float()) < 1e-3
    fa, fr = a.floor, r.floor
    np.testing.assert_allclose(fa["value"], fr["value"], rtol=0, atol=1e-6)


def test_runner_equals_reference_on_efficientnet(effnet, photos):
    methods = ["gradient", "integrated_gradients", "guided_backprop", "gradcam"]
    before = {k: v.clone() for k, v in effnet.state_dict().items()}
    a, r = _tables(effnet, photos.x[:1], methods, {"integrated_gradients": {"n_steps": 2}},
                   blocks=["logits", "block12"], metrics=["spearman_abs", "ssim"],
                   floor=False)  # fmt: skip
    assert (a["target"] == r["target"]).all()
    np.testing.assert_allclose(a["value"], r["value"], rtol=0, atol=1e-4)
    assert all(torch.equal(v, effnet.state_dict()[k]) for k, v in before.items())


def _states(model, blocks):
    return [()] + [st.blocks for st in cascading_stages(get_blocks(model, blocks))]


def _all_maps(model, x, methods, states, opts, **kw):
    out = [gm for gm in EN.iter_state_maps(model, x, methods, states, method_options=opts,
                                            batch_size=3, **kw)]  # fmt: skip
    return out


@pytest.mark.parametrize("kw", [{}, {"functional": True}, {"inplace": True}])
def test_forward_replay_is_exact(xt, kw, monkeypatch):
    """Replaying the unchanged part of the forward pass gives bit-identical maps, also when
    a parameter is used outside its module (the cut follows operations, not module calls)
    and when a recorded output is changed in place later."""
    model = tiny_model(**kw)
    opts = {"integrated_gradients": {"n_steps": 3}, "gradcam": {"layer": "relu2"},
            "guided_gradcam": {"layer": "relu2"}}  # fmt: skip
    methods = ["gradient", "integrated_gradients", "guided_backprop", "guided_gradcam"]
    states = _states(model, ["fc", "conv2", Block("bn1", ("bn1",)), "conv1"])
    replayed = []
    real_plan = RP.Recorder.plan

    def spy(self, cut):
        plan = real_plan(self, cut)
        replayed.append(sum(c is not None for v in plan.values() for c in v))
        return plan

    monkeypatch.setattr(RP.Recorder, "plan", spy)

    def quiet_write(self, name, values):
        # write the state's tensors without bumping their version counters: autograd's
        # in-place check (the engine's safety net) cannot catch a stale replayed activation,
        # so this test's own comparison below has to
        for t, v in zip(self.tensors[name], values):
            t.data.copy_(v)
            self.dirty[id(t)] = t

    monkeypatch.setattr(R.ModelStates, "_write", quiet_write)
    with_replay = _all_maps(model, xt, methods, states, opts, reuse_forward=True)
    assert sum(replayed) > 0  # replay really happened
    without = _all_maps(model, xt, methods, states, opts, reuse_forward=False)
    for g1, g2 in zip(with_replay, without):
        assert torch.equal(g1.targets, g2.targets)
        for s in range(len(states)):
            for m in methods:
                assert torch.equal(g1.maps[s][m], g2.maps[s][m]), (s, m)


def test_forward_replay_per_module_on_efficientnet(effnet, photos):
    """Quantus-style per-module steps with PyTorch's default re-initialization (BatchNorm
    statistics reset): replay is exact, the GradCAM layer and Guided BackProp included."""
    mods = [n for n, m in effnet.named_modules() if hasattr(m, "reset_parameters")][::-1]
    blocks = mods[:4] + mods[40:42]
    states = _states(effnet, blocks)
    methods = ["gradient", "guided_backprop", "gradcam"]
    kw = dict(perturbation=Perturbation(init="pytorch"), batch_size=2)
    a = list(EN.iter_state_maps(effnet, photos.x[:1], methods, states, reuse_forward=True, **kw))
    b = list(EN.iter_state_maps(effnet, photos.x[:1], methods, states, reuse_forward=False, **kw))
    for s in range(len(states)):
        for m in methods:
            assert torch.equal(a[0].maps[s][m], b[0].maps[s][m]), (s, m)
    assert not torch.equal(a[0].maps[3]["gradient"], a[0].maps[0]["gradient"])


def test_overlapping_blocks_fall_back_to_rerandomizing(xt):
    model = tiny_model()
    blocks = [Block("head", ("fc", "conv2")), Block("conv2", ("conv2",))]
    a, r = _tables(model, xt, ["gradient", "input_x_gradient"], {}, blocks=blocks,
                   metrics=["spearman"], floor=False)  # fmt: skip
    np.testing.assert_allclose(a["value"], r["value"], rtol=0, atol=1e-9)


def test_model_restored_when_iteration_stops_early(xt):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    it = EN.iter_state_maps(model, xt, ["gradient"], _states(model, None), group_size=1)
    next(it)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # between groups
    it.close()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_guided_backprop_guard_in_the_engine(xt):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 14 * 14, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).flatten(1))

    with pytest.raises(GuidedBackpropError):
        EN.compute_maps(Functional().eval(), xt, ["gradient", "guided_backprop"])
    with pytest.raises(GuidedBackpropError):
        EN.compute_maps(Functional().eval(), xt, ["guided_gradcam"],
                        method_options={"guided_gradcam": {"layer": "conv"}})  # fmt: skip


def test_bfloat16_autocast_runs_and_stays_close(tiny_, xt):
    ref = EN.compute_maps(tiny_, xt, ["gradient", "smoothgrad"], method_options=CHEAP)
    got = EN.compute_maps(tiny_, xt, ["gradient", "smoothgrad"], method_options=CHEAP,
                          amp="bfloat16")  # fmt: skip
    for m in ref:
        assert got[m].dtype == torch.float32
        assert not torch.equal(got[m], ref[m])
        assert float(torch.corrcoef(torch.stack([got[m].flatten(), ref[m].flatten()]))[0, 1]) > 0.95
    with pytest.raises(ValueError, match="amp"):
        EN.compute_maps(tiny_, xt, ["gradient"], amp="int8")


def test_auto_sizes_on_cpu(xt, tiny_):
    # 16 rows for ImageNet-sized inputs, more for small ones (at most CPU_SMALL_INPUT_ROWS)
    assert EN.auto_batch_size(tiny_, torch.zeros(2, 3, 224, 224)) == EN.CPU_BATCH_SIZE == 16
    assert EN.auto_batch_size(tiny_, torch.zeros(2, 3, 299, 299)) == 16
    assert EN.auto_batch_size(tiny_, torch.zeros(2, 3, 112, 112)) == 64 == EN.CPU_SMALL_INPUT_ROWS
    assert EN.auto_batch_size(tiny_, torch.zeros(2, 3, 160, 160)) == 31  # 16 x 3x224x224 elements
    assert EN.auto_batch_size(tiny_, torch.zeros(2, 1, 28, 28)) == 64
    assert EN._auto_group_size(xt, 20, 8, 1 << 40) == len(xt)
    assert EN._auto_group_size(torch.zeros(8, 3, 224, 224), 20, 8, 1 << 28) == 2  # 113 MB per image


# ---------------------------------------------------------------- metrics
def test_map_features_equal_similarity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 48, 48, generator=g), torch.randn(5, 3, 48, 48, generator=g)
    a[1] = a[1].round()  # ties
    b[2] = 0.0  # constant map
    a[3, :, :, :24] = 4.0  # a clipped top percentile
    a1, b1 = torch.randn(3, 1, 48, 48, generator=g), torch.randn(3, 1, 48, 48, generator=g)
    b1[0] = 0.0
    for x, y in ((a, b), (a1, b1), (b, b)):
        fa, fb = MT.MapFeatures(x), MT.MapFeatures(y)
        for metric in METRICS:
            torch.testing.assert_close(MT.compare(metric, fa, fb), similarity(x, y, metric),
                                       rtol=0, atol=1e-12)  # fmt: skip
        assert torch.equal(MT.MapFeatures(y).abs_constant(), is_constant(abs_normalize(y).flatten(1)))
        assert torch.equal(fb.abs_constant(), is_constant(abs_normalize(y).flatten(1)))
    with pytest.raises(ValueError, match="NaN"):
        MT.MapFeatures(torch.full((1, 3, 48, 48), float("nan")))
    inf = torch.zeros(1, 3, 48, 48)
    inf[0, 1, 2, 3], inf[0, 2, 3, 4] = math.inf, -math.inf  # the sum is NaN
    for bad in (inf, inf[:, :2]):  # +inf and -inf; +inf alone
        with pytest.raises(ValueError, match="inf"):
            MT.MapFeatures(bad)
    MT.MapFeatures(torch.full((1, 3, 48, 48), 3e38))  # finite values whose sum overflows


def test_hog_metrics_in_the_runner_equal_similarity():
    """The runner's HOG Pearson and HOG Spearman values (maps of 48x48 pixels) equal
    ``similarity`` of the maps computed by ``explain`` on the trained and the randomized model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.rand(2, 2, 48, 48, generator=torch.Generator().manual_seed(0))
    metrics = ["hog_pearson", "hog_spearman"]
    methods = ["gradient", "guided_backprop"]
    # explain runs in PyTorch's default memory format; the runner too, for 1e-9 agreement
    df = sl.run_randomization(model, x, methods, "independent", metrics=metrics, cache=False,
                              progress=False, floor=False, memory_format="contiguous")  # fmt: skip
    orig = {m: explain(model, x, m) for m in methods}
    blocks = get_blocks(model, None, x)
    assert df.stages == [b.name for b in blocks] == ["6", "2", "0"]
    for k, b in enumerate(blocks):
        with sl.randomized(model, [b], seed=0):
            y = sl.predict(model, x).argmax(1)
            for m in methods:
                new = explain(model, x, m, target=y)
                for metric in metrics:
                    got = df[(df.stage == b.name) & (df.method == m) & (df.metric == metric)]
                    want = similarity(orig[m], new, metric).numpy()
                    np.testing.assert_allclose(got.sort_values("image")["value"], want, rtol=0, atol=1e-9)
    v = df.pivot_table(index=["stage", "method", "image"], columns="metric", values="value")
    assert (v["hog_pearson"] - v["hog_spearman"]).abs().max() > 0.01  # the two metrics differ here


def test_model_with_batchnorm_restored_after_pytorch_reinit(xt):
    """PyTorch's re-initialization resets BatchNorm's running statistics and counter: after a
    run (the engine's state switching) and after the reference run, every parameter and buffer
    is back, bit-exactly, and the outputs are the trained model's."""
    model = tiny_model()
    model.bn1.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(xt)
    blocks = ["fc", Block("bn1", ("bn1",)), "conv1"]
    kw = dict(blocks=blocks, perturbation=Perturbation(init="pytorch"), metrics=["spearman"],
              cache=False, progress=False, floor=False)  # fmt: skip
    a = sl.run_randomization(model, xt, ["gradient", "guided_backprop"], engine="batched", **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(xt), y0)
    r = sl.run_randomization(model, xt, ["gradient", "guided_backprop"], engine="reference", **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the BatchNorm stage really changed the maps (its statistics were reset), in both runs alike
    bn = a[a.stage == "bn1"]
    assert (bn["value"] < 0.999).any()
    np.testing.assert_allclose(a["value"], r["value"], rtol=0, atol=1e-6)


def test_custom_metrics_in_the_runner(tiny_, xt):
    def sum_spearman(a, b):
        return pearson(rankdata(a.sum(1).abs().flatten(1)), rankdata(b.sum(1).abs().flatten(1)))

    prepared = sl.Metric("prepared", lambda m: rankdata(m.sum(1).abs().flatten(1)), pearson)
    df = sl.run_randomization(tiny_, xt, ["gradient"], metrics=[sum_spearman, prepared, "spearman"],
                              cache=False, progress=False, floor=False)  # fmt: skip
    v = df.pivot_table(index=["stage", "image"], columns="metric", values="value")
    np.testing.assert_array_equal(v["sum_spearman"], v["prepared"])
    assert not np.allclose(v["sum_spearman"], v["spearman"])
    with pytest.raises(ValueError, match="duplicate"):
        sl.run_randomization(tiny_, xt, ["gradient"], metrics=[sum_spearman, sum_spearman],
                             cache=False, progress=False)  # fmt: skip


# ---------------------------------------------------------------- benchmark workloads (benchmarks/)
def _reset_like_quantus(seed):
    def reset(module, generator):  # Quantus re-seeds the global RNG before every layer
        torch.manual_seed(seed + 1)
        module.reset_parameters()

    return reset


def test_quantus_mprt_workload_through_the_public_api(tiny_, xt):
    """The workload of benchmarks/bench_sanity.py part 1, on the tiny CNN: per-module top-down
    cascade (every module with ``reset_parameters``), Quantus's re-initialization as a user
    initializer, Spearman of |sum over channels| as a user Metric.  Equals the straightforward
    computation (a deep copy re-initialized in place layer after layer, as Quantus does, with
    captum ``Saliency`` and ``scipy.stats.spearmanr``) and the reference runner."""
    import copy

    from captum.attr import Saliency
    from scipy.stats import spearmanr

    names = [n for n, m in tiny_.named_modules() if hasattr(m, "reset_parameters")][::-1]
    metric = sl.Metric("q", lambda m: rankdata(m.sum(1).abs().flatten(1)),
                       lambda a, b: pearson(a, b, on_constant="nan"))  # fmt: skip
    kw = dict(blocks=names, metrics=[metric], seed=42, target="original", store_maps=0,
              perturbation=Perturbation(init=_reset_like_quantus(42)), cache=False,
              progress=False, floor=False)  # fmt: skip
    df = sl.run_randomization(tiny_, xt, ["gradient"], "cascading", **kw)
    ref = sl.run_randomization(tiny_, xt, ["gradient"], "cascading", engine="reference", **kw)
    y = sl.predict(tiny_, xt).argmax(1)
    a0 = Saliency(tiny_).attribute(xt, target=y, abs=False).sum(1).abs().flatten(1).detach()
    rm = copy.deepcopy(tiny_)
    for name in names:
        torch.manual_seed(43)
        rm.get_submodule(name).reset_parameters()
        a = Saliency(rm).attribute(xt, target=y, abs=False).sum(1).abs().flatten(1).detach()
        want = [spearmanr(a0[i], a[i])[0] for i in range(len(xt))]
        got = df[df.stage == name].sort_values("image")["value"].to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-9)
        np.testing.assert_allclose(ref[ref.stage == name].sort_values("image")["value"], want,
                                   atol=1e-9)  # fmt: skip


def test_seeded_captum_noise_tunnel_draws_the_engine_noise(tiny_, xt):
    """The benchmark's captum loop seeds the global RNG per image with
    ``derive_seed(seed, "noise", i)`` before captum's ``NoiseTunnel``: it then draws exactly
    :func:`unit_noise`'s stream, so SmoothGrad and VarGrad agree with the engine's."""
    from captum.attr import NoiseTunnel, Saliency

    from sanitylib.utils import derive_seed

    got = EN.compute_maps(tiny_, xt, ["smoothgrad", "vargrad"], seed=5,
                          method_options={"smoothgrad": {"n_samples": 6},
                                          "vargrad": {"n_samples": 4}})  # fmt: skip
    y = sl.predict(tiny_, xt).argmax(1)
    for i in range(len(xt)):
        xi = xt[i:i + 1]
        sigma = 0.15 * float(xi.max() - xi.min())
        for method, n in (("smoothgrad", 6), ("vargrad", 4)):
            torch.manual_seed(derive_seed(5, "noise", i))
            want = NoiseTunnel(Saliency(tiny_)).attribute(
                xi, nt_type=method, nt_samples=n, nt_samples_batch_size=n, stdevs=sigma,
                target=int(y[i]), abs=False).detach()  # fmt: skip
            assert rel_err(got[method][i:i + 1], want) <= 1e-5, method


def test_abs_constant_without_sorting_at_the_percentile_boundary():
    """``MapFeatures.abs_constant`` counts the pixels at the minimum instead of selecting the
    99th percentile: equal to ``is_constant(abs_normalize(.))`` when the count of minimal
    pixels sits just below, at or above the percentile's two sorted positions."""
    d = 48 * 48
    pos = 0.99 * (d - 1)
    lo = int(pos)
    g = torch.Generator().manual_seed(1)
    maps = []
    for n_min in (0, lo - 1, lo, lo + 1, lo + 2, d - 1, d):
        v = torch.zeros(d)
        v[n_min:] = torch.rand(d - n_min, generator=g) + 1e-3
        for tiny in (1.0, 1e-30):  # a top value so small that the percentile rounds to the min
            m = torch.zeros(3, 48, 48)
            m[1] = (v * tiny).view(48, 48)
            m[2] = -(v * tiny).view(48, 48) * 0.5
            maps.append(m)
    maps = torch.stack(maps) + 0.25 * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    want = is_constant(abs_normalize(maps).flatten(1))
    assert torch.equal(MT.MapFeatures(maps).abs_constant(), want)
    assert want.any() and not want.all()


def test_forward_replay_default_on_cpu_follows_the_allocator(xt, monkeypatch):
    """``reuse_forward=None`` (default): on the CPU, replay only where the user opted in to
    keeping freed memory (``sanitylib.allocator``: a ``keep_freed_memory()`` block or
    ``SANITYLIB_KEEP_FREED_MEMORY=1``) and ``REPLAY_ON_CPU``; the maps are the same either way."""
    from sanitylib import allocator

    model = tiny_model()
    states = _states(model, ["fc", "conv2"])
    calls = []
    real_plan = RP.Recorder.plan
    monkeypatch.setattr(RP.Recorder, "plan", lambda self, cut: calls.append(1) or real_plan(self, cut))
    monkeypatch.delenv("SANITYLIB_KEEP_FREED_MEMORY", raising=False)
    plain = _all_maps(model, xt, ["gradient"], states, {})
    assert not calls  # no opt-in: the allocator is left alone, no replay on the CPU
    monkeypatch.setenv("SANITYLIB_KEEP_FREED_MEMORY", "1")
    default = _all_maps(model, xt, ["gradient"], states, {})
    assert bool(calls) == allocator.keeps_freed_memory()
    calls.clear()
    monkeypatch.delenv("SANITYLIB_KEEP_FREED_MEMORY")
    with allocator.keep_freed_memory() as kept:
        _all_maps(model, xt, ["gradient"], states, {})
    assert bool(calls) == kept
    calls.clear()
    monkeypatch.setattr(EN, "REPLAY_ON_CPU", False)
    with allocator.keep_freed_memory():
        _all_maps(model, xt, ["gradient"], states, {})
    assert not calls
    replayed = _all_maps(model, xt, ["gradient"], states, {}, reuse_forward=True)
    assert calls
    for s in range(len(states)):
        for other in (plain, replayed):
            assert torch.equal(default[0].maps[s]["gradient"], other[0].maps[s]["gradient"])


def test_progress_counts_every_gradient_evaluation(xt):
    """``on_rows`` adds up to ``rows_per_image(...)["total"]`` per image and state (the
    progress bar's total), Guided BackProp's second backward pass included."""
    model = tiny_model()
    states = _states(model, ["fc", "conv2"])
    opts = {"integrated_gradients": {"n_steps": 3}, "smoothgrad": {"n_samples": 2}}
    methods = ["gradient", "guided_backprop", "integrated_gradients", "smoothgrad"]
    counts: list[int] = []
    _all_maps(model, xt, methods, states, opts, on_rows=counts.append)
    per = EN.rows_per_image(methods, opts)
    assert per["guided"] == 1
    assert sum(counts) == per["total"] * len(xt) * len(states)


# ---------------------------------------------------------------- nonzero baseline
def test_engine_integrated_gradients_with_a_nonzero_baseline_equals_captum(xt):
    """The engine's IG multiplies by ``x - baseline`` (old runner tests all used baseline 0,
    where ``x`` and ``x - baseline`` agree)."""
    from captum.attr import IntegratedGradients

    model = tiny_model()
    t = sl.predict(model, xt).argmax(1)
    for baseline in (0.3, torch.full((1, 16, 16), -0.2) + 0.1 * xt[0]):
        ref = IntegratedGradients(model).attribute(xt, target=t, baselines=baseline.expand_as(xt)
                                                   if isinstance(baseline, torch.Tensor) else baseline,
                                                   n_steps=5, method="riemann_trapezoid")  # fmt: skip
        opts = {"integrated_gradients": {"n_steps": 5, "baseline": baseline, "rule": "riemann_trapezoid"}}
        got = EN.compute_maps(model, xt, ["integrated_gradients"], t, method_options=opts,
                              batch_size=4)["integrated_gradients"]  # fmt: skip
        assert rel_err(got, ref) < 1e-5
        states = _states(model, ["fc"])
        maps = list(EN.iter_state_maps(model, xt, ["integrated_gradients"], states, target=t,
                                       method_options=opts, batch_size=4))[0].maps[0]  # fmt: skip
        assert rel_err(maps["integrated_gradients"], ref) < 1e-5


def test_engine_refuses_a_baseline_of_the_wrong_shape_before_any_work(xt):
    model = tiny_model()
    opts = {"integrated_gradients": {"baseline": torch.zeros(2, 5, 5)}}
    with pytest.raises(ValueError, match=r"method_options\['integrated_gradients'\]\['baseline'\] of shape"):
        EN.compute_maps(model, xt, ["integrated_gradients"], method_options=opts)


def test_maps_inside_a_callers_no_grad_equal_the_maps_outside(xt):
    """Evaluation code wrapped in torch.no_grad(): the gradient methods failed ("element 0 of
    tensors does not require grad"), in explain and in the runners."""
    model = tiny_model()
    methods = ["gradient", "smoothgrad", "guided_backprop", "gradcam"]
    opts = {"smoothgrad": {"n_samples": 2}, "gradcam": {"layer": "bn1"}}
    kw = dict(method_options=opts, metrics=["spearman"], cache=False, progress=False, floor=False)
    out_maps = {m: explain(model, xt, m, **opts.get(m, {})) for m in methods}
    out_table = sl.cascading_randomization(model, xt, methods, **kw)
    with torch.no_grad():
        for m in methods:
            torch.testing.assert_close(explain(model, xt, m, **opts.get(m, {})), out_maps[m])
        table = sl.cascading_randomization(model, xt, methods, **kw)
        assert not torch.is_grad_enabled()  # the caller's mode is given back
    pd.testing.assert_frame_equal(pd.DataFrame(table), pd.DataFrame(out_table))
