"""The main job's training images/s with and without one competing 2-thread process, old vs new OpenMP settings.

``hydravit train`` (the built-in recipe, a subset of the data, one epoch) is run as a program, so the command's own
restart with ``OMP_WAIT_POLICY=PASSIVE`` takes part; ``--omp-active`` gives the previous behaviour (OpenMP's
spinning threads). The competitor is a second Python process running 2-thread matrix products with OpenMP's default
policy, i.e. another user's job. Settings x load are run in interleaved rounds; the table gives the median img/s
and the range over rounds. Prints ratios measured in this run only.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

COMPETITOR = ('import torch, time\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n'
              'while True:\n    a @ a\n    time.sleep(0.0005)\n')
EPOCH_LINE = re.compile(r'epoch 0: train_loss ([0-9.]+) \(([0-9.]+) img/s\)')
SETTINGS = {'OpenMP active (before)': ['--omp-active'], 'passive (now the default)': []}


@contextmanager
def competing(enabled: bool) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, '-c', COMPETITOR]) if enabled else None
    try:
        if proc is not None:
            time.sleep(1.0)  # let it start spinning
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def train_images_per_second(flags: List[str], samples: int, timeout: float, threads: Optional[int]) -> tuple:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, '-m', 'hydravit', 'train', '--epochs', '1', '--max-train-samples', str(samples),
               '--max-val-samples', '128', '--warmup-epochs', '0.1', '--no-report', '--output', out, *flags]
        if threads:
            cmd += ['--threads', str(threads)]
        try:
            log = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        except subprocess.TimeoutExpired:
            return float('nan'), None
    m = EPOCH_LINE.search(log)
    if m is None:
        raise RuntimeError(f'no epoch line in the training log:\n{log[-2000:]}')
    return float(m.group(2)), float(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--samples', type=int, default=1024, help='training images (one epoch)')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--threads', type=int, help="hydravit train --threads (default: torch's)")
    p.add_argument('--timeout', type=float, default=300, help='seconds before a run counts as stalled')
    args = p.parse_args()
    results: Dict[tuple, List[float]] = {}
    losses: Dict[tuple, set] = {}
    for _ in range(args.rounds):
        for load in (False, True):
            for name, flags in SETTINGS.items():
                with competing(load):
                    img_s, loss = train_images_per_second(flags, args.samples, args.timeout, args.threads)
                results.setdefault((name, load), []).append(img_s)
                losses.setdefault((name, load), set()).add(loss)
                print(f'{name:28s} competitor={load!s:5s} {img_s:8.1f} img/s  loss {loss}', flush=True)
    print(f'\nmedian img/s over {args.rounds} rounds (range); {args.samples} images, 1 epoch, built-in recipe')
    print('| setting | without | with one 2-thread process |\n|---|---:|---:|')
    def cell(values: List[float]) -> str:
        done = [v for v in values if v == v]  # a stalled run (timeout) is nan
        stalled = len(values) - len(done)
        text = f'{statistics.median(done):.0f} ({min(done):.0f}-{max(done):.0f})' if done else '-'
        return text + (f', {stalled} of {len(values)} stalled > {args.timeout:.0f} s' if stalled else '')

    for name in SETTINGS:
        print(f'| {name} | {cell(results[(name, False)])} | {cell(results[(name, True)])} |')
    finished = {loss for v in losses.values() for loss in v if loss is not None}
    print('the same final loss in every finished run:', len(finished) == 1, sorted(finished))


if __name__ == '__main__':
    main()
