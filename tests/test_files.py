"""Files sanitylib writes (atomic writes of results, shards and caches) get the permissions of
any file the user creates: ``0o666`` less the umask (``tempfile.mkstemp`` would make them
``0o600``).  Each umask is set in a child process (the umask is process-global)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from pathlib import Path
import pandas as pd, torch
from sanitylib.utils import atomic_save, atomic_write
from sanitylib.distributed import write_shard
d = Path(sys.argv[1])
atomic_write(d / "a.json", lambda tmp: Path(tmp).write_text("{}"))
atomic_save({"x": torch.ones(2)}, d / "b.pt")
write_shard(pd.DataFrame({"v": [1.0]}), d / "part-00000.parquet", "key")
"""


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, umask):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300, preexec_fn=lambda: os.umask(umask))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("a.json", "b.pt", "part-00000.parquet"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt", "part-00000.parquet"]
