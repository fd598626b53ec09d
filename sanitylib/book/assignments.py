"""Student notebooks from the chapters: ``assignments/<chapter>.ipynb`` (``make assignments``).

Each chapter ends with an Exercises section whose cells carry the tag ``exercise``. They use
sphinx-exercise's MyST syntax (``{exercise}``, gated ``{solution-start}`` / ``{solution-end}``
around executed solution code, ``{solution}`` for written answers) and the otter/nbgrader
markers in solution code (``# BEGIN SOLUTION`` / ``# END SOLUTION``, a line ending in
``# SOLUTION``). The student notebook of a chapter holds:

1. the chapter's title, how to work on Colab, and a link to the chapter;
2. an install cell pinned to the repository of ``_config.yml`` at :data:`ASSIGNMENT_REF`;
3. the chapter's ``parameters`` cell with ``profile = "smoke"`` (a CPU runtime suffices);
4. the exercise cells, with every solution removed: a marked region becomes
   ``raise NotImplementedError("Exercise N.k: ...")``, a ``# SOLUTION`` line becomes ``...``,
   solution-only cells and ``{solution}`` boxes are dropped (a written answer gets a
   "Your answer" cell), and the MyST directives become plain Markdown (Colab renders no MyST).

Every student notebook also gets a "your variation" cell: the student enters their id,
:func:`sanitylib.exercises.variation` turns it into a seed and two photos, the set-up cells load
those photos (and the variation's model), and the check cells pass ``variation=variation``, so
each student's checks run on their own inputs. Check cells carry the ``raises-exception`` tag:
Run All in Colab stops at a failing check (the student sees it), while a re-run for grading
with papermill / ``jupyter nbconvert --execute`` (nbclient) goes on past it.

:data:`ASSIGNMENT_REF` is the one pin: the install cells, the Colab links of the chapters and
of ``book/for_instructors.md`` and the capstone's install follow it (``make assignments``
rewrites them; ``--check`` fails when one does not).

The output is deterministic (byte-identical on regeneration). ``--otter DIR`` also writes, per
chapter, an otter-grader folder (exception-based tests calling the same checks of
:mod:`sanitylib.exercises` on the student's variation and on hidden ones, the requirements of
the grading image, a README); otter-grader is not a dependency.

Run from the repository root::

    python -m sanitylib.book.assignments            # write assignments/, update the pinned links
    python -m sanitylib.book.assignments --check    # fail if assignments/ or a link is not up to date
    python -m sanitylib.book.assignments --otter DIR [--hidden 2] [--hidden-seed N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = ["ASSIGNMENT_REF", "EXERCISE_TAG", "CHECK_TAG", "repository_url", "colab_url",
           "student_notebook", "solution_lines", "generate", "pinned_links", "otter_tests",
           "capstone_method", "CAPSTONE_METHODS", "interval_table", "instructor_table", "main"]  # fmt: skip

#: The branch or tag that students install and that every Colab link opens: the ONE place to pin
#: a course to a release (e.g. ``"course-2027s"``) for a semester (book/for_instructors.md says how).
ASSIGNMENT_REF = "main"
#: Tag of every cell of a chapter's Exercises section; check cells also carry :data:`CHECK_TAG`.
EXERCISE_TAG = "exercise"
CHECK_TAG = "exercise-check"
#: nbclient (papermill, nbconvert --execute) runs on past an error in a cell with this tag.
RAISES_TAG = "raises-exception"
#: The capstone notebook (its install cell follows the pin too).
CAPSTONE = "notebooks/10_capstone.ipynb"
OUT_DIR = "assignments"
COLAB = "https://colab.research.google.com/github"

_DIRECTIVE = re.compile(r"^```\{(exercise|solution|solution-start|solution-end)\}(.*?)\n(.*?)^```\s*$",
                        re.S | re.M)  # fmt: skip
_ROLE = re.compile(r"\{[a-z:-]+\}`([^`<]*?)(?:\s*<[^>]*>)?`")
_CHECK_CALL = re.compile(r"exercises\.check_(\w+)\((\w+)")


def _root(root: Path | None) -> Path:
    return Path(root) if root is not None else Path.cwd()


def repository_url(root: Path | None = None) -> str:
    """``repository.url`` of the book's ``_config.yml`` (e.g. ``https://github.com/o/r``)."""
    import yaml

    url = yaml.safe_load((_root(root) / "_config.yml").read_text())["repository"]["url"]
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"_config.yml repository.url must be https://github.com/<owner>/<repo>, got {url!r}")
    return url


