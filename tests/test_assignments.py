"""Student notebooks (``make assignments``): up to date, no solution leaks, and, run with only the
package installed, they stop at their first stub with NotImplementedError and nothing earlier."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from sanitylib.book import assignments as asg

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WITH_EXERCISES = [p for p in CHAPTERS
                  if any(asg.EXERCISE_TAG in c.metadata.get("tags", [])
                         for c in nbformat.read(p, as_version=4).cells)]  # fmt: skip
COMMITTED = sorted((ROOT / asg.OUT_DIR).glob("*.ipynb"))
slow = pytest.mark.slow


def test_committed_student_notebooks_are_regenerated_byte_for_byte(tmp_path):
    written = asg.generate(ROOT, out=tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in COMMITTED], "run `make assignments`"
    for path in COMMITTED:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name}: run `make assignments`"
    again = tmp_path / "again"
    asg.generate(ROOT, out=again)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in written)  # deterministic


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=lambda p: p.stem)
def test_no_solution_text_leaks(path):
    text = (ROOT / asg.OUT_DIR / path.name).read_text()
    solution = asg.solution_lines(nbformat.read(path, as_version=4))
    assert solution, "the chapter's exercises have no solution text"
    assert [l for l in solution if l in text] == []
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "# SOLUTION", "{solution", "{exercise", "```{"):
        assert marker not in text, marker


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_student_notebook_is_clean_pinned_and_smoke_sized(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert f'REPOSITORY = "{url}"' in code[0].source
    assert f'REF = "{asg.ASSIGNMENT_REF}"' in code[0].source
    assert "git+{REPOSITORY}@{REF}" in code[0].source and 'find_spec("sanitylib") is None' in code[0].source
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'profile = "smoke"' in params[0].source
    stubs = [c for c in code if "raise NotImplementedError(\"Exercise" in c.source]
    assert stubs, "no stub: the assignment has nothing to implement"
    variation = [c for c in code if "variation = exercises.variation(student_id)" in c.source]
    assert len(variation) == 1 and code.index(variation[0]) == code.index(params[0]) + 1
    checks = [c for c in code if asg.CHECK_TAG in c.metadata.get("tags", [])]
    for c in checks:  # the student's own inputs, and a failing check does not stop a grading re-run
        assert asg.RAISES_TAG in c.metadata["tags"]
        calls = re.findall(r"exercises\.check_\w+\([^)]*\)", c.source)
        assert calls and all(call.endswith(", variation=variation)") for call in calls), c.source
    setup = "".join(c.source for c in code)
    assert 'names=["chelsea", "coffee"]' not in setup and 'load_model("efficientnet_lite0")' not in setup
    headings = re.findall(r"\*\*Exercise (\d+)\.(\d+)", "".join(c.source for c in nb.cells))
    assert [int(k) for _, k in headings] == list(range(1, len(headings) + 1))  # numbered in order


def test_stub_and_answer_markers():
    src = ("def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n"
           "guess = 0.3  # SOLUTION\nprint(guess)")
    out = asg._stub(src, "2.1")
    assert out == ('def f(x):\n    y = 1\n    raise NotImplementedError("Exercise 2.1: write your '
                   'code here")\nguess = ...  # your answer\nprint(guess)')
    with pytest.raises(ValueError, match="without '# END SOLUTION'"):
        asg._stub("# BEGIN SOLUTION\nx = 1", "1.1")


def test_solutions_never_reach_the_student_notebook(tmp_path):
    """Marked solution code is stubbed even outside a solution box (an author's slip), solution
    cells and written solutions are dropped, and an unclosed solution box is refused."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    ex = lambda c: c.metadata.update(tags=[asg.EXERCISE_TAG]) or c  # noqa: E731
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.cells = [v4.new_code_cell('profile = "book"'),
                ex(v4.new_markdown_cell("```{exercise} T\n:label: ex-t\n\nDo it.\n```")),
                ex(v4.new_markdown_cell("```{solution-start} ex-t\n:class: dropdown\n```")),
                ex(v4.new_code_cell("secret_answer_value = compute_the_secret()")),
                ex(v4.new_markdown_cell("```{solution-end}\n```")),
                ex(v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return hidden_reference_code()\n"
                                    "    # END SOLUTION")),
                ex(v4.new_markdown_cell("```{solution} ex-t\n:class: dropdown\n\nThe written model answer.\n```"))]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, tmp_path / "notebooks" / "01_t.ipynb")
    (path,) = asg.generate(tmp_path, out=tmp_path / "out")
    text = path.read_text()
    for secret in ("compute_the_secret", "hidden_reference_code", "written model answer", "SOLUTION"):
        assert secret not in text
    assert 'raise NotImplementedError(\\"Exercise 1.1: write your code here\\")' in text
    nb.cells = nb.cells[:3]  # a solution-start without its solution-end
    nbformat.write(nb, tmp_path / "notebooks" / "01_t.ipynb")
    with pytest.raises(ValueError, match="solution-start without"):
        asg.generate(tmp_path, out=tmp_path / "out")


