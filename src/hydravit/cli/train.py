"""``hydravit train``: timm-style training of every subnetwork k; no arguments runs the built-in recipe.

Settings come from the recipe, then from the flags given on the command line. The recipe is ``--config``
(a YAML file, a timm train.py args file, or a named recipe: fmnist, timm, hydravit-paper); without it the
built-in Fashion-MNIST recipe for a run of the built-in model on Fashion-MNIST, timm train.py's defaults for
any other (``--resume``: the run's own ``args.yaml``). Multi-process on one machine: ``--nproc-per-node N``
(this command starts the processes), or ``torchrun --nproc_per_node N -m hydravit train ...``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..training.config import TrainConfig
from ..training.methods import METHODS
from ..training.recipe import BUILTIN_RECIPE, NAMED_CONFIGS, TIMM_DEFAULTS, is_builtin_run, load_train_config
from ..training.timm_args import OFFICIAL_FLAGS
from ..training.trainer import train
from .common import add_omp_flag, check_writable, positive_int

SUPPRESS = argparse.SUPPRESS
BOOL = argparse.BooleanOptionalAction

# (flags, argparse keywords, help); flags and meaning follow timm's train.py
OPTIONS: List[Tuple[Tuple[str, ...], Dict[str, Any], str]] = [
    # model and data
    (('--model',), {}, 'registered HydraViT model name'),
    (('--dataset',), {}, "data set: 'fashion-mnist', 'imagefolder', 'cifar10', ..."),
    (('--data-dir',), {}, "data root (default: the data set's standard location)"),
    (('--num-classes',), dict(type=int), 'number of classes (must match the data set)'),
    (('--img-size',), dict(type=int), "input size (default: the model's)"),
    (('--initial-checkpoint',), {},
     'start from a HydraViT .safetensors or a timm ViT/DeiT state dict of the same or a smaller width'),
    (('--separate-heads',), dict(action=BOOL), 'one classifier per k instead of the shared sliced head'),
    (('--max-train-samples',), dict(type=int), 'train on a subset of N images (quick runs)'),
    (('--max-val-samples',), dict(type=int), 'evaluate on a subset of N images'),
    (('--skip-bad-images',), dict(action=BOOL), 'skip unreadable images instead of failing'),
    (('-j', '--workers'), dict(type=int), 'data loading worker processes'),
    # nesting method and subnetwork sampling
    (('--method',), dict(choices=tuple(METHODS)), 'how subnetworks are nested and trained (default: hydravit): '
     + '; '.join(f'{m.name}: {m.summary}' for m in METHODS.values())),
    (('--heads',), dict(type=int, nargs='+'), "the set of k to train (becomes the model's k choices)"),
    (('--sampler',), {}, 'uniform | weighted | sandwich | random | all'),
    (('--head-weights',), dict(type=float, nargs='+'), 'one sampling weight per k of --heads (weighted sampler; '
     'sandwich: how its random k are drawn, the largest and smallest train every step)'),
    (('--loss-weights',), dict(type=float, nargs='+'), "one factor > 0 per k of --heads (or of the model's k "
     "choices): each k's loss is multiplied by it in a step's sum (default 1 each)"),
    (('--num-random',), dict(type=int), 'sandwich: random k per step besides largest and smallest; '
     'random: k per step'),
    (('--teacher-epochs',), dict(type=int), 'dynabert: epochs of full-width training before reordering '
     '(default: 0 with --initial-checkpoint, else a quarter of --epochs)'),
    (('--full-width-epochs',), dict(type=int), 'epochs at the start that train only the largest k, on a '
     'learning-rate schedule of their own; the sampler then trains the rest of --epochs on a fresh one '
     '(as if started from a trained ViT; default 0)'),
    (('--importance-samples',), dict(type=int), 'dynabert: training images that score head/neuron importance'),
    (('--k-per-rank',), dict(action=BOOL), "each process draws its own k (the reference code's behaviour)"),
    (('--inplace-distill',), dict(action=BOOL), "smaller k of a step learn from the largest k's output"),
    (('--distill-start-epoch',), dict(type=float), 'in-place distillation starts at this epoch (may be '
     'fractional); before it every k learns from the labels (default 0)'),
    (('--distill-weight',), dict(type=float), "in-place distillation: the largest k's soft labels' share of a "
     "smaller k's loss, in (0, 1]; the rest is the labels' cross-entropy (default 1)"),
    # optimisation
    (('-b', '--batch-size'), dict(type=int), 'batch size per process'),
    (('--validation-batch-size',), dict(type=int), 'evaluation batch size (default: --batch-size)'),
    (('--epochs',), dict(type=int), 'number of epochs'),
    (('--lr',), dict(type=float), 'learning rate (default: --lr-base * global batch / 512)'),
    (('--lr-base',), dict(type=float), 'learning rate at a global batch of --lr-base-size'),
    (('--lr-base-size',), dict(type=int), 'global batch size of --lr-base'),
    (('--lr-base-scale',), dict(choices=('', 'linear', 'sqrt')),
     "lr scaling with the batch size (timm: '' = sqrt for Adam-like and LAMB, linear otherwise)"),
    (('--opt',), {}, 'timm optimizer name (adamw, sgd, lamb, ...)'),
    (('--opt-eps',), dict(type=float), "optimizer epsilon (default: the optimizer's)"),
    (('--opt-betas',), dict(type=float, nargs='+'), "optimizer betas (default: the optimizer's)"),
    (('--momentum',), dict(type=float), 'SGD momentum'),
    (('--opt-active-slice',), dict(action=BOOL),
     "AdamW updates only the step's active slice (faster at small k; off: the paper's full-tensor update)"),
    (('--weight-decay',), dict(type=float), 'weight decay'),
    (('--sched',), {}, 'timm scheduler name (cosine, step, ...)'),
    (('--warmup-epochs',), dict(type=float), 'linear warm-up epochs (fractions allowed)'),
    (('--warmup-lr',), dict(type=float), 'learning rate at the start of the warm-up'),
    (('--min-lr',), dict(type=float), 'lowest learning rate of the schedule'),
    (('--cooldown-epochs',), dict(type=int), 'epochs at --min-lr after the schedule'),
    (('--grad-accum-steps',), dict(type=int), 'micro-batches per optimizer step'),
    (('--clip-grad',), dict(type=float), 'gradient clipping threshold (off by default)'),
    (('--clip-mode',), {}, 'norm | value | agc'),
    (('--amp',), dict(action=BOOL), 'mixed precision (torch.autocast)'),
    (('--amp-dtype',), dict(choices=('float16', 'bfloat16')), 'autocast dtype'),
    (('--torchcompile',), dict(nargs='?', const='inductor'),
     'torch.compile the model with this backend (default when given: inductor); each k compiles once'),
    (('--torchcompile-mode',), {}, 'torch.compile mode: default, reduce-overhead, max-autotune, ...'),
    (('--model-ema',), dict(action=BOOL), 'keep an EMA of the weights (timm ModelEmaV3), evaluated too'),
    (('--model-ema-decay',), dict(type=float), 'EMA decay'),
    # regularisation and augmentation
    (('--drop',), dict(type=float), 'dropout rate before the classifier'),
    (('--drop-path',), dict(type=float), 'stochastic depth rate'),
    (('--grad-checkpointing',), dict(action=BOOL), 'recompute each block in backward (less memory, slower)'),
    (('--smoothing',), dict(type=float), 'label smoothing'),
    (('--mixup',), dict(type=float), 'mixup alpha (0 = off)'),
    (('--cutmix',), dict(type=float), 'cutmix alpha (0 = off)'),
    (('--mixup-prob',), dict(type=float), 'probability of mixup/cutmix per batch'),
    (('--mixup-switch-prob',), dict(type=float), 'probability of cutmix instead of mixup when both are on'),
    (('--mixup-mode',), {}, 'batch | pair | elem'),
    (('--report',), dict(action=BOOL), 'end with the accuracy-cost report (report/: table + Pareto plots)'),
    (('--no-aug',), dict(action='store_true'),
     'train without augmentation (timm no_aug: resize, centre crop, normalise)'),
    (('--scale',), dict(type=float, nargs=2), 'random-resized-crop area range'),
    (('--ratio',), dict(type=float, nargs=2), 'random-resized-crop aspect range'),
    (('--hflip',), dict(type=float), 'horizontal flip probability'),
    (('--vflip',), dict(type=float), 'vertical flip probability'),
    (('--color-jitter',), dict(type=float), 'colour jitter strength'),
    (('--train-interpolation',), {}, 'training resize interpolation (timm: random, bicubic, ...)'),
    (('--aa',), {}, 'timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1'),
    (('--reprob',), dict(type=float), 'random erasing probability'),
    (('--remode',), {}, 'random erasing mode'),
    # evaluation, output, checkpoints
    (('--eval-heads',), dict(type=int, nargs='+'), 'k evaluated each epoch (default: the trained k)'),
    (('--eval-metric',), {}, 'what model_best tracks: top1_mean or top1_k<N>'),
    (('--val-interval',), dict(type=int), 'evaluate every N epochs (and after the last)'),
    (('--log-interval',), dict(type=int), 'print a line every N steps when there is no progress bar'),
    (('--output',), {}, 'parent folder of the run folders'),
    (('--experiment',), {}, 'run folder name (default: timestamp-model-size)'),
    (('--resume',), {}, 'continue a run: its folder or its last.state.pth'),
    (('--resume-override',), dict(nargs='+', metavar='SETTING'),
     'with --resume: settings that may differ from the saved run (e.g. epochs lr); others are refused'),
    (('--max-nonfinite-steps',), dict(type=int), 'skip up to N steps with a NaN/inf loss or gradient '
     '(default 0: stop at the first)'),
    (('--checkpoint-interval-steps',), dict(type=int), 'also checkpoint every N optimizer steps (0 = per epoch)'),
    (('--seed',), dict(type=int), 'random seed'),
    (('--device',), {}, 'cpu or cuda'),
    (('--nproc-per-node', '--nproc_per_node'), dict(type=positive_int, dest='nproc_per_node'),
     "local processes joined by DDP, started by this command (torchrun's flag; CPU: the cores are shared "
     'out, see --threads); --batch-size is per process, as in timm'),
    (('--threads',), dict(type=positive_int),
     "torch CPU threads per process, >= 1 (default: the recipe's, else torch's, split between --nproc-per-node "
     'processes); recorded in args.yaml: the weights depend on it'),
]


class OfficialFlag(argparse.Action):
    """A flag of the official HydraViT code: a clear error naming ours (or saying why there is none)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        target, why = OFFICIAL_FLAGS[self.dest]
        message = (f'{option_string} is {why}: leave it out' if target is None else
                   f'{option_string} is the official HydraViT flag; here it is --{target.replace("_", "-")} ({why})')
        parser.exit(2, f'{parser.prog}: error: {message}\n')


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('train', help='train a HydraViT (default: Fashion-MNIST on CPU, ~7 min on 2 cores)',
                       description=__doc__.splitlines()[0], argument_default=SUPPRESS, allow_abbrev=False)
    p.add_argument('-c', '--config', help='YAML recipe with timm-style keys or a timm train.py args.yaml, or one of '
                   f'{", ".join(NAMED_CONFIGS)} (default: {BUILTIN_RECIPE} for the built-in model on Fashion-MNIST, '
                   f"else {TIMM_DEFAULTS}: timm train.py's defaults)")
    for flags, kwargs, help_text in OPTIONS:
        p.add_argument(*flags, help=help_text, **kwargs)
    add_official_flags(p)
    add_omp_flag(p)
    return p


def add_official_flags(p: argparse.ArgumentParser) -> None:
    for name in OFFICIAL_FLAGS:
        p.add_argument(f'--{name.replace("_", "-")}', dest=name, nargs='*', action=OfficialFlag, help=SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe (``--config``, the resumed run's ``args.yaml`` or the built-in one) + the flags given."""
    overrides = {k: v for k, v in vars(args).items()
                 if not k.startswith('_') and k not in ('command', 'config', 'log_level', 'omp_active')}
    config_path = getattr(args, 'config', None)
    if config_path is None and 'resume' in overrides:
        run_args = Path(overrides['resume'])
        run_args = (run_args if run_args.is_dir() else run_args.parent) / 'args.yaml'
        config_path = run_args if run_args.is_file() else None
    if config_path is None:
        config_path = BUILTIN_RECIPE if is_builtin_run(overrides) else TIMM_DEFAULTS
    if 'lr_base' in overrides and 'lr' not in overrides:
        overrides['lr'] = None  # --lr-base on the command line wins over a recipe's fixed lr (timm semantics)
    return load_train_config(config_path, **overrides)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_writable(cfg.resume or cfg.output, '--resume' if cfg.resume else '--output')
    train(cfg)
    return 0
