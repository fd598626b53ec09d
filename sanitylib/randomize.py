"""Randomization of a model's blocks: re-initialization or additive/multiplicative noise.

Schedules (paper section 3): *cascading* randomizes blocks 1..k (top first) at stage k;
*independent* randomizes block k alone.  Each block has its own ``torch.Generator`` seeded from
``(seed, block name)``, so block ``j`` gets the same random weights at every stage and the stages
of a cascade are nested.  :func:`randomized` restores every parameter and buffer (non-persistent
buffers too) bit-exactly and every module's own train/eval mode on exit, also when an exception
interrupts the run.

What is randomized is what the forward pass uses.  A weight computed from stored originals by
a ``torch.nn.utils.parametrizations`` wrapper (``weight_norm``, ``spectral_norm``, or any
parametrization with a ``right_inverse``) is drawn, or perturbed, as the plain weight: the
initializer sees ``m.weight`` as a tensor it can fill in place, and the result is carried to the
originals through the parametrization's ``right_inverse`` (a spectral norm's power-iteration
vectors ``_u``/``_v`` are set to the new weight's leading singular vectors, so the forward pass
divides by its exact spectral norm).  The old-style hooks ``torch.nn.utils.weight_norm`` and
``torch.nn.utils.spectral_norm``, which recompute ``weight`` before every forward pass, are
refused (:func:`check_randomizable`).  A stage (:func:`randomized`, :class:`ModelStates`) in
which a block's randomization left every parameter and buffer of the block equal to the trained
ones gets a warning (:func:`_check_randomized`): its maps would score a similarity of 1.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .models import (_NORM, Block, _attention_, _norm_identity_, _pytorch_attention_, _trunc_normal, _zero,
                     block_member, get_info, get_submodule, init_mnist_cnn_, init_mnist_mlp_, is_vit, vit_blocks, vit_init_)
from .utils import derive_seed

__all__ = ["INITS", "Perturbation", "Stage", "get_blocks", "infer_blocks", "cascading_stages",
           "independent_stages", "inactive_blocks", "NO_PARAMETERS", "NEVER_RUNS", "SCHEDULES", "ORDERS", "check_schedule", "schedule_stages",
           "check_randomizable", "randomize_", "randomized", "snapshot", "restore", "ModelStates", "evaluating"]  # fmt: skip

Initializer = Callable[[nn.Module, torch.Generator], None]


@torch.no_grad()
def he_truncated_normal_(module: nn.Module, gen: torch.Generator) -> None:
    """The authors' re-initialization (TF-slim ``variance_scaling_initializer``): conv/linear
    weights from a normal with ``std = sqrt(1.3 * 2 / fan_in)`` truncated at +-2 std, biases 0;
    normalization layers (:data:`sanitylib.models._NORM`) get weight 1 and bias 0 and KEEP
    their running statistics.  Beyond the paper's models: a ``MultiheadAttention``'s input
    projection (``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
    the width) is drawn like a dense weight (``fan_in`` = its input width, bias 0), and its
    learned extra key and value ``bias_k``/``bias_v`` (``add_bias_kv=True``) are biases: 0
    (:func:`sanitylib.models._attention_`); parameters registered directly on other modules (a
    vision transformer's class token and position embedding) from a normal with std 0.02
    (:func:`_loose_parameters_`)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            _he_trunc_(m.weight, m.weight[0].numel(), gen)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, _NORM):
            _norm_identity_(m)
        elif isinstance(m, nn.MultiheadAttention):
            _attention_(m, lambda w: _he_trunc_(w, w.shape[1], gen), _zero)
        else:
            _loose_parameters_(m, gen)


def _he_trunc_(w: Tensor, fan_in: int, gen: torch.Generator) -> None:
    _trunc_normal(w, math.sqrt(2.6 / fan_in), gen)  # He's std, truncated at 2 std


def _loose_parameters_(m: nn.Module, gen: torch.Generator) -> None:
    """Parameters registered directly on a module that no rule covers (a vision transformer's
    class token and position embedding; every ``Parameter`` of a block's member given by its
    own path): normal, std 0.02 (the ViT position-embedding initialization).  The originals
    of a parametrized weight are not drawn: the weight itself is (see the module docstring)."""
    if isinstance(m, parametrize.ParametrizationList):
        return
    for p in m._parameters.values():
        if p is not None:
            nn.init.normal_(p, std=0.02, generator=gen)


