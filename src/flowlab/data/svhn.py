"""SVHN (Street View House Numbers) from the official cropped-digit ``.mat`` files (MATLAB v5).

``train_32x32.mat`` / ``test_32x32.mat`` hold ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with labels 1..10,
where 10 is the digit 0 (read as label 0); torchvision's ``SVHN(root, download=True)`` writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource, check_arrays, read_file

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` (0..9, the file's 10 read as 0) of one ``.mat`` file."""
    import scipy.io

    d = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    x = d.get("X")
    x = x.T.swapaxes(-1, -2) if isinstance(x, np.ndarray) else x  # [32, 32, 3, N] -> [N, 3, 32, 32]
    x, y = check_arrays(str(path), x, d.get("y"), (3, 32, 32), 1, 10)
    return np.ascontiguousarray(x), y % 10


class SVHNDataModule(FlowDataModule):
    """SVHN, 3x32x32, 10 classes, from ``<root>/{train_32x32.mat, test_32x32.mat}``. Test = the 26,032 test
    digits; the validation split is carved out of the 73,257 training ones (the ``extra`` set is not used)."""

    name = "svhn"
    form = "official cropped-digit .mat files"
    native_channels = 3
    native_image_size = 32
    num_classes = 10

    def _how_to_get(self) -> str:
        return f"place {', '.join(FILES.values())} from {URL} in {self.root}"

    def _missing(self) -> list[str]:
        return [split for split, name in FILES.items() if not (self.root / name).is_file()]

    def _download(self, missing: list[str]) -> None:
        from torchvision.datasets import SVHN

        for split in missing:
            SVHN(str(self.root), split=split, download=True)

    def _load(self, split: str) -> TensorSource:
        path = self.root / FILES[split]
        images, labels = read_file(path, read_svhn_mat, f"download {path.name} again from {URL} into {self.root} "
                                   "(data.download=true fetches a missing one; needs internet)")
        return TensorSource(torch.from_numpy(images), torch.from_numpy(labels), str(path))