def colab_url(stem: str, root: Path | None = None, ref: str = ASSIGNMENT_REF) -> str:
    """Colab link of the student notebook ``assignments/<stem>.ipynb`` at ``ref``."""
    owner_repo = repository_url(root).removeprefix("https://github.com/")
    return f"{COLAB}/{owner_repo}/blob/{ref}/{OUT_DIR}/{stem}.ipynb"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _directive(src: str) -> tuple[str, str, dict, str] | None:
    """``(kind, argument, options, body)`` of a cell that is one sphinx-exercise directive."""
    m = _DIRECTIVE.match(src.strip() + "\n")
    if not m:
        return None
    kind, arg, rest = m.group(1), m.group(2).strip(), m.group(3)
    opts, body = {}, []
    lines = rest.split("\n")
    while lines and lines[0].startswith(":"):
        key, _, val = lines.pop(0)[1:].partition(":")
        opts[key.strip()] = val.strip()
    body = "\n".join(lines).strip()
    return kind, arg, opts, body


def _plain(md: str) -> str:
    """MyST roles (``{doc}`x```) as plain text, for Colab and Jupyter."""
    return _ROLE.sub(lambda m: m.group(1).strip() or "", md)


def _stub(src: str, number: str, solutions: bool = False) -> str:
    """Solution code with every marked region replaced by a stub (``solutions=True``: with the
    markers removed and the solution kept, for the instructor's answer key)."""
    out, skipping = [], False
    for line in src.split("\n"):
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped in ("# BEGIN SOLUTION", "# END SOLUTION") and solutions:
            continue
        if stripped.endswith("# SOLUTION") and solutions:
            out.append(line[: line.rstrip().rindex("# SOLUTION")].rstrip())
            continue
        if stripped == "# BEGIN SOLUTION":
            skipping = True
            out.append(f'{indent}raise NotImplementedError("Exercise {number}: write your code here")')
            continue
        if stripped == "# END SOLUTION":
            skipping = False
            continue
        if skipping:
            continue
        if stripped.endswith("# SOLUTION"):
            m = re.match(r"^(\s*)([\w.\[\]]+\s*=)\s*", line)
            out.append(f"{m.group(1)}{m.group(2)} ...  # your answer" if m else f"{indent}...")
            continue
        out.append(line)
    if skipping:
        raise ValueError(f"Exercise {number}: '# BEGIN SOLUTION' without '# END SOLUTION'")
    return "\n".join(out)


def _has_markers(src: str) -> bool:
    return any(l.strip() in ("# BEGIN SOLUTION", "# END SOLUTION") or l.rstrip().endswith("# SOLUTION")
               for l in src.split("\n"))  # fmt: skip


