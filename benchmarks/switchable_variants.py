"""Other constructions of the switchable ONNX file, built only to be measured against the one the export writes.

* :func:`build_if_chain`: the same folded branches as ``hydravit export --format onnx-switchable``, picked by a
  chain of ``If (k == k_i)`` nodes instead of a balanced tree (one level for the first k, n - 1 for the last).
* :func:`build_runtime_slices`: no ``If`` at all: one graph whose weight slices, reshape targets and widths are
  computed from ``k`` at run time (``Slice`` ends = a multiple of k), so onnxruntime can neither fold nor
  pre-pack the weights: every call copies the slices and packs them inside ``MatMul``.

(``build_switchable_model(model, fold_shapes=False)`` gives the tree with the exporter's shape arithmetic kept.)
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from hydravit.deployment.onnx_switchable import (
    K_CHOICES_KEY,
    _branch,
    _branch_source,
    _k_check,
    _model_tensors,
    check_switchable_onnx,
)
from hydravit.models.factory import UniversalModel


def _finish(model: UniversalModel, nodes: List[Any], initializers: List[Any], ks: Sequence[int]) -> Any:
    import onnx
    from onnx import TensorProto, helper
    c = model.config
    inputs = [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', c.in_chans, c.img_size, c.img_size]),
              helper.make_tensor_value_info('k', TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', c.num_classes])]
    graph = helper.make_graph(nodes, 'hydravit_switchable', inputs, outputs, initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], producer_name='hydravit')
    helper.set_model_props(proto, {K_CHOICES_KEY: ','.join(map(str, ks))})
    onnx.checker.check_model(proto)
    return proto


def _weights(tensors: Dict[str, torch.Tensor], names: Dict[str, str], used: set) -> List[Any]:
    from onnx import numpy_helper
    return [numpy_helper.from_array(t.numpy(), names[n]) for n, t in tensors.items() if names[n] in used]


def build_if_chain(model: UniversalModel) -> Any:
    """Folded branches behind a chain of ``If (k_valid == k_i)`` nodes."""
    from onnx import TensorProto, helper
    ks = model.resolve_ks(None)
    tensors = _model_tensors(model)
    names = {n: f'w{i}' for i, n in enumerate(tensors)}
    with tempfile.TemporaryDirectory() as tmp:
        branches = {k: _branch(_branch_source(model, k, tensors, os.path.join(tmp, f'{k}.onnx'), 17, True).graph, k,
                               names) for k in ks}

    def chain(rest: Sequence[int], out: str) -> List[Any]:
        k = rest[0]
        if len(rest) == 2:
            other: Any = branches[rest[1]]
        else:
            inner = f'chain{rest[1]}/logits'
            other = helper.make_graph(chain(rest[1:], inner), f'chain{rest[1]}', [],
                                      [helper.make_tensor_value_info(inner, TensorProto.FLOAT, ['batch', None])])
        value = helper.make_tensor('v', TensorProto.INT64, [], [k])
        return [helper.make_node('Constant', [], [f'is{k}/v'], value=value),
                helper.make_node('Equal', ['k_valid', f'is{k}/v'], [f'is{k}']),
                helper.make_node('If', [f'is{k}'], [out], then_branch=branches[k], else_branch=other)]

    check, check_tensors = _k_check(ks)
    used = {i for b in branches.values() for node in b.node for i in node.input}
    return _finish(model, check + chain(ks, 'logits'), _weights(tensors, names, used) + check_tensors, ks)


def _width_factors(model: UniversalModel) -> Tuple[int, ...]:
    """Multiples of k that are widths: heads (k), embed (k*hd), qkv (3*k*hd), MLP hidden (ratio*k*hd)."""
    hd = model.config.head_dim
    return (1, hd, 3 * hd, int(model.config.mlp_ratio * hd))


def _runtime_sliced(model: UniversalModel, k0: int, tensors: Dict[str, torch.Tensor], tmp: str) -> Any:
    from onnx import helper, numpy_helper
    ks = model.resolve_ks(None)
    source = _branch_source(model, k0, tensors, os.path.join(tmp, f'{k0}.onnx'), 17, True).graph
    names = {n: f'w{i}' for i, n in enumerate(tensors)}
    factors = _width_factors(model)
    nodes, initializers = _k_check(ks)
    rename = dict(names)
    for init in source.initializer:
        value = numpy_helper.to_array(init)
        scaled = value.dtype == np.int64 and value.size > 0
        coef = np.zeros_like(value) if scaled else None
        if scaled:
            for index, v in np.ndenumerate(value):
                if v > 0 and v % k0 == 0 and v // k0 in factors:
                    coef[index] = v // k0
        if coef is None or not coef.any():
            initializers.append(numpy_helper.from_array(value, f'c/{init.name}'))
            rename[init.name] = f'c/{init.name}'
            continue
        base = np.where(coef != 0, 0, value).astype(np.int64)
        initializers += [numpy_helper.from_array(base, f'b/{init.name}'),
                         numpy_helper.from_array(coef, f'm/{init.name}')]
        nodes += [helper.make_node('Mul', [f'm/{init.name}', 'k_valid'], [f'mk/{init.name}']),
                  helper.make_node('Add', [f'b/{init.name}', f'mk/{init.name}'], [f'r/{init.name}'])]
        rename[init.name] = f'r/{init.name}'
    for node in source.node:
        new = helper.make_node(node.op_type, [rename.get(i, i) for i in node.input],
                               ['logits' if o == source.output[0].name else o for o in node.output], domain=node.domain)
        new.attribute.extend(node.attribute)
        nodes.append(new)
    used = {i for node in nodes for i in node.input}
    return _finish(model, nodes, _weights(tensors, names, used) + initializers, ks)


def build_runtime_slices(model: UniversalModel, path: str) -> Any:
    """One graph, no ``If``: the subnetwork of k0 with every width written as a multiple of the runtime k.

    k0 is the first trained k (largest first) whose widths are unambiguous, i.e. whose graph then matches
    PyTorch at every k (checked here, file written to ``path``).
    """
    import onnx
    tensors = _model_tensors(model)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for k0 in sorted(model.k_choices, reverse=True):
            proto = _runtime_sliced(model, k0, tensors, tmp)
            onnx.save(proto, path)
            try:
                check_switchable_onnx(model, path)
                return proto
            except Exception as e:  # a width constant that only looked like a multiple of k0: try another k0
                errors.append(f'k0={k0}: {str(e)[:200]}')
    raise RuntimeError('no k0 gives a runtime-sliced graph matching PyTorch: ' + '; '.join(errors))
