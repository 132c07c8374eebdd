"""Every method in the one trainer (--method), DynaBERT's two phases, and the comparison report."""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
import torch

from hydravit.cli import main
from hydravit.evaluation.robustness import CorruptionSuite
from hydravit.models.separate import SeparateViTs
from hydravit.models.subnet import extract_subnet
from hydravit.storage.checkpoint import load_model
from hydravit.storage.results import read_results
from hydravit.training.compare import compare_methods, gaps_at_equal_cost, gaps_at_equal_k, method_config
from hydravit.training.distributed import DistEnv
from hydravit.training.methods import METHODS, CompareOptions, DynaBERT, default_methods
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import Trainer, train

from helpers import FMNIST, needs_fmnist, reference_cost

TEACHER_FILE = 'teacher.safetensors'

pytestmark = pytest.mark.usefixtures('one_thread')


def quick(tmp_path: Path, **overrides):
    base = dict(dataset='fashion-mnist', data_dir=str(FMNIST), max_train_samples=256, max_val_samples=128,
                batch_size=32, heads=[2, 4], lr=3e-3, warmup_epochs=0, epochs=1, log_interval=1000,
                output=str(tmp_path), report=False, sampler='sandwich', num_random=0, nproc_per_node=1)
    return load_train_config(None, **{**base, **overrides})


class _Tensors(torch.utils.data.TensorDataset):
    num_classes = 10
    classes = [str(i) for i in range(10)]


