"""The cache never serves stale numbers and hits in every process (issue "Trust II", items 1, 2,
5 and the cache's clear errors), and the run's table keeps its parts (the run specification).

Staleness is prevented by validation, not by listing state: whatever a user's method, metric or
initializer reads (a module-level dict, an attribute, a numpy array, a tensor, a helper in another
file), a change that changes the numbers is either in the key or caught before a cached group is
served.  Each case checks that the change really changes the result (so the case can fail) and
that the cached run then equals a fresh uncached run.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sanitylib as sl
import sanitylib.cache as C
import sanitylib.experiment as E
from sanitylib.result import NoRunParts, ResultTable
from reference import TinyCNN

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def seeded(cls=TinyCNN, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls().eval()


@pytest.fixture
def x16():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def run(model, x, **kw):
    args = dict(methods=["gradient"], metrics=["spearman_abs", "spearman"], progress=False, cache=False)
    args.update(kw)
    return sl.run_randomization(model, x, **args)


class StateCounter:
    """Wraps ``iter_state_maps`` as the runner calls it: the number of states per call."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.real, self.states, self.fail_at = E.iter_state_maps, [], fail_at

    def __call__(self, model, x, methods, states, **kw):
        self.states.append(len(states))
        if self.fail_at is not None and len(self.states) == self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.real(model, x, methods, states, **kw)


def same(a, b) -> bool:
    if not a.equals(b):
        return False
    if (a.floor is None) != (b.floor is None) or (a.floor is not None and not a.floor.equals(b.floor)):
        return False
    return all(torch.equal(a.maps[s][m], b.maps[s][m]) for s in a.maps.stages for m in a.maps[s])


# ---------------------------------------------------------------- 1. state outside the key
SCALE = {"value": 1.0}
ARRAY = np.ones(1)
TENSOR = torch.ones(1)


class Holder:
    factor = 1.0


HOLDER = Holder()


