"""timm's other data sources through ``--dataset``: ``torch/<name>`` (timm's torchvision wrapper) on files made here,
never downloaded, and ``hfds/<name>`` (Hugging Face ``datasets``, an optional package) on a local folder."""
import csv
import socket

import numpy as np
import pytest

from hydravit.cli import main as cli_main
from hydravit.data import DataError, load_dataset
from hydravit.data.datasets import FASHION_MNIST_CLASSES

pytestmark = pytest.mark.usefixtures('one_thread')

SIZES = {'train': 20, 't10k': 10}  # torchvision's file prefixes of the two splits


def _idx_files(root, seed=0):
    """Fashion-MNIST in torchvision's layout (``FashionMNIST/raw``, uncompressed IDX), random 28x28 images with a
    class-coloured corner so the classes are learnable; returns {prefix: (images, labels)}."""
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    made = {}
    for prefix, n in SIZES.items():
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8)
        images[:, :7, :7] = (labels * 25)[:, None, None]
        (raw / f'{prefix}-images-idx3-ubyte').write_bytes(
            np.array([2051, n, 28, 28], dtype='>i4').tobytes() + images.tobytes())
        (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(np.array([2049, n], dtype='>i4').tobytes() + labels.tobytes())
        made[prefix] = images, labels
    return made


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: a download would show up here, not as a hang."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f'test: no network ({address})')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    return attempts


def test_torch_source_reads_local_files_with_their_labels(tmp_path, no_network):
    images, labels = _idx_files(tmp_path)['t10k']
    dataset = load_dataset('torch/fashion_mnist', str(tmp_path), split='val')
    assert len(dataset) == SIZES['t10k'] and dataset.num_classes == 10
    assert dataset.classes == list(FASHION_MNIST_CLASSES)  # torchvision's label order, as the built-in loader's
    assert dataset.targets == labels.tolist()
    img, label = dataset[3]
    assert label == 3 and np.array_equal(np.asarray(img), images[3])
    assert no_network == []


def test_torch_source_without_its_files_fails_at_once_naming_them(tmp_path, no_network):
    with pytest.raises(DataError, match=r"timm cannot open data set 'torch/fashion_mnist' at .*Dataset not found.*"
                                        r'nothing is downloaded at run time'):
        load_dataset('torch/fashion_mnist', str(tmp_path), split='train')
    assert no_network == []  # failed without trying the network


def test_a_recipe_asking_for_a_download_is_refused(tmp_path, capsys):
    recipe = tmp_path / 'args.yaml'
    recipe.write_text('dataset: torch/fashion_mnist\ndataset_download: true\n')
    assert cli_main(['train', '--config', str(recipe), '--data-dir', str(tmp_path), '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'dataset_download' in err and 'nothing is downloaded at run time' in err
    assert not any(tmp_path.iterdir()) or sorted(p.name for p in tmp_path.iterdir()) == ['args.yaml']


@pytest.mark.slow
def test_train_and_eval_through_the_torch_source(tmp_path, no_network):
    _idx_files(tmp_path / 'data')
    run = tmp_path / 'runs' / 'torch'
    assert cli_main(['train', '--model', 'hydravit_fmnist_patch7_28', '--dataset', 'torch/fashion_mnist',
                     '--data-dir', str(tmp_path / 'data'), '--epochs', '1', '-b', '10', '--heads', '3', '12',
                     '--workers', '0', '--no-report', '--output', str(run.parent), '--experiment', run.name]) == 0
    with open(run / 'results.csv') as f:
        trained = {int(r['k']): float(r['top1']) for r in csv.DictReader(f)}
    assert sorted(trained) == [3, 12]
    out = tmp_path / 'eval.csv'
    assert cli_main(['eval', '--checkpoint', str(run / 'last.safetensors'), '--dataset', 'torch/fashion_mnist',
                     '--data-dir', str(tmp_path / 'data'), '-j', '0', '--no-benchmark',
                     '--results-file', str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [int(r['num_samples']) for r in rows] == [SIZES['t10k']] * 2
    # the training run's own evaluation and hydravit eval read the same 10 test images the same way
    assert {int(r['k']): float(r['top1']) for r in rows} == pytest.approx(trained, abs=1e-6)
    assert no_network == []


def test_hfds_source_on_a_local_folder(tmp_path, monkeypatch):
    """Skipped unless the optional ``datasets`` package is installed: it brings pyarrow (55 MB wheel) and pandas
    (12 MB), too large for the test extras; nothing here installs it. Labels come from timm's hfds reader's
    ``iter_targets`` (no images decoded)."""
    pytest.importorskip('datasets', reason='hfds/ needs the Hugging Face datasets package (not in the test extras: '
                                           'pyarrow + pandas are ~70 MB of wheels)')
    from PIL import Image

    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    folder = tmp_path / 'hf'
    for split in ('train', 'validation'):
        for c in ('a', 'b'):
            (folder / split / c).mkdir(parents=True)
            for i in range(2):
                image = np.full((8, 8, 3), 200 * (c == 'b'), dtype=np.uint8)
                Image.fromarray(image).save(folder / split / c / f'{i}.png')
    dataset = load_dataset(f'hfds/{folder}', str(tmp_path / 'cache'), split='val')
    assert len(dataset) == 4 and sorted(dataset.classes) == ['a', 'b']
    assert sorted(dataset.targets) == [0, 0, 1, 1]
    for i in range(len(dataset)):  # each label names the folder its image came from (class b is bright)
        image, label = dataset[i]
        assert (np.asarray(image, dtype=np.float32).mean() > 100) == (dataset.classes[label] == 'b')
