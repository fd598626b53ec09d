"""Attention-based explanations of vision transformers.

Four built-in methods for vision transformers with a class token (torchvision's
:class:`~torchvision.models.VisionTransformer` and any model built from blocks whose
``self_attention`` is an :class:`torch.nn.MultiheadAttention`), registered by name like the
gradient methods, so ``sanitylib.explain``, the randomization runners and the command line
accept them:

* ``"raw_attention"``: the last block's attention from the class token to the patch tokens,
  averaged over the heads.
* ``"attention_rollout"`` (Abnar & Zuidema, 2020): per block the head-averaged attention with
  the residual connection, ``A' = 0.5 A + 0.5 I``, rows renormalized to sum 1; the product
  ``R = A'_L ... A'_1`` over the blocks; the class token's row over the patch tokens.
* ``"grad_attention_rollout"`` (Chefer, Gur & Wolf, ICCV 2021, "generic attention-model
  explainability"): per block ``Ā = mean_heads((∇A ⊙ A)⁺)`` with ``∇A`` the gradient of the
  target logit with respect to the attention probabilities; ``R ← R + Ā R`` from ``R = I``,
  first block to last; the class token's row over the patch tokens.
* ``"vit_gradcam"``: GradCAM (Selvaraju et al., 2017) on the patch tokens that the last block's
  attention reads (the output of its first LayerNorm, ``ln_1``): the tokens reshaped to the patch
  grid are the feature map, the weights are the gradients averaged over the patches, and the map
  is the ReLU of the weighted sum.  The last block's *output* tokens cannot be used: the
  classifier reads only the class token after the last block, so the gradient at the output
  patch tokens is zero (``pytorch-grad-cam``'s ViT tutorial makes the same point and uses
  ``blocks[-1].norm1``, the same layer).  Divided by its peak like ``gradcam``.

Raw attention and attention rollout do not depend on the target class (nor on anything above
the last attention, e.g. the classification head): they ignore ``target``.  That is part of
what the sanity checks measure.

The three attention methods read the class token's row: they explain a classifier that reads
the class token alone (torchvision's, the original ViT's).  A model with a class token whose
head averages the tokens instead ("global pool", as in MAE or DeiT fine-tuning) is explained
through a token the head reads as one of many: nothing here detects that, so check how your
model's head pools before reading these maps (a user probe found the gradient of the logit equal
on the class token and on every patch token of such a model).  Maps of the gradient methods
(``gradient``, ``vit_gradcam``, ...) follow the head whatever it reads.

Maps are ``(N, C, H, W)`` like every other method's (the same map in every channel): the
patch-grid map ``(N, 1, h, w)`` is upsampled bilinearly (``align_corners=False``) to the input's
``(H, W)``, as GradCAM here (:func:`sanitylib.attribution.cam_to_map`) and as ViT explanations
are usually displayed; nearest-neighbour upsampling would make every patch a block of tied
values.  Attention maps keep their raw values (attention probabilities, relevances).

How the attention is read: forward pre-hooks on each ``nn.MultiheadAttention`` make it return
its per-head attention probabilities (``need_weights=True, average_attn_weights=False``; the
model calls it with ``need_weights=False``), forward hooks keep them; for the gradient methods
the attention output is recomputed as ``out_proj(A V)`` from the returned ``A``, so that ``A``
lies on the autograd path (the module returns a view of ``A`` made after its last use, which no
gradient reaches), and checked against the module's own output (within ``max(1e-4, 8 eps)`` of
its scale, ``eps`` the rounding unit of its dtype: bfloat16 and float16 models round more).
The attention is read only where the model calls each block's ``self_attention`` as a module
(``self.self_attention(q, k, v)``, as torchvision's ``EncoderBlock``): a block that computes
its attention otherwise (``F.scaled_dot_product_attention`` on the module's weights,
``self_attention.forward(...)``), and an ``nn.MultiheadAttention`` that runs but is no block's
``self_attention`` (stored under another name), are refused after the forward pass with a
``ValueError`` naming them, never read around.  The hooks are removed
afterwards, also on error.  :func:`attention_weights`, :func:`sanitylib.explain` and the runners
run the model in eval mode and restore its training flags and buffers
(:func:`sanitylib.randomize.evaluating`).

This module imports sanitylib's core only; it is imported by the package so that its methods
are registered.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attribution import Context, cam_to_map, check_input, check_model
from .randomize import evaluating
from .registry import MethodSpec, _register_builtin

__all__ = ["TRANSFORMER_METHODS", "encoder_blocks", "attention_weights", "rollout",
           "grad_rollout", "check_transformer", "patch_grid", "tokens_to_map"]  # fmt: skip

#: The built-in transformer methods (registered below).
TRANSFORMER_METHODS = ("raw_attention", "attention_rollout", "grad_attention_rollout", "vit_gradcam")

_TOLERANCE = 1e-4  # recomputed attention output vs the module's own, relative to its scale


def _tolerance(dtype: torch.dtype) -> float:
    """How far the recomputed attention output may be from the module's own, relative to its
    scale: :data:`_TOLERANCE`, or 8 units of rounding of ``dtype`` where that is coarser
    (bfloat16: 0.0625, float16: 0.0078; float32 and float64 keep 1e-4)."""
    return max(_TOLERANCE, 8 * torch.finfo(dtype).eps)
_MHA_PARAMS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


# ----------------------------------------------------------------------------- the model


def encoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder blocks of a vision transformer, in registration (execution) order: every
    submodule with a ``self_attention`` attribute that is an ``nn.MultiheadAttention``
    (torchvision's ``EncoderBlock``), as ``(dotted path, block)``; ``[]`` for other models."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "self_attention", None), nn.MultiheadAttention)]  # fmt: skip


def check_transformer(model: nn.Module, method: str = "attention_weights") -> list[nn.Module]:
    """The model's encoder blocks (:func:`encoder_blocks`); ``ValueError`` naming ``method``
    unless ``model`` is a vision transformer whose blocks' attention sanitylib can read
    (``batch_first=True`` as torchvision's, no ``bias_k``/``bias_v``, no ``add_zero_attn``).
    Whether every block's attention is called as a module is only known from a forward pass:
    the methods check it there (see the module docstring)."""
    return [b for _, b in _named_blocks(model, method)]


def _named_blocks(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """:func:`check_transformer`'s blocks with their paths."""
    check_model(model)
    blocks = encoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"method {method!r} explains vision transformers: it needs a model with encoder blocks "
            "whose `self_attention` is an nn.MultiheadAttention (e.g. torchvision.models."
            f"VisionTransformer), and {type(model).__name__} has none; use a gradient method "
            "(e.g. 'gradient', 'integrated_gradients') for other models")  # fmt: skip
    for name, b in blocks:
        mha = b.self_attention
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"method {method!r}: the attention of block {name!r} has bias_k/bias_v "
                             "or add_zero_attn (an extra key), which sanitylib does not support")  # fmt: skip
        if not mha.batch_first:
            raise ValueError(f"method {method!r}: the attention of block {name!r} is not batch_first "
                             "(tokens (B, T, D), as torchvision's EncoderBlock), which sanitylib "
                             "does not support")  # fmt: skip
    return blocks