@torch.no_grad()
def pytorch_default_(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default initialization (what ``reset_parameters()`` draws), from ``gen``:
    kaiming-uniform(a=sqrt(5)) weights and U(+-1/sqrt(fan_in)) biases; normalization layers
    (:data:`sanitylib.models._NORM`) get weight 1, bias 0 AND reset running statistics (as
    ``reset_parameters`` does); a ``MultiheadAttention``'s own parameters as its
    ``_reset_parameters`` draws them (:func:`sanitylib.models._pytorch_attention_`: the input
    projection, ``in_proj_weight`` or ``q/k/v_proj_weight``, Xavier uniform with bias 0,
    ``bias_k``/``bias_v`` Xavier normal, and its output projection's bias 0: its weight is drawn
    as a ``Linear``'s); parameters registered directly on other modules: normal, std 0.02."""
    # an attention's output projection: a Linear whose bias MultiheadAttention sets to 0
    out_proj = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
            if m.bias is not None and id(m) in out_proj:
                nn.init.zeros_(m.bias)
            elif m.bias is not None:
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=gen)
        elif isinstance(m, _NORM):
            _norm_identity_(m, reset_running_stats=True)
        elif isinstance(m, nn.MultiheadAttention):
            _pytorch_attention_(m, gen)
        else:
            _loose_parameters_(m, gen)


#: Named re-initializations.  ``"paper"`` resolves per model (see :func:`resolve_init`).
INITS: dict[str, Initializer] = {
    "he_truncated_normal": he_truncated_normal_,
    "pytorch": pytorch_default_,
    "mnist_cnn": init_mnist_cnn_,
    "mnist_mlp": init_mnist_mlp_,
    "vit": vit_init_,
}


@dataclass(frozen=True)
class Perturbation:
    """How a block is randomized.

    Attributes:
        kind: ``"reinit"`` (draw fresh weights with ``init``), ``"gaussian"`` (add
            ``N(0, sigma^2)`` to every parameter), or ``"multiplicative"`` (multiply every
            parameter by ``1 + N(0, sigma^2)``).
        init: initializer name (see :data:`INITS`, or ``"paper"``: the model's own paper
            initializer, He truncated normal for ImageNet models, ``"vit"``
            (:func:`sanitylib.models.vit_init_`) for the vision transformers) or a callable
            ``(module, generator) -> None``; used by ``"reinit"``.
        sigma: noise standard deviation.
        relative: for ``"gaussian"``, scale ``sigma`` by each parameter tensor's std; a tensor
            with one element or constant values (std 0) by its root mean square instead
            (``|w|`` for one element), so only an all-zero tensor is left as it is.
    """

    kind: str = "reinit"
    init: Union[str, Initializer] = "paper"
    sigma: float = 0.0
    relative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("reinit", "gaussian", "multiplicative"):
            raise ValueError(f"unknown perturbation {self.kind!r}; known: 'reinit', "
                             "'gaussian', 'multiplicative'")  # fmt: skip
        if self.kind != "reinit" and (isinstance(self.sigma, (bool, str, bytes))
                                      or not isinstance(self.sigma, numbers.Real)
                                      or not 0 < self.sigma < math.inf):  # fmt: skip
            raise ValueError(f"{self.kind} noise needs a finite sigma > 0, got {self.sigma!r}")
        if not isinstance(self.relative, bool):
            raise ValueError(f"relative must be True or False, got {self.relative!r}")
        if self.relative and self.kind != "gaussian":  # it had no effect, silently
            raise ValueError(f"relative=True is for 'gaussian' noise ({self.kind!r} noise is "
                             "already relative to each weight, or is a re-initialization)")  # fmt: skip
        if isinstance(self.init, str) and self.init != "paper" and self.init not in INITS:
            raise ValueError(f"unknown initializer {self.init!r}; known: 'paper', "
                             f"{', '.join(INITS)}, or a callable (module, generator)")  # fmt: skip

    def describe(self) -> str:
        """A short label such as ``reinit(he_truncated_normal)`` or ``gaussian(0.1, rel)``."""
        if self.kind == "reinit":
            name = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "custom")
            return f"reinit({name})"
        sigma = f"{self.sigma:g}"
        if float(sigma) != self.sigma:  # 0.5000001 read "0.5": two runs under one name
            sigma = f"{self.sigma:.12g}"  # np.linspace's 0.30000000000000004 reads 0.3
        return f"{self.kind}({sigma}{', relative' if self.relative else ''})"


