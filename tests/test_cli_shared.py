"""What the subcommands share (threads and the OpenMP policy, old flag spellings, progress, errors before work),
the checks done before training, and ``hydravit predict``."""
from __future__ import annotations

import csv
import errno
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hydravit.cascade.policy import CascadePolicy, save_policy
from hydravit.cli import build_parser, main
from hydravit.cli.common import process_env, progress
from hydravit.evaluation.benchmark import MALLOC_ENV, benchmark_subnets
from hydravit.evaluation.report import plot_accuracy
from hydravit.models.factory import create_model
from hydravit.storage.checkpoint import load_model
from hydravit.storage.run_folder import RunFolder
from hydravit.training.compare import compare_methods
from hydravit.training.loaders import run_data_config
from hydravit.training.methods import DynaBERT, create_method
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

from helpers import FMNIST, needs_fmnist

CPU_HEAVY = ('train', 'eval', 'benchmark', 'compare', 'export', 'select', 'serve-demo', 'predict')


class _Tensors(torch.utils.data.TensorDataset):
    num_classes = 10
    classes = [f'class-{i}' for i in range(10)]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == 'command')
    return parser, action.choices


# ------------------------------------------------------------------------------------------ threads, OpenMP
def test_every_cpu_heavy_command_takes_threads_and_restarts_with_a_passive_openmp(monkeypatch):
    parser, commands = _subparsers()
    monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)
    for name in CPU_HEAVY:
        flags = {f for a in commands[name]._actions for f in a.option_strings}
        assert {'--threads', '--omp-active'} <= flags, name
    required = {'eval': ['--checkpoint', 'x'], 'export': ['--checkpoint', 'x', '--output', 'o'],
                'select': ['--model', 'hydravit_test_patch4_16', '--gmacs', '1'], 'predict': ['--checkpoint', 'x', 'f']}
    for name in CPU_HEAVY:
        args = parser.parse_args([name, *required.get(name, [])])
        assert process_env(args)['OMP_WAIT_POLICY'] == 'PASSIVE', name
        assert 'OMP_WAIT_POLICY' not in process_env(parser.parse_args([name, *required.get(name, []), '--omp-active']))
    assert process_env(parser.parse_args(['info'])) == {}  # nothing to restart for
    bench = process_env(parser.parse_args(['benchmark']))
    assert all(bench[k] == v for k, v in MALLOC_ENV.items())  # one restart for both
    assert not set(MALLOC_ENV) & set(process_env(parser.parse_args(['benchmark', '--system-malloc'])))
    monkeypatch.setenv('OMP_WAIT_POLICY', 'ACTIVE')  # the user's own choice wins
    assert 'OMP_WAIT_POLICY' not in process_env(parser.parse_args(['eval', '--checkpoint', 'x']))


