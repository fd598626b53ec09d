"""``benchmarks/bench_sanity.py`` runs and checks what it claims, on the CPU, in its smallest
configuration (``--smoke``: 2 samples and steps per method): the captum workload only (Quantus is
the ``bench`` extra, run by ``make bench``), one image, one repetition.  Its figures are not looked
at (speed lives in ``make bench``); what is asserted is that the script compares the expected
number of values, finds sanitylib in agreement with the captum loop in its own memory format
(strictly) and with the loop in the other format (within the documented bounds between formats,
``sanitylib.memory_format.agreement``), prints a well-formed RESULT line and refuses bad arguments
before any work.

Why two tolerances: in partly randomized states float32 resolves a table value only to a few
1e-2 (a rounding difference flips ReLU6 gates; see ``sanitylib.memory_format``): measured on the
benchmark's workload, a change of memory format moved values by up to 4.7e-2, a change of batch
size in one format by 2.8e-2, one thread instead of two (captum loop against sanitylib, same
format) by 2.8e-2.  Only the same arithmetic can be compared to 2e-3; the test runs with two
threads, as ``make bench`` does."""

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
    # the cascade's top two blocks (2 stages); about a minute alone on 2 idle cores
    out = _run(tmp_path, "--device", "cpu", "--skip-quantus", "--captum-images", "1", "--smoke",
               "--captum-blocks", "2", "--repeats", "1", "--threads", "2", "--bare-states", "2",
               timeout=840)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # 2 stages x 9 methods x 1 image x 4 metrics, every one compared on the CPU
    m = re.search(r"max \|sanitylib - captum loop\| over (\d+) values \(every method, stage, "
                  r"image and metric; NaN positions compared\): (\S+)", text)  # fmt: skip
    assert m, text[-3000:]
    assert int(m.group(1)) == 72
    fmt = re.search(r"sanitylib's memory format \(sanitylib.memory_format.choose\): (\w+)", text)
    assert fmt and fmt.group(1) == "channels_last", text[-3000:]  # EfficientNet-Lite0 on the CPU
    # the default-format loop: the bounds between formats (its quantile is printed and checked)
    q = re.search(r"max \|sanitylib - captum loop\| over .*?: (\S+) \(90% quantile (\S+); another "
                  r"memory format: bounds 0.005 \(quantile\) and 0.1 \(every value\)", text)  # fmt: skip
    assert q and float(q.group(1)) <= 0.1 and float(q.group(2)) <= 5e-3, text[-3000:]
    assert "ERROR" not in text
    result = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert len(result) == 1, text[-2000:]
    fields = dict(f.split("=", 1) for f in result[0].split()[1:])
    assert set(fields) == {"speedup_vs_captum_loop", "speedup_vs_captum_loop_channels_last",
                           "efficiency", "speedup_vs_naive_passes", "max_abs_diff",
                           "max_abs_diff_other_format"}  # fmt: skip
    assert float(fields["max_abs_diff"]) <= 2e-3 and float(fields["max_abs_diff_other_format"]) <= 0.1
    for k, v in fields.items():
        assert math.isfinite(float(v)) and float(v) >= 0, (k, v)
    assert float(fields["speedup_vs_captum_loop"]) > 0 and float(fields["efficiency"]) > 0
    assert "device: cpu" in text and "allocator (every side, the whole process)" in text
    # the captum loop in channels-last: its values compared too; the bare passes in both memory
    # formats, the bound the faster one (the efficiency against it, and against each alone)
    m = re.search(r"max \|sanitylib - captum loop in channels-last\| over the same values: (\S+) "
                  r"\(same memory format: tolerance 0.002\)", text)  # fmt: skip
    assert m and float(m.group(1)) <= 2e-3, text[-3000:]
    m = re.search(r"per format: contiguous: naive \S+ s, reuse (\S+) s; channels_last: naive \S+ s, "
                  r"reuse (\S+) s; contiguous / channels-last \S+; bound: (\w+)", text)  # fmt: skip
    assert m, text[-3000:]
    reuse = {"contiguous": float(m.group(1)), "channels_last": float(m.group(2))}
    assert reuse[m.group(3)] == min(reuse.values())  # (printed to 0.1 s: a tie allows either)
    assert re.search(r"against the contiguous bound alone: \S+", text)
    assert re.search(r"against the channels_last bound alone: \S+", text)


@pytest.mark.parametrize("args, name", [
    (["--device", "cuda"], "--device"),
    (["--repeats", "0"], "--repeats"),
    (["--captum-images", "0"], "--captum-images"),
    (["--bare-states", "-1"], "--bare-states"),
    (["--captum-blocks", "6"], "--captum-blocks"),
])  # fmt: skip
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, args, name):
    out = _run(tmp_path, *args, timeout=120, CUDA_VISIBLE_DEVICES="")  # CUDA absent
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert name in out.stderr, out.stderr
    assert "RESULT" not in out.stdout


def test_replay_reference_recomputes_from_the_changed_module(monkeypatch):
    """The replay-aware bare passes (the efficiency's reference) write EfficientNet-Lite0's
    forward pass out module by module: from the first operation using a changed module on,
    with the trained outputs before it, they compute the model in that state; a block path
    covers the modules under it."""
    import importlib.util

    import torch

    import sanitylib as sl
    from sanitylib.models import Block
    from sanitylib.randomize import randomized

    spec = importlib.util.spec_from_file_location("bench_sanity_mod", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    model = sl.load_model("efficientnet_lite0").eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ops = bench.efficientnet_ops(model)
    with torch.no_grad():
        outs = [x]
        for _, f in ops:
            outs.append(f(outs))
        assert torch.allclose(outs[-1], model(x), atol=1e-5, rtol=1e-5)
        names = [p for paths, _ in ops for p in paths]
        assert len(names) == len(set(names))  # every module once
        for path in ("_fc", "_bn1", "_blocks.15._bn2", "_blocks.7._depthwise_conv",
                     "_blocks.1._expand_conv", "_blocks.0._bn1", "_conv_stem", "_blocks.3"):
            state = (Block(path, (path,)),)
            c = bench.first_changed(ops, state)
            first = next(i for i, (paths, _) in enumerate(ops)
                         if any(p == path or p.startswith(path + ".") for p in paths))
            assert c == first
            with randomized(model, state, sl.Perturbation(), seed=1):
                cur = outs[:c + 1]
                for _, f in ops[c:]:
                    cur.append(f(cur))
                want = model(x)
            assert torch.allclose(cur[-1], want, atol=1e-4, rtol=1e-4), path
            assert not torch.allclose(want, outs[-1], atol=1e-3), path  # the state differs
