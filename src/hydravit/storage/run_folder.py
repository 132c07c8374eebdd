"""A training run's folder: what the trainer writes there (timm's layout) and how other commands read it back.

Layout: ``args.yaml`` (the settings), ``summary.csv`` (one row per epoch), ``last[_ema].safetensors`` and
``last.state.pth`` (resumable state), ``model_best[_ema].safetensors``, ``results.csv`` (per-k table),
``teacher.safetensors`` (DynaBERT's frozen teacher) and ``report/``. Every weights file carries in its
metadata the model config, the class names, the training settings and the resolved data config
(timm ``pretrained_cfg`` fields), so a checkpoint copied out of its folder still knows its preprocessing.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import yaml
from timm.models import get_pretrained_cfg

from ..models.factory import UniversalModel, create_model
from .checkpoint import OFFICIAL_MODELS, atomic_write, is_hydravit_file, load_model, read_metadata
from .results import read_results, table_columns

__all__ = [
    'RunFolder', 'resolve_checkpoint', 'load_or_create_model', 'preprocessing_config', 'read_accuracy',
    'accuracy_context', 'training_metadata', 'write_summary', 'read_summary', 'accuracy_file', 'PREPROCESSING_KEYS',
    'PRETRAINED_CFG_KEY', 'TRAIN_CONFIG_KEY', 'CLASS_NAMES_KEY', 'EPOCHS_KEY',
]

PathLike = Union[str, os.PathLike]
STATE_FILE = 'last.state.pth'
CHECKPOINT_PREFERENCE = ('model_best', 'last')  # what a run folder resolves to, in order
RESULTS_NAMES = ('results.csv', 'results.json', 'eval.csv', 'eval.json')  # accuracy files next to a checkpoint
ACCURACY_KEYS = ('top1', 'top1_err', 'top5', 'top5_err', 'loss')
# checkpoint metadata written by the trainer
PRETRAINED_CFG_KEY = 'pretrained_cfg'
TRAIN_CONFIG_KEY = 'train_config'
CLASS_NAMES_KEY = 'class_names'
EPOCHS_KEY = 'epochs_completed'
PREPROCESSING_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'num_classes',
                      'fixed_input_size', 'first_conv', 'classifier')


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (they need not exist yet)."""
    path: Path

    def weights(self, name: str, ema: bool = False) -> Path:
        """``name[_ema].safetensors``: ``name`` is ``last``, ``model_best`` or ``teacher``."""
        return self.path / f'{name}{"_ema" if ema else ""}.safetensors'

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def args(self) -> Path:
        return self.path / 'args.yaml'

    @property
    def summary(self) -> Path:
        return self.path / 'summary.csv'

    @property
    def results(self) -> Path:
        return self.path / 'results.csv'

    @property
    def plot(self) -> Path:
        return self.path / 'accuracy_vs_gmacs.png'

    @property
    def report(self) -> Path:
        return self.path / 'report'

    @property
    def teacher(self) -> Path:
        return self.weights('teacher')

    def is_finished(self) -> bool:
        return self.results.is_file()

    def is_resumable(self) -> bool:
        return self.state.is_file()

    def write_args(self, settings: Mapping[str, Any]) -> Path:
        text = yaml.safe_dump(dict(settings), sort_keys=False)
        return atomic_write(self.args, lambda tmp: Path(tmp).write_text(text))

    def read_args(self) -> Dict[str, Any]:
        """The settings of ``args.yaml`` ({} when the folder has none)."""
        if not self.args.is_file():
            return {}
        data = yaml.safe_load(self.args.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f'{self.args}: expected a YAML mapping of setting: value')
        return data


