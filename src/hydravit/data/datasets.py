"""Data sets for training and evaluation: Fashion-MNIST, ImageFolder (the ImageNet layout), CIFAR-10/100, and
every map-style data set of timm's ``create_dataset`` (``folder``, ``tar``, ``hfds/...``, ``torch/...``).

Every data set returned by :func:`load_dataset` yields ``(transform(img), label)`` with ``img`` a PIL image
(mode ``'L'`` for Fashion-MNIST, ``'RGB'`` otherwise) and has ``.classes`` (class names, index = label),
``.num_classes`` and ``.class_indices`` (the sorted labels present: a strict subset of
``range(num_classes)`` for ImageNet-R/-A style test sets, whose logits are then restricted to them).
Nothing is downloaded at run time: missing files give a :class:`DataError` saying where they were looked for.
"""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['DATASETS', 'FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'DataError', 'FashionMNIST', 'ImageFolder',
           'CIFAR', 'DatasetSubset', 'TimmDataset', 'is_timm_dataset', 'load_dataset', 'read_idx', 'read_class_map']

DATASETS = ('fashion-mnist', 'imagefolder', 'cifar10', 'cifar100')
# timm create_dataset names: its folder/tar readers and its prefixed sources (the rest of the name is theirs)
TIMM_READERS = ('folder', 'tar')
TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
ITERABLE_PREFIXES = ('hfids', 'tfds', 'wds')
SPLITS = ('train', 'val', 'test')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                       'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
IMAGEFOLDER_SPLITS = {'train': ('train',), 'val': ('val', 'validation'), 'test': ('test',)}
IDX_UINT8 = 0x08


class DataError(ValueError):
    """A data set that is missing, malformed or inconsistent with the model (a clear message, no traceback)."""


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not), with its magic number and size checked."""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        if raw[:2] == b'\x1f\x8b':
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f'cannot read {path}: {e}') from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b'\0\0' or raw[2] != IDX_UINT8 or raw[3] != ndim:
        raise DataError(f'{path} is not an IDX file of {ndim}-d uint8 data (bad magic number {raw[:4].hex()}): '
                        f'the file is corrupt or not the one expected')
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f'{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but it holds '
                        f'{len(raw) - header} bytes: the file is truncated or corrupt')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    """``root/stem[.gz]``, also in torchvision's ``FashionMNIST/raw`` layout."""
    for folder in (root, root / 'raw', root / 'FashionMNIST' / 'raw'):
        for name in (stem + '.gz', stem):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f'Fashion-MNIST file {stem}.gz not found in {root}: install the data with '
                    f'`apt-get install -y dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}) or point '
                    f'--data-dir at a folder holding the four IDX files')


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files, held in memory as uint8 tensors ``.data`` (N, 28, 28), ``.targets`` (N,)."""

    def __init__(self, root: Optional[str] = None, split: str = 'train', transform: Optional[Callable] = None) -> None:
        root_path = Path(root or FASHION_MNIST_DIR)
        if not root_path.is_dir():
            raise DataError(f'Fashion-MNIST folder {root_path} does not exist: install the data with '
                            f'`apt-get install -y dataset-fashion-mnist` or point --data-dir at a folder '
                            f'holding the four IDX files')
        images_file, labels_file = (_find_idx(root_path, stem) for stem in FASHION_MNIST_FILES[split])
        images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(f'{images_file} holds images {images.shape} and {labels_file} {labels.shape[0]} labels: '
                            f'expected N images of 28x28 and N labels')
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f'{labels_file} has label {labels.max()}, outside 0..9')
        self.data, self.targets = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        self.root, self.split, self.transform = root_path, split, transform
        self.classes = list(FASHION_MNIST_CLASSES)
        self.num_classes = len(self.classes)
        self.class_indices = sorted(int(i) for i in torch.unique(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.data[index].numpy(), mode='L')
        return (self.transform(img) if self.transform else img), int(self.targets[index])


# ------------------------------------------------------------------------------------------ ImageFolder
def read_class_map(path: str) -> List[str]:
    """Training-class names, one per line (line i = class index i); blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f'cannot read class map {path}: {e}') from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith('#')]
    if not names:
        raise DataError(f'class map {path} holds no class names (expected one training-class name per line)')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f'class map {path} names {duplicates[:5]} more than once')
    return names


