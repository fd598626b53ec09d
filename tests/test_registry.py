"""The method and metric registries: a user's callable, a captum class and a registered name run
through ``explain``, both randomization runners, the cache, the noise floors and the figures,
and give the table of the equivalent built-in where one exists.

A tiny random CNN (1x16x16) keeps most tests fast; torchvision's ``resnet18(weights=None)`` is
the model we did not write.
"""

from __future__ import annotations

import matplotlib
import pytest
import torch
import torchvision
from captum.attr import GuidedBackprop, InputXGradient, Saliency
from torch import nn

import sanitylib as sl
from sanitylib.registry import MethodSpec, resolve_method
from reference import TinyCNN

matplotlib.use("Agg")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]

METRICS = ["spearman_abs", "spearman", "ssim"]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def xt():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 16, 16, generator=g)


def plain_gradient(model, x, target):
    """The gradient of the target logit, written as a user would."""
    x = x.clone().requires_grad_(True)
    out = model(x).gather(1, target[:, None]).sum()
    return torch.autograd.grad(out, x)[0]


@pytest.fixture
def user_methods():
    names = []

    def register(name, fn, **kw):
        names.append(name)
        return sl.register_method(name, fn, **kw)

    yield register
    for n in names:
        if n in sl.method_names():
            sl.unregister_method(n)


def _values(df, method):
    return df[df["method"] == method].sort_values(["stage_index", "metric", "image"])["value"].to_numpy()


def test_explain_accepts_callable_captum_class_and_registered_name(tiny, xt, user_methods):
    ref = sl.explain(tiny, xt, "gradient")
    assert torch.allclose(sl.explain(tiny, xt, plain_gradient), ref, atol=1e-7)
    user_methods("my_gradient", plain_gradient, label="My gradient")
    assert torch.allclose(sl.explain(tiny, xt, "my_gradient"), ref, atol=1e-7)
    ixg = sl.explain(tiny, xt, "input_x_gradient")
    assert torch.allclose(sl.explain(tiny, xt, InputXGradient), ixg, atol=1e-7)
    user_methods("signed_saliency", Saliency, options={"abs": False})
    assert torch.allclose(sl.explain(tiny, xt, "signed_saliency"), ref, atol=1e-7)
    # options of a registered method are validated and can be overridden
    assert torch.allclose(sl.explain(tiny, xt, "signed_saliency", abs=True), ref.abs(), atol=1e-7)
    with pytest.raises(ValueError, match="unknown option.*n_steps.*signed_saliency"):
        sl.explain(tiny, xt, "signed_saliency", n_steps=3)


@pytest.mark.parametrize("schedule", ["cascading", "independent"])
def test_runner_user_method_equals_builtin(tiny, xt, schedule, user_methods):
    """The same table (values, targets, constant flags) for "gradient", the callable, the
    registered name and captum's Saliency(abs=False), on every stage."""
    user_methods("my_gradient", plain_gradient)
    user_methods("signed_saliency", Saliency, options={"abs": False})
    methods = ["gradient", plain_gradient, "my_gradient", "signed_saliency"]
    df = sl.run_randomization(tiny, xt, methods, schedule, metrics=METRICS, cache=False,
                              progress=False, store_maps=[0, 1])  # fmt: skip
    assert list(dict.fromkeys(df["method"])) == ["gradient", "plain_gradient", "my_gradient",
                                                  "signed_saliency"]  # fmt: skip
    ref = _values(df, "gradient")
    assert len(ref) == len(df.stages) * len(METRICS) * len(xt)
    for m in ("plain_gradient", "my_gradient", "signed_saliency"):
        assert abs(_values(df, m) - ref).max() < 1e-6, m
        for col in ("target", "constant"):
            a = df[df["method"] == m].sort_values(["stage_index", "metric", "image"])[col]
            b = df[df["method"] == "gradient"].sort_values(["stage_index", "metric", "image"])[col]
            assert (a.to_numpy() == b.to_numpy()).all()
    # maps stored per stage and the noise floors, for the user methods too
    store = df.maps
    for stage in store.stages:
        assert torch.allclose(store[stage]["my_gradient"].float(), store[stage]["gradient"].float(),
                              atol=1e-3)  # float16 storage
    floor = df.floor
    for m in ("my_gradient", "signed_saliency"):
        a = floor[floor["method"] == m].sort_values(["metric", "pair"])["value"].to_numpy()
        b = floor[floor["method"] == "gradient"].sort_values(["metric", "pair"])["value"].to_numpy()
        assert len(a) == len(METRICS) * 3 and abs(a - b).max() < 1e-6


