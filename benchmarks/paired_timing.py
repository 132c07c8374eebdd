"""Ours vs timm's own ViT per k, timed in interleaved rounds in one process (bench_slicing, bench_train_step).

Interleaving the two sides round by round and taking medians keeps slow drifts of a shared machine (frequency,
other processes) out of the ratio, which is the only figure these benchmarks report.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Iterable, Tuple

import torch

from hydravit.evaluation.benchmark import reexec_with_malloc_env

Step = Callable[[], object]


def timing_parser(doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The flags both benchmarks share; re-executes with steady malloc settings unless told not to."""
    if '--system-malloc' not in sys.argv:
        reexec_with_malloc_env(sys.argv)  # glibc's page-fault noise otherwise dominates CPU timings
    p = argparse.ArgumentParser(description=doc.splitlines()[0], allow_abbrev=False)
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--batch-size', type=int, default=batch_size)
    p.add_argument('--k', nargs='+', type=int)
    p.add_argument('--rounds', type=int, default=5, help='interleaved sliced/standalone rounds per k')
    p.add_argument('--min-seconds', type=float, default=0.5, help='target duration of one timed round')
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--system-malloc', action='store_true', help="keep glibc's default malloc thresholds")
    return p


def images_per_second(step: Step, batch: int, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch / (time.perf_counter() - start)


def paired_images_per_second(ours: Step, theirs: Step, batch: int, rounds: int,
                             min_seconds: float) -> Tuple[float, float]:
    """Median images/s of both steps; each round lasts about ``min_seconds`` of ``theirs``."""
    ours(), theirs()  # warm-up: buffers, optimizer state
    iters = max(1, round(min_seconds * images_per_second(theirs, batch, 1) / batch))
    ours_rates, theirs_rates = [], []
    for _ in range(rounds):
        ours_rates.append(images_per_second(ours, batch, iters))
        theirs_rates.append(images_per_second(theirs, batch, iters))
    return statistics.median(ours_rates), statistics.median(theirs_rates)


def print_ratios(ks: Iterable[int], make_steps: Callable[[int], Tuple[Step, Step]], args: argparse.Namespace,
                 target: float) -> None:
    """One row per k (sliced img/s, timm img/s, ratio), then the minimum and mean ratio against ``target``."""
    print(f'{"k":>3} {"sliced img/s":>13} {"timm img/s":>11} {"ratio":>6}')
    ratios = []
    for k in ks:
        ours, theirs = paired_images_per_second(*make_steps(k), args.batch_size, args.rounds, args.min_seconds)
        ratios.append(ours / theirs)
        print(f'{k:>3} {ours:>13.1f} {theirs:>11.1f} {ratios[-1]:>6.3f}', flush=True)
    print(f'min ratio {min(ratios):.3f}, mean {statistics.mean(ratios):.3f} (target >= {target} at every k)')
