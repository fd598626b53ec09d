"""Bad input gets a clear error, the model is the user's (issue 12).

Every entry point (``explain``, ``engine.compute_maps``, ``engine.iter_state_maps``) validates its
arguments against the model up front, with messages that name the argument and the valid range;
runs the model in eval mode and gives it back with its training flags and buffers untouched;
Guided BackProp warns where other nonlinearities run beside the ReLUs; block inference descends
into single-child wrappers.  Tiny models throughout (2 shared CPU cores).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sanitylib import attribution as A
from sanitylib import engine as E
from sanitylib import randomize as R
from sanitylib.models import Block

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]


# ---------------------------------------------------------------- models
class TinyCNN(nn.Module):
    """3 input channels, 5 classes, nn.ReLU modules, a BatchNorm (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def tiny() -> TinyCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN().eval()


class TupleOut(TinyCNN):
    def forward(self, x):
        return super().forward(x), x.mean()


class InPlaceInput(TinyCNN):
    """Normalizes its input in place, as some preprocessing-inside-the-model code does."""

    def forward(self, x):
        return super().forward(x.sub_(0.5).div_(0.25))


class SoftmaxOut(TinyCNN):
    def forward(self, x):
        return super().forward(x).softmax(1)


class Mixed(TinyCNN):
    """nn.ReLU modules plus functional non-ReLU nonlinearities the guided rule ignores."""

    def forward(self, x):
        h = self.relu1(self.bn(self.conv1(x)))
        h = F.silu(h) + torch.sigmoid(h) + torch.maximum(h, -h)
        # not ReLU-like: clamp(min=1e-3), a max over a dimension (clamp(min=0) is a ReLU: refused)
        h = F.gelu(h) + h.clamp(min=1e-3) + torch.max(h, dim=1, keepdim=True).values
        h = self.relu2(self.conv2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 4).flatten(1))


def functional_forward(self, x):  # the same network with one functional ReLU
    x = self.relu2(self.conv2(F.relu(self.bn(self.conv1(x)))))
    return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


