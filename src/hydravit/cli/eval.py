"""``hydravit eval``: top-1/top-5/loss of every subnetwork of a checkpoint, with params and GMACs."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..cascade import (
    collect_logits,
    curve_rows,
    load_policy,
    policy_path,
    score_points,
    stack_images,
    stage_macs,
    sweep_policies,
    time_points,
)
from ..evaluation.benchmark import benchmark_subnets
from ..evaluation.evaluate import EVAL_MODES, eval_dataset, evaluate_dataset, load_for_eval
from ..evaluation.report import write_report
from ..evaluation.robustness import CorruptionSuite, drop_table, robustness_section
from ..models.factory import UniversalModel
from ..models.kchoices import parse_ks
from ..storage.checkpoint import atomic_write
from ..storage.provenance import IDENTITY_COLUMNS, with_identity
from ..storage.results import (
    RESULT_FORMATS,
    format_table,
    results_format,
    table_context,
    write_results,
)
from ..storage.run_folder import resolve_checkpoint, training_metadata
from . import add_ema_choice
from .common import (
    add_alias,
    add_corruption_flags,
    add_threads,
    apply_threads,
    check_writable,
    corruption_suite,
    positive_int,
    progress,
)
from .compile_flags import add_compile_flags, compile_options_from_args

logger = logging.getLogger(__name__)

COLUMNS = ('k', 'top1', 'top1_err', 'top5', 'top5_err', 'loss', 'param_count', 'gmacs', 'img_size', 'crop_pct',
           'interpolation', 'mode', 'num_samples', 'num_classes_scored', 'checkpoint', *IDENTITY_COLUMNS)
AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('eval', help='per-k top-1, top-5, loss, params and GMACs of a checkpoint',
                       description='Evaluate every subnetwork k of a HydraViT checkpoint on a data set. '
                                   'One command for the full table and both plots: '
                                   'hydravit eval --checkpoint RUN_FOLDER --report')
    p.add_argument('--checkpoint', required=True, help='a .safetensors checkpoint or a run folder (model_best, last), '
                   'a timm train.py checkpoint or a timm ViT state dict')
    p.add_argument('--model', help='registered model whose preprocessing (mean/std/crop) training used, when '
                                   'the checkpoint does not record it (and its architecture, for a file from '
                                   'elsewhere)')
    add_ema_choice(p)
    p.add_argument('--k', nargs='+', default=['all'], help="'all' (the trained k) or a list of k")
    p.add_argument('--mode', choices=EVAL_MODES, default='sliced',
                   help='sliced universal model, or the extracted standalone timm ViT of each k')
    p.add_argument('--dataset', help='fashion-mnist, imagefolder, cifar10, cifar100 (default: the one the '
                                     'checkpoint was trained on, else fashion-mnist)')
    p.add_argument('--data-dir', help='data root (default: the training one when --dataset is not given)')
    p.add_argument('--split', default='val', help='split to evaluate (default: %(default)s)')
    p.add_argument('--class-map', help='file mapping folder names to class indices (ImageNet-R/-A style subsets)')
    p.add_argument('--max-val-samples', type=positive_int, dest='max_samples',
                   help='evaluate on the first N samples only (quick checks)')
    add_alias(p, '--max-samples', '--max-val-samples', 'max_samples', type=positive_int)
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device', default='cpu')
    add_threads(p)
    p.add_argument('--amp-dtype', choices=sorted(AMP_DTYPES), help='autocast dtype (default: fp32)')
    add_compile_flags(p)
    p.add_argument('--results-file', help='write one row per k here (.csv or .json)')
    p.add_argument('--results-format', choices=RESULT_FORMATS, help='default: from --results-file suffix, else csv')
    p.add_argument('--report', metavar='DIR', nargs='?', const='',
                   help='also write report.md, report.csv and the two Pareto plots into DIR '
                        '(default: a report folder next to the checkpoint)')
    add_corruption_flags(p)
    p.add_argument('--cascade', metavar='POLICY',
                   help='also score this cascade policy (JSON from hydravit cascade) and its threshold sweep; with '
                        '--report it is drawn on both plots (default with --report: the policy saved next to the '
                        'checkpoint, if any). Scored on the whole eval split: for figures on images the policy was '
                        'not fitted on, use hydravit cascade')
    p.add_argument('--no-benchmark', action='store_true',
                   help='with --report: skip the quick throughput run (only the accuracy-vs-GMACs plot)')
    return p


def build_eval_dataset(model: UniversalModel, args: argparse.Namespace, class_names: Optional[List[str]]):
    """The requested split through the model's eval transform."""
    return eval_dataset(model, args.dataset, args.data_dir, args.split, max_samples=args.max_samples,
                        class_names=class_names, class_map=args.class_map)