def test_user_method_changes_with_the_model(tiny, xt, user_methods):
    """A user method is called on every model state: a method that ignores the model scores 1
    at every stage, one that uses it does not."""
    calls = []

    def constant_map(model, x, target):
        calls.append(len(x))
        return x * 2.0

    user_methods("input_only", constant_map)
    df = sl.cascading_randomization(tiny, xt, ["input_only", plain_gradient], metrics=["spearman"],
                                    cache=False, progress=False, batch_size=2)  # fmt: skip
    n_states = len(df.stages) + 1
    assert calls == [2, 1] * n_states  # batched over images, in chunks of batch_size
    assert (df[df["method"] == "input_only"]["value"] == 1.0).all()
    assert (df[df["method"] == "plain_gradient"]["value"] < 0.99).all()


def test_user_method_through_the_cache(tiny, xt, tmp_path, user_methods):
    """A cached run of a user method is reused; another function under the same name is not."""
    user_methods("mine", plain_gradient)
    kw = dict(metrics=METRICS, cache=tmp_path, progress=False)
    df1 = sl.cascading_randomization(tiny, xt, ["mine"], **kw)
    df2 = sl.cascading_randomization(tiny, xt, ["mine"], **kw)
    assert df1.equals(df2)
    assert len(list(tmp_path.iterdir())) == 1

    def doubled(model, x, target):
        return 2 * plain_gradient(model, x, target) + x

    user_methods("mine", doubled)  # re-registering a user name replaces it
    df3 = sl.cascading_randomization(tiny, xt, ["mine"], **kw)
    assert len(list(tmp_path.iterdir())) == 2
    assert not df3["value"].equals(df1["value"])


def test_user_metric_callable_and_registered(tiny, xt):
    def neg_l1(a, b):
        return -(a - b).abs().flatten(1).sum(1)

    sl.register_metric("neg_l1", neg_l1, label="-L1")
    with pytest.raises(ValueError, match="duplicate metric names"):
        sl.cascading_randomization(tiny, xt, ["gradient"], metrics=["neg_l1", neg_l1],
                                   cache=False, progress=False)  # fmt: skip
    df = sl.cascading_randomization(tiny, xt, ["gradient"], metrics=["spearman", "neg_l1"],
                                    cache=False, progress=False, store_maps=[0])  # fmt: skip
    maps = df.maps
    first = df.stages[0]
    got = df.query("metric == 'neg_l1' and stage == @first and image == 0")["value"].item()
    want = neg_l1(maps["original"]["gradient"].float(), maps[first]["gradient"].float()).item()
    assert got == pytest.approx(want, rel=1e-3)  # stored maps are float16
    floor = df.floor
    assert set(floor["metric"]) == {"spearman", "neg_l1"}
    assert sl.plots.METRIC_LABELS["neg_l1"] == "-L1"
    sl.unregister_metric("neg_l1")
    with pytest.raises(ValueError, match="unknown metric 'neg_l1'"):
        sl.cascading_randomization(tiny, xt, ["gradient"], metrics=["neg_l1"], cache=False,
                                   progress=False)  # fmt: skip


