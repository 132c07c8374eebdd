"""Data sets (Fashion-MNIST, ImageFolder, CIFAR; nothing downloaded at run time) and their transforms."""
from .datasets import DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataError, load_dataset
from .transforms import build_transform

__all__ = ['DATASETS', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'DataError', 'load_dataset', 'build_transform']
