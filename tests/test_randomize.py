"""Tests for sanitylib.randomize: the authors' re-initialization, perturbations, blocks, stages,
and the bit-exact restoration of the model.

The expected statistics come from the protocol (the authors' code): TF-slim's
``variance_scaling_initializer`` = normal with std sqrt(1.3 * 2 / fan_in) truncated at +-2 std,
biases 0, BatchNorm gamma 1 / beta 0 with the running statistics KEPT.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sanitylib import randomize as R
from sanitylib.models import Block, load_model


def trunc_std_factor(k: float = 2.0) -> float:
    """std of a standard normal truncated to [-k, k] (closed form)."""
    pdf = math.exp(-k * k / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(k / math.sqrt(2))
    return math.sqrt(1 - 2 * k * pdf / mass)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class BNNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> fc, with trained-looking BN stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.act = nn.ReLU()
        # look "trained": non-default running stats, counter, affine parameters
        self.train()
        with torch.no_grad():
            for _ in range(3):
                self(torch.randn(4, 3, 6, 6) * 2 + 1)
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture()
def bnnet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BNNet()


def ALL(_model=None) -> tuple[Block, ...]:
    """BNNet's blocks, top to bottom."""
    return tuple(Block(n, (n,)) for n in ("fc", "bn2", "conv2", "bn1", "conv1"))


# ---------------------------------------------------------------- initializers
@pytest.mark.parametrize("layer", [nn.Linear(1000, 2000), nn.Conv2d(64, 128, 3)])
def test_he_truncated_normal_statistics(layer):
    gen = torch.Generator().manual_seed(0)
    R.he_truncated_normal_(layer, gen)
    w = layer.weight.detach()
    fan_in = w[0].numel()
    s = math.sqrt(1.3 * 2 / fan_in)
    assert float(w.abs().max()) <= 2 * s + 1e-7  # truncated at +-2 s
    assert float(w.abs().max()) > 1.9 * s  # ... and the tails are actually reached
    assert float(w.std()) == pytest.approx(s * trunc_std_factor(), rel=0.03)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)  # ~He std
    assert abs(float(w.mean())) < 4 * s / math.sqrt(w.numel())
    assert torch.all(layer.bias == 0)


def test_he_truncated_normal_on_batchnorm_keeps_running_stats(bnnet):
    before = clone_state(bnnet)
    assert not torch.all(before["bn1.running_mean"] == 0)  # non-trivial stats to keep
    R.he_truncated_normal_(bnnet, torch.Generator().manual_seed(0))
    for bn in ("bn1", "bn2"):
        assert torch.all(getattr(bnnet, bn).weight == 1)
        assert torch.all(getattr(bnnet, bn).bias == 0)
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{bn}.{buf}"
            assert torch.equal(bnnet.state_dict()[key], before[key]), key
    assert torch.all(bnnet.conv1.bias == 0) and torch.all(bnnet.fc.bias == 0)
    assert not torch.equal(bnnet.conv1.weight, before["conv1.weight"])


def test_pytorch_default_resets_running_stats(bnnet):
    R.pytorch_default_(bnnet, torch.Generator().manual_seed(0))
    for bn in (bnnet.bn1, bnnet.bn2):
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        assert int(bn.num_batches_tracked) == 0
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    fan_in = bnnet.conv2.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound == 1/sqrt(fan_in)
    assert float(bnnet.conv2.weight.detach().abs().max()) <= bound + 1e-7
    assert float(bnnet.conv2.bias.detach().abs().max()) <= bound + 1e-7
    assert float(bnnet.conv2.bias.detach().abs().max()) > 0


