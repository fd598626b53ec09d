"""MNIST: trained CNN/MLP pairs, the data randomization test, and rank ties.

* :func:`load_data` and :func:`train_models` give the paper's CNN and MLP trained on the true
  labels and on a permutation of them (see :mod:`sanitylib.training`), sized by a profile.
* :func:`data_randomization` compares every method's maps of the true-label model with those of
  the random-label model on the same test digits (paper section 4, Figs. 6 and 22-25) and
  returns a tidy table like :func:`sanitylib.cascading_randomization`.
* :func:`methods_for` leaves GradCAM and Guided GradCAM out for models without a convolutional
  layer (the MLP), with a printed note, as the paper does.
* :func:`support_spearman`, :func:`input_times_noise` and :func:`tie_table` explain why
  Integrated Gradients and Gradient⊙Input score about 0.99 in absolute Spearman on MNIST
  whatever the model: both are exactly 0 wherever the input is 0 (about 80 % of the pixels),
  so the absolute rank correlation mostly measures the shared support of the digit.

The chapters' tables and sentences built on these (training table, accuracy summary, "paper vs
this book" tables with the authors' numbers) are in the chapter layer, :mod:`sanitylib.book`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .attribution import (METHODS, PAPER_SETTINGS, check_input, check_seed, derive_seed, predict,
                          unit_noise)
from .data import MnistData, load_mnist
from .experiment import explain_methods
from .metrics import noise_floor, similarity, spearman
from .models import get_info
from .randomize import evaluating
from .registry import check_map_size, method_list, resolve_methods, resolve_metrics
from .result import parts_of, stage_order
from .postprocess import abs_normalize, diverging_normalize

__all__ = ["MNIST_METHODS", "CONV_ONLY_METHODS", "ARCHITECTURES", "methods_for", "load_data",
           "train_models", "random_label_seed", "pick_digits", "digits_rgb", "data_randomization",
           "zero_fraction", "support_spearman", "input_times_noise", "tie_table",
           "noise_method_control"]  # fmt: skip

#: The paper's methods on MNIST (section 3 of the protocol without VarGrad), in its order.
MNIST_METHODS = ("gradient", "smoothgrad", "guided_backprop", "gradcam", "guided_gradcam",
                 "integrated_gradients", "ig_smoothgrad", "input_x_gradient")  # fmt: skip
#: Methods that need a convolutional layer (the paper leaves them out for the MLP).
CONV_ONLY_METHODS = ("gradcam", "guided_gradcam")
ARCHITECTURES = {"mnist_cnn": "CNN", "mnist_mlp": "MLP", "mnist_vit": "ViT"}


# ----------------------------------------------------------------------------- methods


def methods_for(model: nn.Module, methods: Sequence, verbose: bool = True) -> list:
    """``methods`` without GradCAM and Guided GradCAM when ``model`` declares no GradCAM layer
    (the MLP: no convolution, so no spatial feature map to weight); a note says so.

    ``methods`` are registered names, callables, captum classes or specs (as everywhere in
    sanitylib); they come back as given, in order.

    Raises:
        ValueError: unknown method names.
    """
    methods = method_list(methods)
    specs = resolve_methods(methods)
    info = get_info(model)
    if info is None or info.gradcam_layer:
        return list(methods)
    dropped = [s.name for s in specs if s.name in CONV_ONLY_METHODS]
    if dropped and verbose:
        print(f"Note: {info.name} has no convolutional layer, so {' and '.join(dropped)} "
              "(which weight a convolutional feature map) are left out for it, as in the paper.")
    return [m for m, s in zip(methods, specs) if s.name not in CONV_ONLY_METHODS]


# ----------------------------------------------------------------------------- models


def load_data(cfg, verbose: bool = True, n_train: int | None = None) -> MnistData:
    """MNIST as the profile ``cfg`` says (``cfg.mnist_source``, ``cfg.mnist_dataset``, and
    ``cfg.mnist_n_train``, or ``n_train`` when given: only the first training images); the
    source is printed, and a fallback or a reduced training set is announced."""
    data = load_mnist(source=cfg.mnist_source, dataset=cfg.mnist_dataset, seed=cfg.seed,
                      verbose=verbose)  # fmt: skip
    n = n_train if n_train is not None else getattr(cfg, "mnist_n_train", None)
    if n is not None and n < len(data.y_train):
        if n < 1:
            raise ValueError(f"mnist_n_train must be >= 1, got {n}")
        total = len(data.y_train)
        data = MnistData(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test,
                         source=f"{data.source} [first {n} training images only]")
        if verbose:
            print(f"Training on the first {n} of the {total} training images only "
                  f"({cfg.name} profile).")
    return data


def train_models(cfg, data: MnistData, names: Sequence[str] = ("mnist_cnn", "mnist_mlp"),
                 labels: Sequence[str] = ("true", "random"),
                 progress: bool = True) -> dict[tuple[str, str], nn.Module]:  # fmt: skip
    """Trained models ``{(name, labels): model}`` with the profile's training settings.

    Both label kinds use the same optimizer (Adam), peak learning rate ``cfg.mnist_lr`` and
    schedule ``cfg.mnist_schedule`` (planned over each model's own epoch budget); only the
    labels, the number of epochs and the seed differ.  True labels: ``cfg.mnist_epochs`` epochs,
    seed ``cfg.seed``.  Random labels: at most ``cfg.mnist_random_epochs`` epochs, stopping once
    the training accuracy reaches ``cfg.mnist_memorize``, with seed ``cfg.seed + 1`` (see
    :func:`random_label_seed`): independent initial weights and data order, so that the two
    models share nothing but the architecture and the images.  Each is trained once and then
    loaded from the cache; a random-label model that failed to memorize is announced."""
    from .training import mnist_model

    out = {}
    for name in names:
        for lab in labels:
            if lab == "true":
                kw = dict(epochs=cfg.mnist_epochs, stop_at=None, seed=cfg.seed)
            else:
                kw = dict(epochs=cfg.mnist_random_epochs, stop_at=cfg.mnist_memorize,
                          seed=random_label_seed(cfg.seed))  # fmt: skip
            model = mnist_model(name, data, labels=lab, progress=progress, lr=cfg.mnist_lr,
                                schedule=cfg.mnist_schedule, **kw)  # fmt: skip
            stats = model.sanity_info.extra["training"]
            if progress:
                print(f"{name}, {lab} labels: {model.sanity_info.source}")
            if stats["memorized"] is False:
                print(f"WARNING: the {lab}-label {name} did not reach training accuracy "
                      f"{cfg.mnist_memorize:g} in {stats['epochs_run']} epochs "
                      f"(reached {stats['train_accuracy']:.3f}).")  # fmt: skip
            out[(name, lab)] = model
    return out


def random_label_seed(seed: int) -> int:
    """Seed of the random-label model of the data randomization test: ``seed + 1``, so that
    its initial weights and data order are independent of the true-label model's (seed
    ``seed``)."""
    return int(seed) + 1


def pick_digits(data: MnistData, n: int) -> tuple[Tensor, list[str], Tensor]:
    """``n`` test digits: the first test image of each class in class order (so that 10
    digits show 0..9), then the following test images in order.

    Returns:
        ``(x (n, 1, 28, 28), names, test indices)``.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    n = min(n, len(data.y_test))
    first = [int((data.y_test == c).nonzero()[0]) for c in range(10) if (data.y_test == c).any()]
    rest = [i for i in range(len(data.y_test)) if i not in set(first)]
    idx = torch.tensor((first + rest)[:n])
    names = [f"{int(data.y_test[i])} (test #{int(i)})" for i in idx]
    return data.x_test[idx], names, idx


