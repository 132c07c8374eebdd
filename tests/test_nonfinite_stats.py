"""Steps the non-finite guard skips count nowhere: not in the epoch's train loss, not in the per-k running
statistics; summary.csv says how many were skipped per epoch, also across a mid-epoch resume."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import pytest
import torch

from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

pytestmark = pytest.mark.usefixtures('one_thread')

BATCH, IMAGES = 8, 40  # 5 steps per epoch, every image used each epoch


class _PoisonedSet(torch.utils.data.Dataset):
    """Fetches number ``nan_from`` ... ``nan_to`` (in fetch order, i.e. one whole batch) return NaN images;
    fetch number ``fail_at`` raises, like a crash in the middle of an epoch."""

    num_classes = 10
    classes = [str(i) for i in range(10)]

    def __init__(self, poisoned_fetches: range = range(0), fail_at: Optional[int] = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(IMAGES, 3, 16, 16, generator=g)
        self.y = torch.arange(IMAGES) % 10
        self.poisoned, self.fail_at, self.fetches = poisoned_fetches, fail_at, 0

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int):
        fetch, self.fetches = self.fetches, self.fetches + 1
        if fetch == self.fail_at:
            raise RuntimeError('simulated crash')
        image = self.x[index]
        return (torch.full_like(image, float('nan')) if fetch in self.poisoned else image), self.y[index]


# epoch 0's step 1 and epoch 1's step 1 see NaN images
POISONED = range(BATCH, 2 * BATCH)
POISONED_BOTH_EPOCHS = [*POISONED, *range(IMAGES + BATCH, IMAGES + 2 * BATCH)]


def _config(out: Path):
    return load_train_config(None, model='hydravit_test_patch4_16', heads=[2, 4], sampler='all', batch_size=BATCH,
                             epochs=2, lr=3e-3, warmup_epochs=0, val_interval=1, log_interval=1000, output=str(out),
                             experiment='run', report=False, smoothing=0.0, hflip=0.0, no_aug=True, workers=0,
                             checkpoint_interval_steps=2, max_nonfinite_steps=4,
                             nproc_per_node=1)  # one process: the poisoned steps are counted for its batches


def _summary(folder: Path):
    with open(folder / 'run' / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_skipped_steps_are_left_out_of_the_train_loss_and_per_k_statistics(tmp_path):
    val = _PoisonedSet()
    train(_config(tmp_path), datasets=(_PoisonedSet(POISONED_BOTH_EPOCHS), val))
    rows = _summary(tmp_path)
    for row in rows:
        for column in ('train_loss', 'train_loss_k2', 'train_loss_k4', 'train_top1_k2', 'train_top1_k4'):
            assert math.isfinite(float(row[column])), (row['epoch'], column, row[column])
        for k in (2, 4):  # accuracy over the 4 applied steps' 32 images, not over all 40
            correct = float(row[f'train_top1_k{k}']) * (IMAGES - BATCH) / 100
            assert correct == pytest.approx(round(correct), abs=1e-6), (k, row[f'train_top1_k{k}'])
    assert [int(r['nonfinite_skipped']) for r in rows] == [1, 1]


def test_skipped_step_count_survives_a_mid_epoch_resume(tmp_path):
    train(_config(tmp_path / 'full'), datasets=(_PoisonedSet(POISONED_BOTH_EPOCHS), _PoisonedSet()))
    crashing = _PoisonedSet(POISONED_BOTH_EPOCHS, fail_at=IMAGES + 4 * BATCH)  # epoch 1, after update 8's checkpoint
    with pytest.raises(RuntimeError, match='simulated crash'):
        train(_config(tmp_path / 'killed'), datasets=(crashing, _PoisonedSet()))
    resumed = load_train_config(None, **{**_config(tmp_path / 'killed').to_dict(),
                                         'resume': str(tmp_path / 'killed' / 'run')})
    train(resumed, datasets=(_PoisonedSet(), _PoisonedSet()))  # epoch 1's poisoned step lies before the checkpoint
    full, killed = _summary(tmp_path / 'full'), _summary(tmp_path / 'killed')
    assert [int(r['nonfinite_skipped']) for r in killed] == [1, 1]
    assert killed == full
