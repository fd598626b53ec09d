"""Shared test set-up: a private result cache and a bounded thread count."""
import os

import pytest
import torch

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


if not torch.cuda.is_available():
    collect_ignore = ["test_gpu.py"]
