"""Accuracy per k computed by hand or independently, class subsets, the eval command and its checkpoints."""
import re
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import hydravit  # noqa: F401
from hydravit.evaluation.evaluate import evaluate_dataset, evaluate_subnets, label_map, load_for_eval
from hydravit.models.costs import add_costs
from hydravit.models.subnet import extract_subnet
from hydravit.storage.checkpoint import CheckpointError, save_model
from hydravit.storage.run_folder import resolve_checkpoint

from helpers import reference_cost


class LogitsModel(nn.Module):
    """Returns its input as logits at k=1 and the negated input at k=2: accuracies computable by hand."""
    k_choices = (1, 2)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def resolve_k(self, k):
        if k not in self.k_choices:
            raise ValueError(f'bad k {k}')
        return k

    def resolve_ks(self, ks=None):
        return list(self.k_choices) if ks is None else [self.resolve_k(k) for k in ks]

    def forward(self, x, k=None):
        return x if k == 1 else -x


def _loader(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def test_accuracies_match_hand_computation():
    logits = torch.tensor([[5., 1, 0, 0, 0, 0],   # argmax 0, argmin among 2..5
                           [0., 9, 1, 2, 3, 4],   # argmax 1
                           [1., 2, 3, 4, 5, 6],   # argmax 5, argmin 0
                           [6., 5, 4, 3, 2, 1]])  # argmax 0, argmin 5
    labels = torch.tensor([0, 2, 0, 5])
    rows = evaluate_subnets(LogitsModel(6), _loader(logits, labels, 3), [1, 2])
    k1, k2 = rows
    # k=1: top1 hits row 0 only; top5 excludes the smallest logit, which is the label in rows 2 and 3
    assert (k1['k'], k1['top1'], k1['top5'], k1['num_samples']) == (1, 25.0, 50.0, 4)
    # k=2 (negated): top1 hits rows 2 (label 0 = min of x) and 3 (label 5 = min of x) -> 2/4
    assert (k2['top1'], k2['top1_err']) == (50.0, 50.0)
    # top5 of -x excludes the largest x: row 0 label 0 is the largest -> miss; row 1 label 2 ok
    assert k2['top5'] == 75.0 and k2['top5_err'] == 25.0
    assert k1['loss'] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert k2['loss'] == pytest.approx(F.cross_entropy(-logits, labels).item(), rel=1e-6)


def test_top5_is_top_c_with_fewer_classes():
    x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    row, = evaluate_subnets(LogitsModel(3), _loader(x, y, 4), [1])
    assert row['top5'] == 100.0
    assert row['top1'] == pytest.approx(100.0 * (x.argmax(1) == y).float().mean().item())


def test_class_subset_restricts_logits_and_maps_labels():
    torch.manual_seed(0)
    x = torch.randn(40, 10)
    subset = [7, 2, 5]
    y = torch.tensor(subset)[torch.randint(0, 3, (40,))]
    x[:, 0] += 100.0  # class 0 would win every prediction if it were not excluded
    row, = evaluate_subnets(LogitsModel(10), _loader(x, y, 16), [1], class_indices=subset)
    restricted = x[:, subset]
    expected = torch.tensor(subset)[restricted.argmax(1)] == y
    assert row['top1'] == pytest.approx(100.0 * expected.float().mean().item())
    assert row['top1'] > 0
    mapped = label_map(subset, 10)[y]
    assert row['loss'] == pytest.approx(F.cross_entropy(restricted, mapped).item(), rel=1e-5)
    with pytest.raises(ValueError, match='not among class_indices'):
        evaluate_subnets(LogitsModel(10), _loader(x, torch.zeros(40, dtype=torch.long), 16), [1],
                         class_indices=subset)
    with pytest.raises(ValueError, match=r'class_indices \[12\] outside 0\.\.9 \(the model has 10 classes\)'):
        label_map([3, 12], 10)


def test_real_model_rows_equal_independent_computation(randomize):
    model = randomize(timm.create_model('hydravit_test_patch4_16'))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(22, 3, 16, 16, generator=g), torch.randint(0, 10, (22,), generator=g)
    model.train()
    rows = evaluate_subnets(model, _loader(x, y, 8), None)
    assert model.training, "evaluation must restore the caller's train/eval mode"
    assert [r['k'] for r in rows] == list(model.k_choices)
    model.eval()
    with torch.no_grad():
        for row in rows:
            logits = model(x, k=row['k'])
            top5 = logits.topk(5, 1).indices
            assert row['top1'] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
            assert row['top5'] == pytest.approx(100.0 * (top5 == y[:, None]).any(1).float().mean().item())
            assert row['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_sliced_equals_extracted(randomize):
    model = randomize(timm.create_model('hydravit_test_patch4_16'), seed=3)
    g = torch.Generator().manual_seed(2)
    loader = _loader(torch.randn(30, 3, 16, 16, generator=g), torch.randint(0, 10, (30,), generator=g), 16)
    sliced = evaluate_subnets(model, loader, [1, 2, 4])
    extracted = evaluate_subnets(model, loader, [1, 2, 4], mode='extracted')
    for a, b in zip(sliced, extracted, strict=True):
        assert (a['k'], a['top1'], a['top5'], a['num_samples']) == (b['k'], b['top1'], b['top5'], b['num_samples'])
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
    with pytest.raises(ValueError, match=r"mode must be one of \('sliced', 'extracted'\), got 'onnx'"):
        evaluate_subnets(model, loader, [1], mode='onnx')
    with pytest.raises(ValueError, match=r'k=7 is not a valid subnetwork: allowed values are \[1, 2, 3, 4\]'):
        evaluate_subnets(model, loader, [7])


def test_add_costs_counts_the_parameters_and_macs_of_each_subnetwork():
    model = timm.create_model('hydravit_test_patch4_16')
    rows = add_costs([{'k': 2, 'top1': 1.0}, {'k': 4, 'top1': 2.0}], model.config, mode='sliced')
    for row in rows:
        vit = extract_subnet(model, row['k'])
        assert row['param_count'] * 1e6 == pytest.approx(sum(p.numel() for p in vit.parameters()))
        assert row['gmacs'] * 1e9 == pytest.approx(reference_cost(model.config, row['k'])[1])
        assert (row['embed_dim'], row['num_heads'], row['mlp_hidden']) == \
            (vit.embed_dim, vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features)
    # by hand for k=2: embed 16, MLP 32 (mlp_ratio 2), 16 patches of 3x4x4 + a class token (17 tokens), depth 2,
    # 10 classes. Parameters: patch 48*16 + 16, pos/cls 17*16 + 16, per block 2 norms 4*16 + qkv 3*16*16 + 48
    # + proj 16*16 + 16 + fc1 32*16 + 32 + fc2 32*16 + 16, final norm 2*16, head 16*10 + 10
    assert rows[0]['param_count'] * 1e6 == pytest.approx(784 + 288 + 2 * 2224 + 32 + 170)
    # MACs: patch 48*16 per patch, per block qkv + proj 4*17*16*16 + MLP 2*17*32*16 + q@k^T and attn@v
    # 2*17*17*16, head 16*10
    assert rows[0]['gmacs'] * 1e9 == pytest.approx(16 * 768 + 2 * (17408 + 17408 + 9248) + 160)
    assert (rows[0]['k'], rows[0]['top1'], rows[0]['mode']) == (2, 1.0, 'sliced')
    assert (rows[1]['k'], rows[1]['top1'], rows[1]['mode']) == (4, 2.0, 'sliced')


def test_resolve_checkpoint_run_folder_and_ema(tmp_path):
    model = timm.create_model('hydravit_test_patch4_16')
    with pytest.raises(FileNotFoundError,
                       match=r"holds none of \['model_best\.safetensors', 'last\.safetensors'\]"):
        resolve_checkpoint(tmp_path)
    save_model(tmp_path / 'last.safetensors', model)
    assert resolve_checkpoint(tmp_path).name == 'last.safetensors'
    save_model(tmp_path / 'model_best.safetensors', model)
    assert resolve_checkpoint(tmp_path).name == 'model_best.safetensors'
    with pytest.raises(FileNotFoundError, match='model_best_ema.safetensors'):
        resolve_checkpoint(tmp_path, use_ema=True)
    save_model(tmp_path / 'model_best_ema.safetensors', model)
    assert resolve_checkpoint(tmp_path, use_ema=True).name == 'model_best_ema.safetensors'
    assert resolve_checkpoint(tmp_path / 'last.safetensors').name == 'last.safetensors'
    with pytest.raises(FileNotFoundError, match=r'checkpoint .*missing\.safetensors does not exist'):
        resolve_checkpoint(tmp_path / 'missing.safetensors')


def test_load_for_eval_untrained_k_and_bad_checkpoints(tmp_path):
    model = timm.create_model('hydravit_test_patch4_16', k_choices=(2, 4))
    path = save_model(tmp_path / 'm.safetensors', model)
    loaded, ks = load_for_eval(path)
    assert ks == [2, 4]
    with pytest.warns(UserWarning, match=r'k \[1\] not in the trained set'):
        loaded, ks = load_for_eval(path, [1, 4])
    assert ks == [1, 4] and 1 in loaded.k_choices
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, k=4), model.eval()(x, k=4))
    with pytest.raises(ValueError, match=r'\[5\] outside 1\.\.4 \(num_heads\)'):
        load_for_eval(path, [5])
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(CheckpointError, match='not a HydraViT checkpoint'):
        load_for_eval(tmp_path / 'plain.safetensors')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _, ks = load_for_eval(path, [2])  # a trained k: no warning
    assert ks == [2]


