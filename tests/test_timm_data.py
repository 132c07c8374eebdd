"""Data through timm's create_dataset: a folder and a tar of the same images give the same batches and labels as the
built-in ImageFolder; class subsets and numbered folders keep the training classes' indices."""
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hydravit.data import DataError, build_transform, load_dataset

# class names whose natural order (timm: a, b9, b10) differs from the sorted order (a, b10, b9)
CLASSES = ('a', 'b10', 'b9')
DATA_CONFIG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
                   interpolation='bilinear')


def _images(root, classes=CLASSES, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f'{c}_{i}.jpg')
    return root


def _tar(folder, path):
    with tarfile.open(path, 'w') as tf:
        for f in sorted(folder.rglob('*.jpg')):
            tf.add(f, arcname=str(f.relative_to(folder)))
    return path


def _batches(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_folder_tar_and_builtin_imagefolder_give_identical_batches(tmp_path):
    _images(tmp_path / 'data' / 'train')
    tars = tmp_path / 'tars'
    tars.mkdir()
    _tar(tmp_path / 'data' / 'train', tars / 'train.tar')
    transform = build_transform(DATA_CONFIG, is_training=False)
    folder = load_dataset('folder', str(tmp_path / 'data'), 'train', transform=transform)
    tar = load_dataset('tar', str(tars), 'train', transform=transform)
    builtin = load_dataset('imagefolder', str(tmp_path / 'data'), 'train', transform=transform)
    assert folder.classes == tar.classes == builtin.classes == sorted(CLASSES)
    assert len(folder) == len(tar) == len(builtin) == 9
    # the built-in reader orders samples by class folder, timm's by file name: the same image gets the same label
    def labelled_images(dataset):
        return sorted((x.flatten()[:8].tolist(), int(y))
                      for xb, yb in _batches(dataset) for x, y in zip(xb, yb, strict=True))
    assert labelled_images(folder) == labelled_images(tar) == labelled_images(builtin)
    # and the timm folder and tar readers give the very same batches, in order
    for (xf, yf), (xt, yt) in zip(_batches(folder), _batches(tar), strict=True):
        assert torch.equal(xf, xt) and torch.equal(yf, yt)


def test_subset_of_classes_keeps_training_indices_and_max_samples(tmp_path):
    _images(tmp_path / 'val', classes=('b9',))
    subset = load_dataset('folder', str(tmp_path), 'val', class_names=sorted(CLASSES))
    assert subset.num_classes == 3 and subset.class_indices == [2] and set(subset.targets) == {2}
    assert subset[0][1] == 2
    few = load_dataset('folder', str(tmp_path), 'val', class_names=sorted(CLASSES), max_samples=2, seed=1)
    assert len(few) == 2 and few.class_indices == [2]
    with pytest.raises(DataError, match=r"class folders \['b9'\] .* are not training classes"):
        load_dataset('folder', str(tmp_path), 'val', class_names=['x', 'y'])


def test_numbered_folders_and_bad_names(tmp_path):
    _images(tmp_path / 'v2', classes=('0', '7'))
    numbered = load_dataset('tar', str(_tar(tmp_path / 'v2', tmp_path / 'v2.tar')), 'val', num_classes=10)
    assert numbered.num_classes == 10 and numbered.class_indices == [0, 7]
    with pytest.raises(DataError, match=r"unknown dataset 'nope'.*folder, tar, torch/<name>, hfds/<name>"):
        load_dataset('nope', str(tmp_path))
    with pytest.raises(DataError, match=r'wds/ data sets stream without random access'):
        load_dataset('wds/imagenet', str(tmp_path))
    with pytest.raises(DataError, match=r'the folder data set needs --data-dir'):
        load_dataset('folder', None)
