"""Training-step speed of the sliced universal model vs a standalone timm ViT of the same shape.

Per k: images/s of one step (forward + cross-entropy + backward + AdamW step) of ``model(x, k=k)``
divided by that of the extracted timm ``VisionTransformer``, both measured in this run with
interleaved rounds, medians (target: >= 0.90). The sliced model's AdamW step updates its full
tensors (the paper's behaviour: moments and weight decay also move the inactive tail), which is the
main cost the standalone model does not pay at small k.

    python benchmarks/bench_train_step.py --model hydravit_fmnist_patch7_28 --batch-size 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import hydravit  # noqa: F401  (registers the models)
from hydravit.benchmark import reexec_with_malloc_env
from hydravit.subnet import extract_subnet

def make_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, optimize: bool = True,
              **forward_kwargs):
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05, fused=True)  # as the trainer
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, **forward_kwargs), y).backward()
        if optimize:
            optimizer.step()
    return step


def images_per_second(step, batch: int, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch / (time.perf_counter() - start)


def main() -> None:
    if '--system-malloc' not in sys.argv:
        reexec_with_malloc_env(sys.argv)  # glibc's page-fault noise otherwise dominates CPU timings
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--k', nargs='+', type=int)
    p.add_argument('--rounds', type=int, default=5, help='interleaved sliced/standalone rounds per k')
    p.add_argument('--min-seconds', type=float, default=0.5, help='target duration of one timed round')
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--no-optimizer-step', action='store_true',
                   help='time forward+backward only (isolates the cost of updating the full tensors)')
    p.add_argument('--system-malloc', action='store_true', help='keep glibc\'s default malloc thresholds')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(args.model)
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,))
    what = 'fwd+bwd' if args.no_optimizer_step else 'fwd+bwd+AdamW'
    print(f'{args.model}: train step ({what}), batch {args.batch_size}, fp32, {args.threads} threads, '
          f'{args.rounds} interleaved rounds, median')
    print(f'{"k":>3} {"sliced img/s":>13} {"timm img/s":>11} {"ratio":>6}')
    ratios = []
    for k in args.k or model.k_choices:
        vit = extract_subnet(model, k)
        optimize = not args.no_optimizer_step
        ours_step = make_step(model, x, y, 1e-4, optimize, k=k)
        theirs_step = make_step(vit, x, y, 1e-4, optimize)
        ours_step(), theirs_step()  # warm-up: allocate optimizer state and buffers
        iters = max(1, round(args.min_seconds * images_per_second(theirs_step, args.batch_size, 1) / args.batch_size))
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(images_per_second(ours_step, args.batch_size, iters))
            theirs.append(images_per_second(theirs_step, args.batch_size, iters))
        ratio = statistics.median(ours) / statistics.median(theirs)
        ratios.append(ratio)
        print(f'{k:>3} {statistics.median(ours):>13.1f} {statistics.median(theirs):>11.1f} {ratio:>6.3f}', flush=True)
        del vit, ours_step, theirs_step
    print(f'min ratio {min(ratios):.3f}, mean {statistics.mean(ratios):.3f} (target >= 0.90 at every k)')


if __name__ == '__main__':
    main()
