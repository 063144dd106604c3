"""Downsampled ImageNet (32x32 or 64x64) in the two releases in circulation; ``release`` picks one.

``release="oord"`` (default; ``data=imagenet32`` / ``data=imagenet64``): the van den Oord et al. (2016)
  release, the one Glow, RealNVP, Emerging convolutions and the n×n paper report bits/dim on (Table 2).
  Folders ``train_<r>x<r>/`` and ``valid_<r>x<r>/`` of PNG files (searched recursively) in ``<root>``
  or a direct subfolder, as ``train_32x32.tar`` / ``valid_32x32.tar`` unpack. They carry no labels:
  every label is 0. Images are decoded lazily.

``release="chrabaszcz"`` (``data=imagenet32_chrabaszcz`` / ``data=imagenet64_chrabaszcz``): the npz
  "Downsampled ImageNet" of Chrabaszcz et al. (2017), box-resized, i.e. downsampled differently: it is
  a different data set whose bits/dim come out much lower and are NOT comparable with the paper's
  numbers. ``train_data_batch_<i>.npz`` and ``val_data.npz``, each with ``data`` uint8 rows of length
  ``3*r*r`` in channel-planar order (all red, then green, then blue values, each row-major) and
  ``labels`` 1..1000. They are looked for in ``<root>`` and in its direct subfolders, which covers
  the release's zip folders (``Imagenet32_train_npz/``, ``Imagenet32_val_npz/``,
  ``Imagenet64_train_part1_npz/``, ``Imagenet64_train_part2_npz/``, ``Imagenet64_val_npz/``).
  The whole set is held in memory as one uint8 tensor (ImageNet32 ~3.9 GB, ImageNet64 ~15.7 GB).

Each release reads only its own files: a folder holding only the other release's files is a
DataError that says so (never a silent switch). Subfolders whose name says another resolution
(``Imagenet64_...`` when r=32) are ignored. Test = the validation images (what the papers report);
the validation split is carved out of the training images. ``describe()`` names the release read.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FileSource, FlowDataModule, TensorSource
from flowlab.data.files import find_images, natural_key
from flowlab.errors import ConfigError, DataError

__all__ = ["ImageNetDownsampledDataModule", "read_npz_header"]

RESOLUTIONS = (32, 64)
#: data.release -> what it is, in the words describe() prints
RELEASES = {
    "oord": "van den Oord et al. 2016 PNG release",
    "chrabaszcz": "Chrabaszcz et al. 2017 npz release, not comparable with the paper's Table 2",
}
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
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


class ImageNetDownsampledDataModule(FlowDataModule):
    """ImageNet 32x32 or 64x64 of one ``release``: "oord" (PNG folders, no labels; what the paper reports
    on) or "chrabaszcz" (npz batches, labels 0..999; a different, not comparable data set)."""

    native_channels = 3

    def __init__(self, root, resolution: int = 32, release: str = "oord", batch_size: int = 64,
                 num_workers: int = 4, pin_memory: bool = False, n_bits: int = 8, hflip: bool = False,
                 val_size: int | float = 10000, seed: int = 0, image_size: int | None = None,
                 channels: int | None = 3, n_classes: int | None = None):
        if resolution not in RESOLUTIONS or isinstance(resolution, bool):
            raise ConfigError(f"data.resolution={resolution!r} is not allowed: it must be 32 or 64 "
                              "(data=imagenet32 or data=imagenet64)")
        if release not in RELEASES:
            raise ConfigError(f"data.release={release!r} is not allowed: it must be 'oord' (the van den Oord et al. "
                              f"2016 PNG folders the paper reports on; data=imagenet{resolution}) or 'chrabaszcz' "
                              f"(the Chrabaszcz et al. 2017 npz batches; data=imagenet{resolution}_chrabaszcz)")
        self.resolution = int(resolution)
        self.release = release
        self.native_image_size = self.resolution
        self.name = f"imagenet{self.resolution}" + ("_chrabaszcz" if release == "chrabaszcz" else "")
        self.form = RELEASES[release]
        self.num_classes = 1000 if release == "chrabaszcz" else 1  # the PNG release has no labels
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         n_bits=n_bits, hflip=hflip, val_size=val_size, seed=seed, image_size=image_size,
                         channels=channels, n_classes=n_classes)
        self._found: tuple | None = None

    # ---- locating the files --------------------------------------------------------------------
    def _dirs(self) -> list[Path]:
        """``root`` and its direct subfolders, minus those named for another resolution."""
        if not self.root.is_dir():
            return []
        subs = []
        for d in sorted(self.root.iterdir(), key=natural_key):
            if not d.is_dir() or d.name.startswith("."):
                continue
            m = re.search(r"imagenet_?(\d+)", d.name, re.IGNORECASE)
            if m and int(m.group(1)) != self.resolution:
                continue
            subs.append(d)
        return [self.root, *subs]

    def _how_to_get(self) -> str:
        return HOW_TO_GET[self.release].format(r=self.resolution, root=self.root)

    def _locate(self) -> tuple:
        """``("npz", [train files], val file)`` or ``("png", train folder, valid folder)``, of ``release`` only."""
        if self._found is not None:
            return self._found
        r = self.resolution
        if not self.root.is_dir():
            raise DataError(f"ImageNet {r}x{r} ({RELEASES[self.release]}) not found: {self.root} does not exist. "
                            f"{self._how_to_get()}")
        dirs = self._dirs()
        train = [p for d in dirs for p in d.glob("train_data_batch_*.npz") if p.is_file()]
        val = [d / "val_data.npz" for d in dirs if (d / "val_data.npz").is_file()]
        tr = [d / f"train_{r}x{r}" for d in dirs if (d / f"train_{r}x{r}").is_dir()]
        va = [d / f"valid_{r}x{r}" for d in dirs if (d / f"valid_{r}x{r}").is_dir()]
        if self.release == "oord":
            self._found = self._locate_png(tr, va, other_found=bool(train or val))
        else:
            self._found = self._locate_npz(train, val, other_found=bool(tr or va))
        return self._found

    def _locate_png(self, tr: list[Path], va: list[Path], other_found: bool) -> tuple:
        r = self.resolution
        if tr and va:
            return ("png", tr[0], va[0])
        if tr or va:
            have, lack = (tr[0], f"valid_{r}x{r}") if tr else (va[0], f"train_{r}x{r}")
            raise DataError(f"found {have} but no {lack}/ beside it under {self.root}. {self._how_to_get()}")
        if other_found:
            raise DataError(f"{self.root} holds train_data_batch_*.npz/val_data.npz, the Chrabaszcz et al. (2017) "
                            f"npz release of downsampled ImageNet, but data=imagenet{r} reads only the van den Oord "
                            f"et al. (2016) PNG release the paper reports on (the npz release is downsampled "
                            f"differently and its bits/dim are not comparable with the paper's). Place "
                            f"train_{r}x{r}/ and valid_{r}x{r}/ in {self.root}, or, to use the npz release "
                            f"knowingly, run with data=imagenet{r}_chrabaszcz data.root={self.root}")
        raise DataError(f"ImageNet {r}x{r} not found in {self.root}: no train_{r}x{r}/ + valid_{r}x{r}/ PNG folders "
                        f"(the van den Oord et al. 2016 release) there or in its subfolders. {self._how_to_get()}")

    def _locate_npz(self, train: list[Path], val: list[Path], other_found: bool) -> tuple:
        r = self.resolution
        if not train and not val:
            if other_found:
                raise DataError(f"{self.root} holds train_{r}x{r}/ or valid_{r}x{r}/, the van den Oord et al. (2016) "
                                f"PNG release, but data=imagenet{r}_chrabaszcz reads only the Chrabaszcz et al. (2017) "
                                f"npz batches. Use data=imagenet{r} for the PNG release (the one the paper reports "
                                f"on), or place train_data_batch_*.npz and val_data.npz in {self.root}")
            raise DataError(f"ImageNet {r}x{r} (Chrabaszcz et al. 2017 npz release) not found in {self.root}: no "
                            f"train_data_batch_*.npz/val_data.npz there or in its subfolders. {self._how_to_get()}")
        if not train:
            raise DataError(f"found {val[0]} but no train_data_batch_*.npz in {self.root} or its "
                            f"subfolders. {self._how_to_get()}")
        if not val:
            raise DataError(f"found {len(train)} train_data_batch_*.npz files but no val_data.npz in "
                            f"{self.root} or its subfolders. {self._how_to_get()}")
        if len(val) > 1:
            raise DataError(f"more than one val_data.npz under {self.root}: {', '.join(map(str, val))}; keep one")
        names = [p.name for p in train]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{dupes[0]} appears in more than one folder under {self.root}; keep one copy")
        return ("npz", sorted(train, key=lambda p: natural_key(Path(p.name))), val[0])

    # ---- reading -------------------------------------------------------------------------------
    def _read_npz(self, paths: list[Path]) -> TensorSource:
        r = self.resolution
        row = 3 * r * r
        counts = []
        for p in paths:
            try:
                shape, dtype = read_npz_header(p, "data")
            except KeyError:
                raise DataError(f"{p} has no 'data' array; it is not a downsampled-ImageNet npz file") from None
            except Exception as e:
                raise DataError(f"cannot read {p} ({type(e).__name__}: {e}); the file is corrupt or truncated, "
                                "download it again") from e
            if len(shape) != 2 or dtype != np.uint8 or shape[1] != row:
                hint = ""
                if len(shape) == 2 and shape[1] in (3 * 32 * 32, 3 * 64 * 64):
                    other = int(round((shape[1] / 3) ** 0.5))
                    hint = f" (that is {other}x{other} data: use data=imagenet{other}_chrabaszcz)"
                raise DataError(f"{p} holds data {dtype} {tuple(shape)}, expected uint8 rows of {row} = 3*{r}*{r} "
                                f"values{hint}")
            counts.append(shape[0])
        images = np.empty((sum(counts), row), dtype=np.uint8)
        labels = np.empty(sum(counts), dtype=np.int64)
        o = 0
        for p, n in zip(paths, counts):
            try:
                with np.load(p) as z:
                    data, lab = z["data"], z["labels"]
            except KeyError:
                raise DataError(f"{p} has no 'labels' array; it is not a downsampled-ImageNet npz file") from None
            except Exception as e:
                raise DataError(f"cannot read {p} ({type(e).__name__}: {e}); the file is corrupt or truncated, "
                                "download it again") from e
            lab = np.asarray(lab).reshape(-1)
            if data.shape != (n, row) or lab.shape != (n,):
                raise DataError(f"{p} holds {data.shape[0]} images and {lab.shape[0]} labels; they must match")
            if n and (lab.min() < 1 or lab.max() > 1000):
                raise DataError(f"{p} has labels outside 1..1000 (the release's labels are 1-based)")
            images[o:o + n] = data
            labels[o:o + n] = lab - 1
            o += n
            del data, lab
        origin = str(paths[0]) if len(paths) == 1 else f"{len(paths)} train_data_batch_*.npz files in {self.root}"
        return TensorSource(torch.from_numpy(images).view(-1, 3, r, r), torch.from_numpy(labels), origin)

    def _png(self, folder: Path) -> FileSource:
        paths = find_images(folder, (".png",))
        if not paths:
            raise DataError(f"no PNG images in {folder}. {self._how_to_get()}")
        # no per-file check here (1.28M files): a damaged PNG is reported, by name, when it is decoded
        return FileSource(paths, None, str(folder), mode="RGB", exact_size=True)

    def _load_train_pool(self) -> TensorSource | FileSource:
        found = self._locate()
        return self._read_npz(found[1]) if found[0] == "npz" else self._png(found[1])

    def _load_test(self) -> TensorSource | FileSource:
        found = self._locate()
        return self._read_npz([found[2]]) if found[0] == "npz" else self._png(found[2])
