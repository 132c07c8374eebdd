"""Which HydraViT recipe closes the gap to separately trained ViTs? (beyond the paper)

Trains HydraViT variants with the built-in recipe (same data, epochs, seed) and reports each one's
top-1 per k next to the separate ViTs of a finished ``hydravit compare`` run, with the gap at every k:

    python benchmarks/recipe_ablation.py --compare-dir output/compare -o output/ablation
    python benchmarks/recipe_ablation.py --compare-dir /tmp/cq -o /tmp/ab --set epochs=1 max_train_samples=512  # smoke

Every variant changes one thing in the recipe's sampler phase (the built-in recipe without its full-width
phase; ``--variants`` picks some): the paper's uniform sampler, weighted sampling favouring small k, the
sandwich rule, sandwich with 3 random k instead of 1, every k each step (the separate ViTs' compute), in-place
distillation (from the start, or after a fifth of the epochs mixed with the labels), the sandwich's random k
drawn towards the middle of the range or their losses counted twice, a longer warm-up (1 or 2 epochs), one
classifier per k, 1 or 2 of the epochs at full width first, as many full-width epochs first as the sandwich
rule then trains (twice the epochs), and sandwich starting from the separately trained k=3 ViT (DeiT-Ti-style
init) or k=12 ViT (the paper's DeiT-B init; both cost that ViT's training on top). ``built-in`` is the
comparison's own HydraViT run. One more run is not a HydraViT recipe: DynaBERT starting from, and distilled
from, the separately trained k=12 ViT, i.e. with the trained teacher it is published with. With ``--seeds N``
every variant trains once per seed and the report gives every gap to the separate ViTs with its 95 % interval,
paired by seed. Finished variants are reused; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import yaml
from safetensors.torch import save_file

from hydravit.models.factory import create_model
from hydravit.models.subnet import model_subnet_state_dict
from hydravit.storage.checkpoint import load_model
from hydravit.storage.results import read_results
from hydravit.training import TrainConfig, load_train_config
from hydravit.training.compare import Run, run_config, train_runs, write_comparison, write_seed_comparison

Variant = Callable[[TrainConfig, Path], TrainConfig]
TITLE = 'HydraViT recipes against separately trained ViTs'


def _k_choices(cfg: TrainConfig) -> List[int]:
    """The run's k, ascending: --heads, else the model's k choices."""
    return sorted(cfg.heads or create_model(cfg.model).k_choices)


def _weighted(cfg: TrainConfig, _: Path) -> TrainConfig:
    ks = _k_choices(cfg)
    return replace(cfg, sampler='weighted', heads=ks, head_weights=[float(len(ks) - i) for i in range(len(ks))])


def _distill_late(cfg: TrainConfig, _: Path) -> TrainConfig:
    """In-place distillation once the largest k has trained a fifth of the epochs (1 of the built-in 5), mixed
    half and half with the labels."""
    return replace(cfg, inplace_distill=True, distill_start_epoch=cfg.epochs / 5, distill_weight=0.5)


def _middle_weighted(cfg: TrainConfig, _: Path) -> TrainConfig:
    """The sandwich's random k drawn with triangular weights peaking at the centre of the range."""
    ks = _k_choices(cfg)
    centre = (len(ks) - 1) / 2
    return replace(cfg, heads=ks, head_weights=[float(round(centre + 1 - abs(i - centre))) for i in range(len(ks))])


def _middle_loss_twice(cfg: TrainConfig, _: Path) -> TrainConfig:
    """Every k between the largest and the smallest counts twice in a step's summed loss."""
    ks = _k_choices(cfg)
    return replace(cfg, heads=ks, loss_weights=[1.0 if k in (ks[0], ks[-1]) else 2.0 for k in ks])


def _separate_vit(compare_dir: Path, widest: bool) -> str:
    """The comparison's separately trained smallest (or widest) ViT as a timm state dict file."""
    separate = load_model(compare_dir / 'separate' / 'last.safetensors')
    k = max(separate.k_choices) if widest else min(separate.k_choices)
    path = compare_dir / 'separate' / f'vit_k{k}.safetensors'
    save_file(model_subnet_state_dict(separate, k), str(path))
    return str(path)


def _init_from_separate(cfg: TrainConfig, compare_dir: Path) -> TrainConfig:
    """Start from the separately trained smallest ViT, written into the leading slices."""
    return replace(cfg, initial_checkpoint=_separate_vit(compare_dir, widest=False))


def _init_from_widest_separate(cfg: TrainConfig, compare_dir: Path) -> TrainConfig:
    """Start from the separately trained full-width ViT (the paper's DeiT-B init; DynaBERT's starting point)."""
    return replace(cfg, initial_checkpoint=_separate_vit(compare_dir, widest=True))


def _dynabert_trained_teacher(cfg: TrainConfig, compare_dir: Path) -> TrainConfig:
    """DynaBERT as published: start from (and distil from) a fully trained full-width model."""
    return replace(cfg, method='dynabert', initial_checkpoint=_separate_vit(compare_dir, widest=True))


def sampler_phase(cfg: TrainConfig) -> TrainConfig:
    """The recipe without its full-width phase: the sampler's epochs alone, which each variant changes in one
    thing (the full-width variants put a phase back)."""
    return replace(cfg, epochs=cfg.epochs - cfg.full_width_epochs, full_width_epochs=0)


def _full_width_first(cfg: TrainConfig, _: Path) -> TrainConfig:
    """As many full-width epochs first as the sampler then trains: twice the epochs in all."""
    return replace(cfg, epochs=2 * cfg.epochs, full_width_epochs=cfg.epochs)


