"""sanitylib.allocator: freed CPU memory stays in the heap inside the context, goes back after."""

import ctypes
import os
import resource
import sys

import pytest
import torch

from sanitylib import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
MIB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]  # fmt: skip


def _mapped_bytes() -> int:
    """Bytes glibc currently serves from separate ``mmap`` regions (``mallinfo2().hblkhd``)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _touch(n: int, mib: int = 64) -> None:
    """Fill and free ``n`` tensors of ``mib`` MiB held at once."""
    ts = [torch.empty(mib * MIB // 4) for _ in range(n)]
    for t in ts:
        t.fill_(1.0)
    del ts


@pytest.fixture
def clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    for k in ("SANITYLIB_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)


def _check_freed_memory_stays_inside_and_is_returned_after() -> None:
    assert allocator.keeps_freed_memory()  # Linux with glibc: the project's machines
    with allocator.keep_freed_memory() as kept:
        assert kept
        with allocator.keep_freed_memory():  # re-entrant
            before = _mapped_bytes()
            t = torch.empty(48 * MIB // 4)  # above glibc's default mmap threshold (<= 32 MiB)
            assert _mapped_bytes() - before < 48 * MIB  # served from the heap, not mmap'ed
            del t
        assert allocator._depth == 1  # still on after the inner exit
        base = _rss()
        _touch(4)  # 256 MiB at once, freed: the pages stay in the process for the next pass
        assert _rss() - base > 150 * MIB
    assert allocator._depth == 0
    assert _rss() - base < 64 * MIB  # given back to the OS on exit (malloc_trim)


def test_freed_memory_stays_inside_and_is_returned_after(clean_env):
    """In a fresh process: the resident-memory figures must not depend on what earlier tests
    left in the heap (under pytest-xdist one worker runs many modules; it failed there once)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    code = "import test_allocator as T; T._check_freed_memory_stays_inside_and_is_returned_after()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.parametrize("env", [("SANITYLIB_KEEP_FREED_MEMORY", "0"),
                                 ("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                 ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                                 ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])  # fmt: skip
def test_user_settings_win(clean_env, monkeypatch, env):
    monkeypatch.setenv(*env)
    assert not allocator.keeps_freed_memory()
    with allocator.keep_freed_memory() as kept:
        assert not kept and allocator._depth == 0


class _FakeLibc:
    """Records mallopt/malloc_trim calls instead of changing the process's allocator."""

    def __init__(self):
        self.calls = []

    def mallopt(self, *args):
        self.calls.append(("mallopt", *args))
        return 1

    def malloc_trim(self, *args):
        self.calls.append(("malloc_trim", *args))
        return 1


def test_the_engine_leaves_the_allocator_alone_unless_opted_in(clean_env, monkeypatch):
    """A library changes no process-global state by default: a run of the engine makes no
    mallopt call; with SANITYLIB_KEEP_FREED_MEMORY=1 (or inside keep_freed_memory()) it sets
    the thresholds and sets them back."""
    import sanitylib as sl

    fake = _FakeLibc()
    monkeypatch.setattr(allocator, "_libc", fake)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 14 * 14, 3)).eval()  # fmt: skip
    x = torch.rand(2, 1, 16, 16)
    kw = dict(blocks=["3", "0"], metrics=["spearman"], cache=False, progress=False)
    sl.cascading_randomization(model, x, ["gradient"], **kw)
    assert fake.calls == []
    monkeypatch.setenv("SANITYLIB_KEEP_FREED_MEMORY", "1")
    sl.cascading_randomization(model, x, ["gradient"], **kw)
    names = [c[0] for c in fake.calls]
    assert names.count("mallopt") == 4 and names[-1] == "malloc_trim"
    fake.calls.clear()
    monkeypatch.delenv("SANITYLIB_KEEP_FREED_MEMORY")
    with sl.keep_freed_memory():
        sl.cascading_randomization(model, x, ["gradient"], **kw)
        assert [c[0] for c in fake.calls] == ["mallopt", "mallopt"]  # set once, by the user
    assert [c[0] for c in fake.calls][-1] == "malloc_trim"
