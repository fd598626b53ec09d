"""Tests for the chapter layer's paper-vs-book claims (sanitylib.book.claims) and the
randomization profiles (sanitylib.book.profiles)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import sanitylib as sl
from sanitylib import book
from sanitylib.book import Claim, evaluate_claims, stage_window, window_mean

INCEPTION = ["Logits", "Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c",
             "Mixed_6b", "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b", "Conv2d_4a_3x3",
             "Conv2d_3b_1x1", "Conv2d_2b_3x3", "Conv2d_2a_3x3", "Conv2d_1a_3x3"]  # fmt: skip


def test_windows_on_the_papers_inception_blocks():
    assert stage_window(INCEPTION, "top", "cascading") == ["Mixed_7c", "Mixed_7b", "Mixed_7a",
                                                           "Mixed_6e"]  # fmt: skip
    assert stage_window(INCEPTION, "top", "independent") == INCEPTION[:5]
    assert stage_window(INCEPTION, "bottom", "cascading") == INCEPTION[-5:]
    assert stage_window(["a", "b"], "top", "cascading") == ["a"]  # never empty
    with pytest.raises(ValueError, match="window"):
        stage_window(INCEPTION, "middle", "cascading")


def table(values: dict[tuple[str, str], list[float]], schedule="cascading") -> pd.DataFrame:
    """A tidy table with 8 stages s0..s7 and two images; values[(method, metric)] per stage."""
    rows = []
    for (method, metric), per_stage in values.items():
        for k, v in enumerate(per_stage):
            for img, d in enumerate((-0.01, 0.01)):
                rows.append({"schedule": schedule, "stage_index": k, "stage": f"s{k}",
                             "method": method, "metric": metric, "image": img, "value": v + d})
    df = pd.DataFrame(rows)
    df.attrs["stages"] = [f"s{k}" for k in range(8)]
    return df


def floor_table(method, metric, values) -> pd.DataFrame:
    return pd.DataFrame({"kind": "different images", "method": method, "metric": metric,
                         "pair": range(len(values)), "value": values})  # fmt: skip


def test_window_mean_and_claims():
    df = table({("guided_backprop", "spearman_abs"): [1, .9, .8, .1, .1, .1, .1, .1],
                ("gradient", "spearman"): [.5, .05, .25, 0, 0, 0, 0, 0]})  # fmt: skip
    # 8 stages: top window = s1 (ceil(8/4) - 1 = 1 stage after the logits-only one)
    assert window_mean(df, "guided_backprop", "spearman_abs", "top") == pytest.approx(0.9)
    assert window_mean(df, "guided_backprop", "spearman_abs", "bottom") == pytest.approx(0.1)
    claims = [Claim("gbp similar", "guided_backprop", "spearman_abs", "top", ">=", 0.7),
              Claim("grad changes", "gradient", "spearman", "top", "<=", 0.1, True),
              Claim("gbp invariant everywhere", "guided_backprop", "spearman_abs", "bottom", ">=",
                    0.7),
              Claim("not run", "gradcam", "spearman_abs", "top", "<=", 0.5)]  # fmt: skip
    out = evaluate_claims(df, floor_table("gradient", "spearman", [0.0, 0.02]), claims)
    assert list(out["claim"]) == ["gbp similar", "grad changes", "gbp invariant everywhere"]
    assert list(out["holds"]) == [True, True, False]
    assert out["floor"].iloc[1] == pytest.approx(0.01) and math.isnan(out["floor"].iloc[0])
    assert out["criterion"].iloc[1] == "<= floor + 0.1"
    # floor-relative: a high floor makes the same value pass, a negative one makes it fail
    hi = evaluate_claims(df, floor_table("gradient", "spearman", [-0.2]), claims[1:2])
    assert not hi["holds"].iloc[0]
    # the full stage list moves the window
    full = evaluate_claims(df, None, claims[:1], stages=[f"s{k}" for k in range(16)])
    assert full["stages"].iloc[0] == "s1 … s3"
    assert full["this book"].iloc[0] == pytest.approx((0.9 + 0.8 + 0.1) / 3)
    with pytest.raises(ValueError, match="noise floor"):
        evaluate_claims(df, None, claims[1:2])


def test_claim_validation():
    with pytest.raises(ValueError, match="window"):
        Claim("x", "gradient", "spearman", "all", ">=", 0.5)
    with pytest.raises(ValueError, match="op"):
        Claim("x", "gradient", "spearman", "top", ">", 0.5)


def test_default_claims_use_known_methods_and_metrics():
    for c in book.CASCADING_CLAIMS + book.INDEPENDENT_CLAIMS:
        assert c.method in sl.METHODS and c.metric in sl.METRICS and c.paper


def test_randomization_profiles():
    book_ = book.get_profile("book")
    methods, options = book_.randomization
    assert "ig_smoothgrad" not in methods and len(methods) == 8
    assert book_.model == "auto" and len(book_.photos) >= 4
    assert options["integrated_gradients"] == {"n_steps": 25}
    paper_methods, paper_options = book.get_profile("paper").randomization
    assert "ig_smoothgrad" in paper_methods and paper_options == {}
    smoke = book.get_profile("smoke")
    assert smoke.options_for("smoothgrad", randomization=True) == {"n_samples": 3}
    custom = book.get_profile("smoke", randomization_options={"smoothgrad": {"n_samples": 7}})
    assert custom.options_for("smoothgrad") == {"n_samples": 3}
    assert custom.options_for("smoothgrad", randomization=True) == {"n_samples": 7}


def test_one_claim_type_for_every_table():
    noise = book.NOISE_CLAIMS
    assert [c.test for c in noise] == ["falls", "most", "least", "shape"]
    # the report's ranking claims read under its label shift ("IG" = IG-SmoothGrad, "GBP" = SmoothGrad)
    shifted = book.claims.NOISE_CLAIMS_SHIFTED
    assert [(c.method, c.test) for c in shifted] == [("ig_smoothgrad", "most"), ("smoothgrad", "least")]
    with pytest.raises(ValueError, match="needs a method"):
        Claim("x", test="most")
    with pytest.raises(ValueError, match="test"):
        Claim("x", "gradient", test="fastest")
    with pytest.raises(ValueError, match="threshold claim needs"):
        Claim("x", "gradient", "spearman", "top", ">=")
    df = table({("gradient", "spearman"): [0.5] * 8})
    with pytest.raises(ValueError, match="randomization table"):
        evaluate_claims(df, claims=noise)


def test_floor_mean_is_the_different_images_floor():
    fl = pd.concat([floor_table("gradient", "spearman", [0.0, 0.02]),
                    pd.DataFrame({"kind": "random masks", "method": "random masks",
                                  "metric": "spearman", "pair": [0], "value": [0.5]})])  # fmt: skip
    assert sl.metrics.floor_mean(fl, "gradient", "spearman") == pytest.approx(0.01)
    assert sl.metrics.floor_mean(fl, "random masks", "spearman", kind="random masks") == 0.5
    assert math.isnan(sl.metrics.floor_mean(fl, "gradient", "ssim"))
    assert math.isnan(sl.metrics.floor_mean(None, "gradient", "spearman"))
    with pytest.raises(ValueError, match="kind"):
        sl.metrics.floor_mean(fl, "gradient", "spearman", kind="pairs")


def test_every_paper_number_names_its_source_and_meets_its_own_criterion():
    """Each claim's paper numbers name where they come from; a replication criterion must hold
    for the paper's own numbers (the GradCAM claim's old criterion, <= 0.5, failed the paper's
    0.60-0.85)."""
    for c in book.CASCADING_CLAIMS + book.INDEPENDENT_CLAIMS:
        assert c.source and ("paper" in c.source or "notebook" in c.source), c.text
        if c.paper_value is None:
            continue
        limit = c.threshold  # floor-relative claims: the paper's floor is about 0
        assert (c.paper_value >= limit) if c.op == ">=" else (c.paper_value <= limit), c.text
    assert sum(c.paper_value is not None for c in book.CASCADING_CLAIMS) == len(book.CASCADING_CLAIMS)


def test_paper_vs_book_tables_name_the_source_of_the_papers_numbers():
    rows = [{"model": "mnist_cnn", "method": "gradient", "metric": m, "image": i, "value": 0.1 * i,
             "stage": "fc1", "stage_index": 0, "schedule": "cascading"}
            for m in ("spearman_abs", "spearman") for i in range(3)]  # fmt: skip
    df = pd.DataFrame(rows)
    data = book.paper_vs_book_data(df)
    assert data["paper's source"].iloc[0] == book.claims.SRC_DATA_RANDOMIZATION
    assert "Fig. 6" in data["paper's source"].iloc[0]
    df.attrs["stages"] = ["fc1"]
    cascade = book.paper_vs_book_cascade(df, "mnist_cnn")
    assert "cnn_mnist_cascading_randomization" in cascade[("paper's source", "")].iloc[0]
    claims = evaluate_claims(table({("gradcam", "spearman_abs"): [0.2] * 8}))
    assert "inceptionv3_cascading_randomization" in claims["paper's source"].iloc[0]


def test_words_from_numbers():
    assert book.relation(0.3, 0.0, 0.1) == "above" and book.relation(-0.3, 0.0, 0.1) == "below"
    assert book.relation(0.05, 0.0, 0.1) == "at" and book.relation(0.1, 0.0, 0.1) == "at"
    assert book.floor_relation(0.90, 0.88) == "at" and book.floor_relation(0.2, 0.69) == "below"
    assert book.sign_relation(-0.26) == "anti-correlated"
    assert book.sign_relation(0.31) == "positively correlated" and book.sign_relation(0.05) == "unrelated"
    # the test's own definition: a map that changed (low similarity) passes
    assert book.randomization_verdict(0.31) == "passes" and book.randomization_verdict(0.98) == "fails"
    assert book.trend(0.04, 0.03, 0.05) == "stays about the same" and book.trend(0.1, 0.3, 0.05) == "rises"
    assert book.largest({"no_clip": 0.33, "no_skip": 0.02, "rectified_blocks": 0.05}) == "no_clip"
    assert book.correlation_strength(0.12) == "weakly" and book.correlation_strength(-0.7) == "strongly"
    with pytest.raises(ValueError, match="margin"):
        book.relation(0.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="three words"):
        book.relation(0.0, 0.0, 0.1, ("up", "down"))
    with pytest.raises(ValueError, match="finite"):
        book.randomization_verdict(float("nan"))
    with pytest.raises(ValueError, match="empty"):
        book.largest({})


def test_options_sentence_names_each_setting_and_the_papers_value():
    s = book.options_sentence({"integrated_gradients": {"n_steps": 25}, "smoothgrad": {"n_samples": 25}})
    assert s == ("Settings that differ from the paper's: Integrated Gradients 25 steps (paper: 50); "
                 "SmoothGrad 25 noise samples (paper: 50).")
    assert book.options_sentence({}) == "Every method runs with the paper's settings."
    assert "{" not in book.options_sentence(book.get_profile("book").mnist_method_options)