def by_dict(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad + SCALE["value"] * x


def by_array(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad + float(ARRAY[0]) * x


def by_tensor(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad + TENSOR * x


def by_attribute(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad + HOLDER.factor * x


def _set(kind: str, v: float) -> None:
    if kind == "dict":
        SCALE["value"] = v
    elif kind == "array":
        ARRAY[0] = v
    elif kind == "tensor":
        TENSOR[0] = v
    else:
        HOLDER.factor = v


@pytest.mark.parametrize("kind, method", [("dict", by_dict), ("array", by_array),
                                          ("tensor", by_tensor), ("attribute", by_attribute)])
def test_state_a_user_method_reads_is_never_served_stale(x16, tmp_path, kind, method):
    model = seeded()
    _set(kind, 1.0)
    try:
        first = run(model, x16, methods=[method], cache=tmp_path)
        _set(kind, -3.0)
        fresh = run(model, x16, methods=[method])
        assert not fresh.equals(first)  # the change really changes the numbers
        with pytest.warns(RuntimeWarning, match="no longer match what the run computes now"):
            second = run(model, x16, methods=[method], cache=tmp_path)
        assert same(second, fresh)
        with warnings.catch_warnings():  # the replaced files are served again, without a word
            warnings.simplefilter("error", RuntimeWarning)
            assert same(run(model, x16, methods=[method], cache=tmp_path), fresh)
    finally:
        _set(kind, 1.0)


def test_a_helper_in_another_file_that_was_edited_is_caught(x16, tmp_path, monkeypatch):
    helper = tmp_path / "user_helpers.py"
    helper.write_text("def weight():\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("user_helpers")
    ns = {"__name__": "__main__", "torch": torch, "user_helpers": mod}
    exec(textwrap.dedent("""
        def mine(model, x, target):
            x = x.clone().requires_grad_(True)
            model(x).gather(1, target[:, None]).sum().backward()
            return x.grad + user_helpers.weight() * x
    """), ns)  # noqa: S102 - a notebook cell
    model = seeded()
    first = run(model, x16, methods=[ns["mine"]], cache=tmp_path / "c")
    helper.write_text("def weight():\n    return 40.0\n")
    importlib.reload(mod)
    fresh = run(model, x16, methods=[ns["mine"]])
    assert not fresh.equals(first)
    with pytest.warns(RuntimeWarning, match="no longer match"):
        second = run(model, x16, methods=[ns["mine"]], cache=tmp_path / "c")
    assert same(second, fresh)
    sys.modules.pop("user_helpers", None)


OFFSET = {"value": 0.0}


def shifted_spearman(a, b):
    return sl.metrics.spearman(a.flatten(1), b.flatten(1)) + OFFSET["value"]


def test_state_a_user_metric_reads_is_never_served_stale(x16, tmp_path):
    model = seeded()
    try:
        first = run(model, x16, metrics=[shifted_spearman], cache=tmp_path)
        OFFSET["value"] = 0.5
        fresh = run(model, x16, metrics=[shifted_spearman])
        assert not fresh.equals(first)
        with pytest.warns(RuntimeWarning, match="metric 'shifted_spearman' gives other values"):
            second = run(model, x16, metrics=[shifted_spearman], cache=tmp_path)
        assert same(second, fresh)
    finally:
        OFFSET["value"] = 0.0


INIT_STD = {"value": 0.1}


def global_init(module, gen):
    for p in module.parameters(recurse=False):
        nn.init.normal_(p, 0.0, INIT_STD["value"], generator=gen)


def test_state_a_user_initializer_reads_changes_the_key(x16, tmp_path):
    model = seeded()
    pert = sl.Perturbation(init=global_init)
    try:
        first = run(model, x16, perturbation=pert, cache=tmp_path)
        INIT_STD["value"] = 5.0
        fresh = run(model, x16, perturbation=pert)
        assert not fresh.equals(first)
        second = run(model, x16, perturbation=pert, cache=tmp_path)
        assert same(second, fresh)
        assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # a new key
    finally:
        INIT_STD["value"] = 0.1


# ---------------------------------------------------------------- 2. the same key in every process
SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
import sanitylib as sl
from reference import TinyCNN
CALLS = [0]
def counted(model, x, target):
    CALLS[0] += 1
    if os.environ.get("FAIL_AT") and CALLS[0] >= int(os.environ["FAIL_AT"]):
        raise KeyboardInterrupt("simulated interruption")
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad
torch.manual_seed(0)
model = TinyCNN().eval()
x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
spec = sl.RunSpec.build(model, x, [counted], metrics=["spearman"])
key = sl.cache.config_key(sl.cache.run_config(spec, model, x))
try:
    df = sl.run_randomization(model, x, [counted], metrics=["spearman"], progress=False,
                              cache={cache!r})
    df.to_csv({out!r}, index=False, float_format="%.17g")
    done = True
except KeyboardInterrupt:
    done = False
print(json.dumps({{"key": key, "calls": CALLS[0], "done": done}}))
"""


def _in_process(tmp_path, hash_seed: int, fail_at: int | None = None) -> dict:
    script = tmp_path / "run.py"
    out = tmp_path / f"table{hash_seed}.csv"
    script.write_text(SCRIPT.format(tests=str(TESTS), cache=str(tmp_path / "cache"), out=str(out)))
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    env.pop("FAIL_AT", None)
    if fail_at is not None:
        env["FAIL_AT"] = str(fail_at)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["table"] = pd.read_csv(out) if info["done"] else None
    return info


def test_the_key_is_the_same_in_every_process_and_a_new_process_hits(tmp_path):
    """A conv model (``Conv2d.__init__`` holds a frozenset of padding modes, whose order follows
    the hash seed): the same key under two hash seeds, and a second process computes only the
    trained model's maps (the validation) instead of all four states."""
    a = _in_process(tmp_path, 1)
    b = _in_process(tmp_path, 2)
    assert a["key"] == b["key"]
    assert a["calls"] == 4 and b["calls"] == 1  # trained + 3 stages; then the validation only
    pd.testing.assert_frame_equal(a["table"], b["table"])
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_an_interrupted_run_resumes_in_a_new_process(tmp_path):
    """TinyCNN: 3 stages in 3 slices (the method is called once per model state); the first
    process stops in slice 1 (the method's third call), the second process validates slice 0
    (1 call) and computes slices 1 and 2 (2 calls)."""
    first = _in_process(tmp_path, 3, fail_at=3)
    assert not first["done"]
    second = _in_process(tmp_path, 4)
    assert second["done"] and second["calls"] == 3
    (tmp_path / "fresh").mkdir()
    fresh = _in_process(tmp_path / "fresh", 5)
    pd.testing.assert_frame_equal(second["table"], fresh["table"])


def test_stable_repr_of_code_constants():
    assert C._stable_repr(frozenset({"zeros", "reflect", "circular"})) == \
        "frozenset({'circular', 'reflect', 'zeros'})"
    assert C._stable_repr((1, frozenset({"b", "a"}))) == "(1, frozenset({'a', 'b'}),)"


# ---------------------------------------------------------------- the key sees the buffers
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def test_the_key_covers_buffers(x16):
    model = seeded(BNNet)
    spec = sl.RunSpec.build(model, x16, ["gradient"], metrics=["spearman"])
    before = C.config_key(C.run_config(spec, model, x16))
    with torch.no_grad():
        model.bn.running_mean += 0.5  # only the BatchNorm statistics change
    after = C.config_key(C.run_config(spec, model, x16))
    assert before != after


# ---------------------------------------------------------------- resume with a middle slice lost
class DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 32),
                                     nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32),
                                     nn.Linear(32, 6)])  # fmt: skip
        self.act = nn.ReLU()

    def forward(self, x):
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        return self.layers[-1](h)


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_resume_when_a_middle_slice_is_missing_or_damaged(tmp_path, monkeypatch, damage):
    model = seeded(DeepMLP)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    blocks = [f"layers.{i}" for i in range(6, -1, -1)]  # 7 stages -> slices [2, 2, 2, 1]
    kw = dict(methods=["gradient"], blocks=blocks)
    monkeypatch.setattr(E, "iter_state_maps", StateCounter(fail_at=4))
    with pytest.raises(RuntimeError, match="simulated"):
        run(model, x, cache=tmp_path, **kw)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    parts = sorted(p.name for p in folder.glob("*.part*.pt"))
    assert parts == [f"images_0000_0002.part0{j}.pt" for j in range(3)]
    middle = folder / "images_0000_0002.part01.pt"
    if damage == "missing":
        middle.unlink()
    else:
        middle.write_bytes(middle.read_bytes()[:100])
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the damaged file is reported
        resumed = run(model, x, cache=tmp_path, **kw)
    # validation of slice 0, then the lost slice 1 (2 stages) and the unfinished slice 3
    assert counter.states == [1, 2, 1]
    monkeypatch.undo()
    assert same(resumed, run(model, x, **kw))


# ---------------------------------------------------------------- maps keep small values
def tiny_values(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad * 1e-8 / x.grad.abs().amax().clamp_min(1e-30) + 1e-9 * x


def test_kept_maps_keep_values_of_1e_8(x16):
    model = seeded()
    df = run(model, x16, methods=[tiny_values], store_maps=3)
    direct = sl.explain(model, x16, tiny_values)
    kept = df.maps["original"]["tiny_values"]
    assert kept.dtype == torch.float32
    assert kept.abs().max() > 0 and kept.abs().max() < 1e-7
    assert torch.allclose(kept, direct, rtol=1e-4, atol=0)  # float16 would flush these to 0


# ---------------------------------------------------------------- clear errors, read-only, damage
def test_numpy_seed_is_normalized(x16):
    model = seeded()
    a = run(model, x16, seed=np.int64(3))
    b = run(model, x16, seed=3)
    assert a.equals(b)
    assert a.spec.seed == 3 and type(a.spec.seed) is int


def test_read_only_cache_serves_what_is_there_and_computes_the_rest(x16, tmp_path, monkeypatch):
    model = seeded()
    first = run(model, x16, cache=tmp_path, group_size=1)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (folder / "images_0002_0002.pt").unlink()  # one group is not there

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(C, "atomic_save", refuse)
    monkeypatch.setattr(C, "atomic_write", refuse)
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    with pytest.warns(RuntimeWarning, match="cannot be written") as record:
        second = run(model, x16, cache=tmp_path, group_size=1)
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1  # one warning
    assert counter.states == [1, 1, 2, 1, 1]  # two groups validated, the missing one computed
    assert same(second, first)
    assert not (folder / "images_0002_0002.pt").exists()  # nothing written


def test_a_cache_file_with_wrong_contents_is_recomputed_and_replaced(x16, tmp_path):
    model = seeded()
    first = run(model, x16, cache=tmp_path)
    target = next(tmp_path.rglob("images_0000_0002.pt"))
    d = torch.load(target, weights_only=True)
    for r in d["rows"]:
        r.pop("value")  # loadable, but rows without a key
    torch.save(d, target)
    with pytest.warns(RuntimeWarning, match="missing or unexpected columns"):
        again = run(model, x16, cache=tmp_path)
    assert same(again, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # replaced: no warning the next time
        assert same(run(model, x16, cache=tmp_path), first)


# ---------------------------------------------------------------- the run specification
def test_spec_describes_the_run_and_its_key_is_pinned(x16):
    """The fields of ``RunSpec.describe`` (the command line's config.json and the core of the
    cache key) are pinned: an accidental change of a field changes this key."""
    model = seeded()
    spec = sl.RunSpec.build(model, x16, ["gradient", "smoothgrad"], metrics=["spearman"], seed=4,
                            method_options={"smoothgrad": {"n_samples": 3}}, store_maps=[1],
                            image_names=["a", "b", "c"])  # fmt: skip
    d = spec.describe()
    assert d["blocks"] == [["fc", ["fc"]], ["conv2", ["conv2"]], ["conv1", ["conv1"]]]
    assert d["method_options"] == {"smoothgrad": {"n_samples": 3}}
    assert C.config_key(d) == "46df89e76c9e1157be862028"


def test_options_for_registered_methods_outside_the_run_are_dropped(x16):
    model = seeded()
    spec = sl.RunSpec.build(model, x16, ["gradient"], metrics=["spearman"],
                            method_options={"smoothgrad": {"n_samples": 3}})
    assert spec.options() == {}


def test_result_table_keeps_its_parts_through_filtering_and_joining(x16):
    model = seeded()
    df = run(model, x16, methods=["gradient", "input_x_gradient"], store_maps=1)
    assert isinstance(df, ResultTable) and isinstance(df, pd.DataFrame)
    for piece in (df[df["method"] == "gradient"], df.query("value > -2"), df.head(3),
                  df.sort_values("value"), df.reset_index(drop=True), df.copy(),
                  pd.concat([df[df["method"] == "gradient"], df[df["method"] != "gradient"]]),
                  df.merge(pd.DataFrame({"method": ["gradient"], "label": ["G"]}), on="method")):
        assert piece.maps is df.maps and piece.floor is df.floor and piece.stages == df.stages
    other = run(model, x16, methods=["gradient"], seed=1)
    both = pd.concat([df, other])  # two runs: no single set of maps
    assert len(both) == len(df) + len(other)
    with pytest.raises(NoRunParts, match="combines several runs"):
        both.maps
    assert df.spec.seed == 0 and other.spec.seed == 1



def test_result_table_pickles_with_its_parts(x16, tmp_path):
    """``df.to_pickle`` and multiprocessing failed: the run specification held the built-ins'
    lambdas and read-only mappings."""
    model = seeded()
    df = run(model, x16, methods=["gradient", "smoothgrad", "gradcam"], store_maps=1,
             metrics=["spearman", "ssim"],
             method_options={"smoothgrad": {"n_samples": 3}, "gradcam": {"layer": "conv2"}})
    df.to_pickle(tmp_path / "t.pkl")
    back = pd.read_pickle(tmp_path / "t.pkl")
    assert isinstance(back, ResultTable) and back.equals(df)
    assert back.spec.describe() == df.spec.describe()
    assert back.spec.methods[0] is sl.get_method("gradient")  # the registered built-in
    assert dict(back.spec.method_options["smoothgrad"]) == {"n_samples": 3}
    with pytest.raises(TypeError):  # still read-only
        back.spec.method_options["smoothgrad"]["n_samples"] = 5
    assert back.stages == df.stages and back.floor.equals(df.floor)
    assert torch.equal(back.maps["original"]["gradient"], df.maps["original"]["gradient"])

class WithAuxHead(nn.Module):
    """An auxiliary head that runs only in training mode (as torchvision's inception_v3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.aux = nn.Linear(4 * 16 * 16, 5)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        out = self.fc(h)
        return out + self.aux(h) if self.training else out


def test_blocks_that_never_run_are_left_out_and_named_in_the_result(x16):
    model = seeded(WithAuxHead)
    with pytest.warns(UserWarning, match="aux"):
        df = run(model, x16)
    assert "aux" not in df.stages and df.stages == ["fc", "conv"]
    assert set(df.skipped_blocks) == {"aux"}
    assert not df[df["stage"] == "fc"]["value"].eq(1.0).all()


def test_smprt_refuses_an_option_key_that_matches_no_method(x16, monkeypatch):
    monkeypatch.setattr(E, "iter_state_maps", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="'gradeint' is not a method of this run"):
        sl.smprt(seeded(), x16, ["gradient"], n_samples=2, method_options={"gradeint": {}})
