"""Datasets as LightningDataModules, their on-disk formats, and the n-bit pixel convention.

Every DataModule yields batches ``(x, y)``: ``x`` uint8 ``[B, C, H, W]`` already reduced to
``n_bits`` (values ``0 .. 2**n_bits - 1``), ``y`` int64 labels; it exposes ``channels``,
``image_size``, ``n_bits`` and ``num_classes``. The LightningModule turns ``x`` into model space with
``preprocess`` + ``dequantize`` (see :mod:`flowlab.data.transforms`).

``DATAMODULES`` maps each ``conf/data`` choice to its class.
"""

from flowlab.data.base import FileSource, FlowDataModule, TensorSource
from flowlab.data.celebahq import CelebAHQDataModule
from flowlab.data.cifar import CIFAR10DataModule
from flowlab.data.datasets import ImageFileDataset, TensorImageDataset
from flowlab.data.imagenet import ImageNetDownsampledDataModule
from flowlab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from flowlab.data.transforms import check_n_bits, dequantize, postprocess, preprocess, reduce_bits

DATAMODULES: dict[str, type[FlowDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "imagenet32": ImageNetDownsampledDataModule,  # resolution=32
    "imagenet64": ImageNetDownsampledDataModule,  # resolution=64
    "celebahq256": CelebAHQDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
}

__all__ = [
    "DATAMODULES",
    "FlowDataModule",
    "TensorSource",
    "FileSource",
    "TensorImageDataset",
    "ImageFileDataset",
    "CIFAR10DataModule",
    "ImageNetDownsampledDataModule",
    "CelebAHQDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "check_n_bits",
    "reduce_bits",
    "preprocess",
    "dequantize",
    "postprocess",
]
