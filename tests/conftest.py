"""Shared test set-up: a private result cache and a bounded thread count; the chapters executed
once per session (``executed``) and the book built strictly from them (``built_book``), shared by
tests/test_notebooks.py and tests/test_site.py."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session uses its own sanitylib cache (also inherited by notebook kernels)."""
    old = os.environ.get("SANITYLIB_CACHE")
    os.environ["SANITYLIB_CACHE"] = str(tmp_path_factory.mktemp("sanitylib-cache"))
    yield
    if old is None:
        os.environ.pop("SANITYLIB_CACHE", None)
    else:
        os.environ["SANITYLIB_CACHE"] = old


@pytest.fixture(scope="session")
def effnet():
    """The real EfficientNet-Lite0 with its shipped ImageNet weights (shared, read-only use)."""
    from sanitylib.models import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory):
    """The Python of the package-only environment (``.venv-clean``) with this working tree's
    sanitylib installed (see ``clean_env.py``); one instance per session, for every module."""
    from clean_env import clean_python_env

    yield from clean_python_env(tmp_path_factory)


@pytest.fixture(scope="session")
def executed(clean_python, tmp_path_factory) -> dict[str, Path]:
    """Every chapter executed under papermill in the clean environment (smoke profile)."""
    from clean_env import KERNEL, _clean_env, _run

    out_dir = tmp_path_factory.mktemp("executed")
    done = {}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        target = out_dir / nb.name
        t0 = time.perf_counter()
        _run([clean_python, "-m", "papermill", nb, target, "-p", "profile", "smoke",
              "-k", KERNEL, "--cwd", out_dir, "--no-progress-bar", "--execution-timeout", "900"],
             env=_clean_env(), cwd=out_dir)  # fmt: skip
        print(f"{nb.stem}: {time.perf_counter() - t0:.0f} s in the clean environment")
        done[nb.stem] = target
    return done


@pytest.fixture(scope="session")
def built_book(executed, tmp_path_factory) -> Path:
    """The book's HTML folder, built strictly (``jupyter-book build -W -n --keep-going``, the
    flags of ``make book``) from the smoke-executed chapters (``execute_notebooks: off``), with
    the repository's _config.yml, _toc.yml and book/ pages.  A build that fails or warns fails
    every test that uses it, with the end of the build log."""
    import yaml

    book = tmp_path_factory.mktemp("book_src")
    shutil.copytree(ROOT / "book", book / "book")
    (book / "notebooks").mkdir()
    for stem, path in executed.items():
        shutil.copy(path, book / "notebooks" / f"{stem}.ipynb")
    shutil.copy(ROOT / "_toc.yml", book / "_toc.yml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # already executed by papermill
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    jb = Path(sys.executable).with_name("jupyter-book")
    res = subprocess.run([str(jb), "build", str(book), "-W", "-n", "--keep-going"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    html = book / "_build" / "html"
    assert (html / "index.html").exists()
    return html


if not torch.cuda.is_available():
    collect_ignore = ["test_gpu.py"]