def solution_lines(chapter_nb) -> list[str]:
    """Every line of solution text in a chapter (code in marked regions, the value of each
    ``# SOLUTION`` line, solution-only code cells, the prose of solutions), except text that
    the prompt shows too (e.g. ``with torch.no_grad():`` in a set-up cell) and lines under 12
    characters: what must never appear in a student notebook."""
    lines, prompt, inside = [], set(), False
    for cell in chapter_nb.cells:
        if EXERCISE_TAG not in _tags(cell):
            continue
        d = _directive(cell.source) if cell.cell_type == "markdown" else None
        if d and d[0] == "solution-start":
            inside = True
            continue
        if d and d[0] == "solution-end":
            inside = False
            continue
        if d and d[0] == "solution":
            lines += d[3].split("\n")
            continue
        if not inside:  # the prompt: shown to students (exercise text, set-up and check cells)
            prompt.update(l.strip() for l in cell.source.split("\n"))
            continue
        if cell.cell_type == "markdown" or not _has_markers(cell.source):
            lines += cell.source.split("\n")
            continue
        region = False
        for line in cell.source.split("\n"):
            s = line.strip()
            if s == "# BEGIN SOLUTION":
                region = True
            elif s == "# END SOLUTION":
                region = False
            elif region:
                lines.append(line)
            elif s.endswith("# SOLUTION"):
                lines.append(line.rsplit("=", 1)[-1].replace("# SOLUTION", ""))
    shown = "\n".join(sorted(prompt))
    return [l.strip() for l in lines if len(l.strip()) >= 12 and l.strip() not in shown]


def _install_cell(repository: str, ref: str) -> str:
    return (
        "# Install sanitylib, pinned to the course's version, where it is not installed yet (Colab,\n"
        "# a fresh Jupyter); the torch already installed is kept. Does nothing elsewhere.\n"
        f'REPOSITORY = "{repository}"\n'
        f'REF = "{ref}"\n'
        "import importlib, importlib.util, subprocess, sys\n"
        'if importlib.util.find_spec("sanitylib") is None:\n'
        '    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",\n'
        '                           f"sanitylib @ git+{REPOSITORY}@{REF}"])\n'
        "    importlib.invalidate_caches()"
    )


_VARIATION_CELL = (
    "# Your variation. Enter your student id (as your instructor asks): the set-up cells below load\n"
    "# your own photos, the checks run on your own inputs and seed, and the grader also tests your\n"
    "# functions on variations you do not see. Empty: the book's inputs.\n"
    'student_id = ""\n'
    "from sanitylib import exercises\n"
    "variation = exercises.variation(student_id)\n"
    "print(variation)"
)


def _with_variation(src: str) -> str:
    """A set-up or check cell of a chapter, rewritten to use the student's ``variation``."""
    src = re.sub(r'names=\["chelsea", "coffee"\]', "names=list(variation.photos)", src)
    src = src.replace('sl.load_model("efficientnet_lite0")', "sl.load_model(variation.model_name)")
    return re.sub(r"(exercises\.check_\w+\(\w+)\)", r"\1, variation=variation)", src)


