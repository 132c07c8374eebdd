"""Three servers of one checkpoint under the same stepped open-loop load: adaptive, fixed smallest k, fixed largest k.

Each server is a real ``hydravit serve`` process on a loopback port; ``hydravit.serving.loadtest`` sends the
same schedule (same seed, so the same arrival times and images) to each. On a small shared machine the load
generator shares the cores with the servers and with whatever else runs, and what a server sustains drifts
from minute to minute, so the loads are calibrated in the same run, with the load generator's own cost in:

1. target: ``--target-factor`` x the median latency of the fixed-largest server at the low load (``--low-rps``;
   the median, not the p99: of a few dozen requests the p99 is the slowest one, and one stall moved it 4x);
2. sustained load of each fixed server: a short open-loop ramp (``--ramp-factor`` apart, ``--ramp-seconds``
   each) up to the first step where under 90 % of requests are within the target; a server sustains the
   highest step before it with >= 99 % within;
3. high loads: ``--sweep`` points spaced geometrically above what fixed-largest sustains, up to what
   fixed-smallest sustains (fixed-largest should fall below 90 % there, fixed-smallest should not; with
   shedding an overloaded fixed-largest answers about as many 503s as it is over its capacity, so only a load
   well above it shows);
4. for each high load, the schedule low, high, low is sent to the three servers in turn, in ``--rounds``
   rounds with the order rotated, so a change of the machine's load hits all three alike. Every cell of the
   table is the median over the rounds, with the spread (min..max) of the fraction within the target.

All three servers shed load the same way: a request that cannot be answered within the target is answered
503 at once (``hydravit serve`` default; ``--no-shed`` turns it off in all three); such answers count as
misses. A fixed server predicts with its own k, the adaptive one with its smallest. Per server and phase: fraction of
requests within the target, p50/p99, images/s, mean k, accuracy served (labels of the Fashion-MNIST test
images), and the CPU (cores) the server and the load generator used.

    python benchmarks/bench_serve.py --checkpoint /work/runs/main --out serve_bench     # ~8 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydravit.serving.loadtest import LoadRecord, Phase, encode_images, run_load, server_info, summarize_load
from hydravit.storage.results import format_table, markdown_table, write_results

logger = logging.getLogger('bench_serve')
SRC = str(Path(__file__).resolve().parents[1] / 'src')
COLUMNS = ['load', 'policy', 'phase', 'sent', 'errors', 'within_target', 'within_spread', 'p50_ms', 'p99_ms',
           'images_per_s', 'mean_k', 'accuracy', 'server_cpu', 'client_cpu']


class Server:
    """A ``hydravit serve`` process; its output goes to a log file (a pipe nobody reads would block it)."""

    def __init__(self, checkpoint: str, policy: str, target_ms: float, args: argparse.Namespace, out: Path) -> None:
        self.policy = policy
        env = {**os.environ, 'PYTHONPATH': SRC + os.pathsep + os.environ.get('PYTHONPATH', ''),
               'OMP_NUM_THREADS': str(args.threads)}
        cmd = [sys.executable, '-m', 'hydravit', 'serve', '--checkpoint', checkpoint, '--port', '0', '--policy',
               policy, '--latency-ms', str(target_ms), '--max-batch', str(args.max_batch), '--max-wait-ms',
               str(args.max_wait_ms)] + ([] if args.shed else ['--no-shed'])
        self.log = out / f'server-{policy.replace(":", "")}-{int(target_ms)}.log'
        with open(self.log, 'w') as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r'on (http://127\.0\.0\.1:\d+)', self.log.read_text())
            if m:
                self.url = m.group(1)
                return
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f'server {policy} did not start:\n{self.log.read_text()}')

    def cpu_s(self) -> float:
        fields = Path(f'/proc/{self.proc.pid}/stat').read_text().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(server: Server, images, phases: Sequence[Phase], target_ms: float, args: argparse.Namespace,
            seed: int) -> Tuple[List[Dict], float, float, List[LoadRecord]]:
    """Rows of summarize_load, the cores the server and this process used while the schedule ran, and the
    requests themselves (where in a phase the misses fall)."""
    c0, s0, w0 = time.process_time(), server.cpu_s(), time.perf_counter()
    records = run_load(server.url, images, phases, seed=seed, timeout_s=max(30.0, 3 * target_ms / 1e3),
                       images_per_request=args.images_per_request, max_inflight=args.max_inflight)
    wall = time.perf_counter() - w0
    return (summarize_load(records, phases, target_ms), (server.cpu_s() - s0) / wall,
            (time.process_time() - c0) / wall, records)


def request_rows(load: str, policy: str, round_: int, phases: Sequence[Phase], records: Sequence[LoadRecord],
                 target_ms: float) -> List[Dict]:
    """One row per request: its phase, when in the phase it was sent, its answer and whether it was in time."""
    starts = [sum(p.seconds for p in phases[:i]) for i in range(len(phases))]
    return [{'load': load, 'policy': policy, 'round': round_, 'phase': r.phase,
             'sent_in_phase_s': round(r.scheduled_s - starts[r.phase], 4), 'status': r.status,
             'latency_ms': round(r.latency_ms, 2), 'server_latency_ms': r.server_latency_ms, 'k': r.k,
             'within': int(r.status == 200 and r.latency_ms <= target_ms)} for r in records]


def ramp(server: Server, images, start_rps: float, target_ms: float, args: argparse.Namespace) -> Tuple[float, List]:
    """Requests/s the server keeps >= 99 % within the target: open-loop steps ``--ramp-factor`` apart."""
    steps, sustained, rps = [], 0.0, start_rps
    for i in range(args.ramp_steps):
        row = measure(server, images, [Phase(round(rps, 2), args.ramp_seconds)], target_ms, args, seed=100 + i)[0][0]
        steps.append((rps, row['within_target'], row['images_per_s']))
        logger.info(f'  ramp {server.policy}: {rps * args.images_per_request:.0f} img/s offered, '
                    f'{row["within_target"]:.3f} within target, {row["images_per_s"]:.0f} img/s answered')
        if row['within_target'] >= 0.99:
            sustained = rps
        if row['within_target'] < 0.90:
            break
        time.sleep(1.0)
        rps *= args.ramp_factor
    return sustained, steps


def median_rows(runs: List[List[Dict]]) -> List[Dict]:
    """Per phase: the median over rounds of every number, and the min..max of the fraction within target."""
    out = []
    for rows in zip(*runs, strict=True):
        row: Dict = {'phase': rows[0]['phase']}
        for key in ('sent', 'errors', 'within_target', 'p50_ms', 'p99_ms', 'images_per_s', 'mean_k', 'accuracy'):
            values = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
            row[key] = statistics.median(values) if values else float('nan')
        within = [r['within_target'] for r in rows]
        row['within_spread'] = f'{min(within):.3f}..{max(within):.3f}'
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default='/work/runs/main')
    p.add_argument('--max-batch', type=int, default=32)
    p.add_argument('--max-wait-ms', type=float, default=5.0)
    p.add_argument('--threads', type=int, default=1, help='torch threads per server (default: %(default)s)')
    p.add_argument('--images-per-request', type=int, default=64,
                   help='client-side batch per request: amortises the HTTP cost so the model cost shows (16 '
                        'per request: k = 12 cost 1.65x the CPU per image of k = 3, client and server together; '
                        '64: 2.0x) (default: %(default)s)')
    p.add_argument('--max-inflight', type=int, default=256)
    p.add_argument('--low-rps', type=float, default=3.0, help='low load, requests/s (default: %(default)s)')
    p.add_argument('--target-ms', type=float, help='latency target (default: --target-factor x p50, see above)')
    p.add_argument('--target-factor', type=float, default=5.0)
    p.add_argument('--ramp-factor', type=float, default=1.25)
    p.add_argument('--ramp-seconds', type=float, default=4.0)
    p.add_argument('--ramp-steps', type=int, default=12)
    p.add_argument('--sweep', type=int, default=4, help="high loads up to fixed-smallest's sustained load")
    p.add_argument('--high-loads', type=float, nargs='+', metavar='IMG_PER_S',
                   help='send these high loads (images/s) instead of the calibrated sweep; skips the ramps')
    p.add_argument('--phase-seconds', type=float, default=6.0)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--no-shed', dest='shed', action='store_false',
                   help='servers queue every request instead of answering 503 to one predicted past the target')
    p.add_argument('--samples', type=int, default=2000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='serve_bench', help='folder for the results (csv, md, server logs)')
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('httpx').setLevel(logging.WARNING)  # one line per request otherwise
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    loads = [os.getloadavg()]

    images = encode_images('fashion-mnist', None, args.samples, args.seed)
    per_request = args.images_per_request
    low = Phase(args.low_rps, args.phase_seconds)

    # 1. the target, from the fixed-largest server at the low load (a huge target: nothing is shed meanwhile)
    probe = Server(args.checkpoint, 'adaptive', 1e6, args, out)
    try:
        ks = server_info(probe.url)['k_choices']
    finally:
        probe.stop()
    small, large = ks[0], ks[-1]
    target: Optional[float] = args.target_ms
    if target is None:
        server = Server(args.checkpoint, f'fixed:{large}', 1e6, args, out)
        try:
            measure(server, images, [Phase(args.low_rps, 2.0)], 1e6, args, seed=50)  # warm-up
            low_p50 = measure(server, images, [low], 1e6, args, seed=args.seed + 7)[0][0]['p50_ms']
        finally:
            server.stop()
        target = round(args.target_factor * low_p50, 1)
        logger.info(f'fixed:{large} p50 at {args.low_rps * per_request:.0f} img/s: {low_p50:.1f} ms -> target '
                    f'{target} ms')

    policies = ['adaptive', f'fixed:{small}', f'fixed:{large}']
    servers = {name: Server(args.checkpoint, name, target, args, out) for name in policies}
    try:
        for s in servers.values():
            measure(s, images, [Phase(args.low_rps, 2.0)], target, args, seed=50)  # warm-up
        # 2. what each fixed server sustains, load generator included
        sustained: Dict[int, float] = {}
        for k in (large, small) if not args.high_loads else ():
            start = args.low_rps if k == large else max(args.low_rps, sustained[large])
            sustained[k], _ = ramp(servers[f'fixed:{k}'], images, start, target, args)
            logger.info(f'fixed:{k} sustains {sustained[k] * per_request:.0f} img/s within {target} ms')
        loads.append(os.getloadavg())
        if args.high_loads:
            highs = [h / per_request for h in args.high_loads]
        elif not sustained[large] > 0:
            raise RuntimeError(f'fixed:{large} sustains not even the low load within {target} ms: raise --target-ms')
        else:
            lo, hi = sustained[large], max(sustained[small], sustained[large] * args.ramp_factor ** 2)
            highs = [lo * (hi / lo) ** ((j + 1) / args.sweep) for j in range(args.sweep)]
        logger.info('high loads (img/s): ' + ', '.join(f'{h * per_request:.0f}' for h in highs))

        # 3./4. low, high, low for each high load; the three servers in turn, rounds in rotated order
        table: List[Dict] = []
        requests: List[Dict] = []
        for h in highs:
            phases = [low, Phase(round(h, 2), args.phase_seconds), low]
            runs: Dict[str, List[List[Dict]]] = {name: [] for name in policies}
            cpu: Dict[str, List[Tuple[float, float]]] = {name: [] for name in policies}
            for r in range(args.rounds):
                for name in policies[r % 3:] + policies[:r % 3]:
                    rows, server_cpu, client_cpu, records = measure(servers[name], images, phases, target, args,
                                                                    args.seed)
                    requests += request_rows(f'{h * per_request:.0f} img/s', name, r, phases, records, target)
                    runs[name].append(rows)
                    cpu[name].append((server_cpu, client_cpu))
                    time.sleep(1.0)
            for name in policies:
                for row in median_rows(runs[name]):
                    table.append({'load': f'{h * per_request:.0f} img/s', 'policy': name, **row,
                                  'server_cpu': statistics.median(c[0] for c in cpu[name]),
                                  'client_cpu': statistics.median(c[1] for c in cpu[name])})
            logger.info(format_table([r for r in table if r['load'] == f'{h * per_request:.0f} img/s'], COLUMNS))
            loads.append(os.getloadavg())
    finally:
        for s in servers.values():
            s.stop()

    def cell(load: str, policy: str, phase: str, key: str) -> float:
        return next(r[key] for r in table if r['load'] == load and r['policy'] == policy
                    and r['phase'].startswith(phase))

    adaptive, fs, fl = policies
    load_names = list(dict.fromkeys(r['load'] for r in table))
    at = next((name for name in load_names if cell(name, fl, '1:', 'within_target') < 0.90), None)
    checks: Dict[str, bool] = {f'{fl} falls below 90 % within target at one of the high loads': at is not None}
    if at is not None:
        checks[f'adaptive >= 99 % within target at {at} (where {fl} < 90 %)'] = \
            cell(at, adaptive, '1:', 'within_target') >= 0.99
    for name in load_names:
        checks[f'adaptive accuracy within 0.5 p.p. of {fl} at low load (first phase; run {name})'] = \
            abs(cell(name, adaptive, '0:', 'accuracy') - cell(name, fl, '0:', 'accuracy')) <= 0.5
        checks[f'adaptive accuracy above {fs} overall (run {name})'] = \
            cell(name, adaptive, 'all', 'accuracy') > cell(name, fs, 'all', 'accuracy')
    write_results(table, out, 'serve_bench', 'csv')
    write_results(requests, out, 'requests', 'csv', verbose=False)
    sustained_text = ('not measured (--high-loads)' if args.high_loads else
                      f'fixed:{large} {sustained[large] * per_request:.0f} img/s, fixed:{small} '
                      f'{sustained[small] * per_request:.0f} img/s')
    header = (f'target {target} ms; sustained (>= 99 % within target, open-loop ramp incl. the load generator): '
              f'{sustained_text}; low load {args.low_rps * per_request:.0f} img/s; '
              f'{args.rounds} rounds (median, within-target min..max); max batch {args.max_batch}, max wait '
              f'{args.max_wait_ms} ms, {args.threads} torch thread(s), {per_request} images per request; '
              f'{"late requests shed (503)" if args.shed else "no shedding (--no-shed)"}; '
              f'{time.time() - started:.0f} s; load average (1 min) during the run: '
              + ', '.join(f'{la[0]:.2f}' for la in loads))
    (out / 'serve_bench.md').write_text(header + '\n\n' + markdown_table(table, COLUMNS) + '\n\n'
                                        + '\n'.join(f'- {"PASS" if ok else "FAIL"}: {name}'
                                                    for name, ok in checks.items()) + '\n')
    logger.info(header)
    logger.info(markdown_table(table, COLUMNS))
    for name, ok in checks.items():
        logger.info(f'{"PASS" if ok else "FAIL"}: {name}')


if __name__ == '__main__':
    main()
