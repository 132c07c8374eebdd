"""ONNX files of the universal model: at one fixed k, and one file that runs every k, chosen per call.

* :func:`export_universal_onnx` writes the universal model at a fixed k (dynamic batch axis).
* :func:`export_switchable_onnx` writes ONE model with inputs ``input`` (image batch, dynamic batch axis) and
  ``k`` (an int64 scalar) that holds every weight once. Construction: each trained k is exported as a graph
  that reads *slices of the full weights* (the weights are exporter inputs, so the slices stay operators on
  the shared initializers) with its shape arithmetic folded into constants (:mod:`.onnx_fold`); a balanced
  tree of ``If`` nodes on ``k`` picks the graph. onnxruntime constant-folds each branch's weight slices when
  the session is created, so at run time every branch runs on pre-sliced (and pre-packed) weights, while the
  file stores the full weights once (about the size of the k = H file). A branch then runs the same optimised
  operators as the per-k file of its k (folded the same way); the ``If`` around it is what it costs on top.
  A k that is not trained fails in a top-level node named ``invalid_k_...`` listing the allowed values;
  :func:`run_switchable` checks k before calling.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.factory import UniversalModel
from ..storage.checkpoint import atomic_write

__all__ = ['ExportError', 'import_onnxruntime', 'SWITCHABLE_INPUTS', 'FixedK', 'export_universal_onnx',
           'export_switchable_onnx', 'check_switchable_onnx', 'run_switchable', 'switchable_ks']

SWITCHABLE_INPUTS = ('input', 'k')
K_CHOICES_KEY = 'hydravit_k_choices'  # metadata_props entry of the switchable file: the ks it holds


class ExportError(ValueError):
    """An export that would be wrong (output mismatch) or would overwrite something."""


def import_onnxruntime(why: str) -> Any:
    """onnxruntime, or an :class:`ExportError` that says what needs it and how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f'{why} with onnxruntime: pip install "hydravit[onnx]"') from e
    return onnxruntime


class FixedK(nn.Module):
    """The universal model at one k, for exporters that call ``forward(x)`` only."""

    def __init__(self, model: UniversalModel, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = model.resolve_k(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, k=self.k)


def _example(model: UniversalModel, batch: int = 2) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.in_chans, c.img_size, c.img_size)


def _export_at_k(model: UniversalModel, k: int, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings about the input shape checks
        torch.onnx.export(FixedK(model, k).cpu().eval(), (_example(model),), path, dynamo=False, opset_version=opset,
                          input_names=['input'], output_names=['logits'], do_constant_folding=True,
                          dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})


def export_universal_onnx(model: UniversalModel, k: int, path: str | os.PathLike, *, opset: int = 17) -> str:
    """The universal model at subnetwork ``k`` as ONNX (dynamic batch axis), weights folded to k's slices."""
    model.resolve_k(k)
    return str(atomic_write(path, lambda tmp: _export_at_k(model, k, tmp, opset)))