def patch_grid(model: nn.Module, x: Tensor, n_patches: int) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of ``n_patches`` patch tokens (the tokens after the class
    token) for images ``x`` ``(N, C, H, W)``: from the model's ``patch_size`` where it has one
    (torchvision), else a square grid of square images.  Anything else is refused: a model
    without a class token (its first patch would be taken for one) and a grid that cannot be
    told (non-square images without ``patch_size``: a square grid would put the patches in the
    wrong places, silently)."""
    H, W = x.shape[-2:]
    p = getattr(model, "patch_size", None)
    if isinstance(p, int) and p > 0:
        h, w = H // p, W // p
        fits = H % p == 0 and W % p == 0
        if fits and h * w == n_patches:
            return h, w
        if fits and h * w == n_patches + 1:
            raise ValueError(f"the model's {n_patches + 1} tokens are the {h}x{w} patches of "
                             f"{H}x{W} images ({p}-pixel patches) with no class token; the "
                             "attention methods need a class token first, then the patches")  # fmt: skip
        raise ValueError(f"cannot place {n_patches} patch tokens on the grid of {p}-pixel patches "
                         f"of {H}x{W} images (expected one class token followed by the "
                         f"{h}x{w} patches, row by row)")  # fmt: skip
    side = math.isqrt(n_patches)
    if H == W and side * side == n_patches:
        return side, side
    raise ValueError(f"cannot tell the patch grid of {n_patches} patch tokens for {H}x{W} images: "
                     "the model has no `patch_size` (an int, as torchvision's VisionTransformer) "
                     "and the images are not square with a square grid; set model.patch_size")  # fmt: skip


def tokens_to_map(values: Tensor, model: nn.Module, x: Tensor) -> Tensor:
    """Per-patch values ``(N, n_patches)`` (row-major over the patch grid) as maps
    ``(N, C, H, W)`` of ``x``: reshaped to the grid, upsampled bilinearly
    (``align_corners=False``) to ``(H, W)``, the same in every channel."""
    h, w = patch_grid(model, x, values.shape[1])
    grid = values.reshape(len(values), 1, h, w).to(x.dtype)
    up = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return up.expand(-1, x.shape[1], -1, -1)


# ----------------------------------------------------------------------------- capture


class _Capture:
    """Hooks on the blocks' attention: ``attn[i]`` the last forward pass's attention
    probabilities ``(B, heads, T, T)`` of the ``i``-th captured block, ``tokens[i]`` its query
    input ``(B, T, D)``; every block is captured, or with ``last=True`` the last one only.
    With ``grad=True`` the attention output is recomputed from ``attn[i]`` so that gradients
    reach it.  Every ``nn.MultiheadAttention`` of the model is also watched, so that
    :meth:`run` can refuse a forward pass that did not call each block's ``self_attention``
    as a module, or that ran an attention which is no block's (see :meth:`check`)."""

    def __init__(self, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], method: str,
                 grad: bool, last: bool = False) -> None:  # fmt: skip
        self.model, self.method, self.grad = model, method, grad
        self.names = [n for n, _ in blocks]
        self.block_mhas = [b.self_attention for _, b in blocks]
        self.mhas = self.block_mhas[-1:] if last else self.block_mhas
        self.attn: list[Tensor | None] = [None] * len(self.mhas)
        self.tokens: list[Tensor | None] = [None] * len(self.mhas)
        self.ran: set[int] = set()  # id() of every MultiheadAttention that ran as a module
        self.handles: list = []

    def __enter__(self) -> "_Capture":
        try:
            for mha in {id(m): m for m in self.model.modules() if isinstance(m, nn.MultiheadAttention)}.values():
                self.handles.append(mha.register_forward_hook(
                    lambda module, args, output: self.ran.add(id(module))))  # fmt: skip
            for i, mha in enumerate(self.mhas):
                self.handles.append(mha.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self.handles.append(mha.register_forward_hook(self._post(i), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def run(self, x: Tensor) -> Tensor:
        """``model(x)``, then :meth:`check`."""
        self.ran.clear()
        out = self.model(x)
        self.check()
        return out

    def check(self) -> None:
        """``ValueError`` naming every block whose ``self_attention`` did not run as a module in
        the forward pass (its hooks never fired: the block computes its attention some other
        way), and every ``nn.MultiheadAttention`` that ran but is no block's ``self_attention``
        (with its block: the attention methods would read around it, e.g. take an earlier
        block's attention for the last one's)."""
        missing = [n for n, m in zip(self.names, self.block_mhas) if id(m) not in self.ran]
        own = {id(m) for m in self.block_mhas}
        stray = [n for n, m in self.model.named_modules()
                 if isinstance(m, nn.MultiheadAttention) and id(m) in self.ran and id(m) not in own]  # fmt: skip
        if not missing and not stray:
            return
        parts = []
        if missing:
            parts.append(f"the attention of block(s) {', '.join(map(repr, missing))} was not captured: "
                         "their `self_attention` never ran as a module in the forward pass (the block "
                         "computes its attention otherwise, e.g. with F.scaled_dot_product_attention "
                         "or by calling self_attention.forward(...))")  # fmt: skip
        if stray:
            blocks = [n.rpartition(".")[0] or "(the model)" for n in stray]
            parts.append(f"the nn.MultiheadAttention {', '.join(map(repr, stray))} ran but is not the "
                         f"`self_attention` of its block ({', '.join(map(repr, blocks))}), so its "
                         "attention was not captured")  # fmt: skip
        raise ValueError(f"method {self.method!r}: {'; '.join(parts)}.  The attention methods read "
                         "every block's attention through hooks: each block needs an "
                         "nn.MultiheadAttention stored as its `self_attention` and called as a module "
                         "(`self.self_attention(q, k, v)`, as torchvision's EncoderBlock), and no "
                         "other attention may run")  # fmt: skip

    def _pre(self, i: int):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict):
            bound = dict(zip(_MHA_PARAMS, args), **kwargs)
            bound["need_weights"] = True
            bound["average_attn_weights"] = False
            self.tokens[i] = bound["query"]
            return (), bound

        return hook

    def _post(self, i: int):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output):
            out, attn = output
            if attn is None or attn.ndim != 4:
                raise RuntimeError(f"block {i}'s attention returned no per-head weights")
            self.attn[i] = attn
            if not self.grad:
                return None
            new = _attend(module, attn, kwargs["value"])
            scale = float(out.detach().abs().max())
            err = float((new.detach() - out.detach()).abs().max())
            if not err <= _tolerance(out.dtype) * max(scale, 1e-12):
                raise RuntimeError(f"block {i}: the attention output recomputed from the "
                                   f"attention weights differs from the module's by {err:.3g} "
                                   f"(scale {scale:.3g}); masks or dropout?")  # fmt: skip
            return new, attn

        return hook


def _attend(mha: nn.MultiheadAttention, attn: Tensor, value: Tensor) -> Tensor:
    """``out_proj(A V)`` ``(B, T, E)`` of ``mha`` (``batch_first``) from its attention
    probabilities ``attn`` ``(B, heads, T, S)`` and its ``value`` input ``(B, S, E)``."""
    E, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_v = mha.in_proj_weight[2 * E:]
    else:
        w_v = mha.v_proj_weight
    b_v = mha.in_proj_bias[2 * E:] if mha.in_proj_bias is not None else None
    v = F.linear(value, w_v, b_v)  # (B, S, E)
    B, S = v.shape[:2]
    v = v.reshape(B, S, h, E // h).transpose(1, 2)  # (B, h, S, d)
    out = (attn @ v).transpose(1, 2).reshape(B, attn.shape[2], E)  # (B, T, E)
    return mha.out_proj(out)


def attention_weights(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The attention probabilities of every encoder block of a vision transformer.

    Args:
        model: a vision transformer (:func:`encoder_blocks`, e.g. torchvision's
            ``VisionTransformer``); run in eval mode, its training flags and buffers restored,
            no hook left on it.
        x: ``(B, C, H, W)`` images.

    Returns:
        One ``(B, heads, T, T)`` tensor per block, first block first, with ``T = 1 + n_patches``
        (the class token first); each row sums to 1 (query token -> key tokens), detached.

    Raises:
        ValueError: ``model`` is not a vision transformer (before any work) or ``x`` does not
            fit it; after the forward pass, a block's attention was not captured (its
            ``self_attention`` not called as a module) or an attention that is no block's
            ``self_attention`` ran (see the module docstring).
    """
    blocks = _named_blocks(model, "attention_weights")
    check_input(model, x)
    with evaluating(model), torch.no_grad(), _Capture(model, blocks, "attention_weights", grad=False) as cap:
        cap.run(x)
        return [a.detach() for a in cap.attn]


def rollout(attentions: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of per-block attentions.

    Args:
        attentions: per block, first block first, ``(B, heads, T, T)`` attention probabilities.
        residual: weight of the identity (the residual connection): ``A' = (1 - residual) A +
            residual I``, rows renormalized.

    Returns:
        ``R = A'_L ... A'_1`` ``(B, T, T)``; row 0 is the class token's attention flow.
    """
    B, _, T, _ = attentions[0].shape
    eye = torch.eye(T, dtype=attentions[0].dtype, device=attentions[0].device)
    R = eye.expand(B, T, T)
    for A in attentions:
        a = (1 - residual) * A.mean(1) + residual * eye
        a = a / a.sum(-1, keepdim=True)
        R = a @ R
    return R


def grad_rollout(attentions: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """Chefer, Gur & Wolf's (ICCV 2021) relevance of self-attention layers.

    Args:
        attentions: per block, first block first, ``(B, heads, T, T)`` attention probabilities.
        grads: the gradients of the target logit with respect to them, same shapes.

    Returns:
        ``R`` ``(B, T, T)`` after ``R ← R + Ā R`` over the blocks from ``R = I``, with ``Ā`` the
        head mean of ``(∇A ⊙ A)⁺``; row 0 is the class token's relevance.
    """
    B, _, T, _ = attentions[0].shape
    R = torch.eye(T, dtype=attentions[0].dtype, device=attentions[0].device).expand(B, T, T)
    for A, G in zip(attentions, grads):
        a = (G * A).clamp(min=0).mean(1)
        R = R + a @ R
    return R


# ----------------------------------------------------------------------------- the methods


@contextlib.contextmanager
def _graph(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], method: str, x: Tensor,
           target: Tensor, last: bool = False) -> Iterator[tuple[_Capture, Tensor, Tensor]]:  # fmt: skip
    """One forward pass of ``x`` with the attention on the autograd path: the capture, the
    input (requiring grad) and the summed target logits."""
    with torch.enable_grad(), _Capture(model, blocks, method, grad=True, last=last) as cap:
        xg = x.detach().requires_grad_(True)
        logits = cap.run(xg)
        yield cap, xg, logits.gather(1, target.to(logits.device)[:, None]).sum()


def _chunks(x: Tensor, target: Tensor, ctx: Context) -> Iterator[tuple[Tensor, Tensor]]:
    return zip(x.split(ctx.batch_size), target.split(ctx.batch_size))


def _attentions(model, x, target, ctx: Context, method: str, last: bool, reduce) -> Tensor:
    """The maps ``tokens_to_map(reduce(attentions))`` of every chunk, the attention of every
    block (``last=False``) or of the last one, without gradients."""
    blocks = _named_blocks(model, method)
    out = []
    with torch.no_grad():
        for xc, _ in _chunks(x, target, ctx):
            with _Capture(model, blocks, method, grad=False, last=last) as cap:
                cap.run(xc)
            out.append(tokens_to_map(reduce(cap.attn), model, xc))
    return torch.cat(out)


def _raw_attention(model, x, target, ctx: Context) -> Tensor:
    return _attentions(model, x, target, ctx, "raw_attention", True, lambda a: a[0].mean(1)[:, 0, 1:])


def _attention_rollout(model, x, target, ctx: Context) -> Tensor:
    return _attentions(model, x, target, ctx, "attention_rollout", False, lambda a: rollout(a)[:, 0, 1:])


def _grad_attention_rollout(model, x, target, ctx: Context) -> Tensor:
    blocks = _named_blocks(model, "grad_attention_rollout")
    out = []
    for xc, tc in _chunks(x, target, ctx):
        with _graph(model, blocks, "grad_attention_rollout", xc, tc) as (cap, _, sel):
            grads = torch.autograd.grad(sel, cap.attn)
            attn = [a.detach() for a in cap.attn]
        out.append(tokens_to_map(grad_rollout(attn, grads)[:, 0, 1:], model, xc))
    return torch.cat(out)


def _vit_gradcam(model, x, target, ctx: Context) -> Tensor:
    blocks = _named_blocks(model, "vit_gradcam")
    out = []
    for xc, tc in _chunks(x, target, ctx):
        with _graph(model, blocks, "vit_gradcam", xc, tc, last=True) as (cap, _, sel):
            tokens = cap.tokens[0]
            (grad,) = torch.autograd.grad(sel, tokens)
        feats, g = tokens.detach()[:, 1:], grad[:, 1:]  # (n, patches, D)
        weights = g.mean(1, keepdim=True)  # (n, 1, D): gradients averaged over the patches
        cam = (feats * weights).sum(-1).clamp(min=0)  # (n, patches)
        h, w = patch_grid(model, xc, cam.shape[1])
        out.append(cam_to_map(cam.reshape(len(cam), 1, h, w).to(xc.dtype), xc))
    return torch.cat(out)


def _spec(name: str, label: str, fn) -> MethodSpec:
    return _register_builtin(MethodSpec(name, fn, label, {}, None, None, False, None, None, True,
                                        None, lambda model, name=name: check_transformer(model, name)))


_spec("raw_attention", "Raw attention", _raw_attention)
_spec("attention_rollout", "Attention rollout", _attention_rollout)
_spec("grad_attention_rollout", "Grad-weighted rollout", _grad_attention_rollout)
_spec("vit_gradcam", "GradCAM (tokens)", _vit_gradcam)
