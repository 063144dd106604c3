"""MNIST and Fashion-MNIST from their IDX files, gzipped or not, parsed with numpy."""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource, check_arrays, read_file
from flowlab.errors import DataError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803 / 0x0801: unsigned bytes, 3 / 1 dimensions


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a writable array, if it has the ``magic`` number and
    exactly the bytes its header announces."""
    raw = Path(path).read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"IDX file {path} has magic number {found}, expected {magic} for "
                        f"{'images (idx3)' if magic == IMAGES_MAGIC else 'labels (idx1)'}; it is damaged or not the file its "
                        "name says; download it again")
    header = 4 + 4 * raw[3]
    dims = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"IDX file {path} is {'truncated' if len(raw) < expected else 'longer than its header says'}: "
                        f"{len(raw)} bytes for shape {dims}, expected {expected}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


class MNISTDataModule(FlowDataModule):
    """MNIST digits, 1x28x28, 10 classes, from ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``<root>``,
    ``<root>/raw`` or ``<root>/MNIST/raw`` (where torchvision's download puts them). Test = the t10k files."""

    name = "mnist"
    form = "IDX files"
    native_channels = 1
    native_image_size = 28
    num_classes = 10
    title = "MNIST"
    torchvision_folder = "MNIST"  # torchvision's download puts the files in <root>/<this>/raw
    how_to_get = ("Place the four IDX files (gzipped or not) there, e.g. with torchvision: "
                  "python -c \"import torchvision; torchvision.datasets.MNIST('<data_dir>/mnist', download=True)\" "
                  "(needs internet).")

    def _search_dirs(self) -> list[Path]:
        return [self.root, self.root / "raw", self.root / self.torchvision_folder / "raw"]

    @staticmethod
    def _find(folder: Path, stem: str) -> Path | None:
        dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
        return next((folder / n for n in (stem, stem + ".gz", dotted, dotted + ".gz") if (folder / n).is_file()), None)

    def _locate(self, split: str) -> tuple[Path, Path]:
        """The files of ``split`` in the first searched folder that holds all four."""
        stems = [stem for pair in FILES.values() for stem in pair]
        for folder in self._search_dirs():
            found = {stem: self._find(folder, stem) for stem in stems}
            if None not in found.values():
                return found[FILES[split][0]], found[FILES[split][1]]
        raise DataError(f"{self.title} not found: no folder among {', '.join(map(str, self._search_dirs()))} holds all "
                        f"four IDX files ({', '.join(stems)}, each optionally .gz). {self.how_to_get}")

    def _load(self, split: str) -> TensorSource:
        img_path, lbl_path = self._locate(split)
        images = read_file(img_path, partial(read_idx, magic=IMAGES_MAGIC), "download it again")
        labels = read_file(lbl_path, partial(read_idx, magic=LABELS_MAGIC), "download it again")
        images, labels = check_arrays(f"{img_path} with {lbl_path}", images, labels, (28, 28), 0, 9)
        return TensorSource(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), str(img_path))


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST, the same IDX layout as MNIST; when no searched folder has the files, Debian's
    ``dataset-fashion-mnist`` in ``system_dir`` is read."""

    name = "fashion_mnist"
    title = "Fashion-MNIST"
    torchvision_folder = "FashionMNIST"
    system_dir = Path("/usr/share/datasets/fashion-mnist")
    how_to_get = (f"Install Debian's copy with `apt-get install dataset-fashion-mnist` (it goes to {system_dir}, "
                  "used automatically) or place the four IDX files in data.root.")

    def _search_dirs(self) -> list[Path]:
        return [*super()._search_dirs(), Path(self.system_dir)]