def test_eval_cli_rejects_bad_checkpoint_and_k_before_reading_data(tmp_path, capsys):
    from hydravit.cli import main
    missing = tmp_path / 'nope.safetensors'
    assert main(['eval', '--checkpoint', str(missing)]) == 2
    assert f'hydravit eval: error: checkpoint {missing} does not exist' in capsys.readouterr().err
    path = save_model(tmp_path / 'm.safetensors', timm.create_model('hydravit_test_patch4_16'))
    assert main(['eval', '--checkpoint', str(path), '--k', '9']) == 2
    assert re.search(r'hydravit eval: error: .*\[9\] outside 1\.\.4', capsys.readouterr().err)
    assert main(['eval', '--checkpoint', str(path), '--k', 'two']) == 2
    assert "hydravit eval: error: --k takes 'all' or integers, got ['two']" in capsys.readouterr().err


class TensorSet(torch.utils.data.Dataset):
    """A data set as load_dataset returns it: items (image, label), num_classes and the labels present."""

    def __init__(self, x, y, num_classes, class_indices=None):
        self.x, self.y, self.num_classes = x, y, num_classes
        self.class_indices = class_indices

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_evaluate_dataset_scores_a_class_subset_like_imagenet_r(randomize):
    model = randomize(timm.create_model('hydravit_test_patch4_16'), seed=5).eval()
    g = torch.Generator().manual_seed(4)
    subset = [1, 4, 8]
    x = torch.randn(24, 3, 16, 16, generator=g)
    y = torch.tensor(subset)[torch.randint(0, 3, (24,), generator=g)]
    rows = evaluate_dataset(model, TensorSet(x, y, 10, subset), [2, 4], batch_size=10)
    with torch.no_grad():
        for row in rows:
            pred = torch.tensor(subset)[model(x, k=row['k'])[:, subset].argmax(1)]
            assert row['top1'] == pytest.approx(100.0 * (pred == y).float().mean().item())
            assert row['top5'] == 100.0  # only 3 classes scored
            assert row['num_classes_scored'] == 3
            assert row['gmacs'] * 1e9 == pytest.approx(reference_cost(model.config, row['k'])[1])
            assert (row['img_size'], row['crop_pct'], row['mode']) == (16, 1.0, 'sliced')
    with pytest.raises(ValueError, match='has 7 classes but the model was trained on 10'):
        evaluate_dataset(model, TensorSet(x, y, 7), [2])
    with pytest.raises(ValueError, match=r'labels must be class indices in 0..9'):
        evaluate_dataset(model, TensorSet(x, y + 5, None), [2])