def test_figures_accept_user_methods(tiny, xt, user_methods):
    import matplotlib.pyplot as plt

    user_methods("mine", plain_gradient, label="My method")
    df = sl.cascading_randomization(tiny, xt, ["gradient", "mine"], metrics=METRICS, cache=False,
                                    progress=False, store_maps=[0])  # fmt: skip
    fig = sl.plots.similarity_curves(df, METRICS, ["gradient", "mine"])
    labels = {t.get_text() for ax in fig.axes for t in (ax.get_legend().get_texts()
                                                         if ax.get_legend() else [])}
    labels |= {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert "My method" in labels
    # its own colour: matplotlib's default cycle gave it the Gradient's blue
    color = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert color["My method"] != color[sl.method_label("gradient")]
    plt.close(fig)
    fig = sl.plots.stage_grid(df.maps, 0, ["mine", "gradient"])
    assert "My method" in {ax.get_ylabel() for ax in fig.axes}
    plt.close(fig)


def test_resnet18_user_method_and_captum_class():
    """A model we did not write: torchvision resnet18 (random weights, in train mode as
    torchvision builds it); a user callable and captum's InputXGradient through both runners."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for schedule in ("cascading", "independent"):
        df = sl.run_randomization(model, x, [plain_gradient, InputXGradient, "input_x_gradient"],
                                  schedule, blocks=["fc", "layer4", "layer3"],
                                  metrics=["spearman_abs", "ssim"], cache=False, progress=False)  # fmt: skip
        assert list(df.stages) == ["fc", "layer4", "layer3"]
        a, b = _values(df, "InputXGradient"), _values(df, "input_x_gradient")
        assert len(a) == 3 * 2 * 2 and abs(a - b).max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_modified_backprop_captum_class_is_guarded():
    """captum's GuidedBackprop passed as a class gets the same guard as the built-in: on a model
    with functional ReLUs it would silently return the plain gradient."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc = nn.Linear(3 * 14 * 14, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model = Functional().eval()
    x = torch.rand(2, 1, 16, 16)
    assert resolve_method(GuidedBackprop).guided
    with pytest.raises(sl.GuidedBackpropError):
        sl.explain(model, x, GuidedBackprop)


def test_bad_methods_get_clear_errors(tiny, xt, user_methods):
    with pytest.raises(ValueError, match="unknown method 'nope'.*register_method"):
        sl.explain(tiny, xt, "nope")
    with pytest.raises(TypeError, match="a method must be"):
        sl.explain(tiny, xt, 42)
    with pytest.raises(TypeError, match=r"fn must take \(model, x, target\)"):
        sl.register_method("two_args", lambda model, x: x)
    with pytest.raises(ValueError, match="built-in method"):
        sl.register_method("gradient", plain_gradient)
    with pytest.raises(ValueError, match=r"returned shape \(3, 256\) for input \(3, 1, 16, 16\)"):
        sl.explain(tiny, xt, lambda m, x, t: x.flatten(2)[:, 0])
    with pytest.raises(ValueError, match="duplicate method names"):
        sl.cascading_randomization(tiny, xt, [plain_gradient, plain_gradient], cache=False,
                                   progress=False)  # fmt: skip
    # one (N, 1, H, W) map per image is tiled over the channels, as GradCAM
    x3 = xt.expand(-1, 3, -1, -1)

    class Tiny3(TinyCNN):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)

    m3 = Tiny3().eval()
    out = sl.explain(m3, x3, lambda m, x, t: x[:, :1])
    assert out.shape == x3.shape
    # a string is one method
    df = sl.cascading_randomization(tiny, xt, "gradient", metrics="spearman", cache=False,
                                    progress=False)  # fmt: skip
    assert set(df["method"]) == {"gradient"} and set(df["metric"]) == {"spearman"}


def test_builtins_are_specs_with_the_papers_settings():
    for name in sl.METHODS:
        spec = sl.get_method(name)
        assert isinstance(spec, MethodSpec) and spec.builtin and spec.passes is not None
        assert spec.options == sl.attribution.PAPER_SETTINGS.get(name, {})
        assert sl.method_label(name) == sl.plots.METHOD_LABELS[name]
    assert sl.get_method("guided_backprop").guided and sl.get_method("guided_gradcam").guided
    assert not sl.get_method("gradient").guided
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        sl.get_method("smoothgrad").settings({"n_samples": 0})
    with pytest.raises(ValueError, match=r"noise_level must be a finite number in \[0, 10\]"):
        sl.get_method("vargrad").settings({"noise_level": float("nan")})
    with pytest.raises(ValueError, match="n_steps must be an int >= 1"):
        sl.get_method("integrated_gradients").settings({"n_steps": 0})


