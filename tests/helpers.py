"""Helpers shared by the test modules (fixtures live in conftest.py).

``reference_cost`` counts the size and cost of subnetwork k on an equivalent timm ``VisionTransformer``
(parameters by ``numel``, multiply-accumulates by torch's FlopCounterMode with unfused attention), so the
cost columns of the project's tables are checked against a count that does not go through
:mod:`hydravit.models.costs`.
"""
import json
from functools import cache
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hydravit.data import FASHION_MNIST_DIR
from hydravit.models.subnet import subnet_vit

__all__ = ['CONFIGS', 'FMNIST', 'needs_fmnist', 'randomize_', 'reference_cost']


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norms, cls/pos, head included) a random value, so no slice hides behind init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


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


@cache
def _reference_cost(config_json: str, k: int) -> Tuple[int, int]:
    from hydravit.models.config import HydraViTConfig
    cfg = HydraViTConfig(**json.loads(config_json))
    vit = subnet_vit(cfg, k).eval()
    for block in vit.blocks:
        block.attn.fused_attn = False  # explicit q @ k^T and attn @ v matmuls, which the counter sees
    params = sum(p.numel() for p in vit.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size))
    flops = counter.get_total_flops()
    assert flops % 2 == 0, flops
    return params, flops // 2


def reference_cost(config, k: int) -> Tuple[int, int]:
    """(parameters, MACs per image) of subnetwork ``k`` of ``config``, counted on an equivalent timm ViT.

    MACs are matrix multiply-accumulates (linear layers, patch convolution, both attention matmuls); norms,
    softmax, GELU and bias additions are not counted.
    """
    return _reference_cost(json.dumps(config.to_dict(), sort_keys=True), int(k))
