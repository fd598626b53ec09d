"""GPU checks: collected only when CUDA is available (see conftest.py); CI has no GPU.

Every method, every metric and the runners on CUDA against the CPU, with IEEE fp32 (TF32 off:
the reference numerics); the opt-in fast mode (TF32) validated against it; InceptionV3's
deterministic backward; the command line and the two benchmarks' GPU paths on CUDA; both memory
formats (``sanitylib.memory_format``: channels-last, the rule's choice on CUDA, and the default)
against the CPU and against each other."""
import re

import numpy as np
import pandas as pd
import pytest
import torch

import sanitylib as sl
from sanitylib.cli import main, restore_tf32, set_precision, tf32_state

#: Smoke-sized settings (the comparison is about the device, not the method).
OPTIONS = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
           "vargrad": {"n_samples": 4}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 4}}  # fmt: skip
STOCHASTIC = ("smoothgrad", "vargrad", "ig_smoothgrad")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """The reference numerics for every test here; torch's settings restored afterwards."""
    old = tf32_state()
    set_precision("cuda", fast=False)
    yield
    restore_tf32(old)


@pytest.fixture(scope="module")
def pair():
    model = sl.load_model("efficientnet_lite0")
    x = sl.load_photos(model, names=["chelsea", "coffee"], verbose=False).x
    gpu = sl.load_model("efficientnet_lite0", device="cuda")
    return model, x, gpu


def _maps(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64).round(decimals=1)


def test_metrics_on_cuda_match_cpu():
    a, b = _maps(0), _maps(1)
    for m in sl.METRICS:
        torch.testing.assert_close(sl.similarity(a.cuda(), b.cuda(), m).cpu(),
                                   sl.similarity(a, b, m), rtol=0, atol=1e-6)


def test_normalizations_on_cuda_match_cpu():
    x = _maps(2)
    for fn in (sl.abs_normalize, sl.diverging_normalize, sl.unit_normalize):
        torch.testing.assert_close(fn(x.cuda()).cpu(), fn(x))


@pytest.mark.parametrize("method", [m for m in sl.METHODS if m not in STOCHASTIC])
def test_every_deterministic_method_on_cuda_matches_cpu(pair, method):
    model, x, gpu = pair
    cpu = sl.explain(model, x, method, **OPTIONS.get(method, {}))
    dev = sl.explain(gpu, x.cuda(), method, **OPTIONS.get(method, {})).cpu()
    assert dev.shape == cpu.shape
    for i in range(len(x)):
        r = np.corrcoef(cpu[i].flatten(), dev[i].flatten())[0, 1]
        assert r > 0.999, (method, i, r)
    torch.testing.assert_close(dev, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))


@pytest.mark.parametrize("method", STOCHASTIC)
def test_stochastic_methods_on_cuda(pair, method):
    """CUDA and CPU generators draw different streams, so the noise differs by device (the
    table records the device): with zero noise the methods reduce to their deterministic
    counterpart on both devices, and on CUDA the same seed gives the same map."""
    model, x, gpu = pair
    opts = {**OPTIONS[method], "noise_level": 0.0}
    cpu = sl.explain(model, x, method, **opts)
    dev = sl.explain(gpu, x.cuda(), method, **opts).cpu()
    torch.testing.assert_close(dev, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()) + 1e-12)
    a = sl.explain(gpu, x.cuda(), method, seed=3, **OPTIONS[method])
    b = sl.explain(gpu, x.cuda(), method, seed=3, **OPTIONS[method])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_runner_on_cuda_matches_cpu(pair, memory_format):
    model, x, gpu = pair
    methods = ["gradient", "input_x_gradient", "integrated_gradients", "guided_backprop",
               "gradcam", "guided_gradcam"]  # fmt: skip
    kw = dict(blocks=["logits", "conv_head"], metrics=list(sl.METRICS), cache=False,
              progress=False, floor=False, store_maps=0,
              method_options={m: OPTIONS[m] for m in methods if m in OPTIONS})  # fmt: skip
    a = sl.cascading_randomization(model, x, methods, memory_format="contiguous", **kw)
    b = sl.cascading_randomization(gpu, x.cuda(), methods, memory_format=memory_format, **kw)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    # HOG turns rounding into bin jumps: a looser bound there
    hog = a.metric.str.startswith("hog").to_numpy()
    d = np.abs(a.value.to_numpy() - b.value.to_numpy())
    assert np.nanmax(d[~hog]) < 5e-3 and np.nanmax(d[hog]) < 5e-2, np.nanmax(d)