VARIANTS: Dict[str, tuple] = {  # name -> (label, settings on top of the recipe's sampler phase)
    'built-in': ('built-in recipe', None),  # the comparison's HydraViT run
    'uniform': ('uniform (paper)', lambda cfg, _: replace(cfg, sampler='uniform')),
    'weighted': ('weighted 10:1 to small k', _weighted),
    'sandwich': ('sandwich', lambda cfg, _: cfg),
    'sandwich-3': ('sandwich, 3 random k', lambda cfg, _: replace(cfg, num_random=3)),
    'all': ('all k each step', lambda cfg, _: replace(cfg, sampler='all')),
    'distill': ('sandwich + in-place distill', lambda cfg, _: replace(cfg, inplace_distill=True)),
    'distill-late': ('sandwich + in-place distill after 1/5 of the epochs, half labels', _distill_late),
    'middle-weighted': ('sandwich, middle k drawn towards the centre', _middle_weighted),
    'middle-loss-2': ('sandwich, middle k losses counted twice', _middle_loss_twice),
    'warmup-1': ('sandwich, 1 warm-up epoch', lambda cfg, _: replace(cfg, warmup_epochs=1.0)),
    'warmup-2': ('sandwich, 2 warm-up epochs', lambda cfg, _: replace(cfg, warmup_epochs=2.0)),
    'lr-2e-3': ('sandwich, lr 0.002 (the rate before 2026-12-07)', lambda cfg, _: replace(cfg, lr=0.002)),
    'k-per-rank': ('sandwich, a middle k per process', lambda cfg, _: replace(cfg, k_per_rank=True)),
    'separate-heads': ('sandwich + classifier per k', lambda cfg, _: replace(cfg, separate_heads=True)),
    'full-width-1': ('1 of the epochs full width, then sandwich', lambda cfg, _: replace(cfg, full_width_epochs=1)),
    'full-width-2': ('2 of the epochs full width, then sandwich', lambda cfg, _: replace(cfg, full_width_epochs=2)),
    'full-width-first': ('as many full-width epochs first, then sandwich', _full_width_first),
    'init-small': ('sandwich + init from separate k=3', _init_from_separate),
    'init-large': ('sandwich + init from separate k=12', _init_from_widest_separate),
    'init-small-3': ('sandwich, 3 random k + init from separate k=3',
                     lambda cfg, out: replace(_init_from_separate(cfg, out), num_random=3)),
    # not a HydraViT recipe: DynaBERT with the teacher it is published with (costs a full ViT training more)
    'dynabert-trained-teacher': ('DynaBERT, teacher = separate k=12', _dynabert_trained_teacher),
}


def _seed_dir(root: Path, seed: int, seeds: int) -> Path:
    """Where one seed's runs live: ``root`` for one seed, else ``root/seed<S>`` (as ``hydravit compare --seeds``)."""
    return root / f'seed{seed}' if seeds > 1 else root


def ablation_runs(variants: Sequence[str], recipe: TrainConfig, compare_dir: Path, out_dir: Path) -> Dict[str, Run]:
    """One seed's runs: every variant (trained into ``out_dir``) and the comparison's separate ViTs."""
    def finished(name: str) -> TrainConfig:  # a run of the comparison, with the settings it was trained with
        return run_config(load_train_config(compare_dir / name / 'args.yaml'), compare_dir, name)

    runs = {}
    for name in variants:
        label, variant = VARIANTS[name]
        cfg = (finished('hydravit') if variant is None
               else run_config(variant(sampler_phase(recipe), compare_dir), out_dir, name))
        if cfg.seed != recipe.seed:
            raise SystemExit(f'{compare_dir}: its runs have seed {cfg.seed}, the ablation seed {recipe.seed}')
        runs[name] = Run(label, cfg)
    runs['separate'] = Run('Separate ViTs', finished('separate'),
                           results=read_results(compare_dir / 'separate' / 'results.csv'))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument('--compare-dir', type=Path, default=Path('output/compare'),
                        help='a finished `hydravit compare` output folder (its hydravit and separate runs; with '
                             '--seeds N, one of `hydravit compare --seeds N`: seed<S>/ folders)')
    parser.add_argument('-o', '--output', type=Path, default=Path('output/ablation'))
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument('--seeds', type=int, default=1,
                        help='train every variant for N seeds (the recipe seed and the next ones) and report mean, '
                             'std and 95 %% intervals of every gap, paired by seed')
    parser.add_argument('--no-benchmark', action='store_true')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='recipe settings for every variant, e.g. epochs=1 max_train_samples=2048 (YAML values)')
    args = parser.parse_args()
    if args.seeds < 1:
        raise SystemExit(f'--seeds must be >= 1, got {args.seeds}')
    settings = {key: yaml.safe_load(value) for key, value in (item.split('=', 1) for item in args.set)}
    first = load_train_config(None, **settings).seed
    per_seed = {}
    for seed in range(first, first + args.seeds):
        out_dir = _seed_dir(args.output, seed, args.seeds)
        runs = ablation_runs(args.variants, load_train_config(None, **{**settings, 'seed': seed}),
                             _seed_dir(args.compare_dir, seed, args.seeds), out_dir)
        train_runs([run for name, run in runs.items() if name != 'separate'], benchmark=not args.no_benchmark)
        write_comparison(list(runs.values()), out_dir, separate=runs['separate'],
                         title=TITLE + (f' (seed {seed})' if args.seeds > 1 else ''))
        per_seed[seed] = runs
    if args.seeds > 1:
        write_seed_comparison(per_seed, args.output, title=TITLE)


if __name__ == '__main__':
    main()
