"""What a resumed (or reused) run must share with the run that wrote its folder.

A resume that silently took new ``--epochs``/``--lr``/``--heads`` would record them in ``args.yaml`` while the
restored optimizer and scheduler kept running the old ones. Here every setting that shapes the run is
compared with the saved one; differences are refused, listed one per setting, unless ``--resume-override``
names them. Overridden schedule settings rebuild the learning-rate schedule for the remaining updates.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple

from .config import TrainConfig

__all__ = ['FREE_SETTINGS', 'FIXED_SETTINGS', 'SCHEDULE_SETTINGS', 'OPTIMIZER_SETTINGS', 'WORLD_SIZE',
           'settings_differences', 'check_resume', 'describe_differences']

# where the run is written, how it is watched and launched (the world size itself is compared): free on resume
FREE_SETTINGS = frozenset({'resume', 'resume_override', 'output', 'experiment', 'workers', 'log_interval', 'device',
                           'report', 'validation_batch_size', 'checkpoint_interval_steps', 'data_dir',
                           'skip_bad_images', 'initial_checkpoint', 'max_nonfinite_steps', 'torchcompile',
                           'torchcompile_mode', 'grad_checkpointing', 'nproc_per_node'})
# what the saved weights and optimizer state are: never changed by a resume
FIXED_SETTINGS = frozenset({'model', 'method', 'heads', 'separate_heads', 'num_classes', 'img_size', 'dataset', 'opt',
                            'opt_eps', 'opt_betas', 'model_ema'})
# rebuild the learning-rate schedule when overridden (the effective lr depends on the world size)
WORLD_SIZE = 'world_size'
SCHEDULE_SETTINGS = frozenset({'epochs', 'lr', 'lr_base', 'lr_base_size', 'lr_base_scale', 'sched', 'warmup_epochs',
                               'warmup_lr', 'min_lr', 'full_width_epochs',
                               'cooldown_epochs', 'grad_accum_steps', 'batch_size', WORLD_SIZE})
OPTIMIZER_SETTINGS = frozenset({'weight_decay', 'momentum'})  # re-applied to the restored optimizer's groups
# not given (None) means "as the machine decides": the value the run recorded is not a conflict
DEFAULTED_SETTINGS = frozenset({'threads'})
Differences = Dict[str, Tuple[Any, Any]]
logger = logging.getLogger(__name__)


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def settings_differences(saved: Mapping[str, Any], cfg: TrainConfig, *, saved_world_size: Optional[int] = None,
                         world_size: Optional[int] = None, ignore: Sequence[str] = ()) -> Differences:
    """``{setting: (saved, now)}`` for every setting of ``cfg`` outside :data:`FREE_SETTINGS` that differs.

    A setting missing from ``saved`` (a folder written by an older version) counts as its default.
    """
    now = cfg.to_dict()
    skip = FREE_SETTINGS | set(ignore)
    out: Differences = {}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        default = TrainConfig.__dataclass_fields__[f.name].default
        old = _normal(saved.get(f.name, default))
        if f.name in DEFAULTED_SETTINGS and now[f.name] is None:
            continue
        if old != now[f.name]:
            out[f.name] = (old, now[f.name])
    if saved_world_size is not None and world_size is not None and saved_world_size != world_size:
        out[WORLD_SIZE] = (saved_world_size, world_size)
    return out


def describe_differences(differences: Differences) -> str:
    return '; '.join(f'{name}: {old!r} -> {new!r}' for name, (old, new) in differences.items())


def _override_names(cfg: TrainConfig) -> Set[str]:
    names = {n.replace('-', '_').lstrip('_') for n in (cfg.resume_override or [])}
    valid = {f.name for f in fields(TrainConfig)} - FREE_SETTINGS - FIXED_SETTINGS | {WORLD_SIZE}
    unknown = sorted(names - valid)
    if unknown:
        fixed = sorted(n for n in unknown if n in FIXED_SETTINGS)
        why = f' ({", ".join(fixed)} cannot change within a run)' if fixed else ''
        raise ValueError(f'--resume-override: {unknown} are not settings a resume can change{why}; '
                         f'valid names: {", ".join(sorted(valid))}')
    return names


def check_resume(saved: Mapping[str, Any], cfg: TrainConfig, where: str, *, saved_world_size: Optional[int],
                 world_size: int, mid_epoch: bool) -> Set[str]:
    """The settings a resume changes (all named by ``--resume-override``); any other difference is an error."""
    overrides = _override_names(cfg)
    differences = settings_differences(saved, cfg, saved_world_size=saved_world_size, world_size=world_size)
    fixed = {n: d for n, d in differences.items() if n in FIXED_SETTINGS}
    if fixed:
        raise ValueError(f'--resume {where}: the run was trained with other settings that a resume cannot change '
                         f'({describe_differences(fixed)}); resume without them, or start a new run (a trained '
                         'checkpoint can start one with --initial-checkpoint)')
    refused = {n: d for n, d in differences.items() if n not in overrides}
    if refused:
        raise ValueError(f'--resume {where}: settings differ from the saved run: {describe_differences(refused)}. '
                         'Resume without these flags to continue the run as it was, or name the ones to change '
                         f'with --resume-override {" ".join(sorted(refused))} (the schedule is rebuilt for them)')
    changed = set(differences)
    batch_shape = {'batch_size', WORLD_SIZE} & changed
    if mid_epoch and batch_shape:
        raise ValueError(f'--resume {where}: the run stopped mid-epoch; {", ".join(sorted(batch_shape))} can only '
                         'change at an epoch boundary (the trained batches of this epoch could not be skipped exactly)')
    if changed:
        logger.warning('resuming %s with changed settings: %s', where,
                                            describe_differences(differences))
    return changed
