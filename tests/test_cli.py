"""The command line (``python -m sanitylib run``) and sharded runs under ``torchrun``.

Real parts: EfficientNet-Lite0 with its shipped weights and scikit-image photos written to a
folder (the ``--images`` path).  The two-rank runs use ``torch.distributed.run`` (torchrun) on
the CPU with the ``gloo`` backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sanitylib import cli
from sanitylib.distributed import finished_shards, plan_shards, shard_path, write_shard

ROOT = Path(__file__).resolve().parents[1]
# smoke profile: SmoothGrad with 3 samples (the noise must be seeded per image, not per rank)
RUN = ["run", "--profile", "smoke", "--methods", "gradient,smoothgrad", "--metrics",
       "spearman_abs,ssim", "--blocks", "1", "--shard-size", "1", "--quiet", "--device", "cpu"]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _cli(*args: str, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "sanitylib", *args]
    else:  # torchrun; --standalone picks a free port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "sanitylib", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Three scikit-image photos as PNG files."""
    from PIL import Image

    from sanitylib.data import PHOTOS

    d = tmp_path_factory.mktemp("images")
    for k in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(PHOTOS[k]()).save(d / f"{k}.png")
    return d


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("args, message", [
    (["--methods", "gradient,nosuch"], "--methods"),
    (["--methods", "gradient,,smoothgrad"], "--methods"),
    (["--metrics", "ssim,nosuch"], "--metrics"),
    (["--model", "resnet9000"], "--model"),
    (["--n-images", "0"], "--n-images"),
    (["--n-images", "99"], "--n-images"),
    (["--seed", "-1"], "--seed"),
    (["--schedule", "sideways"], "--schedule"),
    (["--shard-size", "two"], "--shard-size"),
    (["--images", "/nonexistent/folder"], "--images"),
    (["--device", "tpu"], "--device"),
    (["--blocks", "0"], "--blocks"),
    (["--blocks", "999"], "--blocks: 999 top blocks asked for, the model has"),  # was: all blocks
    (["--model", "mnist_cnn"], "--model: mnist_cnn takes 28x28 MNIST digits"),  # before training it
    (["--blocks", "²"], "--blocks: model has no submodule '²'"),  # a digit to isdigit(): traceback
    (["--methods", "attention_rollout"], "explains vision transformers"),  # was a traceback
])  # fmt: skip
def test_bad_arguments_give_clear_errors_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        status = cli.main(["run", "--profile", "smoke", "--out", str(out), *args])
    except SystemExit as err:  # argparse's own checks
        status = err.code
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE
    assert message in err, err
    assert not out.exists()  # nothing was written


