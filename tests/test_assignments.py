"""Student notebooks (``make assignments``): up to date, no solution leaks, and, run with only the
package installed, they stop at their first stub with NotImplementedError and nothing earlier."""
import re
import subprocess
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
    paths = asg.otter_tests(ROOT, tmp_path)
    if WITH_EXERCISES:
        assert paths
    for p in paths:
        text = p.read_text()
        compile(text, str(p), "exec")
        assert "OK_FORMAT = False" in text and f"exercises.check_{p.stem}(" in text


@slow
def test_student_notebooks_stop_at_their_first_stub(clean_python, tmp_path):
    """Run in the package-only environment: every student notebook fails exactly with the
    NotImplementedError of its first exercise, after the set-up cells ran without error."""
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
        errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  for o in c.get("outputs", []) if o.get("output_type") == "error"]  # fmt: skip
        assert len(errors) == 1, [o.get("ename") for _, o in errors]
        i, err = errors[0]
        assert err["ename"] == "NotImplementedError", (err["ename"], err["evalue"])
        chapter = int(path.stem[:2])
        assert err["evalue"].startswith(f"Exercise {chapter}.1:"), err["evalue"]
        ran = [c for c in nb.cells[:i] if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in ran)  # everything before it ran


def test_instructor_page_links_every_student_notebook():
    """The Colab links of book/for_instructors.md are the generator's (repository and ref)."""
    page = (ROOT / "book" / "for_instructors.md").read_text()
    links = set(re.findall(r"\((https://colab\.research\.google\.com/github/[^)]+/assignments/[^)]+)\)", page))
    assert links == {asg.colab_url(p.stem, ROOT) for p in COMMITTED}
