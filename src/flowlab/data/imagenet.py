"""Downsampled ImageNet, 32x32 or 64x64, in the two releases in circulation; ``release`` picks one.

``oord`` (``data=imagenet32``/``imagenet64``): van den Oord et al. (2016), the release Glow, RealNVP, Emerging
  convolutions and the n×n paper report bits/dim on (Table 2). PNG folders ``train_<r>x<r>/`` + ``valid_<r>x<r>/``
  (searched recursively), no labels, decoded lazily.
``chrabaszcz`` (``data=imagenet<r>_chrabaszcz``): the npz batches of Chrabaszcz et al. (2017), box-resized, i.e. a
  different data set whose bits/dim are NOT comparable with the paper's. ``train_data_batch_<i>.npz`` + ``val_data.npz``
  with ``data`` uint8 rows of ``3*r*r`` channel-planar values and ``labels`` 1..1000; held in memory (ImageNet32
  ~3.9 GB, ImageNet64 ~15.7 GB).

Files are looked for in ``root`` and its direct subfolders (as the releases unpack), skipping subfolders named for
another resolution. Each release reads only its own files: finding only the other's is a DataError that says so.
Test = the validation images; the validation split is carved out of the training images.
"""

from __future__ import annotations

import re
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FileSource, FlowDataModule, TensorSource, check_arrays, read_file
from flowlab.data.datasets import find_images, natural_key
from flowlab.errors import ConfigError, DataError

#: data.release -> what it is, in the words describe() prints, and its (training, test) files
RELEASES = {
    "oord": "van den Oord et al. 2016 PNG release",
    "chrabaszcz": "Chrabaszcz et al. 2017 npz release, not comparable with the paper's Table 2",
}
FILES = {"oord": ("train_{r}x{r}/", "valid_{r}x{r}/"), "chrabaszcz": ("train_data_batch_*.npz", "val_data.npz")}
HOW_TO_GET = {
    "oord": ("Download the van den Oord et al. (2016) downsampled ImageNet (train_{r}x{r}.tar and valid_{r}x{r}.tar, "
             "formerly at image-net.org/small/download.php) and unpack them into {root}, so that it holds "
             "train_{r}x{r}/ and valid_{r}x{r}/"),
    "chrabaszcz": ("Download the npz files of Chrabaszcz et al.'s downsampled ImageNet (Imagenet{r}_train_npz / "
                   "Imagenet{r}_val_npz, from image-net.org's 'Downsampled ImageNet' page, login required) and "
                   "unzip them into {root}"),
}