def student_notebook(chapter_nb, stem: str, repository: str, ref: str = ASSIGNMENT_REF,
                     solutions: bool = False):
    """The student version (an ``nbformat`` notebook) of one chapter notebook; with
    ``solutions=True``, the instructor's answer key (the same notebook, solutions filled in)."""
    import nbformat

    v4 = nbformat.v4
    chapter = int(stem[:2]) if stem[:2].isdigit() else 0
    title = next((l.lstrip("# ").strip() for c in chapter_nb.cells if c.cell_type == "markdown"
                  for l in c.source.split("\n") if l.startswith("# ")), stem)  # fmt: skip
    source = f"{repository}/blob/{ref}/notebooks/{stem}.ipynb"
    cells = [v4.new_markdown_cell(
        f"# Assignment: {title}\n\n"
        f"Exercises of chapter {chapter} of *Sanity Checks for Saliency Maps: an executable "
        f"replication* (the chapter itself: [{stem}.ipynb]({source})).\n\n"
        "How to work (Colab): **File → Save a copy in Drive**, run the cells from the top, replace "
        "each `raise NotImplementedError(...)` with your code and each `...` with your answer, and "
        "run the check cell below it (it prints PASS, or what is wrong with a hint). First enter "
        "your student id in the *Your variation* cell: your checks run on your own inputs. A "
        "failing check stops **Run all** at its cell (fix it, or go on with **Run after**); "
        "graders re-run every cell. The notebook runs on a CPU runtime. To hand in: "
        "**File → Download → .ipynb**.\n\n"
        f"*Generated from `notebooks/{stem}.ipynb` by `make assignments`: do not edit by hand.*"
        + ("\n\n**Answer key (instructors only): solutions filled in.**" if solutions else ""))]
    cells.append(v4.new_code_cell(_install_cell(repository, ref)))
    params = [c for c in chapter_nb.cells if c.cell_type == "code" and "parameters" in _tags(c)]
    if len(params) != 1:
        raise ValueError(f"{stem}: expected one cell tagged 'parameters', found {len(params)}")
    p = v4.new_code_cell(re.sub(r'^profile = "\w+"', 'profile = "smoke"', params[0].source, flags=re.M))
    p.metadata["tags"] = ["parameters"]
    cells.append(p)
    cells.append(v4.new_code_cell(_VARIATION_CELL))
    inside, k, number = False, 0, f"{chapter}.0"
    n_exercise = 0
    for cell in chapter_nb.cells:
        if EXERCISE_TAG not in _tags(cell):
            continue
        n_exercise += 1
        d = _directive(cell.source) if cell.cell_type == "markdown" else None
        if d and d[0] == "exercise":
            k += 1
            number = f"{chapter}.{k}"
            head = f"**Exercise {number}: {d[1]}**" if d[1] else f"**Exercise {number}**"
            cells.append(v4.new_markdown_cell(f"{head}\n\n{_plain(d[3])}"))
        elif d and d[0] == "solution-start":
            inside = True
        elif d and d[0] == "solution-end":
            inside = False
        elif d and d[0] == "solution":
            cells.append(v4.new_markdown_cell(f"**Your answer (Exercise {number}):**\n\n"
                                              + (_plain(d[3]) if solutions else "...")))
        elif inside:
            if cell.cell_type == "code" and _has_markers(cell.source):
                cells.append(v4.new_code_cell(_stub(cell.source, number, solutions)))
        elif cell.cell_type == "markdown" and cell.source.startswith("## Exercises"):
            cells.append(v4.new_markdown_cell(  # the book's intro speaks of solutions: replaced
                "## Exercises\n\nEach exercise runs on its own in seconds; run the set-up cell below first."))
        elif cell.cell_type == "markdown":
            cells.append(v4.new_markdown_cell(_plain(cell.source)))
        else:  # set-up and check cells; marked lines are stubbed here too (an author's slip)
            src = _stub(cell.source, number, solutions) if _has_markers(cell.source) else cell.source
            c = v4.new_code_cell(_with_variation(src))
            if CHECK_TAG in _tags(cell):
                c.metadata["tags"] = [CHECK_TAG, RAISES_TAG]
            cells.append(c)
    if inside:
        raise ValueError(f"{stem}: a solution-start without its solution-end")
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })  # fmt: skip
    for i, c in enumerate(nb.cells):  # deterministic ids
        c["id"] = f"{stem[:40]}-{i:03d}"
    return nb if n_exercise else None


def _dumps(nb) -> str:
    import nbformat

    return nbformat.writes(nb) + ("" if nbformat.writes(nb).endswith("\n") else "\n")


def _pinned_files(root: Path) -> list[Path]:
    files = sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "book").glob("*.md"))
    return files + [root / "README.md"] if (root / "README.md").exists() else files


def _pin_text(text: str, owner_repo: str, ref: str) -> str:
    """``text`` with every Colab link into the repository (and every GitHub ``blob``/``tree``
    link to a notebook or an assignment) at ``ref``, and a capstone install cell's ``REF``."""
    text = re.sub(rf"(https://colab\.research\.google\.com/github/{re.escape(owner_repo)}/blob/)[^/\s)\"']+/",
                  rf"\g<1>{ref}/", text)
    text = re.sub(rf"(https://github\.com/{re.escape(owner_repo)}/(?:blob|tree)/)[^/\s)\"']+/"
                  r"(?=(?:notebooks|assignments)/)", rf"\g<1>{ref}/", text)
    return re.sub(r'^(\s*"?REF = \\?")[^"\\]*(\\?")', rf"\g<1>{ref}\g<2>", text, flags=re.M)


