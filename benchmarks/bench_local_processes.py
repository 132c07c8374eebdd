"""The main job's training images/s: one process of 2 OpenMP threads vs 2 one-thread processes joined by DDP.

Both train the built-in recipe with the same global batch (128), so every step sees the same images; only how the
2 cores are used differs. ``hydravit train`` runs as a program (one epoch on a subset), the two settings in
interleaved rounds, optionally beside a competing 2-thread process (another user's job). Prints the median epoch
img/s, the wall time of the whole command and the ratio of the two settings, measured in this run only.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Tuple

from bench_shared_machine import competing, train_images_per_second

SETTINGS = {
    '1 process x 2 threads, batch 128': ['--nproc-per-node', '1', '--batch-size', '128', '--threads', '2'],
    '2 processes x 1 thread, batch 64 (built-in)': ['--nproc-per-node', '2', '--batch-size', '64', '--threads', '1'],
}


def timed_run(flags: List[str], samples: int, timeout: float) -> Tuple[float, float, float]:
    """(epoch img/s, training loss, wall seconds of the whole command)."""
    start = time.perf_counter()
    img_s, loss = train_images_per_second(flags, samples, timeout, threads=None)
    return img_s, loss if loss is not None else float('nan'), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--samples', type=int, default=6400, help='training images (one epoch)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--competing', action='store_true', help='beside a competing 2-thread process')
    p.add_argument('--timeout', type=float, default=900.0)
    args = p.parse_args()
    runs: Dict[str, List[Tuple[float, float, float]]] = {name: [] for name in SETTINGS}
    with competing(args.competing):
        for _ in range(args.rounds):
            for name, flags in SETTINGS.items():
                runs[name].append(timed_run(flags, args.samples, args.timeout))
    load = 'beside a competing 2-thread process' if args.competing else 'idle machine'
    print(f'{args.samples} images, 1 epoch, {args.rounds} interleaved rounds, {load}')
    print(f'{"setting":<46} {"img/s (median, range)":>24} {"wall s":>8} {"train loss":>10}')
    medians = {}
    for name, rows in runs.items():
        rates = [r[0] for r in rows]
        medians[name] = statistics.median(rates)
        wall = statistics.median(r[2] for r in rows)
        print(f'{name:<46} {medians[name]:>9.0f} ({min(rates):.0f}-{max(rates):.0f}){"":>6} {wall:>8.1f} '
              f'{rows[0][1]:>10.4f}')
    one, two = medians.values()
    print(f'ratio (2 processes / 1 process): {two / one:.2f}x')


if __name__ == '__main__':
    main()