def digits_rgb(x: Tensor) -> np.ndarray:
    """``(N, 1, H, W)`` digits in [0, 1] -> ``(N, H, W, 3)`` uint8 for display."""
    g = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(g[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- data randomization


def data_randomization(model_true: nn.Module, model_random: nn.Module, x: Tensor,
                       methods: Sequence[str],
                       metrics: Sequence[str] = ("spearman_abs", "spearman"), seed: int = 0,
                       method_options: Mapping[str, dict] | None = None,
                       image_names: Sequence[str] | None = None,
                       label: str | None = None, progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """The data randomization test (paper section 4): every method's map of the true-label
    model against its map of the random-label model, on the same inputs.

    Each model explains its own predicted class (as in the other tests); the stochastic methods
    use the same noise for both models (common random numbers, ``seed``).  GradCAM methods are
    left out for models without a convolutional layer (:func:`methods_for`).

    Returns:
        Tidy table with columns ``model, method, image, image_name, metric, value,
        target_true, target_random``; ``attrs["maps"]`` is ``{"true": {method: maps},
        "random": {...}}`` (every image) and ``attrs["floor"]`` the noise floors of the
        true-label model's maps (:func:`sanitylib.metrics.noise_floor`; ``None`` for one
        image).
    """
    for model in (model_true, model_random):  # models, x's shape and dtype: before any work
        check_input(model, x)
    fns = resolve_metrics(metrics)
    check_map_size(fns, x)
    methods = methods_for(model_true, methods, verbose=progress)
    info = get_info(model_true)
    label = label or (info.name if info else type(model_true).__name__)
    names = list(image_names) if image_names is not None else [str(i) for i in range(len(x))]
    if len(names) != len(x):
        raise ValueError(f"image_names has {len(names)} entries for {len(x)} images")
    opts = dict(method_options or {})
    maps = {}
    targets = {}
    for key, model in (("true", model_true), ("random", model_random)):
        with evaluating(model):  # the user's model comes back in its own mode
            targets[key] = predict(model, x).argmax(1)
        maps[key] = explain_methods(model, x, methods, opts, seed=seed, progress=progress)
    rows = []
    for m in (spec.name for spec in resolve_methods(methods)):
        for metric in fns:  # Metric objects: a user's callable is not looked up by its name
            vals = similarity(maps["true"][m], maps["random"][m], metric).tolist()
            rows += [{"model": label, "method": m, "image": i, "image_name": names[i],
                      "metric": metric.name, "value": float(v),
                      "target_true": int(targets["true"][i]),
                      "target_random": int(targets["random"][i])}
                     for i, v in enumerate(vals)]  # fmt: skip
    df = pd.DataFrame(rows)
    df.attrs["maps"] = maps
    df.attrs["methods"] = [spec.name for spec in resolve_methods(methods)]
    df.attrs["floor"] = noise_floor(maps["true"], fns, seed=seed) if len(x) > 1 else None
    return df


# ----------------------------------------------------------------------------- rank ties


def zero_fraction(t: Tensor) -> Tensor:
    """Fraction of exactly-zero entries per image of an ``(N, ...)`` tensor -> ``(N,)``."""
    return (t.flatten(1) == 0).double().mean(1)


def support_spearman(a: Tensor, b: Tensor, x: Tensor, absolute: bool = True) -> Tensor:
    """Spearman correlation of two ``(N, 1, H, W)`` map batches computed only on the pixels
    where the input ``x`` is not 0 (the digit), after the paper's absolute (``absolute=True``)
    or diverging normalization -> ``(N,)`` float64.  Without the ~80 % background pixels, which
    are tied at exactly 0 in Gradient⊙Input and Integrated Gradients, the absolute correlation
    measures the ranking *within* the digit."""
    norm = abs_normalize if absolute else diverging_normalize
    na, nb = norm(a.float()).flatten(1), norm(b.float()).flatten(1)
    mask = (x.flatten(1) != 0)
    if mask.shape != na.shape:
        raise ValueError(f"x {tuple(x.shape)} does not match the maps {tuple(a.shape)}")
    out = []
    for i in range(len(na)):
        k = mask[i]
        if int(k.sum()) < 3:
            out.append(float("nan"))
            continue
        out.append(float(spearman(na[i, k][None], nb[i, k][None])[0]))
    return torch.tensor(out, dtype=torch.float64)


def input_times_noise(x: Tensor, n: int = 4, seed: int = 0, digit: bool = False) -> pd.DataFrame:
    """The paper's input-times-random-gradient control (its section 5.2, Fig. 19) on digits:
    Spearman (absolute and not) between ``x * u`` and ``x * v`` for independent standard
    Gaussian ``u, v``, ``n`` draws per image.  Two such "maps" share nothing but the input.
    ``digit=True`` adds the metric ``"spearman_abs (digit pixels)"``
    (:func:`support_spearman`: the absolute correlation on the non-zero pixels of ``x`` only).

    Returns:
        Tidy table ``image, draw, metric, value``.
    """
    check_seed(seed)
    gen = torch.Generator().manual_seed(derive_seed(seed, "input_times_noise"))
    rows = []
    for d in range(n):
        u = torch.randn(x.shape, generator=gen)
        v = torch.randn(x.shape, generator=gen)
        for metric in ("spearman_abs", "spearman"):
            vals = similarity(x * u, x * v, metric).tolist()
            rows += [{"image": i, "draw": d, "metric": metric, "value": float(val)}
                     for i, val in enumerate(vals)]  # fmt: skip
        if digit:
            vals = support_spearman(x * u, x * v, x).tolist()
            rows += [{"image": i, "draw": d, "metric": "spearman_abs (digit pixels)",
                      "value": float(val)} for i, val in enumerate(vals)]  # fmt: skip
    return pd.DataFrame(rows)


def tie_table(df: pd.DataFrame, x: Tensor, methods: Sequence[str]) -> pd.DataFrame:
    """Why the absolute Spearman of some methods stays high on MNIST: per randomization stage
    and method, the fraction of exactly-zero pixels in the randomized model's maps, the
    Spearman correlation with the trained model's maps on all pixels (absolute, from ``df``),
    on the digit's pixels only (absolute, :func:`support_spearman`), and without absolute value
    (all pixels).  ``df`` is a cascading-randomization table whose ``maps`` hold the
    maps of every image of ``x``.

    Returns:
        One row per (stage, method), means over images.
    """
    store = parts_of(df, "maps")
    if list(store.images) != list(range(len(x))):
        raise ValueError("the run must store the maps of every image (store_maps=len(x))")
    stages = stage_order(df)
    rows = []
    for stage in stages:
        for m in methods:
            ref, rnd = store["original"][m].float(), store[stage][m].float()
            sub = df[(df["stage"] == stage) & (df["method"] == m)]
            rows.append({
                "stage": stage, "method": m,
                "zero pixels": float(zero_fraction(rnd).mean()),
                "Spearman abs (all pixels)": float(sub[sub["metric"] == "spearman_abs"]["value"].mean()),
                "Spearman abs (digit pixels)": float(support_spearman(ref, rnd, x).nanmean()),
                "Spearman no abs (all pixels)": float(sub[sub["metric"] == "spearman"]["value"].mean()),
            })  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- IG-SmoothGrad control


def noise_method_control(model: nn.Module, random_model: nn.Module, x: Tensor,
                         method: str = "ig_smoothgrad", options: Mapping | None = None,
                         seed: int = 0, other_seed: int | None = None,
                         metrics: Sequence[str] = ("spearman_abs", "spearman"),
                         progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """Why a noise-averaged, input-multiplied method (IG-SmoothGrad) keeps the same similarity
    whatever the model: three comparisons of ``model``'s maps of ``x``.

    * ``"random model, same noise"``: ``random_model``'s maps with the same noise samples
      (``seed``: common random numbers, as in the randomization tests);
    * ``"random model, independent noise"``: ``random_model``'s maps with other noise samples
      (``other_seed``, default ``derive_seed(seed, "control")``);
    * ``"no model: (x + noise) * Gaussian"``: no network at all; two maps
      ``mean_s (x + e_s) * u`` and ``mean_s (x + e_s) * v`` with the method's own noise samples
      ``e_s`` (same ``seed``) and independent standard Gaussian "gradients" ``u, v``: what the
      shared factor ``x + noise`` alone scores.

    Returns:
        Tidy table ``comparison, metric, image, value``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    settings = {**PAPER_SETTINGS.get(method, {}), **dict(options or {})}
    if "n_samples" not in settings or "noise_level" not in settings:
        raise ValueError(f"{method!r} is not a noise-averaged method (no n_samples/noise_level)")
    other = derive_seed(seed, "control") if other_seed is None else int(other_seed)
    opts = {method: dict(options or {})}
    ref = explain_methods(model, x, [method], opts, seed=seed, progress=progress)[method]
    same = explain_methods(random_model, x, [method], opts, seed=seed, progress=progress)[method]
    indep = explain_methods(random_model, x, [method], opts, seed=other, progress=progress)[method]
    gen = torch.Generator().manual_seed(derive_seed(seed, "control", "gaussian"))
    factor = torch.stack([
        (x[i] + unit_noise(x[i], settings["n_samples"], seed, i)
         * settings["noise_level"] * float(x[i].max() - x[i].min())).mean(0)
        for i in range(len(x))])  # fmt: skip
    u = torch.randn(x.shape, generator=gen)
    v = torch.randn(x.shape, generator=gen)
    pairs = {"random model, same noise": (ref, same),
             "random model, independent noise": (ref, indep),
             "no model: (x + noise) * Gaussian": (factor * u, factor * v)}
    rows = []
    for comp, (a, b) in pairs.items():
        for metric in metrics:
            rows += [{"comparison": comp, "metric": metric, "image": i, "value": float(val)}
                     for i, val in enumerate(similarity(a, b, metric).tolist())]  # fmt: skip
    return pd.DataFrame(rows)