_TABLE_START, _TABLE_END = "<!-- assignments-table: generated by make assignments -->", "<!-- /assignments-table -->"
#: Student time per chapter (minutes) for the instructor page's table.
_MINUTES = {1: 45, 2: 60, 3: 45, 4: 45, 5: 30, 6: 45, 7: 30, 8: 30, 9: 40}


def _exercise_kind(title: str) -> str:
    for prefix, kind in (("Predict, then check:", "predict, then check"), ("Explore:", "explore")):
        if title.startswith(prefix):
            return f"{title[len(prefix):].strip()} ({kind})"
    if title.startswith("Explain"):
        return "a short explanation (written)"
    first = title.split()[0]
    if first not in ("Spearman", "SmoothGrad") and first[1:].islower():
        title = title[0].lower() + title[1:]
    return f"{title} (implement)"


def instructor_table(root: Path | None = None, ref: str = ASSIGNMENT_REF) -> str:
    """The table of ``book/for_instructors.md``: per chapter, its exercises (the titles of its
    ``{exercise}`` boxes), the student time and the Colab link at ``ref``; the capstone last."""
    import nbformat

    root = _root(root)
    owner_repo = repository_url(root).removeprefix("https://github.com/")
    rows = ["| Chapter | Exercises | Time (student) | Student notebook |", "|---|---|---|---|"]
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        titles = [d[1] for c in nb.cells if c.cell_type == "markdown" and EXERCISE_TAG in _tags(c)
                  for d in [_directive(c.source)] if d and d[0] == "exercise"]  # fmt: skip
        if not titles:
            continue
        chapter = int(path.stem[:2])
        heading = next((l.lstrip("# ").strip() for c in nb.cells if c.cell_type == "markdown"
                        for l in c.source.split("\n") if l.startswith("# ")), path.stem)  # fmt: skip
        exercises = "; ".join(_exercise_kind(t) for t in titles)
        rows.append(f"| {chapter}. {heading} | {exercises} | {_MINUTES.get(chapter, 45)} min | "
                    f"[open in Colab]({colab_url(path.stem, root, ref)}) |")
    if (root / CAPSTONE).exists():
        rows.append(f"| {int(Path(CAPSTONE).stem[:2])}. Capstone | model and data randomization of a model and a captum method of the "
                    "student's choice, with a report | 3 to 4 hours | [open in Colab]"
                    f"({COLAB}/{owner_repo}/blob/{ref}/{CAPSTONE}) |")
    return "\n".join([_TABLE_START, *rows, _TABLE_END])


def pinned_links(root: Path | None = None, ref: str = ASSIGNMENT_REF, check: bool = False) -> list[Path]:
    """Make every Colab link (chapters, ``book/*.md``, README) and the capstone's install cell
    follow ``ref`` (text edits of the files, nothing else changes), and write the table of
    ``book/for_instructors.md`` (:func:`instructor_table`). Returns the files that were
    (``check=True``: that would be) changed; ``check`` raises ``SystemExit`` naming them."""
    root = _root(root)
    owner_repo = repository_url(root).removeprefix("https://github.com/")
    changed = []
    for path in _pinned_files(root):
        text = path.read_text()
        pinned = _pin_text(text, owner_repo, ref)
        if pinned != text:
            changed.append(path)
            if not check:
                path.write_text(pinned)
    page = root / "book" / "for_instructors.md"
    if page.exists():
        text = page.read_text()
        if _TABLE_START not in text or _TABLE_END not in text:
            raise ValueError(f"book/for_instructors.md: the markers {_TABLE_START} ... {_TABLE_END} are missing")
        head, rest = text.split(_TABLE_START, 1)
        new = head + instructor_table(root, ref) + rest.split(_TABLE_END, 1)[1]
        if new != text:
            if page not in changed:
                changed.append(page)
            if not check:
                page.write_text(new)
    capstone = root / CAPSTONE
    pinned = _pin_text(capstone.read_text(), owner_repo, ref) if capstone.exists() else ""
    if capstone.exists() and f'REF = \\"{ref}\\"' not in pinned:
        raise ValueError(f"{CAPSTONE}: its install cell must set REF = \"{ref}\" (the pin)")
    if check and changed:
        raise SystemExit(f"links not pinned to {ref!r} (run `make assignments`): "
                         + ", ".join(str(p.relative_to(root)) for p in changed))
    return changed


