"""Standalone subnetworks out of one universal checkpoint, in the formats deployments load.

* ``timm``: a folder per k that ``timm.create_model('local-dir:DIR/k3', pretrained=True)`` loads
  (``config.json`` + ``model.safetensors``, written with timm's own ``save_config_for_hf``), with the
  training preprocessing in its ``pretrained_cfg`` and a ``hydravit.json`` naming the parent checkpoint.
* ``safetensors``: ``k3.safetensors``, the subnet state dict with the ViT kwargs and preprocessing in
  its metadata.
* ``onnx``: ``k3.onnx`` with a dynamic batch axis, checked against PyTorch with onnxruntime.
* ``onnx-switchable``: one ``switchable.onnx`` for every exported k, inputs ``input`` and ``k`` (an int64
  scalar), the weights stored once (:mod:`hydravit.deployment.onnx_switchable`); every k checked likewise.

An early-exit cascade (:mod:`hydravit.cascade`) exports as ``cascade.json`` (the policy, and per stage its k,
ONNX file, MACs and checksum) beside one ONNX file per stage (:func:`export_cascade`); the runtime in
:mod:`hydravit.deployment.cascade_runtime` executes it with onnxruntime alone.

Every export also writes ``index.csv`` / ``index.json``: one row per k with params, GMACs and the
accuracy measured for the parent checkpoint where a results file is known.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from ..cascade.policy import CascadePolicy
from ..models.costs import cost_row, subnet_cost
from ..models.factory import UniversalModel
from ..models.kchoices import parse_ks
from ..models.subnet import extract_subnet, model_subnet_state_dict, subnet_vit_kwargs
from ..storage.checkpoint import atomic_write, load_model, read_metadata
from ..storage.results import write_results
from ..storage.run_folder import (
    CLASS_NAMES_KEY,
    PREPROCESSING_KEYS,
    PRETRAINED_CFG_KEY,
    preprocessing_config,
    read_accuracy,
    resolve_checkpoint,
)
from .onnx_fold import fold_shape_arithmetic, image_feeds
from .onnx_switchable import ExportError, export_switchable_onnx, import_onnxruntime

__all__ = ['EXPORT_FORMATS', 'TIMM_ARCHITECTURE', 'ExportError', 'file_sha256', 'export_timm', 'export_safetensors',
           'export_onnx', 'export_subnets', 'export_cascade', 'CASCADE_MANIFEST', 'CASCADE_ARTEFACTS']

EXPORT_FORMATS = ('timm', 'safetensors', 'onnx', 'onnx-switchable')
SWITCHABLE_FILE = 'switchable.onnx'
# timm architecture written to config.json; model_args override every shape argument of its factory
TIMM_ARCHITECTURE = 'vit_base_patch16_224'
ONNX_ATOL = 1e-4
CASCADE_MANIFEST = 'cascade.json'
# how a cascade's stages are stored; the runtime has one loader per artefact kind
CASCADE_ARTEFACTS = ('per-stage-onnx',)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ formats
def _subnet_tensors(model: UniversalModel, k: int) -> Dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in model_subnet_state_dict(model, k).items()}


def _timm_vit(model: UniversalModel, k: int, preprocessing: Mapping[str, Any]) -> torch.nn.Module:
    """Subnetwork k built by timm's own factory, so it records its architecture and model args."""
    cfg = {key: v for key, v in preprocessing.items() if key in PREPROCESSING_KEYS}
    vit = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, pretrained_cfg=cfg,
                            **subnet_vit_kwargs(model.config, k))
    vit.load_state_dict(_subnet_tensors(model, k), strict=True)
    return vit.eval()


def _write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + '\n'))


