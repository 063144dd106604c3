"""CelebA-HQ from a folder of images (png, jpg, jpeg; searched recursively)."""

from __future__ import annotations

from pathlib import Path

from flowlab.data.base import FileSource, FlowDataModule
from flowlab.data.datasets import check_images, find_images
from flowlab.errors import DataError, check_bool

HOW_TO_GET = ("Put the 30,000 CelebA-HQ images there as .png/.jpg files (any sub-folders), e.g. the 256x256 "
              "resized CelebA-HQ set or images rendered with the Progressive GAN dataset tool; larger images "
              "are resized to data.image_size")


def celebahq_split(n: int) -> int:
    """Held-out images of ``n`` files: 10%, rounded half up (3,000 of 30,000, as in Glow)."""
    return (n + 5) // 10


class CelebAHQDataModule(FlowDataModule):
    """CelebA-HQ faces, resized to ``image_size`` (a non-square image centre-cropped first); no labels.

    Files sorted by path in natural order (``2.png`` before ``10.png``): the last 10% are the test set, the
    validation split is carved out of the rest. ``skip_corrupt``: unreadable files are skipped (one warning counts
    them) instead of a DataError naming the file; the split is fixed before skipping, so it does not move.
    """

    name = "celebahq256"
    form = "image files"
    native_channels = 3
    native_image_size = 256
    resizable = True

    def __init__(self, root, *, skip_corrupt: bool, **kwargs):
        super().__init__(root, **kwargs)
        self.skip_corrupt = check_bool("data.skip_corrupt", skip_corrupt)
        self._parts: dict[str, list[Path]] | None = None

    def _scan(self) -> dict[str, list[Path]]:
        """The train pool and held-out files, each checked once."""
        if self._parts is not None:
            return self._parts
        if not self.root.is_dir():
            raise DataError(f"CelebA-HQ not found: {self.root} does not exist. {HOW_TO_GET}")
        files = find_images(self.root, (".png", ".jpg", ".jpeg"))
        if len(files) < 2:
            what = "holds no .png/.jpg/.jpeg files" if not files else "has only 1 image; at least 2 are needed"
            raise DataError(f"CelebA-HQ not found: {self.root} {what}. {HOW_TO_GET}")
        n_test = max(1, celebahq_split(len(files)))
        ok = set(check_images(files, self.skip_corrupt, where=str(self.root)))
        train, test = [p for p in files[:-n_test] if p in ok], [p for p in files[-n_test:] if p in ok]
        if not train or not test:
            raise DataError(f"after skipping unreadable images {self.root} has {len(train)} training and "
                            f"{len(test)} held-out images; both parts need at least one")
        self._parts = {"train": train, "test": test}
        return self._parts

    def _load(self, split: str) -> FileSource:
        part = "first 90%" if split == "train" else "last 10%"
        return FileSource(self._scan()[split], f"{self.root} ({part} by file name)", skip_corrupt=self.skip_corrupt)