def resolve_init(model: nn.Module, init: Union[str, Initializer]) -> Initializer:
    """The initializer a :class:`Perturbation` means on ``model``."""
    if callable(init):
        return init
    if init == "paper":
        info = get_info(model)
        init = info.init if info is not None else "he_truncated_normal"
    return INITS[init]


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Stage:
    """One step of a schedule: its name and the blocks randomized at that step."""

    name: str
    blocks: tuple[Block, ...]


def _param_children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}{n}", m) for n, m in module.named_children()
            if any(True for _ in m.parameters())]  # fmt: skip


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class _ParameterHolder(nn.Module):
    """A module holding one parameter of a block given by its own path (a vision transformer's
    ``class_token``), so that an initializer ``(module, generator)`` can draw it: the same
    ``Parameter`` object, so drawing it in place changes the model's."""

    def __init__(self, name: str, param: nn.Parameter) -> None:
        super().__init__()
        self.register_parameter(name, param)


def _members(model: nn.Module, block: Block) -> list[nn.Module]:
    """The modules of ``block``; a path naming a parameter gives a :class:`_ParameterHolder`."""
    out = []
    for path in block.modules:
        member = block_member(model, path)
        if isinstance(member, nn.Parameter):
            member = _ParameterHolder(path.rpartition(".")[2], member)
        out.append(member)
    return out


def _runner(model: nn.Module, path: str) -> nn.Module:
    """The module whose forward pass uses the member at ``path`` (itself, or the module a
    parameter is registered on)."""
    member = block_member(model, path)
    if isinstance(member, nn.Parameter):
        owner = path.rpartition(".")[0]
        return model.get_submodule(owner) if owner else model
    return member