@pytest.mark.parametrize('command', CPU_HEAVY)
@pytest.mark.parametrize('value', ['0', '-1', 'two'])
def test_bad_threads_is_a_usage_error_not_a_traceback(command, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, '--threads', value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--threads' in err and 'Traceback' not in err
    assert 'must be >= 1' in err or 'expected an integer >= 1' in err


@pytest.mark.slow
def test_the_program_restarts_itself_once_with_the_environment_it_needs(tmp_path):
    code = ('import os, sys; from hydravit.cli import common\n'
            "common.reexec_with_env({'OMP_WAIT_POLICY': 'PASSIVE'}, ['info', '--list'])\n"
            "print('not restarted', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in __import__('os').environ.items() if k != 'OMP_WAIT_POLICY'}
    restarted = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert 'hydravit_fmnist_patch7_28' in restarted.stdout and 'not restarted' not in restarted.stdout
    env['OMP_WAIT_POLICY'] = 'PASSIVE'
    kept = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert kept.stdout.strip() == 'not restarted PASSIVE'


def test_a_run_records_the_thread_count_it_used(tmp_path):
    data = _Tensors(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    before = torch.get_num_threads()
    try:
        cfg = load_train_config(None, model='hydravit_test_patch4_16', heads=[2, 4], sampler='all', batch_size=8,
                                epochs=1, warmup_epochs=0, output=str(tmp_path), experiment='run', report=False,
                                threads=1, nproc_per_node=1)  # this process's torch threads are checked
        train(cfg, datasets=(data, data))
        assert torch.get_num_threads() == 1
        assert RunFolder(tmp_path / 'run').args.read_text().count('threads: 1') == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match=r'threads must be an integer >= 1, got 0'):
        load_train_config(None, threads=0)


# ------------------------------------------------------------------------------------------ flags
def test_one_spelling_per_flag_and_old_spellings_warn(capsys):
    parser, _ = _subparsers()
    for argv, dest, value in [
        (['eval', '--checkpoint', 'x', '--max-samples', '5'], 'max_samples', 5),
        (['select', '--model', 'm', '--gmacs', '1', '--results', 'acc.csv'], 'results', 'acc.csv'),
        (['export', '--checkpoint', 'x', '--output', 'o', '--results', 'acc.csv'], 'results', 'acc.csv'),
        (['serve-demo', '--results', 'acc.csv'], 'results', 'acc.csv'),
    ]:
        with pytest.raises(SystemExit):  # parse only: the checkpoint does not exist, so stop at --help
            main([*argv, '--help'])
        capsys.readouterr()
        assert getattr(parser.parse_args(argv), dest) == value
    assert parser.parse_args(['eval', '--checkpoint', 'x', '--max-val-samples', '7']).max_samples == 7
    assert parser.parse_args(['select', '--model', 'm', '--gmacs', '1', '--results-file', 'a.csv']).results == 'a.csv'


def test_an_old_spelling_says_which_flag_replaces_it(capsys, tmp_path):
    assert main(['eval', '--checkpoint', str(tmp_path / 'none'), '--max-samples', '5']) == 2
    err = capsys.readouterr().err
    assert err.count('--max-samples is an old spelling of --max-val-samples') == 1
    assert 'does not exist' in err


# ------------------------------------------------------------------------------------------ errors before work
def test_yaml_errors_give_line_and_column(tmp_path, capsys):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('epochs: 2\nheads: [3, 6\nlr: 0.1\n')
    assert main(['train', '-c', str(recipe)]) == 2
    err = capsys.readouterr().err
    assert 'not valid YAML: line 3, column 3' in err and 'Traceback' not in err


def test_an_unwritable_output_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    for argv in (['train', '--output', str(blocker / 'runs')], ['compare', '-o', str(blocker / 'cmp')],
                 ['export', '--checkpoint', 'x', '--output', str(blocker / 'exp')]):
        assert main(argv) == 2, argv
        assert f'{blocker} is not a folder' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a-file']


def test_a_full_disk_is_one_error_line(tmp_path, capsys, monkeypatch):
    results = tmp_path / 'eval.csv'
    results.write_text('k,top1\n3,50.0\n')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'report' / 'report.csv'))

    monkeypatch.setattr('hydravit.cli.report.write_report', full)
    assert main(['report', str(results), '-o', str(tmp_path / 'report')]) == 2
    err = capsys.readouterr().err
    assert 'no space left on the device' in err and 'report.csv' in err and 'Traceback' not in err


def test_dynabert_teaches_for_at_least_one_epoch(caplog):
    with pytest.raises(ValueError, match=r'--method dynabert trains its full-width teacher for at least one epoch.*'
                                         r'--epochs >= 2 \(got 1\)'):
        load_train_config(None, method='dynabert', epochs=1)
    assert DynaBERT.teacher_epochs(load_train_config(None, method='dynabert', epochs=3)) == 1  # 3 // 4 was 0
    caplog.set_level(logging.WARNING, logger='hydravit')
    create_method(load_train_config(None, method='dynabert', epochs=1, teacher_epochs=0))
    assert any('distils from an untrained teacher' in m for m in caplog.messages)


