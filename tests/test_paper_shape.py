"""The whole path at the paper's shape: hydravit_base_patch16_224 (ViT-B/16, 224x224, 12 heads of 64) trained with
the paper recipe (--config hydravit-paper: EMA, mixup/cutmix, RandAugment, random erasing, drop-path 0.1) plus
gradient checkpointing on generated JPEGs for a few steps, killed and resumed, then evaluated at k = 3, 6, 12 and
exported. Few images and steps keep it to minutes on 2 CPU cores; the shapes are the real ones."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from hydravit.cli import main as cli_main
from hydravit.storage import load_model
from hydravit.storage.run_folder import STATE_FILE

CLASSES = ('cat', 'dog', 'fox')


def _jpegs(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for i, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            img = rng.integers(0, 60, (224, 224, 3), dtype=np.uint8)
            img[..., i] += 150  # a class colour, so the images are not pure noise
            Image.fromarray(img).save(root / c / f'{c}{j}.jpg', quality=90)


@pytest.mark.slow
def test_paper_recipe_at_base_shape_trains_resumes_evaluates_and_exports(tmp_path):
    data = tmp_path / 'data'
    _jpegs(data / 'train', per_class=8, seed=0)
    _jpegs(data / 'val', per_class=1, seed=1)
    run = tmp_path / 'runs' / 'paper'
    # one step per epoch (mixup needs an even batch); evaluation only after the last epoch, at k = 3 only (eval
    # below covers 3, 6, 12); no cooldown epochs
    train_args = ['--config', 'hydravit-paper', '--data-dir', str(data), '-b', '2', '--max-train-samples', '2',
                  '--epochs', '2', '--warmup-epochs', '1', '--cooldown-epochs', '0', '--val-interval', '2',
                  '--grad-checkpointing', '--eval-heads', '3', '--workers', '0', '--no-report',
                  '--output', str(run.parent), '--experiment', run.name, '--log-interval', '1']
    env = {**os.environ, 'OMP_NUM_THREADS': '2'}
    proc = subprocess.Popen([sys.executable, '-m', 'hydravit', 'train', *train_args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (run / STATE_FILE).is_file():  # written atomically at the end of epoch 0
        if proc.poll() is not None:
            pytest.fail(f'training ended before it could be killed:\n{proc.stdout.read()}')
        assert time.monotonic() < deadline, 'no checkpoint within 10 minutes'
        time.sleep(0.2)
    proc.kill()
    first_log = proc.communicate()[0]
    assert torch.load(run / STATE_FILE, weights_only=True)['epoch'] == 1, first_log
    settings = yaml.safe_load((run / 'args.yaml').read_text())
    expected = dict(model='hydravit_base_patch16_224', dataset='folder', opt='adamw', lr_base=5e-4, weight_decay=0.05,
                    drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, aa='rand-m9-mstd0.5-inc1', reprob=0.25,
                    color_jitter=0.3, model_ema=True, model_ema_decay=0.99996, min_lr=1e-5,
                    sampler='uniform', heads=list(range(3, 13)), grad_checkpointing=True, cooldown_epochs=0)
    assert {k: settings[k] for k in expected} == expected

    assert cli_main(['train', '--resume', str(run)]) == 0
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert (state['epoch'], state['num_updates']) == (2, 2)
    for name in ('last_ema.safetensors', 'model_best_ema.safetensors', 'results.csv'):
        assert (run / name).is_file(), name
    universal = load_model(run / 'model_best_ema.safetensors').eval()
    assert (universal.config.embed_dim, universal.config.depth, universal.config.img_size,
            universal.num_classes) == (768, 12, 224, 3)
    assert universal.grad_checkpointing is False  # a training-time setting, not stored with the weights

    results = tmp_path / 'eval.csv'
    assert cli_main(['eval', '--checkpoint', str(run), '--use-ema', '--k', '3', '6', '12', '-j', '0', '-b', '3',
                     '--results-file', str(results)]) == 0
    rows = results.read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['3', '6', '12']
    assert all('last_ema.safetensors' in r or 'model_best_ema.safetensors' in r for r in rows[1:])

    exported = tmp_path / 'exported'
    assert cli_main(['export', '--checkpoint', str(run), '--use-ema', '--k', '3', '--format', 'timm',
                     '--output', str(exported)]) == 0
    deit_ti = timm.create_model(f'local-dir:{exported / "k3"}', pretrained=True).eval()
    assert (deit_ti.embed_dim, len(deit_ti.blocks), deit_ti.num_classes) == (192, 12, 3)  # DeiT-Ti's shape
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(deit_ti(x), universal(x, k=3), atol=1e-4)
