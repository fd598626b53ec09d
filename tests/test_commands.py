"""Every command that README.md and book/how_to_run.md show exists where they say: the Makefile
targets, and the tools of the environment that `make book` / environment.yml create (JupyterLab
included). The non-interactive ones run here (cheaply: versions, dry runs, help)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", ROOT / "book" / "how_to_run.md", ROOT / "book" / "for_instructors.md"]


def shown_commands() -> list[tuple[str, str]]:
    """(document, command line) for every line of every ```bash block of the documents."""
    out = []
    for doc in DOCS:
        if not doc.exists():
            continue
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", doc.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    out.append((doc.name, line))
    return out


COMMANDS = shown_commands()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def test_the_documents_show_commands():
    assert any(c.startswith("make book") for _, c in COMMANDS)
    assert any("jupyter lab" in c for _, c in COMMANDS)


@pytest.mark.parametrize("doc,command", [c for c in COMMANDS if c[1].startswith("make ")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_make_targets_exist(doc, command):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    target = command.split()[1]
    _run(["make", "-n", target])  # dry run: the target and its recipe exist


def test_jupyterlab_is_installed_with_the_book_environment():
    """`jupyter lab notebooks/` (how_to_run, `make lab`): JupyterLab is in the `book` extra."""
    out = _run([str(BIN / "jupyter"), "lab", "--version"]).stdout.strip()
    assert re.match(r"4\.\d+", out), out
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("jupyterlab") for r in extras["book"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any("book" in p for p in pip)  # environment.yml installs the book extra, hence JupyterLab


def test_jupyter_book_and_papermill_commands():
    assert "Jupyter Book" in _run([str(BIN / "jupyter-book"), "--version"]).stdout
    for _, cmd in COMMANDS:
        if cmd.startswith("papermill --help-notebook"):
            _run([str(BIN / "papermill"), *cmd.split()[1:]])


def test_make_lab_registers_the_projects_kernel():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = _run(["make", "-n", "lab"]).stdout
    assert "ipykernel install" in dry and "jupyter lab notebooks/" in dry


def test_assignments_command_is_up_to_date():
    """`make assignments` (for_instructors): the committed student notebooks are current."""
    _run([sys.executable, "-m", "sanitylib.book.assignments", "--check"])