def _executed(model: nn.Module, groups: dict[str, list[nn.Module]], example: torch.Tensor) -> list[str]:
    """The names of ``groups`` (name -> modules) of which some submodule runs in a forward pass
    of ``model`` on ``example[:1]`` (in eval mode, no gradients; modes and buffers restored), in
    the order they first start running.  A container that is never called itself (a
    ``ModuleList``) runs when its layers do."""
    seen: list[str] = []
    hooks = [sub.register_forward_pre_hook(
                 lambda *_, n=n: seen.append(n) if n not in seen else None)
             for n, mods in groups.items() for m in mods for sub in m.modules()]  # fmt: skip
    try:
        with evaluating(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


#: Why a block is left out or refused (values of :func:`inactive_blocks`).
NO_PARAMETERS = "holds no parameters (randomizing it changes nothing)"
NEVER_RUNS = ("never runs in the forward pass on the given input (e.g. an auxiliary head in eval "
              "mode): randomizing it changes nothing")  # fmt: skip


def inactive_blocks(model: nn.Module, blocks: Sequence[Block],
                    example: torch.Tensor | None = None) -> dict[str, str]:  # fmt: skip
    """The blocks of ``blocks`` whose randomization cannot change the model's output, with the
    reason: ``{name: NO_PARAMETERS}`` for a block none of whose modules holds a parameter (a
    ReLU, a pooling layer) and, with ``example`` (a batch ``(N, ...)``; one image is traced),
    ``{name: NEVER_RUNS}`` for a block none of whose parameterized modules runs in the forward
    pass (torchvision's ``inception_v3``/``googlenet`` auxiliary heads in eval mode).  A stage
    randomizing only such blocks leaves every map unchanged and would score a similarity of 1.
    Empty when every block is active."""
    out: dict[str, str] = {}
    groups: dict[str, list[nn.Module]] = {}
    for b in blocks:
        with_params = [_runner(model, path) for path, m in zip(b.modules, _members(model, b))
                       if _holds_parameters(m)]  # fmt: skip
        if not with_params:
            out[b.name] = NO_PARAMETERS
        else:
            groups[b.name] = with_params
    if example is not None and groups:
        ran = set(_executed(model, groups, example))
        for name in groups:
            if name not in ran:
                out[name] = NEVER_RUNS
    return {b.name: out[b.name] for b in blocks if b.name in out}


def _infer(model: nn.Module, example: torch.Tensor | None) -> tuple[tuple[Block, ...], dict[str, str]]:
    if is_vit(model):  # an encoder stack: head, each encoder block top-down, the embeddings
        return vit_blocks(model), {}
    children = _param_children(model, "")
    # parameters registered on the model itself (a hand-built ViT's cls_token and pos_embed,
    # as timm and DeiT register them) or on a wrapper descended into: in no child's block, they
    # kept their trained values at every stage, silently
    loose = [n for n, _ in model.named_parameters(recurse=False)]
    while len(children) == 1:
        name, only = children[0]
        inner = _param_children(only, f"{name}.")
        if not inner:
            break
        loose += [f"{name}.{n}" for n, _ in only.named_parameters(recurse=False)]
        children = inner
    if not children:
        raise ValueError("cannot infer blocks: the model has no child module with parameters; "
                         "pass blocks=[...] explicitly")  # fmt: skip
    order = [n for n, _ in children]
    skipped: dict[str, str] = {}
    if example is not None:
        # a child is placed where any of its submodules first starts running (a ModuleList's
        # own forward never runs; its layers do); children that never run are left out
        seen = _executed(model, {n: [m] for n, m in children}, example)
        skipped = {n: NEVER_RUNS for n in order if n not in seen}
        if not seen:
            raise ValueError("cannot infer blocks: no child module with parameters runs in the "
                             "forward pass; pass blocks=[...] explicitly")  # fmt: skip
        order = seen
    blocks = tuple(Block(n, (n,)) for n in reversed(order))
    if loose:  # their own block, at the bottom: the last stage of a cascade leaves nothing trained
        blocks += (Block("+".join(loose), tuple(loose)),)
    return blocks, skipped


def _warn_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        warnings.warn(f"blocks left out of the inferred blocks because they never run in the "
                      f"forward pass on the given input (randomizing them would change nothing "
                      f"and score a similarity of 1): {', '.join(skipped)}", UserWarning,
                      stacklevel=3)  # fmt: skip


def infer_blocks(model: nn.Module, example: torch.Tensor | None = None) -> tuple[Block, ...]:
    """Blocks of an arbitrary model: its top-level children that own parameters, ordered from
    the output to the input.  A model that wraps its network in a single child (``model.net``,
    an ``nn.Sequential`` inside a wrapper, ...) is descended into, as long as there is a single
    parameterized child with parameterized children of its own, and its blocks are named by
    their dotted paths (``"net.fc"``).  A torchvision ``VisionTransformer`` gets its encoder
    stack's blocks (:func:`sanitylib.models.vit_blocks`: the head, each encoder block from the
    last to the first, the patch and position embeddings with the class token).  Parameters
    registered on the model itself (or on a wrapper descended into), such as a hand-built
    ViT's ``cls_token`` and ``pos_embed``, form one more block at the bottom, named by their
    paths joined with ``+`` (``"cls_token+pos_embed"``), so that the last stage of a cascade
    leaves no parameter trained.  With ``example``, the order is the execution order of a
    traced forward pass (in eval mode; modes and buffers restored), and children that never run
    in it (torchvision's ``inception_v3``/``googlenet`` auxiliary heads in eval mode) are left
    out with a warning naming them; without it, the registration order."""
    blocks, skipped = _infer(model, example)
    _warn_skipped(skipped)
    return blocks


def get_blocks(model: nn.Module, blocks=None, example: torch.Tensor | None = None,
               return_skipped: bool = False):  # fmt: skip
    """Resolve ``blocks``: ``None`` (the model's declared blocks, or :func:`infer_blocks`),
    an int ``K`` (the first ``K`` of those, from the top, as ``sanitylib run --blocks K``),
    a non-empty list of :class:`Block`, of block names of the model, or of dotted module
    paths.

    A block given explicitly must be able to change the output: one that holds no parameters
    (``"relu"``, a pooling layer) or, with ``example``, never runs in the forward pass (an
    auxiliary head in eval mode) is refused (``ValueError`` naming it and why; see
    :func:`inactive_blocks`).  Inferred blocks that never run are left out with a warning.
    A block that cannot be randomized where the forward pass reads its weights (an old-style
    ``weight_norm``/``spectral_norm`` hook) is refused (:func:`check_randomizable`).

    Returns:
        The blocks ``(Block, ...)`` ordered as given (top to bottom), or with
        ``return_skipped=True`` a pair ``(blocks, skipped)`` where ``skipped`` maps each
        inferred block left out to the reason (empty for declared or explicit blocks).
    """
    out, skipped = _resolve_blocks(model, blocks, example)
    check_randomizable(model, out)
    return (out, skipped) if return_skipped else out


def _resolve_blocks(model: nn.Module, blocks, example: torch.Tensor | None):
    info = get_info(model)
    declared = info.blocks if info is not None else None
    if blocks is None:
        if declared is not None:
            out, skipped = tuple(declared), {}
        else:
            out, skipped = _infer(model, example)
            _warn_skipped(skipped)
        return out, skipped
    if isinstance(blocks, numbers.Integral) and not isinstance(blocks, bool):
        every, skipped = _resolve_blocks(model, None, example)
        if not 1 <= blocks <= len(every):
            raise ValueError(f"blocks: {int(blocks)} top blocks asked for, the model has "
                             f"{len(every)} ({', '.join(b.name for b in every)}); pass an int in "
                             f"[1, {len(every)}]")  # fmt: skip
        out = tuple(every[: int(blocks)])
        return out, skipped
    if isinstance(blocks, (str, Block)) or not hasattr(blocks, "__iter__"):
        raise ValueError(f"blocks must be a list of blocks (Block objects, block names or module "
                         f"paths), the number of top blocks or None, got {blocks!r}; e.g. "
                         f"blocks=[{blocks!r}]")  # fmt: skip
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks must name at least one block, got an empty list; pass "
                         "blocks=None for the model's declared (or inferred) blocks")  # fmt: skip
    out = []
    by_name = {b.name: b for b in (declared or ())}
    for b in blocks:
        if isinstance(b, Block):
            out.append(b)
        elif isinstance(b, str) and b in by_name:
            out.append(by_name[b])
        elif isinstance(b, str):
            block_member(model, b)  # raises a clear error if unknown
            out.append(Block(b, (b,)))
        else:
            raise ValueError(f"a block must be a Block, a block name or a module path, got {b!r}")
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate blocks in {names}")
    for b in out:
        for path in b.modules:
            block_member(model, path)
    bad = inactive_blocks(model, out, example)
    if bad:
        raise ValueError("blocks: " + "; ".join(f"block {n!r} {why}" for n, why in bad.items())
                         + "; pass only blocks whose randomization can change the output")
    out = tuple(out)
    return out, {}


