"""Inference speed of the sliced universal model vs a standalone timm ViT of the same shape.

Prints, per k, images/s of ``model(x, k=k)`` divided by images/s of the extracted timm
``VisionTransformer``, both measured in this run with interleaved rounds (target: >= 0.95).

    python benchmarks/bench_slicing.py --model hydravit_fmnist_patch7_28 --batch-size 256
    python benchmarks/bench_slicing.py --model hydravit_base_patch16_224 --batch-size 32 --k 3 6 12
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch

import hydravit  # noqa: F401  (registers the models)
from hydravit.benchmark import reexec_with_malloc_env
from hydravit.subnet import extract_subnet


def images_per_second(fn, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    if '--system-malloc' not in sys.argv:
        reexec_with_malloc_env(sys.argv)  # glibc's page-fault noise otherwise dominates CPU timings
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--k', nargs='+', type=int)
    p.add_argument('--rounds', type=int, default=5, help='interleaved sliced/standalone rounds per k')
    p.add_argument('--min-seconds', type=float, default=0.5, help='target duration of one timed round')
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--system-malloc', action='store_true', help='keep glibc\'s default malloc thresholds')
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = timm.create_model(args.model).eval()
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    print(f'{args.model}: batch {args.batch_size}, fp32, {args.threads} threads, {args.rounds} rounds, median')
    print(f'{"k":>3} {"sliced img/s":>13} {"timm img/s":>11} {"ratio":>6}')
    ratios = []
    for k in args.k or model.k_choices:
        vit = extract_subnet(model, k)
        sliced = lambda t, k=k: model(t, k=k)  # noqa: E731
        # size a round so that it lasts about --min-seconds
        iters = max(1, round(args.min_seconds * images_per_second(vit, x, 1) / args.batch_size))
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(images_per_second(sliced, x, iters))
            theirs.append(images_per_second(vit, x, iters))
        ratio = statistics.median(ours) / statistics.median(theirs)
        ratios.append(ratio)
        print(f'{k:>3} {statistics.median(ours):>13.1f} {statistics.median(theirs):>11.1f} {ratio:>6.3f}')
    print(f'min ratio {min(ratios):.3f}, mean {statistics.mean(ratios):.3f} (target >= 0.95 at every k)')


if __name__ == '__main__':
    main()