def _class_folders(root: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def _map_folders(root: Path, folders: List[str], class_names: Optional[Sequence[str]],
                 num_classes: Optional[int]) -> Tuple[List[str], Dict[str, int]]:
    """(all class names, folder -> label): by name in ``class_names``, or by number for numbered folders."""
    numbered = all(f.isascii() and f.isdigit() for f in folders)
    if class_names is not None:
        names = [str(n) for n in class_names]
        if num_classes is not None and num_classes != len(names):
            raise DataError(f'num_classes {num_classes} does not match the {len(names)} class names given')
        index = {n: i for i, n in enumerate(names)}
        if all(f in index for f in folders):
            return names, {f: index[f] for f in folders}
        if not numbered:
            unknown = [f for f in folders if f not in index]
            raise DataError(f'class folders {unknown[:5]} in {root} are not training classes (valid names are '
                            f'e.g. {names[:5]}); name folders after training classes or by class index')
    elif numbered:
        names = [str(i) for i in range(num_classes or max(int(f) for f in folders) + 1)]
    else:
        if num_classes is not None and num_classes != len(folders):
            raise DataError(f'num_classes {num_classes} does not match the {len(folders)} class folders in {root}')
        return folders, {f: i for i, f in enumerate(folders)}
    out_of_range = [f for f in folders if int(f) >= len(names)]
    if out_of_range:
        raise DataError(f'numbered class folders {out_of_range[:5]} in {root} are outside 0..{len(names) - 1}')
    return names, {f: int(f) for f in folders}


def _load_image(path: str) -> Image.Image:
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        raise DataError(f'cannot read image {path}: {type(e).__name__}: {e}') from None


class ImageFolder(Dataset):
    """Class folders of images (torchvision's layout and file scan), with clear errors for broken data.

    A broken file raises :class:`DataError` naming it when read, or with ``skip_bad_images=True`` is reported
    once with a warning and replaced by the next readable sample (deterministic).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, *, skip_bad_images: bool = False,
                 num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.root = Path(root)
        folders = _class_folders(self.root)
        if not folders:
            raise DataError(f'no class folders in {self.root}: expected {self.root}/<class name>/<image files>')
        self.classes, self.class_to_idx = _map_folders(self.root, folders, class_names, num_classes)
        self.samples = make_dataset(str(self.root), self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        present = {label for _, label in self.samples}
        empty = [f for f in folders if self.class_to_idx[f] not in present]
        if empty:
            raise DataError(f'class folder(s) {[str(self.root / f) for f in empty[:5]]} hold no images '
                            f'(extensions {", ".join(IMG_EXTENSIONS)})')
        self.targets = [label for _, label in self.samples]
        self.num_classes = len(self.classes)
        self.class_indices = sorted(set(self.class_to_idx.values()))
        self.transform, self.skip_bad_images = transform, skip_bad_images
        self._reported: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                img = _load_image(path)
            except DataError as e:
                if not self.skip_bad_images:
                    raise
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f'skipping bad image: {e}', stacklevel=2)
                continue
            return (self.transform(img) if self.transform else img), label
        raise DataError(f'no readable image in {self.root}')


def _imagefolder_root(data_dir: Optional[str], split: str) -> Path:
    """``data_dir/<split folder>``; ``data_dir`` itself when it has no split folders (a bare evaluation set)."""
    if not data_dir:
        raise DataError('the imagefolder data set needs --data-dir: a folder with train/ and val/ holding one '
                        'folder of images per class (the ImageNet layout)')
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f'data folder {root} does not exist (expected {root}/train/<class>/<images> and '
                        f'{root}/val/<class>/<images>)')
    for name in IMAGEFOLDER_SPLITS[split]:
        if (root / name).is_dir():
            return root / name
    present = [n for names in IMAGEFOLDER_SPLITS.values() for n in names if (root / n).is_dir()]
    if present:
        raise DataError(f'no {" or ".join(IMAGEFOLDER_SPLITS[split])} folder in {root} (found {present}): '
                        f'expected {root}/{IMAGEFOLDER_SPLITS[split][0]}/<class>/<images>')
    if split == 'train':
        warnings.warn(f'{root} has no train/ or val/ folder: using its class folders directly for every split',
                      stacklevel=3)
    return root


# ------------------------------------------------------------------------------------------ CIFAR
CIFAR_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}


class CIFAR(Dataset):
    """torchvision's CIFAR-10/100 read from disk (never downloaded), with the attributes of this module."""

    def __init__(self, name: str, data_dir: Optional[str], split: str, transform: Optional[Callable] = None) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        folder = CIFAR_FOLDERS[name]
        if not data_dir:
            raise DataError(f'{name} needs --data-dir: the folder holding {folder}/ (torchvision layout); '
                            f'nothing is downloaded at run time')
        root = Path(data_dir)
        root = root.parent if root.name == folder else root
        if not (root / folder).is_dir():
            raise DataError(f'{name} not found: looked for {root / folder}/ (torchvision layout); nothing is '
                            f'downloaded at run time, so put the extracted python version of {name} there')
        try:
            self.dataset = (CIFAR10 if name == 'cifar10' else CIFAR100)(str(root), train=split == 'train',
                                                                        download=False)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f'{name} in {root / folder} is incomplete or corrupt: {e}') from None
        self.transform = transform
        self.data, self.targets = self.dataset.data, list(self.dataset.targets)
        self.classes = list(self.dataset.classes)
        self.num_classes = len(self.classes)
        self.class_indices = sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, label = self.dataset[index]
        return (self.transform(img) if self.transform else img), int(label)


