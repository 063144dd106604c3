"""CelebA-HQ from a folder of images (png, jpg, jpeg; searched recursively)."""

from __future__ import annotations

from pathlib import Path

from flowlab.data.base import FileSource, FlowDataModule
from flowlab.data.files import IMAGE_EXTENSIONS, check_images, find_images
from flowlab.errors import DataError, check_bool

__all__ = ["CelebAHQDataModule", "celebahq_split"]

HOW_TO_GET = ("Put the 30,000 CelebA-HQ images there as .png/.jpg files (any sub-folders), e.g. the 256x256 "
              "resized CelebA-HQ set or images rendered with the Progressive GAN dataset tool; larger images "
              "are resized to data.image_size")


def celebahq_split(n: int) -> int:
    """Number of held-out images for ``n`` files: 3,000 of the full 30,000, 10% (rounded) otherwise."""
    return int(n // 10 + (1 if n % 10 >= 5 else 0))


class CelebAHQDataModule(FlowDataModule):
    """CelebA-HQ faces, 3 channels, resized to ``image_size`` (256), 5 bits by default; no labels (all 0).

    The files are sorted by path in natural order (``2.png`` before ``10.png``); the last 10% form
    the fixed held-out split (3,000 of 30,000, as in Glow), which is the test set. The validation
    split (``val_size``) is carved out of the first 90%. A non-square image is centre-cropped.

    ``skip_corrupt``: unreadable files are skipped (one warning counts them) instead of raising a
    DataError that names the file. The fixed split is made before skipping, so it does not move.
    """

    name = "celebahq256"
    form = "image files"
    native_channels = 3
    native_image_size = 256
    resizable = True
    num_classes = 1

    def __init__(self, root, batch_size: int = 1, num_workers: int = 4, pin_memory: bool = False,
                 n_bits: int = 5, hflip: bool = False, val_size: int | float = 1000, seed: int = 0,
                 image_size: int | None = 256, channels: int | None = 3, skip_corrupt: bool = False,
                 n_classes: int | None = None):
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         n_bits=n_bits, hflip=hflip, val_size=val_size, seed=seed, image_size=image_size,
                         channels=channels, n_classes=n_classes)
        check_bool("data.skip_corrupt", skip_corrupt)
        self.skip_corrupt = skip_corrupt
        self._parts: tuple[list[Path], list[Path]] | None = None

    def _scan(self) -> tuple[list[Path], list[Path]]:
        """(train pool, held-out) files, each checked once."""
        if self._parts is not None:
            return self._parts
        if not self.root.is_dir():
            raise DataError(f"CelebA-HQ not found: {self.root} does not exist. {HOW_TO_GET}")
        files = find_images(self.root, IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"CelebA-HQ not found: {self.root} holds no .png/.jpg/.jpeg files. {HOW_TO_GET}")
        if len(files) < 2:
            raise DataError(f"CelebA-HQ in {self.root} has only {len(files)} image; at least 2 are needed "
                            "(a training and a held-out part)")
        n_test = max(1, celebahq_split(len(files)))
        ok = set(check_images(files, self.skip_corrupt, where=str(self.root)))
        train = [p for p in files[:-n_test] if p in ok]
        test = [p for p in files[-n_test:] if p in ok]
        if not train or not test:
            raise DataError(f"after skipping unreadable images {self.root} has {len(train)} training and "
                            f"{len(test)} held-out images; both parts need at least one")
        self._parts = (train, test)
        return self._parts

    def _source(self, paths: list[Path], what: str) -> FileSource:
        return FileSource(paths, None, f"{self.root} ({what})", mode="RGB", exact_size=False,
                          extra={"skip_corrupt": self.skip_corrupt})

    def _load_train_pool(self) -> FileSource:
        return self._source(self._scan()[0], "first 90% by file name")

    def _load_test(self) -> FileSource:
        return self._source(self._scan()[1], "last 10% by file name")
