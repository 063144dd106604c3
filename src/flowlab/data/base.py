"""The LightningDataModule every flowlab dataset derives from.

A subclass reads its on-disk format (``_load``: a ``TensorSource`` in memory or a ``FileSource`` decoded
lazily); the base class checks the arguments, reduces images to ``n_bits``, carves a
validation split fixed by ``seed`` alone out of the training images and builds the DataLoaders (Lightning adds
a DistributedSampler under DDP). Batches of every split are ``(x, y, index)``: ``x`` uint8 ``[B, C, H, W]`` in
``0 .. 2**n_bits - 1``, ``y`` int64 labels, ``index`` the images' positions in their split.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowlab.data.datasets import ImageFileDataset, TensorImageDataset
from flowlab.errors import ConfigError, DataError, check_bool, check_int


def read_file(path: Path, read: Callable, fix: str):
    """``read(path)``; a missing or unreadable file is one DataError that names it and says what to do (``fix``)."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {fix}")
    try:
        return read(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files raise many types
        raise DataError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e}); {fix}") from e


def check_arrays(where: str, images, labels, shape: tuple, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """``images`` and ``labels`` as read (uint8 ``[N, *shape]``, int64 ``[N]`` in low..high), else a DataError
    naming ``where``."""
    if not isinstance(images, np.ndarray) or labels is None:
        raise DataError(f"{where} lacks the images or the labels; it is not the file its name says")
    if images.dtype != np.uint8 or images.shape[1:] != shape:
        raise DataError(f"{where} holds images {images.dtype} {images.shape}, expected uint8 [N, *{shape}]")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape != images.shape[:1]:
        raise DataError(f"{where} has {labels.size} labels for {len(images)} images; they must match")
    if labels.size and (labels.min() < low or labels.max() > high):
        raise DataError(f"{where} has labels outside {low}..{high}")
    return images, labels


@dataclass
class TensorSource:
    """A whole split in memory: ``images`` uint8 ``[N, C, H, W]`` (8-bit), ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    origin: str  # the file(s) it was read from, for messages


@dataclass
class FileSource:
    """A split as image files decoded on access; no labels (all 0)."""

    paths: list[Path]
    origin: str
    exact_size: bool = False  # True: a file of another size is a DataError; False: it is resized
    skip_corrupt: bool = False


class _ResumableOrder(DistributedSampler):
    """A DistributedSampler whose next pass starts ``skip`` indices in (its length stays the whole epoch's)."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch. The order is a function of (seed, epoch) alone; Lightning
    saves ``state_dict`` (epoch, batches served) in checkpoints, so a resumed run skips the batches it trained on."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, **kwargs):
        order = _ResumableOrder(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=order, drop_last=True, **kwargs)
        self._served, self._resume = 0, None

    def __iter__(self):
        epoch, served = self._resume or (None, 0)
        self._resume = None
        self._served = served if epoch == self.sampler.epoch else 0
        self.sampler.skip = self._served * self.batch_size  # full batches only (drop_last)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._served)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class FlowDataModule(pl.LightningDataModule):
    """Arguments every dataset shares; their values come from ``conf/data`` (no second set of defaults here).

    ``val_size``: validation images taken out of the training ones, a count or a fraction in [0, 1); the split is
    a permutation drawn from ``seed`` alone. ``image_size``/``channels``: None takes the data's; another value is a
    ConfigError, except that image folders (``resizable``) are resized. ``n_classes``: the data's ``num_classes``,
    or None for data without labels (``model.n_classes`` takes it). ``download``: fetch missing files through
    torchvision, in datasets that define ``_missing()`` (what is missing), ``_download(missing)`` and
    ``_how_to_get()`` (what to do without internet).
    """

    name: str = ""  # the conf/data choice
    form: str = ""  # the on-disk form or release, for describe()
    native_channels: int
    native_image_size: int
    resizable: ClassVar[bool] = False  # True: image files of any size, resized to image_size
    num_classes: int = 1  # 1: no labels, every label 0

    def __init__(self, root: str | Path, *, batch_size: int, num_workers: int, pin_memory: bool, n_bits: int,
                 hflip: bool, val_size: int | float, seed: int, image_size: int | None = None,
                 channels: int | None = None, n_classes: int | None = None, download: bool = False):
        super().__init__()
        if root is None or str(root).strip() == "":
            raise ConfigError("data.root is empty: set it to the folder holding the dataset "
                              "(by default ${paths.data_dir}/<dataset>)")
        self.root = Path(str(root)).expanduser().absolute()  # messages name the full path
        self.batch_size = check_int("data.batch_size", batch_size, 1)
        self.num_workers = check_int("data.num_workers", num_workers, 0)
        self.n_bits = check_int("data.n_bits", n_bits, 1, 8)
        self.seed = check_int("data.seed", seed)
        self.pin_memory = check_bool("data.pin_memory", pin_memory)
        self.hflip = check_bool("data.hflip", hflip)
        self.download = check_bool("data.download", download)
        if download and not hasattr(self, "_download"):
            raise ConfigError(f"data.download={download!r} is not allowed: {self.name} cannot be downloaded; "
                              "place its files in data.root")
        if not (0 <= val_size < 1 if isinstance(val_size, float) else type(val_size) is int and val_size >= 0):
            raise ConfigError(f"data.val_size={val_size!r} is not allowed: give a count of images ≥ 0 (int) "
                              "or a fraction of the training images in [0, 1) (float)")
        self.val_size = val_size
        self.channels = check_int("data.channels", channels, 1, allow_none=True) or self.native_channels
        self.image_size = check_int("data.image_size", image_size, 1, allow_none=True) or self.native_image_size
        if self.channels != self.native_channels:
            raise ConfigError(f"data.channels={channels} does not match {self.name}, whose images have "
                              f"{self.native_channels} channel(s); set data.channels={self.native_channels}")
        if self.image_size != self.native_image_size and not self.resizable:
            raise ConfigError(f"data.image_size={image_size} does not match {self.name}, whose images are "
                              f"{self.native_image_size}x{self.native_image_size}; "
                              f"set data.image_size={self.native_image_size}")
        labels = self.num_classes if self.num_classes > 1 else None
        if n_classes is not None and n_classes != labels:
            has = f"labels of {labels} classes" if labels else "no labels"
            raise ConfigError(f"data.n_classes={n_classes!r} does not match {self.name}, which has {has}; "
                              f"set data.n_classes={labels or 'null'}")
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._origins: dict[str, str] = {}  # split -> the file(s) or folder it was read from

    # ---- what subclasses provide -------------------------------------------------------------
    def _load(self, split: str) -> TensorSource | FileSource:
        """Split "train" (out of which the validation split is carved) or "test" (what the papers report on)."""
        raise NotImplementedError

    # ---- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        missing = self._missing() if self.download else []
        if missing:
            try:
                self._download(missing)
            except Exception as e:  # noqa: BLE001 - the network and torchvision raise many types
                raise DataError(f"could not download {self.name} into {self.root} ({type(e).__name__}: {e}). "
                                f"Without internet, {self._how_to_get()}") from e

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            pool = self._checked(self._load("train"))
            n = len(pool.paths if isinstance(pool, FileSource) else pool.images)
            n_val = int(self.val_size * n + 0.5) if isinstance(self.val_size, float) else self.val_size
            if n_val >= n:
                raise ConfigError(f"data.val_size={self.val_size!r} asks for {n_val} validation images but "
                                  f"{pool.origin} holds only {n} training images; lower data.val_size")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            self.train_dataset = self._dataset(pool, perm[n_val:].sort().values, self.hflip)
            self.val_dataset = self._dataset(pool, perm[:n_val].sort().values, False)
            self._origins["train"] = pool.origin
        if stage in (None, "test", "predict") and self.test_dataset is None:
            test = self._checked(self._load("test"))
            self.test_dataset = self._dataset(test, None, False)
            self._origins["test"] = test.origin

    def describe(self) -> str:
        """One line saying which data this is: dataset, form or release, n_bits, and per split set up so far the
        number of images and where they were read from."""
        head = f"{self.name}" + (f" ({self.form})" if self.form else "") + f", {self.n_bits}-bit"
        parts = []
        if self.train_dataset is not None:
            parts.append(f"train {len(self.train_dataset)} + val {len(self.val_dataset)} images "
                         f"from {self._origins['train']}")
        if self.test_dataset is not None:
            parts.append(f"test {len(self.test_dataset)} images from {self._origins['test']}")
        return f"{head}: " + ("; ".join(parts) if parts else f"{self.root}, not read yet (call setup() first)")

    def train_dataloader(self) -> DataLoader:
        ds = self._require(self.train_dataset, "train")
        if len(ds) < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the {len(ds)} training images "
                              f"of {self.name} in {self.root} (training drops incomplete batches); "
                              "lower data.batch_size or data.val_size")
        # one order per (global seed, epoch), one share of it per process, as Lightning's DistributedSampler
        shares = getattr(self.trainer, "distributed_sampler_kwargs", None) or {}
        return ResumableLoader(ds, self.batch_size, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                               num_replicas=shares.get("num_replicas", 1), rank=shares.get("rank", 0),
                               **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        ds = self._require(self.val_dataset, "validation")
        return DataLoader(ds, self.batch_size, **self._loader_kwargs()) if len(ds) else []  # []: no validation

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._require(self.test_dataset, "test"), self.batch_size, **self._loader_kwargs())

    # ---- helpers -------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.num_workers > 0}

    def _require(self, ds: Dataset | None, what: str) -> Dataset:
        if ds is None:
            raise RuntimeError(f"the {what} set of {self.name} is not loaded: call setup() first")
        return ds

    def _checked(self, src: TensorSource | FileSource) -> TensorSource | FileSource:
        """``src`` if it holds images of this module's shape; in-memory images are reduced to n_bits (in place)."""
        if len(src.paths if isinstance(src, FileSource) else src.images) == 0:
            raise DataError(f"no images found in {src.origin}")
        if isinstance(src, TensorSource):
            _, c, h, w = src.images.shape
            if c != self.channels or (h, w) != (self.image_size, self.image_size):
                raise ConfigError(f"data.channels={self.channels} data.image_size={self.image_size} do not match "
                                  f"the data in {src.origin}, whose images are {c}x{h}x{w}")
            if self.n_bits < 8:
                src.images.bitwise_right_shift_(8 - self.n_bits)
        return src

    def _dataset(self, src: TensorSource | FileSource, idx: torch.Tensor | None, hflip: bool) -> Dataset:
        if isinstance(src, TensorSource):
            return TensorImageDataset(src.images, src.labels, idx, hflip=hflip)
        paths = src.paths if idx is None else [src.paths[i] for i in idx.tolist()]
        return ImageFileDataset(paths, n_bits=self.n_bits, size=self.image_size, exact_size=src.exact_size,
                                hflip=hflip, skip_corrupt=src.skip_corrupt)