def test_otter_export_calls_the_same_checks(tmp_path):
    """One folder per chapter with checks: its tests (public on the student's variation, hidden on
    others), requirements at the pin, the student notebook and a README of the steps."""
    paths = asg.otter_tests(ROOT, tmp_path, hidden=2, hidden_seed=7)
    if WITH_EXERCISES:
        assert paths
    folders = {p.parent.parent for p in paths}
    assert len(folders) > 1  # not one folder for all chapters
    for folder in folders:
        req = (folder / "requirements.txt").read_text()
        assert f"@{asg.ASSIGNMENT_REF}" in req and asg.repository_url(ROOT) in req
        assert (folder / f"{folder.name}.ipynb").exists()
        readme = (folder / "README.md").read_text()
        assert "otter generate" in readme and "otter run" in readme
        chapter = nbformat.read(ROOT / "notebooks" / f"{folder.name}.ipynb", as_version=4)
        names = {n for c in chapter.cells for n, _ in asg._CHECK_CALL.findall(c.source)}
        assert {p.stem for p in (folder / "tests").glob("*.py")} == names  # this chapter's checks only
    for p in paths:
        text = p.read_text()
        compile(text, str(p), "exec")
        assert "OK_FORMAT = False" in text and f"exercises.check_{p.stem}(" in text
        assert text.count("hidden=True") == 2 and text.count("hidden=False") == 1
        assert "variation=variation" in text  # the public case: the student's own variation
    hidden = re.findall(r"Variation\(seed=(\d+), photos=(\(.*?\))\)", "".join(p.read_text() for p in paths))
    assert len(set(hidden)) == len(hidden) and all(int(s) >= 10_000 for s, _ in hidden)
    again = tmp_path / "again"
    asg.otter_tests(ROOT, again, hidden=2, hidden_seed=8)
    assert any(p.read_text() != (again / p.relative_to(tmp_path)).read_text() for p in paths)  # seed matters


def test_answer_keys_fill_in_the_solutions(tmp_path):
    keys = asg.generate(ROOT, out=tmp_path, solutions=True)
    assert [p.name for p in keys] == [p.name for p in COMMITTED]
    for p in keys:
        text = p.read_text()
        assert "NotImplementedError(\\\"Exercise" not in text and "SOLUTION" not in text
    with pytest.raises(ValueError, match="never go to assignments"):
        asg.generate(ROOT, solutions=True)


OTTER = importlib.util.find_spec("otter") is not None


@slow
@pytest.mark.skipif(not OTTER, reason="otter-grader is not installed (optional, not a dependency: "
                                      "pip install otter-grader to run the end-to-end grading test)")
