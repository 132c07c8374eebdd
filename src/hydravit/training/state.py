"""What a training run leaves on disk, and how it is read back for ``--resume``.

A checkpoint is ``last.safetensors`` (+ ``last_ema.safetensors``) written by :func:`hydravit.storage.save_model`
and ``last.state.pth``: tensors and plain types only (optimizer, scheduler, scaler, RNG states, epoch,
step), loaded with ``weights_only=True``. The state file is written last and is the commit record:
weights files carry the update count they belong to, and the previous set is kept as ``*.prev`` until
the new state lands, so a kill between two writes still resumes from a consistent pair.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..models.factory import UniversalModel
from ..storage.checkpoint import CheckpointError, atomic_write, load_state_dict_file, read_metadata, save_model
from ..storage.run_folder import STATE_FILE

__all__ = [
    'capture_rng', 'restore_rng', 'save_training_checkpoint', 'load_training_checkpoint', 'resolve_resume',
]

UPDATES_KEY = 'num_updates'


# ------------------------------------------------------------------------------------------ RNG
def capture_rng() -> Dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and plain numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy form: the global RandomState is always MT19937
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]), 'numpy_has_gauss': int(np_state[3]), 'numpy_gauss': float(np_state[4]),
        'python_version': int(py_version), 'python_keys': torch.tensor(py_keys, dtype=torch.int64),
        'python_gauss': py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    random.setstate((state['python_version'], tuple(int(v) for v in state['python_keys'].tolist()),
                     state['python_gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# ------------------------------------------------------------------------------------------ checkpoints
def _weights_names(with_ema: bool) -> List[str]:
    return ['last', 'last_ema'] if with_ema else ['last']


def save_training_checkpoint(out_dir: Path, model: UniversalModel, ema_model: Optional[UniversalModel],
                             state: Dict[str, Any], metadata: Mapping[str, str]) -> None:
    """Write ``last[_ema].safetensors`` then ``last.state.pth``; never leaves an unusable pair behind."""
    meta = {**metadata, UPDATES_KEY: str(state[UPDATES_KEY])}
    names = _weights_names(ema_model is not None)
    nets = [model] if ema_model is None else [model, ema_model]
    for name, net in zip(names, nets, strict=True):
        path = out_dir / f'{name}.safetensors'
        if path.exists():
            os.replace(path, out_dir / f'{name}.prev.safetensors')
        save_model(path, net, meta)
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    for name in names:  # the new pair is committed: the previous weights are no longer needed
        (out_dir / f'{name}.prev.safetensors').unlink(missing_ok=True)


def _matching_weights(out_dir: Path, name: str, num_updates: int) -> Path:
    for path in (out_dir / f'{name}.safetensors', out_dir / f'{name}.prev.safetensors'):
        if path.is_file() and read_metadata(path).get(UPDATES_KEY) == str(num_updates):
            return path
    raise CheckpointError(f'{out_dir}: no {name}.safetensors written at update {num_updates} to go with '
                          f'{STATE_FILE}; the run folder is incomplete')


def resolve_resume(path: str | os.PathLike) -> Path:
    """The run folder of ``--resume`` (a run folder, its ``last.state.pth`` or ``last.safetensors``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f'--resume: {path} does not exist')
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f'--resume: {folder} holds no {STATE_FILE} (not a training run folder, or the run '
                                'was stopped before its first checkpoint)')
    return folder


def load_training_checkpoint(out_dir: Path, with_ema: bool, map_location: str = 'cpu') -> Dict[str, Any]:
    """The state dict of ``last.state.pth`` plus ``model``/``ema`` weights of the same update."""
    try:
        state = torch.load(out_dir / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable or unsafe file is the same user error)
        raise CheckpointError(f'{out_dir / STATE_FILE}: not a readable training state ({e})') from e
    keys = ['model', 'ema'] if with_ema else ['model']
    for name, key in zip(_weights_names(with_ema), keys, strict=True):
        state[key] = load_state_dict_file(_matching_weights(out_dir, name, state[UPDATES_KEY]), map_location)
    return state
