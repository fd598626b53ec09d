"""Can the result cache be trusted?  (issue 12, "Cache"; eval-mode handling and argument checks
of the runners.)

* the key covers the model's *code* (a class redefined with another ``forward``, an
  instance-level ``forward``, instance attributes, a user method's global helpers); code that
  cannot be identified disables the cache for the run, with a warning saying why;
* nothing is ever unpickled from the cache or a checkpoint: a planted pickle does not run, it is
  reported and recomputed, as are empty or truncated files;
* an interrupted run resumes from its last finished slice of stages, whatever the group size,
  and the sliced computation is bit-identical to the unsliced one;
* the runners and ``explain_methods`` run a model in eval mode and give it back as they found
  it (training flags, buffers);
* invalid arguments fail before any work, naming the argument.

Tiny models (16x16 or 8x8 inputs) keep every test at a few seconds on a CPU.
"""

from __future__ import annotations

import copy
import os
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sanitylib.cache as C
import sanitylib.experiment as E
import sanitylib.spec as S
from sanitylib import training as T
from reference import TinyCNN
from sanitylib.data import MnistData

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]

METHODS = ["gradient", "smoothgrad", "integrated_gradients"]
OPTIONS = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 4}}
METRICS = ["spearman_abs", "spearman"]


# ---------------------------------------------------------------- models and helpers


class PoolChoice(nn.Module):
    """Same parameters whatever ``pool``: only an instance attribute tells the two apart."""

    def __init__(self, pool: str = "mean") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.pool_kind = pool

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h.mean(dim=(2, 3)) if self.pool_kind == "mean" else h.amax(dim=(2, 3))
        return self.fc(h)


class DeepMLP(nn.Module):
    """Seven blocks, so seven stages: slices of two stages ([0, 1], [2, 3], [4, 5], [6])."""

    def __init__(self, width: int = 12, depth: int = 7) -> None:
        super().__init__()
        self.depth = depth
        for i in range(depth):
            setattr(self, f"l{i}", nn.Linear(64 if i == 0 else width, 5 if i == depth - 1 else width))

    def forward(self, x):
        h = x.flatten(1)
        for i in range(self.depth):
            h = getattr(self, f"l{i}")(h)
            if i < self.depth - 1:
                h = torch.tanh(h)
        return h


# a "notebook cell": the class has no source file (inspect.getsource raises)
CELL = """
import torch
from torch import nn


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.{pool}(dim=(2, 3)))
"""


def define_in_cell(pool: str) -> type:
    ns = {"__name__": "__main__"}
    exec(CELL.format(pool=pool), ns)  # noqa: S102 - a notebook cell, as a user would run it
    return ns["PoolNet"]


