"""Keep freed CPU memory for the next pass instead of handing it back to the OS (glibc only).

PyTorch has no caching allocator on the CPU: every tensor comes from ``malloc``.  glibc serves
requests above its *mmap threshold* (dynamic, at most 32 MiB) with fresh ``mmap`` calls and
unmaps them on ``free``, so every forward and backward pass of a large chunk page-faults its
activations in again: the kernel zeroes every page, and the passes wait.  Measured on
EfficientNet-Lite0 (224x224, 2 cores, 2 threads, forward + backward to the input): 32-row chunks
cost 78-130 ms per row with glibc's defaults and 39 ms per row with freed memory kept (16 rows:
39-51 ms vs 39 ms).  A held graph (forward replay) made every later pass allocate fresh memory
and cost about 2x with the defaults.

:func:`keep_freed_memory` raises the mmap and trim thresholds inside a ``with`` block (so freed
blocks stay in the heap and are reused), then sets them back to glibc's steady-state defaults
(32 MiB and 64 MiB) and returns the kept memory to the OS (``malloc_trim``).  glibc cannot report
its current settings, so they cannot be restored exactly: glibc's dynamic threshold stays off
for the rest of the process.  That is a change of process-global state, so sanitylib never does
it on its own: it is **opt-in**, either around your own code::

    with sl.keep_freed_memory():
        df = sl.cascading_randomization(model, x, methods)

or for every run of a process with ``SANITYLIB_KEEP_FREED_MEMORY=1`` in the environment (the
book build and the benchmark set it).  While it is in effect the engine also replays unchanged
forward activations on the CPU (:data:`sanitylib.engine.REPLAY_ON_CPU`).  It does nothing where
glibc is not the allocator, when the user tunes glibc's allocator through the environment
(``MALLOC_*_`` or ``GLIBC_TUNABLES``), preloads another allocator (``LD_PRELOAD``) or sets
``SANITYLIB_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Iterator

__all__ = ["keep_freed_memory", "keeps_freed_memory", "opted_in", "active", "if_opted_in"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_KEEP_MMAP = 1 << 30  # requests up to 1 GiB from the heap, not from fresh mappings
_KEEP_TRIM = (1 << 31) - 1  # never trim the heap top while running (mallopt takes an int)
_STEADY_MMAP, _STEADY_TRIM = 32 << 20, 64 << 20  # glibc's dynamic thresholds at their maximum
_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # raises AttributeError outside glibc (musl)
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                _libc = None
    return _libc


def opted_in() -> bool:
    """Whether the environment opts every run in (``SANITYLIB_KEEP_FREED_MEMORY=1``)."""
    return os.environ.get("SANITYLIB_KEEP_FREED_MEMORY", "").strip().lower() in ("1", "true", "yes")


def active() -> bool:
    """Whether a :func:`keep_freed_memory` block is in effect now."""
    return _depth > 0


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` can take effect in this process (see the module doc)."""
    if os.environ.get("SANITYLIB_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no"):
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    return _glibc() is not None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Context in which freed CPU memory stays in the process for the next pass (re-entrant).

    Yields whether it took effect.  On exit (of the outermost use) the thresholds are set back
    and the kept memory is returned to the OS."""
    global _depth
    active = keeps_freed_memory()
    if not active:
        yield False
        return
    libc = _glibc()
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM)
                libc.malloc_trim(0)


@contextlib.contextmanager
def if_opted_in() -> Iterator[bool]:
    """What sanitylib's own CPU work (the engine's passes, training) does about freed memory:
    :func:`keep_freed_memory` where the environment opts in (:func:`opted_in`), nothing
    otherwise (a library changes no process-global state on its own).  Yields whether freed
    memory is kept inside (also when the user's own :func:`keep_freed_memory` block is)."""
    if active() or not opted_in():
        yield active()
        return
    with keep_freed_memory() as kept:
        yield kept
