"""``hydravit benchmark``: per-k speed, memory and cost of the sliced, extracted and timm models, and switching."""
from __future__ import annotations

import argparse
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import DefaultDict, Dict

import torch

from ..evaluation.benchmark import BENCH_MODES, MALLOC_ENV, NOISY_SPREAD_PCT, benchmark_subnets, measure_switching
from ..models.factory import UniversalModel, model_from_config
from ..models.kchoices import parse_ks
from ..storage.provenance import IDENTITY_COLUMNS, with_identity
from ..storage.results import (
    RESULT_FORMATS,
    format_table,
    results_format,
    table_columns,
    table_context,
    write_results,
)
from ..training.memory import train_memory_cases, train_memory_table
from . import add_model_source, model_from_args, model_name_from_args
from .common import add_threads, apply_threads, check_writable, progress
from .compile_flags import add_compile_flags, compile_options_from_args

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('benchmark', help='per-k throughput, latency, memory and switching time',
                       description='Per k and mode (sliced universal model, extracted subnet, fresh timm ViT): '
                                   'images/s, batch-1 latency, optional training images/s, peak memory, params, '
                                   'GMACs; then switching k in memory vs loading a subnet from disk.')
    add_model_source(p, 'hydravit_fmnist_patch7_28')
    p.add_argument('--k', nargs='+', help="subnetworks, any of 1..num_heads (default: the model's k choices)")
    p.add_argument('--modes', nargs='+', choices=BENCH_MODES, default=list(BENCH_MODES))
    p.add_argument('-b', '--batch-size', type=int, default=256, help='inference batch size (default: %(default)s)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--train', action='store_true', help='also measure training images/s (forward+backward+step)')
    p.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds per k (median)')
    p.add_argument('--min-seconds', type=float, default=0.2, help='duration of one timed round per mode')
    p.add_argument('--latency-iters', type=int, default=30, help='timed batch-1 calls per k and mode')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory child processes')
    p.add_argument('--no-switching', action='store_true', help='skip the switching vs loading table')
    p.add_argument('--switch-repeats', type=int, default=30, help='paired switch/steady forwards per k (median)')
    add_threads(p)
    add_compile_flags(p)
    p.add_argument('--system-malloc', action='store_true', help="keep glibc's default malloc thresholds on CPU")
    p.add_argument('--train-memory', action='store_true',
                   help='instead: peak memory of one training step per sampler and method vs one ViT of the largest k '
                        'and vs the separate ViTs (CPU: a fresh child process each; CUDA: max allocated)')
    p.add_argument('--train-batch-size', type=int, default=128, help='batch of --train-memory (default: %(default)s)')
    p.add_argument('--train-num-random', type=int, default=2,
                   help="random k per step of the 'random' and 'sandwich' samplers in --train-memory "
                        '(default: %(default)s)')
    p.add_argument('--results-file', help='write rows here (.csv/.json); switching goes to <stem>_switching.<ext>')
    p.add_argument('--results-format', choices=RESULT_FORMATS, help='default: from --results-file suffix, else csv')
    p.set_defaults(_process_env=process_env)
    return p


def process_env(args: argparse.Namespace) -> Dict[str, str]:
    """On CPU, fixed malloc thresholds from process start (see evaluation.benchmark), unless --system-malloc."""
    return {} if args.system_malloc or torch.device(args.device).type != 'cpu' else dict(MALLOC_ENV)