def cascading_stages(blocks: Sequence[Block]) -> list[Stage]:
    """Stage k randomizes blocks[0..k] (blocks are ordered top to bottom)."""
    return [Stage(b.name, tuple(blocks[: i + 1])) for i, b in enumerate(blocks)]


def independent_stages(blocks: Sequence[Block]) -> list[Stage]:
    """Stage k randomizes blocks[k] alone."""
    return [Stage(b.name, (b,)) for b in blocks]


#: The randomization schedules and the orders of their blocks.
SCHEDULES = ("cascading", "independent")
ORDERS = ("top_down", "bottom_up")


def check_schedule(schedule, order="top_down") -> None:
    """``ValueError`` naming the argument unless ``schedule`` is one of :data:`SCHEDULES` and
    ``order`` one of :data:`ORDERS`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: 'cascading', 'independent'")
    if order not in ORDERS:
        raise ValueError(f"order must be 'top_down' or 'bottom_up', got {order!r}")


def schedule_stages(blocks: Sequence[Block], schedule: str, order: str = "top_down") -> list[Stage]:
    """The stages of ``schedule`` over ``blocks`` (ordered top to bottom): ``"top_down"``
    randomizes the output block first (the paper), ``"bottom_up"`` the input block first."""
    check_schedule(schedule, order)
    ordered = list(blocks)[::-1] if order == "bottom_up" else list(blocks)
    return (cascading_stages if schedule == "cascading" else independent_stages)(ordered)


# ----------------------------------------------------------------------------- apply / restore


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` (the live tensors), keyed like ``state_dict``,
    with the non-persistent buffers (``register_buffer(..., persistent=False)``, which
    ``state_dict`` skips) after them under their ``named_buffers`` names."""
    out = dict(model.state_dict(keep_vars=True))
    for k, b in model.named_buffers():
        if b is not None and k not in out:
            out[k] = b
    return out


