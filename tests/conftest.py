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


# HydraViT shapes chosen to catch slicing mistakes: head_dim not a power of two, mlp_ratio != 4, no q/k/v bias,
# average pooling with and without a class token, class counts != 1000
CONFIGS = {
    'default': dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, num_heads=4, head_dim=8, depth=2),
    'odd': dict(img_size=15, patch_size=5, in_chans=2, num_classes=5, num_heads=5, head_dim=6, depth=3,
                mlp_ratio=2.5, qkv_bias=False),
    'avg_no_cls': dict(img_size=12, patch_size=3, in_chans=1, num_classes=3, num_heads=3, head_dim=12, depth=2,
                       mlp_ratio=3.0, class_token=False, global_pool='avg'),
    'avg_cls': dict(img_size=12, patch_size=4, in_chans=3, num_classes=11, num_heads=6, head_dim=10, depth=1,
                    global_pool='avg'),
}

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
