"""Training-step memory per sampler and method: which k a step trains, and peaks measured in fresh processes."""
import csv

import pytest
import torch

from hydravit.cli import main as cli_main
from hydravit.models.config import HydraViTConfig
from hydravit.training.memory import train_memory_cases, train_memory_table

SMALL = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, num_heads=4, head_dim=64, depth=2)


def test_each_sampler_is_measured_at_its_heaviest_step():
    cases = {c.label: c for c in train_memory_cases(HydraViTConfig(**SMALL, k_choices=(1, 2, 3, 4)), num_random=1)}
    assert cases['HydraViT, uniform'].ks == (4,)
    assert cases['HydraViT, all'].ks == (4, 3, 2, 1)
    assert cases['HydraViT, sandwich (n=1)'].ks[0] == 4 and cases['HydraViT, sandwich (n=1)'].ks[-1] == 1
    assert cases['HydraViT, random (n=1)'].ks == (4,)
    assert cases['SortedNet, random (n=1)'].nesting == 'hydravit'
    assert cases['one ViT of k=4'].vit and cases['separate ViTs k=1..4'].ks == (4, 3, 2, 1)
    with pytest.raises(ValueError, match='unknown sampler .*choose from'):
        train_memory_cases(HydraViTConfig(**SMALL), samplers=['greedy'])


@pytest.mark.slow
def test_separate_vits_hold_more_than_one_shared_model_and_the_cli_writes_the_table(tmp_path):
    cfg = HydraViTConfig(**SMALL)
    cases = [c for c in train_memory_cases(cfg, samplers=['all'], methods=[])]
    rows = {r['config']: r for r in train_memory_table(cfg, cases, batch_size=4)}
    one, shared, separate = (rows[n]['train_peak_mem_mb'] for n in ('one ViT of k=4', 'HydraViT, all',
                                                                     'separate ViTs k=1..4'))
    # weights + grads + two AdamW moments of 2 blocks of width 256 are ~24 MB; separate ViTs of widths 64..256
    # hold (1 + 4 + 9 + 16) / 16 = 1.9 times that, the shared model trains every k in the same tensors
    assert 15 < one < 80 and separate > 1.4 * one and shared < 1.25 * one, rows
    assert rows['HydraViT, all']['vs_one_vit'] == pytest.approx(shared / one)
    out = tmp_path / 'mem.csv'
    assert cli_main(['benchmark', '--model', 'hydravit_test_patch4_16', '--train-memory', '--train-batch-size', '2',
                     '--results-file', str(out)]) == 0
    with open(out, newline='') as f:
        table = list(csv.DictReader(f))
    assert {'HydraViT, uniform', 'HydraViT, all', 'Width only, sandwich (n=2)', 'one ViT of k=4'} <= \
        {r['config'] for r in table}
    assert all(float(r['train_peak_mem_mb']) > 0 for r in table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_peak_is_max_allocated():
    cfg = HydraViTConfig(**SMALL)
    cases = train_memory_cases(cfg, samplers=['uniform'], methods=[])
    rows = train_memory_table(cfg, cases, batch_size=8, device='cuda')
    assert all(r['train_peak_mem_mb'] > 0 and r['device'] == 'cuda' for r in rows)
