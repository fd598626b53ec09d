"""Build the book: execute every chapter (several at a time), then build the HTML strictly.

``make book`` runs this script; the test suite uses the same two steps (``tests/conftest.py``:
the ``executed`` and ``built_book`` fixtures), so the book a reader gets and the book the tests
check are made the same way.

1. **Execute**: every notebook of ``notebooks/`` runs top to bottom under papermill, ``--jobs``
   of them at a time (default: 2, or 1 on a 1-core machine), each kernel with an equal share of
   the machine's cores (``OMP_NUM_THREADS``, unless already set).  The longest chapters start
   first (their times from the previous build, ``_build/chapter_times.json``, when there is one).
   On a 2-core machine two chapters with one thread each finish sooner than one after the other
   with two threads: much of a chapter's time (training loops on small MNIST batches, the
   metrics, plotting) does not use a second thread.  A chapter that fails stops the build with
   the end of its log; no HTML is written from a partial run.
2. **Build**: the executed notebooks and the book's pages are staged in ``_build/src`` (the
   chapters keep their paths, so every link and Colab button is unchanged) and
   ``jupyter-book build -W -n --keep-going`` turns them into ``_build/html`` with execution
   off: any warning, broken reference or unresolved citation fails the build.

Papermill records when each chapter ran and for how long in the notebook; the book's
execution-statistics page (``book/execution_statistics.md``) shows it.

Usage::

    python scripts/build_book.py [--jobs N] [--profile smoke|book|paper] [--only 02 05 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMES = "chapter_times.json"


class ChapterFailed(RuntimeError):
    """A chapter raised (the message ends with the end of its papermill log)."""


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def chapters(only: list[str] | None = None) -> list[Path]:
    """The chapters of ``notebooks/`` (all, or those whose name starts with one of ``only``)."""
    found = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if only:
        unknown = [o for o in only if not any(nb.name.startswith(o) for nb in found)]
        if unknown:
            raise SystemExit(f"--only: no chapter starts with {unknown}; chapters: "
                             f"{[nb.stem for nb in found]}")
        found = [nb for nb in found if any(nb.name.startswith(o) for o in only)]
    return found


def _order(notebooks: list[Path], times_file: Path | None) -> list[Path]:
    """Longest first (known times from the last build), unknown ones first of all."""
    known = {}
    if times_file is not None and times_file.exists():
        try:
            known = {k: float(v) for k, v in json.loads(times_file.read_text()).items()}
        except (ValueError, TypeError, AttributeError):
            known = {}
    return sorted(notebooks, key=lambda nb: -known.get(nb.stem, float("inf")))


def execute(notebooks: list[Path], out_dir: Path, *, jobs: int | None = None,
            python: str | Path = sys.executable, kernel: str = "python3",
            env: dict | None = None, parameters: dict | None = None,
            times_file: Path | None = None, log=print) -> dict[str, Path]:
    """Run each notebook under papermill into ``out_dir/<name>.ipynb``, ``jobs`` at a time.

    Args:
        notebooks: the chapters to run.
        out_dir: where the executed notebooks go (the kernels' working directory too).
        jobs: how many run at once (default :func:`default_jobs`).
        python, kernel: the interpreter that runs papermill and the kernel it starts.
        env: the kernels' environment (default: this process's).
        parameters: papermill parameters (e.g. ``{"profile": "smoke"}``).
        times_file: where to read the previous times from and write this run's.

    Returns:
        ``{stem: executed notebook path}`` in the order of ``notebooks``.

    Raises:
        ChapterFailed: the first chapter that failed (the others are stopped).
    """
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    params = [a for k, v in (parameters or {}).items() for a in ("-p", k, str(v))]
    procs: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    times: dict[str, float] = {}

    def run(nb: Path) -> None:
        if stopping.is_set():
            return
        target = out_dir / nb.name
        log_path = out_dir / f"{nb.stem}.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as logf:
            p = subprocess.Popen([str(python), "-m", "papermill", str(nb), str(target), *params,
                                  "-k", kernel, "--cwd", str(out_dir), "--no-progress-bar"],
                                 stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=out_dir)
            procs[nb.stem] = p
            code = p.wait()
        times[nb.stem] = time.perf_counter() - t0
        if code != 0:
            if stopping.is_set():
                return
            stopping.set()
            raise ChapterFailed(f"{nb.name} failed (exit {code}); end of its log {log_path}:\n"
                                + log_path.read_text()[-6000:])
        log(f"{nb.stem}: {times[nb.stem]:.0f} s")

    order = _order(notebooks, times_file)
    log(f"executing {len(order)} chapters, {jobs} at a time, "
        f"{env['OMP_NUM_THREADS']} thread(s) each")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, nb) for nb in order]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stopping.set()
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            for f in futures:
                f.cancel()
            raise failed[0].exception()
    if times_file is not None:
        times_file.write_text(json.dumps({k: round(v, 1) for k, v in sorted(times.items())}))
    return {nb.stem: out_dir / nb.name for nb in notebooks}


def build(executed: dict[str, Path], src: Path, path_output: Path, *,
          jupyter_book: Path | None = None, timeout: float = 1800) -> Path:
    """Stage the book's pages and the executed chapters in ``src`` and build
    ``path_output/_build/html`` strictly (``-W -n --keep-going``, execution off).

    Returns:
        The HTML folder.

    Raises:
        RuntimeError: the build failed or warned (with the end of its log).
    """
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT / "book", src / "book")
    (src / "notebooks").mkdir()
    for stem, path in executed.items():
        shutil.copy(path, src / "notebooks" / f"{stem}.ipynb")
    shutil.copy(ROOT / "_toc.yml", src / "_toc.yml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # executed above
    (src / "_config.yml").write_text(yaml.safe_dump(config))
    out = path_output / "_build"
    for stale in (out / "html", out / ".doctrees", out / "jupyter_execute"):
        shutil.rmtree(stale, ignore_errors=True)  # a stale environment can hide warnings
    jb = jupyter_book or Path(sys.executable).with_name("jupyter-book")
    res = subprocess.run([str(jb), "build", str(src), "--path-output", str(path_output), "-W",
                          "-n", "--keep-going"], capture_output=True, text=True, timeout=timeout)
    html = out / "html"
    if res.returncode != 0 or not (html / "index.html").exists():
        raise RuntimeError(f"jupyter-book build failed ({res.returncode}):\n"
                           + res.stdout[-4000:] + res.stderr[-4000:])
    return html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"chapters executed at once (default {default_jobs()})")
    ap.add_argument("--profile", choices=("smoke", "book", "paper"), default=None,
                    help="override every chapter's profile (default: each chapter's own, book)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NN",
                    help="execute only these chapters (by number prefix); the others are built "
                         "from their last execution in _build/executed")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    out = ROOT / "_build"
    executed_dir = out / "executed"
    t0 = time.perf_counter()
    todo = chapters(args.only)
    params = {"profile": args.profile} if args.profile else None
    try:
        execute(todo, executed_dir, jobs=args.jobs, parameters=params,
                times_file=out / TIMES if not args.only else None)
    except ChapterFailed as err:
        print(err, file=sys.stderr)
        return 1
    executed = {nb.stem: executed_dir / nb.name for nb in chapters()}
    missing = [s for s, p in executed.items() if not p.exists()]
    if missing:
        print(f"not executed yet: {missing} (run without --only first)", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    print(f"chapters executed in {t1 - t0:.0f} s; building the HTML ...")
    try:
        html = build(executed, out / "src", ROOT)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"HTML built in {time.perf_counter() - t1:.0f} s (total {time.perf_counter() - t0:.0f} s)")
    print(f"Book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
