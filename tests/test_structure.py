"""The library's shape (issue "One run specification"): one home per concept, short signatures
for internal functions, modules of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sanitylib"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _functions(tree):
    """``(qualified name, node)`` of every function, methods named ``Class.method``."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{prefix}{child.name}", child))
                visit(child, f"{prefix}{child.name}.<locals>.")

    visit(tree, "")
    return out


def _n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (1 if names and names[0] in ("self", "cls") else 0)


def _internal(qualname: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in qualname.split("."))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_internal_functions_take_at_most_ten_parameters(path):
    tree = ast.parse(path.read_text())
    long = [f"{name} ({_n_params(fn)})" for name, fn in _functions(tree)
            if _internal(name) and _n_params(fn) > 10]  # fmt: skip
    assert not long, f"internal functions with more than 10 parameters: {long}"


def test_module_sizes():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in MODULES}
    assert sizes["experiment.py"] < 600
    assert max(sizes.values()) <= 850, {k: v for k, v in sizes.items() if v > 850}


def test_one_home_for_the_run_specification_and_the_cache():
    """Validation of a run's arguments lives in spec.py, code identity and cache files in
    cache.py; the runner holds neither."""
    experiment = (PACKAGE / "experiment.py").read_text()
    for name in ("class _Identifier", "class GroupFiles", "def _check_arguments", "def config_key"):
        assert name not in experiment
    assert "class _Identifier" in (PACKAGE / "cache.py").read_text()
    assert "class RunSpec" in (PACKAGE / "spec.py").read_text()