def test_img_size_works_with_a_one_channel_model():
    cfg = load_train_config(None, img_size=42)
    assert tuple(run_data_config(cfg)['input_size']) == (1, 42, 42)
    from hydravit.data.transforms import build_transform

    image = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    assert build_transform(run_data_config(cfg), is_training=False)(image).shape == (1, 42, 42)


@needs_fmnist
def test_compare_checks_every_run_before_training_any(tmp_path):
    base = load_train_config(None, data_dir=str(FMNIST), max_train_samples=64, max_val_samples=32, epochs=2,
                             warmup_epochs=0, heads=[3, 6, 12], eval_heads=[12], output=str(tmp_path))
    with pytest.raises(ValueError, match=r'k=12 is not a valid subnetwork: allowed values are \[3, 6\]'):
        compare_methods(base, out_dir=tmp_path / 'cmp', separate_ks=[3, 6], benchmark=False)  # separate runs last
    assert not list(tmp_path.rglob('*.safetensors')) and not list(tmp_path.rglob('last.state.pth'))


# ------------------------------------------------------------------------------------------ progress, context
def test_progress_without_a_terminal_logs_periodic_lines(caplog):
    caplog.set_level(logging.INFO, logger='hydravit')
    assert list(progress(range(3), total=3, desc='eval', every_seconds=0.0)) == [0, 1, 2]
    assert [m.split(' (')[0] for m in caplog.messages] == ['eval: 1/3 done', 'eval: 2/3 done', 'eval: 3/3 done']


def test_benchmark_rows_carry_their_spread_and_every_k_is_timed_in_each_round(tmp_path):
    model = create_model('hydravit_test_patch4_16')
    rows = benchmark_subnets(model, [1, 4], modes=('sliced',), batch_size=4, rounds=3, min_seconds=0.002,
                             warmup=1, latency_iters=2, measure_memory=False, flop_count=False, interleave_ks=True)
    for r in rows:
        assert r['infer_rounds'] == 3 and r['threads'] == torch.get_num_threads()
        assert r['infer_samples_per_sec_min'] <= r['infer_samples_per_sec'] <= r['infer_samples_per_sec_max']
        spread = 100 * (r['infer_samples_per_sec_max'] - r['infer_samples_per_sec_min']) / r['infer_samples_per_sec']
        assert r['infer_spread_pct'] == pytest.approx(spread)
    series = {'m': [{**r, 'top1': 50.0 + r['k']} for r in rows]}
    path = plot_accuracy(series, 'infer_samples_per_sec', tmp_path / 'p.png')
    assert path.stat().st_size > 0


def test_benchmark_cli_marks_noisy_timings_and_states_its_context(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='hydravit')
    out = tmp_path / 'bench.csv'
    assert main(['benchmark', '--model', 'hydravit_test_patch4_16', '--modes', 'sliced', '-b', '2', '--rounds', '2',
                 '--min-seconds', '0.002', '--latency-iters', '2', '--no-memory', '--no-switching', '--threads', '1',
                 '--results-file', str(out)]) == 0
    with open(out, newline='') as f:
        rows = list(csv.DictReader(f))
    assert all(r['noisy'] == ('*' if float(r['infer_spread_pct']) > 10 else '') for r in rows)
    assert {r['threads'] for r in rows} == {'1'}


