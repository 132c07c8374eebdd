"""``hydravit cascade``: fit an early-exit cascade to a goal, score its threshold sweep and time it next to every k."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict

import torch
from timm.data import resolve_data_config

from ..cascade import SCORES, cascade_study, collect_logits, create_goal, policy_path, save_policy, stack_images
from ..cascade.policy import CascadePolicy
from ..data.datasets import load_dataset
from ..data.transforms import build_transform
from ..evaluation.evaluate import load_for_eval
from ..models.kchoices import parse_ks
from ..storage.checkpoint import atomic_write
from ..storage.results import format_table
from ..storage.run_folder import resolve_checkpoint, training_metadata
from . import add_ema_choice
from .common import add_alias, add_threads, apply_threads

logger = logging.getLogger(__name__)
CALIBRATIONS = ('split-half', 'train')


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('cascade', help='fit an early-exit cascade over the subnetworks and time it against each k',
                       description='Fit a cascade (small k first; an image exits as soon as a stage is confident) '
                                   'to one goal on a calibration split, then report its top-1 on images it was not '
                                   'fitted on, its average GMACs, exit fractions and measured speed, next to '
                                   'every static k timed in the same run. The policy is saved as JSON next to the '
                                   'checkpoint (or --policy-file).')
    p.add_argument('--checkpoint', required=True, help='a .safetensors checkpoint or a run folder')
    add_ema_choice(p)
    p.add_argument('--model', help='registered model whose preprocessing training used, if the checkpoint lacks it')
    p.add_argument('--ks', nargs='+', default=['all'],
                   help="candidate stages: 'all' (the trained k) or a list; the stage list is searched among them")
    p.add_argument('--fixed-stages', action='store_true', help='use exactly --ks as the stages (fit thresholds only)')
    p.add_argument('--max-stages', type=int, default=3, help='longest stage list searched (default: %(default)s)')
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument('--max-drop', type=float, metavar='P',
                      help="cheapest cascade within P p.p. of the largest candidate k's top-1")
    goal.add_argument('--target-gmacs', type=float, metavar='G', help='most accurate cascade of <= G GMACs per image')
    goal.add_argument('--latency-ms', type=float, metavar='L',
                      help='most accurate cascade of <= L ms mean batch-1 latency (per-k latency measured here)')
    p.add_argument('--confidence', type=float, default=0.5,
                   help='with --max-drop: the drop must hold at this one-sided confidence on the calibration split '
                        '(paired normal bound; 0.5: on average only, the default)')
    p.add_argument('--score', choices=sorted(SCORES), default='max-softmax', help='confidence score')
    p.add_argument('--calibration', choices=CALIBRATIONS, default='split-half',
                   help='split-half: fit on one half of the test split, report the other (and swapped, averaged); '
                        'train: fit on --calibration-samples training images, report the whole test split '
                        '(images the model was trained on are over-confident unless it never saw them)')
    p.add_argument('--calibration-samples', type=int, default=5000, help='training images for --calibration train')
    p.add_argument('--seed', type=int, default=0, help='seed of the split halves / training subset')
    p.add_argument('--grid', type=int, default=20, help='threshold quantiles per stage in the search')
    p.add_argument('--sweep-points', type=int, default=8, help='threshold settings in the reported sweep')
    p.add_argument('--dataset', help='data set (default: the one the checkpoint was trained on)')
    p.add_argument('--data-dir', help='data root (default: the training one when --dataset is not given)')
    p.add_argument('--split', default='val', help='test split the cascade is reported on (default: %(default)s)')
    p.add_argument('--max-val-samples', type=int, dest='max_val_samples',
                   help='use the first N test images only (quick checks)')
    add_alias(p, '--max-samples', '--max-val-samples', 'max_val_samples', type=int)
    p.add_argument('-b', '--batch-size', type=int, default=256, help='batch size of the throughput measurement')
    p.add_argument('--timing-images', type=int, default=1024, help='reported images timed per contender and round')
    p.add_argument('--latency-images', type=int, default=64, help='images timed one by one per contender and round')
    p.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds (medians reported)')
    p.add_argument('--no-timing', action='store_true', help='skip the speed measurement (accuracy and GMACs only)')
    add_threads(p)
    p.add_argument('-j', '--workers', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--policy-file', help='where to save the fitted policy (default: <checkpoint>.cascade.json next '
                                         'to the checkpoint)')
    p.add_argument('--results-file', help='write the results here (JSON: policy, points, static, ...)')
    return p


def _goal(args: argparse.Namespace):
    for name in ('max_drop', 'target_gmacs', 'latency_ms'):
        value = getattr(args, name)
        if value is not None:
            return create_goal(name.replace('_', '-'), value, args.confidence if name == 'max_drop' else 0.5)
    raise ValueError('give one goal: --max-drop P, --target-gmacs G or --latency-ms L')


def _check_counts(args: argparse.Namespace) -> None:
    for name in ('batch_size', 'rounds', 'max_stages', 'grid', 'sweep_points', 'calibration_samples',
                 'latency_images'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.timing_images < 0:
        raise ValueError(f'--timing-images must be >= 0, got {args.timing_images}')


def run(args: argparse.Namespace) -> int:
    _check_counts(args)
    goal = _goal(args)
    path = resolve_checkpoint(args.checkpoint, args.use_ema)
    model, ks = load_for_eval(path, parse_ks(args.ks), args.model, use_ema=args.use_ema)
    model = model.to(args.device).eval()
    trained = training_metadata(path)
    if args.dataset is None:
        args.dataset, args.data_dir = trained['dataset'] or 'fashion-mnist', args.data_dir or trained['data_dir']
    transform = build_transform(resolve_data_config({}, model=model), is_training=False)

    def dataset(split: str, max_samples=None):
        return load_dataset(args.dataset, args.data_dir, split=split, transform=transform, max_samples=max_samples,
                            seed=args.seed, num_classes=model.num_classes, class_names=trained['class_names'])

    def logits_of(data):
        loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=False, num_workers=args.workers)
        return collect_logits(model, loader, ks, device=args.device)

    test = dataset(args.split, args.max_val_samples)
    logger.info('computing the logits of k %s on %d %s images', ks, len(test), args.split)
    stage_logits, labels = logits_of(test)
    calibration = None
    if args.calibration == 'train':
        calibration = logits_of(dataset('train', args.calibration_samples))
    apply_threads(args.threads)
    images = None if args.no_timing else (lambda index: stack_images(test, index).to(args.device))
    results = cascade_study(model, stage_logits, labels, goal, images=images, calibration=calibration, ks=ks,
                            score=args.score, max_stages=args.max_stages, fixed_stages=args.fixed_stages,
                            grid=args.grid, sweep_points=args.sweep_points, seed=args.seed,
                            timing_images=args.timing_images, batch_size=args.batch_size, rounds=args.rounds,
                            latency_images=args.latency_images,
                            info=dict(checkpoint=str(path), dataset=args.dataset, split=args.split))
    results['checkpoint'] = str(path)
    policy = CascadePolicy.from_dict(results['policy'])
    saved = save_policy(policy, args.policy_file or policy_path(path))
    results['policy_file'] = str(saved)
    _log(results, policy)
    logger.info(f'policy -> {saved}')
    if args.results_file:
        text = json.dumps(results, indent=2) + '\n'
        logger.info(f'-> {atomic_write(Path(args.results_file), lambda tmp: Path(tmp).write_text(text))}')
    return 0


def _log(results: Dict[str, Any], policy: CascadePolicy) -> None:
    logger.info(f'fitted policy: {policy.describe()}')
    cal = results['calibration']
    if cal['mode'] == 'split-half':
        logger.info(f'split-half calibration ({cal["calibration_images"]} / {cal["reported_images"]} images): '
                    f'reported top1 {cal["reported"]["top1"]:.2f} at {cal["reported"]["gmacs"]:.4g} GMACs; swapped '
                    f'{cal["swapped_reported"]["top1"]:.2f} at {cal["swapped_reported"]["gmacs"]:.4g}; averaged '
                    f'{cal["averaged"]["top1"]:.2f} at {cal["averaged"]["gmacs"]:.4g}')
    timing = [c for c in ('img_per_s', 'latency_ms') if c in results['static'][0]]
    rows = [dict(what=f'k={r["k"]}', **{c: r.get(c) for c in ('top1', 'gmacs', *timing)}) for r in results['static']]
    for i, p in enumerate(results['points']):
        exits = ' '.join(f'{k}:{v:.2f}' for k, v in p['exit_fractions'].items())
        rows.append(dict(what='cascade (fitted)' if p['fitted'] else f'cascade {i}',
                         **{c: p.get(c) for c in ('top1', 'gmacs', *timing)}, exits=exits))
    logger.info(format_table(rows))
    summary = results['summary']
    logger.info('vs k=%s: %+.2f p.p. top-1 at %.0f %% of its MACs%s', summary['largest_k'],
                summary['top1_minus_largest'], 100 * summary['gmacs_fraction_of_largest'],
                f', {summary["throughput_ratio_to_largest"]:.2f}x its throughput'
                if 'throughput_ratio_to_largest' in summary else '')