def run(args: argparse.Namespace) -> int:
    threads = apply_threads(args.threads)
    if args.results_file:
        check_writable(Path(args.results_file).parent, '--results-file')
    path = resolve_checkpoint(args.checkpoint, args.use_ema)
    model, ks = load_for_eval(path, parse_ks(args.k), args.model, use_ema=args.use_ema)
    trained = training_metadata(path)
    if args.dataset is None:
        args.dataset, args.data_dir = trained['dataset'] or 'fashion-mnist', args.data_dir or trained['data_dir']
    suite = corruption_suite(args)  # a bad name or severity fails before the data set loads
    dataset = build_eval_dataset(model, args, trained['class_names'])
    if suite is not None:
        return _run_corruptions(args, suite, model, dataset, ks, path)
    rows = evaluate_dataset(model, dataset, ks, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, amp_dtype=AMP_DTYPES.get(args.amp_dtype), mode=args.mode,
                            progress=progress, compile_options=compile_options_from_args(args))
    logger.info(f'{path}: ' + table_context(COLUMNS, f'{rows[0]["num_samples"]} {args.split} samples of '
                                            f'{args.dataset} evaluated', f'batch {args.batch_size}', str(args.device),
                                            f'{threads} threads', args.amp_dtype or 'fp32', f'mode {args.mode}'))
    scored = rows[0]['num_classes_scored']
    if scored < model.num_classes:
        logger.info(f'{scored} of {model.num_classes} classes present: logits restricted to them')
    rows = [{c: {**r, 'checkpoint': str(path)}[c] for c in COLUMNS} for r in with_identity(rows, model, path)]
    curves = _cascade_curve(args, model, dataset, path)
    _write(args, rows, model, ks, path, curves)
    return 0


def _cascade_curve(args: argparse.Namespace, model: UniversalModel, dataset, path: Path) -> Dict[str, List]:
    """The cascade policy's sweep scored (and with a benchmark, timed) on the eval data, as report curve rows."""
    source = Path(args.cascade) if args.cascade else policy_path(path)
    if not args.cascade and (args.report is None or not source.is_file()):
        return {}
    policy = load_policy(source).check_ks(model.k_choices, model.config.num_heads)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    logits, labels = collect_logits(model, loader, policy.ks, device=args.device)
    policies = sweep_policies(policy)
    points = score_points(logits, labels, policies, stage_macs(model, policy.ks))
    if args.report is not None and not args.no_benchmark:
        images = stack_images(dataset, range(min(len(dataset), 4 * args.batch_size))).to(args.device)
        time_points(model, policies, points, images, batch_size=args.batch_size, rounds=2, latency_images=20)
    table = [dict(policy='fitted' if p['fitted'] else f'sweep {i}', stages='-'.join(map(str, p['ks'])),
                  top1=p['top1'], gmacs=p['gmacs'], img_per_s=p.get('img_per_s'),
                  exits=' '.join(f'{k}:{v:.2f}' for k, v in p['exit_fractions'].items()))
             for i, p in enumerate(points)]
    logger.info(f'cascade {source}: {policy.describe()}')
    logger.info(format_table(table, [c for c in table[0] if any(r.get(c) is not None for r in table)]))
    return {'cascade': curve_rows({'points': points})}


def _write(args: argparse.Namespace, rows: List[Dict[str, Any]], model, ks, path: Path,
           curves: Optional[Dict[str, List]] = None) -> None:
    if args.results_file:
        out = Path(args.results_file)
        fmt = results_format(out, args.results_format)
        logger.info(f'-> {write_results(rows, out.parent, out.stem, fmt)}')
    else:
        logger.info(format_table(rows, [c for c in COLUMNS if c not in ('checkpoint', *IDENTITY_COLUMNS)]))
    if args.report is not None:
        out_dir = Path(args.report) if args.report else path.parent / 'report'
        label = path.parent.name if path.stem.startswith(('model_best', 'last')) else path.stem
        bench = None
        if not args.no_benchmark:
            bench = {label: benchmark_subnets(model, ks, modes=('sliced',), batch_size=args.batch_size,
                                              device=args.device, rounds=3, min_seconds=0.2, latency_iters=20,
                                              measure_memory=False, flop_count=False, interleave_ks=True)}
        named = {f'{label} {name}': curve for name, curve in (curves or {}).items()}
        paths = write_report({label: rows}, bench, out_dir, curves=named)
        logger.info('report: ' + ', '.join(str(p) for p in paths.values()))


def _run_corruptions(args: argparse.Namespace, suite: CorruptionSuite, model: UniversalModel, dataset, ks,
                     path: Path) -> int:
    """Every k on the clean and the corrupted test sets; the drop per k and corruption as a table."""
    rows = suite.score(model, dataset, ks, batch_size=args.batch_size, workers=args.workers, device=args.device,
                       amp_dtype=AMP_DTYPES.get(args.amp_dtype), mode=args.mode)
    columns = ['corruption', 'severity', 'drop', *COLUMNS, 'corruption_seed']
    rows = [{c: {**r, 'checkpoint': str(path)}[c] for c in columns} for r in with_identity(rows, model, path)]
    table = drop_table(rows)
    if args.results_file:
        out = Path(args.results_file)
        logger.info(f'-> {write_results(rows, out.parent, out.stem, results_format(out, args.results_format))}')
    logger.info('top-1 drop (p.p., clean minus corrupted, mean over severities %s):\n%s', list(suite.severities),
                format_table(table))
    if args.report is not None:
        out_dir = Path(args.report) if args.report else path.parent / 'report'
        text = ['# Robustness', '', *robustness_section({path.name: table}, f'{path}: {suite.describe(len(dataset))}')]
        written = atomic_write(out_dir / 'robustness.md', lambda tmp: Path(tmp).write_text('\n'.join(text)))
        logger.info(f'report: {written}')
    return 0
