"""The ``paper`` profile's code path, end to end, on the InceptionV3 architecture (CPU).

This is the path a Colab user takes with ``profile = "paper"``: the profile's methods (all nine,
IG-SmoothGrad included) and settings, the randomization chapters' set-up
(:func:`sanitylib.book.setup_imagenet_chapter`), the cascade with its stored maps and noise
floors (the claims table needs the windows of the full cascade; it is tested on the book's
model).  InceptionV3's
ImageNet weights need a download, so the architecture runs with random weights (offline), on 2
photos downsampled to 139 x 139 (InceptionV3 takes any size from 75 x 75; 4.6x fewer
operations), the top 2 blocks of the cascade and reduced sample/step counts; everything else is
the profile's.  The numbers are not meaningful; the test checks that the path runs and returns what
the chapters read.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import sanitylib as sl
from sanitylib import book
from sanitylib.book import chapters
from sanitylib.book.profiles import ALL_METHODS

#: Sample and step counts cut down from the paper's 50 (IG-SmoothGrad: 25 x 50) for a CPU test.
SMALL = {"integrated_gradients": {"n_steps": 2}, "smoothgrad": {"n_samples": 2},
         "vargrad": {"n_samples": 2}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 2}}  # fmt: skip


@pytest.fixture()
def paper_chapter(monkeypatch, tmp_path):
    monkeypatch.setenv("SANITYLIB_CACHE", str(tmp_path / "cache"))
    paper = book.get_profile("paper")
    # the paper profile runs the authors' settings for all nine methods
    assert paper.method_options == {} and paper.randomization[0] == ALL_METHODS
    cfg = replace(paper, photos=("chelsea", "coffee"), image_folder=None, method_options=SMALL)
    requested = []

    def random_inception(name, *args, **kwargs):  # "auto" would try to download the weights
        requested.append(name)
        return sl.load_model("inception_v3", pretrained=False)

    monkeypatch.setattr(chapters, "load_model", random_inception)
    ch = book.setup_imagenet_chapter("paper_test", cfg)
    assert requested == ["auto"]
    return ch


def test_paper_profile_runs_the_cascade_on_inception_v3(paper_chapter):
    ch = paper_chapter
    assert ch.info.name == "inception_v3" and len(ch.info.blocks) == 17
    assert ch.batch.x.shape == (2, 3, 299, 299)
    assert ch.methods == ALL_METHODS and ch.options == SMALL
    blocks = ch.info.blocks[:2]  # Logits, Mixed_7c
    # a smaller input for a CPU test; the model's declared input size follows (sanitylib checks
    # inputs against it)
    x = F.interpolate(ch.batch.x, size=(139, 139), mode="bilinear", antialias=True)
    ch.model.sanity_info = replace(ch.info, input_size=(3, 139, 139))
    state = {k: v.clone() for k, v in ch.model.state_dict().items()}
    df = sl.cascading_randomization(ch.model, x, ch.methods, blocks=blocks,
                                    seed=ch.cfg.seed, method_options=ch.options,
                                    image_names=ch.batch.names, store_maps=[0], label=ch.label)
    # the model comes back bit for bit
    assert all(torch.equal(v, ch.model.state_dict()[k]) for k, v in state.items())
    assert set(df["method"]) == set(ALL_METHODS)
    assert set(df["stage"]) >= {b.name for b in blocks}
    assert df["image"].nunique() == 2
    assert df["value"].notna().all() and df["value"].between(-1 - 1e-6, 1 + 1e-6).all()
    # randomizing the logits changes the gradient's signed map (random weights or not)
    grad = df[(df["method"] == "gradient") & (df["metric"] == "spearman")
              & (df["stage"] == blocks[-1].name)]["value"]  # fmt: skip
    assert len(grad) == 2 and grad.mean() < 0.9
    maps = df.maps
    assert maps is not None
    floor = df.floor
    assert set(floor["method"]) >= set(ALL_METHODS)
    assert floor["value"].map(math.isfinite).all()
