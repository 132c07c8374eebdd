"""Fold the shape arithmetic of a dynamic-batch ONNX graph into constants.

The TorchScript exporter spells every ``x.shape`` read as ``Shape -> Gather/Slice -> Cast/Sqrt/Div/Concat`` nodes
(batch of a reshape, the attention scale ``1 / sqrt(head_dim)``, ...). With a dynamic batch axis onnxruntime
cannot fold them (``Shape`` of a tensor with a symbolic dimension is not a constant), so every call runs a few
dozen tiny operators. :func:`fold_shape_arithmetic` finds the values that depend on tensor *shapes* only (their
inputs reach the graph inputs only through ``Shape``), runs the graph at batch 1, 2 and 3 and

* replaces each value that is the same at every batch by a constant;
* replaces each 1-D shape vector read only as a ``Reshape`` target and changing in one element (the batch, or a
  product with it) by a constant with ``-1`` there, which ``Reshape`` infers.

Nodes nobody needs any more are dropped. The result computes the same function; callers check it (the
switchable export compares every k against PyTorch).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Set

import numpy as np

__all__ = ['fold_shape_arithmetic', 'image_feeds']

PROBE_BATCHES = (1, 2, 3)
MAX_FOLDED_ELEMENTS = 1024  # shape arithmetic is tiny; anything larger stays computed


def image_feeds(in_chans: int, img_size: int, extra: Mapping[str, Any] | None = None
                ) -> Callable[[int], Dict[str, Any]]:
    """``feeds_at_batch`` for a graph whose input ``input`` is an image batch (plus fixed ``extra`` feeds)."""
    def feeds(batch: int) -> Dict[str, Any]:
        x = np.random.default_rng(batch).standard_normal((batch, in_chans, img_size, img_size), dtype=np.float32)
        return {'input': x, **(extra or {})}
    return feeds


def _content_values(graph: Any, inputs: Set[str]) -> Set[str]:
    """Values that depend on the contents of ``inputs`` (``Shape`` reads only the shape)."""
    content = set(inputs)
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type != 'Shape' and any(name in content for name in node.input if name):
            content.update(node.output)
    return content


def _probe(model: Any, names: Sequence[str], feeds_at_batch: Callable[[int], Mapping[str, Any]]
           ) -> List[Dict[str, np.ndarray]]:
    """The values ``names`` at each probe batch size (onnxruntime, graph optimisations off to keep names)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(probe)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    wanted = [n for n in names if types.get(n)]
    for name in wanted:
        probe.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=['CPUExecutionProvider'])
    outputs = [o.name for o in probe.graph.output]
    runs = []
    for batch in PROBE_BATCHES:
        values = dict(zip(outputs, session.run(None, dict(feeds_at_batch(batch))), strict=True))
        runs.append({n: np.asarray(values[n]) for n in wanted})
    return runs


def _folded_value(values: Sequence[np.ndarray], reshape_target_only: bool) -> Any:
    """The constant standing for a value seen at every probe batch, or None when it must stay computed."""
    first = values[0]
    if first.size > MAX_FOLDED_ELEMENTS or any(v.shape != first.shape or v.dtype != first.dtype for v in values):
        return None
    if all(np.array_equal(first, v) for v in values[1:]):
        return first
    if reshape_target_only and first.dtype == np.int64 and first.ndim == 1:
        changing = np.flatnonzero(np.any([v != first for v in values[1:]], axis=0))
        if len(changing) == 1 and not np.isin(first, (0, -1)).any():
            target = first.copy()
            target[changing[0]] = -1
            return target
    return None


def fold_shape_arithmetic(model: Any, feeds_at_batch: Callable[[int], Mapping[str, Any]],
                          content_inputs: Sequence[str] = ()) -> Any:
    """``model`` (an ``onnx.ModelProto``) with its shape-only values folded; see the module docstring.

    ``feeds_at_batch(b)`` gives the graph's input feeds at batch size ``b``; ``content_inputs`` names further
    values (besides the graph inputs) whose contents matter, e.g. weights passed as inputs.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    content = _content_values(graph, {i.name for i in graph.input} | set(content_inputs))
    shape_only = [o for node in graph.node for o in node.output if o and o not in content]
    readers: Dict[str, List[Any]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, position))
    runs = _probe(model, shape_only, feeds_at_batch)
    folded: Dict[str, np.ndarray] = {}
    for name in runs[0]:
        reshape_target_only = bool(readers.get(name)) and all(r == ('Reshape', 1) for r in readers[name])
        value = _folded_value([run[name] for run in runs], reshape_target_only)
        if value is not None:
            folded[name] = value
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed and o not in folded for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i and i not in folded)
    kept.reverse()
    used = {i for node in kept for i in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    initializers += [numpy_helper.from_array(value, name) for name, value in folded.items() if name in used]
    new_graph = helper.make_graph(kept, graph.name, list(graph.input), list(graph.output), initializer=initializers)
    folded_model = helper.make_model(new_graph, opset_imports=list(model.opset_import))
    onnx.checker.check_model(folded_model)
    return folded_model
