"""``hydravit predict``: class names and top-5 probabilities for image files without labels, at one k."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..deployment.predict import Predictor, image_files
from ..storage.results import RESULT_FORMATS, format_table, results_format, write_results
from .common import add_threads, apply_threads, check_writable, positive_int, progress

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('predict', help='top-5 classes of unlabelled images at a chosen k',
                       description='Classify image files (or every image under a folder) with subnetwork k of a '
                                   "checkpoint, using the checkpoint's own preprocessing; one row per image: "
                                   'file, k, class1, prob1 ... class5, prob5.')
    p.add_argument('inputs', nargs='+', metavar='FILE_OR_DIR', help='image files and/or folders of images')
    p.add_argument('--checkpoint', required=True, help='a .safetensors checkpoint or a run folder (model_best, last)')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--k', type=int, help="subnetwork to run (default: the checkpoint's largest trained k)")
    which.add_argument('--cascade', metavar='POLICY',
                       help='early-exit cascade policy JSON (from hydravit cascade): small k first, larger k where '
                            "it is unsure; the 'k' column says which k answered each image")
    p.add_argument('--use-ema', action='store_true', help='use the *_ema.safetensors next to the checkpoint')
    p.add_argument('--model', help='registered model whose preprocessing training used, when the checkpoint '
                                   'does not record it')
    p.add_argument('-b', '--batch-size', type=positive_int, default=64)
    p.add_argument('--device', default='cpu')
    add_threads(p)
    p.add_argument('--results-file', help='write one row per image here (.csv or .json) instead of a table')
    p.add_argument('--results-format', choices=RESULT_FORMATS, help='default: from --results-file suffix, else csv')
    return p


def run(args: argparse.Namespace) -> int:
    threads = apply_threads(args.threads)
    if args.results_file:
        check_writable(Path(args.results_file).parent, '--results-file')
    files = image_files(args.inputs)
    predictor = Predictor(args.checkpoint, args.k, device=args.device, model_name=args.model, use_ema=args.use_ema,
                          cascade=args.cascade)
    answering = f'cascade {args.cascade}' if args.cascade else f'k={predictor.k}'
    logger.info(f'{predictor.path}: {answering}, {len(files)} images, batch {args.batch_size}, {args.device}, '
                f'{threads} threads; probabilities in 0..1')
    rows = predictor.predict(files, args.batch_size, progress=progress)
    if args.results_file:
        out = Path(args.results_file)
        path = write_results(rows, out.parent, out.stem, results_format(out, args.results_format), verbose=False)
        logger.info(f'{len(rows)} predictions -> {path}')
    else:
        logger.info(format_table(rows))
    return 0
