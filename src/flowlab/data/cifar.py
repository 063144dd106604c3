"""CIFAR-10 from torchvision's python pickle batches (``<root>/cifar-10-batches-py``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource, check_arrays, read_file
from flowlab.errors import DataError

FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

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
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of one CIFAR-10 python batch (a Python 2 or 3
    pickle); only numpy arrays are unpickled."""
    with open(path, "rb") as f:
        d = _ArrayUnpickler(f, encoding="latin1").load()
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    data, labels = check_arrays(str(path), d.get("data"), d.get("labels"), (3 * 32 * 32,), 0, 9)
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(FlowDataModule):
    """CIFAR-10, 3x32x32, 10 classes, from ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (what
    torchvision's ``CIFAR10(root, download=True)`` writes). Test = ``test_batch``."""

    name = "cifar10"
    form = "torchvision python batches"
    native_channels = 3
    native_image_size = 32
    num_classes = 10

    def _how_to_get(self) -> str:
        return (f"place the python batches (data_batch_1..5, test_batch of cifar-10-python.tar.gz) in "
                f"{self.root / FOLDER}; data.root={self.root} is the folder that contains {FOLDER}")

    def _missing(self) -> list[str]:
        return [n for names in FILES.values() for n in names if not (self.root / FOLDER / n).is_file()]

    def _download(self, missing: list[str]) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.root), train=True, download=True)

    def _load(self, split: str) -> TensorSource:
        fix = f"set data.download=true (needs internet; delete a damaged file first) or {self._how_to_get()}"
        if missing := self._missing():
            raise DataError(f"CIFAR-10 not found: {self.root / FOLDER} lacks {', '.join(missing)}; {fix}")
        parts = [read_file(self.root / FOLDER / n, read_cifar_batch, fix) for n in FILES[split]]
        origin = self.root / FOLDER / ("data_batch_1..5" if split == "train" else "test_batch")
        return TensorSource(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                            torch.from_numpy(np.concatenate([p[1] for p in parts])), str(origin))