def _check_randomized(block: Block, perturbation: Perturbation | None, trained: Sequence[Tensor],
                      now: Sequence[Tensor], stacklevel: int = 3) -> None:  # fmt: skip
    """A warning when ``now`` (a block's parameters and buffers after its randomization)
    equals ``trained`` (before it) in every tensor: the stage's maps are the trained model's
    and score a similarity of 1 (an initializer that writes none of the block's weights,
    multiplicative noise on zeros, or honestly: a re-initialization that draws the values the
    block holds, such as an untrained normalization layer's weight 1 and bias 0)."""
    if all(torch.equal(a, b) for a, b in zip(now, trained)):
        p = perturbation or Perturbation()
        warnings.warn(f"randomizing block {block.name!r} with {p.describe()} left every "
                      f"parameter and buffer of the block as it was: its maps equal the trained "
                      f"model's and score a similarity of 1; check that the initializer writes "
                      f"the block's weights (a parametrized weight is written as the module's "
                      f"plain attribute, e.g. m.weight)", UserWarning, stacklevel=stacklevel)  # fmt: skip


def _block_tensors(model: nn.Module, block: Block) -> list[Tensor]:
    """The parameters and buffers of ``block`` (the live tensors), each once."""
    out: list[Tensor] = []
    for member in _members(model, block):
        for t in _named_tensors(member).values():
            if all(t is not u for u in out):
                out.append(t)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer, non-persistent buffers too (keyed like
    ``state_dict``; see :func:`_named_tensors`)."""
    return {k: v.detach().clone() for k, v in _named_tensors(model).items()}


@torch.no_grad()
def restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy ``snap`` back into the model's tensors in place (bit-exact)."""
    state = _named_tensors(model)
    for k, v in snap.items():
        state[k].data.copy_(v)


@contextlib.contextmanager
def evaluating(model: nn.Module, buffers: bool = True) -> Iterator[nn.Module]:
    """Context manager: the model in eval mode inside; on exit (also on error) every module's
    own ``training`` flag is set back (a model may mix train and eval submodules) and, with
    ``buffers=True``, every buffer (e.g. BatchNorm running statistics) is restored bit-exactly."""
    modes = [(m, m.training) for m in model.modules()]
    saved = ({k: v.detach().clone() for k, v in model.named_buffers()} if buffers else {})
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        if saved:
            with torch.no_grad():
                current = dict(model.named_buffers())
                for k, v in saved.items():
                    if k in current and current[k] is not None:
                        current[k].copy_(v)


def _old_style_hook(m: nn.Module):
    """The ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hook of ``m`` (old style: it
    recomputes the weight before every forward pass), or ``None``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return next((h for h in m._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))),
                None)  # fmt: skip


def check_randomizable(model: nn.Module, blocks: Sequence[Block]) -> None:
    """``ValueError`` naming the module unless every weight of ``blocks`` can be randomized
    where the forward pass reads it: a module wrapped with the old-style
    ``torch.nn.utils.weight_norm`` or ``spectral_norm`` (its hook recomputes ``weight`` from
    ``weight_g``/``weight_v`` or ``weight_orig`` before every forward pass, so a drawn
    ``weight`` is thrown away) and a parametrization without ``right_inverse`` (a drawn weight
    cannot be carried to its originals) are refused."""
    for b in blocks:
        for path, member in zip(b.modules, _members(model, b)):
            for name, m in member.named_modules(prefix=path):
                hook = _old_style_hook(m)
                if hook is not None:
                    kind = "weight_norm" if type(hook).__name__ == "WeightNorm" else "spectral_norm"
                    undo = "remove_weight_norm" if kind == "weight_norm" else "remove_spectral_norm"
                    raise ValueError(
                        f"block {b.name!r}: module {name!r} ({type(m).__name__}) is wrapped with "
                        f"the old-style torch.nn.utils.{kind}, whose hook recomputes "
                        f"{hook.name!r} from its originals before every forward pass, so a "
                        f"randomized {hook.name!r} would be thrown away; wrap it with "
                        f"torch.nn.utils.parametrizations.{kind} instead (or remove the hook "
                        f"with torch.nn.utils.{undo})")  # fmt: skip
                for tensor, plist in _parametrizations(m).items():
                    lacking = [type(q).__name__ for q in plist if not hasattr(q, "right_inverse")]
                    if lacking:
                        raise ValueError(
                            f"block {b.name!r}: the {tensor!r} of module {name!r} "
                            f"({type(m).__name__}) is parametrized by {', '.join(lacking)} without "
                            f"a right_inverse, so a randomized {tensor!r} cannot be carried to its "
                            f"originals; give the parametrization a right_inverse method")  # fmt: skip


def _parametrizations(m: nn.Module) -> dict[str, parametrize.ParametrizationList]:
    """``{tensor name: its ParametrizationList}`` of the tensors of ``m`` itself (not of its
    submodules) computed by ``torch.nn.utils.parametrize``."""
    return dict(m.parametrizations.items()) if parametrize.is_parametrized(m) else {}


def _used(module: nn.Module) -> list[Tensor]:
    """The weights the forward pass of ``module`` uses, each once, in the order of
    ``module.parameters()``: its parameters, with the originals of a parametrized tensor
    replaced by the tensor computed from them (inside :func:`_drawable`: the one tensor the
    initializer fills), placed before the module's own parameters (a weight before its bias)."""
    out: list[Tensor] = []
    for m in module.modules():
        if isinstance(m, parametrize.ParametrizationList):
            continue
        out += [getattr(m, name) for name in _parametrizations(m)]
        for p in m._parameters.values():
            if p is not None and all(p is not q for q in out):
                out.append(p)
    return out


