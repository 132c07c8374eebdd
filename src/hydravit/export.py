"""Standalone subnetworks out of one universal checkpoint, in the formats deployments load.

* ``timm``: a folder per k that ``timm.create_model('local-dir:DIR/k3', pretrained=True)`` loads
  (``config.json`` + ``model.safetensors``, written with timm's own ``save_config_for_hf``), with the
  training preprocessing in its ``pretrained_cfg`` and a ``hydravit.json`` naming the parent checkpoint.
* ``safetensors``: ``k3.safetensors``, the subnet state dict with the ViT kwargs and preprocessing in
  its metadata.
* ``onnx``: ``k3.onnx`` with a dynamic batch axis, checked against PyTorch with onnxruntime.

Every export also writes ``index.csv`` / ``index.json``: one row per k with params, GMACs and the
accuracy measured for the parent checkpoint where a results file is known.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.models._hub import save_config_for_hf

from .checkpoint import atomic_write, load_model, read_metadata
from .costs import subnet_cost
from .evaluate import resolve_checkpoint
from .model import HydraViT
from .report import read_results, write_results
from .subnet import extract_subnet, model_subnet_state_dict, subnet_vit_kwargs

__all__ = [
    'EXPORT_FORMATS', 'TIMM_ARCHITECTURE', 'PREPROCESSING_KEYS', 'ExportError', 'preprocessing_config',
    'read_accuracy', 'file_sha256', 'export_timm', 'export_safetensors', 'export_onnx', 'export_subnets',
    'parse_ks',
]

EXPORT_FORMATS = ('timm', 'safetensors', 'onnx')
# timm architecture written to config.json; model_args override every shape argument of its factory
TIMM_ARCHITECTURE = 'vit_base_patch16_224'
PREPROCESSING_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'num_classes',
                      'fixed_input_size', 'first_conv', 'classifier')
PRETRAINED_CFG_KEY = 'pretrained_cfg'  # optional safetensors metadata written by training
TRAIN_CONFIG_KEY = 'train_config'  # the trainer's config (JSON, with the registered model name)
RESULTS_NAMES = ('results.csv', 'results.json', 'eval.csv', 'eval.json')
ACCURACY_KEYS = ('top1', 'top1_err', 'top5', 'top5_err', 'loss')
ONNX_ATOL = 1e-4


class ExportError(ValueError):
    """An export that would be wrong (output mismatch) or would overwrite something."""


# ------------------------------------------------------------------------------------------ inputs
def parse_ks(values: Sequence[str | int], model: HydraViT) -> List[int]:
    """``['all']`` -> the trained k; otherwise each k validated against the model's ``k_choices``."""
    if [str(v) for v in values] == ['all']:
        return list(model.k_choices)
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"k must be 'all' or integers from {list(model.k_choices)}, got {list(values)}") from None
    return sorted({model.resolve_k(k) for k in ints})


def _registered_cfg(name: str) -> Dict[str, Any]:
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f'unknown model {name!r}: cannot read its default preprocessing')
    return cfg.to_dict()


def _matching_registered_cfgs(model: HydraViT) -> Dict[str, Dict[str, Any]]:
    """Registered HydraViT default cfgs whose input size and class count fit ``model``."""
    c = model.config
    found = {}
    for name in timm.list_models('hydravit_*'):
        cfg = _registered_cfg(name)
        if tuple(cfg['input_size']) == (c.in_chans, c.img_size, c.img_size) and cfg['num_classes'] == c.num_classes:
            found[name] = cfg
    return found


