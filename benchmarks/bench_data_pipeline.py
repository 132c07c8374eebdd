"""Images/s of one data-loader worker with the paper's (DeiT's) train transforms at 224, and the workers they imply.

Generates ImageNet-like JPEGs (500x375, quality 90, smooth content with noise: ~30-60 kB each) in a temporary
ImageFolder, reads them with timm's ``ImageDataset`` and ``create_transform`` in the DeiT recipe (random-resized
crop 224 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 pixel mode, ImageNet mean/std;
timm skips colour jitter when RandAugment is on, as DeiT does), and times, in one process with one torch
thread (what each loader worker is):

- decode only (PIL open + convert RGB), the full train transform per image, and the whole per-sample cost;
- Mixup/CutMix (timm ``Mixup``, 0.8 / 1.0, label smoothing 0.1) on a collated batch, per image, which the
  trainer runs in the main process on the batch (on the GPU at scale).

Rounds alternate decode-only and full-sample passes (median). Rates are per CPU second of the process (what a
worker with a core of its own delivers; wall-clock rates are printed too, but on a shared machine they measure the
other jobs). The workers needed to feed a training speed are
that speed divided by the per-worker rate: for timm's published DeiT training speeds (RTX 3090, AMP,
``results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv`` of pytorch-image-models: deit_tiny 2290.53,
deit_small 1053.64, deit_base 390.88 img/s) and, with ``--gpu-check gpu_check.json``, for the training img/s that
``gpu_check.py`` measured per k.

    python benchmarks/bench_data_pipeline.py --images 48 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, Mixup, create_transform

from hydravit.data.transforms import pillow_safe_posterize

# timm's published training throughput (img/s), RTX 3090, AMP, NCHW, PyTorch 1.12 / CUDA 11.3 (batch in brackets)
TIMM_TRAIN_IMG_S = {'deit_tiny_patch16_224 (512)': 2290.53, 'deit_small_patch16_224 (384)': 1053.64,
                    'deit_base_patch16_224 (192)': 390.88}


def deit_train_transform(img_size: int = 224):
    """The paper's train transform: timm's create_transform with DeiT's settings (posterize fixed for Pillow 13)."""
    return pillow_safe_posterize(create_transform(
        img_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
        re_mode='pixel', re_count=1, color_jitter=0.3, hflip=0.5, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD))


def write_jpegs(root: Path, count: int, classes: int = 4, size=(500, 375), seed: int = 0) -> int:
    """``count`` JPEGs in ``classes`` class folders; returns their total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        folder = root / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        path = folder / f'img{i:05d}.jpg'
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def _rate(fn, items: int) -> Tuple[float, float]:
    """(items per wall second, items per CPU second of this process): on a shared machine the second is what
    a worker with a core of its own delivers."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return items / (time.perf_counter() - start), items / (time.process_time() - cpu)


def measure(root: Path, rounds: int, batch: int) -> Dict[str, float]:
    transform = deit_train_transform()
    dataset = ImageDataset(str(root), transform=transform)
    paths = [dataset.filename(i, absolute=True) for i in range(len(dataset))]
    n = len(dataset)

    def decode_only() -> None:
        for p in paths:
            with open(p, 'rb') as f:
                Image.open(f).convert('RGB')

    def full_sample() -> None:
        for i in range(n):
            dataset[i]

    torch.manual_seed(0)
    full_sample()  # warm-up: file cache, RandAugment tables
    rates: Dict[str, List[Tuple[float, float]]] = {'decode': [], 'sample': [], 'mixup': []}
    for _ in range(rounds):
        rates['decode'].append(_rate(decode_only, n))
        rates['sample'].append(_rate(full_sample, n))
    images = torch.stack([dataset[i % n][0] for i in range(batch)])
    target = torch.arange(batch) % 4
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    for _ in range(max(3, rounds)):
        rates['mixup'].append(_rate(lambda: mixup(images.clone(), target.clone()), batch))
    out: Dict[str, float] = dict(images=n)
    for name, pairs in rates.items():
        out[f'{name}_img_s'] = statistics.median(w for w, _ in pairs)
        out[f'{name}_img_cpu_s'] = statistics.median(c for _, c in pairs)
    return out


def workers_needed(target_img_s: float, per_worker_img_s: float) -> int:
    return math.ceil(target_img_s / per_worker_img_s)


def gpu_targets(path: Optional[str]) -> Dict[str, float]:
    if not path:
        return {}
    report = json.loads(Path(path).read_text())
    out = {}
    for row in report.get('train') or []:
        out[f'HydraViT k={row["k"]} sliced, {report["meta"]["device_name"]} (gpu_check)'] = row['sliced_img_s']
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument('--images', type=int, default=48, help='generated JPEGs (each timed once per round)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--batch-size', type=int, default=128, help='batch for the Mixup/CutMix timing')
    p.add_argument('--gpu-check', help='a gpu_check.json: also the workers for its measured training img/s')
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory(prefix='hydravit-jpegs-') as tmp:
        size = write_jpegs(Path(tmp), args.images)
        figures = measure(Path(tmp), args.rounds, args.batch_size)
    per_worker = figures['sample_img_cpu_s']
    print(f'{figures["images"]} JPEGs of 500x375 (mean {size / args.images / 1024:.0f} kB), 1 thread, '
          f'{args.rounds} rounds, median; images per CPU second (per wall second)')
    for label, key in (('decode only', 'decode'), ('decode + DeiT train transform (224), per worker', 'sample'),
                       (f'mixup/cutmix on a batch of {args.batch_size} (main process)', 'mixup')):
        print(f'{label:55} {figures[key + "_img_cpu_s"]:8.1f} ({figures[key + "_img_s"]:.1f})')
    print(f'\n{"training speed to feed (workers at one core each)":60} {"img/s":>8} {"workers":>8}')
    for name, target in {**TIMM_TRAIN_IMG_S, **gpu_targets(args.gpu_check)}.items():
        print(f'{name:60} {target:8.1f} {workers_needed(target, per_worker):8d}')


if __name__ == '__main__':
    main()