class Wrapper(nn.Module):
    """A model that wraps its network in a single child."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


CHEAP = {"integrated_gradients": {"n_steps": 2}, "smoothgrad": {"n_samples": 2},
         "vargrad": {"n_samples": 2}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 2}}  # fmt: skip


def _engine_maps(model, x, methods, target="current", **kw):
    """iter_state_maps on the model as it is (one state), consumed."""
    return list(E.iter_state_maps(model, x, methods, [()], target=target, batch_size=8, **kw))


def _every_entry_point(model, x, method, options=None, target=None):
    """Call ``method`` through explain, compute_maps and iter_state_maps; yield (name, thunk)."""
    options = options or {}
    yield "explain", lambda: A.explain(model, x, method, target, **options)
    yield "compute_maps", lambda: E.compute_maps(model, x, [method], target,
                                                 method_options={method: options}, batch_size=8)
    engine_target = "current" if target is None else target
    yield "iter_state_maps", lambda: _engine_maps(model, x, [method], engine_target,
                                                  method_options={method: options})


# ---------------------------------------------------------------- sample and step counts, noise
@pytest.mark.parametrize("method, options, words", [
    ("smoothgrad", {"n_samples": 0}, ("n_samples", ">= 1")),
    ("vargrad", {"n_samples": 0}, ("n_samples", ">= 1")),
    ("ig_smoothgrad", {"n_samples": 0, "n_steps": 2}, ("n_samples", ">= 1")),
    ("integrated_gradients", {"n_steps": 0}, ("n_steps", ">= 1")),
    ("ig_smoothgrad", {"n_samples": 2, "n_steps": 0}, ("n_steps", ">= 1")),
    ("smoothgrad", {"n_samples": 2.5}, ("n_samples", "int")),
    ("smoothgrad", {"n_samples": 2, "noise_level": 1e40}, ("noise_level", "[0, 10]")),
    ("smoothgrad", {"n_samples": 2, "noise_level": float("nan")}, ("noise_level", "[0, 10]")),
    ("vargrad", {"n_samples": 2, "noise_level": float("inf")}, ("noise_level", "[0, 10]")),
    ("vargrad", {"n_samples": 2, "noise_level": -1}, ("noise_level", "[0, 10]")),
    ("ig_smoothgrad", {"n_samples": 2, "n_steps": 2, "noise_level": -0.1}, ("noise_level",)),
])  # fmt: skip
def test_counts_and_noise_levels_are_checked_at_every_entry_point(x, method, options, words):
    """Old: n_samples=0 gave a NaN map through explain, n_steps=0 a ZeroDivisionError,
    noise_level=1e40/nan a finite map identical for every image, -1 was accepted."""
    model = tiny()
    for where, call in _every_entry_point(model, x, method, options):
        with pytest.raises(ValueError) as err:
            call()
        for w in words:
            assert w in str(err.value), (where, str(err.value))


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "gradcam"])
@pytest.mark.parametrize("target, words", [
    (-1, ("target", "[0, 5)")),       # old: wrapped to class 4 on Guided BackProp and GradCAM
    ([0, -2], ("target", "[0, 5)")),
    (5, ("target", "[0, 5)")),        # old: a deep captum IndexError
    (1.7, ("target", "int")),         # old: silently class 1
    ("cat", ("target",)),             # old: a torch dtype error
    (True, ("target",)),
    (torch.tensor([1.0, 2.0]), ("target", "float")),
])  # fmt: skip
def test_targets_must_be_class_indices_in_range(x, method, target, words):
    model = tiny()
    options = {"layer": "relu2"} if method == "gradcam" else {}
    for where, call in _every_entry_point(model, x, method, options, target):
        if where == "iter_state_maps" and not isinstance(target, torch.Tensor):
            target_t = target  # the engine takes 'current', 'original' or a tensor
            with pytest.raises(ValueError, match="target"):
                _engine_maps(model, x, [method], target_t, method_options={method: options})
            continue
        with pytest.raises(ValueError) as err:
            call()
        for w in words:
            assert w in str(err.value), (where, str(err.value))


def test_engine_tensor_targets_are_checked_against_the_class_count(x):
    model = tiny()
    for bad in (torch.tensor([0, 5]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="target"):
            _engine_maps(model, x, ["gradient"], bad)
    ok = _engine_maps(model, x, ["gradient"], torch.tensor([0, 4]))
    assert ok[0].targets.tolist() == [[0, 4]]
    # valid targets of every accepted type still work in explain
    for t in (3, [0, 4], torch.tensor([1, 2]), torch.tensor(2)):
        assert A.explain(model, x, "gradient", t).shape == x.shape


# ---------------------------------------------------------------- the batch itself
def test_an_empty_batch_is_refused_by_name(x):
    """Old: 'min(): Expected reduction dim', 'stack expects a non-empty TensorList', IndexError."""
    model = tiny()
    empty = x[:0]
    for method in ("gradient", "smoothgrad", "integrated_gradients", "guided_backprop"):
        for where, call in _every_entry_point(model, empty, method, CHEAP.get(method)):
            with pytest.raises(ValueError, match="x must hold at least one image"):
                call()


def test_wrong_channel_count_names_x_and_the_expected_channels(x):
    """Old: a raw convolution error deep inside the model."""
    for model in (tiny(), torchvision.models.resnet18(weights=None).eval()):
        grey = x[:, :1]
        for where, call in _every_entry_point(model, grey, "gradient"):
            with pytest.raises(ValueError) as err:
                call()
            msg = str(err.value)
            assert "x of shape (2, 1, 8, 8)" in msg, (where, msg)
            assert "expects 3 input channels" in msg, (where, msg)
            assert isinstance(err.value.__cause__, RuntimeError)  # the original error is chained


@pytest.mark.parametrize("dtype, fix", [(torch.float64, "x.float()"), (torch.float16, "x.float()")])
def test_input_dtype_must_match_the_parameters(x, dtype, fix):
    """Old: raw dtype errors from the first convolution."""
    model = tiny()
    name = str(dtype).replace("torch.", "")
    for where, call in _every_entry_point(model, x.to(dtype), "gradient"):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (f"x has dtype {name} but the model's parameters are float32; "
                                  f"convert with {fix}"), where  # fmt: skip
    # a float64 model takes float64 input (and is told to convert float32)
    double = tiny().double()
    assert A.explain(double, x.double(), "gradient").dtype == torch.float64
    with pytest.raises(ValueError, match=r"convert with x\.double\(\)"):
        A.explain(double, x, "gradient")


# ---------------------------------------------------------------- what the model returns
def test_a_model_returning_a_tuple_must_return_logits(x):
    """Old: explain gave 'TypeError: expected Tensor as element 0'."""
    model = TupleOut().eval()
    for method in ("gradient", "guided_backprop", "integrated_gradients"):
        for where, call in _every_entry_point(model, x, method, CHEAP.get(method)):
            with pytest.raises(TypeError, match=r"must return logits \(N, classes\)"):
                call()


def test_a_model_that_overwrites_its_input_is_refused_and_the_images_are_untouched(x):
    """Old: the first forward pass overwrote the user's images (the probe passed a view of
    them), then the gradient pass failed with autograd's 'a leaf Variable that requires grad is
    being used in an in-place operation'."""
    import sanitylib as sl

    model = InPlaceInput().eval()
    given = x.clone()
    for method in ("gradient", "smoothgrad"):
        for where, call in _every_entry_point(model, x, method, CHEAP.get(method)):
            with pytest.raises(ValueError, match="modifies its input in place"):
                call()
            assert torch.equal(x, given), where
    with pytest.raises(ValueError, match="modifies its input in place"):
        sl.cascading_randomization(model, x, ["gradient"], metrics=["spearman"], progress=False,
                                   cache=False)  # fmt: skip
    assert torch.equal(x, given)