# ---------------------------------------------------------------- randomize_
def test_randomize_is_seeded_per_block_and_leaves_global_rng_alone(bnnet):
    blocks = ALL(bnnet)
    start = clone_state(bnnet)
    rng = torch.get_rng_state()
    R.randomize_(bnnet, blocks, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    first = clone_state(bnnet)
    assert not torch.equal(first["conv2.weight"], start["conv2.weight"])
    R.randomize_(bnnet, blocks, seed=3)
    assert state_equal(clone_state(bnnet), first)  # same seed -> identical weights
    R.randomize_(bnnet, blocks, seed=4)
    assert not torch.equal(bnnet.conv2.weight, first["conv2.weight"])


def test_blocks_with_same_shape_get_different_weights():
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    R.randomize_(net, [Block("a", ("0",)), Block("b", ("1",))], seed=0)
    assert not torch.equal(net[0].weight, net[1].weight)


def test_block_weights_do_not_depend_on_the_stage(bnnet):
    """Nested cascade: block j gets the same random weights at every stage."""
    blocks = ALL(bnnet)
    R.randomize_(bnnet, blocks[:1], seed=0)
    fc_alone = bnnet.fc.weight.detach().clone()
    R.randomize_(bnnet, blocks[:4], seed=0)
    assert torch.equal(bnnet.fc.weight, fc_alone)


def test_randomize_only_touches_its_blocks(bnnet):
    before = clone_state(bnnet)
    R.randomize_(bnnet, [Block("fc", ("fc",))], seed=0)
    after = clone_state(bnnet)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_paper_init_resolves_per_model():
    cnn = load_model("mnist_cnn", pretrained=False)
    R.randomize_(cnn, [Block("fc1", ("fc1",))], seed=1)  # authors' CNN init: biases 0.1
    assert torch.all(cnn.fc1.bias == 0.1)
    assert float(cnn.fc1.weight.detach().std()) == pytest.approx(0.1 * trunc_std_factor(), rel=0.03)
    plain = nn.Sequential(nn.Linear(400, 300))  # no model info: He truncated normal
    R.randomize_(plain, [Block("0", ("0",))], seed=1)
    assert torch.all(plain[0].bias == 0)
    s = math.sqrt(2.6 / 400)
    assert float(plain[0].weight.detach().std()) == pytest.approx(s * trunc_std_factor(), rel=0.03)


def test_custom_initializer_gets_the_block_generator():
    seen = []

    def init(module, gen):
        seen.append((type(module).__name__, isinstance(gen, torch.Generator)))
        with torch.no_grad():
            module.weight.fill_(7.0)

    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    R.randomize_(net, [Block("top", ("1",))], R.Perturbation(init=init))
    assert seen == [("Linear", True)]
    assert torch.all(net[1].weight == 7.0) and not torch.all(net[0].weight == 7.0)
    assert R.Perturbation(init=init).describe() == "reinit(init)"


# ---------------------------------------------------------------- perturbations
def _perturbed(p: R.Perturbation):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = nn.Linear(500, 400)
    old = layer.weight.detach().clone()
    net = nn.Sequential(layer)
    R.randomize_(net, [Block("l", ("0",))], p, seed=0)
    return old, layer.weight.detach()


def test_gaussian_perturbation_scale():
    old, new = _perturbed(R.Perturbation("gaussian", sigma=0.01))
    assert float((new - old).std()) == pytest.approx(0.01, rel=0.03)
    assert abs(float((new - old).mean())) < 1e-3


def test_relative_gaussian_perturbation_scale():
    old, new = _perturbed(R.Perturbation("gaussian", sigma=0.5, relative=True))
    assert float((new - old).std()) == pytest.approx(0.5 * float(old.std()), rel=0.03)


def test_multiplicative_perturbation_scale():
    old, new = _perturbed(R.Perturbation("multiplicative", sigma=0.2))
    ratio = new / old
    assert float((ratio - 1).std()) == pytest.approx(0.2, rel=0.03)
    assert torch.all(new[old == 0] == 0)


def test_perturbations_leave_buffers_alone(bnnet):
    before = clone_state(bnnet)
    R.randomize_(bnnet, ALL(bnnet), R.Perturbation("gaussian", sigma=0.1), seed=0)
    after = clone_state(bnnet)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == ("running" in k or "num_batches" in k), k


def test_blocks_as_the_number_of_top_blocks():
    """``blocks=K``: the model's first K blocks from the top, as ``sanitylib run --blocks K``
    (it was refused by the library); the run equals the one naming them."""
    import sanitylib as sl

    model = load_model("mnist_cnn", pretrained=False)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    every = R.get_blocks(model, None, x)
    assert R.get_blocks(model, 2, x) == tuple(every[:2])
    assert R.get_blocks(model, len(every), x) == tuple(every)
    for bad in (0, len(every) + 1, -1):
        with pytest.raises(ValueError, match=rf"blocks: {bad} top blocks asked for, the model has"):
            R.get_blocks(model, bad, x)
    with pytest.raises(ValueError, match="blocks must be a list"):
        R.get_blocks(model, True, x)
    kw = dict(metrics=["spearman"], progress=False, cache=False)
    by_number = sl.cascading_randomization(model, x, ["gradient"], 2, **kw)
    by_name = sl.cascading_randomization(model, x, ["gradient"], [b.name for b in every[:2]], **kw)
    assert by_number.stages == [b.name for b in every[:2]] and by_number.equals(by_name)


def test_perturbation_validation_and_describe():
    with pytest.raises(ValueError, match="unknown perturbation"):
        R.Perturbation("dropout")
    with pytest.raises(ValueError, match="sigma > 0"):
        R.Perturbation("gaussian")
    with pytest.raises(ValueError, match="sigma > 0"):
        R.Perturbation("multiplicative", sigma=-0.1)
    # were accepted: an infinite sigma (NaN maps after the passes), a string (a TypeError), True
    for bad in (float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="finite sigma > 0"):
            R.Perturbation("gaussian", sigma=bad)
    with pytest.raises(ValueError, match="relative must be True or False"):
        R.Perturbation("gaussian", sigma=0.1, relative="yes")
    for kind, sigma in (("multiplicative", 0.1), ("reinit", None)):  # relative had no effect
        with pytest.raises(ValueError, match="relative=True is for 'gaussian' noise"):
            R.Perturbation(kind, sigma=sigma, relative=True)
    with pytest.raises(ValueError, match="unknown initializer"):
        R.Perturbation(init="xavier")
    assert R.Perturbation().describe() == "reinit(paper)"
    assert R.Perturbation(init="pytorch").describe() == "reinit(pytorch)"
    assert R.Perturbation("gaussian", sigma=0.1, relative=True).describe() == "gaussian(0.1, relative)"
    assert R.Perturbation("multiplicative", sigma=0.25).describe() == "multiplicative(0.25)"


# ---------------------------------------------------------------- randomized context
def test_randomized_restores_bit_exactly_and_mode(bnnet):
    bnnet.train()
    before = clone_state(bnnet)
    with R.randomized(bnnet, ALL(bnnet), R.Perturbation(init="pytorch"), seed=0) as m:
        assert m is bnnet
        assert not bnnet.training and not bnnet.bn1.training  # eval inside
        inside = clone_state(bnnet)
        assert not torch.equal(inside["conv1.weight"], before["conv1.weight"])
        assert not torch.equal(inside["bn1.running_mean"], before["bn1.running_mean"])
    assert state_equal(clone_state(bnnet), before)  # incl. num_batches_tracked
    assert bnnet.training and bnnet.bn1.training


def test_randomized_restores_after_exception(bnnet):
    bnnet.eval()
    before = clone_state(bnnet)
    params_before = {n: p for n, p in bnnet.named_parameters()}
    with pytest.raises(KeyError, match="boom"):
        with R.randomized(bnnet, ALL(bnnet), seed=0):
            assert not torch.equal(bnnet.fc.weight, before["fc.weight"])
            raise KeyError("boom")
    assert state_equal(clone_state(bnnet), before)
    assert not bnnet.training
    # restored in place: the same Parameter objects (optimizers, hooks stay valid)
    assert all(p is params_before[n] for n, p in bnnet.named_parameters())


def test_randomized_with_precomputed_snapshot(bnnet):
    """With ``snap`` the stages are the same randomized models as without it, the model is
    restored after each, and the snapshot itself is left untouched for the next stage."""
    snap = R.snapshot(bnnet)
    before = clone_state(bnnet)
    for k in range(3):
        blocks = ALL(bnnet)[: k + 1]
        with R.randomized(bnnet, blocks, seed=0):
            plain = clone_state(bnnet)
        with R.randomized(bnnet, blocks, seed=0, snap=snap):
            inside = clone_state(bnnet)
        assert state_equal(inside, plain)
        key = f"{blocks[-1].name}.weight"  # the block added at this stage really changed
        assert not torch.equal(inside[key], before[key]), key
        assert state_equal(clone_state(bnnet), before)
        assert state_equal({k_: v.detach() for k_, v in snap.items()}, before)


def test_randomized_restores_batchnorm_outputs_after_pytorch_reinit(bnnet):
    """A second, functional check of the BatchNorm restore: PyTorch's re-initialization resets
    the running statistics, so the eval-mode outputs change inside; after the context they are
    bit-identical again, and a training-mode step updates the statistics exactly as before."""
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    bn_blocks = (Block("bn2", ("bn2",)), Block("bn1", ("bn1",)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        twin = BNNet()  # an untouched copy of the trained model
    with torch.no_grad():
        y0 = bnnet(x)
        with R.randomized(bnnet, bn_blocks, R.Perturbation(init="pytorch"), seed=0):
            assert torch.all(bnnet.bn1.running_var == 1) and int(bnnet.bn1.num_batches_tracked) == 0
            assert not torch.allclose(bnnet(x), y0)
        assert torch.equal(bnnet(x), y0)
        for net in (bnnet, twin):
            net.train()
            net(x)
            net.eval()
    assert state_equal(clone_state(bnnet), clone_state(twin))
    assert torch.equal(bnnet.bn1.num_batches_tracked, twin.bn1.num_batches_tracked)


def test_randomized_stage_differs_from_trained_model_output(bnnet):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = bnnet(x)
        with R.randomized(bnnet, ALL(bnnet)[:1], seed=0):
            y1 = bnnet(x)
        y2 = bnnet(x)
    assert not torch.allclose(y0, y1)
    assert torch.equal(y0, y2)


# ---------------------------------------------------------------- blocks
def test_get_blocks_names_paths_objects_and_errors():
    cnn = load_model("mnist_cnn", pretrained=False)
    declared = cnn.sanity_info.blocks
    assert R.get_blocks(cnn) == declared
    got = R.get_blocks(cnn, ["fc1", "hidden1"])
    assert got == (declared[1], declared[3])
    custom = Block("convs", ("hidden1", "hidden2"))
    got = R.get_blocks(cnn, [custom, "fc1", "softmax_linear"])
    assert got[0] is custom
    assert got[1] == declared[1]
    assert got[2] == declared[0]
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert R.get_blocks(seq, ["1.0"]) == (Block("1.0", ("1.0",)),)  # a module path
    eff = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert R.get_blocks(eff, ["0.1"]) == (Block("0.1", ("0.1",)),)
    with pytest.raises(ValueError) as err:
        R.get_blocks(cnn, ["fc2"])
    assert "fc2" in str(err.value) and "softmax_linear" in str(err.value)
    with pytest.raises(ValueError, match="duplicate"):
        R.get_blocks(cnn, ["fc1", "fc1"])
    with pytest.raises(ValueError, match="duplicate"):
        R.get_blocks(cnn, ["fc1", Block("fc1", ("hidden1",))])
    with pytest.raises(ValueError, match="block must be"):
        R.get_blocks(cnn, [3])
    with pytest.raises(ValueError, match="no submodule"):
        R.get_blocks(cnn, [Block("ghost", ("hidden9",))])


class ShuffledNet(nn.Module):
    """Registration order (head, unused, act, stem, mid) differs from execution order
    (stem, mid, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)
        self.act = nn.ReLU()
        self.stem = nn.Conv2d(1, 4, 3)
        self.mid = nn.Linear(4, 6)

    def forward(self, x):
        x = self.act(self.stem(x)).mean((2, 3))
        return self.head(self.act(self.mid(x)))


def test_infer_blocks_uses_execution_order_with_example():
    net = ShuffledNet()
    example = torch.randn(2, 1, 5, 5)
    with pytest.warns(UserWarning, match="never run.*: unused"):
        names = [b.name for b in R.infer_blocks(net, example)]
    assert names == ["head", "mid", "stem"]  # reverse execution order, the unused child left out
    # without an example: reverse registration order
    assert [b.name for b in R.infer_blocks(net)] == ["mid", "stem", "unused", "head"]
    with pytest.warns(UserWarning, match="unused"):
        assert R.get_blocks(net, None, example) == R.infer_blocks(net, example)


class ModuleListNet(nn.Module):
    """A container that is never called itself: its layers run between stem and head
    (the usual pattern for ``nn.ModuleList``, e.g. EfficientNet's ``_blocks``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layers = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x.mean((2, 3)))


def test_infer_blocks_places_a_module_list_by_the_execution_of_its_layers():
    """The layers of ``layers`` run between ``stem`` and ``head``, so the blocks from the output
    to the input are head, layers, stem.  A ModuleList is never called itself, so a forward hook
    on the container alone never fires and it is treated as unused and put at the top: a
    cascade would randomize the middle of the network before the logits."""
    names = [b.name for b in R.infer_blocks(ModuleListNet(), torch.randn(1, 1, 8, 8))]
    assert names == ["head", "layers", "stem"]


def test_infer_blocks_on_sequential_and_errors():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(),
                        nn.Linear(2, 3))  # fmt: skip
    assert [b.name for b in R.infer_blocks(seq, torch.randn(1, 1, 5, 5))] == ["4", "2", "0"]
    with pytest.raises(ValueError, match="no child module with parameters"):
        R.infer_blocks(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_stages():
    blocks = tuple(Block(n, (n,)) for n in ("c", "b", "a"))
    casc = R.cascading_stages(blocks)
    assert [s.name for s in casc] == ["c", "b", "a"]
    assert [s.blocks for s in casc] == [blocks[:1], blocks[:2], blocks[:3]]
    indep = R.independent_stages(blocks)
    assert [s.name for s in indep] == ["c", "b", "a"]
    assert [s.blocks for s in indep] == [(b,) for b in blocks]


# ---------------------------------------------------------------- blocks that change nothing
def _aux_models():
    """torchvision's InceptionV3 (the paper's architecture) and GoogLeNet with their auxiliary
    heads, untrained: in eval mode the heads never run."""
    from torchvision.models import googlenet, inception_v3

    torch.manual_seed(0)  # torchvision draws the untrained weights from the global RNG
    return [(inception_v3(weights=None, aux_logits=True, init_weights=False), 299, {"AuxLogits"}),
            (googlenet(weights=None, aux_logits=True, init_weights=False), 96, {"aux1", "aux2"})]


class _LooseTokens(nn.Module):
    """A hand-built ViT's way (timm, DeiT): the class token and the position embedding are
    parameters of the model itself, not of a child module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(1)))
        self.pos = nn.Parameter(torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(2)))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos
        return self.head(t[:, 0])


@pytest.mark.parametrize("wrapped", [False, True])
def test_inferred_blocks_cover_parameters_registered_on_the_model(wrapped):
    """They belonged to no block: the "fully randomized" last stage kept the trained class
    token and position embedding (a user probe measured rollout at 0.12 there instead of -0.09)."""
    model = _LooseTokens()
    if wrapped:
        model = nn.Sequential(model)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blocks = R.get_blocks(model, None, x)
    prefix = "0." if wrapped else ""
    assert blocks[-1] == Block("cls+pos" if not wrapped else "0.cls+0.pos", (f"{prefix}cls", f"{prefix}pos"))
    from sanitylib.models import block_parameters

    owned = [id(p) for b in blocks for p in block_parameters(model, b)]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    trained = R.snapshot(model)
    with R.randomized(model, blocks, None, 0) as rm:
        assert not any(torch.equal(v, trained[k]) for k, v in R.snapshot(rm).items() if "bias" not in k)
    assert all(torch.equal(v, trained[k]) for k, v in R.snapshot(model).items())

def test_inferred_blocks_leave_out_heads_that_never_run():
    """Old: the auxiliary heads (they never run in eval mode) were the first stages of the
    cascade: the maps were unchanged and every method scored 1.0, as if it had failed."""
    for model, size, aux in _aux_models():
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match="never run") as rec:
            blocks, skipped = R.get_blocks(model, None, x, return_skipped=True)
        names = [b.name for b in blocks]
        assert set(skipped) == aux and not aux & set(names), names
        assert all(n in str(rec[0].message) for n in aux)
        assert names[0] == "fc" and names[-1] in ("Conv2d_1a_3x3", "conv1")
        assert skipped == R.inactive_blocks(model, [Block(n, (n,)) for n in aux], x)
        assert R.inactive_blocks(model, blocks, x) == {}
        # every kept block changes the logits when randomized
        with torch.no_grad():
            y = model.eval()(x[:1])
            for b in blocks[:2] + blocks[-1:]:
                with R.randomized(model, [b], seed=0):
                    assert not torch.equal(model(x[:1]), y), b.name
        # named explicitly: refused, naming the block and why
        for name in aux:
            with pytest.raises(ValueError, match=f"{name}.*never runs"):
                R.get_blocks(model, ["fc", name], x)


def test_explicit_blocks_without_parameters_are_refused():
    """Old: ``["relu"]`` or a pooling layer were accepted and scored a similarity of 1."""
    cnn = load_model("mnist_cnn", pretrained=False)
    for name in ("pool2", "relu1"):
        with pytest.raises(ValueError, match=f"block '{name}' holds no parameters"):
            R.get_blocks(cnn, ["fc1", name])
    with pytest.raises(ValueError, match="'acts' holds no parameters"):
        R.get_blocks(cnn, [Block("acts", ("relu1", "relu2"))])
    # a block mixing a parameterized module with a parameter-free one is fine
    assert R.get_blocks(cnn, [Block("b", ("hidden1", "relu1"))])[0].modules == ("hidden1", "relu1")
    # a parameterized child that never runs on the input: refused with an example only
    net = ShuffledNet()
    assert R.get_blocks(net, ["unused"]) == (Block("unused", ("unused",)),)
    with pytest.raises(ValueError, match="'unused' never runs"):
        R.get_blocks(net, ["head", "unused"], torch.randn(1, 1, 5, 5))


def test_declared_blocks_are_unchanged():
    """The built-in models' blocks (the book's numbers) do not move, with or without an
    example, and nothing is skipped."""
    for name, x in (("mnist_cnn", torch.rand(1, 1, 28, 28)), ("efficientnet_lite0", torch.rand(1, 3, 224, 224))):
        model = load_model(name, pretrained=False)
        got, skipped = R.get_blocks(model, None, x, return_skipped=True)
        assert got == model.sanity_info.blocks and skipped == {}
        assert R.inactive_blocks(model, got, x) == {}


# ---------------------------------------------------------------- parametrized weights
P = nn.utils.parametrizations


def _effective(layer: nn.Linear) -> torch.Tensor:
    """The weight the forward pass uses (whatever stores it)."""
    with torch.no_grad():
        return (layer(torch.eye(layer.in_features)) - layer(torch.zeros(1, layer.in_features))).T


@pytest.mark.parametrize("perturbation", ["he_truncated_normal", "pytorch", "gaussian", "relative"])
def test_weight_norm_layer_is_randomized_like_the_plain_layer(perturbation):
    """A ``parametrizations.weight_norm`` layer gets the weights the plain layer gets (the
    documented He draw reaches the forward pass; its originals got normal(0, 0.02): weights
    ~100x too small), and noise is added to the weight the forward pass uses."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(50, 40)).eval()
    wrapped = nn.Sequential(P.weight_norm(nn.Linear(50, 40))).eval()
    with torch.no_grad():
        wrapped[0].weight = plain[0].weight.detach().clone()
        wrapped[0].bias.copy_(plain[0].bias)
    p = (R.Perturbation("gaussian", sigma=0.05) if perturbation == "gaussian" else
         R.Perturbation("gaussian", sigma=0.5, relative=True) if perturbation == "relative" else
         R.Perturbation(init=perturbation))  # fmt: skip
    trained = _effective(wrapped[0])
    with R.randomized(plain, [Block("l", ("0",))], p, seed=3) as m:
        want = _effective(m[0])
    with R.randomized(wrapped, [Block("l", ("0",))], p, seed=3) as m:
        got = _effective(m[0])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(_effective(wrapped[0]), trained)  # restored


def test_spectral_norm_layer_is_the_normalized_draw():
    """A ``parametrizations.spectral_norm`` layer: its original is the documented draw, and the
    forward pass divides it by its exact spectral norm (the stale power-iteration vectors of
    the trained weight gave another, arbitrary scale)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(30, 20)).eval()
        wrapped = nn.Sequential(P.spectral_norm(nn.Linear(30, 20))).eval()
    R.randomize_(plain, [Block("l", ("0",))], seed=1)
    with R.randomized(wrapped, [Block("l", ("0",))], seed=1) as m:
        w = m[0].weight.detach()
    ref = plain[0].weight.detach()
    assert torch.allclose(w, ref / torch.linalg.matrix_norm(ref, 2), atol=1e-6)


@pytest.mark.parametrize("wrap", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_old_style_norm_hooks_are_refused_before_any_work(wrap):
    """The old-style hooks recompute ``weight`` from ``weight_g``/``weight_v`` (``weight_orig``)
    before every forward pass: a drawn ``weight`` was thrown away and the "randomized" layer
    kept its trained weights (similarity 1).  Refused, naming the module, model untouched."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation
        net = nn.Sequential(wrap(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3)).eval()
    before = clone_state(net)
    x = torch.rand(2, 8)
    for call in (lambda: R.get_blocks(net, ["0"], x), lambda: R.randomize_(net, [Block("a", ("0",))]),
                 lambda: R.randomized(net, [Block("a", ("0",))]).__enter__()):
        with pytest.raises(ValueError, match=r"module '0' \(Linear\).*old-style.*parametrizations"):
            call()
    assert state_equal(clone_state(net), before)


def test_parametrization_without_right_inverse_is_refused():
    class Sym(nn.Module):
        def forward(self, w):
            return w + w.T

    net = nn.Sequential(nn.Linear(4, 4))
    nn.utils.parametrize.register_parametrization(net[0], "weight", Sym())
    with pytest.raises(ValueError, match="'weight' of module '0'.*Sym without a right_inverse"):
        R.randomize_(net, [Block("a", ("0",))])


def test_a_stage_that_changes_nothing_warns(bnnet):
    """A randomization that leaves a block as it was (an initializer writing a copy, noise on
    zeros) scored a similarity of 1 silently: ``randomized`` and ``ModelStates`` warn."""
    before = clone_state(bnnet)

    def writes_a_copy(module, gen):
        module.weight.detach().clone().normal_(generator=gen)

    p = R.Perturbation(init=writes_a_copy)
    with pytest.warns(UserWarning, match="block 'fc'.*left every parameter and buffer"):
        with R.randomized(bnnet, [Block("fc", ("fc",))], p):
            pass
    with pytest.warns(UserWarning, match="block 'fc'"):
        R.ModelStates(bnnet, [(Block("fc", ("fc",)),)], p, 0)
    assert state_equal(clone_state(bnnet), before)
    net = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        net[0].weight.zero_(), net[0].bias.zero_()
    with pytest.warns(UserWarning, match="multiplicative"):
        R.ModelStates(net, [(Block("l", ("0",)),)], R.Perturbation("multiplicative", sigma=0.1), 0)


# ---------------------------------------------------------------- non-persistent buffers, modes
class Scaled(nn.Linear):
    """A linear layer times a non-persistent buffer (``state_dict`` skips it)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.register_buffer("scale", torch.ones(o), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.scale


def _draws_the_buffer(module, gen):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.1, generator=gen)
        if isinstance(m, Scaled):
            m.scale.uniform_(0, 1, generator=gen)


def test_non_persistent_buffers_are_restored_and_kept_out_of_the_trained_state():
    """An initializer that draws a non-persistent buffer: ``randomized`` left it randomized and
    the cascade's "trained" maps were computed with the randomized buffer."""
    import sanitylib as sl

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), Scaled(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = R.Perturbation(init=_draws_the_buffer)
    assert "1.scale" in R.snapshot(net)
    with R.randomized(net, [Block("s", ("1",))], p) as m:
        assert not torch.all(m[1].scale == 1)
    assert torch.all(net[1].scale == 1)
    ref = sl.explain(net, x, "gradient")
    df = sl.cascading_randomization(net, x, ["gradient"], blocks=["3", "1"], metrics=["spearman"],
                                    perturbation=p, store_maps=[0, 1, 2], cache=False, progress=False)  # fmt: skip
    assert torch.equal(df.maps["original"]["gradient"], ref)
    assert torch.all(net[1].scale == 1)


def test_randomized_restores_every_modules_own_mode():
    """``model.train(was_training)`` flattened mixed modes: an MC-dropout layer in an eval model
    came back in eval mode, a frozen BatchNorm in a training model in train mode."""
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    for setup in (lambda: (net.eval(), net[2].train()), lambda: (net.train(), net[1].eval())):
        setup()
        modes = [m.training for m in net.modules()]
        with R.randomized(net, [Block("0", ("0",))], seed=0) as m:
            assert not any(s.training for s in m.modules())
        assert [m.training for m in net.modules()] == modes


# ---------------------------------------------------------------- every normalization layer
NORMS = {"SyncBatchNorm": lambda: nn.SyncBatchNorm(4), "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True),
         "GroupNorm": lambda: nn.GroupNorm(2, 4), "LayerNorm": lambda: nn.LayerNorm(4)}  # fmt: skip
if hasattr(nn, "RMSNorm"):
    NORMS["RMSNorm"] = lambda: nn.RMSNorm(4)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("init", [R.he_truncated_normal_, R.pytorch_default_])
def test_every_normalization_layer_gets_weight_1_and_bias_0(name, init):
    """``SyncBatchNorm``, an affine ``InstanceNorm`` and ``RMSNorm`` got normal(0, 0.02) weights
    (only BatchNorm1d-3d, LayerNorm and GroupNorm were normalization layers), and
    ``pytorch_default_`` left a ``SyncBatchNorm``'s running statistics as trained."""
    layer = NORMS[name]()
    with torch.no_grad():
        layer.weight.fill_(3.0)
        if getattr(layer, "bias", None) is not None:
            layer.bias.fill_(3.0)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.fill_(5.0)
    init(layer, torch.Generator().manual_seed(0))
    assert torch.all(layer.weight == 1)
    assert getattr(layer, "bias", None) is None or torch.all(layer.bias == 0)
    if getattr(layer, "running_mean", None) is not None:
        assert torch.all(layer.running_mean == (0.0 if init is R.pytorch_default_ else 5.0))


def test_relative_noise_on_one_element_and_constant_tensors():
    """Relative noise was absolute (sigma) on a one-element tensor and added nothing to a
    constant one (std 0): both are scaled by their root mean square now; a tensor with std > 0
    gets exactly sigma * std as before, an all-zero one nothing."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.LayerNorm(4))
    with torch.no_grad():
        net[1].weight.fill_(1e-3)
        net[2].weight.fill_(-2.0)  # constant, std 0
    before = clone_state(net)
    sigma = 0.1
    R.randomize_(net, [Block("all", ("0", "1", "2"))], R.Perturbation("gaussian", sigma=sigma, relative=True))
    gen = torch.Generator().manual_seed(R.derive_seed(0, "all"))
    for k in ("0.weight", "0.bias", "1.weight", "2.weight", "2.bias"):  # the order of the draws
        w = before[k]
        noise = torch.randn(w.shape, generator=gen)
        rms = float(w.double().square().mean().sqrt())
        scale = float(w.std()) if w.numel() > 1 and float(w.std()) > 0 else rms
        assert torch.equal(net.state_dict()[k], w + noise * (sigma * scale)), k
    assert float((net[1].weight.detach() - before["1.weight"]).abs()) < 1e-3  # |w| 1e-3, not sigma
    assert not torch.equal(net[2].weight, before["2.weight"])
    assert torch.equal(net[2].bias, before["2.bias"])  # all zero: nothing to scale


# ---------------------------------------------------------------- attention and vision transformers
ATTENTIONS = {"kdim/vdim": dict(kdim=6, vdim=5), "add_bias_kv": dict(add_bias_kv=True),
              "both": dict(kdim=6, vdim=5, add_bias_kv=True)}  # fmt: skip
OWN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")


@pytest.mark.parametrize("kind", list(ATTENTIONS))
@pytest.mark.parametrize("init", ["vit", "pytorch", "he_truncated_normal"])
def test_every_attention_parameter_is_redrawn(kind, init):
    """A ``MultiheadAttention`` with separate query/key/value weights (``kdim``/``vdim`` differ
    from the width) or ``add_bias_kv`` kept its trained ``q/k/v_proj_weight`` and
    ``bias_k``/``bias_v`` under every initializer (only ``in_proj_weight`` was drawn).  The vit
    and pytorch rules now draw them as PyTorch's ``_reset_parameters`` does (the same values
    from the same seed); He draws the projections like a dense weight and zeroes the extra
    key and value (biases)."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True, **ATTENTIONS[kind])
    own = {n: p for n, p in mha.named_parameters(recurse=False) if n in OWN}
    with torch.no_grad():
        for p in mha.parameters():
            p.fill_(3.0)  # "trained": every rule changes it
    R.INITS[init](mha, torch.Generator().manual_seed(4))
    for n, p in own.items():
        assert not torch.any(p == 3.0), (init, n)
    if init == "he_truncated_normal":
        for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if n in own:
                assert own[n].abs().max() <= 2 * math.sqrt(2.6 / own[n].shape[1]), n
        assert all(torch.all(own[n] == 0) for n in ("bias_k", "bias_v") if n in own)
        return
    ref = nn.MultiheadAttention(8, 2, batch_first=True, **ATTENTIONS[kind])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ref._reset_parameters()
    for n, p in own.items():
        assert torch.equal(p, getattr(ref, n)), (init, n)


def test_pytorch_default_gives_an_attention_output_projection_bias_0():
    """MultiheadAttention sets its out_proj.bias to 0; pytorch_default_ drew it as a Linear's
    bias (uniform), unlike what PyTorch's own initialization draws."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        for p in mha.parameters():
            p.fill_(3.0)
    R.pytorch_default_(mha, torch.Generator().manual_seed(4))
    assert torch.all(mha.out_proj.bias == 0) and not torch.any(mha.out_proj.weight == 3.0)
    lin = nn.Linear(8, 8)  # a Linear elsewhere keeps its uniform bias
    R.pytorch_default_(lin, torch.Generator().manual_seed(4))
    assert lin.bias.abs().max() > 0

def test_vit_init_gives_a_conv_stem_batchnorm_weight_1_and_bias_0():
    """torchvision's conv-stem ViT: ``vit_init_`` drew the stem's BatchNorm weight and bias from
    normal(0, 0.02) (its catch-all rule); now the normalization rule of the other initializers
    (weight 1, bias 0, running statistics of a new layer, as ``pytorch_default_``)."""
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    with torch.random.fork_rng(devices=[]):
        m = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                              conv_stem_configs=[ConvStemConfig(out_channels=4, kernel_size=3, stride=2)])  # fmt: skip
    bn = m.conv_proj.conv_bn_relu_0[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        bn.weight.fill_(3.0), bn.bias.fill_(3.0), bn.running_mean.fill_(5.0), bn.running_var.fill_(5.0)
    R.INITS["vit"](m, torch.Generator().manual_seed(0))
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