def generate(root: Path | None = None, out: Path | None = None, check: bool = False,
             ref: str = ASSIGNMENT_REF, solutions: bool = False) -> list[Path]:
    """Write (or with ``check=True`` compare) ``assignments/<chapter>.ipynb`` for every chapter
    notebook with exercises. Returns the paths; ``check`` raises ``SystemExit`` naming stale ones.
    ``solutions=True`` writes the answer keys instead (to ``out``, never to ``assignments/``)."""
    import nbformat

    root = _root(root)
    if solutions and out is None:
        raise ValueError("solutions=True needs out: answer keys never go to assignments/")
    out = Path(out) if out is not None else root / OUT_DIR
    repository = repository_url(root)
    written, stale = [], []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = student_notebook(nbformat.read(path, as_version=4), path.stem, repository, ref, solutions)
        if nb is None:
            continue
        target = out / path.name
        text = _dumps(nb)
        leaked = [l for l in solution_lines(nbformat.read(path, as_version=4)) if l in text]
        leaked += [m for m in ("BEGIN SOLUTION", "END SOLUTION", "# SOLUTION", "{solution") if m in text]
        if leaked and not solutions:
            raise ValueError(f"{path.name}: solution text would leak into the student notebook: {leaked[0]!r}")
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(target)
        else:
            out.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
        written.append(target)
    extra = sorted(set(out.glob("*.ipynb")) - set(written)) if out.exists() else []
    if check:
        stale += extra
    else:
        for path in extra:  # a chapter lost its exercises or was renamed
            path.unlink()
    if check and stale:
        raise SystemExit("stale student notebooks (run `make assignments`): "
                         + ", ".join(str(p.relative_to(root)) for p in stale))
    return written


#: Points of each checked exercise in the otter export (public check + hidden variations).
OTTER_POINTS = {"public": 1, "hidden": 1}

_OTTER_README = """# otter-grader package: {stem}

Generated by `python -m sanitylib.book.assignments --otter DIR` from `notebooks/{stem}.ipynb`
at the pin `{ref}`. Keep this folder private: `tests/` holds hidden tests (variations the
students never see).

- `tests/<exercise>.py`: exception-based otter tests (`OK_FORMAT = False`). The public case runs
  the check of `sanitylib.exercises` on the student's own `variation` (the one their notebook
  shows, from their student id), {public} point(s); each hidden case runs it on a variation drawn
  from the export's hidden seed, {hidden} point(s) each. Points: {points}.
- `requirements.txt`: what the grading image installs (sanitylib at the pin; torch comes with it).
- `{stem}.ipynb`: the student notebook the tests belong to.

Steps (otter-grader 7; `pip install otter-grader` where you grade, it is not a dependency):

```bash
cd {stem}
otter generate -t tests -r requirements.txt              # writes autograder.zip
otter run -a autograder.zip submission.ipynb -o results  # grade one submission locally, no Docker
# a class: otter run -a autograder.zip submissions/ -o results  (or upload autograder.zip to Gradescope)
```

A failing check does not stop the grading: otter executes every cell (errors included) and then
runs each test on its own, so a wrong or missing answer loses only its own points. The check
cells of the student notebook carry the `raises-exception` tag, so a re-run with papermill or
`jupyter nbconvert --execute` goes on past them as well.
"""