def test_probability_outputs_warn_once(x):
    model = SoftmaxOut().eval()
    with pytest.warns(A.ProbabilityOutputWarning, match="softmax outputs differs from the paper's"):
        A.explain(model, x, "gradient")
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.ProbabilityOutputWarning)
        A.explain(model, x, "gradient")  # once per model
        E.compute_maps(model, x, ["gradient"])
    with pytest.warns(A.ProbabilityOutputWarning):  # the engine warns too (a fresh model)
        E.compute_maps(SoftmaxOut().eval(), x, ["gradient"])
    with pytest.warns(A.ProbabilityOutputWarning):  # log-probabilities as well
        A.explain(nn.Sequential(tiny(), nn.LogSoftmax(1)), x, "gradient")
    with warnings.catch_warnings():  # logits do not warn
        warnings.simplefilter("error", A.ProbabilityOutputWarning)
        A.explain(tiny(), x, "gradient")


# ---------------------------------------------------------------- Guided BackProp guard
def test_guided_backprop_warns_on_mobilenet_v3_hardswish_and_hardsigmoid():
    """Old: mobilenet_v3_small (14 ReLU, 19 Hardswish, 9 Hardsigmoid calls) accepted silently."""
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x = torch.rand(1, 3, 64, 64)
    with pytest.warns(A.GuidedBackpropWarning) as rec:
        A.explain(model, x, "guided_backprop")
    assert len([w for w in rec if issubclass(w.category, A.GuidedBackpropWarning)]) == 1
    msg = str(rec[0].message)
    for words in ("only to the 14 nn.ReLU", "nn.Hardswish x19", "nn.Hardsigmoid x9",
                  "features.0.2", "scale_activation"):  # fmt: skip
        assert words in msg, msg
    with warnings.catch_warnings():  # once per model
        warnings.simplefilter("error", A.GuidedBackpropWarning)
        A.explain(model, x, "guided_backprop")
        E.compute_maps(model, x, ["guided_backprop"])
        A.explain(model, torch.rand(1, 3, 32, 32), "guided_backprop")  # another input size


