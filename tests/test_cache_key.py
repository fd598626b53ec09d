"""The runner's cache key covers every argument that changes the result.

Each case runs configuration A and then configuration B against one shared cache folder, and
B's result (table, noise floors, stored maps) must equal a fresh uncached run of B: a key that
leaves out the argument in which A and B differ would hand B the result cached for A.  Each
case also checks that A and B really give different results, so the case can fail.
"""

from __future__ import annotations

import pytest
import torch

import sanitylib as sl
from sanitylib.randomize import Perturbation
from reference import TinyCNN

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN().eval()


@pytest.fixture(scope="module")
def xt():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def run(model, x, cache, **kwargs):
    kw = dict(methods=["gradient"], metrics=["spearman"], store_maps=[0], progress=False,
              cache=cache)  # fmt: skip
    kw.update(kwargs)
    return sl.run_randomization(model, x, **kw)


def same_result(a, b) -> bool:
    """Equal tables, noise floors, stored-map images and stored maps."""
    if not a.equals(b):
        return False
    fa, fb = a.floor, b.floor
    if (fa is None) != (fb is None) or (fa is not None and not fa.equals(fb)):
        return False
    sa, sb = a.maps, b.maps
    if sa.images != sb.images or list(sa.stages) != list(sb.stages):
        return False
    return all(sa[st].keys() == sb[st].keys() and all(torch.equal(sa[st][m], sb[st][m]) for m in sa[st])
               for st in sa.stages)  # fmt: skip


GAUSS = Perturbation("gaussian", sigma=0.5)
CASES = {
    "schedule": ({}, {"schedule": "independent"}),
    "target": ({}, {"target": "original"}),
    "metrics": ({}, {"metrics": ["spearman", "ssim"]}),
    "blocks": ({}, {"blocks": ["fc", "conv1"]}),
    "store_maps": ({"store_maps": [0]}, {"store_maps": [2]}),
    "image_names": ({}, {"image_names": ["a", "b", "c"]}),
    "perturbation_kind": ({"perturbation": GAUSS},
                          {"perturbation": Perturbation("multiplicative", sigma=0.5)}),
    "sigma": ({"perturbation": GAUSS}, {"perturbation": Perturbation("gaussian", sigma=2.0)}),
    "relative": ({"perturbation": GAUSS},
                 {"perturbation": Perturbation("gaussian", sigma=0.5, relative=True)}),
    "init": ({}, {"perturbation": Perturbation(init="pytorch")}),
    "methods": ({}, {"methods": ["input_x_gradient"]}),
    "method_options": ({"methods": ["smoothgrad"], "method_options": {"smoothgrad": {"n_samples": 2}}},
                       {"methods": ["smoothgrad"], "method_options": {"smoothgrad": {"n_samples": 3}}}),
    "seed": ({}, {"seed": 1}),
    "label": ({}, {"label": "renamed"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_cache_key_covers_the_argument(tiny, xt, tmp_path, name):
    kw_a, kw_b = CASES[name]
    a = run(tiny, xt, tmp_path, **kw_a)
    b = run(tiny, xt, tmp_path, **kw_b)
    fresh = run(tiny, xt, False, **kw_b)
    assert not same_result(fresh, a), f"{name}: A and B give the same result, the case cannot fail"
    assert same_result(b, fresh), f"{name}: B was served A's cached result"
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_cache_key_covers_the_images(tiny, xt, tmp_path):
    a = run(tiny, xt, tmp_path)
    other = xt.flip(-1)
    b = run(tiny, other, tmp_path)
    fresh = run(tiny, other, False)
    assert not same_result(fresh, a)
    assert same_result(b, fresh)


def test_cache_key_is_stable_and_the_cached_result_is_served(tiny, xt, tmp_path):
    """The counterpart of the cases above: the same configuration (given as new, equal
    objects) finds its cached result and writes nothing (a key that changed from run to run,
    e.g. by hashing an object's id, would pass the cases above)."""
    def kw():
        return dict(schedule="independent", target="original", metrics=["spearman", "ssim"],
                    perturbation=Perturbation("gaussian", sigma=0.5), image_names=["a", "b", "c"],
                    store_maps=[2])  # fmt: skip

    first = run(tiny, xt, tmp_path, **kw())
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")}
    assert len(files) == 1  # one group of images (the noise floors are recomputed, not stored)
    again = run(tiny, xt.clone(), tmp_path, **kw())
    assert same_result(again, first)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")} == files  # nothing rewritten
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
