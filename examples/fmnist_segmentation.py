"""HydraViT as a dense-prediction backbone: a linear segmentation head on frozen features, at several k.

Task: label every pixel of a Fashion-MNIST image as background or as the garment's class (11 labels; a pixel
belongs to the garment when its intensity is above 0.1). The backbone is ``timm.create_model(...,
features_only=True)`` (timm's feature getter), loaded from a HydraViT checkpoint through timm's
``pretrained_cfg_overlay=dict(file=...)``. The same frozen weights give the feature maps of every k
(k·head_dim channels on the 4×4 patch grid); for each k a linear head (a 1×1 convolution to 11·7·7 values per
patch, rearranged to 28×28 by ``PixelShuffle``) is trained on a few thousand images and scored on the test set.

    python examples/fmnist_segmentation.py --checkpoint output/train/<run>/model_best.safetensors

About a minute on 2 CPU cores with the defaults. Without ``--checkpoint`` the backbone is random (the head
still learns something from random features; a trained backbone is what the example is for).
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hydravit  # noqa: F401  (registers the hydravit_* models with timm)
from hydravit.data.datasets import FashionMNIST
from hydravit.models.factory import FASHION_MNIST_MEAN, FASHION_MNIST_STD

logger = logging.getLogger('fmnist_segmentation')
MODEL = 'hydravit_fmnist_patch7_28'
NUM_LABELS = 11  # background + 10 garment classes
PATCH = 7


def masks(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel labels: 0 for background, 1 + class on the garment."""
    return torch.where(images > 0.1, targets[:, None, None] + 1, torch.zeros_like(targets)[:, None, None])


def load(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNIST(split=split)
    images = data.data[:count].float() / 255.0
    return images, masks(images, data.targets[:count])


@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, k: int, batch: int = 500) -> torch.Tensor:
    """The last block's feature map of subnetwork k, (N, k·head_dim, 4, 4)."""
    x = ((images - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0])[:, None]
    return torch.cat([backbone(x[i:i + batch], k=k)[-1] for i in range(0, len(x), batch)])


class LinearSegmentationHead(nn.Module):
    """A 1×1 convolution to NUM_LABELS values per pixel of each patch, then PixelShuffle to full resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, NUM_LABELS * PATCH * PATCH, kernel_size=1)
        self.shuffle = nn.PixelShuffle(PATCH)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(feats))


def train_head(feats: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> LinearSegmentationHead:
    torch.manual_seed(seed)
    head = LinearSegmentationHead(feats.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(feats) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(feats)).split(128):
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


@torch.no_grad()
def scores(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    pred = head(feats).argmax(1)
    ious: List[float] = []
    for label in range(NUM_LABELS):
        union = ((pred == label) | (labels == label)).sum().item()
        if union:
            ious.append(((pred == label) & (labels == label)).sum().item() / union)
    return {'pixel_acc': 100.0 * (pred == labels).float().mean().item(), 'miou': 100.0 * sum(ious) / len(ious)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', help='HydraViT checkpoint of hydravit_fmnist_patch7_28 (default: random backbone)')
    p.add_argument('--k', nargs='+', type=int, default=[3, 6, 12])
    p.add_argument('--train-images', type=int, default=5000)
    p.add_argument('--test-images', type=int, default=2000)
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    start = time.perf_counter()
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else {}
    if not args.checkpoint:
        logger.warning('no --checkpoint: the backbone is random')
    backbone = timm.create_model(MODEL, features_only=True, out_indices=(-1,), **kwargs).eval()
    train_x, train_y = load('train', args.train_images)
    test_x, test_y = load('val', args.test_images)  # the 10,000 test images
    logger.info('k  channels  pixel acc (%)  mIoU (%)')
    for k in args.k:
        head = train_head(features(backbone, train_x, k), train_y, args.epochs, args.seed)
        result = scores(head, features(backbone, test_x, k), test_y)
        logger.info(f'{k:2d}  {backbone.channels(k)[0]:8d}  {result["pixel_acc"]:13.2f}  {result["miou"]:8.2f}')
    logger.info(f'{time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