def test_guard_lists_functional_nonlinearities_in_every_entry_point(x):
    for i in range(3):  # a fresh model per entry point: the warning comes once per model
        where, call = list(_every_entry_point(Mixed().eval(), x, "guided_backprop"))[i]
        with pytest.warns(A.GuidedBackpropWarning) as rec:
            call()
        msg = str([w.message for w in rec if issubclass(w.category, A.GuidedBackpropWarning)][0])
        for words in ("only to the 2 nn.ReLU", "F.silu x1", "torch.sigmoid x1",
                      "torch.maximum x1", "F.gelu x1"):  # fmt: skip
            assert words in msg, (where, msg)
        assert "min=0) x2" not in msg and "torch.max(a, b)" not in msg  # clamp(min=1e-3), max(dim)
    with warnings.catch_warnings():  # a pure ReLU network: no warning
        warnings.simplefilter("error", A.GuidedBackpropWarning)
        A.explain(tiny(), x, "guided_backprop")


def test_guard_cache_follows_changes_of_forward_and_modules(x):
    """Old: the per-instance cache only looked at the modules: a reassigned forward kept the
    earlier verdict."""
    model = tiny()
    assert A.check_guided_backprop(model, x) == 2
    assert A.check_guided_backprop(model, x) == -1  # cached
    model.forward = types.MethodType(functional_forward, model)
    with pytest.raises(A.GuidedBackpropError, match="F.relu"):
        A.explain(model, x, "guided_backprop")
    del model.forward  # back to the class's forward: its (cached) verdict holds again
    assert A.explain(model, x, "guided_backprop").shape == x.shape
    model.relu1 = nn.ReLU6()
    with pytest.raises(A.GuidedBackpropError, match="ReLU6"):
        A.explain(model, x, "guided_backprop")
    model.relu1 = nn.SiLU()
    with pytest.warns(A.GuidedBackpropWarning, match="nn.SiLU x1"):
        A.explain(model, x, "guided_backprop")
    # the model probe is re-run too: a forward that now returns a tuple is caught
    model.forward = types.MethodType(lambda self, inp: (TinyCNN.forward(self, inp),), model)
    with pytest.raises(TypeError, match="must return logits"):
        A.explain(model, x, "gradient")


# ---------------------------------------------------------------- the model is the user's
def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def _assert_untouched(model, state, modes):
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"{len(changed)} state_dict entries changed, e.g. {changed[:3]}"
    assert _modes(model) == modes


def test_every_entry_point_leaves_a_training_model_untouched():
    """Old: explain on resnet18 in train mode changed 60 state_dict entries (BatchNorm running
    statistics), and the engine only restored the top-level training flag."""
    model = torchvision.models.resnet18(weights=None)  # torchvision builds it in train mode
    model.layer2.eval()  # a mix of train and eval submodules must survive as well
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = _modes(model)
    assert modes[""] and not modes["layer2"]
    options = dict(CHEAP, gradcam={"layer": "layer4"}, guided_gradcam={"layer": "layer4"})
    for method in A.METHODS:
        m = A.explain(model, x, method, **options.get(method, {}))
        assert m.shape == x.shape and torch.isfinite(m).all(), method
        _assert_untouched(model, state, modes)
    E.compute_maps(model, x, list(A.METHODS), method_options=options, batch_size=8)
    _assert_untouched(model, state, modes)
    blocks = R.get_blocks(model, ["fc", "layer4"])
    gen = E.iter_state_maps(model, x, ["gradient", "guided_backprop"], [(), blocks[:1], blocks],
                            batch_size=8)  # fmt: skip
    next(gen)
    gen.close()
    _assert_untouched(model, state, modes)
    # and on errors
    with pytest.raises(ValueError):
        A.explain(model, x, "gradient", target=1000)
    _assert_untouched(model, state, modes)


