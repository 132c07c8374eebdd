"""Per-k training curves: running loss and accuracy of every k per epoch in summary.csv, and their plot."""
from __future__ import annotations

import csv

import pytest
import torch

from hydravit.training.distributed import DistEnv
from hydravit.training.outputs import TRAIN_CURVES_FILE
from hydravit.training.per_k import PerKTrainingStats, per_k_columns
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

from helpers import FMNIST, needs_fmnist


def _logits(predicted):
    return torch.nn.functional.one_hot(torch.tensor(predicted), 5).float()


def test_per_k_sums_weight_batches_by_size_and_read_soft_targets():
    stats = PerKTrainingStats([4, 2, 3])
    stats.add(2, 1.0, _logits([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0]))  # 3 of 4 right
    stats.add(3, 2.0, _logits([1, 1]), torch.tensor([1, 0]))  # 1 of 2
    stats.add(3, 0.5, _logits([4, 4, 4, 4]), torch.tensor([[0.0, 0, 0, 0.3, 0.7]] * 4))  # mixed targets: label 4
    cols = stats.columns(DistEnv())
    assert list(cols) == per_k_columns([2, 3, 4]) == ['train_loss_k2', 'train_top1_k2', 'train_loss_k3',
                                                      'train_top1_k3', 'train_loss_k4', 'train_top1_k4']
    assert cols['train_loss_k2'] == pytest.approx(1.0) and cols['train_top1_k2'] == pytest.approx(75.0)
    assert cols['train_loss_k3'] == pytest.approx((2.0 * 2 + 0.5 * 4) / 6)
    assert cols['train_top1_k3'] == pytest.approx(100 * 5 / 6)
    assert cols['train_loss_k4'] is None and cols['train_top1_k4'] is None  # never drawn
    resumed = PerKTrainingStats([2, 3, 4])
    resumed.load_state_dict(stats.state_dict())
    assert resumed.columns(DistEnv()) == cols
    resumed.load_state_dict(None)  # a checkpoint written before these columns existed
    assert resumed.columns(DistEnv())['train_loss_k2'] is None


@pytest.mark.slow
@needs_fmnist
def test_summary_has_every_k_loss_and_accuracy_and_the_plot(tmp_path, one_thread):
    cfg = load_train_config(None, dataset='fashion-mnist', data_dir=str(FMNIST), max_train_samples=256,
                            max_val_samples=64, batch_size=32, heads=[2, 3, 4], lr=3e-3, warmup_epochs=0,
                            val_interval=2, log_interval=1000, output=str(tmp_path), report=False, sampler='all',
                            experiment='run', epochs=2)
    train(cfg)
    with open(tmp_path / 'run' / 'summary.csv', newline='') as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert header[:8] == ['epoch', 'train_loss', *per_k_columns([2, 3, 4])] and header[8] == 'lr'
    for row in rows:
        losses = [float(row[f'train_loss_k{k}']) for k in (2, 3, 4)]
        # every k trains on every (full) batch: the step loss is the mean over k, so the epoch loss is too
        assert sum(losses) / 3 == pytest.approx(float(row['train_loss']), rel=1e-6)
        assert all(0.0 <= float(row[f'train_top1_k{k}']) <= 100.0 for k in (2, 3, 4))
    assert float(rows[1]['train_loss_k4']) < float(rows[0]['train_loss_k4'])
    assert (tmp_path / 'run' / TRAIN_CURVES_FILE).stat().st_size > 0
