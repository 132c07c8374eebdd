"""The learning-rate schedule of a run: timm's, or one timm schedule per training phase.

With ``--full-width-epochs N`` a run has two phases: the largest k alone for N epochs, then the sampler's
subnetworks for the rest. Each phase gets a whole schedule of its own (warm-up, decay to ``--min-lr``),
so the second phase starts from the full-width weights as a run started from a trained ViT with
``--initial-checkpoint`` would, but in one run folder that resumes like any other.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from .config import TrainConfig

__all__ = ['PhasedScheduler', 'create_schedule']


class PhasedScheduler:
    """Consecutive timm schedulers: updates ``0 .. first_updates - 1`` follow ``first``, later ones ``second``
    (counted again from 0). Called as timm's are, with the run's update count."""

    def __init__(self, first: Scheduler, second: Scheduler, first_updates: int) -> None:
        if first_updates < 1:
            raise ValueError(f'the first phase needs at least one update, got {first_updates}')
        self.first, self.second, self.first_updates = first, second, first_updates

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        if num_updates < self.first_updates:
            self.first.step_update(num_updates, metric)
        else:
            self.second.step_update(num_updates - self.first_updates, metric)

    def state_dict(self) -> Dict[str, Any]:
        return {'first': self.first.state_dict(), 'second': self.second.state_dict(),
                'first_updates': self.first_updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.first.load_state_dict(state['first'])
        self.second.load_state_dict(state['second'])
        self.first_updates = state['first_updates']


def _timm_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, cooldown_epochs: int,
                   updates_per_epoch: int) -> Tuple[Scheduler, int]:
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs,
        # timm annotates warmup_epochs as int but scales it by updates_per_epoch: fractional epochs work
        warmup_epochs=cfg.warmup_epochs,  # type: ignore[arg-type]
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    assert scheduler is not None  # every sched name timm knows builds one
    return scheduler, num_epochs


def create_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    updates_per_epoch: int) -> Tuple[Scheduler | PhasedScheduler, int]:
    """The run's scheduler and its number of epochs (cooldown included, as timm counts them)."""
    if not cfg.full_width_epochs:
        return _timm_schedule(optimizer, cfg, cfg.epochs, cfg.cooldown_epochs, updates_per_epoch)
    first, first_epochs = _timm_schedule(optimizer, cfg, cfg.full_width_epochs, 0, updates_per_epoch)
    second, second_epochs = _timm_schedule(optimizer, cfg, cfg.epochs - cfg.full_width_epochs, cfg.cooldown_epochs,
                                           updates_per_epoch)
    scheduler = PhasedScheduler(first, second, first_epochs * updates_per_epoch)
    scheduler.step_update(0)  # the second scheduler's construction set the lr of its own start
    return scheduler, first_epochs + second_epochs