def test_otter_grades_a_correct_and_a_wrong_submission(tmp_path):
    """End to end with otter-grader: the answer key of chapter 5 scores full points, the
    student notebook (a stub) and a wrong answer (a cyclic shift) score 0, and the other cells
    are graded although a check failed. Runs where otter-grader is installed."""
    stem = "05_data_randomization"
    asg.otter_tests(ROOT, tmp_path / "otter", hidden=1)
    asg.generate(ROOT, out=tmp_path / "key", solutions=True)
    folder = tmp_path / "otter" / stem
    (folder / "requirements.txt").write_text("")  # grade against the installed sanitylib
    otter = [sys.executable, "-m", "otter"]
    subprocess.run([*otter, "generate", "-t", "tests", "-r", "requirements.txt"], cwd=folder, check=True,
                   capture_output=True)
    key = nbformat.read(tmp_path / "key" / f"{stem}.ipynb", as_version=4)
    wrong = nbformat.read(tmp_path / "key" / f"{stem}.ipynb", as_version=4)
    for c in wrong.cells:
        if c.source.startswith("def shuffled_labels"):
            c.source = "def shuffled_labels(y, seed):\n    return torch.roll(y, 1)"
    scores = {}
    for label, nb in (("key", key), ("wrong", wrong), ("stub", nbformat.read(folder / f"{stem}.ipynb", as_version=4))):
        sub = tmp_path / label / f"{stem}.ipynb"
        sub.parent.mkdir(exist_ok=True)
        nbformat.write(nb, sub)
        res = subprocess.run([*otter, "run", "-a", str(folder / "autograder.zip"), str(sub), "-o", str(sub.parent)],
                             cwd=sub.parent, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        results = json.loads((sub.parent / "results.json").read_text())
        scores[label] = (sum(t["score"] for t in results["tests"]), sum(t["max_score"] for t in results["tests"]))
    print(scores)
    assert scores["key"][0] == scores["key"][1] == 2
    assert scores["wrong"][0] == 0 and scores["stub"][0] == 0


def _stub_errors(nb):
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]  # fmt: skip