def test_explain_uses_eval_mode_for_the_default_target(x):
    """The default target is the argmax of the model in eval mode (BatchNorm with its running
    statistics), whatever mode the user left the model in."""
    model = tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-2, 2)
        want = model(x).argmax(1)
    model.train()
    got = A.explain(model, x, "gradient")
    model.eval()
    assert torch.equal(got, A.explain(model, x, "gradient", want))


# ---------------------------------------------------------------- blocks
def test_blocks_inference_descends_into_single_child_wrappers():
    """Old: blocks=None on a model wrapping its network in ``model.net`` gave one stage, 'net'."""
    x = torch.rand(1, 3, 8, 8)
    wrapped = Wrapper(tiny())
    want = ["net.fc", "net.conv2", "net.bn", "net.conv1"]
    assert [b.name for b in R.infer_blocks(wrapped)] == want
    assert [b.name for b in R.get_blocks(wrapped, None, x)] == want
    assert all(b.modules == (b.name,) for b in R.get_blocks(wrapped, None, x))
    twice = Wrapper(nn.Sequential(tiny()))  # nested wrappers
    assert [b.name for b in R.infer_blocks(twice, x)] == ["net.0.fc", "net.0.conv2", "net.0.bn",
                                                          "net.0.conv1"]  # fmt: skip
    seq = Wrapper(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 4)))
    assert [b.name for b in R.infer_blocks(seq, x)] == ["net.3", "net.0"]
    # a wrapper around a single layer keeps that layer as its only block
    assert [b.name for b in R.infer_blocks(Wrapper(nn.Linear(3, 2)))] == ["net"]
    # unwrapped models are unchanged
    assert [b.name for b in R.infer_blocks(tiny(), x)] == ["fc", "conv2", "bn", "conv1"]
    # the blocks are usable: a cascade on the wrapped model randomizes net.fc first
    states = [()] + [st.blocks for st in R.cascading_stages(R.get_blocks(wrapped, None, x))]
    assert len(list(E.iter_state_maps(wrapped, x, ["gradient"], states, batch_size=8))) == 1


def test_block_inference_with_an_example_leaves_a_training_model_untouched():
    model = Wrapper(tiny()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = _modes(model)
    names = [b.name for b in R.infer_blocks(model, torch.rand(2, 3, 8, 8) * 5)]
    _assert_untouched(model, state, modes)  # old: the traced pass updated BatchNorm statistics
    assert names[0] == "net.fc"


def test_blocks_must_be_a_non_empty_list():
    model = tiny()
    with pytest.raises(ValueError, match="blocks must name at least one block"):
        R.get_blocks(model, [])
    with pytest.raises(ValueError, match=r"blocks must be a list.*blocks=\['fc'\]"):
        R.get_blocks(model, "fc")
    with pytest.raises(ValueError, match="blocks must be a list"):
        R.get_blocks(model, Block("fc", ("fc",)))
    want = (Block("fc", ("fc",)), Block("conv1", ("conv1",)))
    assert R.get_blocks(model, ("fc", "conv1")) == want
    assert R.get_blocks(model, iter(["fc"])) == (Block("fc", ("fc",)),)


def test_valid_input_costs_one_cached_probe(x):
    """The probe runs one forward pass of one image per model, input shape and dtype."""
    model = tiny()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    A.check_input(model, x)
    A.check_input(model, x)
    A.explain(model, x, "gradient", target=[0, 1])
    assert calls == [1, 2]  # one probe of x[:1], then the gradient pass on both images
    assert A.probe_model(model, x) == A.ModelProbe(5, False)
    assert calls == [1, 2]