def resolve_checkpoint(path: PathLike, use_ema: Optional[bool] = False) -> Path:
    """A checkpoint file from a file or a run folder (``model_best`` then ``last``); ``_ema`` twin if asked.

    A file from elsewhere (timm ``CheckpointSaver`` ``.pth.tar``, a state dict) is returned as it is: its EMA
    weights, if any, are inside it and chosen when it is loaded.
    """
    path = Path(path)
    if path.is_dir():
        run = RunFolder(path)
        found = next((run.weights(n) for n in CHECKPOINT_PREFERENCE if run.weights(n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f'run folder {path} holds none of '
                                    f'{[run.weights(n).name for n in CHECKPOINT_PREFERENCE]}')
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if use_ema and not path.stem.endswith('_ema') and is_hydravit_file(path):
        ema = path.with_name(f'{path.stem}_ema{path.suffix}')
        if not ema.is_file():
            raise FileNotFoundError(f'--use-ema: no EMA checkpoint {ema.name} next to {path} (train with EMA)')
        path = ema
    return path


def load_or_create_model(model_name: Optional[str] = None, checkpoint: Optional[PathLike] = None,
                         use_ema: Optional[bool] = None, **kwargs: Any) -> Tuple[UniversalModel, Optional[Path]]:
    """A registered model (``--model``), or the model of a checkpoint file or run folder (``--checkpoint``).

    Any checkpoint :func:`hydravit.storage.load_model` reads (timm ``CheckpointSaver`` files, timm ViT state
    dicts) works; ``use_ema``: True for the EMA weights (a run's ``_ema`` twin, or inside the file), False
    for the raw ones, None for the file's own choice (EMA inside a file holding both). Both given: the
    checkpoint's weights in the architecture of ``model_name``, which must agree with the file's
    (:func:`hydravit.storage.checkpoint.check_model_agrees`).
    Returns the model and the checkpoint file it came from (None for a registered model).
    """
    if checkpoint:
        path = resolve_checkpoint(checkpoint, use_ema)
        return load_model(path, model_name=model_name, use_ema=use_ema, **kwargs), path
    if not model_name:
        raise ValueError('give a model name (--model) or a checkpoint (--checkpoint)')
    return create_model(model_name, **kwargs), None


def training_metadata(path: PathLike) -> Dict[str, Any]:
    """Class names and training data settings stored in a checkpoint's metadata (None where absent)."""
    meta = read_metadata(path)
    train_config = json.loads(meta.get(TRAIN_CONFIG_KEY) or '{}') or {}
    return dict(class_names=json.loads(meta.get(CLASS_NAMES_KEY) or 'null'), dataset=train_config.get('dataset'),
                data_dir=train_config.get('data_dir'), model=train_config.get('model'))


# ------------------------------------------------------------------------------------------ preprocessing
def _registered_cfg(name: str) -> Dict[str, Any]:
    cfg = get_pretrained_cfg(OFFICIAL_MODELS.get(name, name))
    if cfg is None:
        raise ValueError(f'unknown model {name!r}: cannot read its default preprocessing')
    return cfg.to_dict()


def _matching_registered_cfgs(model: UniversalModel) -> Dict[str, Dict[str, Any]]:
    """Registered HydraViT default cfgs whose input size and class count fit ``model``."""
    c = model.config
    found = {}
    for name in timm.list_models('hydravit_*'):
        cfg = _registered_cfg(name)
        if tuple(cfg['input_size']) == (c.in_chans, c.img_size, c.img_size) and cfg['num_classes'] == c.num_classes:
            found[name] = cfg
    return found


def _stored_preprocessing(path: Path, model_name: Optional[str]) -> tuple:
    """(source, cfg) from the checkpoint's metadata, ``model_name`` or the run's settings; (None, None) if none."""
    meta = read_metadata(path)
    if PRETRAINED_CFG_KEY in meta:
        return f'{path.name} metadata', json.loads(meta[PRETRAINED_CFG_KEY])
    if model_name:
        return f'model {model_name}', _registered_cfg(model_name)
    trained_model = json.loads(meta.get(TRAIN_CONFIG_KEY, '{}')).get('model')
    if trained_model:
        return f'model {trained_model} (training config in {path.name})', _registered_cfg(trained_model)
    args_model = RunFolder(path.parent).read_args().get('model')
    if args_model:
        return f'model {args_model} (args.yaml)', _registered_cfg(args_model)
    return None, None


def preprocessing_config(checkpoint: PathLike, model: UniversalModel,
                         model_name: Optional[str] = None) -> Dict[str, Any]:
    """The preprocessing used in training (mean/std/input size/interpolation/crop), and where it came from.

    In order: ``pretrained_cfg`` in the checkpoint metadata (every checkpoint the trainer writes has it);
    the default cfg of ``model_name``; of the model named in the training settings or ``args.yaml`` (older
    checkpoints); of the one registered HydraViT whose input size and class count match. Anything else is
    an error: guessing the normalisation silently costs accuracy.
    """
    path = Path(checkpoint)
    source, cfg = _stored_preprocessing(path, model_name)
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


# ------------------------------------------------------------------------------------------ accuracy
def _results_file(checkpoint: Path, results: Optional[PathLike]) -> Optional[Path]:
    if results:
        return Path(results)
    return next((checkpoint.parent / n for n in RESULTS_NAMES if (checkpoint.parent / n).is_file()), None)


def accuracy_file(checkpoint: PathLike, results: Optional[PathLike] = None) -> Optional[Path]:
    """The file :func:`read_accuracy` reads: ``results``, else a results/eval file next to the checkpoint."""
    return _results_file(Path(checkpoint), results)


def accuracy_context(checkpoint: PathLike, results: Optional[PathLike] = None) -> Optional[str]:
    """Where the accuracy of a table comes from: ``top1 of N samples evaluated (FILE)``; None without a file."""
    path = _results_file(Path(checkpoint), results)
    if path is None or not path.is_file():
        return None
    counts = sorted({int(r['num_samples']) for r in read_results(path) if r.get('num_samples') not in (None, '')})
    samples = '/'.join(str(n) for n in counts) if counts else 'an unrecorded number of'
    return f'top1 of {samples} samples evaluated ({path})'


def read_accuracy(checkpoint: PathLike, results: Optional[PathLike] = None,
                  use_ema: Optional[bool] = None) -> Dict[int, Dict[str, Any]]:
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
    out: Dict[int, Dict[str, Any]] = {}
    for row in rows:
        if row.get('mode') not in (None, '', 'sliced'):  # eval files may hold an 'extracted' row per k too
            continue
        picked = {key: row.get(f'ema_{key}') if ema and row.get(f'ema_{key}') is not None else row.get(key)
                  for key in ACCURACY_KEYS}
        out[int(row['k'])] = {key: float(v) for key, v in picked.items() if v is not None}
    return {k: {**v, 'results_file': str(path)} for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------ summary.csv
def write_summary(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One row per epoch (timm's summary.csv), rewritten whole and atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=table_columns(rows), lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


INTEGER_SUMMARY_COLUMNS = ('epoch', 'nonfinite_skipped')  # counts: read back as written, not as 1.0


def read_summary(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        return [{k: (int(v) if k in INTEGER_SUMMARY_COLUMNS else float(v)) if v not in ('', None) else None
                 for k, v in row.items()} for row in csv.DictReader(f)]
