"""One ONNX file for every k, and the universal model exported at a fixed k, against PyTorch with onnxruntime."""
import json
import warnings

import numpy as np
import pytest
import torch

from hydravit.cli import main
from hydravit.deployment.export import export_onnx
from hydravit.deployment.onnx_switchable import (
    export_switchable_onnx,
    export_universal_onnx,
    run_switchable,
    switchable_ks,
)
from hydravit.models.factory import create_model
from hydravit.storage.checkpoint import save_model

ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')


@pytest.fixture(scope='module')
def model():
    from helpers import randomize_
    return randomize_(create_model('hydravit_test_patch4_16', k_choices=(2, 3, 4))).eval()


@pytest.fixture(scope='module')
def switchable(model, tmp_path_factory):
    path = tmp_path_factory.mktemp('onnx') / 'switchable.onnx'
    return path, export_switchable_onnx(model, path)


def _session(path):
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def test_one_file_runs_every_k_with_a_dynamic_batch(model, switchable):
    path, check = switchable
    assert set(check['onnx_switchable_diffs']) == {2, 3, 4} and check['onnx_switchable_max_abs_diff'] <= 1e-4
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ['input', 'k'] and session.get_inputs()[1].type == 'tensor(int64)'
    assert switchable_ks(session) == [2, 3, 4]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        for k in (2, 3, 4):
            got = session.run(None, {'input': x.numpy(), 'k': np.array(k, dtype=np.int64)})[0]
            with torch.no_grad():
                assert np.abs(got - model(x, k=k).numpy()).max() <= 1e-4


def test_a_k_outside_the_file_fails_clearly(switchable):
    path, _ = switchable
    session = _session(path)
    x = np.zeros((1, 3, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r'k=1 is not a valid subnetwork: allowed values are \[2, 3, 4\]'):
        run_switchable(session, x, 1)
    for k in (1, 5):  # straight through onnxruntime: the branch of an unknown k fails and names the allowed k
        with pytest.raises(Exception, match=r'invalid_k_allowed_2_3_4'):
            session.run(None, {'input': x, 'k': np.array(k, dtype=np.int64)})


def test_weights_are_stored_once(model, switchable, tmp_path):
    path, _ = switchable
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.name.startswith('w')]
    assert sum(int(np.prod(t.dims)) for t in weights) == sum(p.numel() for p in model.parameters())
    sizes = {}
    for k in (2, 3, 4):
        export_onnx(model, k, tmp_path / f'k{k}.onnx')
        sizes[k] = (tmp_path / f'k{k}.onnx').stat().st_size
    # one copy of the full weights plus three small graphs: below the k=4 file and one more, not the sum of all three
    assert sizes[4] < path.stat().st_size < sizes[4] + sizes[2] < sum(sizes.values())


def test_universal_model_exports_at_a_fixed_k_with_a_dynamic_batch(model, tmp_path):
    path = export_universal_onnx(model, 3, tmp_path / 'u3.onnx')
    session = _session(path)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert np.abs(session.run(None, {'input': x.numpy()})[0] - model(x, k=3).numpy()).max() <= 1e-4
    with model.use_k(2), warnings.catch_warnings():  # the README's way for callers that cannot pass k
        warnings.simplefilter('ignore')  # the tracer's notes on the input shape check
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), tmp_path / 'u2.onnx', dynamo=False,
                          input_names=['input'], dynamic_axes={'input': {0: 'batch'}})
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert np.abs(_session(tmp_path / 'u2.onnx').run(None, {'input': x.numpy()})[0]
                      - model(x, k=2).numpy()).max() <= 1e-4


def test_cli_writes_the_switchable_file(model, tmp_path):
    ck = save_model(tmp_path / 'ck.safetensors', model)
    out = tmp_path / 'out'
    assert main(['export', '--checkpoint', str(ck), '--k', '2', '4', '--format', 'onnx-switchable', '--output',
                 str(out), '--model', 'hydravit_test_patch4_16']) == 0
    index = json.loads((out / 'index.json').read_text())
    assert [r['k'] for r in index] == [2, 4] and all(r['onnx_switchable_max_abs_diff'] <= 1e-4 for r in index)
    assert switchable_ks(_session(out / 'switchable.onnx')) == [2, 4]