@slow
def test_student_notebooks_stop_at_their_first_stub(clean_python, tmp_path):
    """Run in the package-only environment: every student notebook's first error is the
    NotImplementedError of its first exercise, after the set-up cells ran without error; a
    check cell's error (tagged raises-exception) does not stop the run, a stub cell's does."""
    from clean_env import KERNEL, _clean_env

    for path in COMMITTED:
        out = tmp_path / path.name
        t0 = time.perf_counter()
        res = subprocess.run([str(clean_python), "-m", "papermill", str(path), str(out), "-k", KERNEL,
                              "--cwd", str(tmp_path), "--no-progress-bar", "--execution-timeout", "600"],
                             env=_clean_env(), cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        print(f"{path.stem}: {time.perf_counter() - t0:.0f} s")
        assert res.returncode != 0, f"{path.name} ran to the end: no stub was reached"
        nb = nbformat.read(out, as_version=4)
        errors = _stub_errors(nb)
        assert errors and all(o["ename"] == "NotImplementedError" for _, o in errors), \
            [(o.get("ename"), o.get("evalue")) for _, o in errors]
        chapter = int(path.stem[:2])
        assert errors[0][1]["evalue"].startswith(f"Exercise {chapter}.1:"), errors[0][1]["evalue"]
        for i, _ in errors[:-1]:  # went on past these: check cells only
            assert asg.RAISES_TAG in nb.cells[i].metadata.get("tags", [])
        ran = [c for c in nb.cells[: errors[0][0]] if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in ran)  # everything before it ran


def test_instructor_page_links_every_student_notebook():
    """The Colab links of book/for_instructors.md are the generator's (repository and ref), and
    its table lists each chapter's own exercises (the titles of its exercise boxes)."""
    page = (ROOT / "book" / "for_instructors.md").read_text()
    links = set(re.findall(r"\((https://colab\.research\.google\.com/github/[^)]+/assignments/[^)]+)\)", page))
    assert links == {asg.colab_url(p.stem, ROOT) for p in COMMITTED}
    assert asg.instructor_table(ROOT) in page
    row = next(l for l in page.splitlines() if l.startswith("| 1. "))
    assert "edge detector (predict" not in row  # issue 26: not an exercise of chapter 1
    for path in WITH_EXERCISES:
        nb = nbformat.read(path, as_version=4)
        titles = [d[1] for c in nb.cells for d in [asg._directive(c.source)] if d and d[0] == "exercise"]
        row = next(l for l in page.splitlines() if l.startswith(f"| {int(path.stem[:2])}. "))
        for title in titles:
            core = title.split(":", 1)[-1].strip()
            assert core[1:] in row or title.startswith("Explain"), (path.stem, title)


def _copy_tree(tmp_path) -> Path:
    root = tmp_path / "repo"
    for d in ("notebooks", "book"):
        shutil.copytree(ROOT / d, root / d)
    for f in ("_config.yml", "README.md"):
        shutil.copy(ROOT / f, root / f)
    return root


def test_one_pin_sets_every_link_and_install(tmp_path):
    """ASSIGNMENT_REF is the single source: with another ref, the chapters' and the instructor
    page's Colab links and the capstone's install follow it, and --check names what is stale."""
    asg.pinned_links(ROOT, check=True)  # the committed tree follows the pin
    root = _copy_tree(tmp_path)
    with pytest.raises(SystemExit, match="links not pinned"):
        asg.pinned_links(root, ref="course-2027s", check=True)
    changed = asg.pinned_links(root, ref="course-2027s")
    assert root / "book" / "for_instructors.md" in changed
    assert asg.pinned_links(root, ref="course-2027s") == []  # idempotent
    capstone = (root / asg.CAPSTONE).read_text()
    assert 'REF = \\"course-2027s\\"' in capstone and "@{REF}" in capstone
    owner_repo = asg.repository_url(ROOT).removeprefix("https://github.com/")
    for path in [*(root / "notebooks").glob("*.ipynb"), *(root / "book").glob("*.md")]:
        text = path.read_text()
        refs = re.findall(rf"colab\.research\.google\.com/github/{owner_repo}/blob/([^/]+)/", text)
        assert all(r == "course-2027s" for r in refs), (path.name, refs)
    page = (root / "book" / "for_instructors.md").read_text()
    assert page.count("/blob/course-2027s/") == len(COMMITTED) + 1  # the capstone too
    # nothing but the links changed
    before = (ROOT / "book" / "for_instructors.md").read_text()
    assert page.replace("/blob/course-2027s/", f"/blob/{asg.ASSIGNMENT_REF}/") == before


def test_capstone_follows_the_rubric_and_displays_outside_the_book():
    nb = nbformat.read(ROOT / asg.CAPSTONE, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "{glue:figure}" not in text  # raw MyST outside the book
    assert "plt.show()" in text  # the figure is the cell's own output (JupyterLab, Colab, the book)
    assert "1.96" not in text.replace("1.96 std/√n", "")  # Student's t, not z
    assert "interval_table(df)" in text
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    # the book profile is the default (every chapter's parameters cell says "book", as
    # test_notebooks requires); the page says it finishes on a free Colab CPU runtime, smoke
    # is offered as the quicker first try
    assert 'profile = "book"' in params.source and '"smoke"' in params.source
    assert "free Colab CPU runtime" in " ".join(text.split())
    for name in asg.CAPSTONE_METHODS:  # the choices are offered where the student chooses
        assert name in params.source
    answers = [c for c in nb.cells if "answer" in c.metadata.get("tags", [])]
    page = (ROOT / "book" / "for_instructors.md").read_text()
    criteria = re.findall(r"^\| (Set-up|Model randomization|Data randomization|How sure|Verdict[^|]*?) \|", page, re.M)
    assert len(answers) == len(criteria) == 5
    for c, crit in zip(answers, criteria):
        assert crit.split()[0] in c.source
    assert "random masks" in text and "different-images floor" in text


def test_capstone_method_offers_the_supported_choices():
    import captum.attr
    import torch

    for name in asg.CAPSTONE_METHODS:
        module, cls = asg.capstone_method(f"captum.attr.{name}")
        cls(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))  # built from the model alone
    for bad in ("captum.attr.GuidedGradCam", "captum.attr.LayerGradCam", "captum.attr.Occlusion"):
        with pytest.raises(ValueError, match="captum.attr.InputXGradient"):
            asg.capstone_method(bad)
    with pytest.raises(ValueError, match="no such captum class"):
        asg.capstone_method("captum.attr.Nope")
    assert asg.capstone_method("gradient") == ("gradient", None)
    assert captum.attr.GuidedGradCam  # the example of the issue exists in this captum


def test_interval_table_uses_students_t():
    import pandas as pd
    from scipy import stats

    values = [0.1, 0.3, 0.2, 0.6]
    df = pd.DataFrame({"stage_index": 0, "stage": "logits", "method": "m", "metric": "k", "value": values})
    row = asg.interval_table(df).iloc[0]
    s = pd.Series(values).std(ddof=1)
    assert row["n"] == 4 and row["sd"] == pytest.approx(s)
    half = stats.t.ppf(0.975, 3) * s / 2
    assert row["high"] - row["mean"] == pytest.approx(half) and half > 1.96 * pd.Series(values).std(ddof=0) / 2 * 1.5


def test_make_lab_assignments_opens_the_student_notebooks():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "lab-assignments"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "jupyter lab assignments/" in dry
