"""Tests for sanitylib.transformer: the attention-based methods on vision transformers.

Every method is compared with an independent computation on a tiny random torchvision
``VisionTransformer`` (8x8 one-channel images, 4x4 patches: 4 patch tokens and a class token,
2 blocks, 2 heads, width 8): the attention recomputed from the blocks' weights, rollout by
explicit matrix products, Chefer et al.'s relevance and GradCAM from a hand-written forward
pass whose attention matrices are autograd leaves of their own; the gradient methods against
captum with the paper's settings.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import sanitylib as sl
from sanitylib import transformer as TR
from sanitylib.models import Block
from reference import TinyCNN

METHODS = TR.TRANSFORMER_METHODS

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require")


# ---------------------------------------------------------------- fixtures
def tiny_vit(channels: int = 1, seed: int = 0, layers: int = 2) -> VisionTransformer:
    """A tiny random ViT; every parameter drawn from a seeded generator (torchvision zeroes
    the head, which would make every gradient zero)."""
    with torch.random.fork_rng():  # torchvision's initialization uses the global RNG
        torch.manual_seed(seed)
        m = VisionTransformer(image_size=8, patch_size=4, num_layers=layers, num_heads=2,
                              hidden_dim=8, mlp_dim=16, num_classes=5)  # fmt: skip
    m.conv_proj = nn.Conv2d(channels, 8, kernel_size=4, stride=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name:  # LayerNorms stay at weight 1, bias 0
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 0.1))
    return m.eval()


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def xv():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tv(vit, xv):
    with torch.no_grad():
        return vit(xv).argmax(1)


def rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    scale = float(b.abs().max())
    assert scale > 0
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def manual_forward(m: VisionTransformer, x: torch.Tensor) -> dict:
    """torchvision's ViT forward written out, with the attention probabilities computed as
    softmax(Q K^T / sqrt(d)) from each block's in_proj weights, and the attention matrices and
    the last block's LayerNorm'd tokens kept with their gradients."""
    n = len(x)
    h = m.conv_proj(x).reshape(n, m.hidden_dim, -1).permute(0, 2, 1)  # patches, row-major
    h = torch.cat([m.class_token.expand(n, -1, -1), h], 1) + m.encoder.pos_embedding
    attns, tokens = [], []
    for blk in m.encoder.layers:
        mha = blk.self_attention
        u = blk.ln_1(h)
        u.retain_grad()
        q, k, v = F.linear(u, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        E, H = mha.embed_dim, mha.num_heads
        d = E // H
        q, k, v = (t.reshape(n, -1, H, d).transpose(1, 2) for t in (q, k, v))  # (n, H, T, d)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        a.retain_grad()
        o = mha.out_proj((a @ v).transpose(1, 2).reshape(n, -1, E))
        h = h + o
        h = h + blk.mlp(blk.ln_2(h))
        h.retain_grad()
        attns.append(a)
        tokens.append((u, h))
    logits = m.heads(m.encoder.ln(h)[:, 0])
    return {"logits": logits, "attn": attns, "tokens": tokens}


def upsample(values: torch.Tensor, size=(8, 8)) -> torch.Tensor:
    """(n, 4) per-patch values -> (n, 1, 8, 8), bilinear."""
    return F.interpolate(values.reshape(-1, 1, 2, 2), size=size, mode="bilinear", align_corners=False)


def state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def hooks(m: nn.Module) -> list:
    return [(name, len(mod._forward_hooks), len(mod._forward_pre_hooks),
             len(getattr(mod, "_forward_hooks_with_kwargs", {})),
             len(getattr(mod, "_forward_pre_hooks_with_kwargs", {})), len(mod._backward_hooks))
            for name, mod in m.named_modules()]  # fmt: skip


# ---------------------------------------------------------------- (1) capture and rollout
def test_captured_attention_is_softmax_qk_of_the_layernormed_input(vit, xv):
    ref = manual_forward(vit, xv)
    with torch.no_grad():
        logits = vit(xv)
    rel_close(ref["logits"], logits, 1e-5)  # the written-out forward is the model's
    got = TR.attention_weights(vit, xv)
    assert len(got) == 2
    for a, r in zip(got, ref["attn"]):
        assert a.shape == (3, 2, 5, 5)
        rel_close(a, r, 1e-5)
        assert not a.requires_grad


def test_hooked_forward_equals_the_plain_forward(vit, xv):
    """The hooks switch the attention to its weights-returning path (need_weights=True): the
    logits equal those of the model's own (fast) path, with and without the gradient
    recomputation."""
    blocks = TR.encoder_blocks(vit)
    with torch.no_grad():
        plain = vit(xv)
        with TR._Capture(vit, blocks, "test", grad=False) as cap:
            hooked = cap.run(xv)
    with TR._Capture(vit, blocks, "test", grad=True) as cap:
        recomputed = cap.run(xv)
    rel_close(hooked, plain, 1e-5)
    rel_close(recomputed, plain, 1e-5)


def test_rollout_by_hand_on_two_blocks(vit, xv):
    A1, A2 = (a.double() for a in TR.attention_weights(vit, xv))
    eye = torch.eye(5, dtype=torch.float64)
    ref = []
    for i in range(len(xv)):
        P = []
        for A in (A1, A2):
            a = 0.5 * (A[i, 0] + A[i, 1]) / 2 + 0.5 * eye  # heads averaged, residual
            a = a / a.sum(1, keepdim=True)  # rows sum to 1
            P.append(a)
        R = torch.zeros(5, 5, dtype=torch.float64)  # R = A2' A1', written as sums
        for r in range(5):
            for c in range(5):
                R[r, c] = sum(P[1][r, k] * P[0][k, c] for k in range(5))
        ref.append(R[0, 1:])
    ref = torch.stack(ref)
    rel_close(TR.rollout([A1, A2])[:, 0, 1:], ref, 1e-12)
    rel_close(sl.explain(vit, xv, "attention_rollout"), upsample(ref.float()), 1e-5)
    # the class token's row of a rollout is a distribution over all tokens
    R = TR.rollout([A1, A2])
    assert torch.allclose(R.sum(-1), torch.ones(3, 5, dtype=torch.float64))


def test_raw_attention_is_the_last_blocks_class_token_row(vit, xv):
    A2 = TR.attention_weights(vit, xv)[-1]
    ref = upsample(A2.mean(1)[:, 0, 1:])
    rel_close(sl.explain(vit, xv, "raw_attention"), ref, 1e-6)


# ---------------------------------------------------------------- (2) grad-weighted rollout
def test_grad_attention_rollout_equals_chefer_from_autograd(vit, xv, tv):
    ref = manual_forward(vit, xv)
    ref["logits"].gather(1, tv[:, None]).sum().backward()
    R = torch.eye(5).expand(3, 5, 5)
    for a in ref["attn"]:
        abar = (a.grad * a).clamp(min=0).mean(1)
        R = R + abar @ R
    want = upsample(R[:, 0, 1:].detach())
    got = sl.explain(vit, xv, "grad_attention_rollout", target=tv)
    rel_close(got, want, 1e-5)
    assert float(want.std()) > 0  # not a constant map


# ---------------------------------------------------------------- (3) GradCAM on tokens
def test_vit_gradcam_equals_gradcam_on_the_last_blocks_tokens(vit, xv, tv):
    ref = manual_forward(vit, xv)
    ref["logits"].gather(1, tv[:, None]).sum().backward()
    u = ref["tokens"][-1][0]  # the last block's ln_1 output (B, T, D)
    feats, g = u.detach()[:, 1:], u.grad[:, 1:]
    cam = F.relu((feats * g.mean(1, keepdim=True)).sum(-1))  # (B, 4)
    cam = cam / cam.amax(1, keepdim=True)
    got = sl.explain(vit, xv, "vit_gradcam", target=tv)
    rel_close(got, upsample(cam), 1e-5)
    # why not the last block's output tokens: the classifier reads only the class token there
    out = ref["tokens"][-1][1]
    assert float(out.grad[:, 1:].abs().max()) == 0.0
    assert float(out.grad[:, 0].abs().max()) > 0


def test_patch_tokens_are_row_major_over_the_grid(vit):
    """Token 1 + i*w + j is patch (i, j) (torchvision's conv_proj layout), and a value on that
    token lands on that patch of the map."""
    x = torch.zeros(1, 1, 8, 8)
    base = vit._process_input(x)
    x2 = x.clone()
    x2[0, 0, 4:, 0:4] = 1.0  # patch (1, 0)
    changed = (vit._process_input(x2) - base).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False, True, False]  # patch index 2 = 1 * 2 + 0
    m = TR.tokens_to_map(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), vit, x)
    assert m.shape == (1, 1, 8, 8)
    assert m[0, 0, 4:, :4].mean() > m[0, 0, :4].mean() and m[0, 0, 4:, :4].mean() > m[0, 0, 4:, 4:].mean()


# ---------------------------------------------------------------- (4) gradient methods
def test_gradient_methods_on_a_vit_equal_captum(vit, xv, tv):
    x1, t1 = xv[:1], int(tv[0])
    rel_close(sl.explain(vit, x1, "gradient", t1), Saliency(vit).attribute(x1, target=t1, abs=False))
    rel_close(sl.explain(vit, x1, "input_x_gradient", t1), InputXGradient(vit).attribute(x1, target=t1))
    ig = IntegratedGradients(vit).attribute(x1, target=t1, baselines=0.0, n_steps=50,
                                            method="riemann_trapezoid")  # fmt: skip
    rel_close(sl.explain(vit, x1, "integrated_gradients", t1, rule="riemann_trapezoid"), ig, 1e-4)
    # the paper's rule: the plain mean of the 50 gradients on linspace(0, 1, 50), times x
    sal = Saliency(vit)
    grads = torch.stack([sal.attribute(a * x1, target=t1, abs=False)
                         for a in torch.linspace(0, 1, 50)])  # fmt: skip
    rel_close(sl.explain(vit, x1, "integrated_gradients", t1), grads.mean(0) * x1, 1e-4)
    # SmoothGrad with the paper's sigma and 50 samples, captum's noise passed to sanitylib
    stdev = float(0.15 * (x1.max() - x1.min()))
    with torch.random.fork_rng():
        torch.manual_seed(11)
        ref = NoiseTunnel(sal).attribute(x1, nt_type="smoothgrad", nt_samples=50, stdevs=stdev,
                                         target=t1, abs=False)  # fmt: skip
        torch.manual_seed(11)
        noise = torch.normal(0, torch.full((50, *x1.shape[1:]), stdev))
    rel_close(sl.explain(vit, x1, "smoothgrad", t1, noise=noise[None]), ref, 1e-4)


# ---------------------------------------------------------------- (5) shapes
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels):
    m = tiny_vit(channels, seed=2)
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    A = TR.attention_weights(m, x)
    assert [tuple(a.shape) for a in A] == [(2, 2, 5, 5)] * 2
    assert torch.allclose(torch.stack(A).sum(-1), torch.ones(2, 2, 2, 5))
    assert TR.rollout(A).shape == (2, 5, 5)
    for method in METHODS:
        out = sl.explain(m, x, method, batch_size=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        assert torch.equal(out, out[:, :1].expand_as(out))  # the same map in every channel
        assert torch.allclose(out, sl.explain(m, x, method))  # batch size does not matter


# ---------------------------------------------------------------- (6) the model comes back
def test_the_model_comes_back_exactly(xv):
    m = tiny_vit(seed=3)
    m.train()  # a user's mode, mixed
    m.encoder.layers[0].eval()
    user_hook = m.encoder.ln.register_forward_hook(lambda mod, i, o: None)
    before, modes, hk = state(m), [mm.training for mm in m.modules()], hooks(m)
    grads = [p.requires_grad for p in m.parameters()]
    x = xv.clone()
    TR.attention_weights(m, x)
    for method in METHODS:
        sl.explain(m, x, method)
    after = state(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [mm.training for mm in m.modules()] == modes
    assert hooks(m) == hk
    assert [p.requires_grad for p in m.parameters()] == grads
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(x, xv)
    # also after an error in the middle of the forward pass
    user_hook.remove()
    hk = hooks(m)

    def boom(mod, i, o):
        raise RuntimeError("simulated failure")

    failing = m.encoder.ln.register_forward_hook(boom)
    with_fail = hooks(m)
    for method in METHODS:
        with pytest.raises(RuntimeError, match="simulated failure"):
            sl.get_method(method).fn(m, x, torch.zeros(3, dtype=torch.long), sl.attribution.Context())
        assert hooks(m) == with_fail
    failing.remove()
    assert hooks(m) == hk


# ---------------------------------------------------------------- (7) class-agnostic or not
def test_rollout_is_class_agnostic_and_grad_rollout_is_not(vit, xv):
    maps = {t: {m: sl.explain(vit, xv, m, target=t) for m in METHODS} for t in (0, 1)}
    for m in ("raw_attention", "attention_rollout"):
        assert torch.equal(maps[0][m], maps[1][m])
    for m in ("grad_attention_rollout", "vit_gradcam"):
        diff = float((maps[0][m] - maps[1][m]).abs().max())
        assert diff > 0.05 * float(maps[0][m].abs().max()), (m, diff)


# ---------------------------------------------------------------- (8) head randomization
def test_raw_attention_and_rollout_ignore_the_head(vit, xv):
    before = {m: sl.explain(vit, xv, m) for m in METHODS + ("gradient",)}
    with sl.randomized(vit, [Block("heads", ("heads",))], seed=4):
        after = {m: sl.explain(vit, xv, m) for m in before}
    for m in ("raw_attention", "attention_rollout"):
        assert torch.equal(before[m], after[m])
    for m in ("grad_attention_rollout", "vit_gradcam", "gradient"):
        assert float((before[m] - after[m]).abs().max()) > 0.05 * float(before[m].abs().max()), m


# ---------------------------------------------------------------- runners and errors
def test_cascading_and_independent_randomization_on_a_vit(vit, xv, tmp_path, monkeypatch):
    blocks = ["heads", "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_0"]
    methods = list(METHODS) + ["gradient"]
    for schedule in ("cascading", "independent"):
        df = sl.run_randomization(vit, xv, methods, schedule=schedule, blocks=blocks,
                                  metrics=["spearman_abs"], progress=False, cache=tmp_path,
                                  store_maps=3, floor=False)  # fmt: skip
        assert set(df["method"]) == set(methods)
        for m in methods:  # the engine's maps are explain's
            rel_close(df.maps["original"][m], sl.explain(vit, xv, m), 1e-5)
        head = df[(df["stage"] == "heads")].set_index(["method", "image"])["value"]
        assert (head.loc["raw_attention"] == 1.0).all() and (head.loc["attention_rollout"] == 1.0).all()
        assert (head.loc["grad_attention_rollout"] < 1.0).any()
        states = []
        real = sl.experiment.iter_state_maps

        def counting(model, x, methods, st, *args, **kwargs):
            states.append(len(st))
            return real(model, x, methods, st, *args, **kwargs)

        monkeypatch.setattr(sl.experiment, "iter_state_maps", counting)
        again = sl.run_randomization(vit, xv, methods, schedule=schedule, blocks=blocks,
                                     metrics=["spearman_abs"], progress=False, cache=tmp_path,
                                     store_maps=3, floor=False)  # fmt: skip
        assert again.equals(df)
        assert states == [1]  # from the cache: only the trained maps, to validate the stored ones
        monkeypatch.undo()


def test_non_transformer_refused_by_name_before_any_work():
    cnn = TinyCNN()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    cnn.register_forward_pre_hook(lambda mod, args: calls.append(1))
    for method in METHODS:
        with pytest.raises(ValueError, match=rf"method '{method}' explains vision transformers.*TinyCNN has none"):
            sl.explain(cnn, x, method)
        with pytest.raises(ValueError, match=rf"'{method}'.*encoder blocks"):
            sl.run_randomization(cnn, x, [method, "gradient"], progress=False, cache=False)
    with pytest.raises(ValueError, match="attention_weights"):
        TR.attention_weights(cnn, x)
    assert calls == []
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        TR.attention_weights(lambda x: x, x)


def test_registered_as_builtins_with_labels():
    for m in METHODS:
        spec = sl.get_method(m)
        assert spec.builtin and spec.passes is None and not spec.guided
        assert spec.model_check is not None
        assert m in sl.method_names(builtin=True)
    assert sl.method_label("attention_rollout") == "Attention rollout"
    assert len({sl.plots._COLORS[m] for m in sl.method_names(builtin=True)}) == len(sl.method_names(builtin=True))


@pytest.mark.parametrize("attention, words", [
    (dict(add_bias_kv=True), "bias_k/bias_v"),
    (dict(add_zero_attn=True), "add_zero_attn"),
    (dict(batch_first=False), "not batch_first"),
])  # fmt: skip
def test_unsupported_attention_refused_by_name(attention, words, xv):
    m = tiny_vit(seed=1)
    m.encoder.layers[1].self_attention = nn.MultiheadAttention(8, 2, **{"batch_first": True, **attention})
    for method in METHODS:
        with pytest.raises(ValueError, match=rf"method '{method}'.*encoder_layer_1.*{words}"):
            sl.explain(m, xv, method)


def test_patch_grid():
    m = tiny_vit()
    assert TR.patch_grid(m, torch.zeros(1, 1, 8, 8), 4) == (2, 2)
    assert TR.patch_grid(nn.Identity(), torch.zeros(1, 1, 12, 12), 9) == (3, 3)  # square, no patch_size
    with pytest.raises(ValueError, match="cannot tell the patch grid of 6 patch tokens"):
        TR.patch_grid(nn.Identity(), torch.zeros(1, 1, 8, 8), 6)
    with pytest.raises(ValueError, match="cannot place 5 patch tokens"):  # patch_size disagrees
        TR.patch_grid(m, torch.zeros(1, 1, 8, 8), 5)


def test_the_chapter_model_gets_a_4x4_patch_grid():
    """The chapter's ViT (28x28 digits, 7x7 patches): 16 patch tokens and a class token; every
    method returns a digit-sized map whose 4x4 grid values sit at the patch centres."""
    m = sl.load_model("mnist_vit", pretrained=False)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    A = TR.attention_weights(m, x)
    assert len(A) == len(TR.encoder_blocks(m)) and all(a.shape[-2:] == (17, 17) for a in A)
    assert TR.patch_grid(m, x, 16) == (4, 4)
    for method in METHODS:
        assert sl.explain(m, x, method).shape == (2, 1, 28, 28)
    raw = sl.explain(m, x, "raw_attention")
    grid = A[-1].mean(1)[:, 0, 1:].reshape(2, 4, 4)
    # bilinear upsampling by 7 (align_corners=False): the patch centre (3, 3) of each 7x7 patch
    # carries the grid value exactly
    assert torch.allclose(raw[:, 0, 3::7, 3::7], grid, atol=1e-6)


class _PooledViT(nn.Module):
    """A ViT without a class token (mean-pooled tokens), with or without ``patch_size``."""

    def __init__(self, size=(16, 40), p=8, with_patch_size=True, cls_token=False):
        super().__init__()
        from torchvision.models.vision_transformer import EncoderBlock

        torch.manual_seed(0)
        self.size = size
        if with_patch_size:
            self.patch_size = p
        self.cls_token = cls_token
        n = (size[0] // p) * (size[1] // p) + int(cls_token)
        self.embed = nn.Conv2d(3, 16, p, p)
        self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n, 16) * 0.1)
        self.blocks = nn.Sequential(*[EncoderBlock(2, 16, 32, 0.0, 0.0) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        z = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls_token:
            z = torch.cat([self.cls.expand(len(z), -1, -1), z], 1)
        z = self.blocks(z + self.pos)
        return self.head(z[:, 0] if self.cls_token else z.mean(1))


@pytest.mark.parametrize("model, message", [
    # its first patch was taken for a class token and the other 9 laid on a 3x3 grid
    (_PooledViT(), "with no class token"),
    # no patch_size, 16x64 images (a 2x8 grid): the 16 patches were laid on a 4x4 grid
    (_PooledViT(size=(16, 64), with_patch_size=False, cls_token=True), "cannot tell the patch grid"),
])  # fmt: skip
def test_attention_maps_refuse_a_patch_grid_they_cannot_tell(model, message):
    x = torch.rand(2, 3, *model.size, generator=torch.Generator().manual_seed(1))
    for method in ("raw_attention", "attention_rollout"):
        with pytest.raises(ValueError, match=message):
            sl.explain(model.eval(), x, method)


def test_attention_maps_of_a_square_grid_without_patch_size():
    """Square images and a square grid: the grid is told without ``patch_size``."""
    model = _PooledViT(size=(32, 32), with_patch_size=False, cls_token=True).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert sl.explain(model, x, "attention_rollout").shape == x.shape


def test_a_wrongly_sized_image_on_a_torchvision_vit_is_named():
    """torchvision checks the image size with torch._assert: the AssertionError escaped
    explain and the runners instead of the ValueError naming x."""
    m = tiny_vit()
    size = m.image_size
    x = torch.rand(2, 1, size, size + 8, generator=torch.Generator().manual_seed(0))
    for call in (lambda: sl.explain(m, x, "gradient"), lambda: TR.attention_weights(m, x)):
        with pytest.raises(ValueError, match=r"x of shape .* does not fit the model"):
            call()


# ---------------------------------------------------------------- (10) attention that the hooks miss
class _FusedBlock(nn.Module):
    """An EncoderBlock that computes its attention with F.scaled_dot_product_attention on its
    ``self_attention``'s weights (the module is never called: its hooks never fire)."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.self_attention, self.ln_2, self.mlp = blk.ln_1, blk.self_attention, blk.ln_2, blk.mlp

    def forward(self, h):
        mha, u = self.self_attention, self.ln_1(h)
        n, T, E = u.shape
        q, k, v = (t.reshape(n, T, mha.num_heads, -1).transpose(1, 2)
                   for t in F.linear(u, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))  # fmt: skip
        h = h + mha.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, T, E))
        return h + self.mlp(self.ln_2(h))


