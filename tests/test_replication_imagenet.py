"""Replication of the paper's cascading-randomization findings (Figs. 2 and 4) on the book's
offline ImageNet model: EfficientNet-Lite0 with its shipped weights, the four scikit-image photos
of the book profile, seeded.

The window is the one the chapter's "paper vs this book" table uses
(:func:`sanitylib.book.stage_window`): randomized down to the top quarter of the 19 blocks,
without the logits-only stage (conv_head, block15, block14, block13).  Running only the first five
stages gives exactly the full cascade's first five stages (one generator per block).

Measured on 2026-11-22 (torch 2.14 CPU, captum 0.9), seeds 0-3, means over the 4 images and the
4 stages of the window:

* Guided BackProp, Spearman (absolute): 0.976-0.986; signed: 0.995-0.997.
* Gradient, Spearman (absolute): 0.387-0.406; signed: -0.003 to 0.046 (per stage, at most
  0.168); the gradient's different-images floor (signed): 0.000 +- 0.005.

The margins below leave room for the engine's documented numerical tolerance and for other
seeds, and would still fail if Guided BackProp followed the gradient or the gradient kept its
sign pattern.
"""

from __future__ import annotations

import pytest

import sanitylib as sl
from sanitylib.book import CASCADING_CLAIMS, evaluate_claims, get_profile, stage_window

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]

PHOTOS = get_profile("book").photos


@pytest.fixture(scope="module")
def batch(effnet):
    return sl.load_photos(effnet, names=PHOTOS, verbose=False)


@pytest.fixture(scope="module", params=[0, 1], ids=lambda s: f"seed{s}")
def cascade(request, effnet, batch):
    names = [b.name for b in effnet.sanity_info.blocks]
    df = sl.cascading_randomization(effnet, batch.x, ["gradient", "guided_backprop"],
                                    blocks=names[:5], metrics=["spearman_abs", "spearman"],
                                    seed=request.param, cache=False, progress=False)  # fmt: skip
    window = stage_window(names, "top", "cascading")
    assert window == ["conv_head", "block15", "block14", "block13"]
    mean = df[df["stage"].isin(window)].groupby(["method", "metric"])["value"].mean()
    return df, mean


def test_the_book_photos_are_classified_sensibly(effnet, batch):
    pred = [effnet.sanity_info.categories[i] for i in sl.predict(effnet, batch.x).argmax(1)]
    assert pred == ["Egyptian cat", "espresso", "tripod", "moped"]


def test_guided_backprop_stays_well_above_the_gradient(cascade):
    _, mean = cascade
    gbp, grad = mean[("guided_backprop", "spearman_abs")], mean[("gradient", "spearman_abs")]
    assert gbp >= 0.90  # measured 0.976-0.986
    assert grad <= 0.55  # measured 0.387-0.406
    assert gbp - grad >= 0.45  # measured 0.57-0.60
    assert mean[("guided_backprop", "spearman")] >= 0.95  # measured 0.995-0.997


def test_gradient_signed_similarity_falls_to_the_noise_floor(cascade):
    df, mean = cascade
    floor = df.floor
    grad_floor = floor[(floor["kind"] == "different images") & (floor["method"] == "gradient")
                       & (floor["metric"] == "spearman")]["value"]  # fmt: skip
    assert len(grad_floor) == 6  # 4 images -> 6 pairs
    assert abs(grad_floor.mean()) <= 0.02  # measured 0.000
    assert abs(mean[("gradient", "spearman")] - grad_floor.mean()) <= 0.08  # measured <= 0.046
    # before randomization reaches the window (logits only) the sign pattern is still related
    logits = df[(df["stage"] == "logits") & (df["method"] == "gradient")
                & (df["metric"] == "spearman")]["value"].mean()  # fmt: skip
    assert logits > mean[("gradient", "spearman")]


def test_the_chapter_claims_hold_for_these_methods(cascade, effnet):
    df, _ = cascade
    all_stages = [b.name for b in effnet.sanity_info.blocks]  # the chapter's window
    claims = evaluate_claims(df, df.floor, CASCADING_CLAIMS[:3], stages=all_stages)
    assert list(claims["method"]) == ["guided_backprop", "gradient"]  # guided_gradcam did not run
    assert claims["holds"].all(), claims
