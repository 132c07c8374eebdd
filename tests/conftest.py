import os
from pathlib import Path

import pytest
import torch

from hydravit.data import FASHION_MNIST_DIR

torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norms, cls/pos, head included) a random value, so no slice hides behind init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def randomize():
    return randomize_


FMNIST = Path(FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(not (FMNIST / 'train-images-idx3-ubyte.gz').is_file(),
                                  reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads can run 10-40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
