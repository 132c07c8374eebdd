"""Safe, atomic checkpoint files, and checkpoints from elsewhere.

Weights live in safetensors files whose metadata carries the model's :class:`HydraViTConfig`, so a
checkpoint rebuilds its model without any code object. Files from elsewhere load too: timm ``train.py``
``CheckpointSaver`` files (``state_dict``, ``state_dict_ema``, ``args``, ... as the paper's released
checkpoints are) and plain timm ViT state dicts (``.pth``, ``.bin``, ``.safetensors``); their HydraViT config
is read off the tensor shapes (or a registered model name). ``.pth``-style files are read with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors, plain types and
``argparse.Namespace`` (the ``args`` of timm train.py checkpoints).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from timm.models import clean_state_dict

from ..models.config import HydraViTConfig
from ..models.factory import UniversalModel, create_model, model_from_config
from ..models.layers import SlicedIdentity

__all__ = [
    'CheckpointError', 'NonFiniteWeightsError', 'atomic_write', 'save_model', 'load_model', 'load_state_dict_file',
    'read_metadata', 'load_config_and_state', 'read_checkpoint', 'infer_config', 'is_hydravit_file', 'SAFE_GLOBALS',
    'non_finite_tensors', 'registered_config', 'check_model_agrees',
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
CONFIG_KEY = 'hydravit_config'
SAFE_GLOBALS: List[Any] = [argparse.Namespace]  # the one class weights_only loading allows: timm train.py's saved args
RAW_KEYS = ('state_dict', 'model')  # where timm and others keep the trained weights in a checkpoint dict
EMA_KEYS = ('state_dict_ema', 'model_ema')
HEAD_DIM = 64  # ViT/DeiT's head size: the only one the tensor shapes cannot tell
OFFICIAL_MODELS = {'hydravit_dyn_patch16_224': 'hydravit_base_patch16_224'}  # the official code's ViT-B/16


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely or does not describe a HydraViT."""


