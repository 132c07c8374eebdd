"""Crash-safety sweep: SIGKILL (or a full disk) at many points inside checkpoint writes, twice in a row.

Each scenario trains a tiny run under ``tests/crash_harness.py``, kills it (SIGKILL before or after a file
operation) or fails a write with ENOSPC at fault point N of the uninterrupted run's trace, resumes it with a
second fault at point M of the resumed process, resumes again to the end, and compares the run folder bit for
bit with the uninterrupted run (weights, summary.csv, results.csv, no leftovers). Prints the number of fault
points tried and every failure; exit status 1 if any scenario failed.

    python benchmarks/bench_crash_safety.py --scenarios 24     # ~20 s per scenario on a shared 2-core box
    python benchmarks/bench_crash_safety.py --scenarios 37 --offset 1   # with --offset 0: all 74 points
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))

from crash_harness import differences, faulted_then_resumed, read_trace, run_train  # noqa: E402

ARGS = ['--nproc-per-node', '1',  # one process: the faults are injected into its own file operations
        '--dataset', 'fashion-mnist', '--max-train-samples', '64', '--max-val-samples', '32', '-b', '16',
        '--heads', '2', '3', '--sampler', 'uniform', '--lr', '3e-3', '--warmup-epochs', '0', '--epochs', '2',
        '--val-interval', '1', '--checkpoint-interval-steps', '2', '--model-ema', '--model-ema-decay', '0.9',
        '--no-report', '--log-interval', '1000']
ACTIONS = ('kill', 'kill-after', 'enospc')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--scenarios', type=int, default=24, help='fault pairs to try (first points evenly spread)')
    p.add_argument('--offset', type=int, default=0,
                   help='start at this fault point (0-based): --scenarios N/2 with offsets 0 and 1 cover all N points')
    p.add_argument('--second-points', type=int, default=14,
                   help="the resumed process's fault point cycles through 1..N (its first checkpoint write)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ref = root / 'ref'
        proc = run_train([*ARGS, '--output', str(ref), '--experiment', 'run'], ref / 'run', trace=ref / 'trace.txt')
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr)
            return 1
        trace = read_trace(ref / 'trace.txt')
        print(f'uninterrupted run: {len(trace)} fault points in its checkpoint and results writes')
        step = max(1, len(trace) // args.scenarios)
        firsts = trace[args.offset::step][:args.scenarios]
        tried, failures, not_reached, tic = 0, [], 0, time.perf_counter()
        for i, (n, op, name) in enumerate(firsts):
            action = ACTIONS[i % len(ACTIONS)]
            if action == 'enospc' and op != 'fsync':
                action = 'kill'
            occurrence = sum(1 for m, o, nm in trace if (o, nm) == (op, name) and m <= n)
            first = f'{action}@{op}:{name}:{occurrence}'
            second = f'{ACTIONS[(i + 1) % 2]}@{1 + i % args.second_points}'
            run = root / f's{i}'
            problems = faulted_then_resumed([*ARGS, '--output', str(run), '--experiment', 'run'], run / 'run',
                                            [first, second])
            unreached = [pr for pr in problems if ': exit 0, expected' in pr]
            if unreached:  # the resumed run ended before reaching point M: its folder is still compared
                not_reached += 1
                problems = []
            problems += differences(ref / 'run', run / 'run')
            tried += 1
            status = 'ok' if not problems else 'FAILED'
            print(f'{i + 1:3d}/{len(firsts)} {first:50s} then {second:16s} {status}', flush=True)
            if problems:
                failures.append((first, second, problems))
        minutes = (time.perf_counter() - tic) / 60
    print(f'\n{tried} scenarios ({tried} first fault points of {len(trace)}, {tried - not_reached} second fault points '
          f'reached), {len(failures)} failed, {minutes:.1f} min')
    for first, second, problems in failures:
        print(f'FAILED {first} then {second}: {problems}')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
