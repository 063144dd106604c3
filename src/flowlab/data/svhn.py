"""SVHN (Street View House Numbers) from the official cropped-digit ``.mat`` files (MATLAB v5).

``train_32x32.mat`` / ``test_32x32.mat`` hold ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with
labels 1..10, where 10 is the digit 0 (read here as label 0). torchvision's ``SVHN(root, download=True)``
writes the same files into ``root``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource
from flowlab.errors import DataError, check_bool

__all__ = ["SVHNDataModule", "read_svhn_mat", "FILES"]

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` (0..9, the file's 10 read as 0) of one ``.mat``
    file; a missing, damaged or foreign file is a DataError naming it."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"SVHN file {path} is missing; download {path.name} from {URL} into {path.parent} "
                        "(or set data.download=true, needs internet)")
    try:
        d = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types for damaged or non-MATLAB files
        raise DataError(f"SVHN file {path} is corrupt or not a MATLAB v5 file ({type(e).__name__}: {e}); "
                        f"download it again from {URL}") from e
    x, y = d.get("X"), d.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"SVHN file {path} lacks the 'X' images or the 'y' labels; download it again from {URL}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"SVHN file {path} has X {x.dtype} {x.shape}, expected uint8 [32, 32, 3, N]")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"SVHN file {path} has {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"SVHN file {path} has labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


class SVHNDataModule(FlowDataModule):
    """SVHN, 3x32x32, 10 classes, from ``<root>/{train_32x32.mat, test_32x32.mat}``. Test = the 26,032
    test digits; validation = ``val_size`` of the 73,257 training ones (the ``extra`` set is not used)."""

    name = "svhn"
    form = "official cropped-digit .mat files"
    native_channels = 3
    native_image_size = 32
    num_classes = 10

    def __init__(self, root, download: bool = False, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, n_bits: int = 8, hflip: bool = False, val_size: int | float = 5000,
                 seed: int = 0, image_size: int | None = 32, channels: int | None = 3, n_classes: int | None = None):
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         n_bits=n_bits, hflip=hflip, val_size=val_size, seed=seed, image_size=image_size,
                         channels=channels, n_classes=n_classes)
        self.download = check_bool("data.download", download)

    def prepare_data(self) -> None:
        missing = [split for split, name in FILES.items() if not (self.root / name).is_file()]
        if not self.download or not missing:
            return
        try:
            from torchvision.datasets import SVHN

            for split in missing:
                SVHN(str(self.root), split=split, download=True)
        except Exception as e:
            raise DataError(f"could not download SVHN into {self.root} ({type(e).__name__}: {e}). Without internet, "
                            f"place {', '.join(FILES.values())} from {URL} in {self.root}") from e

    def _read(self, split: str) -> TensorSource:
        images, labels = read_svhn_mat(self.root / FILES[split])
        return TensorSource(torch.from_numpy(images), torch.from_numpy(labels), str(self.root / FILES[split]))

    def _load_train_pool(self) -> TensorSource:
        return self._read("train")

    def _load_test(self) -> TensorSource:
        return self._read("test")
