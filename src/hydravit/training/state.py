"""What a training run leaves on disk, and how it is read back for ``--resume``.

A checkpoint is ``last.safetensors`` (+ ``last_ema.safetensors``) written by :func:`hydravit.storage.save_model`
and ``last.state.pth``: tensors and plain types only (optimizer, scheduler, scaler, RNG states, epoch,
step, checkpoint generation), loaded with ``weights_only=True``. The state file is written last and is the
commit record: weights files carry the generation they belong to, and the committed set is kept (as
``last`` or ``last.prev``) until the next state lands, so any sequence of kills and failed writes still
resumes from a consistent pair (see :func:`save_training_checkpoint`).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..models.factory import UniversalModel
from ..storage.checkpoint import (
    CheckpointError,
    NonFiniteWeightsError,
    atomic_write,
    load_state_dict_file,
    non_finite_tensors,
    read_metadata,
    save_model,
)
from ..storage.run_folder import STATE_FILE

__all__ = [
    'capture_rng', 'restore_rng', 'save_training_checkpoint', 'load_training_checkpoint', 'read_training_state',
    'resolve_resume', 'remove_stale_temporaries', 'remove_superseded_weights', 'GENERATION_KEY',
]

UPDATES_KEY = 'num_updates'
GENERATION_KEY = 'checkpoint_generation'  # counts commits; recorded in the state file and in its weights files


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


def _is_committed(path: Path, committed: Optional[int], committed_updates: Optional[int]) -> bool:
    """Whether ``path`` holds the committed weights: of generation ``committed`` (folders written before
    generations existed: of update count ``committed_updates``, without a generation)."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except CheckpointError:
        return False
    if committed is not None:
        return meta.get(GENERATION_KEY) == str(committed)
    return (committed_updates is not None and GENERATION_KEY not in meta
            and meta.get(UPDATES_KEY) == str(committed_updates))


def save_training_checkpoint(out_dir: Path, model: UniversalModel, ema_model: Optional[UniversalModel],
                             state: Dict[str, Any], metadata: Mapping[str, str],
                             committed: Optional[int] = None, committed_updates: Optional[int] = None) -> int:
    """Write checkpoint generation ``committed + 1``: ``last[_ema].safetensors``, then ``last.state.pth``.

    ``committed`` is the generation of the ``last.state.pth`` on disk (None: none yet). Its weights stay
    on disk under ``last`` or ``last.prev`` until the new state file lands: ``last`` is moved to
    ``last.prev`` only when it *is* the committed file (after a crash it may be a newer, uncommitted one,
    and then ``last.prev`` holds the committed weights and is kept). Every file is written atomically, so
    a kill or a full disk at any point leaves a folder that resumes from the last committed generation.
    Non-finite weights are refused before anything is touched. Returns the new generation.
    ``committed_updates`` identifies the committed weights of a folder written before generations existed.
    """
    names = _weights_names(ema_model is not None)
    nets = [model] if ema_model is None else [model, ema_model]
    for name, net in zip(names, nets, strict=True):
        bad = non_finite_tensors(net.state_dict())
        if bad:
            raise NonFiniteWeightsError(f'refusing to write {name}.safetensors: non-finite values in {bad[:5]}'
                                        f'{" ..." if len(bad) > 5 else ""}; the last finite checkpoint is kept')
    generation = 0 if committed is None else committed + 1
    state = {**state, GENERATION_KEY: generation}
    meta = {**metadata, UPDATES_KEY: str(state[UPDATES_KEY]), GENERATION_KEY: str(generation)}
    for name, net in zip(names, nets, strict=True):
        path, prev = out_dir / f'{name}.safetensors', out_dir / f'{name}.prev.safetensors'
        if _is_committed(path, committed, committed_updates):
            os.replace(path, prev)  # prev held an older generation, which no state refers to any more
        save_model(path, net, meta)
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    for name in names:  # the new generation is committed: the previous weights are no longer needed
        (out_dir / f'{name}.prev.safetensors').unlink(missing_ok=True)
    return generation


def _matching_weights(out_dir: Path, name: str, state: Mapping[str, Any]) -> Path:
    """The weights file of the committed generation (older run folders: of the committed update count)."""
    key, value = ((GENERATION_KEY, state[GENERATION_KEY]) if GENERATION_KEY in state
                  else (UPDATES_KEY, state[UPDATES_KEY]))
    for path in (out_dir / f'{name}.safetensors', out_dir / f'{name}.prev.safetensors'):
        if path.is_file() and read_metadata(path).get(key) == str(value):
            return path
    raise CheckpointError(f'{out_dir}: no {name}.safetensors written for {key} {value} to go with '
                          f'{STATE_FILE}; the run folder is incomplete')


def remove_superseded_weights(out_dir: Path, state: Mapping[str, Any], with_ema: bool) -> List[Path]:
    """Delete ``*.prev`` weights a kill left behind after the state that supersedes them was committed."""
    removed = []
    for name in _weights_names(with_ema):
        prev = out_dir / f'{name}.prev.safetensors'
        if prev.is_file() and _matching_weights(out_dir, name, state) != prev:
            prev.unlink()
            removed.append(prev)
    return removed


def remove_stale_temporaries(out_dir: Path) -> List[Path]:
    """Delete the half-written ``.<name>.*.tmp`` files an interrupted atomic write left behind."""
    stale = [p for p in out_dir.glob('.*.tmp') if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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


def read_training_state(out_dir: Path, map_location: str = 'cpu') -> Dict[str, Any]:
    """``last.state.pth`` loaded weights-only; an unreadable or unsafe file is a :class:`CheckpointError`.

    torch's own message is not relayed: for a file holding other objects it advises loading with
    ``weights_only=False``, i.e. running whatever the file holds.
    """
    path = out_dir / STATE_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = ('it holds Python objects other than tensors and plain types; refusing to unpickle it'
               if 'Unsupported global' in str(e) or 'Weights only load failed' in str(e) else 'it is corrupt')
        raise CheckpointError(f'{path}: not a readable training state ({why})') from None
    except Exception as e:  # noqa: BLE001  (truncated zip, wrong format, ...: the same user error)
        raise CheckpointError(f'{path}: not a readable training state ({type(e).__name__}: the file is '
                              'truncated or corrupt)') from None
    if not isinstance(state, dict) or UPDATES_KEY not in state:
        raise CheckpointError(f'{path}: not a training state written by hydravit (no {UPDATES_KEY!r})')
    return state


def load_training_checkpoint(out_dir: Path, with_ema: bool, map_location: str = 'cpu',
                             state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The state dict of ``last.state.pth`` (or ``state``, read before) plus weights of the same generation."""
    state = dict(state) if state is not None else read_training_state(out_dir, map_location)
    keys = ['model', 'ema'] if with_ema else ['model']
    for name, key in zip(_weights_names(with_ema), keys, strict=True):
        state[key] = load_state_dict_file(_matching_weights(out_dir, name, state), map_location)
    return state
