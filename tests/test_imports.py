"""The package's import graph: no cycles (lazy, function-level imports included), no module
importing back up to the package ``__init__``, and the core never importing the chapter layer
(``sanitylib.book``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sanitylib"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Modules of the package that ``name`` imports (anywhere in the file), with line numbers."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("sanitylib"):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("sanitylib")]
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_core_module_imports_the_package_root():
    """No core module imports from ``sanitylib`` itself (``from . import __version__`` in a
    submodule runs back up to the package's ``__init__``, which imports that submodule); the
    chapter layer, which the package never imports, may."""
    bad = [(m, line) for m, deps in GRAPH.items()
           if MODULES[m].name != "__init__.py" and not m.startswith("sanitylib.book")
           for d, line in deps if d == "sanitylib"]  # fmt: skip
    assert not bad, f"modules importing the package root: {bad}"


def test_import_graph_has_no_cycles():
    graph = {m: sorted({d for d, _ in deps if d in MODULES and d != m and not (
        MODULES[d].name == "__init__.py" and m.startswith(d + "."))}) for m, deps in GRAPH.items()
        if MODULES[m].name != "__init__.py"}  # fmt: skip
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


#: Entry points: the command line reads the chapter layer's run profiles (``--profile``).  They
#: are the top of the graph: no module of the package imports them (checked below).
ENTRY_POINTS = ("sanitylib.cli", "sanitylib.__main__")


def test_core_does_not_import_the_chapter_layer():
    bad = [(m, d, line) for m, deps in GRAPH.items()
           if not m.startswith("sanitylib.book") and m not in ENTRY_POINTS
           for d, line in deps if d.startswith("sanitylib.book")]  # fmt: skip
    assert not bad, f"core modules importing sanitylib.book: {bad}"


def test_nothing_imports_the_entry_points():
    bad = [(m, d, line) for m, deps in GRAPH.items() if m not in ENTRY_POINTS
           for d, line in deps if d in ENTRY_POINTS]  # fmt: skip
    assert not bad, f"modules importing the command-line entry points: {bad}"


@pytest.mark.skipif(not (ROOT / "book").exists(), reason="no chapter layer")
def test_importing_sanitylib_leaves_the_chapter_layer_unloaded():
    code = "import sys, sanitylib; print(sorted(m for m in sys.modules if m.startswith('sanitylib.book')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_sanitylib_leaves_torchvision_unloaded_until_inception_is_built():
    """torchvision (and the ``torch._dynamo`` it loads, ~1 s of every process) is imported when a
    model needs it; building Inception v3 still swaps in the ``nn.ReLU`` form of its blocks."""
    code = ("import sys, sanitylib as sl; before = 'torchvision' in sys.modules; "
            "m = sl.load_model('inception_v3', pretrained=False); "
            "from sanitylib.models import SanityBasicConv2d as S; "
            "print(before, isinstance(m.Conv2d_1a_3x3, S), type(m.Conv2d_1a_3x3.relu).__name__, "
            "S.__module__, S.__qualname__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "ReLU", "sanitylib.models", "SanityBasicConv2d"]
