"""``benchmarks/bench_paper_profile.py``: the paper profile's timing script, run as a subprocess on
the CPU in its smallest configuration that still runs both parts (1 image, the top block, sample
and step counts scaled down and 75x75 inputs with the ``--scale-samples`` and ``--image-size``
testing knobs; the paper's 299x299 cost about 1 s per pass on one CPU core), and its argument
errors.

InceptionV3 runs with random weights (an empty ``TORCH_HOME``: the script's announced fallback);
the test also checks that the script leaves no file behind (working directory, torch hub folder,
sanitylib cache)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_paper_profile.py"


def _env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("SANITYLIB_IMAGE_DIR", None)  # scikit-image's photos
    # one thread: OpenMP threads spinning against other processes on a busy machine cost 10-50x
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               TORCH_HOME=str(tmp_path / "torch_home"),  # no cached weights: random InceptionV3
               SANITYLIB_CACHE=str(tmp_path / "cache"), **extra)  # fmt: skip
    return env


def _run(tmp_path: Path, *args: str, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(tmp_path, **env), cwd=work)  # fmt: skip


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_smallest_run_reports_both_parts(tmp_path):
    out = _run(tmp_path, "--device", "cpu", "--images", "1", "--blocks", "1", "--parts", "both",
               "--scale-samples", "0.02", "--image-size", "75", "--repeats", "1",
               "--batch-size", "4")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "FALLBACK" in text and "random weights" in text  # announced
    assert "TESTING KNOB: --scale-samples" in text and "TESTING KNOB: --image-size" in text
    assert "EXTRAPOLATION" in text and "50,000" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("PAPER_PROFILE ")]
    assert len(lines) == 1 and lines[0] == text.rstrip().splitlines()[-1]
    fields = dict(f.split("=", 1) for f in lines[0].split()[1:])
    assert set(fields) == {"device", "images", "states", "with_igsg_s", "without_igsg_s",
                           "bound_with_s", "bound_without_s", "efficiency_with",
                           "efficiency_without"}  # fmt: skip
    assert fields["device"] == "cpu" and fields["images"] == "1" and fields["states"] == "2"
    for k in ("with_igsg_s", "without_igsg_s", "bound_with_s", "bound_without_s",
              "efficiency_with", "efficiency_without"):  # fmt: skip
        v = float(fields[k])
        assert math.isfinite(v) and v > 0, (k, fields[k])
    # IG-SmoothGrad adds work: its bound is larger
    assert float(fields["bound_with_s"]) > float(fields["bound_without_s"])
    # nothing written: working directory, torch hub folder, sanitylib cache
    assert _files(tmp_path) == []


@pytest.mark.parametrize("args, name", [
    (["--images", "0"], "--images"),
    (["--device", "cuda"], "--device"),
    (["--blocks", "18", "--device", "cpu"], "--blocks"),
    (["--scale-samples", "0"], "--scale-samples"),
])  # fmt: skip
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, args, name):
    out = _run(tmp_path, *args, timeout=120, CUDA_VISIBLE_DEVICES="")  # CUDA absent
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(rf"argument {re.escape(name)}\b", out.stderr), out.stderr
    assert "PAPER_PROFILE" not in out.stdout
