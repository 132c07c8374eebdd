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
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert weight_bytes < path.stat().st_size < sizes[4] + sizes[2] < sum(sizes.values())


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


def _ops(graph):
    """Operator types of a graph and of every subgraph in it."""
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        ops += [op for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for op in _ops(a.g)]
    return ops


def test_shape_arithmetic_is_folded_and_the_graph_still_computes_the_same():
    from onnx import TensorProto, helper, numpy_helper

    from hydravit.deployment.onnx_fold import fold_shape_arithmetic
    one = numpy_helper.from_array(np.array(1.0, np.float32), 'one')
    axes = numpy_helper.from_array(np.array([0], np.int64), 'axes')
    last = numpy_helper.from_array(np.array(2, np.int64), 'last')
    first = numpy_helper.from_array(np.array(0, np.int64), 'first')
    flat = numpy_helper.from_array(np.array([24], np.int64), 'flat')
    nodes = [helper.make_node('Shape', ['x'], ['shape']),
             helper.make_node('Gather', ['shape', 'last'], ['width']),  # x / sqrt(width): a constant in disguise
             helper.make_node('Cast', ['width'], ['width_f'], to=TensorProto.FLOAT),
             helper.make_node('Sqrt', ['width_f'], ['root']),
             helper.make_node('Div', ['one', 'root'], ['scale']),
             helper.make_node('Mul', ['x', 'scale'], ['scaled']),
             helper.make_node('Gather', ['shape', 'first'], ['batch']),  # reshape to (batch, 24): batch changes
             helper.make_node('Unsqueeze', ['batch', 'axes'], ['batch1']),
             helper.make_node('Concat', ['batch1', 'flat'], ['target'], axis=0),
             helper.make_node('Reshape', ['scaled', 'target'], ['y'])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 4, 6])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 24])],
                              initializer=[one, axes, last, first, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    rng = np.random.default_rng(0)
    folded = fold_shape_arithmetic(model, lambda b: {'x': rng.standard_normal((b, 4, 6), dtype=np.float32)})
    assert [n.op_type for n in folded.graph.node] == ['Mul', 'Reshape']
    target = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}[folded.graph.node[1].input[1]]
    assert target.tolist() == [-1, 24]
    for batch in (1, 7):
        x = rng.standard_normal((batch, 4, 6), dtype=np.float32)
        got = ort.InferenceSession(folded.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {'x': x})
        assert got[0].shape == (batch, 24) and np.allclose(got[0], (x / np.sqrt(6)).reshape(batch, 24))


def test_branches_run_folded_shape_arithmetic_and_both_forms_match_pytorch(model, switchable, tmp_path):
    from hydravit.deployment.onnx_switchable import build_switchable_model, check_switchable_onnx
    path, _ = switchable
    folded = _ops(onnx.load(str(path)).graph)
    unfolded_proto = build_switchable_model(model, fold_shapes=False)
    unfolded = _ops(unfolded_proto.graph)
    # the attention scale 1/sqrt(head_dim) was computed from Shape at every call; folded it is a constant
    assert 'Sqrt' in unfolded and 'Sqrt' not in folded and len(folded) < len(unfolded) - 12
    onnx.save(unfolded_proto, str(tmp_path / 'unfolded.onnx'))
    diffs = check_switchable_onnx(model, tmp_path / 'unfolded.onnx', batch_sizes=(1, 6))
    assert set(diffs) == {2, 3, 4} and max(diffs.values()) <= 1e-4


def test_a_file_of_one_k_runs_it_and_refuses_others(model, tmp_path):
    check = export_switchable_onnx(model, tmp_path / 'one.onnx', ks=[3], check_batch_sizes=(1, 4))
    assert set(check['onnx_switchable_diffs']) == {3} and check['onnx_switchable_max_abs_diff'] <= 1e-4
    session = _session(tmp_path / 'one.onnx')
    with pytest.raises(Exception, match=r'invalid_k_allowed_3'):
        session.run(None, {'input': np.zeros((2, 3, 16, 16), np.float32), 'k': np.array(2, dtype=np.int64)})


def test_per_k_file_is_folded_and_matches_the_unfolded_export(model, tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16), dtype=np.float32)
    export_onnx(model, 3, tmp_path / 'folded.onnx')
    export_onnx(model, 3, tmp_path / 'unfolded.onnx', fold_shapes=False)
    folded, unfolded = (_ops(onnx.load(str(tmp_path / f'{n}.onnx')).graph) for n in ('folded', 'unfolded'))
    assert 'Sqrt' in unfolded and 'Sqrt' not in folded and len(folded) < len(unfolded) - 12
    outputs = [_session(tmp_path / f'{n}.onnx').run(None, {'input': x})[0] for n in ('folded', 'unfolded')]
    with torch.no_grad():
        expected = model(torch.from_numpy(x), k=3).numpy()
    assert outputs[0].shape == (5, 10) and all(np.abs(o - expected).max() <= 1e-4 for o in outputs)