# ------------------------------------------------------------------------------------------ timm create_dataset
def is_timm_dataset(name: str) -> bool:
    """``folder``, ``tar`` or ``<prefix>/<name>`` with one of timm's prefixes (torch, hfds, hfids, tfds, wds)."""
    prefix, sep, _ = name.partition('/')
    return name in TIMM_READERS or bool(sep) and prefix.lower() in TIMM_PREFIXES


def _timm_root(name: str, data_dir: Optional[str], split: str) -> Path:
    """The folder or .tar of one split: ``data_dir/<split>[.tar]``, else ``data_dir`` itself (a bare set)."""
    if not data_dir:
        raise DataError(f'the {name} data set needs --data-dir: a folder with train/ and val/ (class folders, or '
                        'one .tar per class) or train.tar and val.tar, or a single .tar')
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f'data {root} does not exist')
    if root.is_file():
        return root
    for split_name in IMAGEFOLDER_SPLITS[split]:
        for candidate in (root / split_name, root / f'{split_name}.tar'):
            if candidate.exists():
                return candidate
    return root


class _TargetMap:
    """Reader label -> training-class index (picklable, for loader workers)."""

    def __init__(self, table: Dict[int, int]) -> None:
        self.table = table

    def __call__(self, target: int) -> int:
        return self.table[int(target)]


def _reader_classes(dataset: Any) -> Tuple[Optional[Dict[str, int]], Optional[List[int]]]:
    """(class name -> reader label, labels of the samples) of a timm reader or torchvision set, where known."""
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx') and hasattr(reader, 'samples'):
        return dict(reader.class_to_idx), [int(t) for _, t in reader.samples]  # timm folder reader
    if reader is not None and hasattr(reader, 'class_name_to_idx'):
        return dict(reader.class_name_to_idx), [int(t) for t in reader.targets]  # timm tar reader
    if reader is not None and hasattr(reader, 'class_to_idx') and hasattr(reader, 'iter_targets'):
        return dict(reader.class_to_idx), [int(t) for t in reader.iter_targets()]  # timm hfds reader
    if hasattr(dataset, 'class_to_idx') and hasattr(dataset, 'targets'):
        return dict(dataset.class_to_idx), [int(t) for t in dataset.targets]  # torchvision
    targets = getattr(dataset, 'targets', None)
    return None, ([int(t) for t in targets] if targets is not None else None)