def _tensor_data(n: int = 32) -> _Tensors:
    g = torch.Generator().manual_seed(0)
    return _Tensors(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


# ------------------------------------------------------------------------------------------ settings
def test_a_method_brings_its_update_scheme_and_rejects_what_it_cannot_honour():
    assert load_train_config(None, method='sortednet').sampler == 'random'
    assert load_train_config(None, method='separate').sampler == 'all'
    assert load_train_config(None, method='matformer').sampler == load_train_config(None).sampler  # the recipe's
    for overrides, message in [
        (dict(method='sortednet', sampler='sandwich'), r'--method sortednet trains with --sampler random.*'
                                                       r'got --sampler sandwich'),
        (dict(method='separate', sampler='uniform'), r'--method separate trains with --sampler all.*'
                                                     r'got --sampler uniform'),
        (dict(method='separate', clip_grad=1.0), r"--clip-grad .* would couple the separate ViTs' updates"),
        (dict(method='separate', separate_heads=True), r'--separate-heads is not available with --method separate'),
        (dict(method='dynabert', inplace_distill=True), r'--inplace-distill is not available with --method dynabert'),
        (dict(method='dynabert', teacher_epochs=5, epochs=5), r'--teacher-epochs must be in 0\.\.4 .*got 5'),
        (dict(method='hydravit', teacher_epochs=1), r'--teacher-epochs is a --method dynabert setting, not hydravit'),
        (dict(method='dynabert', full_width_epochs=1), r'--full-width-epochs is not available with --method dynabert'
                                                       r': its full-width phase is --teacher-epochs'),
        (dict(method='separate', full_width_epochs=1), r'--full-width-epochs is not available with --method separate'),
        (dict(full_width_epochs=5, epochs=5), r'full_width_epochs must be in 0\.\.4 .*got 5'),
        (dict(full_width_epochs=-1), r'full_width_epochs must be >= 0, got -1'),
        (dict(inplace_distill=True, distill_weight=0.0), r'distill_weight must be in \(0, 1\] .*got 0\.0'),
        (dict(inplace_distill=True, distill_weight=1.5), r'distill_weight must be in \(0, 1\] .*got 1\.5'),
        (dict(inplace_distill=True, distill_start_epoch=5, epochs=5), r'distill_start_epoch must be in \[0, 5\)'),
        (dict(distill_weight=0.5), r'--distill-start-epoch and --distill-weight .* need --inplace-distill'),
        (dict(heads=[3, 6], loss_weights=[1.0]), r'--loss-weights has 1 weights for 2 --heads \[3, 6\]'),
        (dict(heads=[3, 6], loss_weights=[1.0, 0.0]), r'--loss-weights must be finite and > 0, got \[1\.0, 0\.0\]'),
        (dict(method='slimmable'), r"unknown method 'slimmable': choose one of hydravit, sortednet, matformer, "
                                   r'dynabert, separate'),
    ]:
        with pytest.raises(ValueError, match=message):
            load_train_config(None, **overrides)
    assert DynaBERT.teacher_epochs(load_train_config(None, method='dynabert', epochs=8)) == 2
    assert DynaBERT.teacher_epochs(load_train_config(None, method='dynabert', initial_checkpoint='x.pth')) == 0


def test_sortednet_in_a_comparison_draws_as_many_subnets_per_step_as_the_recipe(tmp_path):
    base = load_train_config(None, sampler='sandwich', num_random=2, heads=[3, 6, 9, 12])
    cfg = method_config(base, 'sortednet', tmp_path, CompareOptions(base.heads))
    assert (cfg.sampler, cfg.num_random, cfg.method) == ('random', 4, 'sortednet')
    assert method_config(base, 'separate', tmp_path, CompareOptions(base.heads)).sampler == 'all'
    assert method_config(base, 'matformer', tmp_path, CompareOptions(base.heads)).sampler == 'sandwich'
    assert method_config(base, 'hydravit', tmp_path, CompareOptions(base.heads)).output == str(tmp_path)


def test_a_comparison_keeps_the_recipes_distillation_and_middle_weights_where_a_method_can_use_them(tmp_path):
    base = load_train_config(None, sampler='sandwich', heads=[12, 3, 6, 9], head_weights=[1, 1, 2, 3],
                             loss_weights=[4, 1, 2, 3],
                             inplace_distill=True, distill_start_epoch=1.0, distill_weight=0.5)
    configs = {name: method_config(base, name, tmp_path, CompareOptions(base.heads))
               for name in ('hydravit', 'sortednet', 'matformer', 'dynabert', 'separate')}
    for name in ('hydravit', 'sortednet', 'matformer'):
        assert (configs[name].distill_start_epoch, configs[name].distill_weight) == (1.0, 0.5), name
    for name in ('dynabert', 'separate'):  # they refuse in-place distillation: its settings go with it
        cfg = configs[name]
        assert (cfg.inplace_distill, cfg.distill_start_epoch, cfg.distill_weight) == (False, 0.0, 1.0), name
    assert configs['hydravit'].head_weights == configs['matformer'].head_weights == [1, 2, 3, 1]
    assert configs['sortednet'].head_weights is None  # its random draws take no weights
    assert configs['hydravit'].heads == [3, 6, 9, 12]  # sorted, each weight kept with its k
    assert configs['sortednet'].loss_weights == configs['separate'].loss_weights == [1, 2, 3, 4]


def test_a_comparison_gives_the_full_width_phase_to_every_method_that_can_take_it(tmp_path):
    base = load_train_config(None, full_width_epochs=2, heads=[3, 6, 9, 12])
    phase = {name: method_config(base, name, tmp_path, CompareOptions(base.heads)).full_width_epochs
             for name in ('hydravit', 'sortednet', 'matformer', 'dynabert', 'separate')}
    assert phase == dict(hydravit=2, sortednet=2, matformer=2, dynabert=0, separate=0)
    assert method_config(base, 'dynabert', tmp_path, CompareOptions(base.heads)).teacher_epochs == 2  # its own phase
    given = CompareOptions(base.heads, teacher_epochs=1)
    assert method_config(base, 'dynabert', tmp_path, given).teacher_epochs == 1


def test_the_full_width_phase_trains_only_the_largest_k_then_hands_over_to_the_sampler(tmp_path):
    data = _tensor_data()
    cfg = load_train_config(None, model='hydravit_test_patch4_16', full_width_epochs=2, epochs=3, heads=[1, 2, 3, 4],
                            sampler='sandwich', num_random=1, batch_size=8, output=str(tmp_path), experiment='run')
    trainer = Trainer(cfg, DistEnv(), datasets=(data, data))
    drawn = {}
    for epoch in range(3):
        trainer.epoch = epoch
        drawn[epoch] = [trainer.method.ks_for_step(trainer, step) for step in range(20)]
    assert drawn[0] == drawn[1] == [[4]] * 20
    assert all(ks[0] == 4 and ks[-1] == 1 and len(ks) == 3 for ks in drawn[2])  # the sandwich rule from epoch 2
    assert drawn[2] == [trainer.sampler.ks_for_step(2, step) for step in range(20)]


# ------------------------------------------------------------------------------------------ training
@needs_fmnist
@pytest.mark.parametrize('method', METHODS)
def test_every_method_trains_and_its_checkpoint_extracts_exactly(tmp_path, method):
    scheme = dict(sampler='random', num_random=2) if method == 'sortednet' else \
        dict(sampler='all') if method == 'separate' else \
        dict(teacher_epochs=0) if method == 'dynabert' else {}  # one epoch: no room for a teacher phase
    ks = [3, 6] if method == 'width' else [2, 4]  # 16-channel heads over 12: width has k in 3, 6, 9, 12 only
    # two DDP processes: every method's steps must keep the replicas identical (checked at each epoch's end)
    result = train(quick(tmp_path, method=method, heads=ks, nproc_per_node=2, batch_size=16, **scheme))
    model = load_model(result.out_dir / 'last.safetensors').eval()
    assert model.config.nesting == METHODS[method].nesting
    assert isinstance(model, SeparateViTs) == (method == 'separate')
    assert [r['k'] for r in result.results] == ks
    for row in result.results:  # each method's own widths, counted on an equivalent timm ViT
        params, macs = reference_cost(model.config, row['k'])
        assert row['param_count'] * 1e6 == pytest.approx(params) and row['gmacs'] * 1e9 == pytest.approx(macs), row
    loss = result.summary[-1]['train_loss']
    assert 0 < loss < 10 and torch.isfinite(torch.tensor(loss))  # 10 classes: cross-entropy starts near 2.3
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for k in ks:
            torch.testing.assert_close(extract_subnet(model, k)(x), model(x, k=k), rtol=1e-5, atol=1e-5)
    assert (result.out_dir / TEACHER_FILE).is_file() == (method == 'dynabert')


def test_dynabert_trains_the_full_width_then_reorders_and_distils_every_k(tmp_path, randomize):
    data = _tensor_data()
    cfg = load_train_config(None, model='hydravit_test_patch4_16', method='dynabert', teacher_epochs=1, epochs=2,
                            heads=[2, 4], sampler='all', batch_size=8, opt='momentum', momentum=0.0,
                            weight_decay=0.0, lr=0.1, warmup_epochs=0, smoothing=0.0, importance_samples=16,
                            output=str(tmp_path), experiment='run')
    trainer = Trainer(cfg, DistEnv(), datasets=(data, data))
    randomize(trainer.model)
    model = trainer.model
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    # phase 1: the full width only
    assert trainer.method.ks_for_step(trainer, 0) == [4] and trainer.method.teacher is None
    x = data.tensors[0][:8]
    with torch.no_grad():
        before = model(x)
    trainer.epoch = 1
    trainer.method.on_epoch_start(trainer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # reordering keeps the function
        torch.testing.assert_close(trainer.method.teacher(x), before, rtol=1e-5, atol=1e-5)
    assert load_model(tmp_path / 'run' / TEACHER_FILE).config.nesting == 'dynabert'
    assert not any(p.requires_grad for p in trainer.method.teacher.parameters())
    # phase 2: every k of the step learns from the frozen teacher's soft labels, gradients summed
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, target = x, data.tensors[1][:8]
    soft = torch.softmax(trainer.method.teacher(images), dim=-1).detach()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for k in (4, 2):
        model.zero_grad()
        torch.sum(-soft * torch.log_softmax(model(images, k=k), -1), -1).mean().backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad()
    ks, _ = trainer.train_update([(images, target)], start=0)
    assert ks == [4, 2]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n] - 0.1 * expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_its_folder(tmp_path):
    base = load_train_config(None)
    (tmp_path / 'hydravit').mkdir()
    (tmp_path / 'hydravit' / 'args.yaml').write_text('model: x\n')  # killed before epoch 0 ended
    cfg = method_config(base, 'hydravit', tmp_path, CompareOptions([3, 12]))
    assert (cfg.resume, cfg.experiment) == (None, 'hydravit') and not (tmp_path / 'hydravit').exists()
    (tmp_path / 'matformer').mkdir()
    (tmp_path / 'matformer' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match=r"matformer holds \['notes.txt'\] but no checkpoint .* to resume from"):
        method_config(base, 'matformer', tmp_path, CompareOptions([3, 12]))
    assert (tmp_path / 'matformer' / 'notes.txt').read_text() == 'mine'


# ------------------------------------------------------------------------------------------ comparison
def test_gaps_at_equal_cost_interpolate_the_reference_and_never_extrapolate():
    hydra = [dict(k=1, gmacs=1.0, top1=60.0), dict(k=2, gmacs=3.0, top1=70.0), dict(k=3, gmacs=5.0, top1=74.0)]
    other = [dict(k=1, gmacs=0.5, top1=50.0), dict(k=2, gmacs=2.0, top1=64.0), dict(k=3, gmacs=4.0, top1=73.0),
             dict(k=4, gmacs=6.0, top1=75.0)]
    gaps = gaps_at_equal_cost(hydra, other)
    assert [g['k'] for g in gaps] == [2, 3]  # 0.5 and 6.0 GMACs lie outside the reference's range
    assert gaps[0]['reference_top1'] == pytest.approx(65.0) and gaps[0]['gap'] == pytest.approx(1.0)
    assert gaps[1]['reference_top1'] == pytest.approx(72.0) and gaps[1]['gap'] == pytest.approx(-1.0)
    same_k = gaps_at_equal_k([dict(k=1, top1=62.0), dict(k=3, top1=73.5)], hydra)
    assert [(g['k'], g['gap']) for g in same_k] == [(1, pytest.approx(2.0)), (3, pytest.approx(-0.5))]


@pytest.mark.slow
@needs_fmnist
def test_compare_trains_every_method_alike_and_reports_them_on_one_plot(tmp_path, caplog):
    base = quick(tmp_path, max_train_samples=128, max_val_samples=64, heads=[2, 12])
    out = tmp_path / 'compare'
    runs = compare_methods(base, None, out, bench_batch_size=8, bench_seconds=0.01, teacher_epochs=0)
    assert set(runs) == set(default_methods()) == set(METHODS) - {'heads', 'width'}  # ablations on request
    report = out / 'report'
    for name in ('report.md', 'report.csv', 'accuracy_vs_gmacs.png', 'accuracy_vs_throughput.png'):
        assert (report / name).stat().st_size > 0, name
    with open(report / 'report.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    labels = {METHODS[m].label for m in default_methods()}
    assert {r['method'] for r in rows} == labels and len(rows) == 2 * len(labels)
    assert all(float(r['infer_samples_per_sec']) > 0 for r in rows)
    gmacs = {(r['method'], int(r['k'])): float(r['gmacs']) for r in rows}
    assert gmacs[('MatFormer', 2)] > gmacs[('DynaBERT', 2)] > gmacs[('HydraViT', 2)]
    assert gmacs[('HydraViT', 2)] == gmacs[('SortedNet', 2)] == gmacs[('Separate ViTs', 2)]
    text = (report / 'report.md').read_text()
    for heading in ('Separate ViTs minus each run', 'HydraViT minus SortedNet', 'HydraViT minus DynaBERT',
                    'HydraViT minus MatFormer'):
        assert heading in text, heading
    # run again: finished methods are reused, not retrained
    stamp = (out / 'separate' / 'last.safetensors').stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger='hydravit')
    compare_methods(base, ['separate'], out, benchmark=False)
    assert any('finished earlier' in m for m in caplog.messages)
    assert (out / 'separate' / 'last.safetensors').stat().st_mtime_ns == stamp


@needs_fmnist
def test_compare_scores_every_method_on_the_same_corrupted_sets_and_reuses_the_scores(tmp_path, caplog):
    base = quick(tmp_path, max_train_samples=128, max_val_samples=64)
    out = tmp_path / 'compare'
    suite = CorruptionSuite(('gaussian_noise', 'contrast'), (1,), seed=3, max_samples=32)
    compare_methods(base, ['hydravit', 'separate'], out, benchmark=False, corruptions=suite)
    scores = {m: read_results(out / m / 'robustness.csv') for m in ('hydravit', 'separate')}
    for rows in scores.values():
        assert sorted((r['k'], r['corruption']) for r in rows) == [
            (k, c) for k in (2, 4) for c in ('contrast', 'gaussian_noise', 'none')]
        assert {r['num_samples'] for r in rows} == {32} and {r['corruption_seed'] for r in rows} == {3}
        clean = {r['k']: r['top1'] for r in rows if r['corruption'] == 'none'}
        assert all(r['drop'] == pytest.approx(clean[r['k']] - r['top1'], abs=1e-4) for r in rows)
    text = (out / 'report' / 'report.md').read_text()
    section = text[text.index('## Robustness per k'):]
    assert '2 corruption(s) (gaussian_noise, contrast) at severities [1], corruption seed 3, 32 test images' in section
    assert '| HydraViT | 2 |' in section and '| Separate ViTs | 4 |' in section
    assert (out / 'report' / 'corrupted_accuracy_vs_gmacs.png').stat().st_size > 0
    stamp = (out / 'hydravit' / 'robustness.csv').stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger='hydravit')
    compare_methods(base, ['hydravit'], out, benchmark=False, corruptions=suite)
    assert any('robustness scored earlier' in m for m in caplog.messages)
    assert (out / 'hydravit' / 'robustness.csv').stat().st_mtime_ns == stamp
    saved = out / 'separate' / 'robustness.csv'  # scores of other weights: scored again
    saved.write_text(saved.read_text().replace(scores['separate'][0]['checkpoint_sha256'], '0' * 64))
    compare_methods(base, ['separate'], out, benchmark=False, corruptions=suite)
    assert read_results(saved) == scores['separate']
    compare_methods(base, ['hydravit'], out, benchmark=False,
                    corruptions=CorruptionSuite(('contrast',), (1, 5), seed=3, max_samples=32))  # another suite
    assert sorted({(r['corruption'], r['severity']) for r in read_results(out / 'hydravit' / 'robustness.csv')}) == [
        ('contrast', 1), ('contrast', 5), ('none', 0)]


def test_compare_rejects_a_bad_corruption_before_training(tmp_path, capsys):
    for flags, message in ((['--corruptions', 'fog'], r"unknown corruption\(s\) \['fog'\]: choose from all, "),
                           (['--corruptions', 'all', '--severities', '0'], r'severities \[0\]: choose from \[1, 2')):
        assert main(['compare', '-o', str(tmp_path / 'cmp'), *flags]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / 'cmp').exists()