class _DirectForwardBlock(_FusedBlock):
    """Calls ``self_attention.forward(...)`` itself (no hooks run)."""

    def forward(self, h):
        u = self.ln_1(h)
        h = h + self.self_attention.forward(u, u, u, need_weights=False)[0]
        return h + self.mlp(self.ln_2(h))


class _OtherNameBlock(_FusedBlock):
    """Its attention, called as a module, stored as ``attn`` (not ``self_attention``): not an
    encoder block, so the last block found is an earlier one."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__(blk)
        self.attn = self.self_attention
        del self.self_attention

    def forward(self, h):
        u = self.ln_1(h)
        h = h + self.attn(u, u, u, need_weights=False)[0]
        return h + self.mlp(self.ln_2(h))


@pytest.mark.parametrize("wrap, which, names", [
    (_FusedBlock, [1], r"'encoder\.layers\.encoder_layer_1' was not captured"),
    (_FusedBlock, [0, 1], r"'encoder\.layers\.encoder_layer_0', 'encoder\.layers\.encoder_layer_1' was not captured"),
    (_DirectForwardBlock, [0], r"'encoder\.layers\.encoder_layer_0' was not captured"),
    (_OtherNameBlock, [1], r"'encoder\.layers\.encoder_layer_1\.attn' ran but is not the `self_attention` "
                           r"of its block \('encoder\.layers\.encoder_layer_1'\)"),
])  # fmt: skip
def test_attention_the_hooks_miss_is_refused_by_block(wrap, which, names, xv):
    """A block whose attention does not run through its ``self_attention`` module
    (F.scaled_dot_product_attention, ``self_attention.forward(...)``) failed with an
    AttributeError/TypeError on None, or (the first block, for raw attention and GradCAM)
    silently gave a map; a last block whose attention is stored under another name made raw
    attention read the block before it, silently.  Each is a ValueError naming the blocks now,
    after the forward pass, with the hooks removed."""
    m = tiny_vit(seed=2, layers=2)
    for i in which:
        m.encoder.layers[i] = wrap(m.encoder.layers[i])
    hk = hooks(m)
    calls = {method: (lambda method=method: sl.explain(m, xv, method)) for method in METHODS}
    calls["attention_weights"] = lambda: TR.attention_weights(m, xv)
    for method, call in calls.items():
        with pytest.raises(ValueError, match=rf"method '{method}': .*{names}.*called as a module"):
            call()
        assert hooks(m) == hk


# ---------------------------------------------------------------- (11) low-precision models
def test_gradient_methods_on_a_bfloat16_vit():
    """The recomputed attention output was checked against the module's within 1e-4 of its scale
    in every dtype: a bfloat16 ViT failed with "masks or dropout?" from ordinary rounding.  The
    tolerance is 8 rounding units of the dtype where that is coarser (float32 keeps 1e-4); the
    bfloat16 maps are those of the float32 model up to bfloat16 rounding."""
    assert TR._tolerance(torch.float32) == TR._tolerance(torch.float64) == 1e-4
    assert TR._tolerance(torch.bfloat16) == 8 * 2**-7
    m32 = tiny_vit(seed=1, channels=1, layers=2)
    m16 = tiny_vit(seed=1, channels=1, layers=2).to(torch.bfloat16)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2])
    for method in ("grad_attention_rollout", "vit_gradcam"):
        got = sl.explain(m16, x.to(torch.bfloat16), method, target=t)
        assert got.dtype == torch.bfloat16
        rel_close(got.float(), sl.explain(m32, x, method, target=t), 0.1)
