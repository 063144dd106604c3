"""Datasets as LightningDataModules, their on-disk formats, and the n-bit pixel convention.

Every DataModule yields batches ``(x, y, index)`` in every split: ``x`` uint8 ``[B, C, H, W]`` already
reduced to ``n_bits`` (values ``0 .. 2**n_bits - 1``), ``y`` int64 labels, ``index`` int64 positions of
the images in their split (evaluation keys its noise and counts each image once by it); it exposes
``channels``, ``image_size``, ``n_bits``, ``num_classes`` and ``describe()`` (one line: dataset,
release, files read, images per split). The LightningModule turns ``x`` into model space with
``preprocess`` + ``dequantize`` (see :mod:`flowlab.data.transforms`).

``DATAMODULES`` maps each ``conf/data`` choice to its class.
"""

from flowlab.data.base import FileSource, FlowDataModule, TensorSource
from flowlab.data.celebahq import CelebAHQDataModule
from flowlab.data.cifar import CIFAR10DataModule
from flowlab.data.datasets import ImageFileDataset, TensorImageDataset
from flowlab.data.imagenet import ImageNetDownsampledDataModule
from flowlab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from flowlab.data.svhn import SVHNDataModule
from flowlab.data.transforms import dequantize, postprocess, preprocess, reduce_bits

DATAMODULES: dict[str, type[FlowDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "imagenet32": ImageNetDownsampledDataModule,  # resolution=32, release=oord (PNG; the paper's data)
    "imagenet64": ImageNetDownsampledDataModule,  # resolution=64, release=oord
    "imagenet32_chrabaszcz": ImageNetDownsampledDataModule,  # resolution=32, release=chrabaszcz (npz; not comparable)
    "imagenet64_chrabaszcz": ImageNetDownsampledDataModule,  # resolution=64, release=chrabaszcz
    "celebahq256": CelebAHQDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "svhn": SVHNDataModule,
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
    "SVHNDataModule",
    "reduce_bits",
    "preprocess",
    "dequantize",
    "postprocess",
]
