"""Corrupted test sets: deterministic per seed, stronger with severity, scored per k by ``hydravit eval``."""
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import hydravit.cli.eval as eval_cli
from hydravit.cli import main
from hydravit.data.corruptions import CORRUPTIONS, CorruptedDataset, corrupt, parse_corruptions
from hydravit.evaluation.robustness import drop_table
from hydravit.storage.checkpoint import save_model
from hydravit.storage.results import read_results

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g)


@pytest.mark.parametrize('name', CORRUPTIONS)
def test_same_seed_same_image_and_severity_makes_it_worse(name):
    x = _images(1)[0]
    first = corrupt(x, name, 3, seed=5, index=2)
    assert torch.equal(first, corrupt(x, name, 3, seed=5, index=2))
    assert first.min() >= 0 and first.max() <= 1 and first.shape == x.shape
    distortion = [(corrupt(x, name, s, seed=5, index=2) - x).abs().mean().item() for s in (1, 5)]
    assert 0 < distortion[0] < distortion[1], distortion
    if 'noise' in name:  # random corruptions: another seed or another image index draws other noise
        assert not torch.equal(first, corrupt(x, name, 3, seed=6, index=2))
        assert not torch.equal(first, corrupt(x, name, 3, seed=5, index=3))


def test_corrupted_dataset_is_order_and_batch_independent_and_acts_on_pixels():
    pixels = _images()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    data = TensorDataset((pixels - mean) / std, torch.arange(6))
    noisy = CorruptedDataset(data, 'gaussian_noise', 2, mean=MEAN, std=STD, seed=1)
    reversed_items = [noisy[i][0] for i in reversed(range(6))][::-1]
    for batch_size in (1, 4):
        batched = torch.cat([b for b, _ in DataLoader(noisy, batch_size=batch_size)])
        assert torch.equal(batched, torch.stack(reversed_items))
    other_seed = CorruptedDataset(data, 'gaussian_noise', 2, mean=MEAN, std=STD, seed=2)
    assert not torch.equal(noisy[0][0], other_seed[0][0])
    bright = CorruptedDataset(data, 'brightness', 1, mean=MEAN, std=STD)[3][0] * std + mean  # back to pixels
    torch.testing.assert_close(bright, (pixels[3] + 0.1).clamp(0, 1), atol=1e-5, rtol=0)
    assert noisy[4][1] == 4


def test_bad_corruption_or_severity_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown corruption\(s\) \['fog'\]: choose from all, gaussian_noise"):
        parse_corruptions(['fog'])
    assert parse_corruptions(['all']) == list(CORRUPTIONS)
    with pytest.raises(ValueError, match=r'severity must be one of \[1, 2, 3, 4, 5\], got 6'):
        corrupt(torch.rand(1, 4, 4), 'contrast', 6)


class _Set(TensorDataset):
    num_classes = 10


def test_eval_scores_every_k_under_every_corruption_and_reports_the_drop(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model('hydravit_test_patch4_16', k_choices=(2, 4))
    path = save_model(tmp_path / 'm.safetensors', model)
    g = torch.Generator().manual_seed(3)
    data = _Set(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g))
    monkeypatch.setattr(eval_cli, 'build_eval_dataset', lambda model, args, names: data)
    out = tmp_path / 'robust.csv'
    args = ['eval', '--checkpoint', str(path), '--workers', '0', '--corruptions', 'gaussian_noise', 'contrast',
            '--severities', '1', '5', '--results-file', str(out), '--report', str(tmp_path / 'rep')]
    assert main(args) == 0
    rows = read_results(out)
    assert len(rows) == 2 * (1 + 2 * 2)  # k x (clean + corruptions x severities)
    clean = {r['k']: r['top1'] for r in rows if r['corruption'] == 'none'}
    for r in rows:
        assert r['drop'] == pytest.approx(clean[r['k']] - r['top1'], abs=1e-4)  # csv: 6 digits
    table = {r['k']: r for r in drop_table(rows)}
    noise = [r['drop'] for r in rows if r['corruption'] == 'gaussian_noise' and r['k'] == 4]
    assert table[4]['gaussian_noise'] == pytest.approx(sum(noise) / 2, abs=1e-4)
    assert 'Robustness per k' in (tmp_path / 'rep' / 'robustness.md').read_text()
    assert main(args) == 0 and read_results(out) == rows  # same seed: the same corrupted images and scores
    assert main([*args[:-4], '--severities', '7']) == 2
