"""Datasets as LightningDataModules (one per ``conf/data`` family), their on-disk formats and the n-bit pixel
convention; batches are ``(x, y, index)`` (see :mod:`flowlab.data.base`)."""

from flowlab.data.base import FileSource, FlowDataModule, TensorSource
from flowlab.data.celebahq import CelebAHQDataModule
from flowlab.data.cifar import CIFAR10DataModule
from flowlab.data.datasets import ImageFileDataset, TensorImageDataset
from flowlab.data.imagenet import ImageNetDownsampledDataModule
from flowlab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from flowlab.data.svhn import SVHNDataModule
from flowlab.data.transforms import dequantize, postprocess, preprocess, reduce_bits

__all__ = ["FlowDataModule", "TensorSource", "FileSource", "TensorImageDataset", "ImageFileDataset",
           "CIFAR10DataModule", "ImageNetDownsampledDataModule", "CelebAHQDataModule", "MNISTDataModule",
           "FashionMNISTDataModule", "SVHNDataModule", "reduce_bits", "preprocess", "dequantize", "postprocess"]