def test_a_file_that_is_not_an_image_is_named_by_images(tmp_path, capsys):
    """It used to be reported as a --blocks error (or a traceback)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("not an image")
    out = tmp_path / "out"
    status = cli.main(["run", "--profile", "smoke", "--images", str(folder), "--n-images", "1",
                       "--out", str(out)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and "--images: " in err and "cannot be read as an image" in err, err
    assert not out.exists()


@pytest.mark.parametrize("files, message", [
    # looked up by name without extension: one of them was computed twice, the other never
    ({"a.jpg": "chelsea", "a.png": "coffee"}, "a.jpg and a.png share the name 'a'"),
    # a non-image after the first file stopped the run with a traceback after some shards
    ({"a.png": "chelsea", "b.png": None}, "b.png cannot be read as an image"),
])  # fmt: skip
def test_image_files_are_checked_before_any_work(files, message, tmp_path, capsys):
    from PIL import Image

    from sanitylib.data import PHOTOS

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in files.items():
        if photo is None:
            (folder / name).write_bytes(b"._ resource fork, not an image")
        else:
            Image.fromarray(PHOTOS[photo]()[:64, :64]).save(folder / name)
    out = tmp_path / "out"
    status = cli.main(["run", "--profile", "smoke", "--images", str(folder), "--out", str(out),
                       "--shard-size", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and "--images: " in err and message in err, err
    assert not out.exists()


def test_a_folder_of_another_run_or_other_weights_is_refused_before_any_write(tmp_path, capsys,
                                                                             monkeypatch):  # fmt: skip
    """The key covers the model's weights (a package upgrade between the sessions of a resumed
    run mixed two models' rows in one table), and a folder whose config.json is gone but whose
    shards belong to another run is refused before a new config.json replaces nothing (it was
    written first, then the run failed with a traceback)."""
    import sanitylib.models as M

    out = tmp_path / "out"
    args = ["run", "--profile", "smoke", "--methods", "gradient", "--metrics", "spearman_abs",
            "--blocks", "1", "--shard-size", "1", "--quiet", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli.main([*args, "--max-shards", "1"]) == 0
    capsys.readouterr()
    build = M._efficientnet_lite0

    def upgraded(pretrained):  # another release of the weights
        model = build(pretrained)
        with torch.no_grad():
            model._conv_stem.weight.mul_(1.3)
        return model

    monkeypatch.setattr(M, "_efficientnet_lite0", upgraded)
    assert cli.main(args) == cli.EXIT_USAGE
    assert "holds a run with another configuration" in capsys.readouterr().err
    monkeypatch.setattr(M, "_efficientnet_lite0", build)
    (out / "config.json").unlink()
    assert cli.main([*args, "--seed", "1"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out: " in err and "was written by a run with another configuration" in err, err
    assert not (out / "config.json").exists()


@pytest.mark.slow
def test_ranks_started_with_other_arguments_are_refused_before_any_work(tmp_path):
    """A rank with another --seed computed its shards, left them in the folder and rank 0 failed
    after the work; now every rank compares its key and --out with rank 0's first."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sanitylib", "run", "--profile", "smoke", "--methods",
            "gradient", "--metrics", "spearman_abs", "--blocks", "1", "--n-images", "1",
            "--quiet", "--device", "cpu", "--out", str(out)]  # fmt: skip
    procs = []
    for rank, extra in ((0, []), (1, ["--seed", "5"])):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
        procs.append(subprocess.Popen([*args, *extra], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == cli.EXIT_USAGE and "ranks [1] were started with other arguments" in err, err
    assert not (out / "shards").exists() or not any((out / "shards").iterdir())


def test_empty_out_and_unavailable_weights_are_usage_errors(tmp_path, capsys, monkeypatch):
    """--out "" wrote into the current folder; a model whose weights cannot be downloaded
    (offline) ended in a traceback."""
    import sanitylib.models as M

    assert cli.main(["run", "--profile", "smoke", "--out", ""]) == cli.EXIT_USAGE
    assert "--out: expected a folder name" in capsys.readouterr().err

    def offline(pretrained):
        raise M.WeightsUnavailableError("ViT-B/16 ImageNet weights could not be obtained")

    monkeypatch.setattr(M, "_vit_b_16", offline)
    out = tmp_path / "out"
    assert cli.main(["run", "--profile", "smoke", "--model", "vit_b_16", "--out", str(out)]) == cli.EXIT_USAGE
    assert "--model: ViT-B/16 ImageNet weights could not be obtained" in capsys.readouterr().err
    assert not out.exists()


def test_out_must_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["run", "--profile", "smoke", "--out", str(f)]) == cli.EXIT_USAGE
    assert "--out" in capsys.readouterr().err


def test_empty_image_folder_is_refused(tmp_path, capsys):
    assert cli.main(["run", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "no image files" in capsys.readouterr().err


def test_missing_command_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code == 2


# ----------------------------------------------------------------------------- shards


def test_plan_shards_cover_every_image_once():
    for n, size in [(1, 1), (7, 3), (11, 4), (8, 8), (5, 100)]:
        shards = plan_shards(n, size)
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert all(len(s) <= size for s in shards)
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(5, 0)


def test_shards_of_another_configuration_are_refused(tmp_path):
    df = pd.DataFrame({"image": [0], "value": [0.5]})
    write_shard(df, shard_path(tmp_path, 0), "key-a")
    assert finished_shards(tmp_path, 2, "key-a") == {0}
    with pytest.raises(ValueError, match="another configuration"):
        finished_shards(tmp_path, 2, "key-b")
    shard_path(tmp_path, 1).write_bytes(b"not parquet")  # truncated: recomputed, with a warning
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert finished_shards(tmp_path, 2, "key-a") == {0}
    assert not shard_path(tmp_path, 1).exists()


def test_a_subset_of_images_gives_the_full_runs_rows(effnet):
    """Noise is seeded per (seed, image index, draw): a shard (``image_ids``) reproduces its
    images' rows of the run on every image (up to float rounding of other batch shapes)."""
    import sanitylib as sl

    b = sl.load_photos(effnet, names=["chelsea", "coffee"], verbose=False)
    kw = dict(blocks=["logits"], metrics=["spearman_abs", "ssim"], cache=False, progress=False,
              floor=False, method_options={"smoothgrad": {"n_samples": 3}}, store_maps=0)  # fmt: skip
    full = sl.cascading_randomization(effnet, b.x, ["gradient", "smoothgrad"], image_names=b.names, **kw)
    sub = sl.cascading_randomization(effnet, b.x[[1]], ["gradient", "smoothgrad"],
                                     image_names=[b.names[1]], image_ids=[1], **kw)  # fmt: skip
    a = full[full.image == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), sub.drop(columns="value"))
    np.testing.assert_allclose(sub.value, a.value, atol=1e-5, rtol=0)
    # without the id the image gets image 0's noise: the check above could fail
    other = sl.cascading_randomization(effnet, b.x[[1]], ["smoothgrad"], **kw)
    mine = a[a.method == "smoothgrad"].value.to_numpy()
    assert np.abs(other.value.to_numpy() - mine).max() > 1e-4
    with pytest.raises(ValueError, match="image_ids"):
        sl.cascading_randomization(effnet, b.x, ["gradient"], image_ids=[1, 1], **kw)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_ranks_give_the_single_process_table_and_resume(image_dir, tmp_path):
    args = [*RUN, "--images", str(image_dir), "--n-images", "3"]
    one = _cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-6000:]
    ref = pd.read_parquet(tmp_path / "one" / "results.parquet")
    # 3 images x 1 stage x 2 methods x 2 metrics, every image once, the images' names kept
    assert len(ref) == 12 and sorted(ref.image.unique()) == [0, 1, 2]
    assert set(ref.image_name) == {"astronaut", "chelsea", "coffee"}
    assert ref.value.notna().all()

    # two ranks, each stops after one shard: 2 of 3 shards done, no table yet
    out = tmp_path / "two"
    first = _cli(*args, "--out", str(out), "--max-shards", "1", ranks=2)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-6000:]
    shards = out / "shards"
    done = sorted(p.name for p in shards.glob("part-*.parquet"))
    assert len(done) == 2 and not (out / "results.parquet").exists()
    stamps = {p: (shards / p).stat().st_mtime_ns for p in done}
    (shards / "part-00002.parquetXYZ.tmp").write_bytes(b"half a shard")  # an interrupted write

    again = _cli(*args, "--out", str(out), ranks=2)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-6000:]
    assert "2 finished (skipped), 1 to compute" in again.stdout, again.stdout
    assert {p: (shards / p).stat().st_mtime_ns for p in done} == stamps  # not recomputed
    assert not list(shards.glob("*.tmp"))
    merged = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(merged, ref)  # exactly the single-process table

    # another configuration in the same folder is refused, not mixed
    other = _cli(*args, "--out", str(out), "--seed", "1")
    assert other.returncode == cli.EXIT_USAGE and "another configuration" in other.stderr