def test_data_randomization_takes_user_methods_and_keeps_the_models_mode(tiny, xt, user_methods):
    """The MNIST data-randomization runner goes through the registry like the others: a
    registered name and a bare callable give the built-in gradient's values; both models come
    back in the mode they were given in."""
    from sanitylib.mnist import data_randomization

    torch.manual_seed(1)
    other = TinyCNN().train()
    user_methods("user_gradient_dr", plain_gradient)
    df = data_randomization(tiny, other, xt, ["gradient", "user_gradient_dr", plain_gradient],
                            metrics=["spearman_abs"], progress=False)  # fmt: skip
    assert set(df["method"]) == {"gradient", "user_gradient_dr", "plain_gradient"}
    ref = df[df["method"] == "gradient"]["value"].to_numpy()
    for m in ("user_gradient_dr", "plain_gradient"):
        assert abs(df[df["method"] == m]["value"].to_numpy() - ref).max() < 1e-5
    assert not tiny.training and other.training
    with pytest.raises(ValueError, match="no_such_method"):
        data_randomization(tiny, other, xt, ["no_such_method"], progress=False)
    # a user's metric as a bare callable, as the runners take it (it was looked up again by its
    # name after every map was computed: "unknown metric 'neg_l1'")
    def neg_l1(a, b):
        return -(a - b).abs().flatten(1).mean(1)

    df = data_randomization(tiny, other, xt, ["gradient"], metrics=["spearman_abs", neg_l1],
                            progress=False)  # fmt: skip
    l1 = df[df.metric == "neg_l1"].value.to_numpy()
    maps = df.attrs["maps"]
    assert torch.allclose(torch.as_tensor(l1), neg_l1(maps["true"]["gradient"], maps["random"]["gradient"]).double())
    assert set(df.attrs["floor"].metric) == {"spearman_abs", "neg_l1"}
    one = data_randomization(tiny, other, xt, "gradient", progress=False)  # was "unknown method 'g'"
    assert set(one.method) == {"gradient"}


# ---------------------------------------------------------------- built-in names are not replaced
def test_a_user_metric_cannot_take_a_built_in_metrics_name(tiny, xt):
    """A user metric never appears under a built-in's name: registering one is refused (as for
    methods), and so is a callable whose ``__name__`` is a built-in's."""
    def ssim(a, b):  # noqa: ARG001 - a user's metric named like the built-in
        return torch.zeros(len(a))

    before = sl.registry.get_metric("ssim")
    for name in sl.metric_names(builtin=True):
        with pytest.raises(ValueError, match="built-in metric"):
            sl.register_metric(name, ssim)
        assert sl.registry.get_metric(name).builtin
    assert sl.registry.get_metric("ssim") is before
    with pytest.raises(ValueError, match="callable named 'ssim'.*built-in metric"):
        sl.cascading_randomization(tiny, xt, ["gradient"], metrics=[ssim], cache=False, progress=False)
    df = sl.cascading_randomization(tiny, xt, ["gradient"], metrics=["ssim"], cache=False,
                                    progress=False, floor=False)  # fmt: skip
    assert (df.value != 0).any()  # the built-in ran


def test_a_callable_method_cannot_take_a_built_in_methods_name(tiny, xt):
    def gradient(model, x, target):  # noqa: ARG001
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="built-in method"):
        sl.register_method("gradient", gradient)
    with pytest.raises(ValueError, match="callable named 'gradient'.*built-in method"):
        sl.explain(tiny, xt, gradient)
    assert sl.registry.get_method("gradient").builtin


def test_a_built_in_spec_is_not_registered_under_another_name():
    """It became a protected built-in under the new name (it could be neither replaced nor
    removed), and options given with a spec were dropped silently."""
    with pytest.raises(ValueError, match="'gradient' is a built-in method"):
        sl.register_method("my_gradient", sl.registry.get_method("gradient"))
    assert "my_gradient" not in sl.method_names()
    spec = sl.followup.smoothed_method("gradient", n_samples=2)  # a user spec
    with pytest.raises(ValueError, match="options: a MethodSpec carries its own"):
        sl.register_method("smooth_gradient", spec, options={"k": 1})
    try:
        assert not sl.register_method("smooth_gradient", spec).builtin
    finally:
        sl.unregister_method("smooth_gradient")