def test_eval_cli_end_to_end_with_report(tmp_path, monkeypatch, randomize):
    from hydravit.cli import eval as eval_cli, main
    from hydravit.storage.results import read_results
    model = randomize(timm.create_model('hydravit_test_patch4_16', k_choices=(2, 3, 4)), seed=6)
    run = tmp_path / 'run1'
    save_model(run / 'model_best.safetensors', model)
    save_model(run / 'model_best_ema.safetensors', model)
    g = torch.Generator().manual_seed(7)
    data = TensorSet(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g), 10)
    monkeypatch.setattr(eval_cli, 'build_eval_dataset', lambda model, args, names: data)
    out = tmp_path / 'eval.json'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the report's quick throughput run: avoid OpenMP stalls on a busy machine
    try:
        assert main(['eval', '--checkpoint', str(run), '--use-ema', '--k', '2', '4', '--workers', '0',
                     '--results-file', str(out), '--report']) == 0
    finally:
        torch.set_num_threads(threads)
    rows = read_results(out)
    assert [r['k'] for r in rows] == [2, 4]
    assert rows[0]['checkpoint'].endswith('model_best_ema.safetensors') and rows[0]['num_samples'] == 12
    assert (rows[0]['img_size'], rows[0]['crop_pct']) == (16, 1.0)  # the model's preprocessing, not ImageNet's
    assert set(rows[0]) >= {'top1', 'top1_err', 'top5', 'top5_err', 'loss', 'param_count', 'gmacs', 'img_size',
                            'crop_pct', 'interpolation', 'mode', 'checkpoint'}
    direct = evaluate_subnets(model, [(data.x, data.y)], [2, 4])
    assert [r['top1'] for r in rows] == pytest.approx([r['top1'] for r in direct], rel=1e-5)
    for plot in ('accuracy_vs_gmacs.png', 'accuracy_vs_throughput.png'):
        assert (run / 'report' / plot).stat().st_size > 0
    report = read_results(run / 'report' / 'report.csv')
    assert [(r['method'], r['k']) for r in report] == [('run1', 2), ('run1', 4)]
    assert all(r['infer_samples_per_sec'] > 0 for r in report)


