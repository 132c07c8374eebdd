"""``hydravit export``: standalone subnetworks (timm folder, safetensors, ONNX) from one checkpoint."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cascade.policy import load_policy, policy_path
from ..deployment.export import EXPORT_FORMATS, export_cascade, export_subnets
from ..storage.results import format_table, table_context
from ..storage.run_folder import resolve_checkpoint
from . import add_ema_choice
from .common import add_alias, add_threads, apply_threads, check_writable

logger = logging.getLogger(__name__)

COLUMNS = ('k', 'param_count', 'gmacs', 'top1', 'timm_export_s', 'safetensors_export_s', 'onnx_export_s',
           'onnx_max_abs_diff', 'onnx_switchable_max_abs_diff')


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('export', help='export subnetworks as timm folders, safetensors, ONNX or one switchable ONNX',
                       description='Cut subnetworks k out of a HydraViT checkpoint and write each as a standalone '
                                   'model: a timm local-dir folder (DIR/k3), k3.safetensors and/or k3.onnx, plus '
                                   'index.csv/index.json with params, GMACs and accuracy where known. '
                                   'onnx-switchable writes one switchable.onnx for all of them: inputs "input" '
                                   '(image batch) and "k" (int64 scalar), the weights stored once.')
    p.add_argument('--checkpoint', required=True,
                   help='HydraViT .safetensors checkpoint or a training run folder (model_best, then last)')
    add_ema_choice(p)
    p.add_argument('--k', nargs='+', default=['all'], help="'all' (the trained k) or a list of k")
    p.add_argument('--format', nargs='+', default=['timm'], metavar='FORMAT',
                   help=f'one or more of {", ".join(EXPORT_FORMATS)} (default: timm)')
    p.add_argument('--output', required=True, help='output folder (must not exist or be empty)')
    p.add_argument('--overwrite', action='store_true', help='write into an existing folder, replacing same-named files')
    p.add_argument('--results-file', dest='results',
                   help='per-k accuracy file (results.csv / eval .csv/.json); default: one next to the checkpoint')
    add_alias(p, '--results', '--results-file', 'results')
    add_threads(p)
    p.add_argument('--model', help='registered model whose preprocessing was used in training, if the checkpoint '
                                   'does not record it')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset (default: %(default)s)')
    p.add_argument('--cascade', metavar='POLICY', help="also export this early-exit cascade policy ('auto': the one "
                                                      'saved next to the checkpoint) into OUTPUT/cascade: one ONNX '
                                                      'file per stage and cascade.json, run by '
                                                      'hydravit.deployment.cascade_runtime.OnnxCascade')
    return p


def run(args: argparse.Namespace) -> int:
    threads = apply_threads(args.threads)
    check_writable(args.output)
    rows = export_subnets(args.checkpoint, args.k, args.format, args.output, results=args.results,
                          model_name=args.model, overwrite=args.overwrite, onnx_opset=args.opset,
                          use_ema=args.use_ema)
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    logger.info(format_table(rows, columns))
    logger.info(table_context(columns, f'{threads} threads', '*_export_s in seconds'))
    logger.info(f'exported {len(rows)} subnetworks to {args.output} (index.csv, index.json)')
    if args.cascade:
        checkpoint = resolve_checkpoint(args.checkpoint, args.use_ema)
        policy = load_policy(policy_path(checkpoint) if args.cascade == 'auto' else args.cascade)
        manifest = export_cascade(checkpoint, policy, Path(args.output) / 'cascade', model_name=args.model,
                                  overwrite=args.overwrite, onnx_opset=args.opset, use_ema=args.use_ema)
        logger.info(f'exported cascade {policy.describe()} to {Path(args.output) / "cascade"} '
                    f'({len(manifest["stages"])} ONNX stages, cascade.json)')
    return 0