def otter_tests(root: Path | None = None, out: Path | None = None, hidden: int = 2,
                hidden_seed: int = 1, ref: str = ASSIGNMENT_REF) -> list[Path]:
    """Per-chapter otter-grader folders ``out/<chapter>/`` (see the README each gets): exception-based
    test files (``OK_FORMAT = False``), one per check of the chapter, calling the same
    :mod:`sanitylib.exercises` check on the student's function with the student's ``variation``
    (public) and with ``hidden`` variations drawn from ``hidden_seed`` (hidden cases); the
    requirements of the grading image (sanitylib at ``ref``); the student notebook; a README.
    Returns the test files. For instructors who grade with otter; otter-grader is not a dependency."""
    import nbformat

    if not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"hidden must be a non-negative int, got {hidden!r}")
    from ..exercises import variation

    root = _root(root)
    out = Path(out) if out is not None else root / "otter-tests"
    repository = repository_url(root)
    paths = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        chapter_nb = nbformat.read(path, as_version=4)
        calls = [m for cell in chapter_nb.cells if CHECK_TAG in _tags(cell)
                 for m in _CHECK_CALL.findall(cell.source)]  # fmt: skip
        if not calls:
            continue
        folder = out / path.stem
        (folder / "tests").mkdir(parents=True, exist_ok=True)
        for name, var in calls:
            cases = [f"@test_case(points={OTTER_POINTS['public']}, hidden=False)\n"
                     f"def test_{name}_your_variation({var}, variation):\n"
                     "    from sanitylib import exercises\n"
                     f"    exercises.check_{name}({var}, variation=variation)  # AssertionError when wrong\n"]
            for i in range(hidden):  # variations no student id gives (seeds from 10,000 up)
                v = variation(f"hidden {hidden_seed} {path.stem} {name} {i}")
                seed, photos = v.seed + 10_000, v.photos
                cases.append(f"@test_case(points={OTTER_POINTS['hidden']}, hidden=True)\n"
                             f"def test_{name}_hidden_{i + 1}({var}):\n"
                             "    from sanitylib import exercises\n"
                             f"    v = exercises.Variation(seed={seed}, photos={photos!r})\n"
                             f"    exercises.check_{name}({var}, variation=v)\n")
            target = folder / "tests" / f"{name}.py"
            target.write_text("from otter.test_files import test_case\n\nOK_FORMAT = False\n\n"
                              f"name = {name!r}\n\n\n" + "\n\n".join(cases))
            paths.append(target)
        (folder / "requirements.txt").write_text(f"sanitylib @ git+{repository}@{ref}\n")
        nb = student_notebook(chapter_nb, path.stem, repository, ref)
        (folder / path.name).write_text(_dumps(nb))
        points = len(calls) * (OTTER_POINTS["public"] + hidden * OTTER_POINTS["hidden"])
        (folder / "README.md").write_text(_OTTER_README.format(
            stem=path.stem, ref=ref, public=OTTER_POINTS["public"], hidden=OTTER_POINTS["hidden"],
            points=f"{points} ({len(calls)} exercise(s) × {OTTER_POINTS['public'] + hidden * OTTER_POINTS['hidden']})"))
    return paths


#: captum attribution classes the capstone offers: each is built from the model alone
#: (``Class(model)``), which is what ``sanitylib.register_method`` wraps.
CAPSTONE_METHODS = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop",
                    "Deconvolution", "DeepLift")


