"""MNIST and Fashion-MNIST from their IDX files, gzipped or not, parsed with numpy."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from flowlab.data.base import FlowDataModule, TensorSource
from flowlab.errors import DataError

__all__ = ["MNISTDataModule", "FashionMNISTDataModule", "read_idx", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or not) into a writable numpy array.

    Checks the magic number (2051 images, 2049 labels) and that the file holds exactly the bytes its
    header announces; anything else is a DataError naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path} ({type(e).__name__}: {e}); the file is damaged, "
                        "download it again") from e
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated ({len(raw)} bytes); download it again")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images (idx3)" if magic == IDX_IMAGES_MAGIC else "labels (idx1)"
        raise DataError(f"IDX file {path} has magic number {found}, expected {magic} for {kind}; "
                        "it is not the file its name says or it is damaged")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {state}: {len(raw)} bytes for shape {dims}, expected {expected}; "
                        "download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


class _IDXDataModule(FlowDataModule):
    """Shared reader: 1x28x28 grey images, 10 classes, test = the t10k files."""

    native_channels = 1
    native_image_size = 28
    num_classes = 10
    title = "MNIST"
    form = "IDX files"
    torchvision_folder = "MNIST"  # torchvision's download puts the files in <root>/<this>/raw
    how_to_get = ""

    def __init__(self, root, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 n_bits: int = 8, hflip: bool = False, val_size: int | float = 5000, seed: int = 0,
                 image_size: int | None = 28, channels: int | None = 1, n_classes: int | None = None):
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         n_bits=n_bits, hflip=hflip, val_size=val_size, seed=seed, image_size=image_size,
                         channels=channels, n_classes=n_classes)

    def _search_dirs(self) -> list[Path]:
        """Folders tried in order: root, root/raw, and torchvision's root/<Dataset>/raw."""
        return [self.root, self.root / "raw", self.root / self.torchvision_folder / "raw"]

    @staticmethod
    def _find(folder: Path, stem: str) -> Path | None:
        dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
        for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
            if (folder / name).is_file():
                return folder / name
        return None

    def _locate(self, split: str) -> tuple[Path, Path]:
        """The files of ``split`` from the first searched folder that holds all four files."""
        for folder in self._search_dirs():
            found = {sp: [self._find(folder, s) for s in stems] for sp, stems in FILES.items()}
            if all(p is not None for pair in found.values() for p in pair):
                return found[split][0], found[split][1]
        tried = ", ".join(str(d) for d in self._search_dirs())
        names = ", ".join(s for stems in FILES.values() for s in stems)
        raise DataError(f"{self.title} not found: no folder among {tried} holds all four IDX files "
                        f"({names}, each optionally .gz). {self.how_to_get}")

    def _read(self, split: str) -> TensorSource:
        img_path, lbl_path = self._locate(split)
        images = read_idx(img_path, IDX_IMAGES_MAGIC)
        labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"IDX file {img_path} holds images of shape {images.shape[1:]}, expected (28, 28)")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{lbl_path} holds {labels.shape[0]} labels for the {images.shape[0]} images of "
                            f"{img_path}; the two files do not belong together")
        if labels.size and labels.max() > 9:
            raise DataError(f"IDX file {lbl_path} has labels above 9")
        return TensorSource(torch.from_numpy(images).unsqueeze(1),
                            torch.from_numpy(labels.astype(np.int64)), str(img_path))

    def _load_train_pool(self) -> TensorSource:
        return self._read("train")

    def _load_test(self) -> TensorSource:
        return self._read("test")


class MNISTDataModule(_IDXDataModule):
    """MNIST digits from ``<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Also found in ``<root>/raw`` and ``<root>/MNIST/raw`` (where torchvision's
    ``MNIST(root, download=True)`` puts them).
    """

    name = "mnist"
    title = "MNIST"
    torchvision_folder = "MNIST"
    how_to_get = ("Place the four IDX files (gzipped or not) there, e.g. with torchvision: "
                  "python -c \"import torchvision; torchvision.datasets.MNIST('<data_dir>/mnist', download=True)\" "
                  "(needs internet).")


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST, same IDX layout as MNIST.

    Searched in ``<root>``, ``<root>/raw``, ``<root>/FashionMNIST/raw`` and then, if none has
    the files, in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
    """

    name = "fashion_mnist"
    title = "Fashion-MNIST"
    torchvision_folder = "FashionMNIST"
    system_dir = FASHION_MNIST_SYSTEM_DIR
    how_to_get = (f"Install Debian's copy with `apt-get install dataset-fashion-mnist` (it goes to "
                  f"{FASHION_MNIST_SYSTEM_DIR}, used automatically) or place the four IDX files in data.root.")

    def _search_dirs(self) -> list[Path]:
        return [*super()._search_dirs(), Path(self.system_dir)]
