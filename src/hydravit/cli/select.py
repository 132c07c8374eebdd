"""``hydravit select``: the most accurate subnetwork that meets a latency, throughput, GMACs or memory budget."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..deployment.selection import (
    Budget,
    NoSubnetworkFits,
    benchmark_table,
    measure_table,
    merge_accuracy,
    select_subnet,
)
from ..models.kchoices import parse_ks
from ..storage.provenance import check_same_model, model_identity, rows_identity
from ..storage.results import format_table, read_results, table_context
from ..storage.run_folder import RunFolder, accuracy_context, accuracy_file, read_accuracy
from . import add_model_source, model_from_args
from .common import add_alias, add_threads, apply_threads

logger = logging.getLogger(__name__)

COLUMNS = ('k', 'fits', 'latency_ms', 'batch_size', 'infer_samples_per_sec', 'gmacs', 'peak_mem_mb', 'param_count',
           'top1')
DEFAULT_BATCH = {'latency_ms': 1, 'throughput': 64, 'gmacs': 1, 'memory_mb': 64}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('select', help='pick the most accurate k that meets a budget on this device',
                       description='Measure every subnetwork on this device (or read a benchmark file) and print '
                                   'the most accurate k that meets the budget, with the numbers behind the choice. '
                                   'Exit status 2 when no subnetwork fits.')
    add_model_source(p, checkpoint_help='a HydraViT .safetensors checkpoint or a training run folder')
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument('--latency-ms', type=float, help='max time per batch of --batch-size (ms)')
    budget.add_argument('--throughput', type=float, help='min images/s at --batch-size')
    budget.add_argument('--gmacs', type=float, help='max GMACs per image (analytic; nothing is timed)')
    budget.add_argument('--memory-mb', type=float, help='max peak inference memory at --batch-size (MB)')
    p.add_argument('-b', '--batch-size', type=int,
                   help='batch size of the budget (default: 1 for latency, 64 for throughput/memory; with '
                        '--benchmark-file: the batch size it was measured at)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--mode', choices=('sliced', 'extracted'), default='sliced',
                   help='serve the universal model at k (sliced) or an extracted standalone ViT')
    p.add_argument('--k', nargs='+', help="candidate k (default: the model's k choices)")
    p.add_argument('--benchmark-file', help='a hydravit benchmark results file (.csv/.json) instead of measuring')
    p.add_argument('--results-file', dest='results',
                   help='per-k accuracy file; default: results.csv/eval.csv next to the checkpoint')
    add_alias(p, '--results', '--results-file', 'results')
    add_threads(p)
    return p


def _budget(args: argparse.Namespace) -> Budget:
    for metric in ('latency_ms', 'throughput', 'gmacs', 'memory_mb'):
        if getattr(args, metric) is not None:
            return Budget(metric, getattr(args, metric))
    raise ValueError('give one budget: --latency-ms, --throughput, --gmacs or --memory-mb')


def run(args: argparse.Namespace) -> int:
    budget = _budget(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {args.batch_size}')
    threads = apply_threads(args.threads)
    model, checkpoint = model_from_args(args)
    ks = parse_ks(args.k, model.k_choices, model.config.num_heads) or list(model.k_choices)
    if args.benchmark_file:
        bench_rows = read_results(args.benchmark_file)
        check_same_model([(str(checkpoint or args.model), model_identity(model, checkpoint)),
                          (args.benchmark_file, rows_identity(bench_rows, args.benchmark_file))], weights=False,
                         hint='benchmark this model (hydravit benchmark) or measure live without --benchmark-file')
        table = benchmark_table(bench_rows, mode=args.mode, batch_size=args.batch_size, ks=ks)
        measured = [f'measured by hydravit benchmark ({args.benchmark_file})', f'mode {args.mode}',
                    f'batch {table[0]["batch_size"]}', _recorded(bench_rows, 'device', ''),
                    _recorded(bench_rows, 'threads', ' threads')]
    else:
        batch = args.batch_size or DEFAULT_BATCH[budget.metric]
        if budget.metric != 'gmacs':
            logger.info(f'measuring k={ks} on {args.device} (mode {args.mode}, batch {batch}, {threads} threads) ...')
        table = measure_table(model, budget, batch_size=batch, device=args.device, mode=args.mode, ks=ks)
        measured = (['analytic costs, nothing timed'] if budget.metric == 'gmacs' else
                    ['measured now', f'mode {args.mode}', f'batch {batch}', args.device, f'{threads} threads'])
    if checkpoint or args.results:
        _check_accuracy_source(model, checkpoint, args.results)
        accuracy = read_accuracy(Path(checkpoint or '.'), args.results)
        table = merge_accuracy(table, accuracy)
        measured.append(accuracy_context(Path(checkpoint or '.'), args.results))
    columns = _columns(table)
    logger.info(table_context(columns, *measured))
    try:
        choice = select_subnet(table, budget)
    except NoSubnetworkFits:
        logger.info(format_table([{**r, 'fits': 'no'} for r in table], columns))
        raise
    rows = [{**r, 'fits': 'yes' if r['k'] in choice.fitting else 'no'} for r in table]
    logger.info(format_table(rows, columns))
    logger.info(choice.describe())
    return 0


def _recorded(rows, column: str, suffix: str) -> Optional[str]:
    """The value(s) a benchmark file recorded for ``column`` (e.g. its thread count), or None if it did not."""
    values = sorted({str(r[column]) for r in rows if r.get(column) not in (None, '')})
    return f'{"/".join(values)}{suffix}' if values else None


def _check_accuracy_source(model, checkpoint: Optional[Path], results: Optional[str]) -> None:
    """The accuracy file must describe this model: its architecture, and its weights unless it is the results.csv
    its own training run wrote next to it (which covers that run's last and model_best)."""
    path = accuracy_file(Path(checkpoint or '.'), results)
    if path is None or not path.is_file():
        return
    rows = read_results(path)
    own_run = checkpoint is not None and path.resolve() == RunFolder(checkpoint.parent).results.resolve()
    check_same_model([(str(checkpoint or model.config), model_identity(model, checkpoint)),
                      (str(path), rows_identity(rows, str(path)))], weights=not own_run,
                     hint='give the accuracy file of this checkpoint (--results), e.g. from hydravit eval')


def _columns(table) -> list:
    return [c for c in COLUMNS if c == 'fits' or any(r.get(c) is not None for r in table)]