# ----------------------------------------------------------------------------- GPU path, on the CPU


def test_inception_mean_pool_equals_adaptive_average_pool():
    """InceptionV3's final pool is a mean (deterministic CUDA backward): the same outputs and
    gradients as torchvision's ``AdaptiveAvgPool2d((1, 1))`` on its 2048 x 8 x 8 features."""
    from sanitylib.models import GlobalMeanPool, load_model

    model = load_model("inception_v3", pretrained=False)
    assert isinstance(model.avgpool, GlobalMeanPool)
    h = torch.randn(2, 2048, 8, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(2, 2048, 1, 1, generator=torch.Generator().manual_seed(1))
    outs = []
    for pool in (model.avgpool, torch.nn.AdaptiveAvgPool2d((1, 1))):
        hi = h.clone().requires_grad_(True)
        y = pool(hi)
        (y * w).sum().backward()
        outs.append((y.detach(), hi.grad))
    assert outs[0][0].shape == outs[1][0].shape == (2, 2048, 1, 1)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-9)


def test_precision_settings_leave_the_cpu_alone():
    before = cli.tf32_state()
    assert cli.set_precision("cpu", fast=True) == {"device": "cpu", "tf32": False}
    assert cli.tf32_state() == before


# ----------------------------------------------------------------------------- resume by content


