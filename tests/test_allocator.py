"""sanitylib.allocator: freed CPU memory is reused inside the context, handed back outside."""

import os
import resource
import sys

import pytest
import torch

from sanitylib import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
MIB = 1 << 20


def _touch(n: int = 1) -> None:
    """Fill and free ``n`` 64 MiB tensors held at once."""
    ts = [torch.empty(16 * MIB) for _ in range(n)]
    for t in ts:
        t.fill_(1.0)
    del ts


def _faults_of_touch() -> int:
    """Minor page faults of filling one fresh 64 MiB tensor, after such tensors were freed (three
    times: glibc may need a second free chunk of the size before it reuses one, when a small
    allocation lands after the first)."""
    for _ in range(3):
        _touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _touch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    for k in ("SANITYLIB_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)


def test_freed_memory_is_reused_inside_and_returned_after(clean_env):
    assert allocator.keeps_freed_memory()  # Linux with glibc: the project's machines
    pages = 64 * MIB // resource.getpagesize()
    with allocator.keep_freed_memory() as kept:
        assert kept
        with allocator.keep_freed_memory():  # re-entrant
            assert _faults_of_touch() < pages // 100  # no page faults: the memory is reused
        assert allocator._depth == 1
        assert _faults_of_touch() < pages // 100  # still on after the inner exit
        base = _rss()
        _touch(4)  # 256 MiB at once (64 of them resident already), freed: they stay
        assert _rss() - base > 150 * MIB
    assert allocator._depth == 0
    assert _rss() - base < 64 * MIB  # given back to the OS on exit


@pytest.mark.parametrize("env", [("SANITYLIB_KEEP_FREED_MEMORY", "0"),
                                 ("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                 ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                                 ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])  # fmt: skip
def test_user_settings_win(clean_env, monkeypatch, env):
    monkeypatch.setenv(*env)
    assert not allocator.keeps_freed_memory()
    with allocator.keep_freed_memory() as kept:
        assert not kept and allocator._depth == 0