def read_npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` in an npz file, read from its header without loading it."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["data"], z["labels"]


class ImageNetDownsampledDataModule(FlowDataModule):
    """ImageNet 32x32 or 64x64 of one ``release``: "oord" (PNG folders, no labels; what the paper reports on) or
    "chrabaszcz" (npz batches, labels 0..999; a different, not comparable data set)."""

    native_channels = 3

    def __init__(self, root, *, resolution: int, release: str, **kwargs):
        if resolution not in (32, 64) or isinstance(resolution, bool):
            raise ConfigError(f"data.resolution={resolution!r} is not allowed: it must be 32 or 64 "
                              "(data=imagenet32 or data=imagenet64)")
        if release not in RELEASES:
            raise ConfigError(f"data.release={release!r} is not allowed: it must be 'oord' (the van den Oord et al. "
                              f"2016 PNG folders the paper reports on; data=imagenet{resolution}) or 'chrabaszcz' "
                              f"(the Chrabaszcz et al. 2017 npz batches; data=imagenet{resolution}_chrabaszcz)")
        self.resolution, self.release, self.native_image_size = resolution, release, resolution
        self.name = f"imagenet{resolution}" + ("_chrabaszcz" if release == "chrabaszcz" else "")
        self.form = RELEASES[release]
        self.num_classes = 1000 if release == "chrabaszcz" else 1  # the PNG release has no labels
        super().__init__(root, **kwargs)
        self._found: dict[str, list[Path]] | None = None

    # ---- locating the files --------------------------------------------------------------------
    def _how_to_get(self) -> str:
        return HOW_TO_GET[self.release].format(r=self.resolution, root=self.root)

    def _find(self, release: str) -> list[list[Path]]:
        """The training and test files (or folders) of ``release`` in ``root`` and its direct subfolders, minus
        those named for another resolution."""
        if not self.root.is_dir():
            return [[], []]
        dirs = [self.root]
        for d in sorted(self.root.iterdir(), key=natural_key):
            m = re.search(r"imagenet_?(\d+)", d.name, re.IGNORECASE)
            if d.is_dir() and not d.name.startswith(".") and not (m and int(m.group(1)) != self.resolution):
                dirs.append(d)
        found = []
        for pattern in (f.format(r=self.resolution) for f in FILES[release]):
            is_wanted = Path.is_dir if pattern.endswith("/") else Path.is_file
            found.append([p for d in dirs for p in sorted(d.glob(pattern.rstrip("/"))) if is_wanted(p)])
        return found

    def _locate(self) -> dict[str, list[Path]]:
        """The training and test files of ``release``; only its own (the other release's files are refused)."""
        if self._found is not None:
            return self._found
        r, root, how = self.resolution, self.root, self._how_to_get()
        train, test = self._find(self.release)
        want_train, want_test = (f.format(r=r) for f in FILES[self.release])
        other = "chrabaszcz" if self.release == "oord" else "oord"
        if not train and not test and any(self._find(other)):
            other_name = f"imagenet{r}" + ("_chrabaszcz" if other == "chrabaszcz" else "")
            raise DataError(f"{root} holds {' and '.join(FILES[other]).format(r=r)}, the {RELEASES[other]}, but "
                            f"data={self.name} reads only the {RELEASES[self.release]} ({want_train} and {want_test}); "
                            f"the two are downsampled differently and their bits/dim are not comparable. Place "
                            f"{want_train} and {want_test} in {root}, or, to use the other release knowingly, run with "
                            f"data={other_name} data.root={root}")
        if not train and not test:
            raise DataError(f"ImageNet {r}x{r} ({RELEASES[self.release]}) not found in {root}: no {want_train} + "
                            f"{want_test} there or in its subfolders. {how}")
        if not train or not test:
            raise DataError(f"found {(train or test)[0]} but no {want_test if train else want_train} in {root} or its "
                            f"subfolders. {how}")
        if self.release == "chrabaszcz":
            names = [p.name for p in train]
            if len(test) > 1:
                raise DataError(f"more than one val_data.npz under {root}: {', '.join(map(str, test))}; keep one")
            if len(set(names)) < len(names):
                dupe = sorted(n for n in names if names.count(n) > 1)[0]
                raise DataError(f"{dupe} appears in more than one folder under {root}; keep one copy")
            train = sorted(train, key=lambda p: natural_key(Path(p.name)))
        self._found = {"train": train, "test": test[:1]}
        return self._found

    # ---- reading -------------------------------------------------------------------------------
    def _read_npz(self, paths: list[Path]) -> TensorSource:
        """The batches into one preallocated array: headers first (counts and shapes), then the data."""
        r, row, counts = self.resolution, 3 * self.resolution**2, []
        for p in paths:
            shape, dtype = read_file(p, partial(read_npz_header, key="data"), "download it again")
            if len(shape) != 2 or dtype != np.uint8 or shape[1] != row:
                other = {3 * 32 * 32: 32, 3 * 64 * 64: 64}.get(shape[1] if len(shape) == 2 else None)
                hint = f" (that is {other}x{other} data: use data=imagenet{other}_chrabaszcz)" if other else ""
                raise DataError(f"{p} holds data {dtype} {tuple(shape)}, expected uint8 rows of {row} = 3*{r}*{r} "
                                f"values{hint}")
            counts.append(shape[0])
        images = np.empty((sum(counts), row), dtype=np.uint8)
        labels = np.empty(sum(counts), dtype=np.int64)
        o = 0
        for p, n in zip(paths, counts):
            data, lab = check_arrays(str(p), *read_file(p, _load_npz, "download it again"), (row,), 1, 1000)
            images[o:o + n], labels[o:o + n] = data, lab - 1  # 1-based on disk
            o += n
        origin = str(paths[0]) if len(paths) == 1 else f"{len(paths)} train_data_batch_*.npz files in {self.root}"
        return TensorSource(torch.from_numpy(images).view(-1, 3, r, r), torch.from_numpy(labels), origin)

    def _png(self, folder: Path) -> FileSource:
        paths = find_images(folder, (".png",))  # not checked here (1.28M files): a damaged one is named when decoded
        if not paths:
            raise DataError(f"no PNG images in {folder}. {self._how_to_get()}")
        return FileSource(paths, str(folder), exact_size=True)

    def _load(self, split: str) -> TensorSource | FileSource:
        files = self._locate()[split]
        return self._png(files[0]) if self.release == "oord" else self._read_npz(files)
