"""The trainer on real Fashion-MNIST subsets: learning, resume after SIGKILL, DDP, init, separate heads, errors."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from hydravit.cli import main as cli_main
from hydravit.models.factory import create_model
from hydravit.models.subnet import extract_subnet
from hydravit.storage.checkpoint import load_model, read_metadata, save_model
from hydravit.storage.run_folder import STATE_FILE
from hydravit.training.config import effective_lr
from hydravit.training.model_setup import build_model
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

from helpers import FMNIST, needs_fmnist

pytestmark = pytest.mark.usefixtures('one_thread')

# a small, fast run of the real model on real data; each test adds what it checks
QUICK = ['--dataset', 'fashion-mnist', '--data-dir', str(FMNIST), '--max-train-samples', '256',
         '--max-val-samples', '128', '-b', '32', '--heads', '2', '3', '4', '--lr', '3e-3', '--warmup-epochs', '0',
         '--val-interval', '1', '--log-interval', '1000', '--no-report',
         '--sampler', 'uniform']


def quick_config(tmp_path: Path, **overrides):
    base = dict(dataset='fashion-mnist', data_dir=str(FMNIST), max_train_samples=256, max_val_samples=128,
                batch_size=32, heads=[2, 3, 4], lr=3e-3, warmup_epochs=0, val_interval=1, log_interval=1000,
                output=str(tmp_path), report=False, sampler='uniform',
                experiment='run', nproc_per_node=1)  # the steps these tests count are one process's
    return load_train_config(None, **{**base, **overrides})


def run_cli(*args: str, env_extra=None, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    # the policy set already: the command starts once, without its passive-OpenMP restart
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'PASSIVE', **(env_extra or {})}
    return subprocess.Popen([sys.executable, '-m', 'hydravit', 'train', *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_csv(path: Path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ sampling
def test_every_rank_draws_the_same_k_unless_asked_otherwise():
    from hydravit.training.samplers import SAMPLERS, create_sampler

    ks = list(range(3, 13))
    for name in SAMPLERS:
        sampler = create_sampler(name, ks, seed=7, weights=[1.0] * len(ks) if name == 'weighted' else None)
        for step in range(50):
            per_rank = [tuple(sampler.ks_for_step(1, step, rank)) for rank in range(4)]
            assert len(set(per_rank)) == 1, (name, step, per_rank)
            assert set(per_rank[0]) <= set(ks)
    independent = create_sampler('uniform', ks, seed=7, per_rank=True)
    draws = [[tuple(independent.ks_for_step(0, s, r)) for r in range(4)] for s in range(50)]
    assert any(len(set(d)) > 1 for d in draws)


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
@needs_fmnist
def test_loss_decreases_and_run_folder_has_timm_layout(tmp_path):
    cfg = quick_config(tmp_path, epochs=3, model_ema=True, model_ema_decay=0.9, max_train_samples=2048,
                       heads=[2, 4], report=True)
    result = train(cfg)
    out = tmp_path / 'run'
    losses = [row['train_loss'] for row in result.summary]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses
    assert result.results[-1]['top1'] > 25.0  # 10 classes: chance is 10 % (192 steps of a ViT: early days)
    summary = read_csv(out / 'summary.csv')
    assert len(summary) == 3
    for column in ('train_loss', 'lr', 'eval_top1_k2', 'eval_top5_k4', 'eval_loss_k2', 'eval_top1_mean',
                   'ema_eval_top1_k2', 'ema_eval_top1_mean'):
        assert column in summary[0], column
    results = read_csv(out / 'results.csv')
    assert [int(r['k']) for r in results] == [2, 4]
    assert {'embed_dim', 'param_count', 'gmacs', 'top1', 'top5', 'loss', 'ema_top1'} <= set(results[0])
    assert float(results[0]['gmacs']) < float(results[1]['gmacs'])
    for name in ('args.yaml', 'last.safetensors', 'last_ema.safetensors', STATE_FILE, 'model_best.safetensors',
                 'accuracy_vs_gmacs.png'):
        assert (out / name).is_file(), name
    assert not list(out.glob('*.prev.*')), 'superseded weights are removed once the new state is written'
    for name in ('report.md', 'accuracy_vs_gmacs.png', 'accuracy_vs_throughput.png'):
        assert (out / 'report' / name).stat().st_size > 0, name
    report_rows = read_csv(out / 'report' / 'report.csv')
    assert sorted(int(r['k']) for r in report_rows if r['method'] == 'HydraViT') == [2, 4]
    assert all(float(r['infer_samples_per_sec']) > 0 for r in report_rows)
    assert load_train_config(out / 'args.yaml').heads == [2, 4]
    best = max(float(r['ema_eval_top1_mean']) for r in summary)  # with EMA, model_best tracks the EMA
    assert result.best_metric == pytest.approx(best, abs=1e-4)
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state['epoch'] == 3 and state['step'] == 0 and state['num_updates'] == 3 * 64


# ------------------------------------------------------------------------------------------ resume
def _wait_for_mid_epoch_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f'training ended before it could be killed:\n{proc.stdout.read()}')
        try:
            state = torch.load(run / STATE_FILE, weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.01)
            continue
        if state['epoch'] == 1 and state['step'] > 0:
            return state
        time.sleep(0.01)
    pytest.fail('no mid-epoch checkpoint in time')


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize('method', [[], ['--method', 'dynabert', '--teacher-epochs', '1']],
                         ids=['hydravit', 'dynabert'])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, method):
    """DynaBERT is killed after its reordering: the resumed run must reload the same teacher.

    Two local processes: killing the launcher takes both down, and the epoch's running loss, saved as the sum over
    both, comes back once (tests/test_crash_safety.py kills single-process runs)."""
    args = [*QUICK, *method, '--epochs', '2', '--checkpoint-interval-steps', '1', '--model-ema', '--model-ema-decay',
            '0.9', '--output', str(tmp_path), '--nproc-per-node', '2']
    full = run_cli(*args, '--experiment', 'full')
    killed = run_cli(*args, '--experiment', 'killed')
    state = _wait_for_mid_epoch_checkpoint(killed, tmp_path / 'killed')
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / 'killed' / 'results.csv').exists()
    assert 0 < state['step'] < 8
    resumed = run_cli('--resume', str(tmp_path / 'killed'))
    out_resumed, out_full = resumed.communicate(timeout=120)[0], full.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    assert 'resumed' in out_resumed
    assert 'reordered heads' not in out_resumed  # the reordering happened before the kill, once
    assert (tmp_path / 'killed' / 'teacher.safetensors').is_file() == bool(method)
    for weights in ('last.safetensors', 'last_ema.safetensors'):  # the EMA is restored too
        a, b = load_file(tmp_path / 'full' / weights), load_file(tmp_path / 'killed' / weights)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f'{weights}: {name}')
    full_summary = read_csv(tmp_path / 'full' / 'summary.csv')
    resumed_summary = read_csv(tmp_path / 'killed' / 'summary.csv')
    assert len(resumed_summary) == 2
    for row_a, row_b in zip(full_summary, resumed_summary, strict=True):
        assert float(row_a['eval_top1_k4']) == pytest.approx(float(row_b['eval_top1_k4']), abs=1e-6)
        assert float(row_a['train_loss']) == pytest.approx(float(row_b['train_loss']), abs=1e-5)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize('method', [[], ['--method', 'dynabert', '--teacher-epochs', '0']],
                         ids=['hydravit', 'dynabert'])
def test_two_process_gloo_run_keeps_replicas_identical(tmp_path, method):
    """DynaBERT: both processes must apply the same importance permutation (scores summed across them)."""
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
         '-m', 'hydravit', 'train', *QUICK, *method, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'ddp',
         '--grad-accum-steps', '2'],
        env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'weights identical on all 2 processes' in proc.stdout, proc.stdout
    assert ('reordered heads' in proc.stdout) == bool(method)
    assert 'world size 2' in proc.stdout
    run = tmp_path / 'ddp'
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert len(state['rng']) == 2  # one RNG stream per process, restored per rank on resume
    assert state['num_updates'] == 2  # 256 images / (2 processes x 32) = 4 batches, 2 per update
    assert not list(tmp_path.glob('ddp-*')), 'only rank 0 may create the run folder'
    # metrics are reduced over both processes' halves of the validation set: one process scoring all of it agrees
    from hydravit.evaluation.evaluate import evaluate_subnets
    from hydravit.training.loaders import build_datasets, run_data_config
    cfg = load_train_config(run / 'args.yaml')
    _, val_set = build_datasets(cfg, run_data_config(cfg))
    loader = torch.utils.data.DataLoader(val_set, batch_size=64)
    single = evaluate_subnets(load_model(run / 'last.safetensors'), loader, [2, 3, 4])
    reduced = read_csv(run / 'results.csv')
    assert [float(r['top1']) for r in reduced] == pytest.approx([r['top1'] for r in single], abs=1e-4)  # csv: 6 digits
    assert [float(r['loss']) for r in reduced] == pytest.approx([r['loss'] for r in single], rel=1e-4)


# ------------------------------------------------------------------------------------------ init
def test_initial_checkpoint_from_smaller_timm_vit(tmp_path):
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=24, depth=6,
                            num_heads=3, mlp_ratio=4.0).eval()
    path = tmp_path / 'deit_tiny_like.pth'
    torch.save(vit.state_dict(), path)
    model = build_model(load_train_config(None, initial_checkpoint=str(path)), num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x, k=3), vit(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, k=6)[:, :3], vit(x)[:, :3])


def test_initial_checkpoint_from_hydravit_checkpoint(tmp_path, randomize):
    source = randomize(create_model('hydravit_fmnist_patch7_28'))
    path = save_model(tmp_path / 'source.safetensors', source)
    model = build_model(load_train_config(None, initial_checkpoint=str(path)), num_classes=10)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ------------------------------------------------------------------------------------------ separate heads
@needs_fmnist
def test_separate_heads_round_trip_train_save_load_extract(tmp_path):
    result = train(quick_config(tmp_path, epochs=1, heads=[3, 6], separate_heads=True, max_train_samples=128))
    path = result.out_dir / 'last.safetensors'
    model = load_model(path).eval()
    assert model.config.separate_heads and set(model.heads.keys()) == {'3', '6'}
    assert [r['k'] for r in result.results] == [3, 6]
    assert len(json.loads(read_metadata(path)['class_names'])) == 10
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        for k in (3, 6):
            vit = extract_subnet(model, k)
            torch.testing.assert_close(vit(x), model(x, k=k), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.heads['3'].weight, model.heads['6'].weight[:, :24])


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize('args, message', [
    (['--model', 'hydravit_nope'], r"unknown model 'hydravit_nope'; HydraViT models: hydravit_base_patch16_224, "),
    (['--dataset', 'no-such-set'], r"unknown dataset 'no-such-set': choose one of fashion-mnist, imagefolder, "),
    (['--sampler', 'roulette'], r"unknown sampler 'roulette': choose one of uniform, weighted, sandwich, random, all"),
    (['--heads', '3', '13'], r'--heads \[3, 13\]: k_choices \[13\] outside 1\.\.12'),
    (['--heads', '3', '3'], r'--heads \[3, 3\] names \[3\] more than once'),
    (['--sampler', 'weighted', '--head-weights', '1', '2'], r'got 2 weights \[1\.0, 2\.0\] for 10 k choices '
                                                            r'\[3, 4, .*, 12\]: give one weight per k'),
    (['--data-dir', '/nonexistent/fmnist'], r'Fashion-MNIST folder /nonexistent/fmnist does not exist'),
    (['--num-classes', '7'], r'fashion-mnist has 10 classes, not num_classes=7'),
    (['--resume', '/nonexistent/run'], r'--resume: /nonexistent/run does not exist'),
    (['--heads', '3', '12', '--eval-metric', 'top1_k5'], r'--eval-metric top1_k5: k=5 is not evaluated; '
                                                         r'--eval-heads are \[3, 12\]'),
    (['--eval-metric', 'accuracy'], r"eval_metric must be 'top1_mean', 'top5_mean' or 'top1_k<N>'/'top5_k<N>', "
                                    r"got 'accuracy'"),
])
@needs_fmnist
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    base = ['train', '--dataset', 'fashion-mnist', '--data-dir', str(FMNIST), '--max-train-samples', '64',
            '--max-val-samples', '64', '--output', str(tmp_path), '--epochs', '1', '-b', '32']
    assert cli_main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert re.search('hydravit train: error: ' + message, err), err
    assert not list(tmp_path.rglob('*.safetensors'))


def test_unknown_recipe_key_names_the_valid_ones(tmp_path):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('model: hydravit_fmnist_patch7_28\nlearning_rate: 0.1\n')
    with pytest.raises(ValueError, match=r'learning_rate.*valid settings: .*\blr\b'):
        load_train_config(recipe)


def test_builtin_recipe_is_the_default_and_flags_override_it(tmp_path):
    from hydravit.cli import build_parser
    from hydravit.cli.train import config_from_args

    def parse(*argv):
        return config_from_args(build_parser().parse_args(['train', *argv]))

    default = parse()
    assert default == load_train_config()
    assert (default.model, default.dataset, default.opt, default.sched) == (
        'hydravit_fmnist_patch7_28', 'fashion-mnist', 'adamw', 'cosine')
    cfg = parse('-b', '64', '--no-model-ema', '--heads', '3', '12')
    assert (cfg.batch_size, cfg.model_ema, cfg.heads, cfg.lr) == (64, False, [3, 12], default.lr)
    scaled = parse('--lr-base', '1e-3', '-b', '256')  # --lr-base wins over the recipe's fixed lr
    assert scaled.lr is None and effective_lr(scaled) == pytest.approx(1e-3 * 256 / 512)
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('model: hydravit_test_patch4_16\nepochs: 2\n')
    assert (parse('-c', str(recipe)).model, parse('-c', str(recipe)).epochs) == ('hydravit_test_patch4_16', 2)


def test_head_weights_stay_with_their_k():
    cfg = load_train_config(None, heads=[12, 3, 6], head_weights=[0.5, 0.3, 0.2], sampler='weighted')
    assert (cfg.heads, cfg.head_weights) == ([3, 6, 12], [0.3, 0.2, 0.5])
    with pytest.raises(ValueError, match=r'--heads \[3, 3, 6\] names \[3\] more than once'):
        load_train_config(None, heads=[3, 3, 6])
    with pytest.raises(ValueError, match=r'--heads must be integers, got \[True\]'):
        load_train_config(None, heads=[True, 6])


def test_lr_base_scales_with_the_global_batch_like_timm():
    cfg = load_train_config(None, lr=None, lr_base=5e-4, batch_size=128, grad_accum_steps=2)
    assert effective_lr(cfg, world_size=2) == pytest.approx(5e-4 * 512 / 512)
    assert effective_lr(cfg, world_size=1) == pytest.approx(5e-4 * 256 / 512)
    assert effective_lr(load_train_config(None, lr=1e-3), world_size=8) == 1e-3


# ------------------------------------------------------------------------------------------ several k per step
class _Tensors(torch.utils.data.TensorDataset):
    num_classes = 10
    classes = [str(i) for i in range(10)]


@pytest.mark.parametrize('distill, start, weight, epoch, batch, soft_share, factors', [
    (False, 0.0, 1.0, 0, 0, 0.0, None),  # labels only
    (False, 0.0, 1.0, 0, 0, 0.0, [3.0, 0.5]),  # --loss-weights: k = 2 counts 3 times, k = 4 half
    (True, 0.0, 1.0, 0, 0, 1.0, None),  # the slimmable rule: soft labels only
    (True, 1.5, 0.5, 1, 0, 0.0, None),  # before --distill-start-epoch: labels only
    (True, 1.5, 0.5, 1, 1, 0.5, None),  # from it on (epoch 1, batch 1 of 2): half soft labels, half labels
])
def test_several_k_per_step_accumulate_gradients_into_one_optimizer_step(tmp_path, randomize, distill, start,
                                                                         weight, epoch, batch, soft_share, factors):
    from hydravit.training.distributed import DistEnv
    from hydravit.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    data = _Tensors(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    cfg = load_train_config(None, model='hydravit_test_patch4_16', heads=[2, 4], sampler='all', batch_size=8,
                            opt='momentum', momentum=0.0, weight_decay=0.0, lr=0.1, warmup_epochs=0, smoothing=0.0,
                            inplace_distill=distill, distill_start_epoch=start, distill_weight=weight,
                            loss_weights=factors, scale=None, ratio=None, output=str(tmp_path))
    trainer = Trainer(cfg, DistEnv(), datasets=(data, data))
    trainer.epoch = epoch
    randomize(trainer.model)
    model = trainer.model
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, target = data.tensors[0][:8], data.tensors[1][:8]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    teacher = torch.softmax(model(images, k=4).detach(), dim=-1)
    for k in (4, 2):
        model.zero_grad()
        logits = model(images, k=k)
        labels_loss = torch.nn.functional.cross_entropy(logits, target)
        soft_loss = torch.sum(-teacher * torch.log_softmax(logits, -1), -1).mean()
        loss = soft_share * soft_loss + (1 - soft_share) * labels_loss if k == 2 else labels_loss
        (loss * dict(zip([2, 4], factors or [1.0, 1.0], strict=True))[k]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad()
    ks, _ = trainer.train_update([(images, target)], start=batch)
    assert sorted(ks) == [2, 4]
    assert trainer.num_updates == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n] - 0.1 * expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_model_best_tracks_the_chosen_k(tmp_path):
    data = _Tensors(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                    torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2)))
    cfg = load_train_config(None, model='hydravit_test_patch4_16', heads=[2, 4], sampler='all', batch_size=8,
                            epochs=3, lr=0.05, warmup_epochs=0, eval_metric='top1_k2', val_interval=1,
                            output=str(tmp_path),
                            experiment='run', report=False, log_interval=1000)
    result = train(cfg, datasets=(data, data))
    per_epoch = [row['eval_top1_k2'] for row in result.summary]
    assert result.best_metric == max(per_epoch)
    assert result.best_epoch == per_epoch.index(max(per_epoch))
    best = load_model(tmp_path / 'run' / 'model_best.safetensors')
    assert int(read_metadata(tmp_path / 'run' / 'model_best.safetensors')['epochs_completed']) == result.best_epoch + 1
    assert best.k_choices == (2, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@needs_fmnist
def test_fp16_amp_on_gpu_trains(tmp_path):
    result = train(quick_config(tmp_path, epochs=2, device='cuda', amp=True, amp_dtype='float16', heads=[3, 12],
                                max_train_samples=1024))
    assert result.summary[-1]['train_loss'] < result.summary[0]['train_loss']
    state = torch.load(result.out_dir / STATE_FILE, weights_only=True)
    assert state['scaler']  # the fp16 GradScaler is saved for resume