class NonFiniteWeightsError(CheckpointError):
    """Weights holding NaN or inf: a diverged run, never written over finite weights nor evaluated."""


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an inf.

    A tensor whose sum is finite has no NaN/inf (either would make the sum non-finite); only the rare
    tensor with a non-finite sum (a NaN, an inf, or an overflow of large finite values) is checked element by
    element. The sum reads the tensor once without allocating a mask: ViT-B checks in 0.1 s instead of 0.8 s.
    """
    return [name for name, t in state.items()
            if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())]


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
    A model its config no longer describes (:func:`_check_described`) is refused with a ValueError.
    """
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict()), 'format': 'pt', **(metadata or {})}
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    _check_described(path, model)
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(f'refusing to write {path}: non-finite values (NaN/inf) in {len(bad)} tensor(s) '
                                    f'{bad[:5]}; the run diverged')
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _check_described(path: PathLike, model: UniversalModel) -> None:
    """Refuse to write a file that would reload as another model.

    The config records depth, widths and classes, not a pooling of ``''`` (all tokens) or a dropped final norm,
    which ``prune_intermediate_layers`` / ``reset_classifier(0, '')`` leave: such a model is a feature
    extractor for the session, not a checkpoint.
    """
    expected_pool = model.config.global_pool
    for vit in list(getattr(model, 'subnets', {}).values()) or [model]:
        if vit.global_pool != expected_pool:
            problem = f'global_pool {vit.global_pool!r} where the config has {expected_pool!r}'
        elif expected_pool == 'token' and isinstance(vit.norm, SlicedIdentity):
            problem = 'the final norm was dropped'
        else:
            continue
        raise ValueError(f'refusing to write {path}: its config does not describe this model ({problem}); a model '
                         "after prune_intermediate_layers(prune_head=True or prune_norm=True) or reset_classifier(..., "
                         "'') cannot be reloaded from a checkpoint: save it before pruning and prune after loading")


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file ({} if it has none, or for a ``.pth``-style file)."""
    if Path(path).suffix != '.safetensors':
        return {}
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e


def is_hydravit_file(path: PathLike) -> bool:
    """A safetensors file written by :func:`save_model` (model config in its metadata)."""
    return Path(path).suffix == '.safetensors' and Path(path).is_file() and CONFIG_KEY in read_metadata(path)


def _torch_load(path: Path, map_location: str) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' in str(e) or 'global' in str(e).lower():
            raise CheckpointError(
                f'{path} holds Python objects other than tensors, plain containers and argparse.Namespace; '
                'refusing to unpickle it. Re-save it as a state dict of tensors or as .safetensors') from None
        raise CheckpointError(f'{path}: not a readable torch checkpoint (UnpicklingError: {e})') from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'{path}: not a readable torch checkpoint ({type(e).__name__}: {e})') from None


def read_checkpoint(path: PathLike, map_location: str = 'cpu',
                    use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """(tensors, training args, which weights) of any supported checkpoint file.

    A checkpoint dict (timm ``CheckpointSaver``: ``state_dict`` + ``state_dict_ema`` + ``args`` ...) gives its
    EMA weights when it has them and ``use_ema`` is None or True, else its raw weights; ``use_ema=True``
    without EMA weights is an error. The choice is logged. DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes are removed (timm ``clean_state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    if path.suffix == '.safetensors':
        try:
            with safe_open(str(path), framework='pt', device=map_location) as f:
                return {k: f.get_tensor(k) for k in f.keys()}, {}, 'weights'
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
    obj = _torch_load(path, map_location)
    args: Dict[str, Any] = {}
    which = 'weights'
    if isinstance(obj, Mapping) and any(k in obj for k in RAW_KEYS + EMA_KEYS):
        raw = next((k for k in RAW_KEYS if isinstance(obj.get(k), Mapping)), None)
        ema = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        if use_ema and ema is None:
            raise CheckpointError(f'--use-ema: {path} holds no EMA weights (keys: {sorted(obj)[:8]})')
        which = ema if ema is not None and use_ema is not False else raw or ''
        if not which:
            raise CheckpointError(f'{path} holds no raw weights (keys: {sorted(obj)[:8]}); its EMA weights '
                                  'need --use-ema')
        saved_args = obj.get('args')
        args = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else dict(saved_args or {})
        if ema is not None and raw is not None:
            logger.info('%s: using the %s weights (%s)%s', path.name, 'EMA' if which == ema else 'raw', which,
                        '; --no-use-ema for the raw ones' if which == ema else '')
        obj = obj[which]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{path} is not a state dict: expected a mapping of parameter names to tensors')
    return {str(k): v for k, v in clean_state_dict(dict(obj)).items()}, args, which


def load_state_dict_file(path: PathLike, map_location: str = 'cpu', use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt``/``.bin`` file loaded weights-only.

    A checkpoint dict is unwrapped (its raw weights; with ``use_ema`` its EMA weights): see
    :func:`read_checkpoint`.
    """
    return read_checkpoint(path, map_location, use_ema=use_ema)[0]


def load_model(path: PathLike, map_location: str = 'cpu', *, model_name: Optional[str] = None,
               use_ema: Optional[bool] = None, allow_non_finite: bool = False, **overrides: Any) -> UniversalModel:
    """Rebuild a universal model from any checkpoint :func:`load_config_and_state` reads.

    ``overrides`` change non-architectural settings, e.g. ``drop_path_rate`` or a wider ``k_choices``.
    Weights holding NaN/inf are refused unless ``allow_non_finite`` (NaN logits would score as class 0).
    """
    config, state = load_config_and_state(path, map_location, model_name=model_name, use_ema=use_ema)
    bad = [] if allow_non_finite else non_finite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(f'{path}: non-finite weights (NaN/inf) in {len(bad)} tensor(s) {bad[:5]}: the '
                                    'training run that wrote it diverged; use an earlier checkpoint')
    model = _model_without_init(config, **overrides)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        origin = ('stored with' if is_hydravit_file(path) else f'of --model {model_name} given for' if model_name
                  else 'inferred for')
        raise CheckpointError(f'{path}: weights do not match the config {origin} them ({_short(e)})') from None
    return model


def _model_without_init(config: HydraViTConfig, **overrides: Any) -> UniversalModel:
    """The model of ``config`` with uninitialised CPU storage, for weights about to be loaded strictly.

    Built on the meta device, so the random init (seconds for ViT-B) is skipped; the strict load that
    follows fills every parameter and buffer.
    """
    with torch.device('meta'):
        model = model_from_config(config, **overrides)
    return model.to_empty(device='cpu')


def _short(e: Exception, limit: int = 600) -> str:
    text = ' '.join(str(e).split())
    return text if len(text) <= limit else text[:limit] + ' ...'


def load_config_and_state(path: PathLike, map_location: str = 'cpu', *, model_name: Optional[str] = None,
                          use_ema: Optional[bool] = None) -> Tuple[HydraViTConfig, Dict[str, torch.Tensor]]:
    """The :class:`HydraViTConfig` and tensors of a checkpoint file.

    A HydraViT file carries its config. For any other (timm ``CheckpointSaver`` file, timm ViT state dict)
    the config is that of ``model_name`` (or of the registered HydraViT model named in the file's training
    args), with the file's class count, else it is inferred from the tensor shapes (:func:`infer_config`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    meta = read_metadata(path)
    if CONFIG_KEY in meta:
        try:
            config = HydraViTConfig(**json.loads(meta[CONFIG_KEY]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f'{path}: invalid model config in metadata ({e})') from e
        if model_name:  # the stored config rules; a --model naming another architecture is a mistake
            check_model_agrees(config, model_name, STORED_CONFIG_FIELDS, f'{path} (its stored config)')
        return config, read_checkpoint(path, map_location)[0]
    state, args, _ = read_checkpoint(path, map_location, use_ema=use_ema)
    return infer_config(state, args, model_name, source=str(path)), state


def _registered(name: Optional[str]) -> Optional[str]:
    name = OFFICIAL_MODELS.get(name or '', name)
    import timm
    return name if name and name in timm.list_models('hydravit_*') else None


def _registered_or_error(model_name: str) -> str:
    registered = _registered(model_name)
    if registered is None:
        raise CheckpointError(f'--model {model_name} is not a registered HydraViT model (choose one of '
                              'hydravit_*: see `hydravit info`)')
    return registered


def registered_config(name: str, **kwargs: Any) -> HydraViTConfig:
    """The config of a registered HydraViT, read from a model built on the meta device (no weights made)."""
    with torch.device('meta'):
        return create_model(name, **kwargs).config


# what a --model must agree on with a file: a HydraViT file's stored config (the input size and nesting may
# differ, as `hydravit train --img-size/--method` set them), and the shapes of a timm ViT state dict (the
# head split is not in the shapes; the width is)
STORED_CONFIG_FIELDS = ('patch_size', 'in_chans', 'num_heads', 'head_dim', 'depth', 'mlp_ratio', 'qkv_bias',
                        'class_token')
SHAPE_FIELDS = ('embed_dim', 'depth', 'patch_size', 'in_chans', 'img_size', 'mlp_ratio', 'qkv_bias', 'class_token')


def check_model_agrees(config: HydraViTConfig, model_name: str, fields: Tuple[str, ...], source: str) -> None:
    """Raise a :class:`CheckpointError` naming every field of ``fields`` in which ``config`` (read from a
    file) differs from the registered model ``model_name``."""
    expected = registered_config(_registered_or_error(model_name))
    diff = [f'{f} {getattr(config, f)} (file) vs {getattr(expected, f)} ({model_name})' for f in fields
            if getattr(config, f) != getattr(expected, f)]
    if diff:
        raise CheckpointError(f'--model {model_name} disagrees with {source}: {"; ".join(diff)}. Name the model '
                              "the file was trained as, or leave --model out to use the file's own architecture")


def infer_config(state: Mapping[str, torch.Tensor], args: Optional[Mapping[str, Any]] = None,
                 model_name: Optional[str] = None, source: str = 'checkpoint') -> HydraViTConfig:
    """The HydraViT config of a timm-layout ViT state dict.

    ``model_name`` (or ``args['model']``, the official code's name included) picks a registered HydraViT whose
    config is used with the file's class count. Otherwise every size is read off the shapes: width and
    patch from ``patch_embed.proj``, depth from the blocks, MLP ratio from ``fc1``, input size from
    ``pos_embed``, classes from ``head``; heads are ViT's 64 channels each, and the k choices those of
    ``args['heads']`` (the official code's) when the file has them.
    """
    args = dict(args or {})
    if 'patch_embed.proj.weight' not in state:
        raise CheckpointError(f'{source} is not a HydraViT checkpoint nor a timm ViT state dict (no '
                              f'patch_embed.proj.weight; tensors {sorted(state)[:5]}...)')
    head = state.get('head.weight')
    num_classes = int(head.shape[0]) if head is not None else 0
    heads = args.get('heads')
    k_choices = tuple(int(k) for k in heads) if isinstance(heads, (list, tuple)) and heads else ()
    registered = _registered_or_error(model_name) if model_name else _registered(args.get('model'))
    if registered:
        config = registered_config(registered, num_classes=num_classes)
        if model_name:
            try:  # read with the named model's head size, so any width compares
                from_shapes: Optional[HydraViTConfig] = _config_from_shapes(state, num_classes, (), source,
                                                                            config.head_dim)
            except (CheckpointError, ValueError):  # shapes this reader cannot interpret: the strict load checks
                from_shapes = None
            if from_shapes is not None:
                check_model_agrees(from_shapes, model_name, SHAPE_FIELDS, f'the tensor shapes of {source}')
        return HydraViTConfig(**{**config.to_dict(), 'num_classes': num_classes,
                                 **({'k_choices': k_choices} if k_choices else {})})
    config = _config_from_shapes(state, num_classes, k_choices, source)
    logger.info('%s: no HydraViT config stored; inferred from the tensor shapes: %d heads of %d, depth %d, '
                '%dx%d input, patch %d, %d classes, k %s', source, config.num_heads, HEAD_DIM, config.depth,
                config.img_size, config.img_size, config.patch_size, num_classes, list(config.k_choices))
    return config


def _config_from_shapes(state: Mapping[str, torch.Tensor], num_classes: int, k_choices: Tuple[int, ...],
                        source: str, head_dim: int = HEAD_DIM) -> HydraViTConfig:
    dim, in_chans, patch, _ = state['patch_embed.proj.weight'].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))), default=-1)
    if depth < 1 or dim % head_dim:
        raise CheckpointError(f'{source}: cannot infer a HydraViT from its shapes (width {dim}, {depth} blocks): '
                              f'expected a ViT with heads of {head_dim} channels; pass the model name (--model)')
    class_token = 'cls_token' in state
    tokens = int(state['pos_embed'].shape[1]) - int(class_token) if 'pos_embed' in state else 0
    grid = math.isqrt(tokens)
    if grid * grid != tokens or tokens == 0:
        raise CheckpointError(f'{source}: pos_embed of {tokens} patch tokens is not a square grid; pass --model')
    hidden = int(state['blocks.0.mlp.fc1.weight'].shape[0])
    config = HydraViTConfig(img_size=grid * int(patch), patch_size=int(patch), in_chans=int(in_chans),
                            num_classes=num_classes, num_heads=int(dim) // head_dim, head_dim=head_dim, depth=depth,
                            mlp_ratio=hidden / int(dim), qkv_bias='blocks.0.attn.qkv.bias' in state,
                            class_token=class_token, global_pool='token' if class_token else 'avg',
                            k_choices=k_choices)
    return config
