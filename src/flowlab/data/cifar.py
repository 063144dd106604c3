"""CIFAR-10 from torchvision's python pickle batches (``<root>/cifar-10-batches-py``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource
from flowlab.errors import DataError, check_bool

__all__ = ["CIFAR10DataModule", "read_cifar_batch"]

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# What a CIFAR batch may refer to: numpy arrays and dtypes, nothing that runs code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store raw bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never contains")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]``.

    Accepts the original Python 2 pickles and Python 3 ones (``b"data"`` or ``"data"`` keys).
    Only numpy arrays may be unpickled; anything else, or a damaged file, is a DataError.
    """
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch {path} is missing; re-download the dataset "
                        "(data.download=true) or restore the file") from None
    except Exception as e:  # truncated/garbage pickles raise many types
        raise DataError(f"CIFAR-10 batch {path} is corrupt or not a CIFAR pickle ({type(e).__name__}: {e}); "
                        "delete it and download the dataset again (data.download=true)") from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch {path} holds a {type(d).__name__}, not a dict with data and labels")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"CIFAR-10 batch {path} lacks the 'data' array or the 'labels' list")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path} has data {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path} has {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 batch {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(FlowDataModule):
    """CIFAR-10, 3x32x32, 10 classes. Test = ``test_batch``; validation = ``val_size`` training images.

    Reads ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (what torchvision's
    ``CIFAR10(root, download=True)`` writes). With ``download=True`` ``prepare_data`` downloads
    them through torchvision when they are missing (needs internet).
    """

    name = "cifar10"
    form = "torchvision python batches"
    native_channels = 3
    native_image_size = 32
    num_classes = 10

    def __init__(self, root, download: bool = False, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, n_bits: int = 8, hflip: bool = False, val_size: int | float = 5000,
                 seed: int = 0, image_size: int | None = 32, channels: int | None = 3, n_classes: int | None = None):
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         n_bits=n_bits, hflip=hflip, val_size=val_size, seed=seed, image_size=image_size,
                         channels=channels, n_classes=n_classes)
        check_bool("data.download", download)
        self.download = download

    @property
    def folder(self) -> Path:
        return self.root / FOLDER

    def _missing(self) -> list[Path]:
        return [self.folder / n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (self.folder / n).is_file()]

    def prepare_data(self) -> None:
        if not self.download or not self._missing():
            return
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(self.root), train=True, download=True)
        except Exception as e:
            raise DataError(f"could not download CIFAR-10 into {self.root} ({type(e).__name__}: {e}). "
                            f"Without internet, place the python batches (data_batch_1..5, test_batch of "
                            f"cifar-10-python.tar.gz) in {self.folder}") from e

    def _check_present(self) -> None:
        missing = self._missing()
        if missing:
            what = ("is missing" if not self.folder.is_dir()
                    else "lacks " + ", ".join(p.name for p in missing))
            raise DataError(f"CIFAR-10 not found: {self.folder} {what}. Set data.download=true (needs internet) "
                            f"or place the python batches (data_batch_1..5, test_batch from "
                            f"cifar-10-python.tar.gz) in {self.folder}; data.root={self.root} is the folder "
                            f"that contains {FOLDER}")

    def _read(self, names) -> TensorSource:
        self._check_present()
        parts = [read_cifar_batch(self.folder / n) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        origin = str(self.folder / names[0]) if len(names) == 1 else f"{self.folder}/data_batch_1..5"
        return TensorSource(images, labels, origin)

    def _load_train_pool(self) -> TensorSource:
        return self._read(TRAIN_BATCHES)

    def _load_test(self) -> TensorSource:
        return self._read((TEST_BATCH,))
