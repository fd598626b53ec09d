"""Chapter 1's ReLU6 analysis (sanitylib.book.chapters) and the figure helpers of chapters 2-3
(stage selection of the map grids, independent randomization drawn as points)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sanitylib as sl  # noqa: E402
from sanitylib.book.chapters import (RELU6_VARIANTS, relu6_backward_variants,  # noqa: E402
                                     relu6_saturation)
from sanitylib.experiment import MapStore  # noqa: E402
from sanitylib.models import GuidedReLU6  # noqa: E402


@pytest.fixture(scope="module")
def chelsea(effnet):
    return sl.load_photos(effnet, names=["chelsea"], verbose=False).x


def test_relu6_variants_reproduce_guided_backprop_and_leave_the_model_alone(effnet, chelsea):
    state = {k: v.clone() for k, v in effnet.state_dict().items()}
    target = sl.predict(effnet, chelsea).argmax(1)
    maps = relu6_backward_variants(effnet, chelsea, target)
    assert list(maps) == list(RELU6_VARIANTS)
    # our backward rules: Guided BackProp is captum's exactly, "gradient" is autograd's
    torch.testing.assert_close(maps["guided_backprop"],
                               sl.explain(effnet, chelsea, "guided_backprop", target=target))
    torch.testing.assert_close(maps["gradient"], sl.explain(effnet, chelsea, "gradient",
                                                            target=target))
    # each switch changes the map (none is silently the same rule)
    for v in ("no_clip", "rectified_blocks", "no_skip"):
        assert not torch.allclose(maps[v], maps["guided_backprop"]), v
    # the plain gradient with the clip ignored is another rule than the gradient
    assert not torch.allclose(maps["gradient_no_clip"], maps["gradient"])
    # the model is untouched: weights, no hooks, no instance-level forward left behind
    assert all(torch.equal(v, effnet.state_dict()[k]) for k, v in state.items())
    assert all(not m._forward_hooks for m in effnet.modules())
    assert all("forward" not in m.__dict__ for m in effnet.modules() if isinstance(m, GuidedReLU6))
    with pytest.raises(ValueError, match="variants"):
        relu6_backward_variants(effnet, chelsea, target, variants=("no_relu",))


def test_relu6_variants_refuse_other_models(chelsea):
    cnn = sl.load_model("mnist_cnn", pretrained=False)
    with pytest.raises(ValueError, match="EfficientNet-Lite0"):
        relu6_backward_variants(cnn, torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))


def test_relu6_saturation(effnet, chelsea):
    frac, stem = relu6_saturation(effnet, chelsea)
    assert 0 < frac < 0.5
    assert stem.shape == (1, 112, 112) and 0 <= float(stem.min()) <= float(stem.max()) <= 1
    assert all(not m._forward_hooks for m in effnet.modules())
    # an input 10x larger saturates more units
    assert relu6_saturation(effnet, chelsea * 10)[0] > frac


def _store(names):
    store = MapStore([0])
    g = torch.Generator().manual_seed(0)
    for s in ["original", *names]:
        store.stages[s] = {"gradient": torch.randn(1, 3, 8, 8, generator=g)}
    return store


def test_pick_stages_spreads_evenly_and_keeps_the_ends():
    names = [f"b{i}" for i in range(19)]
    picked = sl.plots.pick_stages(_store(names), 7)
    assert len(picked) == 7 and picked[0] == "b0" and picked[-1] == "b18"
    assert picked == sorted(picked, key=names.index)
    assert sl.plots.pick_stages(names[:3], 7) == names[:3]
    with pytest.raises(ValueError, match="n must"):
        sl.plots.pick_stages(names, 0)


def test_stage_grid_shows_the_chosen_stages():
    store = _store([f"b{i}" for i in range(19)])
    pic = np.zeros((8, 8, 3), dtype=np.uint8)
    fig = sl.plots.stage_grid(store, 0, ["gradient"], picture=pic, stages=["b3", "b10"])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4 and titles[1:] == ["original", "b3", "b10"]
    plt.close(fig)
    fig = sl.plots.stage_grid(store, 0, ["gradient"])
    assert len(fig.axes) == 20
    plt.close(fig)
    with pytest.raises(ValueError, match="stages"):
        sl.plots.stage_grid(store, 0, ["gradient"], stages=["nope"])


def _table(schedule):
    rows = [{"stage": s, "stage_index": i, "method": m, "metric": "spearman", "image": k,
             "value": 0.5, "schedule": schedule}
            for i, s in enumerate(["b2", "b1", "b0"]) for m in ("gradient", "guided_backprop")
            for k in range(2)]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize("schedule,joined", [("cascading", True), ("independent", False)])
def test_independent_randomization_is_drawn_as_points(schedule, joined):
    for fig in (sl.plots.similarity_curves(_table(schedule), ["spearman"]),
                sl.plots.similarity_panels(_table(schedule), pd.DataFrame(
                    columns=["kind", "method", "metric", "pair", "value"]), ["spearman"])):
        lines = [ln for ax in fig.axes for ln in ax.lines if len(ln.get_xdata()) == 4]
        assert lines  # one per method: the trained model and three stages
        assert all((ln.get_linestyle() != "None") == joined for ln in lines)
        plt.close(fig)


def test_diverging_colormap_has_a_light_centre_and_bright_distinct_ends():
    """Signed thumbnails: white at 0, ends that are neither near black (RdBu_r's dark red and
    dark blue, relative luminance 0.03, were hard to tell apart at thumbnail size) nor alike."""
    cmap, lum = sl.plots.DIVERGING_CMAP, sl.plots._luminance
    assert lum(cmap(0.5)) > 0.95
    lo, hi = np.asarray(cmap(0.0)[:3]), np.asarray(cmap(1.0)[:3])
    assert lum(lo) > 0.08 and lum(hi) > 0.08  # not near black
    assert lo[2] - lo[0] > 0.5 and hi[0] - hi[2] > 0.5  # clearly blue, clearly red
    # luminance falls monotonically from the centre towards both ends
    side = np.linspace(0.5, 1.0, 11)
    assert all(np.diff([lum(cmap(v)) for v in side]) < 0)
    assert all(np.diff([lum(cmap(1 - v)) for v in side]) < 0)


def test_signed_figures_use_the_diverging_colormap():
    store = _store(["b1", "b0"])
    fig = sl.plots.stage_grid(store, 0, ["gradient"], visualization="diverging")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert images and all(im.get_cmap() is sl.plots.DIVERGING_CMAP for im in images)
    plt.close(fig)
    fig = sl.plots.stage_heatmap(_table("independent"), "spearman")
    assert fig.axes[0].get_images()[0].get_cmap() is sl.plots.DIVERGING_CMAP
    plt.close(fig)


def _activations(schedule="cascading", n_stages=7, blocks=("conv_stem", "block0", "logits")):
    rows = [{"schedule": schedule, "order": "top_down", "stage_index": k, "stage": f"s{k}",
             "block": b, "rms": 1.0, "trained_rms": 1.0, "ratio": 2.0 ** (k - j)}
            for k in range(n_stages) for j, b in enumerate(blocks)]  # fmt: skip
    return pd.DataFrame(rows)


def test_activation_heatmap_has_one_whole_number_tick_per_stage():
    fig = sl.plots.activation_heatmap({"top-down": _activations(), "bottom-up": _activations()})
    for ax in fig.axes[:2]:
        ticks = ax.get_xticks()
        assert list(ticks) == list(range(7))  # one per stage, no fractional positions
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in range(1, 8)]
        assert ax.get_images()[0].get_cmap() is sl.plots.DIVERGING_CMAP
    # the blocks on the shared y axis, labelled on the first panel
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["conv_stem", "block0", "logits"]
    plt.close(fig)
    fig = sl.plots.activation_heatmap({"independent": _activations("independent", 3)})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["s0", "s1", "s2"]
    plt.close(fig)
    with pytest.raises(ValueError, match="columns"):
        sl.plots.activation_heatmap({"x": pd.DataFrame({"ratio": [1.0]})})


def test_abs_vs_diverging_grid_shows_the_input_once_per_visualization():
    """The input picture stands at the top of its column, not repeated in every method's row
    (the rows below keep the method's label)."""
    import matplotlib.pyplot as plt
    import numpy as np

    class Store:  # the interface of a runner's map store: images, stages, store[stage][method]
        images, stages = [0], ["trained", "fc1"]

        def __getitem__(self, stage):
            g = torch.Generator().manual_seed(len(stage))
            return {m: torch.randn(1, 1, 12, 12, generator=g) for m in ("gradient", "guided_backprop")}

    fig = sl.plots.abs_vs_diverging_grid(Store(), 0, ["gradient", "guided_backprop"],
                                         picture=np.zeros((12, 12, 3)))
    for sub in fig.subfigs:
        first_column = sub.axes[::3]  # rows of (picture, trained, fc1)
        assert [len(ax.get_images()) for ax in first_column] == [1, 0]
        assert first_column[1].get_ylabel()  # the method's label is still there
    plt.close(fig)


def test_training_curves_mark_the_exact_training_accuracy_the_stopping_rule_used():
    """The solid line is a running mean that lags; the end-of-epoch accuracy that reached the
    target is drawn as a marker, so the figure shows what the text says was reached."""
    import matplotlib.pyplot as plt

    hist = [{"epoch": 1, "running_train_accuracy": 0.5, "test_accuracy": 0.1},
            {"epoch": 2, "running_train_accuracy": 0.93, "test_accuracy": 0.1,
             "train_accuracy": 0.97}]  # fmt: skip
    fig = sl.plots.training_curves({"CNN, random labels": hist}, target=0.95)
    ax = fig.axes[0]
    marked = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(marked) == 1 and list(marked[0].get_ydata()) == [0.97]
    assert max(float(v) for line in marked for v in line.get_ydata()) >= 0.95
    plt.close(fig)


@pytest.mark.parametrize("draw", [
    lambda df, **kw: sl.plots.similarity_curves(df, **kw),
    lambda df, **kw: sl.plots.similarity_panels(df, None, **kw),
    lambda df, metrics=None, **kw: sl.plots.stage_heatmap(df, (metrics or ["spearman"])[0], **kw),
    lambda df, metrics=None, **kw: sl.plots.similarity_bars(df, metrics=metrics or ["spearman"],
                                                            panel="schedule", **kw),
])  # fmt: skip
def test_figures_refuse_a_metric_or_method_the_table_lacks(draw):
    """A name absent from the table drew an empty panel or an all-NaN line, silently (a typo, or
    a metric the run did not compute); a string of metrics was split into its letters."""
    df = _table("cascading")
    plt.close(draw(df))  # the table's own names
    plt.close(draw(df, metrics=["spearman"], methods=["guided_backprop"]))
    with pytest.raises(ValueError, match=r"metric.*\['ssim'\] not in the table.*spearman"):
        draw(df, metrics=["ssim"])
    with pytest.raises(ValueError, match=r"methods: \['gradcam'\] not in the table"):
        draw(df, methods=["gradient", "gradcam"])
    with pytest.raises(ValueError, match="df is empty"):
        draw(df.iloc[:0])
    with pytest.raises(ValueError, match="df must be a table"):
        draw(df.drop(columns="metric"))


def test_similarity_curves_take_one_metric_name():
    fig = sl.plots.similarity_curves(_table("cascading"), "spearman")
    assert len(fig.axes) == 1  # "spearman", not eight panels for its letters
    plt.close(fig)


def test_sensitivity_curves_refuse_absent_names():
    rows = [{"stage": s, "stage_index": i, "method": m, "metric": "spearman", "image": k,
             "draw": 0, "sigma": 0.1, "value": 0.5, "relative": False, "kind": "gaussian"}
            for i, s in enumerate(["b1", "b0"]) for m in ("gradient", "smoothgrad")
            for k in range(2)]  # fmt: skip
    df = pd.DataFrame(rows)
    plt.close(sl.plots.sensitivity_curves(df, "spearman", methods=["smoothgrad"]))
    with pytest.raises(ValueError, match=r"metric: \['ssim'\] not in the table"):
        sl.plots.sensitivity_curves(df, "ssim")
    with pytest.raises(ValueError, match=r"methods: \['vargrad'\] not in the table"):
        sl.plots.sensitivity_curves(df, "spearman", methods=["gradient", "vargrad"])


def test_similarity_bars_refuse_several_runs_in_one_panel():
    both = pd.concat([_table("cascading"), _table("independent")]).assign(model="m")
    with pytest.raises(ValueError, match=r"several runs.*similarity_bars \(panel 'm'\)"):
        sl.plots.similarity_bars(both, ["spearman"])
    plt.close(sl.plots.similarity_bars(both, ["spearman"], panel="schedule"))


def test_stage_figures_refuse_a_table_of_several_runs():
    """A cascading and an independent run concatenated were drawn as one cascading curve of
    their averages."""
    both = pd.concat([_table("cascading"), _table("independent").assign(value=-0.5)])
    for draw in (lambda: sl.plots.similarity_curves(both), lambda: sl.plots.similarity_panels(both, None),
                 lambda: sl.plots.stage_heatmap(both, "spearman")):  # fmt: skip
        with pytest.raises(ValueError, match=r"several runs \(schedule: \['cascading', 'independent'\]\)"):
            draw()


def test_similarity_axes_hold_every_value():
    """The y-range was fixed ((-0.1, 1.05) for Spearman ABS and SSIM): a mean of -0.3 was drawn
    off the axes; a user's distance (0 for identical maps) was drawn from a first point at 1."""
    df = _table("cascading")
    df.loc[df["stage"] == "b0", "value"] = -0.3
    for metric in ("spearman_abs", "ssim"):
        fig = sl.plots.similarity_curves(df.assign(metric=metric))
        assert fig.axes[0].get_ylim()[0] < -0.3
        plt.close(fig)
    fig = sl.plots.similarity_bars(df.assign(metric="spearman_abs", value=-0.7), ["spearman_abs"],
                                   panel="schedule")  # fmt: skip
    assert fig.axes[0].get_ylim()[0] < -0.7
    plt.close(fig)
    fig = sl.plots.similarity_curves(df.assign(metric="my_distance", value=3.0))
    ax = fig.axes[0]
    assert ax.get_ylim()[1] > 3.0
    first = [ln.get_ydata()[0] for ln in ax.lines if len(ln.get_xdata()) == 4]
    assert first and all(np.isnan(first))  # no made-up identity value for a user's metric
    plt.close(fig)
