"""Map-style datasets yielding ``(x, y, index)``: ``x`` a uint8 image ``[C, H, W]`` reduced to n_bits,
``y`` its int label, ``index`` its int position in this split (``0 .. len - 1``).

The index is fixed by the split alone, not by batching, shuffling or the number of processes, so
evaluation keys its dequantisation noise and its per-image bits/dim by it: every image counts once,
and DistributedSampler's padded repeats of the first images are recognised as repeats. Every split
yields it (training ignores it), so all batches have the same form.

``TensorImageDataset`` serves images held in memory (CIFAR-10, MNIST, ImageNet npz): one
tensor for the whole set, an index list for the split, and a batched ``__getitems__`` so that a
DataLoader fetches a batch with one indexing operation instead of one call per image.
``ImageFileDataset`` decodes image files lazily (CelebA-HQ, ImageNet PNG folders).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flowlab.data.transforms import reduce_bits
from flowlab.errors import DataError

__all__ = ["TensorImageDataset", "ImageFileDataset", "load_image"]


def _flip_mask(n: int) -> torch.Tensor:
    return torch.rand(n) < 0.5


class TensorImageDataset(Dataset):
    """Images ``uint8 [N, C, H, W]`` (already reduced to n_bits) and labels ``int64 [N]`` in memory.

    ``indices`` selects this split's rows without copying the images; item ``i`` is
    ``(images[indices[i]], labels[indices[i]], i)``. ``hflip`` flips each image horizontally with
    probability 1/2 at every access (training augmentation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None,
                 hflip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.indices = torch.arange(images.shape[0]) if indices is None else indices.to(torch.int64)
        self.hflip = bool(hflip)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int):
        i = int(i) + (len(self) if i < 0 else 0)
        j = int(self.indices[i])
        x = self.images[j]
        if self.hflip and bool(_flip_mask(1)):
            x = x.flip(-1)
        return x, int(self.labels[j]), int(i)

    def __getitems__(self, idx: Sequence[int]):
        rows = self.indices[torch.as_tensor(idx, dtype=torch.int64)]
        x = self.images[rows]
        if self.hflip:  # torch.where: boolean-mask assignment is far slower on CPU
            x = torch.where(_flip_mask(len(idx)).view(-1, 1, 1, 1), x.flip(-1), x)
        return list(zip(x.unbind(0), self.labels[rows].tolist(), (int(i) for i in idx)))


def load_image(path: Path, mode: str, size: int | None, exact: bool) -> np.ndarray:
    """Decode one image file into ``uint8 [H, W, C]`` (``mode`` "RGB" or "L").

    ``size`` given: a square image of another size is resized (Lanczos); a non-square one is
    centre-cropped to a square first. With ``exact`` a size mismatch raises DataError instead.
    Decoding errors propagate as the PIL/OS exception; callers turn them into DataError.
    """
    with Image.open(path) as im:
        im.load()
        if size is not None and im.size != (size, size):
            if exact:
                raise DataError(f"{path} is {im.size[0]}x{im.size[1]} pixels, expected {size}x{size}; "
                                "the folder holds images of another resolution")
            w, h = im.size
            if w != h:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            im = im.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
        else:
            im = im.convert(mode)
        arr = np.array(im, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


class ImageFileDataset(Dataset):
    """Image files decoded lazily, converted to ``mode``, resized to ``size`` and reduced to ``n_bits``.

    Item ``i`` is ``(image of paths[i], labels[i], i)``. An unreadable file raises DataError naming
    it, unless ``skip_corrupt``: then a warning names it and the next readable file in the split is
    served instead (still with index ``i``), so batches keep their size.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, n_bits: int, mode: str = "RGB",
                 size: int | None = None, exact_size: bool = False, hflip: bool = False,
                 skip_corrupt: bool = False):
        self.paths = [Path(p) for p in paths]
        self.labels = [0] * len(self.paths) if labels is None else [int(v) for v in labels]
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} files")
        self.n_bits = n_bits
        self.mode = mode
        self.size = size
        self.exact_size = exact_size
        self.hflip = bool(hflip)
        self.skip_corrupt = bool(skip_corrupt)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> torch.Tensor:
        arr = load_image(self.paths[i], self.mode, self.size, self.exact_size)
        return reduce_bits(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), self.n_bits)

    def __getitem__(self, i: int):
        n = len(self.paths)
        i = int(i) + (n if i < 0 else 0)
        for k in range(n):
            j = (i + k) % n
            try:
                x = self._decode(j)
            except DataError:
                raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if not self.skip_corrupt:
                    raise DataError(f"cannot read image {self.paths[j]}: {e}. Replace or delete the file, "
                                    "or set data.skip_corrupt=true to skip unreadable images") from e
                warnings.warn(f"skipping unreadable image {self.paths[j]} ({e}); serving the next one instead",
                              stacklevel=2)
                continue
            if self.hflip and bool(_flip_mask(1)):
                x = x.flip(-1)
            return x, self.labels[j], int(i)
        raise DataError(f"none of the {n} images of this split could be read (first: {self.paths[0]})")
