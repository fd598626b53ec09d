"""Chapter set-up: what the first code cell of a chapter does, as one call.

:func:`setup_imagenet_chapter` is the set-up of the two model-randomization chapters (2 and 3):
profile, model, photos, the methods and settings of those chapters, and the sentence that says
which model ran (and why, when InceptionV3 fell back), glued under the chapter's prefix.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import load_model, load_photos, plots
from ..models import GuidedReLU6
from .notebook import glue
from .profiles import Profile, chapter_profile
from .runinfo import record_run

__all__ = ["ImageNetChapter", "setup_imagenet_chapter", "model_sentence", "options_sentence", "markdown",
           "RELU6_VARIANTS", "relu6_backward_variants", "relu6_saturation"]  # fmt: skip


def markdown(text: str) -> Any:
    """``IPython.display.Markdown(text)`` (what ``{glue:md}`` pastes), or ``text`` itself where
    IPython is not installed."""
    try:
        from IPython.display import Markdown
    except ImportError:
        return text
    return Markdown(text)


def model_sentence(info, n_images: int) -> str:
    """One Markdown sentence naming the model that ran, its source and the number of images,
    and saying when InceptionV3's weights could not be obtained (the ``"auto"`` fallback)."""
    return (f"This run used **{info.name}** ({info.source}) on {n_images} images"
            + (", because InceptionV3's ImageNet weights could not be obtained" if
               info.extra.get("fallback_from") else "") + ".")  # fmt: skip


#: How :func:`options_sentence` names a method option.
_OPTION_WORDS = {"n_samples": "noise samples", "n_steps": "steps", "noise_level": "noise level",
                 "baseline": "baseline", "layer": "layer", "rule": "rule"}  # fmt: skip


def options_sentence(options: dict[str, dict] | None) -> str:
    """One plain sentence saying which method settings differ from the paper's, with the
    paper's value next to each (``options``: ``{method: {option: value}}``, as a profile's
    ``method_options``), e.g. "Settings that differ from the paper's: Integrated Gradients 25
    steps (paper: 50); SmoothGrad 25 noise samples (paper: 50)."."""
    from ..attribution import PAPER_SETTINGS
    from ..registry import METHOD_LABELS

    parts = []
    for method, opts in (options or {}).items():
        paper = PAPER_SETTINGS.get(method, {})
        items = []
        for key, value in opts.items():
            word = _OPTION_WORDS.get(key, key)
            was = f" (paper: {paper[key]})" if key in paper and paper[key] != value else ""
            items.append(f"{value} {word}{was}" if key in ("n_samples", "n_steps")
                         else f"{word} {value}{was}")  # fmt: skip
        if items:
            parts.append(f"{METHOD_LABELS.get(method, method)} " + ", ".join(items))
    if not parts:
        return "Every method runs with the paper's settings."
    return "Settings that differ from the paper's: " + "; ".join(parts) + "."


@dataclass
class ImageNetChapter:
    """What :func:`setup_imagenet_chapter` gives a chapter.

    Attributes:
        cfg: the profile, with the parameters' overrides.
        model: the classifier (``model.sanity_info``: :attr:`info`).
        info: the model's :class:`sanitylib.models.ModelInfo` (name, source, blocks, ...).
        batch: the preprocessed photos (:func:`sanitylib.load_photos`).
        methods, options: the methods of the model-randomization chapters and their settings
            that differ from the paper's (``cfg.randomization``).
        label: the model's name for titles (``" (fallback)"`` added after a fallback).
        sentence: :func:`model_sentence` (Markdown).
    """

    cfg: Profile
    model: nn.Module
    info: Any
    batch: Any
    methods: tuple[str, ...]
    options: dict[str, dict]
    label: str
    sentence: str


