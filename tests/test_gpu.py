"""GPU checks: collected only when CUDA is available (see conftest.py); CI has no GPU."""
import numpy as np
import torch

import sanitylib as sl


def _maps(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64).round(decimals=1)


def test_metrics_on_cuda_match_cpu():
    a, b = _maps(0), _maps(1)
    for m in sl.METRICS:
        torch.testing.assert_close(sl.similarity(a.cuda(), b.cuda(), m).cpu(),
                                   sl.similarity(a, b, m), rtol=0, atol=1e-6)


def test_normalizations_on_cuda_match_cpu():
    x = _maps(2)
    for fn in (sl.abs_normalize, sl.diverging_normalize, sl.unit_normalize):
        torch.testing.assert_close(fn(x.cuda()).cpu(), fn(x))


def test_explain_on_cuda_matches_cpu():
    model = sl.load_model("efficientnet_lite0")
    x = sl.load_photos(model, names=["chelsea"], verbose=False).x
    cpu = sl.explain(model, x, "guided_backprop")
    gpu = sl.explain(model.cuda(), x.cuda(), "guided_backprop").cpu()
    assert np.corrcoef(cpu.flatten(), gpu.flatten())[0, 1] > 0.999
