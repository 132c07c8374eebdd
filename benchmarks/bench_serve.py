"""Three servers of one checkpoint under the same stepped open-loop load: adaptive, fixed smallest k, fixed largest k.

Each server is a real ``hydravit serve`` process on a loopback port; ``hydravit.serving.loadtest`` sends the
same schedule (same seed, so the same arrival times and images) to each in turn. Loads are set relative to
capacity measured here first: the images/s a fixed-largest-k and a fixed-smallest-k server sustain when
flooded. The schedule is low, high, low: low = ``--low`` x capacity(largest), high = ``--high`` x
capacity(largest) (beyond what the largest k can serve, within what the smallest can). The latency target
defaults to ``--target-factor`` x the p99 latency of the fixed-largest server at the low load.

Reported per server and phase: fraction of requests within the target (errors count as misses), p50/p99,
images/s, mean k and accuracy served (labels of the Fashion-MNIST test images). The machine is shared: the
load generator and the server share its cores with whatever else runs, so the capacity and target are
measured in the same run and each figure is for this run only.

    python benchmarks/bench_serve.py --checkpoint /work/runs/main            # ~4 min
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from hydravit.serving.loadtest import Phase, encode_images, run_load, server_info, summarize_load
from hydravit.storage.results import format_table, markdown_table, write_results

logger = logging.getLogger('bench_serve')
SRC = str(Path(__file__).resolve().parents[1] / 'src')


def start_server(checkpoint: str, policy: str, target_ms: float, args: argparse.Namespace) -> Tuple[subprocess.Popen,
                                                                                                    str]:
    env = {**os.environ, 'PYTHONPATH': SRC + os.pathsep + os.environ.get('PYTHONPATH', ''),
           'OMP_NUM_THREADS': str(args.threads)}
    cmd = [sys.executable, '-m', 'hydravit', 'serve', '--checkpoint', checkpoint, '--port', '0', '--policy', policy,
           '--latency-ms', str(target_ms), '--max-batch', str(args.max_batch), '--max-wait-ms', str(args.max_wait_ms)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r'on (http://127\.0\.0\.1:\d+)', line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError(f'server {policy} did not start:\n{"".join(lines)}')


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def flood_capacity(url: str, images, args: argparse.Namespace) -> float:
    """Images/s served while flooded: far more requests than the server can take, at once."""
    phases = [Phase(args.flood_rps, args.flood_seconds)]
    records = run_load(url, images, phases, seed=99, timeout_s=60, max_inflight=args.flood_inflight,
                       images_per_request=args.images_per_request)
    ok = [r for r in records if r.status == 200]
    if not ok:
        raise RuntimeError('no request answered while measuring capacity')
    end = max(r.scheduled_s + r.send_lag_ms / 1e3 + r.latency_ms / 1e3 for r in ok)
    return sum(r.images for r in ok) / end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default='/work/runs/main')
    p.add_argument('--max-batch', type=int, default=32)
    p.add_argument('--max-wait-ms', type=float, default=5.0)
    p.add_argument('--threads', type=int, default=1, help='torch threads per server (default: %(default)s)')
    p.add_argument('--images-per-request', type=int, default=16,
                   help='client-side batch per request: amortises HTTP cost so the model cost shows')
    p.add_argument('--low', type=float, default=0.3, help='low load as a fraction of capacity(largest k)')
    p.add_argument('--high', type=float, default=1.3, help='high load as a fraction of capacity(largest k)')
    p.add_argument('--phase-seconds', type=float, default=15.0)
    p.add_argument('--target-ms', type=float, help='latency target (default: --target-factor x p99, see above)')
    p.add_argument('--target-factor', type=float, default=3.0)
    p.add_argument('--flood-rps', type=float, default=1500.0)
    p.add_argument('--flood-seconds', type=float, default=3.0)
    p.add_argument('--flood-inflight', type=int, default=256)
    p.add_argument('--samples', type=int, default=2000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='serve_bench', help='folder for the results (csv and md)')
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('httpx').setLevel(logging.WARNING)  # one line per request otherwise

    images = encode_images('fashion-mnist', None, args.samples, args.seed)
    per_request = args.images_per_request

    # capacities of the two fixed servers, and the low-load p99 of the largest k that sets the target
    provisional = 10_000.0  # the target does not change what a fixed server does
    proc, url = start_server(args.checkpoint, 'adaptive', provisional, args)
    try:
        ks = server_info(url)['k_choices']
    finally:
        stop_server(proc)
    small, large = ks[0], ks[-1]
    capacity: Dict[int, float] = {}
    low_p99 = None
    for k in (large, small):
        proc, url = start_server(args.checkpoint, f'fixed:{k}', provisional, args)
        try:
            capacity[k] = flood_capacity(url, images, args)
            if k == large:
                low = Phase(args.low * capacity[k] / per_request, args.phase_seconds)
                rows = summarize_load(run_load(url, images, [low], seed=args.seed + 7,
                                               images_per_request=per_request), [low], provisional)
                low_p99 = rows[0]['p99_ms']
        finally:
            stop_server(proc)
        logger.info(f'capacity fixed:{k}: {capacity[k]:.0f} images/s')
    target = args.target_ms or round(args.target_factor * low_p99, 1)
    logger.info(f'fixed:{large} p99 at low load {low_p99:.1f} ms -> target {target} ms')
    low_rps = args.low * capacity[large] / per_request
    high_rps = args.high * capacity[large] / per_request
    phases = [Phase(round(low_rps, 1), args.phase_seconds), Phase(round(high_rps, 1), args.phase_seconds),
              Phase(round(low_rps, 1), args.phase_seconds)]

    table: List[Dict] = []
    for policy in ('adaptive', f'fixed:{small}', f'fixed:{large}'):
        proc, url = start_server(args.checkpoint, policy, target, args)
        try:
            records = run_load(url, images, phases, seed=args.seed, timeout_s=30, images_per_request=per_request)
        finally:
            stop_server(proc)
        for row in summarize_load(records, phases, target):
            table.append({'policy': policy, **row})
        logger.info(format_table([r for r in table if r['policy'] == policy],
                                 ['policy', 'phase', 'sent', 'errors', 'within_target', 'p50_ms', 'p99_ms',
                                  'images_per_s', 'mean_k', 'accuracy']))

    def cell(policy: str, phase: str, key: str) -> float:
        return next(r[key] for r in table if r['policy'] == policy and r['phase'].startswith(phase))

    adaptive, fs, fl = 'adaptive', f'fixed:{small}', f'fixed:{large}'
    checks = {
        f'{fl} below 90 % within target at high load': cell(fl, '1:', 'within_target') < 0.90,
        'adaptive >= 99 % within target at high load': cell(adaptive, '1:', 'within_target') >= 0.99,
        f'adaptive accuracy within 0.5 p.p. of {fl} at low load': abs(cell(adaptive, '0:', 'accuracy')
                                                                      - cell(fl, '0:', 'accuracy')) <= 0.5,
        f'adaptive accuracy above {fs} overall': cell(adaptive, 'all', 'accuracy') > cell(fs, 'all', 'accuracy'),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(table, out, 'serve_bench', 'csv')
    columns = ['policy', 'phase', 'sent', 'errors', 'within_target', 'p50_ms', 'p99_ms', 'images_per_s', 'mean_k',
               'accuracy']
    header = (f'capacity (images/s, flooded): fixed:{large} {capacity[large]:.0f}, fixed:{small} '
              f'{capacity[small]:.0f}; target {target} ms; max batch {args.max_batch}, max wait '
              f'{args.max_wait_ms} ms, {args.threads} torch thread(s), {per_request} image(s) per request')
    (out / 'serve_bench.md').write_text(header + '\n\n' + markdown_table(table, columns) + '\n\n'
                                        + '\n'.join(f'- {"PASS" if ok else "FAIL"}: {name}'
                                                    for name, ok in checks.items()) + '\n')
    logger.info(header)
    logger.info(markdown_table(table, columns))
    for name, ok in checks.items():
        logger.info(f'{"PASS" if ok else "FAIL"}: {name}')


if __name__ == '__main__':
    main()
