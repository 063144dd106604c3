"""Small datasets written in the exact on-disk formats flowlab reads, plus ways to damage them.

Every writer takes the folder to write into (created if needed), fills images with seeded random
uint8 values and returns the folder or files it wrote. The folder names match ``conf/data``:
with ``paths.data_dir=D``, ``write_all(D)`` makes every ``data=<choice>`` loadable.

    from tests.fakedata import write_all, SMALL_OVERRIDES
    data_dir = write_all(tmp_path / "data")
    # flowlab-train paths.data_dir=<data_dir> data=cifar10 *SMALL_OVERRIDES ...

The fixture ``fake_data_dir`` in tests/conftest.py does this once per test session.

Formats:
  write_cifar10      <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: pickle
                     (protocol 2) dicts with "data" uint8 [N, 3072] channel-planar, "labels" list of int,
                     as torchvision reads them (keys str, or bytes with keys="bytes").
  write_imagenet_npz Chrabaszcz et al.'s release (data=imagenet<r>_chrabaszcz):
                     <root>/{train_data_batch_<i>.npz, val_data.npz} (or the release's subfolders
                     Imagenet<r>_train_npz/ + Imagenet<r>_val_npz/): "data" uint8 [N, 3*r*r]
                     channel-planar, "labels" 1..1000 (train batches also hold "mean").
  write_imagenet_png van den Oord et al.'s release (data=imagenet<r>):
                     <root>/{train_<r>x<r>, valid_<r>x<r>}/<i>.png
  write_celebahq     <root>/<i>.png|jpg (natural order = split order)
  write_idx          <root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
  write_svhn         <root>/{train_32x32,test_32x32}.mat: MATLAB v5, "X" uint8 [32, 32, 3, N], "y" [N, 1] in 1..10
Damage: truncate(path), garbage(path), write_idx(..., magic=...) for a wrong magic number.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SMALL_OVERRIDES",
    "write_cifar10",
    "write_imagenet_npz",
    "write_imagenet_png",
    "write_celebahq",
    "write_idx",
    "write_svhn",
    "write_all",
    "truncate",
    "garbage",
    "random_images",
]

#: Hydra overrides that make the default data configs fit the small fake datasets of ``write_all``.
SMALL_OVERRIDES = ["data.batch_size=4", "data.val_size=0.2", "data.num_workers=0"]


def random_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Seeded uint8 images ``[n, channels, size, size]`` over the full 0..255 range."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


def _labels(n: int, high: int, seed: int, low: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(low, high, size=n).astype(np.int64)


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ---- CIFAR-10 -------------------------------------------------------------------------------------
def write_cifar10(root, n_train: int = 50, n_test: int = 20, seed: int = 0, keys: str = "str") -> Path:
    """CIFAR-10 python batches under ``<root>/cifar-10-batches-py``; returns that folder.

    ``n_train`` images are spread over data_batch_1..5 (the first batches get the remainder).
    ``keys="bytes"`` writes b"data"/b"labels" keys (as ``pickle.load(..., encoding="bytes")`` shows
    the original files); the default str keys are what torchvision reads with ``encoding="latin1"``.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s.encode()) if keys == "bytes" else (lambda s: s)
    images = random_images(n_train + n_test, 3, 32, seed).reshape(n_train + n_test, 3072)
    labels = _labels(n_train + n_test, 10, seed)
    batches = [(f"data_batch_{i + 1}", n) for i, n in enumerate(_split(n_train, 5))] + [("test_batch", n_test)]
    o = 0
    for name, n in batches:
        d = {k("batch_label"): f"fake {name}", k("labels"): labels[o:o + n].tolist(),
             k("data"): images[o:o + n].copy(), k("filenames"): [f"img_{o + j}.png" for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        o += n
    meta = {k("num_cases_per_batch"): _split(n_train, 5)[0], k("num_vis"): 3072,
            k("label_names"): ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


# ---- downsampled ImageNet -----------------------------------------------------------------------------
def write_imagenet_npz(root, resolution: int = 32, n_train: int = 40, n_val: int = 10, n_batches: int = 2,
                       subfolders: bool = False, compressed: bool = False, seed: int = 0) -> Path:
    """``train_data_batch_1..n_batches.npz`` + ``val_data.npz`` in ``root``, or with ``subfolders`` in
    ``root/Imagenet<r>_train_npz`` and ``root/Imagenet<r>_val_npz`` as the release's zips unpack. Returns root."""
    root = Path(root)
    r = resolution
    tdir = root / f"Imagenet{r}_train_npz" if subfolders else root
    vdir = root / f"Imagenet{r}_val_npz" if subfolders else root
    tdir.mkdir(parents=True, exist_ok=True)
    vdir.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    images = random_images(n_train + n_val, 3, r, seed).reshape(n_train + n_val, 3 * r * r)
    labels = _labels(n_train + n_val, 1001, seed, low=1)  # 1-based, as released
    mean = images[:n_train].mean(axis=0) if n_train else np.zeros(3 * r * r)
    o = 0
    for i, n in enumerate(_split(n_train, n_batches)):
        save(tdir / f"train_data_batch_{i + 1}.npz", data=images[o:o + n], labels=labels[o:o + n], mean=mean)
        o += n
    save(vdir / "val_data.npz", data=images[n_train:], labels=labels[n_train:])
    return root


def write_imagenet_png(root, resolution: int = 32, n_train: int = 20, n_val: int = 8, seed: int = 0) -> Path:
    """PNG folders ``root/train_<r>x<r>/<i>.png`` and ``root/valid_<r>x<r>/<i>.png``. Returns root."""
    root = Path(root)
    r = resolution
    images = random_images(n_train + n_val, 3, r, seed)
    for name, part in ((f"train_{r}x{r}", images[:n_train]), (f"valid_{r}x{r}", images[n_train:])):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(part):
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i}.png")
    return root


# ---- CelebA-HQ ---------------------------------------------------------------------------------------
def write_celebahq(root, n: int = 20, size: int = 256, ext: str = "png", seed: int = 0,
                   smooth: bool = False) -> list[Path]:
    """``n`` RGB images ``root/<i>.<ext>`` of ``size`` x ``size`` (ext png, jpg or jpeg); returns the
    paths in natural order. ``smooth`` writes gradients instead of noise (resizing keeps them close)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if smooth:
        ramp = np.linspace(0, 255, size, dtype=np.float64)
        base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                         np.tile(ramp, (size, 1))]).astype(np.uint8)
        images = np.stack([np.roll(base, i, axis=2) for i in range(n)])
    else:
        images = random_images(n, 3, size, seed)
    paths = []
    for i in range(n):
        p = root / f"{i}.{ext}"
        Image.fromarray(images[i].transpose(1, 2, 0)).save(p, **({} if ext == "png" else {"quality": 95}))
        paths.append(p)
    return paths


# ---- MNIST / Fashion-MNIST IDX ----------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(root, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0,
              magic: dict[str, int] | None = None) -> dict[str, Path]:
    """The four MNIST-format IDX files in ``root`` (``.gz`` when ``gz``); returns ``{stem: path}``.

    ``magic`` overrides the magic number of some files, e.g. ``{"train-images-idx3-ubyte": 1234}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = random_images(n_train + n_test, 1, 28, seed)[:, 0]
    labels = _labels(n_train + n_test, 10, seed).astype(np.uint8)
    content = {
        "train-images-idx3-ubyte": (images[:n_train], 2051),
        "train-labels-idx1-ubyte": (labels[:n_train], 2049),
        "t10k-images-idx3-ubyte": (images[n_train:], 2051),
        "t10k-labels-idx1-ubyte": (labels[n_train:], 2049),
    }
    out = {}
    for stem, (arr, m) in content.items():
        raw = _idx_bytes(arr, (magic or {}).get(stem, m))
        p = root / (stem + ".gz" if gz else stem)
        p.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        out[stem] = p
    return out


# ---- SVHN .mat ------------------------------------------------------------------------------------------
def write_svhn(root, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train_32x32.mat`` and ``test_32x32.mat`` in ``root`` as the official release (label 10 = digit 0, and
    every label 1..10 occurs when n >= 10); returns ``{split: (images [N, 3, 32, 32], labels 1..10 [N])}``."""
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images = random_images(n, 3, 32, s)
        labels = (np.arange(n) % 10 + 1).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": labels[:, None]})
        out[split] = (images, labels)
    return out


# ---- everything at once ------------------------------------------------------------------------------
def write_all(data_dir, seed: int = 0) -> Path:
    """Every dataset small, in the folders ``conf/data`` expects under ``paths.data_dir``:
    cifar-10-batches-py/, imagenet32/ and imagenet64/ (van den Oord PNG folders),
    imagenet32_chrabaszcz/ (npz, release subfolders) and imagenet64_chrabaszcz/ (npz),
    celebahq256/ (20 PNGs, 256x256), mnist/ and fashion-mnist/ (gzipped IDX), svhn/ (.mat). Returns data_dir.
    With ``SMALL_OVERRIDES`` every ``data=<choice>`` trains for at least one batch."""
    d = Path(data_dir)
    write_cifar10(d, n_train=40, n_test=10, seed=seed)
    write_imagenet_png(d / "imagenet32", 32, n_train=40, n_val=10, seed=seed)
    write_imagenet_png(d / "imagenet64", 64, n_train=40, n_val=10, seed=seed)
    write_imagenet_npz(d / "imagenet32_chrabaszcz", 32, n_train=40, n_val=10, subfolders=True, seed=seed)
    write_imagenet_npz(d / "imagenet64_chrabaszcz", 64, n_train=40, n_val=10, seed=seed)
    write_celebahq(d / "celebahq256", n=20, size=256, seed=seed)
    write_idx(d / "mnist", n_train=40, n_test=10, seed=seed)
    write_idx(d / "fashion-mnist", n_train=40, n_test=10, seed=seed)
    write_svhn(d / "svhn", n_train=40, n_test=10, seed=seed)
    return d


# ---- damage ----------------------------------------------------------------------------------------------
def truncate(path, keep: float = 0.5) -> Path:
    """Cut a file to the first ``keep`` fraction of its bytes (as an interrupted download leaves it)."""
    path = Path(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def garbage(path, n_bytes: int = 512, seed: int = 0) -> Path:
    """Overwrite a file with random bytes (no valid header of any format)."""
    path = Path(path)
    path.write_bytes(b"\x00junk" + np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return path
