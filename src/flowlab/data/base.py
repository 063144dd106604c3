"""The base LightningDataModule every flowlab dataset family derives from.

A subclass says how to read its on-disk format (``_load_train_pool`` and ``_load_test``, each
returning an in-memory ``TensorSource`` or a lazily decoded ``FileSource``); the base class
validates arguments, reduces images to ``n_bits``, carves a deterministic validation split out of
the training images and builds the DataLoaders. Lightning adds a DistributedSampler under DDP.

Batches of every split are ``(x, y, index)``: ``x`` uint8 ``[B, C, H, W]`` with values in
``0 .. 2**n_bits - 1``, ``y`` int64 labels, ``index`` int64 positions of the images in their split
(fixed by the split alone; evaluation keys its noise and counts each image once by it, see
:mod:`flowlab.data.datasets`). See :mod:`flowlab.data.transforms` for the pixel convention.
``describe()`` says in one line which data a run read.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowlab.data.datasets import ImageFileDataset, TensorImageDataset
from flowlab.errors import ConfigError, DataError, check_bool, check_int

__all__ = ["FlowDataModule", "TensorSource", "FileSource", "ResumableLoader"]


@dataclass
class TensorSource:
    """A whole split in memory: ``images`` uint8 ``[N, C, H, W]`` (8-bit), ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    origin: str  # the file(s) or folder it came from, for messages
    reduced: bool = False  # set once the images have been reduced to n_bits (in place)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class FileSource:
    """A split as image files decoded on access."""

    paths: list[Path]
    labels: list[int] | None
    origin: str
    mode: str = "RGB"
    exact_size: bool = False  # True: a file of another size is an error; False: it is resized
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


