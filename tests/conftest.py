"""Shared test set-up: a private result cache and a bounded thread count; the chapters executed
once per session (``executed``) and the book built strictly from them (``built_book``), shared by
tests/test_notebooks.py and tests/test_site.py."""
import os
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read when torch loads its OpenMP runtime, so set
# before the import; inherited by every subprocess and kernel of the session).  The tests that
# compute with the 2 threads their recordings were made with (tests/test_regression_tables.py,
# the bench test's subprocess) run next to the other pytest-xdist worker: with spinning threads
# that oversubscription made them 5-8x slower (measured: the bench_captum_task case 44.6 s with
# one core busy vs 5.7 s idle; with PASSIVE 10.0 s busy, 6.2 s idle).  The numbers are the same:
# the wait policy is not the arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs two workers, see the Makefile) each worker computes with
# one thread, so that the two workers share the machine's cores instead of oversubscribing them.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if XDIST_WORKER else min(2, os.cpu_count() or 1))

#: The fixtures of the package-only environment: the tests that use them run on one xdist worker
#: (``--dist loadgroup``): the session fixtures (the clean venv, the chapters executed once, the
#: book built once) are then built once, and the clean venv's lock is never waited for by a second
#: worker.  tests/test_site.py asks for ``built_book`` at run time, so its module is named here.
CLEAN_ENV_FIXTURES = {"clean_python", "executed", "built_book"}


#: ``--timeline=PATH``: the file and the start time (set in the process that sees every report).
#: Written with "=": in ``--timeline PATH`` pytest takes PATH for a test path before it reads this
#: file, and refuses the option.
_TIMELINE: dict = {}


def pytest_addoption(parser):
    parser.addoption("--timeline", metavar="PATH", default=None,
                     help="write when each test ended (seconds from the start), on which xdist "
                          "worker, and its id to PATH (tab-separated): how the suite's schedule "
                          "spreads over the workers")  # fmt: skip


def pytest_runtest_logreport(report):
    """With ``--timeline``: one line per test, written by the xdist controller (or the only
    process without xdist), which receives every worker's reports."""
    if not _TIMELINE or report.when != "teardown":
        return
    node = getattr(report, "node", None)  # the worker that ran it, under xdist
    worker = node.gateway.id if node is not None else "main"
    with open(_TIMELINE["path"], "a") as f:
        f.write(f"{time.perf_counter() - _TIMELINE['t0']:.1f}\t{worker}\t{report.nodeid}\n")


def pytest_configure(config):
    """With pytest-xdist, the clean-environment tests must share one worker (its venv's lock is
    held for the whole session): refuse ``-n`` without ``--dist loadgroup`` instead of hanging."""
    if config.getoption("timeline") and not XDIST_WORKER:
        Path(config.getoption("timeline")).write_text("")
        _TIMELINE.update(path=config.getoption("timeline"), t0=time.perf_counter())
    workers = config.getoption("numprocesses", None) if config.pluginmanager.hasplugin("xdist") else None
    if workers and not XDIST_WORKER and config.getoption("dist", "no") != "loadgroup":
        raise pytest.UsageError("tests/conftest.py: run pytest-xdist with --dist loadgroup "
                                f"(got -n {workers} with --dist {config.getoption('dist')}): the "
                                "clean-environment tests must run on one worker, as `make test` does")
    if workers and hasattr(config.option, "loadscopereorder"):
        # pytest-xdist's default (--loadscope-reorder) hands the groups out by their number of
        # tests, most first: the clean-environment chain (29 tests, about 500 s) then started
        # 11th and test_replication_mnist (4 tests, about 150 s) next to last, leaving one
        # worker alone for the last minutes.  Keep the order of pytest_collection_modifyitems
        # (longest first), which is measured in seconds, not tests.
        config.option.loadscopereorder = False
    if workers and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(f"tests/conftest.py: pytest {pytest.__version__} ignores pytest-xdist's "
                                "groups (--dist loadgroup); install the test extra (pytest<9) or run "
                                "without -n")


#: Modules whose tests take longest (measured with ``--durations``, longest first): under xdist
#: they are handed out first, so that no long module starts last and leaves one worker idle.
LONGEST_MODULES = ("test_replication_mnist", "test_vit", "test_bench_sanity", "test_cli",
                   "test_cache_validation", "test_training", "test_regression_tables",
                   "test_exercises", "test_experiment", "test_bench_paper_profile",
                   "test_chapter_layer", "test_data", "test_commands", "test_attribution",
                   "test_sensitivity", "test_memory_format", "test_engine")  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Group the clean-environment tests (see :data:`CLEAN_ENV_FIXTURES`) and put them first:
    they are the longest chain of the suite (every chapter, the book build, the browser test),
    so under xdist one worker starts them at once while the other takes the rest.  Every other
    test is grouped with its module (one worker per module: a module-scoped fixture, such as
    the trained models of tests/test_replication_mnist.py, is then computed once, not once per
    worker), the longest modules (:data:`LONGEST_MODULES`) first."""
    grouped, rest = [], []
    for item in items:
        if CLEAN_ENV_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ == "test_site":
            item.add_marker(pytest.mark.xdist_group("clean_env"))
            grouped.append(item)
        else:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
            rest.append(item)
    if XDIST_WORKER or config.getoption("numprocesses", None):
        rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
        rest.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable
        items[:] = grouped + rest


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


@pytest.fixture(scope="module")
def book_allocator():
    """The book build's opt-in for a module (``SANITYLIB_KEEP_FREED_MEMORY=1``, see
    sanitylib.allocator): the same weights bit for bit (tests/test_training.py) and the same
    maps (tests/test_engine.py), training about 8 % sooner.  Use it with
    ``pytestmark = pytest.mark.usefixtures("book_allocator")``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANITYLIB_KEEP_FREED_MEMORY", "1")
        yield


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


def _build_book_script():
    """scripts/build_book.py as a module: the tests execute and build the book as `make book`
    does (one home for both)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def executed(clean_python, tmp_path_factory) -> dict[str, Path]:
    """Every chapter executed under papermill in the clean environment (smoke profile), two at a
    time as `make book` does (scripts/build_book.py)."""
    from clean_env import KERNEL, _clean_env

    script = _build_book_script()
    out_dir = tmp_path_factory.mktemp("executed")
    return script.execute(script.chapters(), out_dir, python=clean_python, kernel=KERNEL,
                          env=_clean_env(), parameters={"profile": "smoke"})


@pytest.fixture(scope="session")
def built_book(executed, tmp_path_factory) -> Path:
    """The book's HTML folder, built strictly (``jupyter-book build -W -n --keep-going``, the
    flags of ``make book``) from the smoke-executed chapters, with the repository's _config.yml,
    _toc.yml and book/ pages (scripts/build_book.py, as `make book`).  A build that fails or
    warns fails every test that uses it, with the end of the build log."""
    script = _build_book_script()
    base = tmp_path_factory.mktemp("book")
    try:
        return script.build(executed, base / "src", base)
    except RuntimeError as err:
        pytest.fail(str(err))


if not torch.cuda.is_available():
    collect_ignore = ["test_gpu.py"]