def seeded(cls, *args, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(*args).eval()


@pytest.fixture
def x16():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def x8():
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def run(model, x, **kw):
    args = dict(methods=METHODS, metrics=METRICS, method_options=OPTIONS, progress=False, cache=False)
    args.update(kw)
    return E.run_randomization(model, x, **args)


class StateCounter:
    """Wraps the engine's ``iter_state_maps`` as the runner calls it: records the number of
    model states of every call; raises on call ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.real = E.iter_state_maps
        self.states: list[int] = []
        self.fail_at = fail_at

    def __call__(self, model, x, methods, states, **kw):
        self.states.append(len(states))
        if self.fail_at is not None and len(self.states) == self.fail_at:
            raise RuntimeError(f"simulated interruption at call {self.fail_at}")
        return self.real(model, x, methods, states, **kw)


def _never(*args, **kwargs):
    raise AssertionError("nothing must be computed: everything is cached")


def folders(root):
    return [p for p in root.iterdir() if p.is_dir()]


def same_maps(a, b) -> bool:
    sa, sb = a.maps, b.maps
    return sa.images == sb.images and list(sa.stages) == list(sb.stages) and all(
        torch.equal(sa[s][m], sb[s][m]) for s in sa.stages for m in sa[s])  # fmt: skip


class Evil:
    """A pickle that runs ``os.makedirs(marker)`` when it is unpickled."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def plant(path, marker) -> None:
    torch.save({"rows": Evil(marker), "maps": {}, "state_dict": {}, "stats": {}, "config": {}}, path)


# ---------------------------------------------------------------- the key covers the code
def test_class_redefined_with_another_forward_is_recomputed(x16, tmp_path, monkeypatch):
    """The issue's case: same class name, same weights, max-pool instead of mean-pool, in a
    notebook cell (no source file): the second run must not return the first run's table."""
    mean_net = seeded(define_in_cell("mean"))
    max_net = define_in_cell("amax")().eval()
    max_net.load_state_dict(mean_net.state_dict())
    first = run(mean_net, x16, cache=tmp_path)
    second = run(max_net, x16, cache=tmp_path)
    fresh = run(max_net, x16)
    assert not fresh.equals(first)  # the code change really changes the results
    assert second.equals(fresh)
    assert len(folders(tmp_path)) == 2
    # the same cell run again (a new class object, same code) is served from the cache
    again = define_in_cell("mean")().eval()
    again.load_state_dict(mean_net.state_dict())
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    monkeypatch.setattr(E, "explain_methods", _never)
    assert run(again, x16, cache=tmp_path).equals(first)
    assert counter.states == [1]  # only the trained model's maps, validating the stored ones


def test_instance_attribute_is_part_of_the_key(x16, tmp_path):
    mean_net = seeded(PoolChoice, "mean")
    max_net = PoolChoice("max").eval()
    max_net.load_state_dict(mean_net.state_dict())
    first = run(mean_net, x16, cache=tmp_path)
    second = run(max_net, x16, cache=tmp_path)
    fresh = run(max_net, x16)
    assert not fresh.equals(first)
    assert second.equals(fresh)


def _avg_pool_forward(self, x):
    x = F.avg_pool2d(self.relu2(self.conv2(self.relu1(self.conv1(x)))), 2)
    return self.fc(x.flatten(1))


def test_instance_level_forward_is_part_of_the_key(x16, tmp_path):
    model = seeded(TinyCNN)
    first = run(model, x16, cache=tmp_path)
    model.forward = types.MethodType(_avg_pool_forward, model)  # monkeypatched on the instance
    second = run(model, x16, cache=tmp_path)
    fresh = run(model, x16)
    assert not fresh.equals(first)
    assert second.equals(fresh)


def test_user_method_global_helper_is_part_of_the_key(x16, tmp_path):
    """A user method's code is unchanged, but a global function it calls is redefined."""
    ns = {"__name__": "__main__", "torch": torch}
    exec("def weight():\n    return 1.0\n"  # noqa: S102
         "def mine(model, x, target):\n"
         "    x = x.clone().requires_grad_(True)\n"
         "    out = model(x).gather(1, target[:, None]).sum()\n"
         "    return torch.autograd.grad(out, x)[0] + weight() * x\n", ns)  # fmt: skip
    model = seeded(TinyCNN)
    kw = dict(methods=[ns["mine"]], method_options={})
    first = run(model, x16, cache=tmp_path, **kw)
    exec("def weight():\n    return 50.0\n", ns)  # noqa: S102 - the helper's cell run again, changed
    second = run(model, x16, cache=tmp_path, **kw)
    fresh = run(model, x16, **kw)
    assert not fresh.equals(first)
    assert second.equals(fresh)


def test_code_that_cannot_be_identified_disables_the_cache_with_a_reason(x16, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    model = seeded(TinyCNN)
    model.noise_source = torch.Generator().manual_seed(3)  # state that no key can capture
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    tables = []
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=r"result cache not used.*'noise_source'.*Generator"):
            tables.append(run(model, x16, cache=tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written
    assert counter.states == [4, 4]  # computed both times
    monkeypatch.undo()
    assert tables[1].equals(run(model, x16))


def test_config_json_names_what_the_key_covers(x16, tmp_path):
    run(seeded(PoolChoice, "mean"), x16, cache=tmp_path)
    import json

    config = json.loads((folders(tmp_path)[0] / "config.json").read_text())
    assert {"layout", "source", "version", "torch", "x", "run", "code", "randomized"} <= set(config)
    assert {"methods", "method_options", "seed", "blocks", "schedule", "order"} <= set(config["run"])
    assert any("PoolChoice" in c for c in config["model"]["classes"])
    assert {"weights", "modules"} <= set(config["model"])


# ---------------------------------------------------------------- nothing is unpickled
def _cached_run(model, x, tmp_path):
    first = run(model, x, cache=tmp_path)
    return first, folders(tmp_path)[0]


@pytest.mark.parametrize("which", ["images_0000_0002.pt"])
def test_planted_pickle_in_the_cache_does_not_run(x16, tmp_path, which):
    model = seeded(TinyCNN)
    first, folder = _cached_run(model, x16, tmp_path / "cache")
    marker = tmp_path / "pwned"
    target = folder / which
    assert target.exists()
    plant(target, marker)
    with pytest.warns(RuntimeWarning, match=re.escape(target.name)):
        again = run(model, x16, cache=tmp_path / "cache")
    assert not marker.exists()
    assert again.equals(first)
    assert again.floor.equals(first.floor)
    torch.load(target, weights_only=True)  # recomputed and rewritten, safely readable


def test_planted_pickle_in_a_slice_file_does_not_run(x8, tmp_path, monkeypatch):
    model = seeded(DeepMLP)
    monkeypatch.setattr(E, "iter_state_maps", StateCounter(fail_at=2))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(model, x8, cache=tmp_path / "cache")
    part = folders(tmp_path / "cache")[0] / "images_0000_0002.part00.pt"
    assert part.exists()
    marker = tmp_path / "pwned"
    plant(part, marker)
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    with pytest.warns(RuntimeWarning, match=re.escape(part.name)):
        resumed = run(model, x8, cache=tmp_path / "cache")
    assert not marker.exists()
    assert counter.states == [3, 2, 2, 1]  # the planted slice is recomputed like the others
    monkeypatch.undo()
    assert resumed.equals(run(model, x8))


@pytest.mark.parametrize("which", ["images_0000_0002.pt"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_cache_file_is_reported_and_recomputed(x16, tmp_path, which, damage):
    model = seeded(TinyCNN)
    first, folder = _cached_run(model, x16, tmp_path)
    target = folder / which
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match=re.escape(str(target))):
        again = run(model, x16, cache=tmp_path)
    assert again.equals(first)
    assert again.floor.equals(first.floor)
    assert same_maps(again, first)
    torch.load(target, weights_only=True)


def test_cache_files_hold_only_plain_data(x16, tmp_path, monkeypatch):
    model = seeded(TinyCNN)
    first, folder = _cached_run(model, x16, tmp_path)
    for f in folder.glob("*.pt"):
        torch.load(f, weights_only=True)  # tensors and plain containers only
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    monkeypatch.setattr(E, "explain_methods", _never)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no file is refused
        second = run(model, x16, cache=tmp_path)
    assert counter.states == [1]
    assert second.equals(first)
    assert second.floor.equals(first.floor)
    assert same_maps(second, first)


@pytest.fixture
def tiny_mnist():
    g = torch.Generator().manual_seed(0)
    return MnistData(torch.rand(60, 1, 28, 28, generator=g), torch.arange(60) % 10,
                     torch.rand(20, 1, 28, 28, generator=g), torch.arange(20) % 10,
                     source="synthetic")  # fmt: skip


def test_checkpoint_is_never_unpickled(tiny_mnist, tmp_path, monkeypatch):
    """A planted pickle, an empty and a truncated checkpoint: each is reported (a warning naming
    the file), never unpickled, and the model is trained again (here: a stand-in for training,
    to keep the test fast); the new checkpoint is plain data."""
    monkeypatch.setenv("SANITYLIB_CACHE", str(tmp_path / "cache"))
    a = T.mnist_model("mnist_mlp", tiny_mnist, epochs=1, progress=False)
    path = a.sanity_info.extra["training"]["checkpoint"]
    torch.load(path, weights_only=True)  # the checkpoint is plain data
    stats = {k: v for k, v in a.sanity_info.extra["training"].items() if k != "checkpoint"}
    calls = []

    def retrain(*args, **kwargs):
        calls.append(1)
        return copy.deepcopy(a), dict(stats)

    monkeypatch.setattr(T, "train_mnist_model", retrain)
    marker = tmp_path / "pwned"
    for damage in ("pickle", "empty", "truncated"):
        if damage == "pickle":
            plant(path, marker)
        else:
            data = open(path, "rb").read()
            with open(path, "wb") as fh:
                fh.write(b"" if damage == "empty" else data[: len(data) // 2])
        calls.clear()
        with pytest.warns(RuntimeWarning, match=re.escape(os.path.basename(path))):
            b = T.mnist_model("mnist_mlp", tiny_mnist, epochs=1, progress=False)
        assert not marker.exists()
        assert calls == [1], damage  # trained again
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
        saved = torch.load(path, weights_only=True)
        assert set(saved) == {"state_dict", "stats", "config"}
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        T.mnist_model("mnist_mlp", tiny_mnist, epochs=1, progress=False)
    assert calls == []  # the rewritten checkpoint is used


# ---------------------------------------------------------------- resume per slice of stages
@pytest.mark.parametrize("schedule", ["cascading", "independent"])
@pytest.mark.parametrize("target", ["current", "original"])
def test_sliced_computation_is_bit_identical(x8, tmp_path, schedule, target):
    model = seeded(DeepMLP)
    for group_size in (None, 2):
        kw = dict(schedule=schedule, target=target, group_size=group_size)
        sliced = run(model, x8, cache=tmp_path / str(group_size), **kw)
        whole = run(model, x8, cache=False, **kw)
        assert sliced.equals(whole)
        assert sliced.floor.equals(whole.floor)
        assert same_maps(sliced, whole)
        folder = folders(tmp_path / str(group_size))[0]
        assert not list(folder.glob("*.part*"))  # finished groups: one file each


@pytest.mark.parametrize("target", ["current", "original"])
def test_sliced_computation_is_bit_identical_with_forward_replay(x8, x16, tmp_path, monkeypatch,
                                                                  target):  # fmt: skip
    """Forward replay (on CUDA, or on the CPU when freed memory is kept): a later slice records
    its first state instead of the trained model; the numbers are the same."""
    from sanitylib.replay import Recorder

    monkeypatch.setenv("SANITYLIB_KEEP_FREED_MEMORY", "1")
    replays = []
    real = Recorder.replay

    def counting(self, *args, **kwargs):
        replays.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Recorder, "replay", counting)
    for model, x in ((seeded(DeepMLP), x8), (seeded(TinyCNN), x16)):
        sliced = run(model, x, cache=tmp_path, target=target)
        whole = run(model, x, cache=False, target=target)
        assert sliced.equals(whole)
        assert sliced.floor.equals(whole.floor)
        assert same_maps(sliced, whole)
    assert replays  # replay was on


def test_slice_plan():
    assert C.slice_plan(7) == [[0, 1], [2, 3], [4, 5], [6]]
    assert C.slice_plan(3) == [[0], [1], [2]]
    assert C.slice_plan(20) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                 [16, 17, 18, 19]]  # fmt: skip
    assert C.slice_plan(1) == [[0]]


@pytest.mark.parametrize("group_size, fail_at, expected_rerun", [
    # one group (the quickstart's case): 2 of 4 slices were done; the trained model's maps are
    # recomputed first, to validate the stored slices
    (None, 3, [1, 2, 1]),
    # the first group finished (validated), the second group's first slice done (validated)
    (2, 6, [1, 1, 2, 2, 1]),
])  # fmt: skip
def test_interrupted_run_resumes_from_its_last_finished_slice(x8, tmp_path, monkeypatch,
                                                              group_size, fail_at, expected_rerun):  # fmt: skip
    model = seeded(DeepMLP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(E, "iter_state_maps", StateCounter(fail_at=fail_at))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(model, x8, cache=tmp_path, group_size=group_size)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(tmp_path.rglob("*.tmp")) == []
    counter = StateCounter()
    monkeypatch.setattr(E, "iter_state_maps", counter)
    resumed = run(model, x8, cache=tmp_path, group_size=group_size)
    assert counter.states == expected_rerun  # only the unfinished slices' states
    monkeypatch.undo()
    fresh = run(model, x8, group_size=group_size)
    assert resumed.equals(fresh)
    assert resumed.floor.equals(fresh.floor)
    assert same_maps(resumed, fresh)
    folder = folders(tmp_path)[0]
    names = sorted(p.name for p in folder.iterdir())
    groups = ["images_0000_0002.pt"] if group_size is None else ["images_0000_0001.pt",
                                                                   "images_0002_0002.pt"]
    assert names == sorted(["config.json", *groups])


# ---------------------------------------------------------------- eval mode, model given back
@pytest.fixture
def resnet_in_train_mode():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=7)  # built in train mode
    model.layer1[0].bn1.eval()  # a model may mix train and eval submodules
    return model


def test_runner_runs_in_eval_mode_and_gives_the_model_back(resnet_in_train_mode, tmp_path):
    model = resnet_in_train_mode
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    modes = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    kw = dict(methods=["gradient"], metrics=METRICS, blocks=["fc", "layer1"], progress=False)
    expected = E.cascading_randomization(reference, x, cache=False, **kw)
    for cache in (False, tmp_path):
        df = E.cascading_randomization(model, x, cache=cache, **kw)
        assert df.equals(expected)  # computed in eval mode: BatchNorm uses running statistics
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_explain_methods_runs_in_eval_mode_and_gives_the_model_back(resnet_in_train_mode):
    model = resnet_in_train_mode
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    modes = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    expected = E.explain_methods(copy.deepcopy(model).eval(), x, ["gradient"], progress=False)
    for image_ids in (None, [5, 6]):
        maps = E.explain_methods(model, x, ["gradient"], progress=False, image_ids=image_ids)
        assert torch.equal(maps["gradient"], expected["gradient"])
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- arguments checked first
@pytest.mark.parametrize("kwargs, match", [
    ({"seed": "abc"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**70}, "seed must lie in"),
    ({"seed": -1}, "seed must lie in"),
    ({"method_options": {"smooth_grad": {"n_samples": 2}}}, "'smooth_grad' is not a method of this run"),
    ({"blocks": []}, "blocks"),
    ({"blocks": 0}, "blocks: the number of top blocks must be >= 1"),  # an int K: the top K
    ({"blocks": True}, "blocks"),
    ({"blocks": 3.0}, "blocks"),
    ({"store_maps": "2"}, "store_maps"),
    ({"store_maps": -1}, "store_maps"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "8"}, "batch_size"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": 2.0}, "group_size"),
    ({"cache": 3}, "cache"),
    ({"progress": "yes"}, "progress"),
    ({"floor": None}, "floor"),
    ({"amp": "fp8"}, "amp"),
    ({"label": 3}, "label"),
    ({"image_names": "abc"}, "image_names"),
    ({"perturbation": "reinit"}, "perturbation"),
    ({"method_options": {"smoothgrad": 3}}, "method_options"),
])  # fmt: skip
def test_invalid_arguments_fail_before_any_work(x16, tmp_path, monkeypatch, kwargs, match):
    def no_work(*args, **kw):
        raise AssertionError("work started before the arguments were checked")

    for name in ("get_blocks", "iter_state_maps", "explain_methods", "auto_batch_size"):
        monkeypatch.setattr(E, name, no_work, raising=False)
    monkeypatch.setattr(S, "get_blocks", no_work)
    with pytest.raises(ValueError, match=match):
        run(seeded(TinyCNN), x16, **{"cache": tmp_path, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_a_single_method_or_block_may_be_given_alone(x16):
    model = seeded(TinyCNN)
    df = E.cascading_randomization(model, x16, "gradient", blocks="fc", metrics="spearman",
                                   cache=False, progress=False)  # fmt: skip
    assert set(df["method"]) == {"gradient"} and df.stages == ["fc"]
    assert len(df) == len(x16)