# ------------------------------------------------------------------------------------------ switchable
class _WeightsAsInputs(nn.Module):
    """The universal model at one k reading its weights from ``forward`` inputs, for the exporter.

    Exported with constant folding, its graph has the shape arithmetic folded by PyTorch while every weight
    slice stays an operator on a graph *input* (the full weight), which the switchable file maps to its one
    shared copy.
    """

    def __init__(self, model: UniversalModel, k: int, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.k = copy.deepcopy(model), model.resolve_k(k)
        self.slots: List[Tuple[nn.Module, str]] = []
        for name in names:
            owner, _, leaf = name.rpartition('.')
            module = self.model.get_submodule(owner)
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
            self.slots.append((module, leaf))

    def forward(self, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        for (module, leaf), weight in zip(self.slots, weights, strict=True):
            setattr(module, leaf, weight)
        return self.model(x, k=self.k)


def _model_tensors(model: UniversalModel) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: t.detach().cpu() for name, t in tensors.items()}


def _branch_source(model: UniversalModel, k: int, tensors: Dict[str, torch.Tensor], path: str, opset: int,
                   fold_shapes: bool) -> Any:
    """The graph of subnetwork k with inputs ``input`` and every full weight (by parameter name)."""
    import onnx

    from .onnx_fold import fold_shape_arithmetic, image_feeds

    names = list(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings about the input shape checks
        torch.onnx.export(_WeightsAsInputs(model, k, names).cpu().eval(), (_example(model), *tensors.values()), path,
                          dynamo=False, opset_version=opset, input_names=['input', *names], output_names=['logits'],
                          do_constant_folding=True, dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    source = onnx.load(path)
    if not fold_shapes:
        return source
    c = model.config
    weights = {name: t.numpy() for name, t in tensors.items()}
    return fold_shape_arithmetic(source, image_feeds(c.in_chans, c.img_size, weights), names)


class _SmallConstants:
    """The small constants of one branch (slice bounds, shapes, axes) as its own initializers, each value once.

    Local to the branch rather than shared at the top: every outer-scope value a branch reads is passed to each
    ``If`` on the way down at every call, and the constants are tiny (the file grows by under 1 %).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names: Dict[Tuple[int, Tuple[int, ...], bytes], str] = {}
        self.tensors: List[Any] = []

    def name_of(self, array: Any) -> str:
        from onnx import numpy_helper
        key = (array.dtype.num, tuple(array.shape), array.tobytes())
        if key not in self.names:
            self.names[key] = f'{self.prefix}c{len(self.tensors)}'
            self.tensors.append(numpy_helper.from_array(array, self.names[key]))
        return self.names[key]


def _constant_value(node: Any) -> Any:
    """The array of a ``Constant`` node with a tensor ``value`` (None for other forms)."""
    from onnx import numpy_helper
    attrs = {a.name: a for a in node.attribute}
    return numpy_helper.to_array(attrs['value'].t) if set(attrs) == {'value'} else None


def _branch(graph: Any, k: int, weights: Dict[str, str]) -> Any:
    """The graph of one k as an ``If`` branch: no inputs, short value names, the weights from outside.

    Its constants (initializers and ``Constant`` nodes) become the branch's own initializers, each value once.
    """
    from onnx import helper, numpy_helper

    constants = _SmallConstants(f'k{k}.')
    short: Dict[str, str] = {}
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    def rename(name: str) -> str:  # short value names: the graph of every k is stored, so its size counts
        if not name or name == 'input':
            return name
        if name in weights:
            return weights[name]
        if name in values:
            return constants.name_of(values[name])
        return short.setdefault(name, f'k{k}.{len(short)}')

    nodes = []
    for node in graph.node:
        if node.op_type == 'Constant' and _constant_value(node) is not None:
            values[node.output[0]] = _constant_value(node)
            continue
        new = helper.make_node(node.op_type, [rename(n) for n in node.input], [rename(n) for n in node.output],
                               domain=node.domain)
        new.attribute.extend(node.attribute)
        nodes.append(new)
    out = graph.output[0]
    output = helper.make_tensor_value_info(rename(out.name), out.type.tensor_type.elem_type, ['batch', None])
    return helper.make_graph(nodes, f'k{k}', [], [output], initializer=constants.tensors)


def _k_check(ks: Sequence[int]) -> Tuple[List[Any], List[Any]]:
    """Top-level nodes giving ``k_valid`` (= ``k``) that fail for a k outside ``ks``, naming the allowed values.

    ONNX has no raise operator: ``Gather`` fails on an out-of-range index. A table maps each k to 0 (trained)
    or 1, which is out of range for the one-element ``k_zero``; negative k land in the table's all-1 upper half.
    """
    import numpy as np
    from onnx import helper, numpy_helper
    name = f'invalid_k_allowed_{"_".join(str(k) for k in ks)}'
    table = np.ones(2 * (max(ks) + 1), dtype=np.int64)
    table[list(ks)] = 0
    initializers = [numpy_helper.from_array(table, 'k_table'), numpy_helper.from_array(np.zeros(1, np.int64), 'k_zero')]
    nodes = [helper.make_node('Gather', ['k_table', 'k'], ['k_index'], name=f'{name}/range'),
             helper.make_node('Gather', ['k_zero', 'k_index'], ['k_offset'], name=name),
             helper.make_node('Add', ['k', 'k_offset'], ['k_valid'])]
    return nodes, initializers


def _select(ks: Sequence[int], branches: Dict[int, Any], out_name: str, prefix: str) -> List[Any]:
    """Nodes that compute ``out_name`` from the branch of ``k_valid``: a balanced tree of ``If`` nodes.

    A single k is one ``If`` whose else branch is that k's graph too (``k_valid`` can only be that k).
    """
    from onnx import TensorProto, helper

    def constant(name: str, value: int) -> Any:
        return helper.make_node('Constant', [], [name], value=helper.make_tensor('v', TensorProto.INT64, [], [value]))

    if len(ks) == 1:
        k = ks[0]
        return [constant(f'{prefix}/is{k}/value', k),
                helper.make_node('Equal', ['k_valid', f'{prefix}/is{k}/value'], [f'{prefix}/is{k}']),
                helper.make_node('If', [f'{prefix}/is{k}'], [out_name], name=f'{prefix}/if_k{k}',
                                 then_branch=branches[k], else_branch=branches[k])]
    mid = (len(ks) + 1) // 2
    low, high = ks[:mid], ks[mid:]

    def subtree(part: Sequence[int], tag: str) -> Any:
        if len(part) == 1:
            return branches[part[0]]
        name = f'{prefix}{tag}'
        out = helper.make_tensor_value_info(f'{name}/logits', TensorProto.FLOAT, ['batch', None])
        return helper.make_graph(_select(part, branches, f'{name}/logits', name), name, [], [out])

    split = f'{prefix}/le{low[-1]}'
    return [constant(f'{split}/value', low[-1]),
            helper.make_node('LessOrEqual', ['k_valid', f'{split}/value'], [split]),
            helper.make_node('If', [split], [out_name], name=f'{prefix}/if_le{low[-1]}',
                             then_branch=subtree(low, 'L'), else_branch=subtree(high, 'H'))]


def build_switchable_model(model: UniversalModel, ks: Optional[Sequence[int]] = None, *, opset: int = 17,
                           fold_shapes: bool = True) -> Any:
    """The switchable ONNX model (an ``onnx.ModelProto``) of ``ks`` (default: every trained k).

    ``fold_shapes=False`` keeps the exporter's shape arithmetic in every branch (slower per call; for checking
    the folding, see :mod:`hydravit.deployment.onnx_fold`).
    """
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    chosen = model.resolve_ks(ks)
    if fold_shapes:
        import_onnxruntime('the switchable ONNX export folds shapes')
    tensors = _model_tensors(model)
    weights = {name: f'w{i}' for i, name in enumerate(tensors)}
    branches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in chosen:
            source = _branch_source(model, k, tensors, os.path.join(tmp, f'k{k}.onnx'), opset, fold_shapes)
            branches[k] = _branch(source.graph, k, weights)
    used = {name for branch in branches.values() for node in branch.node for name in node.input}
    initializers = [numpy_helper.from_array(t.numpy(), weights[name]) for name, t in tensors.items()
                    if weights[name] in used]
    c = model.config
    inputs = [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', c.in_chans, c.img_size, c.img_size]),
              helper.make_tensor_value_info('k', TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', c.num_classes or None])]
    check, check_tensors = _k_check(chosen)
    graph = helper.make_graph(check + _select(chosen, branches, 'logits', 'select'), 'hydravit_switchable', inputs,
                              outputs, initializer=initializers + check_tensors)
    opset_import = [helper.make_opsetid('', opset)]
    proto = helper.make_model(graph, opset_imports=opset_import, producer_name='hydravit')
    helper.set_model_props(proto, {K_CHOICES_KEY: ','.join(map(str, chosen))})
    onnx.checker.check_model(proto)
    return proto


def export_switchable_onnx(model: UniversalModel, path: str | os.PathLike, ks: Optional[Sequence[int]] = None, *,
                           opset: int = 17, atol: float = 1e-4, check_batch_sizes: Sequence[int] = (1, 3)
                           ) -> Dict[str, Any]:
    """Write the switchable file and check every k against PyTorch with onnxruntime; returns the check."""
    import onnx
    proto = build_switchable_model(model.eval(), ks, opset=opset)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    diffs = check_switchable_onnx(model, path, check_batch_sizes, atol)
    return {'onnx_switchable': str(path), 'onnx_switchable_max_abs_diff': max(diffs.values()),
            'onnx_switchable_diffs': diffs}


def switchable_ks(session: Any) -> List[int]:
    """The ks a switchable file holds (from its metadata)."""
    text = session.get_modelmeta().custom_metadata_map.get(K_CHOICES_KEY)
    if not text:
        raise ValueError(f'not a switchable HydraViT ONNX file: no {K_CHOICES_KEY!r} metadata')
    return [int(v) for v in text.split(',')]


def run_switchable(session: Any, x: Any, k: int) -> Any:
    """Logits of subnetwork ``k`` from a switchable file's onnxruntime session (``k`` checked first)."""
    import numpy as np

    from ..models.kchoices import check_k
    k = check_k(k, switchable_ks(session))
    return session.run(None, {'input': x, 'k': np.array(k, dtype=np.int64)})[0]


def check_switchable_onnx(model: UniversalModel, path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 3),
                          atol: float = 1e-4) -> Dict[int, float]:
    """Max abs difference between onnxruntime and PyTorch per k of a switchable file; ExportError above ``atol``."""
    ort = import_onnxruntime('ONNX export is checked')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(0)
    diffs: Dict[int, float] = {}
    c = model.config
    for k in switchable_ks(session):
        worst = 0.0
        for b in batch_sizes:
            x = torch.randn(b, c.in_chans, c.img_size, c.img_size, generator=g)
            with torch.inference_mode():
                expected = model(x, k=k)
            got = torch.from_numpy(run_switchable(session, x.numpy(), k))
            worst = max(worst, (got - expected).abs().max().item())
        diffs[k] = worst
    bad = {k: d for k, d in diffs.items() if d > atol}
    if bad:
        raise ExportError(f'{path}: onnxruntime differs from PyTorch by more than {atol:.0e} at k={sorted(bad)} '
                          f'(max {max(bad.values()):.2e})')
    return diffs