def capstone_method(method: str) -> tuple[str, object]:
    """Resolve the capstone's ``method`` parameter before any work: ``"captum.attr.<Class>"``
    or a registered method name. Returns ``(module, class)`` for a captum class (``(name, None)``
    for a registered name). A captum class that needs more than the model (e.g. ``GuidedGradCam``,
    which needs a layer) or an unknown name raises ``ValueError`` listing the supported choices."""
    import importlib
    import inspect

    from .. import registry

    choices = ", ".join(f'"captum.attr.{c}"' for c in CAPSTONE_METHODS)
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a string, e.g. one of {choices}; got {method!r}")
    if not method.startswith("captum."):
        if method in registry.method_names():
            return method, None
        raise ValueError(f"method {method!r} is neither a captum class nor a registered method; "
                         f"choose one of {choices} or a registered name ({', '.join(registry.method_names())})")
    module, _, cls_name = method.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"method {method!r}: no such captum class; choose one of {choices}") from None
    def required(fn, skip):
        return [p.name for p in list(inspect.signature(fn).parameters.values())[skip:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    if not isinstance(cls, type) or not hasattr(cls, "attribute"):
        raise ValueError(f"method {method!r} is not a captum attribution class; choose one of {choices}")
    needs = required(cls.__init__, 2) + required(cls.attribute, 2)  # after (self, model) / (self, inputs)
    if needs:
        raise ValueError(f"method {method!r}: captum.{cls_name} needs more than the model "
                         f"({', '.join(needs)}), so it cannot be chosen here; "
                         f"choose one of {choices}")
    return module, cls


def interval_table(df, level: float = 0.95):
    """Per stage, method and metric of a runner's table: the mean over images, the sample
    standard deviation (``ddof=1``), ``n`` and the Student-t interval
    ``mean ± t_{n-1} s / sqrt(n)`` at ``level`` (with 4 images t is 3.18, not 1.96). Columns
    ``stage, method, metric, mean, sd, n, low, high``; ``low``/``high`` are NaN for n < 2."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    g = df.groupby(["stage_index", "stage", "method", "metric"], sort=True)["value"]
    out = g.agg(mean="mean", sd=lambda v: float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                n="count").reset_index()
    t = np.array([stats.t.ppf(0.5 + level / 2, n - 1) if n > 1 else np.nan for n in out["n"]])
    half = t * out["sd"].to_numpy() / np.sqrt(out["n"].to_numpy())
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return pd.DataFrame(out.drop(columns="stage_index"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sanitylib.book.assignments",
                                     description="Write the student notebooks assignments/*.ipynb and "
                                                 "pin every Colab link and install line to ASSIGNMENT_REF.")
    parser.add_argument("--root", default=".", help="repository root (default: .)")
    parser.add_argument("--check", action="store_true",
                        help="only check that assignments/ and the pinned links are up to date")
    parser.add_argument("--otter", metavar="DIR", help="also write one otter-grader folder per chapter to DIR")
    parser.add_argument("--hidden", type=int, default=2, help="hidden variations per check (--otter; default 2)")
    parser.add_argument("--hidden-seed", type=int, default=1,
                        help="draws the hidden variations (--otter; keep yours private; default 1)")
    parser.add_argument("--key", metavar="DIR", help="also write the answer keys (solutions filled in) to DIR")
    args = parser.parse_args(argv)
    root = Path(args.root)
    links = pinned_links(root, check=args.check)
    paths = generate(root, check=args.check)
    print(json.dumps({"assignments": [p.name for p in paths], "ref": ASSIGNMENT_REF,
                      "checked" if args.check else "written": len(paths),
                      "links updated": [str(p.relative_to(root)) for p in links]}))  # fmt: skip
    if args.key:
        print(f"answer keys: {len(generate(root, out=Path(args.key), solutions=True))} in {args.key}")
    if args.otter:
        tests = otter_tests(root, Path(args.otter), hidden=args.hidden, hidden_seed=args.hidden_seed)
        print(f"otter: {len(tests)} test files in {len({p.parent.parent for p in tests})} chapter folders "
              f"under {args.otter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
