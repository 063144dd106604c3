"""Map-style datasets yielding ``(x, y, index)``, and the image files they read.

``x`` is a uint8 image ``[C, H, W]`` reduced to n_bits, ``y`` its label, ``index`` its position in the split,
fixed by the split alone (not by batching, shuffling or the number of processes): evaluation keys its noise by
it and recognises DistributedSampler's padded repeats. ``TensorImageDataset`` serves images held in memory (with a
batched ``__getitems__``: one indexing operation per batch); ``ImageFileDataset`` decodes image files lazily.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flowlab.data.transforms import reduce_bits
from flowlab.errors import DataError

SKIP_HINT = "Replace or delete it, or set data.skip_corrupt=true to skip unreadable images"


class TensorImageDataset(Dataset):
    """Images uint8 ``[N, C, H, W]`` (already reduced) and labels ``[N]`` in memory; ``indices`` selects this
    split's rows without copying. ``hflip`` flips each image with probability 1/2 at every access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None,
                 hflip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != (images.shape[0],):
            raise TypeError(f"need images uint8 [N, C, H, W] and N labels, got {images.dtype} "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.indices = torch.arange(images.shape[0]) if indices is None else indices.to(torch.int64)
        self.hflip = hflip

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int):
        return self.__getitems__([int(i) + (len(self) if i < 0 else 0)])[0]

    def __getitems__(self, idx: Sequence[int]):
        rows = self.indices[torch.as_tensor(idx, dtype=torch.int64)]
        x = self.images[rows]
        if self.hflip:  # torch.where: boolean-mask assignment is far slower on CPU
            x = torch.where((torch.rand(len(idx)) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        return list(zip(x.unbind(0), self.labels[rows].tolist(), (int(i) for i in idx)))


def load_image(path: Path, size: int, exact: bool) -> np.ndarray:
    """One image file as RGB uint8 ``[H, W, 3]``. Another size is a DataError with ``exact``, else the image is
    centre-cropped to a square and resized (Lanczos). Decoding errors propagate."""
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        if (w, h) != (size, size) and exact:
            raise DataError(f"{path} is {w}x{h} pixels, expected {size}x{size}; "
                            "the folder holds images of another resolution")
        im = im.convert("RGB")
        if (w, h) != (size, size):
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.array(im)  # a writable copy


class ImageFileDataset(Dataset):
    """Image files decoded lazily as RGB, resized to ``size`` and reduced to ``n_bits``; every label is 0.

    An unreadable file is a DataError naming it, unless ``skip_corrupt``: then a warning names it and the next
    readable file is served instead, under the same index, so batches keep their size.
    """

    def __init__(self, paths: Sequence[Path], n_bits: int, size: int, exact_size: bool = False, hflip: bool = False,
                 skip_corrupt: bool = False):
        self.paths = [Path(p) for p in paths]
        self.n_bits, self.size, self.exact_size = n_bits, size, exact_size
        self.hflip, self.skip_corrupt = hflip, skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        n = len(self.paths)
        i = int(i) + (n if i < 0 else 0)
        for j in (k % n for k in range(i, i + n)):
            try:
                arr = load_image(self.paths[j], self.size, self.exact_size)
            except DataError:
                raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if not self.skip_corrupt:
                    raise DataError(f"cannot read image {self.paths[j]}: {e}. {SKIP_HINT}") from e
                warnings.warn(f"skipping unreadable image {self.paths[j]} ({e}); serving the next one instead",
                              stacklevel=2)
                continue
            x = reduce_bits(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), self.n_bits)
            return (x.flip(-1) if self.hflip and torch.rand(()) < 0.5 else x), 0, i
        raise DataError(f"none of the {n} images of this split could be read (first: {self.paths[0]})")


def natural_key(path: Path) -> tuple:
    """Sort key that orders ``2.png`` before ``10.png`` (digit runs compare as numbers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.as_posix()) if t)


def find_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (recursively, hidden ones ignored) with one of ``extensions`` (any case), in
    natural order of their path relative to ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(extensions))
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder)))


def _header_error(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            return None if min(im.size) >= 1 else f"it has size {im.size[0]}x{im.size[1]}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage
        return f"{type(e).__name__}: {e}"


def check_images(paths: list[Path], skip_corrupt: bool, where: str) -> list[Path]:
    """The files whose header PIL reads. An unreadable one is a DataError naming it, or with ``skip_corrupt``
    dropped (one warning counts them). A file damaged further in is caught when it is decoded."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(_header_error, paths, chunksize=64))
    bad = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if bad and not skip_corrupt:
        more = f" ({len(bad) - 1} more unreadable files in {where})" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {bad[0][0]} ({bad[0][1]}){more}. {SKIP_HINT}")
    if bad:
        shown = ", ".join(str(p) for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(paths)} in {where}: {shown}", stacklevel=2)
    return [p for p, e in zip(paths, errors) if e is None]
