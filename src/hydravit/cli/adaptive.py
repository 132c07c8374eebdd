"""``hydravit serve-demo``: adaptive inference under changing load, one universal model, k chosen per batch."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..deployment.adaptive import (
    DEFAULT_PHASES,
    AdaptivePredictor,
    LoadPhase,
    adaptive_policy,
    calibrate_latencies,
    fixed_k_policy,
    run_under_load,
    summarize,
)
from ..models.costs import cost_row
from ..storage.results import format_table, table_columns, table_context
from ..storage.run_folder import accuracy_context, read_accuracy
from . import add_model_source, model_from_args
from .common import add_alias, add_threads, apply_threads

logger = logging.getLogger(__name__)

AUTO_TARGET_SLACK = 1.1  # auto target: the largest k fits (within up_fraction) when the machine is as calibrated


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('serve-demo', help='demo: adaptive k per batch to hold a latency target as load changes',
                       description='Serve random batches with an AdaptivePredictor through load phases (quiet, busy '
                                   'child processes, one torch thread, quiet) and print per phase the share of '
                                   'batches within the target and the k served.')
    add_model_source(p, 'hydravit_fmnist_patch7_28')
    p.add_argument('--target-ms', type=float,
                   help='latency target per batch; default: the largest k just fits on the quiet machine')
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--batches', type=int, default=30, help='batches per load phase (default: %(default)s)')
    p.add_argument('--busy', type=int, default=2, help='busy-loop processes in the loaded phase (default: %(default)s)')
    add_threads(p)
    p.add_argument('--compare', action='store_true', help='also serve always-largest and always-smallest k')
    p.add_argument('--results-file', dest='results', help='per-k accuracy file, to report the mean accuracy served')
    add_alias(p, '--results', '--results-file', 'results')
    return p


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.batches < 1 or args.busy < 0:
        raise ValueError('--batch-size and --batches must be >= 1, --busy >= 0')
    threads = apply_threads(args.threads)  # hydravit.cli.main restarted the program with OMP_WAIT_POLICY=PASSIVE
    model, checkpoint = model_from_args(args)
    model.eval()
    c = model.config
    x = torch.randn(args.batch_size, c.in_chans, c.img_size, c.img_size)
    ks = list(model.k_choices)
    base = calibrate_latencies(model, x, ks)
    target = args.target_ms or max(base.values()) / 0.7 * AUTO_TARGET_SLACK
    logger.info('calibrated ms per batch: ' + ', '.join(f'k{k}={v:.1f}' for k, v in base.items()))
    logger.info(f'target {target:.1f} ms per batch of {args.batch_size}')
    policies = {'adaptive': adaptive_policy(AdaptivePredictor(model, target, base_latency_ms=base))}
    if args.compare:
        policies.update({f'always k={k}': fixed_k_policy(model, k) for k in (ks[-1], ks[0])})
    phases = [p if p.busy == 0 else LoadPhase(f'{args.busy} busy procs', busy=args.busy) for p in DEFAULT_PHASES]
    records = run_under_load(policies, x, phases, args.batches)
    accuracy = read_accuracy(checkpoint or Path('.'), args.results) if (checkpoint or args.results) else {}
    rows = summarize(records, target, {k: v['top1'] for k, v in accuracy.items() if 'top1' in v} or None)
    columns = table_columns(rows)
    smallest, largest = cost_row(c, ks[0]), cost_row(c, ks[-1])
    sizes = (f'k {ks[0]}..{ks[-1]}: {smallest["param_count"]:.3g}..{largest["param_count"]:.3g} M params, '
             f'{smallest["gmacs"] * 1e3:.3g}..{largest["gmacs"] * 1e3:.3g} MMACs per image')
    logger.info(table_context(columns, f'{checkpoint or args.model} ({sizes})', 'mode sliced',
                              f'batch {args.batch_size}', f'{threads} threads', f'target {target:.1f} ms per batch',
                              f'{args.batches} batches per phase and policy',
                              accuracy_context(checkpoint or Path('.'), args.results) if accuracy else None))
    logger.info(format_table(rows, columns))
    return 0
