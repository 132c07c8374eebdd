"""The phased schedule of --full-width-epochs: each phase runs timm's whole schedule of its own length."""
from __future__ import annotations

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from hydravit.training import load_train_config
from hydravit.training.schedule import PhasedScheduler, create_schedule

UPDATES_PER_EPOCH = 10


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=2e-3)


def _lrs(scheduler, optimizer, updates):
    out = []
    for u in updates:
        scheduler.step_update(u)
        out.append(optimizer.param_groups[0]['lr'])
    return out


def _alone(epochs: int, cooldown: int = 0):
    """timm's cosine schedule of ``epochs`` epochs with the recipe's warm-up, on an optimizer of its own."""
    optimizer = _optimizer()
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-6,
                                       min_lr=1e-5, cooldown_epochs=cooldown, step_on_epochs=False,
                                       updates_per_epoch=UPDATES_PER_EPOCH)
    return scheduler, optimizer


def test_each_phase_follows_timms_schedule_of_its_own_length_and_the_run_counts_both():
    cfg = load_train_config(None, epochs=8, full_width_epochs=3, sched='cosine', lr=2e-3, warmup_epochs=1,
                            warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=1)
    optimizer = _optimizer()
    scheduler, epochs = create_schedule(optimizer, cfg, UPDATES_PER_EPOCH)
    assert isinstance(scheduler, PhasedScheduler) and epochs == 3 + 5 + 1  # timm adds the cooldown to the second
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-6)  # the run starts at the first warm-up
    first, second = _alone(3), _alone(5, cooldown=1)
    phase_one, phase_two = range(0, 30), range(0, 60)
    assert _lrs(scheduler, optimizer, phase_one) == pytest.approx(_lrs(*first, phase_one))
    assert _lrs(scheduler, optimizer, [30 + u for u in phase_two]) == pytest.approx(_lrs(*second, phase_two))
    lrs = _lrs(scheduler, optimizer, [29, 30, 40])
    assert lrs[0] < 2e-5 and lrs[1] == pytest.approx(1e-6) and lrs[2] > 1e-3  # decayed, restarted, warmed up


def test_a_resumed_phased_schedule_continues_where_it_stopped():
    cfg = load_train_config(None, epochs=6, full_width_epochs=2)
    optimizer = _optimizer()
    scheduler, _ = create_schedule(optimizer, cfg, UPDATES_PER_EPOCH)
    expected = _lrs(scheduler, optimizer, range(45))
    restored_optimizer = _optimizer()
    restored, _ = create_schedule(restored_optimizer, load_train_config(None, epochs=6, full_width_epochs=2),
                                  UPDATES_PER_EPOCH)
    restored.load_state_dict(scheduler.state_dict())
    assert _lrs(restored, restored_optimizer, range(25, 45)) == pytest.approx(expected[25:])


def test_without_a_full_width_phase_the_schedule_is_timms_own():
    scheduler, epochs = create_schedule(_optimizer(), load_train_config(None, epochs=4, cooldown_epochs=0), 10)
    assert not isinstance(scheduler, PhasedScheduler) and epochs == 4
    with pytest.raises(ValueError, match='at least one update'):
        PhasedScheduler(scheduler, scheduler, 0)
