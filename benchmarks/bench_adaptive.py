"""Adaptive k under changing load vs always-largest and always-smallest k, measured in one run.

Load phases (quiet; N busy-loop child processes; torch limited to 1 thread; quiet again) are applied
in turn; in every phase the three policies serve batches interleaved one by one, so they see the same
load. Reported per phase and overall: share of batches within the latency target, mean k and the mean
accuracy served (per-k top-1 from --results, else the paper's published ImageNet top-1 of HydraViT 3-12, a
stand-in that only ranks the k). The target defaults to what the largest k just meets when quiet.

    python benchmarks/bench_adaptive.py                       # hydravit_fmnist_patch7_28, batch 32
    python benchmarks/bench_adaptive.py --checkpoint runs/x/model_best.safetensors --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from hydravit.deployment.adaptive import (
    AdaptivePredictor,
    LoadPhase,
    adaptive_policy,
    calibrate_latencies,
    fixed_k_policy,
    reexec_with_passive_omp,
    run_under_load,
    summarize,
)
from hydravit.storage.results import format_table
from hydravit.storage.run_folder import load_or_create_model, read_accuracy

# the paper's published ImageNet-1K top-1 (%) of HydraViT trained on 3-12 heads
PAPER_IMAGENET_TOP1 = {3: 70.56, 4: 75.40, 5: 77.80, 6: 79.28, 7: 80.35, 8: 80.80, 9: 80.98, 10: 81.03, 11: 81.08,
                      12: 81.10}


def accuracy_table(args: argparse.Namespace, checkpoint, ks) -> tuple:
    if checkpoint or args.results:
        acc = {k: v['top1'] for k, v in read_accuracy(checkpoint or '.', args.results).items() if 'top1' in v}
        if all(k in acc for k in ks):
            return acc, 'results file'
    if all(k in PAPER_IMAGENET_TOP1 for k in ks):
        return PAPER_IMAGENET_TOP1, 'published ImageNet top-1 of the paper (stand-in)'
    return None, 'none'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--checkpoint')
    p.add_argument('--results', help='per-k accuracy file (results.csv / eval file)')
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--batches', type=int, default=40, help='batches per phase and policy')
    p.add_argument('--busy', type=int, default=2, help='busy-loop processes in the loaded phase')
    p.add_argument('--threads', type=int, default=2, help='torch threads outside the 1-thread phase')
    p.add_argument('--target-ms', type=float, help='latency target per batch (default: auto, see above)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--omp-active', action='store_true',
                   help="keep OpenMP's spin-waiting threads (default: restart with OMP_WAIT_POLICY=PASSIVE; spinning "
                        'threads next to other busy processes make every k 10-100x slower)')
    args = p.parse_args()
    if not args.omp_active:
        reexec_with_passive_omp(sys.argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, checkpoint = load_or_create_model(args.model, args.checkpoint)
    model.eval()
    c, ks = model.config, list(model.k_choices)
    x = torch.randn(args.batch_size, c.in_chans, c.img_size, c.img_size)
    base = calibrate_latencies(model, x, ks, repeats=5)
    target = args.target_ms or base[ks[-1]] / 0.7 * 1.1  # the controller climbs to k when pred <= 0.7 target
    accuracy, acc_source = accuracy_table(args, checkpoint, ks)
    print(f'{args.checkpoint or args.model}, batch {args.batch_size}, {args.threads} threads, '
          f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "default")}')
    print('calibrated ms per batch (quiet): ' + ', '.join(f'k{k}={v:.1f}' for k, v in base.items()))
    print(f'target: {target:.1f} ms per batch; accuracy served from: {acc_source}')

    policies = {'adaptive': adaptive_policy(AdaptivePredictor(model, target, base_latency_ms=base)),
                f'always k={ks[-1]}': fixed_k_policy(model, ks[-1]), f'always k={ks[0]}': fixed_k_policy(model, ks[0])}
    phases = [LoadPhase('quiet'), LoadPhase(f'{args.busy} busy procs', busy=args.busy),
              LoadPhase('1 thread', threads=1), LoadPhase('quiet again')]
    rows = summarize(run_under_load(policies, x, phases, args.batches), target, accuracy)
    print(format_table(rows))
    overall = {r['policy']: r for r in rows if r['phase'] == 'all'}
    a, big, small = overall['adaptive'], overall[f'always k={ks[-1]}'], overall[f'always k={ks[0]}']
    print(f'\nwithin target: adaptive {a["met_target"]:.0%}, always k={ks[-1]} {big["met_target"]:.0%}, '
          f'always k={ks[0]} {small["met_target"]:.0%}')
    if accuracy:
        print(f'mean top-1 served: adaptive {a["mean_top1"]:.2f}, always k={ks[-1]} {big["mean_top1"]:.2f}, '
              f'always k={ks[0]} {small["mean_top1"]:.2f}')


if __name__ == '__main__':
    main()
