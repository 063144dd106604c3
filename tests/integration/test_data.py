"""flowlab.data on files written in the real on-disk formats (tests/fakedata.py)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flowlab.data as fd
from flowlab.data.celebahq import celebahq_split
from flowlab.errors import ConfigError, DataError
from tests.fakedata import (
    SMALL_OVERRIDES,
    garbage,
    random_images,
    truncate,
    write_celebahq,
    write_cifar10,
    write_idx,
    write_imagenet_npz,
    write_imagenet_png,
)
from tests.settings import datamodule

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _all(ds):
    """Every (image, label) of a dataset, in order, through the per-item path; checks that item i carries
    index i (its position in the split)."""
    xs, ys, idx = zip(*(ds[i] for i in range(len(ds))))
    assert list(idx) == list(range(len(ds)))
    return torch.stack(xs), torch.tensor(ys)


# ---- transforms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bits", [1, 3, 5, 8])
def test_transforms_follow_glow_convention(n_bits):
    x = torch.arange(256, dtype=torch.uint8)
    r = fd.reduce_bits(x, n_bits)
    assert r.dtype == torch.uint8
    assert torch.equal(r, (torch.arange(256) // 2 ** (8 - n_bits)).to(torch.uint8))
    assert int(r.max()) == 2 ** n_bits - 1
    p = fd.preprocess(r, n_bits)
    assert p.dtype == torch.float32 and p.min() == -0.5 and p.max() < 0.5
    q = fd.dequantize(p, n_bits, generator=torch.Generator().manual_seed(0))
    assert ((q - p) >= 0).all() and ((q - p) < 1 / 2 ** n_bits).all()
    # postprocess inverts preprocess (with or without noise) up to the dropped low bits
    cleared = (x.to(torch.int64) // 2 ** (8 - n_bits) * 2 ** (8 - n_bits)).to(torch.uint8)
    assert torch.equal(fd.postprocess(p, n_bits), cleared)
    assert torch.equal(fd.postprocess(q, n_bits), cleared)


def test_postprocess_clamps_and_handles_nan():
    out = fd.postprocess(torch.tensor([-3.0, 3.0, float("nan")]), 8)
    assert out.dtype == torch.uint8 and out.tolist() == [0, 255, 0]


@pytest.mark.parametrize("bad", [0, 9, -1, 5.0, True, "8"])
def test_n_bits_validated_before_touching_disk(bad):
    with pytest.raises(ConfigError) as e:
        datamodule("cifar10", "/nonexistent/never/read", n_bits=bad)
    msg = str(e.value)
    assert "data.n_bits" in msg and repr(bad) in msg and "1 to 8" in msg


def test_init_only_validates_arguments():
    for name in CONFIGS:
        dm = datamodule(name, "/nonexistent/never/read")  # no DataError until prepare_data/setup
        assert "not read yet" in dm.describe()


@pytest.mark.parametrize("kwargs, key", [
    (dict(image_size=64), "data.image_size"), (dict(channels=1), "data.channels"),
    (dict(val_size=-1), "data.val_size"), (dict(val_size=1.5), "data.val_size"), (dict(val_size="10"), "data.val_size"),
    (dict(batch_size=0), "data.batch_size"), (dict(num_workers=-1), "data.num_workers"),
    (dict(download="yes"), "data.download"), (dict(root=""), "data.root"),
])
def test_bad_arguments_are_config_errors(kwargs, key):
    args = dict(root="/nonexistent") | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        datamodule("cifar10", **args)


def test_imagenet_resolution_and_size_must_agree():
    with pytest.raises(ConfigError, match="data.resolution=48"):
        datamodule("imagenet32", "/x", resolution=48)
    with pytest.raises(ConfigError, match="data.image_size=64"):
        datamodule("imagenet32", "/x", image_size=64)
    dm = datamodule("imagenet64", "/x", image_size=None)  # the size follows the resolution
    assert (dm.image_size, dm.channels, dm.num_classes, dm.name) == (64, 3, 1, "imagenet64")  # PNG release: no labels
    assert dm.release == "oord"
    assert datamodule("imagenet32", "/x", release="chrabaszcz").name == "imagenet32_chrabaszcz"
    with pytest.raises(ConfigError) as e:
        datamodule("imagenet32", "/x", release="npz")
    assert "data.release='npz'" in str(e.value) and "'oord'" in str(e.value) and "'chrabaszcz'" in str(e.value)


# ---- CIFAR-10 ---------------------------------------------------------------------------------------------
def test_cifar10_reads_batches_reduces_bits_and_splits(tmp_path):
    folder = write_cifar10(tmp_path, n_train=40, n_test=12)
    dm = datamodule("cifar10", tmp_path, n_bits=5, val_size=10, batch_size=8)
    assert (dm.channels, dm.image_size, dm.num_classes, dm.n_bits) == (3, 32, 10, 5)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 12)
    x, y = _all(dm.test_dataset)
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 32, 32) and int(x.max()) <= 31
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    expect = torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32)) >> 3
    assert torch.equal(x, expect)
    assert y.tolist() == raw["labels"]
    # train and validation partition the 40 training images
    tr, va = dm.train_dataset.indices, dm.val_dataset.indices
    assert sorted(tr.tolist() + va.tolist()) == list(range(40))


def test_cifar10_accepts_bytes_keys(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5, keys="bytes")
    dm = datamodule("cifar10", tmp_path, val_size=0)
    dm.setup()
    assert len(dm.train_dataset) == 10 and len(dm.test_dataset) == 5


def test_split_is_deterministic_and_independent_of_global_seed(tmp_path):
    write_cifar10(tmp_path, n_train=50, n_test=5)

    def split(seed, global_seed, val_size=0.2):
        torch.manual_seed(global_seed)
        dm = datamodule("cifar10", tmp_path, val_size=val_size, seed=seed)
        dm.setup("fit")
        return dm.val_dataset.indices.tolist()

    a = split(0, 1)
    assert len(a) == 10
    assert a == split(0, 2) == split(0, 3, val_size=10)
    assert a != split(1, 1)


def test_dataloaders_shuffle_and_drop_only_for_training(tmp_path):
    write_cifar10(tmp_path, n_train=40, n_test=10)
    dm = datamodule("cifar10", tmp_path, val_size=10, batch_size=4)
    dm.setup()
    train = list(dm.train_dataloader())
    assert len(train) == 7 and all(b[0].shape == (4, 3, 32, 32) for b in train)  # 30 -> 7 full batches
    assert train[0][1].dtype == torch.int64
    for loader, ds in ((dm.val_dataloader(), dm.val_dataset), (dm.test_dataloader(), dm.test_dataset)):
        xs = torch.cat([b[0] for b in loader])
        assert len(loader) == 3 and torch.equal(xs, _all(ds)[0])  # all 10, in order, last batch of 2
        index = torch.cat([b[2] for b in loader])
        assert index.dtype == torch.int64 and index.tolist() == list(range(10))  # each image's position, once
    # training batches carry the index too: shuffled positions, each at most once per epoch
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert len(set(seen.tolist())) == 28 and set(seen.tolist()) <= set(range(30))
    # the order is a function of (seed, epoch): a new one every epoch (Lightning calls set_epoch), the same on resume
    loader, orders = dm.train_dataloader(), []
    for epoch in (0, 1, 2, 0):
        loader.sampler.set_epoch(epoch)
        orders.append(torch.cat([b[2] for b in loader]))
    assert not all(torch.equal(orders[0], o) for o in orders[1:3]) and torch.equal(orders[0], orders[3])


def test_batch_larger_than_training_set_is_config_error(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5)
    dm = datamodule("cifar10", tmp_path, val_size=2, batch_size=64)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="data.batch_size=64"):
        dm.train_dataloader()
    with pytest.raises(ConfigError, match="data.val_size"):
        dm2 = datamodule("cifar10", tmp_path, val_size=10)
        dm2.setup("fit")


def test_hflip_only_on_training_images(tmp_path):
    write_cifar10(tmp_path, n_train=20, n_test=5)
    dm = datamodule("cifar10", tmp_path, val_size=5, hflip=True)
    dm.setup()
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        orig = ds.images[int(ds.indices[0])]

        def kind(img):
            return "orig" if torch.equal(img, orig) else "flip" if torch.equal(img, orig.flip(-1)) else "?"

        seen = {kind(ds[0][0]) for _ in range(40)}
        batched = {kind(ds.__getitems__([0, 1])[0][0]) for _ in range(40)}
        expect = {"orig", "flip"} if ds is dm.train_dataset else {"orig"}
        assert seen == expect and batched == expect


def test_cifar10_missing_gives_one_clear_error(tmp_path):
    dm = datamodule("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        dm.setup()
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg and "data.download=true" in msg
    folder = write_cifar10(tmp_path, n_train=10, n_test=5)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        datamodule("cifar10", tmp_path, val_size=2).setup()


@pytest.mark.parametrize("damage, name", [(truncate, "data_batch_3"), (garbage, "test_batch")])
def test_cifar10_corrupt_batch_named(tmp_path, damage, name):
    folder = write_cifar10(tmp_path, n_train=10, n_test=5)
    damage(folder / name)
    with pytest.raises(DataError, match=str(folder / name)):
        datamodule("cifar10", tmp_path, val_size=2).setup()


def test_cifar10_pickle_cannot_run_code(tmp_path):
    folder = write_cifar10(tmp_path, n_train=10, n_test=5)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_1"):
        datamodule("cifar10", tmp_path, val_size=2).setup()
    assert not marker.exists()


def test_cifar10_download_only_when_asked_and_missing(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar(root, train=True, download=False):
        calls.append(root)
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar)
    datamodule("cifar10", tmp_path).prepare_data()  # download=False: nothing happens
    assert calls == []
    with pytest.raises(DataError) as e:
        datamodule("cifar10", tmp_path, download=True).prepare_data()
    assert calls == [str(tmp_path)] and "network unreachable" in str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    write_cifar10(tmp_path, n_train=10, n_test=5)
    datamodule("cifar10", tmp_path, download=True).prepare_data()  # present: no download
    assert len(calls) == 1


# ---- downsampled ImageNet --------------------------------------------------------------------------------
def _npz_module(root, **kw):
    """The Chrabaszcz et al. npz release (data=imagenet<r>_chrabaszcz)."""
    return datamodule(f"imagenet{kw.pop('resolution', 32)}_chrabaszcz", root, **kw)


@pytest.mark.parametrize("resolution, subfolders", [(32, False), (32, True), (64, True)])
def test_imagenet_npz_channel_planar_and_labels(tmp_path, resolution, subfolders):
    r = resolution
    write_imagenet_npz(tmp_path, r, n_train=30, n_val=7, n_batches=3, subfolders=subfolders)
    dm = _npz_module(tmp_path, resolution=r, val_size=6, n_bits=8)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 7)
    vdir = tmp_path / f"Imagenet{r}_val_npz" if subfolders else tmp_path
    with np.load(vdir / "val_data.npz") as z:
        rows, labels = z["data"], z["labels"]
    x, y = _all(dm.test_dataset)
    assert x.shape == (7, 3, r, r) and x.dtype == torch.uint8
    c, i, j = 2, 5, 7
    assert int(x[3, c, i, j]) == int(rows[3, c * r * r + i * r + j])  # channel-planar, row-major
    assert y.tolist() == (labels - 1).tolist()  # 1-based on disk, 0-based here
    # all training batches are read, in order
    tdir = tmp_path / f"Imagenet{r}_train_npz" if subfolders else tmp_path
    with np.load(tdir / "train_data_batch_3.npz") as z:
        last = z["data"][-1]
    assert torch.equal(dm.train_dataset.images[29].reshape(-1), torch.from_numpy(last))
    line = dm.describe()
    assert line.startswith(f"imagenet{r}_chrabaszcz (Chrabaszcz et al. 2017 npz release, not comparable")
    assert "train 24 + val 6 images" in line and f"test 7 images from {vdir / 'val_data.npz'}" in line


def test_imagenet_ignores_subfolders_of_other_resolution(tmp_path):
    write_imagenet_npz(tmp_path, 32, n_train=10, n_val=3, subfolders=True)
    write_imagenet_npz(tmp_path, 64, n_train=12, n_val=4, subfolders=True)
    for r, n in ((32, 13), (64, 16)):
        dm = _npz_module(tmp_path, resolution=r, val_size=0)
        dm.setup()
        assert len(dm.train_dataset) + len(dm.test_dataset) == n
        assert dm.test_dataset.images.shape[-1] == r


def test_imagenet_png_folders(tmp_path):
    write_imagenet_png(tmp_path, 32, n_train=12, n_val=5)
    dm = datamodule("imagenet32", tmp_path, val_size=2, n_bits=4, batch_size=4, num_workers=0)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (10, 2, 5)
    x, y = _all(dm.test_dataset)
    expect = torch.from_numpy(random_images(17, 3, 32, 0)[12:]) >> 4
    assert torch.equal(x, expect) and y.tolist() == [0] * 5
    xb, yb, ib = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and int(xb.max()) <= 15 and yb.dtype == torch.int64 and ib.shape == (4,)
    assert dm.describe() == (f"imagenet32 (van den Oord et al. 2016 PNG release), 4-bit: train 10 + val 2 images "
                             f"from {tmp_path / 'train_32x32'}; test 5 images from {tmp_path / 'valid_32x32'}")


def test_imagenet_each_release_reads_only_its_own_files(tmp_path):
    write_imagenet_png(tmp_path, 32, n_train=5, n_val=2)
    write_imagenet_npz(tmp_path, 32, n_train=9, n_val=4)
    dm = datamodule("imagenet32", tmp_path, val_size=0)  # data=imagenet32: the paper's PNG release
    dm.setup()
    assert isinstance(dm.test_dataset, fd.ImageFileDataset) and len(dm.test_dataset) == 2
    assert "van den Oord" in dm.describe() and "valid_32x32" in dm.describe()
    dm = _npz_module(tmp_path, val_size=0)
    dm.setup()
    assert isinstance(dm.test_dataset, fd.TensorImageDataset) and len(dm.test_dataset) == 4
    assert "Chrabaszcz" in dm.describe() and "val_data.npz" in dm.describe()


def test_imagenet_npz_only_is_refused_by_the_paper_release(tmp_path):
    write_imagenet_npz(tmp_path, 32, n_train=9, n_val=4, subfolders=True)
    with pytest.raises(DataError) as e:
        datamodule("imagenet32", tmp_path, val_size=0).setup()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "Chrabaszcz" in msg and "not comparable" in msg
    assert "train_32x32/ and valid_32x32/" in msg and "data=imagenet32_chrabaszcz" in msg


def test_imagenet_png_only_is_refused_by_the_npz_release(tmp_path):
    write_imagenet_png(tmp_path, 64, n_train=3, n_val=2)
    with pytest.raises(DataError) as e:
        _npz_module(tmp_path, resolution=64, val_size=0).setup()
    msg = str(e.value)
    assert "van den Oord" in msg and "data=imagenet64 " in msg and "val_data.npz" in msg


def test_imagenet_missing_and_incomplete(tmp_path):
    with pytest.raises(DataError) as e:
        datamodule("imagenet32", tmp_path / "none").setup()
    assert str(tmp_path / "none") in str(e.value) and "valid_32x32" in str(e.value)
    with pytest.raises(DataError) as e:
        _npz_module(tmp_path / "none").setup()
    assert str(tmp_path / "none") in str(e.value) and "npz" in str(e.value)
    with pytest.raises(DataError, match="not found in"):
        datamodule("imagenet32", tmp_path).setup()  # exists but empty
    with pytest.raises(DataError, match="not found in"):
        _npz_module(tmp_path).setup()
    write_imagenet_png(tmp_path / "p", 32, n_train=2, n_val=1)
    (tmp_path / "p" / "valid_32x32" / "0.png").unlink()
    (tmp_path / "p" / "valid_32x32").rmdir()
    with pytest.raises(DataError, match="no valid_32x32/"):
        datamodule("imagenet32", tmp_path / "p").setup()
    write_imagenet_npz(tmp_path, 32, n_train=4, n_val=2)
    (tmp_path / "val_data.npz").unlink()
    with pytest.raises(DataError, match="no val_data.npz"):
        _npz_module(tmp_path).setup()


def test_imagenet_wrong_resolution_named(tmp_path):
    write_imagenet_npz(tmp_path, 64, n_train=4, n_val=2)
    with pytest.raises(DataError) as e:
        _npz_module(tmp_path, resolution=32, val_size=0).setup()
    assert "train_data_batch_1.npz" in str(e.value) and "data=imagenet64_chrabaszcz" in str(e.value)


@pytest.mark.parametrize("damage, name", [(truncate, "train_data_batch_2.npz"), (garbage, "val_data.npz")])
def test_imagenet_corrupt_npz_named(tmp_path, damage, name):
    write_imagenet_npz(tmp_path, 32, n_train=8, n_val=2)
    damage(tmp_path / name)
    with pytest.raises(DataError, match=str(tmp_path / name)):
        _npz_module(tmp_path, val_size=0).setup()


def test_imagenet_png_wrong_size_or_damaged_named_when_read(tmp_path):
    write_imagenet_png(tmp_path, 32, n_train=6, n_val=2)
    bad = tmp_path / "valid_32x32" / "1.png"
    Image.new("RGB", (64, 64)).save(bad)
    dm = datamodule("imagenet32", tmp_path, val_size=0)
    dm.setup("test")
    with pytest.raises(DataError, match=str(bad)):
        dm.test_dataset[1]
    truncate(bad)
    with pytest.raises(DataError, match="data.skip_corrupt=true") as e:
        dm.test_dataset[1]
    assert str(bad) in str(e.value)


# ---- CelebA-HQ ----------------------------------------------------------------------------------------
def test_celebahq_split_by_natural_file_order_and_resize(tmp_path):
    write_celebahq(tmp_path, n=20, size=64)
    dm = datamodule("celebahq256", tmp_path, image_size=32, val_size=3, n_bits=5)
    assert dm.n_bits == 5 and dm.image_size == 32 and dm.channels == 3
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (15, 3, 2)
    assert [p.name for p in dm.test_dataset.paths] == ["18.png", "19.png"]  # not "8.png", "9.png"
    x, y, i = dm.test_dataset[0]
    assert i == 0 and x.shape == (3, 32, 32) and x.dtype == torch.uint8 and int(x.max()) <= 31 and y == 0
    with Image.open(tmp_path / "18.png") as im:
        ref = np.asarray(im.resize((32, 32), Image.Resampling.LANCZOS)).transpose(2, 0, 1) >> 3
    assert torch.equal(x, torch.from_numpy(ref.copy()))


@pytest.mark.parametrize("n, held_out", [(30000, 3000), (20, 2), (25, 3), (24, 2), (2, 0), (1000, 100)])
def test_celebahq_held_out_share(n, held_out):
    assert celebahq_split(n) == held_out


def test_celebahq_native_size_kept_and_jpg_in_subfolders(tmp_path):
    write_celebahq(tmp_path / "a", n=6, size=32, ext="jpg")
    write_celebahq(tmp_path / "b" / "c", n=5, size=32, ext="JPEG", seed=1)
    (tmp_path / "notes.txt").write_text("not an image")
    dm = datamodule("celebahq256", tmp_path, image_size=32, n_bits=8, val_size=0)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.test_dataset) == 11
    x, _, _ = dm.test_dataset[0]
    with Image.open(dm.test_dataset.paths[0]) as im:
        assert torch.equal(x, torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()))


def test_celebahq_non_square_and_grey_images(tmp_path):
    write_celebahq(tmp_path, n=4, size=16)
    Image.new("L", (40, 30), color=200).save(tmp_path / "9.png")
    dm = datamodule("celebahq256", tmp_path, image_size=16, n_bits=8, val_size=0)
    dm.setup("test")
    x, _, _ = dm.test_dataset[0]
    assert [p.name for p in dm.test_dataset.paths] == ["9.png"]
    assert x.shape == (3, 16, 16) and int(x.min()) == int(x.max()) == 200


def test_celebahq_hflip_only_on_train(tmp_path):
    write_celebahq(tmp_path, n=10, size=8)
    dm = datamodule("celebahq256", tmp_path, image_size=8, n_bits=8, val_size=2, hflip=True)
    dm.setup()
    for ds, expect in ((dm.train_dataset, 2), (dm.val_dataset, 1), (dm.test_dataset, 1)):
        assert len({ds[0][0].numpy().tobytes() for _ in range(30)}) == expect


def test_celebahq_corrupt_named_or_skipped_with_count(tmp_path):
    paths = write_celebahq(tmp_path, n=20, size=16)
    garbage(paths[3])
    garbage(paths[12], seed=1)
    paths[19].write_bytes(b"")
    with pytest.raises(DataError) as e:
        datamodule("celebahq256", tmp_path, image_size=16, val_size=0).setup()
    assert str(paths[3]) in str(e.value) and "data.skip_corrupt=true" in str(e.value)
    dm = datamodule("celebahq256", tmp_path, image_size=16, val_size=2, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipped 3 unreadable image"):
        dm.setup()
    # the split stays where the file names put it: 18 + 2, minus the skipped ones
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (14, 2, 1)
    assert [p.name for p in dm.test_dataset.paths] == ["18.png"]


def test_celebahq_damaged_inside_found_when_decoded(tmp_path):
    paths = write_celebahq(tmp_path, n=10, size=32)
    truncate(paths[2], keep=0.6)  # header intact, pixel data cut: passes the scan, fails on decoding
    truncate(paths[9], keep=0.6)  # the only held-out image
    dm = datamodule("celebahq256", tmp_path, image_size=32, val_size=0)
    dm.setup()
    with pytest.raises(DataError) as e:
        dm.train_dataset[2]
    assert str(paths[2]) in str(e.value) and "data.skip_corrupt=true" in str(e.value)
    dm = datamodule("celebahq256", tmp_path, image_size=32, val_size=0, skip_corrupt=True)
    dm.setup()
    with pytest.warns(UserWarning, match="2.png"):
        x, _, i = dm.train_dataset[2]
    assert torch.equal(x, dm.train_dataset[3][0])  # the next readable image is served instead
    assert i == 2  # under the index of the position asked for: each position counts once
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 images"):
        dm.test_dataset[0]


def test_celebahq_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "none")):
        datamodule("celebahq256", tmp_path / "none").setup()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg"):
        datamodule("celebahq256", tmp_path).setup()
    write_celebahq(tmp_path, n=1, size=8)
    with pytest.raises(DataError, match="at least 2"):
        datamodule("celebahq256", tmp_path).setup()


# ---- MNIST / Fashion-MNIST ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    write_idx(tmp_path, n_train=30, n_test=10, gz=gz)
    dm = datamodule("mnist", tmp_path, val_size=5, n_bits=3)
    assert (dm.channels, dm.image_size, dm.num_classes) == (1, 28, 10)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (25, 5, 10)
    x, y = _all(dm.test_dataset)
    assert x.shape == (10, 1, 28, 28) and int(x.max()) <= 7
    assert torch.equal(x, torch.from_numpy(random_images(40, 1, 28, 0)[30:]) >> 5)
    assert y.dtype == torch.int64 and int(y.max()) <= 9


def test_mnist_found_in_torchvision_layout(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", n_train=10, n_test=4)
    dm = datamodule("mnist", tmp_path, val_size=0)
    dm.setup()
    assert len(dm.train_dataset) == 10


@pytest.mark.parametrize("case", ["magic", "truncated", "truncated_gz", "count"])
def test_mnist_bad_idx_named(tmp_path, case):
    files = write_idx(tmp_path, n_train=10, n_test=4, gz=case != "truncated",
                      magic={"t10k-labels-idx1-ubyte": 2051} if case == "magic" else None)
    target = {"magic": "t10k-labels-idx1-ubyte", "truncated": "train-images-idx3-ubyte",
              "truncated_gz": "train-images-idx3-ubyte", "count": "train-labels-idx1-ubyte"}[case]
    if case.startswith("truncated"):
        truncate(files[target], keep=0.7)
    if case == "count":
        write_idx(tmp_path / "other", n_train=9, n_test=4)
        files[target].write_bytes((tmp_path / "other" / (target + ".gz")).read_bytes())
    with pytest.raises(DataError) as e:
        datamodule("mnist", tmp_path, val_size=0).setup()
    assert str(files[target]) in str(e.value)
    if case == "magic":
        assert "2051" in str(e.value) and "2049" in str(e.value)


def test_mnist_missing(tmp_path):
    with pytest.raises(DataError) as e:
        datamodule("mnist", tmp_path / "m").setup()
    assert str(tmp_path / "m") in str(e.value) and "train-images-idx3-ubyte" in str(e.value)


def test_fashion_mnist_falls_back_to_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_idx(system, n_train=12, n_test=3)
    monkeypatch.setattr(fd.FashionMNISTDataModule, "system_dir", system)
    dm = datamodule("fashion_mnist", tmp_path / "empty", val_size=2)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (10, 3)
    write_idx(tmp_path / "own", n_train=8, n_test=2)  # the root wins when it has the files
    dm = datamodule("fashion_mnist", tmp_path / "own", val_size=0)
    dm.setup()
    assert len(dm.train_dataset) == 8
    monkeypatch.setattr(fd.FashionMNISTDataModule, "system_dir", tmp_path / "absent")
    with pytest.raises(DataError) as e:
        datamodule("fashion_mnist", tmp_path / "empty").setup()
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and str(tmp_path / "absent") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


@pytest.mark.skipif(not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files(tmp_path):
    dm = datamodule("fashion_mnist", tmp_path / "nothing-here", val_size=0)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (60000, 10000)
    assert dm.train_dataset.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(dm.train_dataset.labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_dataset.labels).tolist() == [1000] * 10
    assert int(dm.train_dataset.images.max()) == 255


# ---- Lightning and the configs ---------------------------------------------------------------------------------
def test_lightning_fit_and_test_see_the_right_images(tmp_path):
    import pytorch_lightning as pl

    write_idx(tmp_path, n_train=42, n_test=10)

    class Counter(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.seen = {"train": 0, "val": 0, "test": 0}

        def training_step(self, batch, i):
            self.seen["train"] += len(batch[0])
            return (self.p - batch[0].float().mean()) ** 2

        def validation_step(self, batch, i):
            self.seen["val"] += len(batch[0])

        def test_step(self, batch, i):
            self.seen["test"] += len(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_size, expect in ((8, {"train": 32, "val": 8, "test": 10}), (0, {"train": 40, "val": 0, "test": 10})):
        m = Counter()
        trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        dm = datamodule("mnist", tmp_path, batch_size=4, val_size=val_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(m, dm)
            trainer.test(m, dm, verbose=False)
        assert m.seen == expect




def _compose(name, data_dir, overrides=()):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    cfg.merge_with_dotlist(list(overrides))
    return cfg


def test_config_files_cover_every_datamodule():
    from omegaconf import OmegaConf

    classes = {n for n in fd.__all__ if n.endswith("DataModule") and n != "FlowDataModule"}
    assert {OmegaConf.load(CONF / f"{n}.yaml")._target_ for n in CONFIGS} == {f"flowlab.data.{c}" for c in classes}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_fake_data(name, fake_data_dir):
    from hydra.utils import instantiate

    cfg = _compose(name, fake_data_dir, SMALL_OVERRIDES)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (4, dm.channels, dm.image_size, dm.image_size) and x.dtype == torch.uint8
    assert int(x.max()) < 2 ** dm.n_bits and y.dtype == torch.int64 and index.dtype == torch.int64
    dm.setup("test")
    assert len(dm.test_dataset) > 0
    assert dm.name == name and str(fake_data_dir) in dm.describe()


@pytest.mark.parametrize("key", ["hflip", "pin_memory", "skip_corrupt"])
def test_switches_must_be_booleans(key):
    with pytest.raises(ConfigError, match=f"data.{key}='false'"):
        datamodule("celebahq256", "/x", **{key: "false"})
