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

The output is deterministic (byte-identical on regeneration). ``--otter DIR`` also writes
exception-based otter-grader test files that call the same checks (:mod:`sanitylib.exercises`);
otter-grader is not a dependency.

Run from the repository root::

    python -m sanitylib.book.assignments            # write assignments/
    python -m sanitylib.book.assignments --check    # fail if assignments/ is not up to date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = ["ASSIGNMENT_REF", "EXERCISE_TAG", "CHECK_TAG", "repository_url", "colab_url",
           "student_notebook", "solution_lines", "generate", "otter_tests", "main"]  # fmt: skip

#: The branch or tag that students install and that the Colab links open: the ONE place to pin a
#: course to a release (e.g. ``"v1.0"``) for a semester.
ASSIGNMENT_REF = "main"
#: Tag of every cell of a chapter's Exercises section; check cells also carry :data:`CHECK_TAG`.
EXERCISE_TAG = "exercise"
CHECK_TAG = "exercise-check"
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


def _stub(src: str, number: str) -> str:
    """Solution code with every marked region replaced by a stub."""
    out, skipping = [], False
    for line in src.split("\n"):
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
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


def student_notebook(chapter_nb, stem: str, repository: str, ref: str = ASSIGNMENT_REF):
    """The student version (an ``nbformat`` notebook) of one chapter notebook."""
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
        "run the check cell below it (it prints PASS, or what is wrong with a hint). The notebook "
        "runs on a CPU runtime. To hand in: **File → Download → .ipynb**.\n\n"
        f"*Generated from `notebooks/{stem}.ipynb` by `make assignments`: do not edit by hand.*")]
    cells.append(v4.new_code_cell(_install_cell(repository, ref)))
    params = [c for c in chapter_nb.cells if c.cell_type == "code" and "parameters" in _tags(c)]
    if len(params) != 1:
        raise ValueError(f"{stem}: expected one cell tagged 'parameters', found {len(params)}")
    p = v4.new_code_cell(re.sub(r'^profile = "\w+"', 'profile = "smoke"', params[0].source, flags=re.M))
    p.metadata["tags"] = ["parameters"]
    cells.append(p)
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
            cells.append(v4.new_markdown_cell(f"**Your answer (Exercise {number}):**\n\n..."))
        elif inside:
            if cell.cell_type == "code" and _has_markers(cell.source):
                cells.append(v4.new_code_cell(_stub(cell.source, number)))
        elif cell.cell_type == "markdown" and cell.source.startswith("## Exercises"):
            cells.append(v4.new_markdown_cell(  # the book's intro speaks of solutions: replaced
                "## Exercises\n\nEach exercise runs on its own in seconds; run the set-up cell below first."))
        elif cell.cell_type == "markdown":
            cells.append(v4.new_markdown_cell(_plain(cell.source)))
        else:  # set-up and check cells; marked lines are stubbed here too (an author's slip)
            c = v4.new_code_cell(_stub(cell.source, number) if _has_markers(cell.source) else cell.source)
            if CHECK_TAG in _tags(cell):
                c.metadata["tags"] = [CHECK_TAG]
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


def generate(root: Path | None = None, out: Path | None = None, check: bool = False,
             ref: str = ASSIGNMENT_REF) -> list[Path]:
    """Write (or with ``check=True`` compare) ``assignments/<chapter>.ipynb`` for every chapter
    notebook with exercises. Returns the paths; ``check`` raises ``SystemExit`` naming stale ones."""
    import nbformat

    root = _root(root)
    out = Path(out) if out is not None else root / OUT_DIR
    repository = repository_url(root)
    written, stale = [], []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = student_notebook(nbformat.read(path, as_version=4), path.stem, repository, ref)
        if nb is None:
            continue
        target = out / path.name
        text = _dumps(nb)
        leaked = [l for l in solution_lines(nbformat.read(path, as_version=4)) if l in text]
        leaked += [m for m in ("BEGIN SOLUTION", "END SOLUTION", "# SOLUTION", "{solution") if m in text]
        if leaked:
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


def otter_tests(root: Path | None = None, out: Path | None = None) -> list[Path]:
    """Exception-based otter-grader test files (``OK_FORMAT = False``), one per check cell of
    the chapters, each calling the same :mod:`sanitylib.exercises` check on the student's
    function. For instructors who grade on Gradescope; otter-grader is not a dependency."""
    import nbformat

    root = _root(root)
    out = Path(out) if out is not None else root / "otter-tests"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if CHECK_TAG not in _tags(cell):
                continue
            for name, var in _CHECK_CALL.findall(cell.source):
                target = out / f"{name}.py"
                target.write_text(
                    "from otter.test_files import test_case\n\n"
                    "OK_FORMAT = False\n\n"
                    f"name = {name!r}\npoints = 1\n\n\n"
                    "@test_case(points=1, hidden=False)\n"
                    f"def test_{name}({var}):\n"
                    "    from sanitylib import exercises\n"
                    f"    exercises.check_{name}({var})  # raises AssertionError when wrong\n")
                paths.append(target)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sanitylib.book.assignments",
                                     description="Write the student notebooks assignments/*.ipynb.")
    parser.add_argument("--root", default=".", help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="only check that assignments/ is up to date")
    parser.add_argument("--otter", metavar="DIR", help="also write otter-grader test files to DIR")
    args = parser.parse_args(argv)
    paths = generate(Path(args.root), check=args.check)
    print(json.dumps({"assignments": [p.name for p in paths], "ref": ASSIGNMENT_REF,
                      "checked" if args.check else "written": len(paths)}))  # fmt: skip
    if args.otter:
        print(f"otter tests: {len(otter_tests(Path(args.root), Path(args.otter)))} in {args.otter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