def test_eval_cli_extracted_mode_scores_an_untrained_k_too(tmp_path, monkeypatch, randomize):
    from hydravit.cli import eval as eval_cli, main
    from hydravit.storage.results import read_results
    model = randomize(timm.create_model('hydravit_test_patch4_16', k_choices=(2, 4)), seed=3).eval()
    path = save_model(tmp_path / 'm.safetensors', model)
    g = torch.Generator().manual_seed(8)
    data = TensorSet(torch.randn(10, 3, 16, 16, generator=g), torch.randint(0, 10, (10,), generator=g), 10)
    monkeypatch.setattr(eval_cli, 'build_eval_dataset', lambda model, args, names: data)
    out = tmp_path / 'eval.csv'
    with pytest.warns(UserWarning, match=r'k \[1\] not in the trained set'):
        assert main(['eval', '--checkpoint', str(path), '--k', '1', '4', '--mode', 'extracted', '--workers', '0',
                     '--results-file', str(out)]) == 0
    rows = read_results(out)
    assert [(r['k'], r['mode']) for r in rows] == [(1, 'extracted'), (4, 'extracted')]
    wide = timm.create_model('hydravit_test_patch4_16', k_choices=(1, 2, 3, 4))
    wide.load_state_dict(model.state_dict())
    direct = evaluate_subnets(wide, [(data.x, data.y)], [1, 4])  # the sliced model, k=1 included
    assert [r['top1'] for r in rows] == pytest.approx([r['top1'] for r in direct])
    assert [r['loss'] for r in rows] == pytest.approx([r['loss'] for r in direct], rel=1e-4)


def _image_folder(root, folders, per_class=3, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for name in folders:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f'{i}.png')


def test_eval_cli_on_imagefolder_class_subsets(tmp_path, randomize, capsys):
    import json

    from timm.data import resolve_data_config

    from hydravit.cli import main
    from hydravit.data import build_transform, load_dataset
    from hydravit.storage.results import read_results
    names = [f'class{i}' for i in range(10)]
    model = randomize(timm.create_model('hydravit_test_patch4_16'), seed=8).eval()
    path = save_model(tmp_path / 'm.safetensors', model, {'class_names': json.dumps(names)})
    _image_folder(tmp_path / 'r', ['class2', 'class7', 'class9'])   # ImageNet-R style: 3 of 10 classes, by name
    _image_folder(tmp_path / 'v2', ['1', '4'], seed=1)              # ImageNet-V2 style: numbered folders
    transform = build_transform(resolve_data_config({}, model=model), is_training=False)
    for folder, present in (('r', [2, 7, 9]), ('v2', [1, 4])):
        out = tmp_path / f'{folder}.csv'
        assert main(['eval', '--checkpoint', str(path), '--dataset', 'imagefolder', '--data-dir',
                     str(tmp_path / folder), '--k', '2', '4', '-j', '0', '--results-file', str(out)]) == 0
        assert f'{len(present)} of 10 classes present' in capsys.readouterr().out
        data = load_dataset('imagefolder', str(tmp_path / folder), 'val', transform=transform, class_names=names)
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.tensor([data[i][1] for i in range(len(data))])
        assert sorted(set(y.tolist())) == present
        for row in read_results(out):
            with torch.no_grad():
                pred = torch.tensor(present)[model(x, k=row['k'])[:, present].argmax(1)]
            assert row['top1'] == pytest.approx(100.0 * (pred == y).float().mean().item(), rel=1e-5)
            assert row['num_classes_scored'] == len(present) and row['num_samples'] == 3 * len(present)
    _image_folder(tmp_path / 'bad', ['class1', 'zebra'])
    assert main(['eval', '--checkpoint', str(path), '--dataset', 'imagefolder', '--data-dir',
                 str(tmp_path / 'bad'), '-j', '0']) == 2
    assert re.search(r"hydravit eval: error: class folders \['zebra'\] in .* are not training classes",
                     capsys.readouterr().err)