class _ResumableOrder(DistributedSampler):
    """A DistributedSampler whose next pass starts ``skip`` indices in (its length stays the whole epoch's)."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: Lightning saves its ``state_dict`` (epoch and batches
    served) in checkpoints and restores it. The order is a function of (seed, epoch) alone (a DistributedSampler,
    also for one process), so a resumed run skips the batches it trained on and sees the same rest of the epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, **kwargs):
        order = _ResumableOrder(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=order, drop_last=True, **kwargs)
        self._served, self._resume = 0, None

    @property
    def order(self) -> DistributedSampler:
        return self.sampler

    def __iter__(self):
        epoch, served = self._resume or (None, 0)
        self._resume = None
        self._served = served if epoch == self.order.epoch else 0
        self.order.skip = self._served * self.batch_size  # full batches only (drop_last)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(self.order.epoch), "batches": int(self._served)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class FlowDataModule(pl.LightningDataModule):
    """Common arguments and behaviour of the flowlab DataModules.

    Args:
        root: folder holding the dataset (each subclass documents the layout it reads).
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        pin_memory: page-lock batches for faster host-to-GPU copies.
        n_bits: bits kept per colour channel, 1..8 (``x >> (8 - n_bits)``).
        hflip: random horizontal flips of training images (never of validation/test images).
        val_size: validation images taken out of the training images, as a count (int) or a
            fraction in [0, 1) (float); 0 means no validation set. The split is a fixed
            permutation drawn from ``seed`` alone, so it does not move with the global seed.
        seed: seed of the train/validation split (only of the split).
        image_size: expected height = width; ``None`` takes the data's. Where the dataset has a
            fixed size a different value is a ConfigError; image folders are resized to it.
        channels: expected channel count; ``None`` takes the data's; a mismatch is a ConfigError.
        n_classes: the classes the config says the labels have (``model.n_classes`` takes it): the data's
            ``num_classes``, or None (also for data without labels); another value is a ConfigError.
    """

    #: the ``conf/data`` choice naming this DataModule
    name: ClassVar[str] = ""
    #: the image size / channel count the data has, or None where the files decide (subclasses)
    native_channels: ClassVar[int | None] = None
    native_image_size: ClassVar[int | None] = None
    #: True where image files are resized to ``image_size`` (any size allowed), False where fixed
    resizable: ClassVar[bool] = False
    #: classes of the labels (1 where the data has no labels and every label is 0)
    num_classes: int = 1
    #: the on-disk form or release read, in words, for ``describe()`` (subclasses)
    form: str = ""

    def __init__(self, root: str | Path, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 n_bits: int = 8, hflip: bool = False, val_size: int | float = 5000, seed: int = 0,
                 image_size: int | None = None, channels: int | None = None, n_classes: int | None = None):
        super().__init__()
        if root is None or str(root).strip() == "":
            raise ConfigError("data.root is empty: set it to the folder holding the dataset "
                              "(by default ${paths.data_dir}/<dataset>)")
        self.root = Path(str(root)).expanduser().absolute()  # messages name the full path
        check_int("data.batch_size", batch_size, 1)
        check_int("data.num_workers", num_workers, 0)
        self.n_bits = check_int("data.n_bits", n_bits, 1, 8)
        if isinstance(val_size, float):
            if not 0.0 <= val_size < 1.0:
                raise ConfigError(f"data.val_size={val_size!r} is not allowed: a fraction must lie in [0, 1)")
        elif not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
            raise ConfigError(f"data.val_size={val_size!r} is not allowed: give a count of images ≥ 0 (int) "
                              "or a fraction of the training images in [0, 1) (float)")
        check_bool("data.pin_memory", pin_memory)
        check_bool("data.hflip", hflip)
        check_int("data.seed", seed)
        check_int("data.image_size", image_size, 1, allow_none=True)
        check_int("data.channels", channels, 1, allow_none=True)
        if channels is not None and self.native_channels is not None and channels != self.native_channels:
            raise ConfigError(f"data.channels={channels} does not match {self.name}, whose images have "
                              f"{self.native_channels} channel(s); set data.channels={self.native_channels}")
        if (image_size is not None and self.native_image_size is not None and not self.resizable
                and image_size != self.native_image_size):
            raise ConfigError(f"data.image_size={image_size} does not match {self.name}, whose images are "
                              f"{self.native_image_size}x{self.native_image_size}; "
                              f"set data.image_size={self.native_image_size}")
        if n_classes is not None and n_classes != (self.num_classes if self.num_classes > 1 else None):
            has = f"labels of {self.num_classes} classes" if self.num_classes > 1 else "no labels"
            raise ConfigError(f"data.n_classes={n_classes!r} does not match {self.name}, which has {has}; set "
                              f"data.n_classes={self.num_classes if self.num_classes > 1 else 'null'}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.hflip = bool(hflip)
        self.val_size = val_size
        self.seed = seed
        self._image_size = image_size
        self._channels = channels
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._origins: dict[str, str] = {}  # split -> the file(s) or folder it was read from

    # ---- what subclasses provide -------------------------------------------------------------
    def _load_train_pool(self) -> TensorSource | FileSource:
        """The training images from which the validation split is carved."""
        raise NotImplementedError

    def _load_test(self) -> TensorSource | FileSource:
        """The held-out images the paper reports on."""
        raise NotImplementedError

    # ---- properties -------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        c = self._channels if self._channels is not None else self.native_channels
        if c is None:
            raise ConfigError(f"{self.name}: data.channels is unknown before setup(); set data.channels")
        return c

    @property
    def image_size(self) -> int:
        s = self._image_size if self._image_size is not None else self.native_image_size
        if s is None:
            raise ConfigError(f"{self.name}: data.image_size is unknown before setup(); set data.image_size")
        return s

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            pool = self._load_train_pool()
            self._check_source(pool)
            train_idx, val_idx = self._split_indices(len(pool), pool.origin)
            self.train_dataset = self._make_dataset(pool, train_idx, hflip=self.hflip)
            self.val_dataset = self._make_dataset(pool, val_idx, hflip=False)
            self._origins["train"] = pool.origin
        if stage in (None, "test", "predict") and self.test_dataset is None:
            test = self._load_test()
            self._check_source(test)
            self.test_dataset = self._make_dataset(test, None, hflip=False)
            self._origins["test"] = test.origin

    def describe(self) -> str:
        """One line saying which data this is: the dataset, its form or release, n_bits, and for each split
        set up so far the number of images and where they were read from, e.g.
        ``imagenet32 (van den Oord et al. 2016 PNG release), 8-bit: train 1271167 + val 10000 images from
        /data/imagenet32/train_32x32; test 50000 images from /data/imagenet32/valid_32x32``."""
        head = (self.name or type(self).__name__) + (f" ({self.form})" if self.form else "") + f", {self.n_bits}-bit"
        parts = []
        if self.train_dataset is not None:
            n_val = len(self.val_dataset) if self.val_dataset is not None else 0
            where = self._origins.get("train", self.root)
            parts.append(f"train {len(self.train_dataset)} + val {n_val} images from {where}")
        if self.test_dataset is not None:
            parts.append(f"test {len(self.test_dataset)} images from {self._origins.get('test', self.root)}")
        return f"{head}: " + ("; ".join(parts) if parts else f"{self.root}, not read yet (call setup() first)")

    def train_dataloader(self) -> DataLoader:
        ds = self._require(self.train_dataset, "train")
        if len(ds) < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the {len(ds)} training images "
                              f"of {self.name} in {self.root} (training drops incomplete batches); "
                              "lower data.batch_size or data.val_size")
        # one order per (global seed, epoch), cut into one share per process, as Lightning's DistributedSampler
        shares = getattr(self.trainer, "distributed_sampler_kwargs", None) or {}
        return ResumableLoader(ds, self.batch_size, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                               num_replicas=shares.get("num_replicas", 1), rank=shares.get("rank", 0),
                               num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        ds = self._require(self.val_dataset, "validation")
        if len(ds) == 0:  # data.val_size=0: Lightning skips validation
            return []
        return self._loader(ds, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset, "test"), shuffle=False, drop_last=False)

    # ---- helpers -------------------------------------------------------------------------------
    def _require(self, ds: Dataset | None, what: str) -> Dataset:
        if ds is None:
            raise RuntimeError(f"the {what} set of {self.name} is not loaded: call setup() first")
        return ds

    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def _n_val(self, n: int) -> int:
        if isinstance(self.val_size, float):
            return int(math.floor(self.val_size * n + 0.5))
        return int(self.val_size)

    def _split_indices(self, n: int, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic train/validation indices: a permutation drawn from ``seed`` only."""
        n_val = self._n_val(n)
        if n_val >= n:
            raise ConfigError(f"data.val_size={self.val_size!r} asks for {n_val} validation images but {origin} "
                              f"holds only {n} training images; lower data.val_size")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, _ = torch.sort(perm[:n_val])
        train_idx, _ = torch.sort(perm[n_val:])
        return train_idx, val_idx

    def _check_source(self, src: TensorSource | FileSource) -> None:
        if isinstance(src, FileSource):
            if len(src) == 0:
                raise DataError(f"no images found in {src.origin}")
            return
        n, c, h, w = src.images.shape
        if n == 0:
            raise DataError(f"no images found in {src.origin}")
        if self._channels is not None and c != self._channels:
            raise ConfigError(f"data.channels={self._channels} does not match the data in {src.origin}, "
                              f"which has {c} channel(s)")
        if self._image_size is not None and (h, w) != (self._image_size, self._image_size):
            raise ConfigError(f"data.image_size={self._image_size} does not match the data in {src.origin}, "
                              f"whose images are {h}x{w}")

    def _make_dataset(self, src: TensorSource | FileSource, idx: torch.Tensor | None, hflip: bool) -> Dataset:
        if isinstance(src, TensorSource):
            if not src.reduced:  # the pool is shared by train and validation: reduce once, in place
                if self.n_bits < 8:
                    src.images.bitwise_right_shift_(8 - self.n_bits)
                src.reduced = True
            return TensorImageDataset(src.images, src.labels, idx, hflip=hflip)
        paths, labels = src.paths, src.labels
        if idx is not None:
            sel = idx.tolist()
            paths = [paths[i] for i in sel]
            labels = None if labels is None else [labels[i] for i in sel]
        return ImageFileDataset(paths, labels, n_bits=self.n_bits, mode=src.mode, size=self.image_size,
                                exact_size=src.exact_size, hflip=hflip,
                                skip_corrupt=bool(src.extra.get("skip_corrupt", False)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, batch_size={self.batch_size}, "
                f"n_bits={self.n_bits}, val_size={self.val_size!r})")
