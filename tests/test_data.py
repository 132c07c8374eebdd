"""Data sets as the trainer and eval read them (nothing downloaded), their class bookkeeping, and transforms."""
import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hydravit.data import FASHION_MNIST_CLASSES, DataError, build_transform, load_dataset

from helpers import needs_fmnist


def write_image(path: Path, value: int, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, (value, 255 - value, 7)).save(path)


def image_folder(root: Path, classes, per_class=2) -> Path:
    """root/<class>/<i>.png, each image filled with a colour that encodes (class position, i)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f'{i}.png', 10 * c + i)
    return root


def pixel(img: Image.Image) -> int:
    return img.getpixel((0, 0))[0]


# ------------------------------------------------------------------------------------------ Fashion-MNIST
@needs_fmnist
def test_fashion_mnist_test_split_from_the_debian_files():
    ds = load_dataset('fashion-mnist', split='val')
    assert len(ds) == 10000 and ds.data.shape == (10000, 28, 28) and ds.data.dtype == torch.uint8
    assert ds.classes == list(FASHION_MNIST_CLASSES) and ds.num_classes == 10
    assert ds.class_indices == list(range(10))
    assert torch.bincount(ds.targets).tolist() == [1000] * 10  # the official test set is balanced
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == 'L' and img.size == (28, 28)
    assert label == int(ds.targets[0]) and np.array_equal(np.asarray(img), ds.data[0].numpy())


@needs_fmnist
def test_max_samples_is_a_seeded_subset_keeping_the_class_attributes():
    a = load_dataset('fashion-mnist', split='val', max_samples=50, seed=1)
    b = load_dataset('fashion-mnist', split='val', max_samples=50, seed=1)
    c = load_dataset('fashion-mnist', split='val', max_samples=50, seed=2)
    assert len(a) == 50 and a.indices == b.indices != c.indices
    assert a.indices != list(range(50))  # random, not the first 50
    assert a.classes == list(FASHION_MNIST_CLASSES) and a.num_classes == 10 and a.class_indices == list(range(10))
    full = a.dataset
    assert all(a[i][1] == int(full.targets[j]) for i, j in enumerate(a.indices[:10]))
    assert len(load_dataset('fashion-mnist', split='val', max_samples=10 ** 6)) == 10000


@needs_fmnist
def test_fashion_mnist_rejects_a_wrong_class_count_or_class_names():
    with pytest.raises(DataError, match=r'fashion-mnist has 10 classes, not num_classes=5'):
        load_dataset('fashion-mnist', split='val', num_classes=5)
    with pytest.raises(DataError, match=r"do not match the class names given \['a', 'b'\].*another data set"):
        load_dataset('fashion-mnist', split='val', class_names=['a', 'b'])


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist') as e:
        load_dataset('fashion-mnist', str(tmp_path / 'nowhere'))
    assert 'nowhere' in str(e.value)
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte\.gz not found in .*apt-get install -y '
                                        r'dataset-fashion-mnist'):
        load_dataset('fashion-mnist', str(tmp_path))  # the folder exists but holds no IDX files


def _write_idx(path: Path, array: np.ndarray, magic: bytes = None) -> None:
    header = (magic or bytes([0, 0, 8, array.ndim])) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_fmnist(root: Path, n=6) -> None:
    root.mkdir(exist_ok=True)
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    for prefix in ('train', 't10k'):
        _write_idx(root / f'{prefix}-images-idx3-ubyte.gz', images)
        _write_idx(root / f'{prefix}-labels-idx1-ubyte.gz', np.arange(n) % 10)


def test_fashion_mnist_from_another_folder_and_corrupt_files(tmp_path):
    _fake_fmnist(tmp_path)
    ds = load_dataset('fashion-mnist', str(tmp_path), split='train')
    assert len(ds) == 6 and ds.targets.tolist() == list(range(6)) and ds.class_indices == list(range(6))
    raw = tmp_path / 'tv' / 'FashionMNIST' / 'raw'  # torchvision's layout
    shutil.copytree(tmp_path, raw, ignore=shutil.ignore_patterns('tv'))
    assert torch.equal(load_dataset('fashion-mnist', str(tmp_path / 'tv')).data, ds.data)
    labels = tmp_path / 't10k-labels-idx1-ubyte.gz'
    _write_idx(labels, np.arange(6), magic=b'\0\0\x08\x03')  # the images' magic number on the labels file
    with pytest.raises(DataError, match=r'is not an IDX file of 1-d uint8 data \(bad magic number 00000803\)') as e:
        load_dataset('fashion-mnist', str(tmp_path), split='val')
    assert str(labels) in str(e.value)
    images = tmp_path / 'train-images-idx3-ubyte.gz'
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte\.gz: header says shape \(6, 28, 28\) \(4704 bytes\) '
                                        r'but it holds 4604 bytes: the file is truncated'):
        load_dataset('fashion-mnist', str(tmp_path), split='train')
    _write_idx(labels, np.arange(5))
    with pytest.raises(DataError, match=r'holds images \(6, 28, 28\) and .*t10k-labels-idx1-ubyte\.gz 5 labels: '
                                        r'expected N images of 28x28 and N labels'):
        load_dataset('fashion-mnist', str(tmp_path), split='val')


# ------------------------------------------------------------------------------------------ ImageFolder
def test_imagefolder_maps_sorted_class_folders_to_labels(tmp_path):
    image_folder(tmp_path / 'train', ['dog', 'cat', 'emu'], per_class=3)
    image_folder(tmp_path / 'validation', ['dog', 'cat', 'emu'], per_class=1)
    (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image: ignored by extension')
    train = load_dataset('imagefolder', str(tmp_path), split='train', num_classes=3)
    assert train.classes == ['cat', 'dog', 'emu'] and train.num_classes == 3 and train.class_indices == [0, 1, 2]
    assert len(train) == 9 and train.targets.count(1) == 3
    for i in range(len(train)):
        img, label = train[i]
        assert img.mode == 'RGB'
        # the colour encodes the position of the class in the write order ['dog', 'cat', 'emu']
        assert ['dog', 'cat', 'emu'][pixel(img) // 10] == train.classes[label]
    val = load_dataset('imagefolder', str(tmp_path), split='val')
    assert len(val) == 3 and val.classes == train.classes
    sub = load_dataset('imagefolder', str(tmp_path), split='train', max_samples=4, seed=0)
    assert len(sub) == 4 and sub.classes == train.classes and sub.class_indices == [0, 1, 2]
    config = dict(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation='bilinear', crop_pct=1.0)
    batched = load_dataset('imagefolder', str(tmp_path), split='train',
                           transform=build_transform(config, is_training=False))
    images, labels = next(iter(DataLoader(batched, batch_size=9, num_workers=1)))  # the data set pickles
    assert images.shape == (9, 3, 8, 8) and labels.tolist() == train.targets


def test_imagefolder_without_split_folders_uses_the_class_folders_directly(tmp_path):
    image_folder(tmp_path, ['a', 'b'])
    ds = load_dataset('imagefolder', str(tmp_path), split='val')
    assert ds.classes == ['a', 'b'] and len(ds) == 4
    with pytest.warns(UserWarning, match='no train/ or val/ folder'):  # training on it: say val is the same
        assert load_dataset('imagefolder', str(tmp_path), split='train').samples == ds.samples


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match='does not exist') as e:
        load_dataset('imagefolder', str(tmp_path / 'missing'))
    assert 'train/<class>' in str(e.value)
    with pytest.raises(DataError, match='needs --data-dir'):
        load_dataset('imagefolder', None)
    image_folder(tmp_path / 'train', ['a', 'b'])
    with pytest.raises(DataError, match='no val or validation folder'):
        load_dataset('imagefolder', str(tmp_path), split='val')
    with pytest.raises(DataError, match='num_classes 5 does not match the 2 class folders'):
        load_dataset('imagefolder', str(tmp_path), num_classes=5)
    (tmp_path / 'train' / 'c').mkdir()
    (tmp_path / 'train' / 'c' / 'readme.txt').write_text('no image here')
    with pytest.raises(DataError, match='hold no images') as e:
        load_dataset('imagefolder', str(tmp_path))
    assert str(tmp_path / 'train' / 'c') in str(e.value)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataError, match='no class folders'):
        load_dataset('imagefolder', str(empty), 'val')


def test_broken_image_is_an_error_naming_the_file(tmp_path):
    image_folder(tmp_path, ['a', 'b'])
    bad = tmp_path / 'a' / '0.png'
    bad.write_bytes(b'this is not a png')
    ds = load_dataset('imagefolder', str(tmp_path), split='val')
    assert ds[1][1] == 0  # construction and the good files are fine
    with pytest.raises(DataError, match='cannot read image') as e:
        ds[0]
    assert str(bad) in str(e.value)


def test_skip_bad_images_warns_once_per_file_and_returns_the_next_good_one(tmp_path):
    image_folder(tmp_path, ['a', 'b'])
    (tmp_path / 'a' / 'broken.jpg').write_bytes(b'\xff\xd8\xff garbage')  # a JPEG header, then garbage
    ds = load_dataset('imagefolder', str(tmp_path), split='val', skip_bad_images=True)
    index = [Path(p).name for p, _ in ds.samples].index('broken.jpg')
    following = ds.samples[index + 1]
    with pytest.warns(UserWarning, match='broken.jpg'):
        img, label = ds[index]
    assert label == following[1] and pixel(img) == pixel(Image.open(following[0]).convert('RGB'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the second time: no warning, same replacement
        img2, label2 = ds[index]
    assert label2 == label and pixel(img2) == pixel(img)


def test_test_set_holding_a_subset_of_the_training_classes(tmp_path):
    train_classes = ['ant', 'bee', 'cat', 'dog', 'eel']
    image_folder(tmp_path / 'subset', ['eel', 'bee'])
    ds = load_dataset('imagefolder', str(tmp_path / 'subset'), split='val', class_names=train_classes,
                      num_classes=5)
    assert ds.classes == train_classes and ds.num_classes == 5 and ds.class_indices == [1, 4]
    assert {ds.classes[label] for _, label in ds.samples} == {'bee', 'eel'}
    assert all(['eel', 'bee'][pixel(ds[i][0]) // 10] == ds.classes[ds[i][1]] for i in range(len(ds)))
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('\n'.join(train_classes) + '\n')
    by_file = load_dataset('imagefolder', str(tmp_path / 'subset'), 'val', class_map=str(class_map))
    assert by_file.classes == train_classes and by_file.samples == ds.samples
    stored = ['a', 'b', 'c', 'd', 'e']  # names stored in a checkpoint: an explicit class map wins
    both = load_dataset('imagefolder', str(tmp_path / 'subset'), 'val', class_names=stored, class_map=str(class_map))
    assert both.classes == train_classes and both.class_indices == [1, 4]
    with pytest.raises(DataError, match='names 5 classes but the model has 2'):
        load_dataset('imagefolder', str(tmp_path / 'subset'), 'val', class_names=['x', 'y'], class_map=str(class_map))
    image_folder(tmp_path / 'unknown', ['bee', 'yak'])
    with pytest.raises(DataError, match="'yak'.*not training classes") as e:
        load_dataset('imagefolder', str(tmp_path / 'unknown'), 'val', class_names=train_classes)
    assert 'ant' in str(e.value)
    with pytest.raises(DataError, match='num_classes 3 does not match the 5 class names'):
        load_dataset('imagefolder', str(tmp_path / 'subset'), 'val', class_names=train_classes, num_classes=3)


def test_numbered_folders_map_to_class_indices(tmp_path):
    image_folder(tmp_path / 'v2', ['0', '2', '10'])  # ImageNet-V2 style: sorted as text, 10 < 2
    named = load_dataset('imagefolder', str(tmp_path / 'v2'), 'val', class_names=[f'c{i}' for i in range(12)])
    assert named.class_indices == [0, 2, 10] and named.classes[10] == 'c10'
    assert all(['0', '2', '10'][pixel(named[i][0]) // 10] == str(named[i][1]) for i in range(len(named)))
    bare = load_dataset('imagefolder', str(tmp_path / 'v2'), 'val', num_classes=12)
    assert bare.num_classes == 12 and bare.class_indices == [0, 2, 10] and bare.classes[2] == '2'
    with pytest.raises(DataError, match=r'outside 0\.\.4'):
        load_dataset('imagefolder', str(tmp_path / 'v2'), 'val', class_names=list('abcde'))


# ------------------------------------------------------------------------------------------ CIFAR, names
@pytest.mark.parametrize('name, folder', [('cifar10', 'cifar-10-batches-py'), ('cifar100', 'cifar-100-python')])
def test_cifar_is_never_downloaded(tmp_path, name, folder):
    with pytest.raises(DataError, match='nothing is downloaded') as e:
        load_dataset(name, str(tmp_path))
    assert str(tmp_path / folder) in str(e.value)
    with pytest.raises(DataError, match='needs --data-dir'):
        load_dataset(name, None)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / 'data_batch_1').write_bytes(b'not a pickle')
    with pytest.raises(DataError, match='incomplete or corrupt'):
        load_dataset(name, str(tmp_path), split='val')
    assert not any(p.suffix == '.gz' for p in tmp_path.iterdir())  # nothing fetched


def test_unknown_dataset_and_split_list_the_choices(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'mnist': choose one of fashion-mnist, imagefolder, cifar10, "
                                        r'cifar100'):
        load_dataset('mnist', str(tmp_path))
    with pytest.raises(DataError, match=r"unknown split 'dev': choose one of train, val, test"):
        load_dataset('fashion-mnist', str(tmp_path), split='dev')
    with pytest.raises(DataError, match=r'max_samples must be a positive integer or None, got 0'):
        load_dataset('fashion-mnist', str(tmp_path), max_samples=0)


# ------------------------------------------------------------------------------------------ transforms
GRAY_CONFIG = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.25,), interpolation='bilinear', crop_pct=0.875)
RGB_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation='bicubic',
                  crop_pct=0.9)


@pytest.mark.parametrize('config', [GRAY_CONFIG, RGB_CONFIG])
@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_transforms_give_the_model_input_shape_from_any_image_mode(config, mode):
    rng = np.random.default_rng(0)
    shape = (40, 36) if mode == 'L' else (40, 36, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    train = build_transform(config, is_training=True, scale=(0.5, 1.0), hflip=0.5, auto_augment='rand-m9-mstd0.5',
                            re_prob=0.5, color_jitter=None)
    evaluate = build_transform(config, is_training=False)
    for _ in range(5):
        assert train(img).shape == config['input_size']
    assert evaluate(img).shape == config['input_size'] and evaluate(img).dtype == torch.float32


def test_small_images_are_evaluated_uncropped_and_normalised():
    array = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    x = build_transform(GRAY_CONFIG, is_training=False)(Image.fromarray(array, mode='L'))
    expected = (torch.from_numpy(array).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x[0], expected, atol=1e-5)  # crop_pct 0.875 ignored: no border lost


def test_transform_rejects_mismatched_normalisation():
    with pytest.raises(DataError, match='one value per channel'):
        build_transform({**GRAY_CONFIG, 'mean': (0.5, 0.5, 0.5)}, is_training=False)


def test_deit_randaugment_survives_posterize_with_zero_bits():
    """rand-m9-mstd0.5-inc1 draws magnitude 10 (0 bits kept) now and then; Pillow >= 13 rejects 0 bits."""
    import numpy as np
    import PIL
    from PIL import Image
    from timm.data import create_transform
    from timm.data.auto_augment import AugmentOp, posterize

    from hydravit.data.transforms import build_transform, pillow_safe_posterize

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # 4 - int(10 / 10 * 4) = 0 bits
    if int(PIL.__version__.split('.')[0]) >= 13:
        with pytest.raises(ValueError, match='bits'):
            op(img)  # timm's op as it is
    transform = create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')
    rand_augment = next(t for t in transform.transforms if hasattr(t, 'ops'))
    rand_augment.ops = [op]
    pillow_safe_posterize(transform)
    assert op.aug_fn is not posterize  # the op was rewired
    assert np.asarray(op(img)).max() == 0  # 0 bits kept: black, as Pillow < 13 gave
    assert np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)).max() == 192  # 2 bits: timm's
    data_config = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation='bicubic')
    built = build_transform(data_config, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')
    ops = [o for t in built.transforms[1].transforms if hasattr(t, 'ops') for o in t.ops]
    assert ops and all(o.aug_fn is not posterize for o in ops if o.name.startswith('Posterize'))
