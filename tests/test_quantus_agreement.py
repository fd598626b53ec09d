"""sanitylib's sMPRT, eMPRT and random-logit scores against Quantus 0.6 (``make bench``).

Runs only when the ``bench`` extra is installed (``pip install -e ".[bench]"``).  The workload
is one both libraries express: a small CNN (two convolutions and a linear layer, so Quantus's
"layers" and sanitylib's blocks coincide), four seeded random 3x16x16 inputs, the plain
gradient summed over the channels (``quantus.explain(method="Gradient")``; on the sanitylib
side a user method returning the same channel sum), Spearman correlation of absolute values
(Quantus's ``abs=True`` after a positive rescaling, which Spearman ignores), and Quantus's
re-initialization (``torch.manual_seed(seed + 1); module.reset_parameters()`` per layer, passed
to sanitylib as a ``Perturbation(init=...)``).

Where Quantus 0.6 deviates from the papers, the test removes or reproduces the deviation
explicitly, so that the comparison is on the definition both share:

* ``SmoothMPRT`` draws its noise from the *unseeded* global numpy RNG, new noise for every
  model state (the original model's explanation is even recomputed with other noise, so its
  "original" score is below 1), and its last sample is noise-free.  The test replaces
  ``numpy.random.randn`` during the call by a seeded stream that repeats for every smoothing
  call (common random numbers, as sanitylib's :func:`sanitylib.followup.smoothed_method`) and
  gives sanitylib the same unit noise with a last sample of zeros.
* ``SmoothMPRT`` ignores a custom ``explain_func`` (it always calls ``quantus.explain`` with
  ``explain_func_kwargs``); the comparison uses ``quantus.explain``'s own Gradient.
* ``RandomLogit`` picks the off-target classes with the global ``np.random.seed(seed)``, reset
  for every batch; the test reproduces that choice and passes it to
  :func:`sanitylib.random_logit` as ``random_target``.

Measured agreement (CPU, float32 models): the largest differences are 1.4e-17 (sMPRT), 9.7e-17
(eMPRT) and 5.6e-17 (random logit), i.e. float64 rounding of the same ranks and histograms (the
maps themselves agree to 5e-10); the asserted tolerance is 1e-6, which leaves room for rank
ties that a different BLAS could break the other way.
"""
import numpy as np
import pytest
import torch
from torch import nn

quantus = pytest.importorskip("quantus", reason="Quantus is not installed: pip install -e '.[bench]'")

import sanitylib as sl  # noqa: E402
from sanitylib.metrics import spearman  # noqa: E402

SEED = 42
TOL = 1e-6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def gradient_channel_sum(model, x, target):
    """quantus.explain(method="Gradient"): the signed gradient summed over the channels."""
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad.sum(1, keepdim=True)


def spearman_of_abs(a, b):
    return spearman(a.abs().flatten(1), b.abs().flatten(1))


def quantus_init(module, gen):
    """Quantus's re-initialization: the global seed ``seed + 1`` before every layer."""
    torch.manual_seed(SEED + 1)
    module.reset_parameters()


def _setup():
    model, x = _model(), _x()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_smprt_equals_quantus_smooth_mprt(monkeypatch):
    model, x, y = _setup()
    n = 5
    unit = torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    unit[-1] = 0  # Quantus's last sample is noise-free
    calls = {"k": 0}

    def seeded_randn(*shape):
        k = calls["k"] % (n - 1)
        calls["k"] += 1
        return np.broadcast_to(unit[k].numpy(), shape).copy()

    metric = quantus.SmoothMPRT(similarity_func=quantus.similarity_func.correlation_spearman,
                                layer_order="bottom_up", seed=SEED, nr_samples=n,
                                noise_magnitude=0.1, disable_warnings=True)  # fmt: skip
    with torch.random.fork_rng():
        monkeypatch.setattr(np.random, "randn", seeded_randn)
        q = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                   explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
                   device="cpu")  # fmt: skip
        monkeypatch.undo()
        with torch.random.fork_rng():
            df = sl.smprt(model, x, [gradient_channel_sum], metrics=[spearman_of_abs],
                          n_samples=n, noise_level=0.1, noise=unit.float(),
                          perturbation=sl.Perturbation(init=quantus_init), progress=False)
    layers = [k for k in q if k != "original"]
    assert layers == ["0", "2", "6"]  # Quantus's bottom-up layers = sanitylib's bottom-up blocks
    for k, layer in enumerate(layers):
        ours = df[df.stage_index == k].sort_values("image").value.to_numpy()
        assert df[df.stage_index == k].stage.iloc[0] == layer
        np.testing.assert_allclose(ours, np.asarray(q[layer]), atol=TOL, rtol=0)


def test_emprt_equals_quantus_efficient_mprt():
    model, x, y = _setup()
    metric = quantus.EfficientMPRT(complexity_func_kwargs={"n_bins": 100}, layer_order="bottom_up",
                                   seed=SEED, disable_warnings=True)  # fmt: skip
    with torch.random.fork_rng():
        q = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                   explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
                   device="cpu")  # fmt: skip
    with torch.random.fork_rng():
        df = sl.emprt(model, x, [gradient_channel_sum], n_bins=100,
                      perturbation=sl.Perturbation(init=quantus_init))
    np.testing.assert_allclose(df.sort_values("image").value.to_numpy(), np.asarray(q), atol=TOL, rtol=0)


def test_random_logit_equals_quantus_random_logit():
    model, x, y = _setup()
    n_classes = 10
    metric = quantus.RandomLogit(similarity_func=quantus.similarity_func.correlation_spearman,
                                 num_classes=n_classes, seed=SEED, abs=True, normalise=True,
                                 disable_warnings=True)  # fmt: skip
    q = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
               explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
               device="cpu", batch_size=len(x))  # fmt: skip
    # Quantus's off-target classes (global numpy RNG, one batch), reproduced
    np.random.seed(SEED)
    idx = np.random.randint(0, n_classes - 1, len(x))
    y_np = y.numpy()
    off = np.array([[c for c in range(n_classes) if c != y_np[i]][idx[i]] for i in range(len(x))])
    df = sl.random_logit(model, x, [gradient_channel_sum], metrics=[spearman_of_abs], target=y,
                         random_target=torch.as_tensor(off))  # fmt: skip
    np.testing.assert_allclose(df.sort_values("image").value.to_numpy(), np.asarray(q), atol=TOL, rtol=0)