def print_ratios(rows: list) -> None:
    """sliced/timm and extracted/timm throughput per k, measured in this run."""
    by_k: DefaultDict[int, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_k[r['k']][r['mode']] = r['infer_samples_per_sec']
    if not all('timm' in m for m in by_k.values()):
        return
    table = [dict(k=k, **{f'{m}/timm': v / modes['timm'] for m, v in modes.items() if m != 'timm'})
             for k, modes in by_k.items()]
    logger.info('\nthroughput ratios (same run):')
    logger.info(format_table(table))
    for col in [c for c in table[0] if c != 'k']:
        values = [t[col] for t in table]
        logger.info(f'{col}: min {min(values):.3f}, median {statistics.median(values):.3f}')


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)  # hydravit.cli.main restarted the program with process_env(args) set
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda requested but CUDA is not available')
    threads = apply_threads(args.threads)
    for setting in ('batch_size', 'rounds', 'latency_iters', 'switch_repeats'):
        if getattr(args, setting) < 1:
            raise ValueError(f'--{setting.replace("_", "-")} must be >= 1, got {getattr(args, setting)}')
    if args.results_file:
        check_writable(Path(args.results_file).parent, '--results-file')
    model, checkpoint = model_from_args(args)
    ks = parse_ks(args.k, num_heads=model.config.num_heads)
    if ks:
        model = _with_ks(model, ks)
    name = checkpoint or model_name_from_args(args)
    if args.train_memory:
        return _train_memory(args, model, str(name), device)
    logger.info(f'{name}: ' + table_context(
        ('param_count', 'gmacs', 'infer_samples_per_sec', 'infer_latency_ms', 'infer_spread_pct', 'peak_mem_mb'),
        f'modes {" ".join(args.modes)}', f'batch {args.batch_size} (latency: batch 1)', str(device), 'fp32',
        f'{threads} threads', f'{args.rounds} interleaved rounds of {args.min_seconds} s, median',
        f'noisy = rounds more than {NOISY_SPREAD_PCT:.0f} % apart'))
    rows = benchmark_subnets(model, ks, modes=args.modes, batch_size=args.batch_size, device=device,
                             rounds=args.rounds, min_seconds=args.min_seconds, latency_iters=args.latency_iters,
                             train=args.train, measure_memory=not args.no_memory, progress=progress,
                             compile_options=compile_options_from_args(args))
    for row in rows:
        row['noisy'] = '*' if row['infer_spread_pct'] > NOISY_SPREAD_PCT else ''
    rows = with_identity(rows, model, checkpoint)  # which model these speeds belong to (select checks it)
    switching = (None if args.no_switching else
                 measure_switching(model, ks, device=device, repeats=args.switch_repeats))
    _output(args, rows, switching)
    return 0


def _train_memory(args: argparse.Namespace, model: UniversalModel, name: str, device: torch.device) -> int:
    if args.train_batch_size < 1 or args.train_num_random < 1:
        raise ValueError('--train-batch-size and --train-num-random must be >= 1')
    config = model.config
    if config.nesting != 'hydravit':
        config = model_from_config(config, nesting='hydravit', separate_heads=False).config
    cases = train_memory_cases(config, num_random=min(args.train_num_random, len(config.k_choices)))
    logger.info(f'{name}: one training step at batch {args.train_batch_size}, {device}, fp32, AdamW')
    rows = train_memory_table(config, cases, batch_size=args.train_batch_size, device=device,
                              threads=args.threads or 1)
    if args.results_file:
        path = Path(args.results_file)
        written = write_results(rows, path.parent, path.stem, results_format(path, args.results_format))
        logger.info(f'training memory -> {written}')
    else:
        logger.info(format_table(rows))
    return 0


def _with_ks(model: UniversalModel, ks: list) -> UniversalModel:
    """Allow any k within 1..H for benchmarking (speed does not depend on whether k was trained)."""
    h = model.config.num_heads
    if all(k in model.k_choices for k in ks) or model.config.trained_k_only:
        return model
    wide = model_from_config(model.config, k_choices=tuple(range(1, h + 1)))
    wide.load_state_dict(model.state_dict(), strict=True)
    if hasattr(model, 'pretrained_cfg'):
        wide.pretrained_cfg = model.pretrained_cfg
    return wide


def _output(args: argparse.Namespace, rows: list, switching) -> None:
    if args.results_file:
        path = Path(args.results_file)
        fmt = results_format(path, args.results_format)
        logger.info(f'\nper k and mode -> {write_results(rows, path.parent, path.stem, fmt)}')
        if switching:
            switching_path = write_results(switching, path.parent, path.stem + '_switching', fmt)
            logger.info(f'\nswitching vs loading -> {switching_path}')
    else:
        logger.info(format_table(rows, [c for c in table_columns(rows) if c not in IDENTITY_COLUMNS]))
        if switching:
            logger.info('\nswitching vs loading:')
            logger.info(format_table(switching))
    print_ratios(rows)
    if switching:
        ratios = [s['load_vs_switch'] for s in switching]
        logger.info(f'load/switch: min {min(ratios):.0f}x, median {statistics.median(ratios):.0f}x')
