"""``benchmarks/bench_sanity.py`` runs and checks what it claims, on the CPU, in its smallest
configuration: the captum workload only (Quantus is the ``bench`` extra, run by ``make bench``),
one image, one repetition.  Its figures are not looked at (speed lives in ``make bench``); what is
asserted is that the script compares the expected number of values, finds them in agreement,
prints a well-formed RESULT line and refuses bad arguments before any work.

It runs with two threads, as ``make bench`` does: the agreement of the noise methods' values in
randomized states depends on float rounding (a randomized network amplifies it; see
``sanitylib.engine.MAP_TOLERANCE``), and with one thread and one image the captum loop and
sanitylib were measured to differ by 0.028 (SmoothGrad's HOG correlation, one stage), against
3e-5 with two threads."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_sanity.py"


def _run(tmp_path: Path, *args: str, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SANITYLIB_CACHE=str(tmp_path / "cache"), **extra)  # fmt: skip
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)  # fmt: skip


def test_captum_workload_agrees_and_reports(tmp_path):
    out = _run(tmp_path, "--device", "cpu", "--skip-quantus", "--captum-images", "1",
               "--repeats", "1", "--threads", "2", "--bare-states", "2")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # 5 stages x 9 methods x 1 image x 4 metrics, every one compared on the CPU
    m = re.search(r"max \|sanitylib - captum loop\| over (\d+) values \(every method, stage, "
                  r"image and metric; NaN positions compared\): (\S+)", text)  # fmt: skip
    assert m, text[-3000:]
    assert int(m.group(1)) == 180 and float(m.group(2)) <= 2e-3
    assert "ERROR" not in text
    result = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert len(result) == 1, text[-2000:]
    fields = dict(f.split("=", 1) for f in result[0].split()[1:])
    assert set(fields) == {"speedup_vs_captum_loop", "efficiency", "speedup_vs_naive_passes",
                           "max_abs_diff"}  # fmt: skip
    for k, v in fields.items():
        assert math.isfinite(float(v)) and float(v) >= 0, (k, v)
    assert float(fields["speedup_vs_captum_loop"]) > 0 and float(fields["efficiency"]) > 0
    assert "device: cpu" in text and "allocator (every side, the whole process)" in text


@pytest.mark.parametrize("args, name", [
    (["--device", "cuda"], "--device"),
    (["--repeats", "0"], "--repeats"),
    (["--captum-images", "0"], "--captum-images"),
    (["--bare-states", "-1"], "--bare-states"),
])  # fmt: skip
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, args, name):
    out = _run(tmp_path, *args, timeout=120, CUDA_VISIBLE_DEVICES="")  # CUDA absent
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert name in out.stderr, out.stderr
    assert "RESULT" not in out.stdout
