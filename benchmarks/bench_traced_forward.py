"""Why ``hydravit serve`` runs TorchScript traces: a forward beside a busy Python thread, eager vs traced.

A server's inference thread shares the GIL with its event loop. Eagerly, every operator gives the GIL up for
its kernel and must take it back afterwards, and with the event loop busy each take-back can wait a whole
switch interval; a trace takes it once on the way in and once on the way out. This times the median forward
of a full batch at each k, alone and beside a thread that runs Python without pause (a saturated event
loop), eagerly and traced, in one run, and prints the ratios.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_traced_forward.py --checkpoint /work/runs/main
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Callable, Dict, List

import torch

from hydravit.deployment.adaptive import Forward, calibrate_latencies
from hydravit.deployment.torchscript import TracedSubnetworks
from hydravit.evaluation.evaluate import load_for_eval
from hydravit.storage.results import format_table
from hydravit.storage.run_folder import resolve_checkpoint

logger = logging.getLogger('bench_traced_forward')


def beside_busy_thread(measure: Callable[[], float]) -> float:
    """``measure()`` run on a second thread while this one runs Python without pause."""
    stop, out = threading.Event(), []
    worker = threading.Thread(target=lambda: (out.append(measure()), stop.set()))
    worker.start()
    while not stop.is_set():
        sum(i * i for i in range(1000))
    worker.join()
    return out[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default='/work/runs/main')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--k', type=int, nargs='+', help='k to time (default: the smallest and the largest)')
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    torch.set_num_threads(1)
    model, _ = load_for_eval(resolve_checkpoint(args.checkpoint))
    ks = args.k or [model.k_choices[0], model.k_choices[-1]]
    traced = TracedSubnetworks(model, ks)
    c = model.config
    x = torch.randn(args.batch_size, c.in_chans, c.img_size, c.img_size)
    rows: List[Dict] = []
    for k in ks:
        row: Dict = {'k': k}
        for name, forward in (('eager', model), ('traced', traced)):
            def median_ms(forward: Forward = forward, k: int = k) -> float:  # after one warm-up call
                return calibrate_latencies(forward, x, [k], repeats=args.repeats)[k]
            row[f'{name}_alone_ms'] = median_ms()
            row[f'{name}_busy_ms'] = beside_busy_thread(median_ms)
        row['eager_slowdown_busy'] = row['eager_busy_ms'] / row['eager_alone_ms']
        row['traced_slowdown_busy'] = row['traced_busy_ms'] / row['traced_alone_ms']
        row['traced_vs_eager_busy'] = row['traced_busy_ms'] / row['eager_busy_ms']
        rows.append(row)
    logger.info(f'batch {args.batch_size}, 1 torch thread, switch interval {sys.getswitchinterval() * 1e3:g} ms')
    logger.info(format_table(rows, list(rows[0])))


if __name__ == '__main__':
    main()
