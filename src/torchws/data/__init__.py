"""Datasets and loaders: Fashion-MNIST (IDX), CIFAR-10/100 (pickle batches), sklearn digits, ImageNet-style image
folders, and a tensor loader for in-memory data."""

from .cifar import load_cifar10, load_cifar100
from .digits import load_digits_splits
from .errors import DatasetFormatError, DatasetNotFoundError
from .fashion_mnist import find_fashion_mnist, load_fashion_mnist
from .idx import read_idx
from .image_folder import ImageFolderDataset
from .loader import TensorLoader
from .registry import DatasetInfo, dataset_info, list_datasets, load_dataset
from .splits import TensorSplits, channel_stats
from .transforms import IMAGENET_MEAN, IMAGENET_STD, crop_flip, random_crop_flip

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "TensorLoader",
    "TensorSplits",
    "channel_stats",
    "crop_flip",
    "dataset_info",
    "find_fashion_mnist",
    "list_datasets",
    "load_cifar10",
    "load_cifar100",
    "load_digits_splits",
    "load_dataset",
    "load_fashion_mnist",
    "random_crop_flip",
    "read_idx",
]