def test_memory_formats_on_cuda_agree_and_the_model_comes_back(pair):
    """The rule picks channels-last on CUDA; every built-in method and metric in both formats
    within the documented tolerances (same device, so the same noise); the GPU model's weights
    come back with their own storages and strides."""
    from sanitylib import memory_format as mf

    _, x, gpu = pair
    xg = x[:1].cuda()
    assert mf.choose(gpu, xg, "auto") == "channels_last"
    before = {k: (t.data_ptr(), t.stride(), t.detach().clone()) for k, t in gpu.state_dict().items()}
    kw = dict(blocks=["logits", "conv_head"], metrics=list(sl.METRICS), cache=False, progress=False,
              floor=False, store_maps=[0], method_options=OPTIONS, seed=0)  # fmt: skip
    a = sl.cascading_randomization(gpu, xg, list(sl.METHODS), memory_format="contiguous", **kw)
    b = sl.cascading_randomization(gpu, xg, list(sl.METHODS), memory_format="channels_last", **kw)
    for k, t in gpu.state_dict().items():
        assert (t.data_ptr(), t.stride()) == before[k][:2] and torch.equal(t, before[k][2]), k
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    agree = mf.agreement(a.value, b.value)
    assert agree["ok"], agree
    for st, maps in a.maps.stages.items():
        for m, u in maps.items():
            v = b.maps.stages[st][m]
            rel = float((u - v).abs().max() / u.abs().max().clamp_min(1e-30))
            assert rel <= mf.MAP_TOLERANCE, (st, m, rel)


def test_fast_mode_is_close_to_the_reference(pair):
    """TF32 (opt-in) against IEEE fp32: per-method Spearman of the maps stays high."""
    _, x, gpu = pair
    methods = ["gradient", "integrated_gradients", "guided_backprop"]
    opts = {m: OPTIONS[m] for m in methods if m in OPTIONS}
    ref = sl.explain_methods(gpu, x.cuda(), methods, opts, progress=False)
    set_precision("cuda", fast=True)
    fast = sl.explain_methods(gpu, x.cuda(), methods, opts, progress=False)
    for m in ref:
        rho = sl.similarity(ref[m].double(), fast[m].double(), "spearman_abs").cpu()
        print(f"{m}: Spearman(TF32 map, fp32 map) = {rho.tolist()}")
        assert (rho > 0.95).all(), (m, rho)


def test_inception_backward_is_deterministic_on_cuda():
    model = sl.load_model("inception_v3", pretrained=False, device="cuda")
    x = torch.randn(2, 3, 299, 299, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        maps = [sl.explain(model, x, "gradient", target=[1, 2]) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(maps[0], maps[1])


def test_command_line_on_cuda(tmp_path):
    out = tmp_path / "run"
    status = main(["run", "--profile", "smoke", "--methods", "gradient,guided_backprop",
                   "--metrics", "spearman_abs,ssim", "--blocks", "2", "--device", "cuda",
                   "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 * 2 * 2 * 2 and df.value.notna().all()
    import json

    rec = json.loads((out / "config.json").read_text())
    assert rec["config"]["device"] == "cuda" and rec["run"]["precision"]["tf32"] is False
    assert rec["run"]["precision"]["gpu"] and rec["run"]["peak_gpu_memory_gib"] > 0


# ----------------------------------------------------------------------------- benchmarks


def _bench(script: str, *args: str, timeout: int = 600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(root / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def test_bench_sanity_on_cuda():
    """The benchmark's GPU path end to end (captum workload, one image, one repetition):
    synchronized timers, device-sized chunks, peak memory, the deterministic methods' values
    equal to the captum loop's; the noise methods counted (CUDA noise streams differ)."""
    out = _bench("bench_sanity.py", "--device", "cuda", "--skip-quantus", "--captum-images", "1",
                 "--repeats", "1")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "GPU:" in text and "IEEE fp32 (TF32 off)" in text and "peak GPU memory" in text
    assert re.search(r"over 180 values \(120 of them: the deterministic methods", text), text[-3000:]
    assert "ERROR" not in text and re.search(r"^RESULT speedup_vs_captum_loop=", text, re.M)
    # the bare passes in both memory formats, the faster one the bound; the loop in channels-last
    assert re.search(r"per format: contiguous: naive \S+ s, reuse \S+ s; channels_last: .*bound: "
                     r"(contiguous|channels_last)", text), text[-3000:]  # fmt: skip
    assert "speedup_vs_captum_loop_channels_last=" in text


def test_bench_paper_profile_on_cuda():
    out = _bench("bench_paper_profile.py", "--device", "cuda", "--images", "2", "--blocks", "2",
                 "--scale-samples", "0.1", "--repeats", "1")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("PAPER_PROFILE device=cuda images=2 states=3"), line