@contextlib.contextmanager
def _drawable(module: nn.Module) -> Iterator[None]:
    """Inside, every parametrized tensor of ``module`` is one plain tensor (``m.weight`` gives
    the same tensor at every access: ``torch.nn.utils.parametrize.cached``) that can be drawn
    or perturbed in place; on exit each one that changed is written to its originals."""
    owners = [(m, name) for m in module.modules() for name in _parametrizations(m)]
    if not owners:
        yield
        return
    with parametrize.cached():
        before = [getattr(m, name).clone() for m, name in owners]
        yield
        after = [getattr(m, name) for m, name in owners]
    for (m, name), old, new in zip(owners, before, after):
        if not torch.equal(old, new):
            _write_parametrized(m.parametrizations[name], new)


def _write_parametrized(plist: parametrize.ParametrizationList, value: Tensor) -> None:
    """Set the originals of ``plist`` in place so that it computes ``value`` (through the
    parametrizations' ``right_inverse``), and a spectral norm's ``_u``/``_v`` to the leading
    singular vectors of its input (the power iteration's fixed point)."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    for q in reversed(plist):
        value = q.right_inverse(value)
    originals = ([plist.original] if plist.is_tensor
                 else [getattr(plist, f"original{i}") for i in range(plist.ntensors)])  # fmt: skip
    for o, v in zip(originals, [value] if plist.is_tensor else list(value)):
        o.copy_(v)
    inputs = tuple(originals)
    for i, q in enumerate(plist):
        if isinstance(q, _SpectralNorm) and inputs[0].ndim > 1:
            mat = q._reshape_weight_to_matrix(inputs[0]).double()
            u, _, vh = torch.linalg.svd(mat, full_matrices=False)
            q._u.copy_(u[:, 0])
            q._v.copy_(vh[0].conj())
        if i + 1 < len(plist):
            inputs = (q(*inputs),)


def _relative_scale(w: Tensor) -> float:
    """The scale of relative noise on ``w``: its std, or its root mean square where the std is
    undefined or 0 (one element, constant values)."""
    std = float(w.std()) if w.numel() > 1 else 0.0
    return std if std > 0 else float(w.double().square().mean().sqrt())


@torch.no_grad()
def randomize_(model: nn.Module, blocks: Sequence[Block], perturbation: Perturbation | None = None,
               seed: int = 0) -> None:  # fmt: skip
    """Randomize ``blocks`` of ``model`` in place; each block uses one generator seeded with
    ``derive_seed(seed, block.name)`` (on the parameters' device), never the global RNG.

    Raises:
        ValueError: a block cannot be randomized where the forward pass reads it
            (:func:`check_randomizable`; before anything is drawn).
    """
    p = perturbation or Perturbation()
    init = resolve_init(model, p.init) if p.kind == "reinit" else None
    check_randomizable(model, blocks)
    for block in blocks:
        modules = _members(model, block)
        params = [w for m in modules for w in m.parameters()]
        device = params[0].device if params else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, block.name))
        for module in modules:
            with _drawable(module):
                if init is not None:
                    init(module, gen)
                    continue
                for w in _used(module):
                    noise = torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)
                    if p.kind == "gaussian":
                        w.add_(noise * (p.sigma * (_relative_scale(w) if p.relative else 1.0)))
                    else:
                        w.mul_(1 + p.sigma * noise)


@contextlib.contextmanager
def randomized(model: nn.Module, blocks: Sequence[Block], perturbation: Perturbation | None = None,
               seed: int = 0, snap: dict | None = None) -> Iterator[nn.Module]:  # fmt: skip
    """Context manager: randomize ``blocks`` in eval mode, yield the model, then restore every
    parameter and buffer bit-exactly (non-persistent buffers too) and every module's own
    ``training`` flag (a model may mix train and eval submodules), even on error.  A block left as
    it was by its randomization gets a warning (:func:`_check_randomized`).

    ``snap`` (from :func:`snapshot`) avoids re-cloning the model when called in a loop.
    """
    snap = snap if snap is not None else snapshot(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        randomize_(model, blocks, perturbation, seed)
        names = {id(t): k for k, t in _named_tensors(model).items()}
        for b in blocks:
            now = _block_tensors(model, b)
            # the warning points at the caller's ``with`` (past contextlib's __enter__)
            _check_randomized(b, perturbation, [snap[names[id(t)]] for t in now], now, stacklevel=4)
        model.eval()
        yield model
    finally:
        restore(model, snap)
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- model states


class ModelStates:
    """Switches the model between states (sets of randomized blocks) by copying tensors:
    ``ModelStates(model, states, perturbation, seed)``, then ``set(k)`` puts the model in state
    ``k`` (``states[k]`` is the tuple of blocks randomized in it) and ``restore()`` back to the
    trained weights.

    Each block's random tensors are drawn once with :func:`sanitylib.randomize.randomize_`
    (its own generator), so a state equals ``randomized(model, blocks, perturbation, seed)``
    (and a block left as it was gets the same warning).  Blocks sharing tensors
    fall back to re-randomizing the whole state at every switch."""

    def __init__(self, model: nn.Module, states: Sequence[Sequence[Block]],
                 perturbation: Perturbation, seed: int) -> None:  # fmt: skip
        self.model, self.states, self.perturbation, self.seed = model, states, perturbation, seed
        self.tensors: dict[str, list[Tensor]] = {}
        self.trained: dict[str, list[Tensor]] = {}
        self.random: dict[str, list[Tensor]] = {}
        blocks = {b.name: b for st in states for b in st}
        seen: dict[int, str] = {}
        self.shared = False
        self.blocks = blocks
        for name, b in blocks.items():
            ts = _block_tensors(model, b)
            for t in ts:
                if id(t) in seen and seen[id(t)] != name:
                    self.shared = True
                seen[id(t)] = name
            self.tensors[name] = ts
            self.trained[name] = [t.detach().clone() for t in ts]
        if not self.shared:
            with torch.no_grad():
                for name, b in blocks.items():
                    randomize_(model, [b], perturbation, seed)
                    _check_randomized(b, perturbation, self.trained[name], self.tensors[name])
                    self.random[name] = [t.detach().clone() for t in self.tensors[name]]
                    for t, v in zip(self.tensors[name], self.trained[name]):
                        t.copy_(v)
        self.current: set[str] = set()
        self.dirty: dict[int, Tensor] = {}

    @torch.no_grad()
    def set(self, k: int) -> None:
        """Put the model in state ``k``."""
        want = {b.name for b in self.states[k]}
        if self.shared:
            for name in self.current:
                self._write(name, self.trained[name])
            randomize_(self.model, self.states[k], self.perturbation, self.seed)
            for name in want:
                _check_randomized(self.blocks[name], self.perturbation, self.trained[name],
                                  self.tensors[name])  # fmt: skip
                for t in self.tensors[name]:
                    self.dirty[id(t)] = t
        else:
            for name in self.current - want:
                self._write(name, self.trained[name])
            for name in want - self.current:
                self._write(name, self.random[name])
        self.current = want

    def _write(self, name: str, values: list[Tensor]) -> None:
        # in-place copies bump the version counters: autograd refuses to reuse a recorded
        # graph that saved a changed tensor, a safety net for the replay logic
        for t, v in zip(self.tensors[name], values):
            t.copy_(v)
            self.dirty[id(t)] = t

    @torch.no_grad()
    def restore(self) -> None:
        """Put every block back to its trained tensors."""
        for name in self.tensors if self.shared else self.current:
            self._write(name, self.trained[name])
        self.current = set()

    def clean(self) -> None:
        """Forget earlier writes (called when a forward pass is recorded)."""
        self.dirty = {}