def export_timm(model: UniversalModel, k: int, folder: str | os.PathLike, preprocessing: Mapping[str, Any],
                info: Optional[Mapping[str, Any]] = None, label_names: Optional[Sequence[str]] = None) -> Path:
    """``folder`` loadable with ``timm.create_model('local-dir:' + folder, pretrained=True)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vit = _timm_vit(model, model.resolve_k(k), preprocessing)
    extra = {'label_names': list(label_names)} if label_names else None
    with tempfile.TemporaryDirectory(prefix='.export-', dir=folder) as tmp:  # then renamed in: never half-written
        save_for_hf(vit, tmp, model_config=extra, safe_serialization=True)
        for name in ('config.json', 'model.safetensors'):
            atomic_write(folder / name, partial(shutil.copyfile, Path(tmp) / name))  # dst: atomic_write's temp file
    _write_json(folder / 'hydravit.json', {'k': k, **(info or {})})
    return folder


def export_safetensors(model: UniversalModel, k: int, path: str | os.PathLike, preprocessing: Mapping[str, Any],
                       info: Optional[Mapping[str, Any]] = None) -> Path:
    """Subnet state dict (timm names) with ``vit_kwargs``, ``pretrained_cfg`` and ``hydravit`` JSON metadata."""
    k = model.resolve_k(k)
    meta = {'format': 'pt', 'vit_kwargs': json.dumps(subnet_vit_kwargs(model.config, k)),
            PRETRAINED_CFG_KEY: json.dumps(dict(preprocessing)), 'hydravit': json.dumps({'k': k, **(info or {})})}
    tensors = _subnet_tensors(model, k)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def export_onnx(model: UniversalModel, k: int, path: str | os.PathLike, *, opset: int = 17,
                atol: float = ONNX_ATOL, check_batch_sizes: Sequence[int] = (1, 3),
                fold_shapes: bool = True) -> Dict[str, Any]:
    """Write subnetwork k (the extracted timm ViT) as ONNX and check it with onnxruntime.

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter needs onnxscript, which is
    not a dependency. ``fold_shapes`` folds the exporter's shape arithmetic into constants
    (:mod:`.onnx_fold`): the same function with a few dozen operators fewer per call, which is what makes
    small batches faster. Raises :class:`ExportError` if outputs differ by more than ``atol``.
    """
    import_onnxruntime('ONNX export is checked')
    vit = extract_subnet(model, k).cpu()
    c = model.config
    example = torch.randn(2, c.in_chans, c.img_size, c.img_size)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about timm's shape asserts
            torch.onnx.export(vit, (example,), tmp, dynamo=False, opset_version=opset, input_names=['input'],
                              output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
        if fold_shapes:
            import onnx
            proto = onnx.load(tmp)
            onnx.save(fold_shape_arithmetic(proto, image_feeds(c.in_chans, c.img_size),
                                            [t.name for t in proto.graph.initializer]), tmp)

    atomic_write(path, write)
    return {'onnx_max_abs_diff': check_onnx(vit, path, check_batch_sizes, atol)}


def check_onnx(reference: torch.nn.Module, path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 3),
               atol: float = ONNX_ATOL) -> float:
    """Max abs difference between onnxruntime and ``reference`` over ``batch_sizes`` (dynamic axis check)."""
    ort = import_onnxruntime('ONNX export is checked')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    shape = session.get_inputs()[0].shape
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, *shape[1:], generator=g)
        with torch.inference_mode():
            expected = reference(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        worst = max(worst, (got - expected).abs().max().item())
    if worst > atol:
        raise ExportError(f'{path}: onnxruntime differs from PyTorch by {worst:.2e} > {atol:.0e}')
    return worst


# ------------------------------------------------------------------------------------------ main API
def _check_formats(formats: Sequence[str]) -> List[str]:
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ValueError(f'unknown export format {bad or formats}: choose one or more of {list(EXPORT_FORMATS)}')
    return list(dict.fromkeys(formats))


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f'output {output} exists and is not a folder')
    if output.is_dir() and not overwrite:
        raise ExportError(f'output folder {output} already exists; pass --overwrite to write the exported files '
                          'into it (files of the same name are replaced)')
    output.mkdir(parents=True, exist_ok=True)


def export_subnets(
        checkpoint: str | os.PathLike,
        ks: Sequence[str | int] = ('all',),
        formats: Sequence[str] = ('timm',),
        output: str | os.PathLike = 'exported',
        *,
        results: Optional[str | os.PathLike] = None,
        model_name: Optional[str] = None,
        overwrite: bool = False,
        onnx_opset: int = 17,
        use_ema: Optional[bool] = None,
) -> List[Dict[str, Any]]:
    """Export subnetworks ``ks`` of ``checkpoint`` (a file or a run folder) in ``formats``; returns the index.

    ``output`` must not exist or be empty unless ``overwrite`` (files of the same name are replaced;
    nothing else in it is deleted).
    """
    formats = _check_formats(formats)
    checkpoint = resolve_checkpoint(checkpoint, use_ema)
    model = load_model(checkpoint, model_name=model_name, use_ema=use_ema).eval()
    chosen = parse_ks(ks, model.k_choices, model.config.num_heads) or list(model.k_choices)
    output = Path(output)
    preprocessing = preprocessing_config(checkpoint, model, model_name)
    accuracy = read_accuracy(checkpoint, results)
    label_names = json.loads(read_metadata(checkpoint).get(CLASS_NAMES_KEY) or 'null')
    _prepare_output(output, overwrite)
    parent = {'parent_checkpoint': str(checkpoint.resolve()), 'parent_sha256': file_sha256(checkpoint),
              'parent_config': model.config.to_dict()}
    rows = []
    per_k_formats = [f for f in formats if f != 'onnx-switchable']
    switchable: Dict[str, Any] = {}
    if 'onnx-switchable' in formats:
        switchable = export_switchable_onnx(model, output / SWITCHABLE_FILE, chosen, opset=onnx_opset)
    for k in chosen:
        costs = cost_row(model.config, k)
        info = {**parent, 'metrics': {**costs, **accuracy.get(k, {})}, PRETRAINED_CFG_KEY: preprocessing}
        row: Dict[str, Any] = dict(**costs, **{a: accuracy.get(k, {}).get(a) for a in ('top1', 'top5')})
        if switchable:
            row.update(onnx_switchable=switchable['onnx_switchable'],
                       onnx_switchable_max_abs_diff=switchable['onnx_switchable_diffs'][k])
        for fmt in per_k_formats:
            start = time.perf_counter()
            if fmt == 'timm':
                row['timm_dir'] = str(export_timm(model, k, output / f'k{k}', preprocessing, info, label_names))
            elif fmt == 'safetensors':
                row['safetensors'] = str(export_safetensors(model, k, output / f'k{k}.safetensors', preprocessing,
                                                            info))
            else:
                row.update(export_onnx(model, k, output / f'k{k}.onnx', opset=onnx_opset))
                row['onnx'] = str(output / f'k{k}.onnx')
            row[f'{fmt}_export_s'] = time.perf_counter() - start
        rows.append(row)
    index = [{**r, 'parent_sha256': parent['parent_sha256']} for r in rows]
    write_results(index, output, 'index', 'csv', verbose=False)
    write_results(index, output, 'index', 'json', verbose=False)
    return index


def export_cascade(checkpoint: str | os.PathLike, policy: CascadePolicy, output: str | os.PathLike, *,
                   model_name: Optional[str] = None, overwrite: bool = False, onnx_opset: int = 17,
                   use_ema: Optional[bool] = None) -> Dict[str, Any]:
    """``output/cascade.json`` and one checked ONNX file per stage (``k3.onnx``, ...): a deployable cascade.

    The manifest holds the policy, the preprocessing, and per stage its k, file, MACs and SHA-256, so
    :class:`hydravit.deployment.cascade_runtime.OnnxCascade` needs no checkpoint and no torch model.
    """
    checkpoint = resolve_checkpoint(checkpoint, use_ema)
    model = load_model(checkpoint, model_name=model_name, use_ema=use_ema).eval()
    policy.check_ks(model.k_choices, model.config.num_heads)
    preprocessing = preprocessing_config(checkpoint, model, model_name)
    output = Path(output)
    _prepare_output(output, overwrite)
    stages = []
    for k in policy.ks:
        path = output / f'k{k}.onnx'
        checked = export_onnx(model, k, path, opset=onnx_opset)
        stages.append(dict(k=k, onnx=path.name, macs=subnet_cost(model.config, k).macs, sha256=file_sha256(path),
                           **checked))
    manifest = dict(artefact=CASCADE_ARTEFACTS[0], policy=policy.to_dict(), stages=stages,
                    pretrained_cfg=preprocessing, parent_checkpoint=str(checkpoint.resolve()),
                    parent_sha256=file_sha256(checkpoint))
    _write_json(output / CASCADE_MANIFEST, manifest)
    return manifest
