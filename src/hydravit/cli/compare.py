"""``hydravit compare``: train every nesting method with one recipe, then one table and two Pareto plots.

The recipe is ``hydravit train``'s (``--config``, default the built-in Fashion-MNIST one) and every
``train`` flag applies to all methods alike. ``--quick`` is a smoke run on a few thousand images.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..training.compare import compare_methods
from ..training.methods import METHODS, default_methods
from .common import add_corruption_flags, add_omp_flag, check_writable, corruption_suite
from .train import OPTIONS, SUPPRESS, add_official_flags, config_from_args

# train flags that name one run: a comparison sets them per method
PER_RUN_FLAGS = ('--method', '--experiment', '--resume', '--output', '--report')
# two epochs: DynaBERT's teacher trains for one before the width-adaptive phase
QUICK = dict(epochs=2, max_train_samples=1024, max_val_samples=1000, warmup_epochs=0.1, val_interval=1)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('compare', help='train HydraViT, SortedNet, MatFormer, DynaBERT and separate ViTs alike; '
                                       'one report', description=__doc__.splitlines()[0], argument_default=SUPPRESS)
    p.add_argument('--methods', nargs='+', choices=tuple(METHODS), default=default_methods(),
                   help='methods to train (default: all but the ablations heads and width)')
    p.add_argument('-o', '--output', default='output/compare',
                   help='folder of the method runs and of report/ (default: %(default)s); run again to resume')
    p.add_argument('--separate-ks', type=int, nargs='+', default=None,
                   help='train separate ViTs for these k only (default: all)')
    p.add_argument('--seeds', type=int, default=1,
                   help='train every method this many times, seeds --seed, --seed+1, ... (same data order across '
                        'methods within a seed); report mean, std and 95%% t-intervals per k (default: %(default)s)')
    p.add_argument('--quick', action='store_true', default=False,
                   help='smoke run: 2 epochs on 1024 images, 1000 to evaluate, short benchmark')
    p.add_argument('--no-benchmark', action='store_true', default=False, help='skip the throughput measurement')
    p.add_argument('--bench-batch-size', type=int, default=256, help='inference batch size (default: %(default)s)')
    p.add_argument('--memory', action='store_true', default=False,
                   help='also measure peak memory per k (a child process each)')
    robustness = p.add_argument_group('robustness (every method scored alike on the same corrupted test sets)')
    add_corruption_flags(robustness, samples=True)
    p.add_argument('-c', '--config', help='YAML recipe (default: built-in fmnist_cpu.yaml)')
    train_flags = p.add_argument_group('recipe overrides (hydravit train flags, applied to every method)')
    for flags, kwargs, help_text in OPTIONS:
        if flags[0] not in PER_RUN_FLAGS:
            train_flags.add_argument(*flags, help=help_text, **kwargs)
    add_official_flags(p)
    add_omp_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    own = ('methods', 'output', 'separate_ks', 'quick', 'no_benchmark', 'bench_batch_size', 'memory', 'teacher_epochs',
           'omp_active', 'seeds', 'corruptions', 'severities', 'corruption_seed', 'corruption_samples')
    settings: Dict[str, Any] = {name: getattr(args, name, None) for name in own}
    recipe = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in own})
    if settings['quick']:
        for name, value in QUICK.items():
            if not hasattr(recipe, name):
                setattr(recipe, name, value)
    suite = corruption_suite(args)  # a bad corruption or severity fails before any training
    base = config_from_args(recipe)
    check_writable(settings['output'])
    compare_methods(base, settings['methods'], settings['output'], separate_ks=settings['separate_ks'],
                    teacher_epochs=settings['teacher_epochs'], seeds=settings['seeds'],
                    benchmark=not settings['no_benchmark'],
                    bench_batch_size=settings['bench_batch_size'],
                    bench_seconds=0.05 if settings['quick'] else 0.2, measure_memory=settings['memory'],
                    corruptions=suite)
    return 0