class TimmDataset(Dataset):
    """One split of a timm ``create_dataset`` source, with this module's class attributes.

    Labels are mapped to the training classes by name with the same rule as :class:`ImageFolder`
    (``_map_folders``: by name in ``class_names``, by number for numbered folders, else sorted names), so
    a folder, a tar of the same images and the built-in ``imagefolder`` give the same labels, and a
    validation or robustness set holding a subset of the classes keeps the training indices.
    """

    def __init__(self, name: str, data_dir: Optional[str], split: str, transform: Optional[Callable] = None, *,
                 num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> None:
        from timm.data import ImageDataset, create_dataset

        prefix = name.partition('/')[0].lower() if '/' in name else ''
        if prefix in ITERABLE_PREFIXES:
            raise DataError(f'{name}: {prefix}/ data sets stream without random access; training here needs a '
                            'map-style data set for its exact resume and per-class scoring: use folder, tar, '
                            'hfds/<name> or torch/<name>')
        timm_split = 'train' if split == 'train' else ('test' if split == 'test' else 'validation')
        try:
            if prefix:
                root = data_dir
                self.dataset = create_dataset(name, root=root, split=timm_split, is_training=split == 'train',
                                              download=False, transform=transform)
            else:
                root_path = _timm_root(name, data_dir, split)
                root = str(root_path)
                if name == 'tar' and root_path.is_dir():
                    from timm.data.readers.reader_image_in_tar import ReaderImageInTar
                    self.dataset = ImageDataset(root, reader=ReaderImageInTar(root), transform=transform)
                else:
                    self.dataset = create_dataset('', root=root, split=timm_split, search_split=False,
                                                  transform=transform)
        except DataError:
            raise
        except (AssertionError, FileNotFoundError, OSError, RuntimeError, ValueError, ImportError) as e:
            raise DataError(f'timm cannot open data set {name!r} at {data_dir} ({type(e).__name__}: {e}); nothing '
                            'is downloaded at run time') from None
        self.root, self.transform = root, transform
        reader_names, labels = _reader_classes(self.dataset)
        if labels is None:
            raise DataError(f'{name}: timm gives no labels for its samples up front; cannot check its classes')
        if reader_names is not None:
            # timm's readers number classes in natural order (a, b9, b10): sorted names, as ImageFolder does; a
            # torchvision set's labels are its own (Fashion-MNIST: T-shirt/top is 0), so they keep their order
            from_reader = getattr(self.dataset, 'reader', None) is not None
            folders = sorted(reader_names) if from_reader else sorted(reader_names, key=reader_names.__getitem__)
            self.classes, folder_to_label = _map_folders(Path(str(root)), folders, class_names, num_classes)
            table = {reader_names[f]: folder_to_label[f] for f in folders}
            if any(old != new for old, new in table.items()):
                self._set_target_map(_TargetMap(table))
            labels = [table[t] for t in labels]
        else:
            count = num_classes or (len(class_names) if class_names is not None else max(labels) + 1)
            self.classes = [str(c) for c in class_names] if class_names is not None else [str(i) for i in
                                                                                           range(count)]
        self.targets = labels
        self.num_classes = len(self.classes)
        self.class_indices = sorted(set(labels))

    def _set_target_map(self, target_map: _TargetMap) -> None:
        if not hasattr(self.dataset, 'target_transform'):
            raise DataError(f'{type(self.dataset).__name__} takes no target transform: cannot map its classes')
        self.dataset.target_transform = target_map

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, label = self.dataset[index]
        return img, int(label)


# ------------------------------------------------------------------------------------------ subsets
class DatasetSubset(Dataset):
    """A seeded random subset (quick runs) that keeps the class attributes of the full data set.

    ``class_indices`` stays that of the full set: a small sample must not narrow the classes scored.
    """

    def __init__(self, dataset: LoadedDataset, max_samples: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.indices = sorted(torch.randperm(len(dataset), generator=generator)[:max_samples].tolist())
        self.dataset = dataset
        self.classes: List[str] = dataset.classes
        self.num_classes: int = dataset.num_classes
        self.class_indices: List[int] = dataset.class_indices
        targets = getattr(dataset, 'targets', None)
        self.targets = [int(targets[i]) for i in self.indices] if targets is not None else None

    @property
    def transform(self) -> Optional[Callable]:
        return self.dataset.transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        return self.dataset[self.indices[index]]


# what load_dataset returns: each has .classes, .num_classes, .class_indices, .transform and a length
LoadedDataset = Union[FashionMNIST, ImageFolder, CIFAR, TimmDataset, DatasetSubset]


# ------------------------------------------------------------------------------------------ entry point
def _check_builtin(name: str, dataset: Union[FashionMNIST, CIFAR], num_classes: Optional[int],
                   class_names: Optional[Sequence[str]], class_map: Optional[str]) -> None:
    if class_map is not None:
        raise DataError(f'class_map (--class-map) applies to imagefolder data sets only, not {name}')
    if num_classes is not None and num_classes != dataset.num_classes:
        raise DataError(f'{name} has {dataset.num_classes} classes, not num_classes={num_classes}')
    if class_names is not None and list(class_names) != dataset.classes:
        raise DataError(f'{name} classes {dataset.classes[:5]}... do not match the class names given '
                        f'{list(class_names)[:5]}...: the model was trained on another data set')


def _training_classes(class_names: Optional[Sequence[str]], class_map: Optional[str]) -> Optional[List[str]]:
    """The class map file's names (an explicit choice: they win over stored ``class_names`` of equal length)."""
    if class_map is None:
        return None if class_names is None else [str(n) for n in class_names]
    names = read_class_map(class_map)
    if class_names is not None and len(class_names) != len(names):
        raise DataError(f'class map {class_map} names {len(names)} classes but the model has {len(class_names)}')
    return names


def load_dataset(name: str, data_dir: Optional[str] = None, split: str = 'train', *,
                 transform: Optional[Callable] = None, max_samples: Optional[int] = None, seed: int = 0,
                 skip_bad_images: bool = False, num_classes: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, class_map: Optional[str] = None) -> LoadedDataset:
    """One split of a data set of :data:`DATASETS`.

    ``split``: ``'train'`` or ``'val'`` (Fashion-MNIST/CIFAR: the test set, also called ``'test'``; ImageFolder:
    ``data_dir/val`` or ``data_dir/validation``, ``'test'``: ``data_dir/test``; a ``data_dir`` with none of these
    split folders is itself the folder of class folders, e.g. ImageNet-V2 or ImageNet-R).
    ``class_names`` (or a ``class_map`` file, one name per line, which wins) are the training classes: class
    folders map to the index of their name, or to ``int(name)`` when all folders are numbered (ImageNet-V2;
    numbered folders also map so without class names).
    ``max_samples``: a random subset of that size, the same for the same ``seed``.
    """
    if name not in DATASETS and not is_timm_dataset(name):
        raise DataError(f'unknown dataset {name!r}: choose one of {", ".join(DATASETS)}, or a timm create_dataset '
                        f'name: {", ".join(TIMM_READERS)}, ' + ', '.join(f'{p}/<name>' for p in TIMM_PREFIXES))
    if split not in SPLITS:
        raise DataError(f'unknown split {split!r}: choose one of {", ".join(SPLITS)}')
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise DataError(f'max_samples must be a positive integer or None, got {max_samples!r}')
    if is_timm_dataset(name):
        dataset: LoadedDataset = TimmDataset(name, data_dir, split, transform, num_classes=num_classes,
                                             class_names=_training_classes(class_names, class_map))
    elif name == 'imagefolder':
        names = _training_classes(class_names, class_map)
        dataset = ImageFolder(str(_imagefolder_root(data_dir, split)), transform,
                                             skip_bad_images=skip_bad_images, num_classes=num_classes,
                                             class_names=names)
    else:
        builtin_split = 'train' if split == 'train' else 'val'
        dataset = (FashionMNIST(data_dir, builtin_split, transform) if name == 'fashion-mnist'
                   else CIFAR(name, data_dir, builtin_split, transform))
        _check_builtin(name, dataset, num_classes, class_names, class_map)
    if max_samples is not None and max_samples < len(dataset):
        dataset = DatasetSubset(dataset, max_samples, seed)
    return dataset