def test_run_shards_recompute_a_shard_whose_images_changed(tmp_path):
    """Old: finished shards were trusted by their index: an image replaced after its shard was
    written kept its stale rows."""
    from sanitylib.distributed import run_shards, shard_meta

    content = {i: f"v0-{i}" for i in range(5)}
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return pd.DataFrame({"image": idx, "value": [content[i] for i in idx]})

    identify = lambda idx: [content[i] for i in idx]  # noqa: E731
    shards = plan_shards(5, 2)
    first = run_shards(compute, shards, tmp_path, "k", identify=identify, log=lambda m: None)
    assert calls == shards and list(first.value) == [content[i] for i in range(5)]
    assert shard_meta(shard_path(tmp_path, 1))["content"] == ["v0-2", "v0-3"]
    calls.clear()
    content[3] = "v1-3"  # image 3 replaced (same name, same size: only its content differs)
    lines = []
    again = run_shards(compute, shards, tmp_path, "k", identify=identify, log=lines.append)
    assert calls == [[2, 3]]  # only its shard is recomputed
    assert list(again.value) == ["v0-0", "v0-1", "v0-2", "v1-3", "v0-4"]
    assert any("changed since they were written" in m and "[1]" in m for m in lines), lines
    calls.clear()
    run_shards(compute, shards, tmp_path, "k", identify=identify, log=lambda m: None)
    assert calls == []  # nothing changed: nothing recomputed
    # two shards change, and the call stops after one (max_shards): the other's stale file was
    # merged into a "finished" table; it is deleted, and the run reports shards left
    content[0], content[4] = "v2-0", "v2-4"
    lines.clear()
    assert run_shards(compute, shards, tmp_path, "k", identify=identify, log=lines.append,
                      max_shards=1) is None  # fmt: skip
    assert calls == [[0, 1]] and not shard_path(tmp_path, 2).exists()
    assert any("1 of 3 shards remain" in m for m in lines), lines
    final = run_shards(compute, shards, tmp_path, "k", identify=identify, log=lambda m: None)
    assert list(final.value) == ["v2-0", "v0-1", "v0-2", "v1-3", "v2-4"]


def test_cli_resume_recomputes_a_photo_replaced_by_one_of_the_same_size(tmp_path, capsys):
    """The command line identifies images by content: a photo replaced by another of the same
    name and byte size (uncompressed BMP of the same shape) is recomputed, and the table equals
    a fresh run on the new images."""
    from PIL import Image

    from sanitylib.data import PHOTOS

    def crop(name):
        return Image.fromarray(np.ascontiguousarray(PHOTOS[name]()[:96, :96, :3]))

    images = tmp_path / "images"
    images.mkdir()
    crop("chelsea").save(images / "a.bmp")
    crop("coffee").save(images / "b.bmp")
    args = ["run", "--profile", "smoke", "--methods", "gradient", "--metrics", "spearman_abs",
            "--blocks", "1", "--shard-size", "1", "--quiet", "--device", "cpu",
            "--images", str(images), "--n-images", "2"]  # fmt: skip
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 0
    before = pd.read_parquet(tmp_path / "out" / "results.parquet")
    size = (images / "a.bmp").stat().st_size
    crop("astronaut").save(images / "a.bmp")
    assert (images / "a.bmp").stat().st_size == size
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "1 finished shard(s) hold images that changed" in capsys.readouterr().out
    after = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert cli.main([*args, "--out", str(tmp_path / "fresh")]) == 0
    fresh = pd.read_parquet(tmp_path / "fresh" / "results.parquet")
    pd.testing.assert_frame_equal(after, fresh)
    assert not np.allclose(after[after.image == 0].value, before[before.image == 0].value)
    pd.testing.assert_frame_equal(after[after.image == 1], before[before.image == 1])


def test_cli_error_names_the_flag_once(tmp_path, capsys):
    """Old: "--methods: --methods: duplicate method names"."""
    out = tmp_path / "out"
    for args, flag in ((["--methods", "gradient,gradient"], "--methods"),
                       (["--metrics", "ssim,ssim"], "--metrics")):
        assert cli.main(["run", "--profile", "smoke", "--out", str(out), *args]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{flag}: " in err and err.count(flag) == 1, err
    assert cli._flag_error("--blocks", ValueError("blocks: block 'relu' holds no parameters")).args \
        == ("--blocks: block 'relu' holds no parameters",)


def test_merge_shards_concatenates_in_shard_order(tmp_path):
    """The documented order (shard 0 first), whatever order the files were written in."""
    from sanitylib.distributed import merge_shards

    for k in (2, 0, 1):
        write_shard(pd.DataFrame({"image": [2 * k, 2 * k + 1], "value": [k, k]}),
                    shard_path(tmp_path, k), "k")  # fmt: skip
    merged = merge_shards(tmp_path, 3, "k")
    assert merged.image.tolist() == [0, 1, 2, 3, 4, 5]
    assert merged.value.tolist() == [0, 0, 1, 1, 2, 2]
    assert merged.index.tolist() == list(range(6))
