"""The early-exit cascade on a trained checkpoint: accuracy over several split-half seeds, then speed against
every static k measured side by side in one run.

1. Every k's logits on the test split are computed once.
2. For each goal and each split seed: fit on one half, report on the other, swap (``hydravit.cascade.cross_fit``);
   the reported top-1 minus k=12's top-1 *on the same half* is the drop, summarised as mean, std and a 95 %
   t-interval over all reported halves (two per seed; halves of different seeds overlap, so they are not
   independent samples: the interval is indicative).
3. For split seed 0: the fitted policy, its threshold sweep and every static k timed in interleaved rounds
   (batch 256 throughput, batch-1 latency over real images) and compared: k=12, the static k of equal GMACs, and
   every static k at least as fast.

    python benchmarks/bench_cascade.py --checkpoint /work/runs/main -o /work/runs/i14/bench_cascade
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
from timm.data import resolve_data_config

from hydravit.cascade import cascade_study, collect_logits, create_goal, split_halves, stack_images, stage_macs
from hydravit.data.datasets import load_dataset
from hydravit.data.transforms import build_transform
from hydravit.evaluation.benchmark import reexec_with_malloc_env
from hydravit.evaluation.evaluate import load_for_eval
from hydravit.storage.results import markdown_table
from hydravit.storage.run_folder import resolve_checkpoint, training_metadata

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20}


def interval(values: List[float]) -> Dict[str, float]:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T95.get(len(values) - 1, 1.96) * std / len(values) ** 0.5 if len(values) > 1 else float('nan')
    return dict(mean=mean, std=std, ci95_low=mean - half, ci95_high=mean + half, n=len(values))


def main() -> None:
    if '--system-malloc' not in sys.argv:
        reexec_with_malloc_env(sys.argv)
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--score', default='margin')
    p.add_argument('--max-drop', type=float, default=0.1)
    p.add_argument('--gmacs-fraction', type=float, default=0.5, help="target-gmacs goal: this fraction of k=12's")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--timing-images', type=int, default=1024)
    p.add_argument('--latency-images', type=int, default=64)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--logits-cache', help='reuse/store the per-k logits here (a .pt file of tensors)')
    p.add_argument('--system-malloc', action='store_true')
    p.add_argument('-o', '--output', required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_checkpoint(args.checkpoint)
    model, ks = load_for_eval(path)
    trained = training_metadata(path)
    transform = build_transform(resolve_data_config({}, model=model), is_training=False)
    test = load_dataset(trained['dataset'] or 'fashion-mnist', trained['data_dir'], split='val', transform=transform,
                        num_classes=model.num_classes, class_names=trained['class_names'])
    cache = Path(args.logits_cache) if args.logits_cache else None
    if cache is not None and cache.is_file():
        logits, labels = torch.load(cache, weights_only=True)
    else:
        logits, labels = collect_logits(model, torch.utils.data.DataLoader(test, batch_size=500), ks)
        if cache is not None:
            torch.save((logits, labels), cache)
    largest = max(ks)
    gmacs_largest = stage_macs(model, [largest])[largest] / 1e9
    goals = {f'max-drop {args.max_drop}': create_goal('max-drop', args.max_drop),
             f'target-gmacs {args.gmacs_fraction:g} x k={largest}': create_goal('target-gmacs',
                                                                               args.gmacs_fraction * gmacs_largest)}
    summary: Dict[str, Any] = {}
    rows = []
    for name, goal in goals.items():
        drops, fractions = [], []
        for seed in args.seeds:
            study = cascade_study(model, logits, labels, goal, score=args.score, seed=seed)
            cal = study['calibration']
            half_a, half_b = split_halves(labels.numel(), seed)
            for half, reported in ((half_b, cal['reported']), (half_a, cal['swapped_reported'])):
                k12 = 100.0 * float(logits[largest][half].argmax(-1).eq(labels[half]).double().mean())
                drops.append(reported['top1'] - k12)
                fractions.append(reported['gmacs'] / gmacs_largest)
        summary[name] = dict(top1_minus_largest=interval(drops), gmacs_fraction=interval(fractions), drops=drops)
        d, f = summary[name]['top1_minus_largest'], summary[name]['gmacs_fraction']
        rows.append(dict(goal=name, halves=d['n'], drop_mean=d['mean'], drop_std=d['std'],
                         drop_ci95=f'[{d["ci95_low"]:.2f}, {d["ci95_high"]:.2f}]', macs_fraction_mean=f['mean'],
                         macs_fraction_max=max(fractions)))
        logging.info('%s: top-1 minus k=%d over %d reported halves: %.3f +- %.3f p.p.; MACs %.1f %% of k=%d',
                     name, largest, d['n'], d['mean'], d['std'], 100 * f['mean'], largest)
    print(markdown_table(rows))
    timed = {}
    for name, goal in goals.items():
        study = cascade_study(model, logits, labels, goal, score=args.score, seed=args.seeds[0],
                              images=lambda index: stack_images(test, index), timing_images=args.timing_images,
                              rounds=args.rounds, latency_images=args.latency_images)
        timed[name] = study
        (out / f'cascade_{name.split()[0]}.json').write_text(json.dumps(study, indent=2) + '\n')
        s = study['summary']
        fitted = study['points'][0]
        static = {r['k']: r for r in study['static']}
        thresholds = [round(t, 4) for t in study['policy']['thresholds']]
        print(f'\n{name}: policy {study["policy"]["ks"]} thresholds {thresholds} ({args.score})')
        print(markdown_table([dict(what='cascade (fitted)', top1=fitted['top1'], gmacs=fitted['gmacs'],
                                   img_per_s=fitted['img_per_s'], latency_ms=fitted['latency_ms'])]
                             + [dict(what=f'k={k}', **{c: r.get(c) for c in ('top1', 'gmacs', 'img_per_s',
                                                                              'latency_ms')})
                                for k, r in static.items()]))
        print(json.dumps(s, indent=1))
    (out / 'summary.json').write_text(json.dumps(dict(accuracy=summary, timed={n: t['summary'] for n, t in
                                                                               timed.items()}), indent=2) + '\n')


if __name__ == '__main__':
    main()
