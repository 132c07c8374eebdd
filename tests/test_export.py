"""Exported subnetworks load as plain timm / safetensors / ONNX models and equal the universal model at k."""
import csv
import json
import re

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from hydravit.cli import main
from hydravit.deployment.export import ExportError, export_subnets, file_sha256
from hydravit.models import HydraViT
from hydravit.models.factory import create_model
from hydravit.storage.checkpoint import save_model
from hydravit.storage.run_folder import preprocessing_config

from helpers import reference_cost

TRAIN_CFG = dict(mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7], interpolation='bilinear', crop_pct=0.9,
                 input_size=[3, 16, 16])
CLASSES = [f'class{i}' for i in range(10)]


@pytest.fixture
def checkpoint(tmp_path, randomize):
    """A trained-looking run folder: checkpoint with training preprocessing in its metadata + results.csv."""
    model = randomize(create_model('hydravit_test_patch4_16')).eval()
    path = save_model(tmp_path / 'run' / 'model_best.safetensors', model,
                      metadata={'pretrained_cfg': json.dumps(TRAIN_CFG), 'class_names': json.dumps(CLASSES)})
    rows = [dict(k=k, top1=50.0 + k, top5=90.0 + k / 10, loss=1.0 / k) for k in model.k_choices]
    with open(path.parent / 'results.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, model


def test_timm_folder_loads_with_local_dir_and_matches(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / 'out'
    index = export_subnets(path.parent, [2, 4], ['timm'], out)  # a run folder: its model_best
    x = torch.randn(3, 3, 16, 16)
    for k in (2, 4):
        vit = timm.create_model(f'local-dir:{out}/k{k}', pretrained=True).eval()
        assert isinstance(vit, VisionTransformer) and vit.embed_dim == k * model.config.head_dim
        with torch.no_grad():
            assert (vit(x) - model(x, k=k)).abs().max().item() <= 1e-5
        cfg = vit.pretrained_cfg
        assert list(cfg['label_names']) == CLASSES
        assert tuple(cfg['mean']) == pytest.approx(TRAIN_CFG['mean']) and tuple(cfg['std']) == pytest.approx(
            TRAIN_CFG['std'])
        assert tuple(cfg['input_size']) == (3, 16, 16) and cfg['interpolation'] == 'bilinear'
        assert cfg['crop_pct'] == pytest.approx(0.9)
        info = json.loads((out / f'k{k}' / 'hydravit.json').read_text())
        assert info['k'] == k and info['parent_sha256'] == file_sha256(path)
        assert info['metrics']['top1'] == pytest.approx(50.0 + k)
        # the exported model's own parameter count, and its MACs counted on the equivalent timm ViT
        assert info['metrics']['param_count'] * 1e6 == pytest.approx(sum(p.numel() for p in vit.parameters()))
        assert info['metrics']['gmacs'] * 1e9 == pytest.approx(reference_cost(model.config, k)[1])  # not rounded
    assert [r['k'] for r in index] == [2, 4]
    on_disk = json.loads((out / 'index.json').read_text())
    assert [(r['k'], r['top1']) for r in on_disk] == [(2, 52.0), (4, 54.0)]
    assert on_disk[0]['param_count'] * 1e6 == pytest.approx(reference_cost(model.config, 2)[0], rel=1e-5)
    assert on_disk[1]['gmacs'] * 1e9 == pytest.approx(reference_cost(model.config, 4)[1], rel=1e-5)
    assert (out / 'index.csv').read_text().startswith('k,')


def test_safetensors_file_carries_kwargs_and_preprocessing(checkpoint, tmp_path):
    path, model = checkpoint
    export_subnets(path, [3], ['safetensors'], tmp_path / 'out')
    file = tmp_path / 'out' / 'k3.safetensors'
    with safe_open(str(file), framework='pt') as f:
        meta = f.metadata()
    vit = VisionTransformer(**json.loads(meta['vit_kwargs'])).eval()
    vit.load_state_dict(load_file(str(file)), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (vit(x) - model(x, k=3)).abs().max().item() <= 1e-5
    assert json.loads(meta['pretrained_cfg'])['mean'] == TRAIN_CFG['mean']
    assert json.loads(meta['hydravit'])['k'] == 3


def test_onnx_matches_pytorch_with_dynamic_batch(checkpoint, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    path, model = checkpoint
    row, = export_subnets(path, [2], ['onnx'], tmp_path / 'out')
    assert 0 <= row['onnx_max_abs_diff'] <= 1e-4
    session = ort.InferenceSession(row['onnx'], providers=['CPUExecutionProvider'])
    x = torch.randn(5, 3, 16, 16)
    got = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
    with torch.no_grad():
        assert (got - model(x, k=2)).abs().max().item() <= 1e-4


def test_preprocessing_falls_back_to_the_registered_model(tmp_path, randomize):
    model = randomize(create_model('hydravit_fmnist_patch7_28', depth=1))
    path = save_model(tmp_path / 'ck.safetensors', model)
    cfg = preprocessing_config(path, model)
    assert cfg['mean'] == model.pretrained_cfg['mean'] and cfg['input_size'] == (1, 28, 28)
    assert cfg['interpolation'] == 'bilinear' and 'hydravit_fmnist_patch7_28' in cfg['source']


def test_preprocessing_from_the_trainers_config(tmp_path):
    model = HydraViT(img_size=28, patch_size=7, in_chans=1, num_classes=10, num_heads=2, head_dim=4, depth=1)
    # an unregistered shape whose run trained with the registered model's settings
    meta = {'train_config': json.dumps({'model': 'hydravit_fmnist_patch7_28'})}
    path = save_model(tmp_path / 'ck.safetensors', model, meta)
    cfg = preprocessing_config(path, model)
    assert 'training config' in cfg['source'] and 'hydravit_fmnist_patch7_28' in cfg['source']
    registered = create_model('hydravit_fmnist_patch7_28').pretrained_cfg
    assert (cfg['mean'], cfg['std'], cfg['input_size']) == (registered['mean'], registered['std'], (1, 28, 28))


def test_unknown_preprocessing_is_an_error_unless_named(tmp_path):
    model = HydraViT(img_size=12, patch_size=4, in_chans=3, num_classes=3, num_heads=2, head_dim=4, depth=1)
    path = save_model(tmp_path / 'ck.safetensors', model)
    with pytest.raises(ValueError, match=r'ck\.safetensors: no preprocessing stored with the checkpoint.*'
                                         r'pass the model name \(--model\)'):
        preprocessing_config(path, model)
    cfg = preprocessing_config(path, model, model_name='hydravit_test_patch4_16')
    assert cfg['input_size'] == (3, 12, 12)  # the model's own size wins over the named model's


@pytest.mark.parametrize('args,match', [
    (['--format', 'tflite'], r"unknown export format \['tflite'\]: choose one or more of \['timm', 'safetensors', "
                             r"'onnx', 'onnx-switchable'\]"),
    (['--format', 'timm', 'tflite'], r"unknown export format \['tflite'\]: choose"),
    (['--k', '5'], r'k=5 is not a valid subnetwork: allowed values are \[1, 2, 3, 4\]'),
    (['--k', 'big'], r"--k takes 'all' or integers, got \['big'\]"),
])
def test_cli_rejects_bad_input(checkpoint, tmp_path, capsys, args, match):
    path, _ = checkpoint
    assert main(['export', '--checkpoint', str(path), '--output', str(tmp_path / 'out'), *args]) == 2
    err = capsys.readouterr().err
    assert re.search('hydravit export: error: ' + match, err), err
    assert not (tmp_path / 'out').exists()


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / 'out'
    assert main(['export', '--checkpoint', str(path), '--k', '1', '--output', str(out)]) == 0
    before = (out / 'k1' / 'model.safetensors').stat().st_mtime_ns
    assert main(['export', '--checkpoint', str(path), '--k', '1', '--output', str(out)]) == 2
    assert f'output folder {out} already exists; pass --overwrite' in capsys.readouterr().err
    assert (out / 'k1' / 'model.safetensors').stat().st_mtime_ns == before
    with pytest.raises(ExportError, match=r'already exists; pass --overwrite'):
        export_subnets(path, [1], ['timm'], out)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ExportError, match='--overwrite'):
        export_subnets(path, [1], ['timm'], tmp_path / 'empty')
    assert main(['export', '--checkpoint', str(path), '--k', 'all', '--format', 'safetensors', '--output', str(out),
                 '--overwrite']) == 0
    assert sorted(p.name for p in out.glob('k*.safetensors')) == [f'k{k}.safetensors' for k in (1, 2, 3, 4)]


def test_read_accuracy_uses_ema_columns_for_an_ema_checkpoint(tmp_path):
    from hydravit.storage.results import write_results
    from hydravit.storage.run_folder import read_accuracy
    write_results([dict(k=3, top1=70.0, ema_top1=72.0, mode='sliced'), dict(k=3, top1=1.0, mode='extracted'),
                   dict(k=6, top1=75.0, ema_top1=None, mode='sliced')], tmp_path, 'results', verbose=False)
    assert read_accuracy(tmp_path / 'last.safetensors')[3]['top1'] == 70.0
    ema = read_accuracy(tmp_path / 'last_ema.safetensors')
    assert ema[3]['top1'] == 72.0 and ema[6]['top1'] == 75.0  # no EMA number for k=6: the plain one
    assert read_accuracy(tmp_path / 'sub' / 'x.safetensors') == {}