# ---------------------------------------------------------------- batch independence of seeds
def noisy_input(model, x, target, seed):  # noqa: ARG001
    """A seeded user method: the input plus noise from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    return x + torch.randn(x.shape, generator=gen)


def noisy_gradient(model, x, target, seed):
    """A seeded user method that depends on the model: the gradient at a noisy input."""
    gen = torch.Generator().manual_seed(seed)
    return plain_gradient(model, x + 0.3 * torch.randn(x.shape, generator=gen), target)


def test_seeded_user_method_does_not_depend_on_the_batching(tiny, xt):
    """A user method with a ``seed`` argument is called one image at a time with that image's
    seed (``image_seed(seed, image index)``), so its maps do not depend on how the images are
    batched (old: one call per batch with the run's seed: the noise of image 1 depended on
    whether it shared a batch with image 0), as the built-in stochastic methods."""
    from sanitylib.attribution import image_seed

    x = torch.cat([xt, xt.flip(-1)])[:4]  # 4 images
    seeds = []

    def recording(model, x, target, seed):
        seeds.append(seed)
        return noisy_input(model, x, target, seed)

    full = sl.explain(tiny, x, recording, seed=3, batch_size=4)
    assert seeds == [image_seed(3, i) for i in range(4)]
    for bs in (1, 3):
        torch.testing.assert_close(sl.explain(tiny, x, noisy_input, seed=3, batch_size=bs), full,
                                   rtol=0, atol=0)  # fmt: skip
    assert not torch.equal(full[0] - x[0], full[1] - x[1])  # every image its own noise
    # the runners: batch size and image subsets (the command line's shards) do not matter
    kw = dict(metrics=["spearman"], cache=False, progress=False, floor=False, seed=3, store_maps=0)
    a = sl.cascading_randomization(tiny, x, [noisy_gradient], batch_size=1, **kw)
    b = sl.cascading_randomization(tiny, x, [noisy_gradient], batch_size=4, **kw)
    assert a.value.tolist() == b.value.tolist()
    assert a.value.nunique() > 2  # the values depend on the noise and the state
    sub = sl.cascading_randomization(tiny, x[2:], [noisy_gradient], image_ids=[2, 3], **kw)
    assert sub.value.tolist() == a[a.image >= 2].value.tolist()
    # built-in stochastic methods are batch-independent too
    for m in ("smoothgrad", "vargrad", "ig_smoothgrad"):
        opts = {"n_samples": 3, **({"n_steps": 2} if m == "ig_smoothgrad" else {})}
        one = sl.explain(tiny, x, m, seed=3, batch_size=1, **opts)
        torch.testing.assert_close(sl.explain(tiny, x, m, seed=3, batch_size=32, **opts), one,
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def test_a_function_that_cannot_be_called_as_sanitylib_calls_it_is_refused_at_registration():
    """Each failed at its first call, inside a run, after other methods' maps were computed."""
    def two_args(model, x, target, scale):  # noqa: ARG001
        return x

    def plain(model, x, target):  # noqa: ARG001
        return x

    def seeded(model, x, target, seed):  # noqa: ARG001
        return x

    for fn, options, message in ((plain, {"scale": 2.0}, "takes no keyword argument 'scale'"),
                                 (two_args, None, "argument 'scale' has no default"),
                                 (seeded, {"seed": 1}, "must not set 'seed'")):  # fmt: skip
        with pytest.raises(TypeError, match=message):
            sl.register_method("cannot_call", fn, options=options)
        assert "cannot_call" not in sl.method_names()
    try:  # the same function with the option declared is fine, and so is **kwargs
        sl.register_method("cannot_call", two_args, options={"scale": 2.0})
        sl.register_method("cannot_call", lambda model, x, target, **kw: x, options={"k": 1})
    finally:
        sl.unregister_method("cannot_call")