def _check_two_images(names: list[str]) -> None:
    """The chapters compare each map with the maps of the *other* images (the noise floor that
    every verdict is measured against): at least two different images.  One image ran the whole
    cascade and then failed in the chapter's tables; a photo named twice put a same-image pair
    (similarity 1) into the floor."""
    if len(names) < 2:
        raise ValueError(f"photos / image_folder / n_images: the chapter needs at least 2 images "
                         f"(its noise floor compares maps of different images), got {len(names)}: "
                         f"{names}")  # fmt: skip
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"photos: {dup} named more than once; the noise floor would compare an "
                         "image with itself (similarity 1)")  # fmt: skip


def setup_imagenet_chapter(prefix: str, profile: str | Profile = "book", *,
                           model: str | None = None, photos=None, image_folder: str | None = None,
                           n_images: int | None = None, image_ids: str | None = None,
                           seed: int | None = None) -> ImageNetChapter:  # fmt: skip
    """The set-up of a model-randomization chapter, from its ``parameters`` cell.

    Applies the book's plot style, builds the profile (parameters left at ``None`` keep the
    profile's value), prints its note, loads the model and the photos (``image_ids="paper_imagenet"``
    with ``image_folder``: the paper's 200 ImageNet validation images, see
    :func:`sanitylib.load_paper_imagenet`), and glues ``{prefix}_model``, ``{prefix}_model_sentence``,
    ``{prefix}_n_images`` and ``{prefix}_n_blocks``.
    """
    plots.use_book_style()
    cfg = chapter_profile(profile, model=model, photos=photos, image_folder=image_folder,
                          n_images=n_images, image_ids=image_ids, seed=seed)  # fmt: skip
    if cfg.image_folder is None:  # before the model loads: the photos are known by name
        _check_two_images(list(cfg.photos)[: cfg.n_images or None])
    print(cfg.note)
    net = load_model(cfg.model)
    info = net.sanity_info
    batch = load_photos(net, names=cfg.photos, folder=cfg.image_folder, ids=cfg.image_ids,
                        n=cfg.n_images)  # fmt: skip
    _check_two_images(batch.names)
    methods, options = cfg.randomization
    label = info.name + (" (fallback)" if info.extra.get("fallback_from") else "")
    sentence = model_sentence(info, len(batch))  # shown once, in the chapter's text
    glue(f"{prefix}_model", info.name, display=False)
    glue(f"{prefix}_model_sentence", markdown(sentence), display=False)
    glue(f"{prefix}_n_images", len(batch), display=False)
    glue(f"{prefix}_n_blocks", len(info.blocks), display=False)
    record_run(cfg, net)
    return ImageNetChapter(cfg, net, info, batch, methods, options, label, sentence)


# ----------------------------------------------------------------------------- chapter 1
#: The backward passes of :func:`relu6_backward_variants`: name -> what differs from Guided
#: BackProp (the forward pass, hence the logits and the explained class, never changes).
RELU6_VARIANTS: dict[str, str] = {
    "guided_backprop": "Guided BackProp (ReLU6 passes no gradient below 0 or above 6)",
    "no_clip": "ReLU6's upper clip ignored in the backward pass",
    "rectified_blocks": "guided rule also at every block output (linear bottleneck + residual sum)",
    "no_skip": "no gradient through the residual skip paths",
    "gradient": "plain gradient",
    "gradient_no_clip": "plain gradient, ReLU6's upper clip ignored in the backward pass",
}


class _GuidedReLU6Fn(torch.autograd.Function):
    """relu6 forward; backward: the gradient where ``0 < x`` (and ``x < 6`` with ``clip``),
    then the guided rule (negative gradients set to 0) unless ``guided`` is false."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: bool, guided: bool) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.clip, ctx.guided = clip, guided
        return F.hardtanh(x, 0.0, 6.0)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        g = g * (x > 0)
        if ctx.clip:
            g = g * (x < 6)
        return (g.clamp(min=0) if ctx.guided else g), None, None


class _RectifyGrad(torch.autograd.Function):
    """Identity forward; backward sets negative gradients to 0 (the guided rule alone)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        return g.clamp(min=0)


