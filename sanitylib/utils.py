"""Small utilities shared by every module: seeds, the on-disk cache folder, atomic writes,
content hashes.  This module imports nothing from sanitylib."""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import platform
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["__version__", "derive_seed", "cache_dir", "atomic_write", "atomic_save", "tensor_hash",
           "source_hash", "load_cached", "cpu_info"]  # fmt: skip

#: The package version (also ``sanitylib.__version__``).
__version__ = "0.1.0"


@functools.cache
def cpu_info() -> dict:
    """The CPU this process runs on: ``{"model": str, "vendor": str, "flags": frozenset}`` from
    ``/proc/cpuinfo`` (its first processor), read once; where there is no such file, the model
    and vendor are :func:`platform.processor` (or the machine's architecture) and no flags."""
    fallback = platform.processor() or platform.machine()
    info = {"model": fallback, "vendor": fallback, "flags": frozenset()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = (part.strip() for part in line.partition(":"))
                if not key and info["flags"]:
                    break  # the end of the first processor's block
                if key in ("model name", "vendor_id"):
                    info["model" if key == "model name" else "vendor"] = val
                elif key == "flags":
                    info["flags"] = frozenset(val.split())
    except OSError:
        pass
    return info


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (e.g. ``derive_seed(0, "noise", 3)``).
    Integers of any type (``numpy.int64(3)``, whose repr is ``np.int64(3)`` under numpy 2) are
    taken as the Python int they equal, so a seed gives the same numbers whatever its type."""
    parts = tuple(int(p) if isinstance(p, numbers.Integral) and not isinstance(p, bool) else p
                  for p in parts)  # fmt: skip
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


#: Seeds are ints in ``[0, MAX_SEED]`` (``torch.Generator.manual_seed`` takes 64 bits; sanitylib
#: derives its generators' seeds from them with :func:`sanitylib.utils.derive_seed`).
MAX_SEED = 2**63 - 1


def check_seed(seed, name: str = "seed") -> None:
    """``ValueError`` naming ``name`` unless ``seed`` is an integer in ``[0, MAX_SEED]`` (numpy
    integers included), the seeds every entry point takes."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # np.bool_ is no Integral
        raise ValueError(f"{name} must be an int, got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{name} must lie in [0, 2**63 - 1], got {seed}")


def cache_dir(*parts: str) -> Path:
    """Root of sanitylib's on-disk cache (``$SANITYLIB_CACHE`` or ``~/.cache/sanitylib``)."""
    root = os.environ.get("SANITYLIB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sanitylib"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_file(folder: Path, prefix: str, suffix: str) -> str:
    """Create a new empty file ``folder/prefix<random>suffix`` exclusively and return its path.
    Its mode is ``0o666`` less the process's umask, as for any file the user creates
    (``tempfile.mkstemp`` would make it ``0o600``, private whatever the umask)."""
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"no free temporary file name for {prefix!r} in {folder}")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it onto
    ``path``: an interrupted run never leaves a half-written file.  The file gets the usual
    permissions of a new file (``0o666`` less the umask)."""
    path = Path(path)
    tmp = _new_file(path.parent, path.name, ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` of ``obj`` onto ``path`` through :func:`atomic_write`.  Everything sanitylib
    caches is tensors in plain containers (dicts, lists, str, int, float, bool, None), which
    :func:`load_cached` reads back without unpickling any code."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_cached(path: Path, validate: Callable[[Any], str | None] | None = None) -> Any:
    """Read a file written by :func:`atomic_save`, safely: ``torch.load(weights_only=True)``
    (torch's restricted unpickler: tensors and plain containers only, no code runs).

    Returns ``None`` when the file does not exist.  A file that cannot be read (truncated,
    empty, not a torch file, or holding anything else than tensors and plain values, e.g. a
    planted pickle) or that ``validate(obj)`` rejects (it returns a reason) is reported by a
    warning naming the file, deleted, and ``None`` is returned: the caller recomputes it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        problem = validate(obj) if validate is not None else None
    except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        line = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else "")
        if "unsupported" in line.lower():
            line = f"it holds more than tensors and plain values, refused: {line}"
        elif path.stat().st_size == 0:
            line = "empty file"
        problem = f"{type(err).__name__}: {line[:200]}".rstrip(": ")
    if problem is None:
        return obj
    warnings.warn(f"sanitylib cache: cannot use {path} ({problem}); it is recomputed",
                  RuntimeWarning, stacklevel=2)  # fmt: skip
    try:
        path.unlink()
    except OSError:
        pass
    return None


def tensor_hash(tensors: Iterable[Tensor]) -> str:
    """sha256 (20 hex characters) of the shapes, dtypes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def _hash_sources() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


#: Read once, when sanitylib is imported: the code this process runs (a source file edited
#: while a kernel keeps the old code loaded must not give the old code's results a new key).
_SOURCE_HASH = _hash_sources()


def source_hash() -> str:
    """sha256 (16 hex characters) of sanitylib's own source files (the core, not the book), as
    they were when sanitylib was imported."""
    return _SOURCE_HASH
