"""Sharded runs: the images split into fixed shards, one Parquet file per finished shard.

A run over many images (e.g. the 50,000 ImageNet validation images) is cut into shards of
``shard_size`` consecutive images.  The shards do not depend on the number of processes, and
every random draw is seeded from (seed, image index, method, draw) (see
:func:`sanitylib.run_randomization`'s ``image_ids``), so the merged table is the same for one
process, for any number of ``torchrun`` ranks and in any shard order.

* Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), :func:`distributed_context`
  opens a ``torch.distributed`` process group (``env://``, ``gloo`` on the CPU, ``nccl`` on
  CUDA).  There is no DDP: ranks compute independently and only meet at barriers.
* Each rank takes every ``world``-th unfinished shard (no ``DistributedSampler``: it pads by
  repeating images) and writes ``part-SSSSS.parquet`` through a temporary file and an atomic
  rename (:func:`sanitylib.utils.atomic_write`): a reader never sees half a shard.
* Finished shards are skipped when the run starts again (a requeued job, a restarted Colab
  session); leftover temporary files are removed.  With ``identify`` (the command line passes
  a hash of each image's content), a finished shard whose images changed since it was written
  is recomputed, whatever the files' names and sizes.  Shards written under another configuration
  (their ``sanitylib.key`` metadata) are refused, not mixed.
* After a barrier, rank 0 merges the shards into one table.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from .utils import atomic_write

__all__ = ["DistInfo", "distributed_context", "plan_shards", "shard_path", "write_shard",
           "finished_shards", "merge_shards", "run_shards", "shard_meta", "ShardsIncomplete"]  # fmt: skip

#: Parquet key-value metadata entry holding the run's configuration key.
KEY_FIELD = b"sanitylib.key"


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node,
    ``backend`` (``None`` without a process group: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.backend is not None:
            torch.distributed.barrier()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {v!r}") from None


@contextlib.contextmanager
def distributed_context(device: str | torch.device = "cpu",
                        timeout: datetime.timedelta = datetime.timedelta(hours=24)) -> Iterator[DistInfo]:  # fmt: skip
    """Open a ``torch.distributed`` process group when launched by ``torchrun`` (``WORLD_SIZE``
    > 1; ``env://`` initialization, ``gloo`` for the CPU, ``nccl`` for CUDA) and close it on
    exit; a single process gets ``DistInfo()`` and no group.  ``timeout`` bounds the barriers
    (ranks with more shards finish later: the default allows a day)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    if world == 1:
        yield DistInfo(0, 1, local, None)
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)
    finally:
        if created:
            dist.destroy_process_group()