def _has_skip(block: nn.Module) -> bool:
    a = block._block_args  # efficientnet_lite_pytorch's MBConvBlock condition for x + inputs
    return bool(block.id_skip and a.stride == 1 and a.input_filters == a.output_filters)


@contextlib.contextmanager
def _backward_variant(model: nn.Module, variant: str) -> Iterator[None]:
    acts = [m for m in model.modules() if isinstance(m, GuidedReLU6)]
    clip = variant not in ("no_clip", "gradient_no_clip")
    guided = variant not in ("gradient", "gradient_no_clip")
    hooks = []
    for m in acts:  # an instance attribute shadows the class's forward; removed below
        m.forward = types.MethodType(lambda self, x: _GuidedReLU6Fn.apply(x, clip, guided), m)
    for block in model._blocks:
        if variant == "rectified_blocks":
            hooks.append(block.register_forward_hook(lambda mod, a, out: _RectifyGrad.apply(out)))
        if variant == "no_skip" and _has_skip(block):  # out - x + x.detach(): same value
            hooks.append(block.register_forward_hook(
                lambda mod, a, out: out - a[0] + a[0].detach()))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in acts:
            m.__dict__.pop("forward", None)


def relu6_backward_variants(model: nn.Module, x: Tensor, target: Tensor,
                            variants=tuple(RELU6_VARIANTS)) -> dict[str, Tensor]:  # fmt: skip
    """Guided BackProp on EfficientNet-Lite0 (:func:`sanitylib.load_model`) with one feature of
    the architecture switched off in the **backward pass only** (:data:`RELU6_VARIANTS`).

    Args:
        model: ``load_model("efficientnet_lite0")`` (its ReLU6 are :class:`GuidedReLU6`).
        x: ``(N, 3, 224, 224)`` input; target: ``(N,)`` explained classes.
        variants: names from :data:`RELU6_VARIANTS`.

    Returns:
        ``{variant: (N, 3, 224, 224) map}``: the gradient of the target logit w.r.t. ``x``
        under each backward rule.  ``"guided_backprop"`` equals ``sanitylib.explain(...,
        "guided_backprop")`` (captum's hooks), which the chapter checks.  The model is left
        unchanged (its activations' ``forward`` and all hooks are restored).
    """
    if not hasattr(model, "_blocks") or not any(isinstance(m, GuidedReLU6) for m in model.modules()):
        raise ValueError("model: expected EfficientNet-Lite0 from sanitylib.load_model "
                         "(MBConv blocks with ReLU6 activations)")  # fmt: skip
    unknown = [v for v in variants if v not in RELU6_VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; known: {list(RELU6_VARIANTS)}")
    out = {}
    for v in variants:
        xx = x.detach().clone().requires_grad_(True)
        with _backward_variant(model, v), torch.enable_grad():
            logits = model(xx)
            logits.gather(1, target.view(-1, 1)).sum().backward()
        out[v] = xx.grad.detach()
    return out


@torch.no_grad()
def relu6_saturation(model: nn.Module, x: Tensor) -> tuple[float, Tensor]:
    """Where EfficientNet-Lite0's ReLU6 units saturate (input >= 6, where ReLU6 passes no
    gradient).

    Returns:
        ``(fraction, stem)``: the fraction of all ReLU6 inputs (every call, all images) that are
        >= 6, and ``(N, H/2, W/2)``: per position of the stem's output, the fraction of its 32
        channels that are >= 6.
    """
    counts = [0, 0]
    stem: list[Tensor] = []

    def hook(mod, args, out):
        sat = args[0] >= 6
        counts[0] += int(sat.sum())
        counts[1] += sat.numel()
        if mod is model._stem_act and not stem:
            stem.append(sat.float().mean(1))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GuidedReLU6)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts[0] / counts[1], stem[0]
