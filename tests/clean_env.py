"""The package-only environment in which the chapters and the student notebooks run
(``.venv-clean/``, gitignored): what a Colab user or a student with plain Jupyter has.

One home for it: the ``clean_python`` fixture is defined once, in ``conftest.py`` (a fixture
imported into two test modules would be two session fixtures, and the second would wait forever
for the first one's lock)."""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ROOT / ".venv-clean"
KERNEL = "sanitylib-clean"
TOOLS = ("papermill", "ipykernel")  # all the clean environment gets besides the package
ABSENT = ("myst_nb", "jupyter_book", "pytest")  # the book's and the tests' extras


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}")  # fmt: skip
    return res


def _clean_env() -> dict:
    """The environment of every command run in the clean venv: nothing that points back at the
    repository or the main venv."""
    # PYTHONDONTWRITEBYTECODE: the venv is installed without compiling (pip's compileall of
    # torch and its dependencies is ~35 s of a ~90 s build on 2 cores); its kernels write the
    # bytecode of what they import instead, once (the first import of sanitylib ~6 s longer).
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "JUPYTER_PATH",
            "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["VIRTUAL_ENV"] = str(CLEAN)
    env["PATH"] = os.pathsep.join([str(CLEAN / "bin"), env.get("PATH", "")])
    env["PYTHONNOUSERSITE"] = "1"
    env["SANITYLIB_KEEP_FREED_MEMORY"] = "1"  # the chapters' kernels opt in, as `make book` does
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _snapshot(dst: Path) -> Path:
    """The files a clone of the working tree would have (tracked and untracked, not ignored)."""
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=ROOT).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _key() -> str:
    """What the installed dependencies depend on: pyproject.toml, the tools and the Python."""
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + " ".join(TOOLS).encode()
                          + sys.version.encode()).hexdigest()  # fmt: skip


def _build(src: Path, env: dict) -> None:
    """A new clean venv with ``src`` (a snapshot of the working tree), its dependencies and the
    tools installed, and its Jupyter kernel."""
    py = CLEAN / "bin" / "python"
    shutil.rmtree(CLEAN, ignore_errors=True)
    _run([sys.executable, "-m", "venv", CLEAN], env=env)
    _run([py, "-m", "pip", "install", "-q", "--no-compile", src, *TOOLS], env=env)
    _run([py, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL,
          "--display-name", "sanitylib (clean)"], env=env)  # fmt: skip
    (CLEAN / ".deps-stamp").write_text(_key())


def _current() -> bool:
    stamp = CLEAN / ".deps-stamp"
    return (CLEAN / "bin" / "python").exists() and stamp.exists() and stamp.read_text() == _key()


def clean_python_env(tmp_path_factory):
    """The Python of the clean environment, with this working tree's sanitylib installed."""
    t0 = time.perf_counter()
    CLEAN.parent.mkdir(exist_ok=True)
    with open(ROOT / ".venv-clean.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test session at a time builds or uses it
        py = CLEAN / "bin" / "python"
        src = _snapshot(tmp_path_factory.mktemp("sanitylib-src"))
        env = _clean_env()
        if _current():
            _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", src], env=env)
        else:
            _build(src, env)
        print(f"\nclean environment ready in {time.perf_counter() - t0:.0f} s")
        yield py


def main() -> int:
    """``python tests/clean_env.py``: build the clean environment now, where it is missing or out
    of date, outside pytest (stdlib only, any Python of the venv's version).  `make test` runs it
    next to the main venv's install: both are mostly one pip process on one core, so on two
    cores the clean venv is ready when pytest starts, and the tests' fixture then only reinstalls
    the working tree's sanitylib into it."""
    import tempfile

    t0 = time.perf_counter()
    with open(ROOT / ".venv-clean.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current():
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            _build(_snapshot(Path(tmp)), _clean_env())
    print(f"clean environment (.venv-clean) built in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
