"""Nothing silently wrong: validation on the training classes, the non-finite guard, resume that honours the
run, provenance of results files, and clear errors for API misuse."""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hydravit.cli import main as cli_main
from hydravit.models.config import HydraViTConfig
from hydravit.models.factory import create_model
from hydravit.models.subnet import CheckpointMismatchError, init_from_vit, subnet_state_dict
from hydravit.storage.checkpoint import CONFIG_KEY, load_model, save_model
from hydravit.storage.run_folder import STATE_FILE
from hydravit.training.compare import compare_methods, method_config
from hydravit.training.methods import CompareOptions
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = 'hydravit_test_patch4_16'  # 3 x 16 x 16 input, 4 heads of 8, depth 2, 10 classes
CLASSES = ['ant', 'bee', 'cat', 'dog', 'eel', 'fox', 'gnu', 'hen', 'ibis', 'jay']


def image_folder(root: Path, classes, per_class: int = 3) -> Path:
    """root/<class>/<i>.png: 16x16 RGB images whose colour depends on the class (learnable, distinct)."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = ((CLASSES.index(name) * 25 + 7 * i) % 256, (CLASSES.index(name) * 60) % 256, 40 * i % 256)
            Image.new('RGB', (16, 16), colour).save(root / name / f'{i}.png')
    return root


def tiny_config(tmp_path: Path, data_dir: Path, **overrides):
    base = dict(model=TINY, dataset='imagefolder', data_dir=str(data_dir), batch_size=10, epochs=1, heads=[2, 4],
                lr=3e-3, warmup_epochs=0, val_interval=1, log_interval=1000, output=str(tmp_path), report=False,
                sampler='uniform', experiment='run', smoothing=0.0, hflip=0.0, no_aug=True,
                nproc_per_node=1)  # the steps these tests count are those of one process of 10 images
    return load_train_config(None, **{**base, **overrides})


def read_csv(path: Path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / 'data'
    image_folder(root / 'train', CLASSES)
    image_folder(root / 'val', CLASSES)
    return root


@pytest.fixture
def trained(tmp_path, data) -> Path:
    train(tiny_config(tmp_path, data, epochs=2))
    return tmp_path / 'run'


# ------------------------------------------------------------------------------------------ validation classes
def test_validation_subset_is_scored_on_the_training_classes_like_eval(tmp_path):
    data = tmp_path / 'data'
    image_folder(data / 'train', CLASSES)
    image_folder(data / 'val', ['bee', 'dog', 'jay'])  # a subset: folders must map to training labels 1, 3, 9
    result = train(tiny_config(tmp_path, data))
    out = tmp_path / 'eval.csv'
    assert cli_main(['eval', '--checkpoint', str(tmp_path / 'run' / 'last.safetensors'), '--dataset', 'imagefolder',
                     '--data-dir', str(data), '--results-file', str(out), '-j', '0']) == 0
    evaluated = {int(r['k']): r for r in read_csv(out)}
    assert all(int(r['num_classes_scored']) == 3 for r in evaluated.values())
    for row in result.results:
        assert row['top1'] == pytest.approx(float(evaluated[row['k']]['top1']), abs=1e-4), row['k']
        assert row['loss'] == pytest.approx(float(evaluated[row['k']]['loss']), rel=1e-4), row['k']


def test_validation_class_unknown_to_training_is_an_error_naming_it(tmp_path):
    data = tmp_path / 'data'
    image_folder(data / 'train', CLASSES[:4])
    image_folder(data / 'val', ['ant', 'bee', 'fox'])
    with pytest.raises(ValueError, match=r"\['fox'\].*not training classes.*ant"):
        train(tiny_config(tmp_path, data))


# ------------------------------------------------------------------------------------------ non-finite guard
def _all_finite(folder: Path) -> bool:
    from safetensors.torch import load_file
    return all(bool(torch.isfinite(t).all()) for p in folder.glob('*.safetensors') for t in load_file(p).values())


def test_diverging_run_stops_naming_step_and_k_and_writes_no_non_finite_weights(tmp_path, data):
    from hydravit.training.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError, match=r'non-finite (loss|gradient).*k=.*epoch 0 step \d+ \(update \d+\)'):
        train(tiny_config(tmp_path, data, lr=1e9, epochs=2))
    assert _all_finite(tmp_path / 'run')


def test_max_nonfinite_steps_skips_steps_within_the_budget(tmp_path, data, caplog):
    cfg = tiny_config(tmp_path, data, lr=1e9, epochs=2, max_nonfinite_steps=100)
    with caplog.at_level('WARNING'):
        train(cfg)
    state = torch.load(tmp_path / 'run' / STATE_FILE, weights_only=True)
    assert 0 < state['nonfinite_steps'] <= state['num_updates']
    assert 'skipping epoch' in caplog.text
    assert _all_finite(tmp_path / 'run')


def _nan_checkpoint(tmp_path: Path) -> Path:
    model = create_model(TINY)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    state['blocks.0.mlp.fc1.weight'][0, 0] = float('nan')
    path = tmp_path / 'nan.safetensors'
    save_file(state, str(path), metadata={CONFIG_KEY: json.dumps(model.config.to_dict()), 'format': 'pt'})
    return path


def test_non_finite_weights_are_never_written_over_finite_ones(tmp_path):
    from hydravit.storage.checkpoint import NonFiniteWeightsError

    model = create_model(TINY)
    path = save_model(tmp_path / 'model.safetensors', model)
    before = path.read_bytes()
    with torch.no_grad():
        model.head.weight[0, 0] = float('inf')
    with pytest.raises(NonFiniteWeightsError, match=r'head\.weight'):
        save_model(path, model)
    assert path.read_bytes() == before


def test_eval_and_export_refuse_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    from hydravit.storage.checkpoint import NonFiniteWeightsError

    path = _nan_checkpoint(tmp_path)
    with pytest.raises(NonFiniteWeightsError, match=r'blocks\.0\.mlp\.fc1\.weight'):
        load_model(path)
    assert cli_main(['eval', '--checkpoint', str(path), '--model', TINY]) == 2
    assert cli_main(['export', '--checkpoint', str(path), '--model', TINY, '--output', str(tmp_path / 'x')]) == 2
    err = capsys.readouterr().err
    assert err.count('non-finite weights') == 2, err
    assert not (tmp_path / 'x').exists() or not list((tmp_path / 'x').iterdir())


# ------------------------------------------------------------------------------------------ resume
def _resume(run: Path, *flags: str) -> int:
    return cli_main(['train', '--resume', str(run), *flags])


def test_resume_refuses_conflicting_flags_listing_each(trained, capsys):
    args_before = (trained / 'args.yaml').read_text()
    assert _resume(trained, '--epochs', '4', '--lr', '0.01', '--seed', '7', '-b', '5') == 2
    err = capsys.readouterr().err
    for difference in ('epochs: 2 -> 4', 'lr: 0.003 -> 0.01', 'seed: 42 -> 7', 'batch_size: 10 -> 5'):
        assert difference in err, (difference, err)
    assert '--resume-override' in err
    assert (trained / 'args.yaml').read_text() == args_before


@pytest.mark.parametrize('flags, named', [
    (['--model', 'hydravit_fmnist_patch7_28'], "model: 'hydravit_test_patch4_16' -> 'hydravit_fmnist_patch7_28'"),
    (['--heads', '2', '3'], 'heads: [2, 4] -> [2, 3]'),
    (['--method', 'sortednet'], "method: 'hydravit' -> 'sortednet'"),
], ids=['model', 'heads', 'method'])
def test_resume_cannot_change_the_model_heads_or_method(trained, capsys, flags, named):
    assert _resume(trained, *flags) == 2
    err = capsys.readouterr().err
    assert named in err and 'cannot change' in err, err
    assert 'Traceback' not in err


def test_resume_override_rebuilds_the_schedule_and_args_yaml_records_it(trained):
    assert _resume(trained, '--epochs', '3', '--resume-override', 'epochs') == 0
    state = torch.load(trained / STATE_FILE, weights_only=True)
    assert state['epoch'] == 3 and state['config']['epochs'] == 3
    updates_per_epoch = 3  # 30 images / batch 10
    assert state['scheduler']['t_initial'] == 3 * updates_per_epoch  # the schedule of 3 epochs, not the saved 2
    assert load_train_config(trained / 'args.yaml').epochs == 3
    assert len(read_csv(trained / 'summary.csv')) == 3


def test_resume_override_must_name_settings_a_resume_can_change(trained, capsys):
    assert _resume(trained, '--resume-override', 'model') == 2
    assert 'cannot change within a run' in capsys.readouterr().err
    assert _resume(trained, '--resume-override', 'epochz') == 2
    assert "['epochz'] are not settings" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (print, ('pwned',))


@pytest.mark.parametrize('content', [b'not a zip file at all', pickle.dumps({'num_updates': _Payload()})],
                         ids=['garbage', 'pickled-object'])
def test_corrupt_state_file_never_relays_weights_only_false(trained, capsys, content):
    if content.startswith(b'\x80'):  # a real torch.save zip holding a disallowed global
        torch.save({'num_updates': 1, 'x': _Payload()}, trained / STATE_FILE)
    else:
        (trained / STATE_FILE).write_bytes(content)
    assert _resume(trained) == 2
    captured = capsys.readouterr()
    assert 'not a readable training state' in captured.err, captured.err
    assert 'weights_only' not in captured.err and 'pwned' not in captured.out + captured.err


# ------------------------------------------------------------------------------------------ provenance
def test_eval_and_train_results_carry_the_model_identity(trained, tmp_path):
    last = trained / 'last.safetensors'
    out = tmp_path / 'eval.csv'
    assert cli_main(['eval', '--checkpoint', str(last), '--results-file', str(out), '-j', '0']) == 0
    rows = read_csv(out)
    assert {r['checkpoint_sha256'] for r in rows} == {hashlib.sha256(last.read_bytes()).hexdigest()}
    train_rows = read_csv(trained / 'results.csv')
    assert {r['config_hash'] for r in train_rows} == {r['config_hash'] for r in rows}
    assert {r['model_arch'] for r in rows} == {'hydravit-h4x8-d2-p4-16-c10'}
    other = tmp_path / 'other.safetensors'
    save_model(other, create_model('hydravit_fmnist_patch7_28', num_classes=10))
    out2 = tmp_path / 'other_eval.csv'
    assert cli_main(['eval', '--checkpoint', str(other), '--results-file', str(out2), '-j', '0',
                     '--max-samples', '8', '--model', 'hydravit_fmnist_patch7_28', '--k', '3']) == 0
    assert {r['config_hash'] for r in read_csv(out2)} != {r['config_hash'] for r in rows}


def _bench(model: str, out: Path) -> None:
    assert cli_main(['benchmark', '--model', model, '--k', '2', '--modes', 'sliced', '--rounds', '1', '--min-seconds',
                     '0.01', '--latency-iters', '1', '--no-memory', '--no-switching', '-b', '2',
                     '--results-file', str(out)]) == 0


def test_select_refuses_a_benchmark_of_another_model(trained, tmp_path, capsys):
    other, same = tmp_path / 'fmnist_bench.csv', tmp_path / 'tiny_bench.csv'
    _bench('hydravit_fmnist_patch7_28', other)
    _bench(TINY, same)
    capsys.readouterr()
    base = ['select', '--checkpoint', str(trained), '--gmacs', '100', '--k', '2']
    assert cli_main([*base, '--benchmark-file', str(other)]) == 2
    assert 'come from different models' in capsys.readouterr().err
    assert cli_main([*base, '--benchmark-file', str(same)]) == 0


def test_report_refuses_two_models_under_one_label(tmp_path, capsys):
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = save_model(tmp_path / f'm{seed}' / 'model.safetensors', create_model(TINY))
        out = tmp_path / f'm{seed}' / 'eval.csv'
        assert cli_main(['eval', '--checkpoint', str(path), '--model', TINY, '--dataset', 'imagefolder',
                         '--data-dir', str(image_folder(tmp_path / 'data', CLASSES[:10], 1)),
                         '--results-file', str(out), '-j', '0']) == 0
        files.append(str(out))
    capsys.readouterr()
    assert cli_main(['report', *files, '--labels', 'same', 'same', '-o', str(tmp_path / 'r')]) == 2
    assert re.search(r'come from different models.*label each model differently', capsys.readouterr().err)
    assert cli_main(['report', *files, '--labels', 'a', 'b', '-o', str(tmp_path / 'r')]) == 0


def test_compare_reuses_a_finished_run_only_with_the_same_settings(tmp_path, data):
    base = tiny_config(tmp_path, data, heads=None)
    options = CompareOptions(k_choices=[1, 2, 3, 4], teacher_epochs=None, separate_ks=None)
    out = tmp_path / 'compare'
    cfg = method_config(base, 'hydravit', out, options)
    train(cfg)  # the comparison's own run, finished
    runs = compare_methods(base, ['hydravit'], out, benchmark=False)  # same settings: reused, nothing trained
    assert runs['hydravit'].train_seconds is None
    with pytest.raises(ValueError, match=r'other settings \(epochs: 1 -> 3.*move it away'):
        compare_methods(load_train_config(None, **{**base.to_dict(), 'epochs': 3}), ['hydravit'], out,
                        benchmark=False)


# ------------------------------------------------------------------------------------------ Python API misuse
def test_k_choices_must_be_integers_never_truncated():
    for bad in [(2.5,), (2.0,), 2, '2']:
        with pytest.raises(ValueError, match='k_choices'):
            HydraViTConfig(num_heads=4, head_dim=8, img_size=16, patch_size=4, k_choices=bad)


def test_foreign_state_dicts_are_errors_naming_the_expected_keys_and_shapes():
    model = create_model(TINY)
    with pytest.raises(CheckpointMismatchError, match=r"lacks \['patch_embed\.proj\.weight'"):
        subnet_state_dict({'fc.weight': torch.zeros(2, 2)}, 2, head_dim=8)
    with pytest.raises(CheckpointMismatchError, match=r'lacks .*expected keys such as'):
        init_from_vit(model, {'encoder.layer.0.weight': torch.zeros(2, 2)})
    bad_qkv = {**model.state_dict(), 'blocks.1.attn.qkv.weight': torch.zeros(5, 32)}
    with pytest.raises(CheckpointMismatchError, match=r'blocks\.1\.attn\.qkv\.weight has shape \(5, 32\).*96 q/k/v'):
        subnet_state_dict(bad_qkv, 2, head_dim=8)
    with pytest.raises(CheckpointMismatchError, match=r'blocks\.1\.attn\.qkv\.weight has shape'):
        init_from_vit(model, bad_qkv)
    with pytest.raises(CheckpointMismatchError, match='expected a mapping of parameter names to tensors'):
        init_from_vit(model, 5)


def test_uint8_images_are_a_clear_error():
    model = create_model(TINY)
    with pytest.raises(ValueError, match=r'floating-point images.*got dtype torch\.uint8.*build_transform'):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), k=2)