def preprocessing_config(checkpoint: str | os.PathLike, model: HydraViT,
                         model_name: Optional[str] = None) -> Dict[str, Any]:
    """The preprocessing used in training (mean/std/input size/interpolation/crop), and where it came from.

    In order: ``pretrained_cfg`` JSON in the checkpoint metadata; the default cfg of ``model_name``; of
    the ``model`` named in the trainer's ``train_config`` metadata or in the run's ``args.yaml``; of the
    one registered HydraViT whose input size and class count match. Anything else is an error:
    guessing the normalisation silently costs accuracy.
    """
    path = Path(checkpoint)
    meta = read_metadata(path)
    source, cfg = None, None
    if PRETRAINED_CFG_KEY in meta:
        source, cfg = f'{path.name} metadata', json.loads(meta[PRETRAINED_CFG_KEY])
    elif model_name:
        source, cfg = f'model {model_name}', _registered_cfg(model_name)
    elif json.loads(meta.get(TRAIN_CONFIG_KEY, '{}')).get('model'):
        name = json.loads(meta[TRAIN_CONFIG_KEY])['model']
        source, cfg = f'model {name} (training config in {path.name})', _registered_cfg(name)
    elif (path.parent / 'args.yaml').is_file():
        name = (yaml.safe_load((path.parent / 'args.yaml').read_text()) or {}).get('model')
        if name:
            source, cfg = f'model {name} (args.yaml)', _registered_cfg(name)
    if cfg is None:
        matches = _matching_registered_cfgs(model)
        if len(matches) != 1:
            raise ValueError(
                f'{path}: no preprocessing stored with the checkpoint (no {PRETRAINED_CFG_KEY!r} metadata, no '
                f'args.yaml) and {len(matches)} registered models match its input size; pass the model name '
                f'(--model) whose mean/std/interpolation were used in training')
        (name, cfg), = matches.items()
        source = f'model {name} (matched by input size and classes)'
    out = {k: cfg[k] for k in PREPROCESSING_KEYS if cfg.get(k) is not None}
    c = model.config
    out.update(input_size=(c.in_chans, c.img_size, c.img_size), num_classes=c.num_classes)
    for key in ('mean', 'std'):
        if key not in out or len(out[key]) != c.in_chans:
            raise ValueError(f'preprocessing from {source}: {key}={out.get(key)} does not have in_chans={c.in_chans} '
                             'values')
        out[key] = tuple(float(v) for v in out[key])
    out['source'] = source
    return out


def _results_file(checkpoint: Path, results: Optional[str | os.PathLike]) -> Optional[Path]:
    if results:
        return Path(results)
    return next((checkpoint.parent / n for n in RESULTS_NAMES if (checkpoint.parent / n).is_file()), None)


def read_accuracy(checkpoint: str | os.PathLike, results: Optional[str | os.PathLike] = None,
                  use_ema: Optional[bool] = None) -> Dict[int, Dict[str, float]]:
    """Per-k accuracy columns of ``results`` (or a results/eval file next to the checkpoint); {} if none.

    A training ``results.csv`` with ``ema_*`` columns: EMA numbers are used for an ``*_ema`` checkpoint.
    """
    path = _results_file(Path(checkpoint), results)
    if path is None:
        return {}
    rows = read_results(path)
    if rows and 'k' not in rows[0]:
        raise ValueError(f'{path}: results file has no k column (columns: {list(rows[0])})')
    ema = Path(checkpoint).stem.endswith('_ema') if use_ema is None else use_ema
    out = {}
    for row in rows:
        if row.get('mode') not in (None, '', 'sliced'):  # eval files may hold an 'extracted' row per k too
            continue
        picked = {key: row.get(f'ema_{key}') if ema and row.get(f'ema_{key}') is not None else row.get(key)
                  for key in ACCURACY_KEYS}
        out[int(row['k'])] = {key: float(v) for key, v in picked.items() if v is not None}
    out = {k: v for k, v in out.items() if v}
    if out:
        out = {k: {**v, 'results_file': str(path)} for k, v in out.items()}
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ formats
def _subnet_tensors(model: HydraViT, k: int) -> Dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in model_subnet_state_dict(model, k).items()}


def _timm_vit(model: HydraViT, k: int, preprocessing: Mapping[str, Any]) -> torch.nn.Module:
    """Subnetwork k built by timm's own factory, so it records its architecture and model args."""
    cfg = {key: v for key, v in preprocessing.items() if key in PREPROCESSING_KEYS}
    vit = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, pretrained_cfg=cfg,
                            **subnet_vit_kwargs(model.config, k))
    vit.load_state_dict(_subnet_tensors(model, k), strict=True)
    return vit.eval()


def _write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + '\n'))


