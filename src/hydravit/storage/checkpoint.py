"""Safe, atomic checkpoint files.

Weights live in safetensors files whose metadata carries the model's :class:`HydraViTConfig`, so a
checkpoint rebuilds its model without any code object. Legacy ``.pth`` files are read with
``torch.load(weights_only=True)`` only: nothing is ever unpickled beyond tensors and plain types.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from timm.models import load_state_dict as timm_load_state_dict

from ..models.config import HydraViTConfig
from ..models.factory import UniversalModel, model_from_config

__all__ = [
    'CheckpointError', 'NonFiniteWeightsError', 'atomic_write', 'save_model', 'load_model', 'load_state_dict_file',
    'read_metadata', 'load_config_and_state', 'non_finite_tensors',
]

PathLike = Union[str, os.PathLike]
CONFIG_KEY = 'hydravit_config'


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely or does not describe a HydraViT."""


class NonFiniteWeightsError(CheckpointError):
    """Weights holding NaN or inf: a diverged run, never written over finite weights nor evaluated."""


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an inf."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after writing: mkstemp makes it 0600 and some writers recreate the file
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(path: PathLike, model: UniversalModel, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``model``'s weights and config to a self-describing safetensors file, atomically.

    Non-finite weights are refused (:class:`NonFiniteWeightsError`): the file already at ``path`` stays.
    """
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict()), 'format': 'pt', **(metadata or {})}
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(f'refusing to write {path}: non-finite values (NaN/inf) in {len(bad)} tensor(s) '
                                    f'{bad[:5]}; the run diverged')
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file ({} if it has none)."""
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e


def load_state_dict_file(path: PathLike, map_location: str = 'cpu', use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt``/``.bin`` file loaded weights-only.

    timm's ``load_state_dict`` unwraps a checkpoint dict (``state_dict`` or ``model``; with ``use_ema`` the
    EMA weights first) and drops DDP's ``module.`` prefix. Its ``weights_only`` load allows exactly one
    class besides tensors and plain containers, ``argparse.Namespace`` (the ``args`` of timm train.py
    checkpoints); anything else is refused with a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        obj = timm_load_state_dict(str(path), use_ema=use_ema, device=map_location, weights_only=True)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        cause = e if isinstance(e, pickle.UnpicklingError) else e.__cause__  # timm re-raises torch's refusals
        if isinstance(cause, pickle.UnpicklingError) and 'Unsupported global' in str(cause):
            raise CheckpointError(
                f'{path} holds Python objects other than tensors, plain containers and argparse.Namespace; '
                'refusing to unpickle it. Re-save it as a state dict of tensors or as .safetensors') from e
        raise CheckpointError(f'{path}: not a readable torch checkpoint ({type(cause or e).__name__})') from e
    except AttributeError as e:  # timm's unwrapping met something that is not a mapping
        raise CheckpointError(f'{path} is not a state dict: expected a mapping of parameter names to tensors') from e
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{path} is not a state dict: expected a mapping of parameter names to tensors')
    return {str(k): v for k, v in obj.items()}


def load_model(path: PathLike, map_location: str = 'cpu', allow_non_finite: bool = False,
               **overrides: Any) -> UniversalModel:
    """Rebuild a universal model from a checkpoint written by :func:`save_model` (config in its metadata).

    ``overrides`` change non-architectural settings, e.g. ``drop_path_rate`` or a wider ``k_choices``.
    Weights holding NaN/inf are refused unless ``allow_non_finite`` (NaN logits would score as class 0).
    """
    config, state = load_config_and_state(path, map_location)
    bad = [] if allow_non_finite else non_finite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(f'{path}: non-finite weights (NaN/inf) in {len(bad)} tensor(s) {bad[:5]}: the '
                                    'training run that wrote it diverged; use an earlier checkpoint')
    model = model_from_config(config, **overrides)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{path}: weights do not match the config stored with them ({e})') from e
    return model


def load_config_and_state(path: PathLike, map_location: str = 'cpu') -> Tuple[HydraViTConfig, Dict[str, torch.Tensor]]:
    """The :class:`HydraViTConfig` and tensors stored in a HydraViT checkpoint file."""
    path = Path(path)
    if path.suffix != '.safetensors':
        raise CheckpointError(
            f'{path}: HydraViT checkpoints are .safetensors files with the model config in their metadata; '
            'to start from a timm ViT/DeiT state dict use hydravit.models.init_from_vit')
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f'{path} has no {CONFIG_KEY!r} metadata: it is not a HydraViT checkpoint '
            '(a timm ViT/DeiT state dict can initialise one through hydravit.models.init_from_vit)')
    try:
        config = HydraViTConfig(**json.loads(meta[CONFIG_KEY]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{path}: invalid model config in metadata ({e})') from e
    return config, load_state_dict_file(path, map_location)

