"""Vision transformers under the sanity checks: the measurements behind chapter 9's surprises.

The model is torchvision's own :class:`~torchvision.models.VisionTransformer`
(:func:`sanitylib.models.mnist_vit` on MNIST, ``load_model("vit_b_16")`` on ImageNet); its blocks
for the randomization tests are :func:`sanitylib.models.vit_blocks` (the head, each encoder block
from the top down, the embeddings), and the attention methods come from
:mod:`sanitylib.transformer` by name.  This module adds what the chapter measures beyond the
runners' tables:

* :func:`map_change`: how far a stage's maps are from the trained model's, exactly (the largest
  absolute difference relative to the map's peak), to show a map that does not change *at all*
  (raw attention and rollout under the randomization of the head: they read nothing above the
  last attention);
* :func:`class_dependence`: the same for the map of the predicted class against the map of a
  random other class (:func:`sanitylib.followup.random_targets`): 0 for a class-agnostic method
  (raw attention, attention rollout).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from .attribution import check_input, check_seed, explain, predict
from .followup import random_targets
from .randomize import evaluating
from .registry import check_method_options, check_methods_fit, resolve_methods

__all__ = ["GRADIENT_METHODS", "ATTENTION_METHODS", "VIT_METHODS", "relative_difference",
           "map_change", "class_dependence"]  # fmt: skip

#: The gradient methods of chapter 9 (every model).
GRADIENT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad")
#: The attention methods of :mod:`sanitylib.transformer` (vision transformers only).
ATTENTION_METHODS = ("raw_attention", "attention_rollout", "grad_attention_rollout", "vit_gradcam")
#: Every method of chapter 9, gradient methods first.
VIT_METHODS = GRADIENT_METHODS + ATTENTION_METHODS


def relative_difference(a: Tensor, b: Tensor) -> Tensor:
    """Per image, ``max |a - b| / max |a|`` of two ``(N, ...)`` map batches -> ``(N,)`` float64:
    exactly 0 when the maps are identical, about 1 or more when they share nothing.  An image
    whose map ``a`` is 0 everywhere gives ``max |b|`` (nothing to scale by).

    Raises:
        ValueError: the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    peak = a.abs().amax(1)
    diff = (a - b).abs().amax(1)
    return torch.where(peak > 0, diff / peak.clamp_min(1e-300), diff)


def map_change(store, stage: str, methods: Sequence[str] | None = None,
               reference: str = "original") -> pd.DataFrame:
    """How much each method's maps changed at ``stage`` of a randomization run, exactly.

    Args:
        store: a run's maps (``df.maps`` of :func:`sanitylib.cascading_randomization`), holding
            ``reference`` and ``stage``.
        stage: the stage to compare (e.g. ``"head"``: only the classification head randomized).
        methods: default: every method in the store.
        reference: the stage compared against (the trained model: ``"original"``).

    Returns:
        One row per (method, image): ``method, image, relative_difference``
        (:func:`relative_difference`; 0 = the maps are identical to the last bit).

    Raises:
        ValueError: ``stage`` or ``reference`` is not in the store, or a method is missing.
    """
    stages = list(getattr(store, "stages", store))
    for s in (stage, reference):
        if s not in stages:
            raise ValueError(f"stage {s!r} is not in the run's maps; stages: {stages}")
    methods = list(methods) if methods is not None else list(store[reference])
    missing = [m for m in methods if m not in store[reference] or m not in store[stage]]
    if missing:
        raise ValueError(f"methods {missing} have no stored maps at {stage!r}")
    images = list(getattr(store, "images", range(len(store[reference][methods[0]]))))
    rows = []
    for m in methods:
        d = relative_difference(store[reference][m], store[stage][m]).tolist()
        rows += [{"method": m, "image": int(i), "relative_difference": v} for i, v in zip(images, d)]
    return pd.DataFrame(rows)


def class_dependence(model: nn.Module, x: Tensor, methods: Sequence, *, seed: int = 0,
                     method_options: Mapping[str, dict] | None = None) -> pd.DataFrame:
    """Does a map depend on the class it explains?  Each method's map for the predicted class
    against its map for a random other class (:func:`sanitylib.followup.random_targets`, the
    random-logit test's classes), compared exactly.

    Args:
        model: a classifier (restored: eval mode inside, training flags and buffers back after).
        x: ``(N, C, H, W)`` inputs.
        methods: registered names (or anything :func:`sanitylib.explain` accepts).
        seed: seeds the random classes and the noise of stochastic methods (the same noise for
            both classes).
        method_options: ``{method: {option: value}}``.

    Returns:
        One row per (method, image): ``method, image, target, random_target,
        relative_difference`` (:func:`relative_difference`: 0 = the two maps are identical, the
        method is class-agnostic on that image).
    """
    check_input(model, x)  # before any work, as the runners: x, the model, the methods
    check_seed(seed)
    specs = resolve_methods(methods)  # one name alone is a list of one
    opts = dict(check_method_options(method_options, specs))  # a misspelled method refused
    check_methods_fit(model, specs)  # an attention method on a model without attention
    with evaluating(model):
        logits = predict(model, x)
    t = logits.argmax(1)
    r = random_targets(logits.shape[1], t, seed)
    rows = []
    for sp in specs:
        o = opts.get(sp.name, {})
        a = explain(model, x, sp, t, seed=seed, **o)
        b = explain(model, x, sp, r, seed=seed, **o)
        d = relative_difference(a, b).tolist()
        rows += [{"method": sp.name, "image": i, "target": int(t[i]), "random_target": int(r[i]),
                  "relative_difference": v} for i, v in enumerate(d)]  # fmt: skip
    return pd.DataFrame(rows)