# ------------------------------------------------------------------------------------------ predict
@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('predict')
    g = torch.Generator().manual_seed(0)
    data = _Tensors(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    cfg = load_train_config(None, model='hydravit_test_patch4_16', heads=[2, 4], sampler='all', batch_size=8,
                            epochs=1, warmup_epochs=0, output=str(out), experiment='run', report=False)
    train(cfg, datasets=(data, data))
    return out / 'run'


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_gives_class_names_top5_and_the_k_used(tiny_checkpoint, tmp_path):
    paths = _images(tmp_path / 'imgs' / 'nested')
    out = tmp_path / 'pred.json'
    assert main(['predict', '--checkpoint', str(tiny_checkpoint), str(tmp_path / 'imgs'), '--k', '2',
                 '--results-file', str(out)]) == 0
    rows = json.loads(out.read_text())
    rows = rows['rows'] if isinstance(rows, dict) else rows
    assert [r['file'] for r in rows] == [str(p) for p in paths] and {r['k'] for r in rows} == {2}
    model = load_model(tiny_checkpoint / 'model_best.safetensors').eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for row, path in zip(rows, paths, strict=True):
        x = (torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
        with torch.no_grad():
            probs = torch.softmax(model(x[None], k=2), -1)[0]
        top = probs.topk(5)
        assert [row[f'class{i}'] for i in range(1, 6)] == [f'class-{int(i)}' for i in top.indices]
        assert [row[f'prob{i}'] for i in range(1, 6)] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize('threshold, exit_k', [(0.0, 2), (2.0, 4)])
def test_predict_with_a_cascade_reports_the_k_that_answered(tiny_checkpoint, tmp_path, threshold, exit_k):
    """Threshold 0: every image exits at the first stage; above 1: every image reaches the last; the rows
    then equal plain prediction at that k."""
    paths = _images(tmp_path / 'imgs')
    policy = save_policy(CascadePolicy(ks=(2, 4), thresholds=(threshold,)), tmp_path / 'policy.json')
    rows = {}
    for name, flags in [('cascade', ['--cascade', str(policy)]), ('static', ['--k', str(exit_k)])]:
        out = tmp_path / f'{name}.json'
        assert main(['predict', '--checkpoint', str(tiny_checkpoint), str(tmp_path / 'imgs'), *flags,
                     '--results-file', str(out)]) == 0
        data = json.loads(out.read_text())
        rows[name] = data['rows'] if isinstance(data, dict) else data
    assert [r['k'] for r in rows['cascade']] == [exit_k] * len(paths)
    for got, want in zip(rows['cascade'], rows['static'], strict=True):
        assert [got[f'class{i}'] for i in range(1, 6)] == [want[f'class{i}'] for i in range(1, 6)]
        assert [got[f'prob{i}'] for i in range(1, 6)] == pytest.approx([want[f'prob{i}'] for i in range(1, 6)],
                                                                       abs=1e-6)


def test_predict_defaults_to_the_largest_k_and_refuses_what_it_cannot_do(tiny_checkpoint, tmp_path, capsys):
    paths = _images(tmp_path / 'imgs', 1)
    out = tmp_path / 'pred.csv'
    assert main(['predict', '--checkpoint', str(tiny_checkpoint), str(paths[0]), '--results-file', str(out)]) == 0
    with open(out, newline='') as f:
        assert [r['k'] for r in csv.DictReader(f)] == ['4']
    capsys.readouterr()
    (tmp_path / 'notes.txt').write_text('not an image')
    for argv, message in [
        (['--cascade', str(tmp_path / 'none.json'), str(paths[0])], 'none.json does not exist'),
        (['--k', '9', str(paths[0])], 'outside 1..4'),
        ([str(tmp_path / 'missing.png')], 'missing.png does not exist'),
        ([str(tmp_path / 'notes.txt')], 'notes.txt: not a readable image'),
    ]:
        assert main(['predict', '--checkpoint', str(tiny_checkpoint), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, (argv, err)


class _Payload:
    """Stands for an object a hostile state file would make torch run when unpickled."""


@needs_fmnist
def test_a_refused_state_file_is_never_reported_with_advice_to_unpickle_it(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'epoch': 0, 'payload': _Payload()}, run / 'last.state.pth')
    assert main(['train', '--resume', str(run), '--data-dir', str(FMNIST), '--max-train-samples', '64',
                 '--max-val-samples', '32', '-b', '32', '--threads', '1']) == 2
    err = capsys.readouterr().err
    assert 'last.state.pth' in err and 'refused' in err, err
    assert 'weights_only' not in err and 'Traceback' not in err, err


def test_the_builtin_recipe_checkpoints_within_its_first_epoch():
    cfg = load_train_config(None)
    steps_per_epoch = 60000 // cfg.batch_size  # Fashion-MNIST's training set
    assert 0 < cfg.checkpoint_interval_steps < steps_per_epoch