def plan_shards(n_images: int, shard_size: int) -> list[list[int]]:
    """Consecutive shards of image indices, ``shard_size`` each (the last may be shorter); they
    cover every image exactly once and do not depend on the number of processes."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    return [list(range(lo, min(n_images, lo + shard_size))) for lo in range(0, n_images, shard_size)]


def shard_path(folder: str | os.PathLike, k: int) -> Path:
    """``folder/part-KKKKK.parquet``, the file of shard ``k``."""
    return Path(folder) / f"part-{k:05d}.parquet"


def write_shard(df: pd.DataFrame, path: str | os.PathLike, key: str, meta: dict | None = None) -> None:
    """Write ``df`` as Parquet at ``path`` atomically (temporary file in the same folder, then
    ``os.replace``), with ``key`` (the run's configuration key) and ``meta`` (JSON) in the
    file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    extra = {KEY_FIELD: key.encode(), b"sanitylib.meta": json.dumps(meta or {}, default=str).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def _file_key(path: Path) -> str | None:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    v = meta.get(KEY_FIELD)
    return v.decode() if v is not None else None


def shard_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata :func:`write_shard` stored in a shard file (``{}`` if none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(Path(path)).metadata or {}
    try:
        return json.loads(meta.get(b"sanitylib.meta", b"{}").decode())
    except ValueError:
        return {}


def finished_shards(folder: str | os.PathLike, n_shards: int, key: str) -> set[int]:
    """Shards of ``folder`` already written for the run ``key``.

    A shard file that cannot be read is reported (warning), deleted and counted as not done.

    Raises:
        ValueError: a shard file was written for another configuration (other key), or lies
            beyond ``n_shards``: the folder belongs to another run.
    """
    folder = Path(folder)
    done: set[int] = set()
    if not folder.is_dir():
        return done
    for p in sorted(folder.glob("part-*.parquet")):
        try:
            k = int(p.stem.split("-", 1)[1])
        except ValueError:
            continue
        try:
            fkey = _file_key(p)
        except Exception as err:  # noqa: BLE001 - unreadable: recomputed
            warnings.warn(f"shard file {p} cannot be read ({type(err).__name__}: {err}); it is "
                          "recomputed", RuntimeWarning, stacklevel=2)  # fmt: skip
            p.unlink(missing_ok=True)
            continue
        if fkey != key or k >= n_shards:
            raise ValueError(f"{p} was written by a run with another configuration (key {fkey}, "
                             f"this run {key}, {n_shards} shards): use another output folder or "
                             "delete it")  # fmt: skip
        done.add(k)
    return done


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete temporary shard files left by an interrupted write; returns how many."""
    n = 0
    for p in Path(folder).glob("part-*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def merge_shards(folder: str | os.PathLike, n_shards: int, key: str) -> pd.DataFrame:
    """Every shard of the run ``key``, concatenated in shard order.

    Raises:
        ShardsIncomplete: a shard is missing.
        ValueError: a shard belongs to another configuration.
    """
    import pyarrow.parquet as pq

    missing = [k for k in range(n_shards) if not shard_path(folder, k).exists()]
    if missing:
        raise ShardsIncomplete(f"{len(missing)} of {n_shards} shards are not finished "
                               f"(first: {missing[:5]})")  # fmt: skip
    parts = []
    for k in range(n_shards):
        p = shard_path(folder, k)
        table = pq.read_table(p)
        fkey = (table.schema.metadata or {}).get(KEY_FIELD, b"").decode()
        if fkey != key:
            raise ValueError(f"{p} was written by a run with another configuration")
        parts.append(table.to_pandas())
    return pd.concat(parts, ignore_index=True)


class ShardsIncomplete(RuntimeError):
    """Raised (or returned as state) when some shards are not finished yet."""


def run_shards(compute: Callable[[list[int]], pd.DataFrame], shards: Sequence[Sequence[int]],
               folder: str | os.PathLike, key: str, dist: DistInfo | None = None, *,
               max_shards: int | None = None, meta: dict | None = None,
               log: Callable[[str], None] = print,
               identify: Callable[[list[int]], list[str]] | None = None) -> pd.DataFrame | None:  # fmt: skip
    """Compute the unfinished ``shards`` across the ranks and merge them on rank 0.

    Args:
        compute: ``compute(image_indices) -> DataFrame`` of one shard.
        shards: image indices per shard (:func:`plan_shards`).
        folder: where the shard files go (shared by every rank: one filesystem).
        key: the run's configuration key, stored in every shard file and checked on resume.
        dist: this process's place (:func:`distributed_context`; default: a single process).
        max_shards: stop after this many shards per rank (a bounded chunk of work, e.g. in a
            time-limited session); the run is then resumed by calling again.
        meta: JSON-friendly metadata stored in each shard file.
        log: where progress lines go (rank 0 only prints the summary lines).
        identify: ``identify(image_indices) -> [content id per image]`` (e.g. a hash of each
            image's pixels): stored in each shard file (metadata ``"content"``); a finished
            shard whose stored ids differ from the images' ids now (a photo replaced by
            another, whatever its name and size) is recomputed, not merged.  ``None``: shards
            are trusted by their index.

    Returns:
        The merged table on rank 0 when every shard is finished; ``None`` on the other ranks or
        when shards remain (``max_shards``).
    """
    dist = dist or DistInfo()
    folder = Path(folder)
    if dist.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        n_tmp = remove_stale_tmp(folder)
        if n_tmp:
            log(f"removed {n_tmp} unfinished temporary shard file(s)")
    dist.barrier()  # the folder exists and holds no temporary files
    done = finished_shards(folder, len(shards), key)
    if identify is not None:
        changed = [k for k in sorted(done) if shard_meta(shard_path(folder, k)).get("content")
                   != list(identify(list(shards[k])))]  # fmt: skip
        if changed and dist.rank == 0:
            log(f"{len(changed)} finished shard(s) hold images that changed since they were "
                f"written (other content): {changed[:10]}{' ...' if len(changed) > 10 else ''}; "
                "recomputed")  # fmt: skip
        done -= set(changed)
    dist.barrier()  # every rank listed the same finished shards
    if identify is not None and dist.rank == 0:
        for k in changed:  # other images' numbers: deleted, so that a call that stops before
            shard_path(folder, k).unlink(missing_ok=True)  # recomputing them never merges them
    dist.barrier()  # ... before anyone writes
    remaining = sorted(set(range(len(shards))) - done)
    mine = remaining[dist.rank::dist.world]
    if dist.rank == 0:
        log(f"{len(shards)} shards: {len(done)} finished (skipped), {len(remaining)} to compute "
            f"on {dist.world} process(es)")  # fmt: skip
    n = 0
    for k in mine:
        if max_shards is not None and n >= max_shards:
            break
        content = {} if identify is None else {"content": list(identify(list(shards[k])))}
        df = compute(list(shards[k]))
        write_shard(df, shard_path(folder, k), key, {**(meta or {}), "shard": k,
                                                     "images": list(shards[k]), **content})  # fmt: skip
        n += 1
        log(f"rank {dist.rank}: shard {k} written ({len(df)} rows)")
    dist.barrier()
    if dist.rank != 0:
        return None
    left = [k for k in range(len(shards)) if not shard_path(folder, k).exists()]
    if left:
        log(f"{len(left)} of {len(shards)} shards remain; run the same command again to continue")
        return None
    return merge_shards(folder, len(shards), key)