def export_timm(model: HydraViT, k: int, folder: str | os.PathLike, preprocessing: Mapping[str, Any],
                info: Optional[Mapping[str, Any]] = None, label_names: Optional[Sequence[str]] = None) -> Path:
    """``folder`` loadable with ``timm.create_model('local-dir:' + folder, pretrained=True)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vit = _timm_vit(model, model.resolve_k(k), preprocessing)
    extra = {'label_names': list(label_names)} if label_names else None
    atomic_write(folder / 'config.json', lambda tmp: save_config_for_hf(vit, tmp, model_config=extra))
    atomic_write(folder / 'model.safetensors', lambda tmp: save_file(vit.state_dict(), tmp))
    _write_json(folder / 'hydravit.json', {'k': k, **(info or {})})
    return folder


def export_safetensors(model: HydraViT, k: int, path: str | os.PathLike, preprocessing: Mapping[str, Any],
                       info: Optional[Mapping[str, Any]] = None) -> Path:
    """Subnet state dict (timm names) with ``vit_kwargs``, ``pretrained_cfg`` and ``hydravit`` JSON metadata."""
    k = model.resolve_k(k)
    meta = {'format': 'pt', 'vit_kwargs': json.dumps(subnet_vit_kwargs(model.config, k)),
            PRETRAINED_CFG_KEY: json.dumps(dict(preprocessing)), 'hydravit': json.dumps({'k': k, **(info or {})})}
    tensors = _subnet_tensors(model, k)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def export_onnx(model: HydraViT, k: int, path: str | os.PathLike, *, opset: int = 17,
                atol: float = ONNX_ATOL, check_batch_sizes: Sequence[int] = (1, 3)) -> Dict[str, Any]:
    """Write subnetwork k (the extracted timm ViT) as ONNX and check it with onnxruntime.

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter needs onnxscript, which is
    not a dependency. Raises :class:`ExportError` if outputs differ by more than ``atol``.
    """
    vit = extract_subnet(model, k).cpu()
    c = model.config
    example = torch.randn(2, c.in_chans, c.img_size, c.img_size)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about timm's shape asserts
            torch.onnx.export(vit, (example,), tmp, dynamo=False, opset_version=opset, input_names=['input'],
                              output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})

    atomic_write(path, write)
    return {'onnx_max_abs_diff': check_onnx(vit, path, check_batch_sizes, atol)}


def check_onnx(reference: torch.nn.Module, path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 3),
               atol: float = ONNX_ATOL) -> float:
    """Max abs difference between onnxruntime and ``reference`` over ``batch_sizes`` (dynamic axis check)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError('ONNX export is checked with onnxruntime: pip install "hydravit[onnx]"') from e
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
        use_ema: bool = False,
) -> List[Dict[str, Any]]:
    """Export subnetworks ``ks`` of ``checkpoint`` (a file or a run folder) in ``formats``; returns the index.

    ``output`` must not exist or be empty unless ``overwrite`` (files of the same name are replaced;
    nothing else in it is deleted).
    """
    formats = _check_formats(formats)
    checkpoint = resolve_checkpoint(checkpoint, use_ema)
    model = load_model(checkpoint).eval()
    ks = parse_ks(ks, model)
    output = Path(output)
    preprocessing = preprocessing_config(checkpoint, model, model_name)
    accuracy = read_accuracy(checkpoint, results)
    label_names = json.loads(read_metadata(checkpoint).get('class_names') or 'null')
    _prepare_output(output, overwrite)
    parent = {'parent_checkpoint': str(checkpoint.resolve()), 'parent_sha256': file_sha256(checkpoint),
              'parent_config': model.config.to_dict()}
    rows = []
    for k in ks:
        cost = subnet_cost(model.config, k)
        costs = {**cost.to_dict(), 'params_m': cost.params_m, 'gmacs': cost.gmacs}  # unrounded: tiny models
        info = {**parent, 'metrics': {**costs, **accuracy.get(k, {})}, 'pretrained_cfg': preprocessing}
        row: Dict[str, Any] = dict(k=k, embed_dim=cost.embed_dim, num_heads=cost.num_heads, param_count=cost.params_m,
                                   gmacs=cost.gmacs, **{a: accuracy.get(k, {}).get(a) for a in ('top1', 'top5')})
        for fmt in formats:
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
