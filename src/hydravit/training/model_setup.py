"""The model a run starts from: a registered HydraViT built for the recipe, optionally initialised from weights."""
from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, Optional
from urllib.parse import urlparse

import torch

from ..models.factory import UniversalModel, create_model
from ..models.subnet import CheckpointMismatchError, init_from_vit
from ..storage.checkpoint import CheckpointError, is_hydravit_file, load_config_and_state, read_checkpoint
from .config import TrainConfig
from .methods import method_class

__all__ = ['build_model', 'load_initial_checkpoint', 'load_pretrained_vit', 'pretrained_model_name']

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, num_classes: int, resuming: bool = False) -> UniversalModel:
    """``cfg.model`` with the recipe's classes, drop-path, k set and the method's nesting.

    ``resuming``: the weights come from the run folder next, so the random init and ``--initial-checkpoint``
    are skipped (the model is built on the meta device and given uninitialised CPU storage).
    """
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=cfg.drop, drop_path_rate=cfg.drop_path,
                                  separate_heads=cfg.separate_heads, nesting=method_class(cfg.method).nesting)
    if cfg.heads:
        kwargs['k_choices'] = tuple(cfg.heads)
    if cfg.img_size:
        kwargs['img_size'] = cfg.img_size
    try:
        with torch.device('meta') if resuming else contextlib.nullcontext():
            model = create_model(cfg.model, **kwargs)
    except ValueError as e:
        if cfg.heads and 'k_choices' in str(e):
            raise ValueError(f'--heads {cfg.heads}: {e}') from None
        raise
    if resuming:
        model = model.to_empty(device='cpu')
    elif cfg.initial_checkpoint:
        load_initial_checkpoint(model, cfg.initial_checkpoint)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_initial_checkpoint(model: UniversalModel, source: str) -> None:
    """Start from a checkpoint file or a timm pretrained model name (``timm/deit_tiny_patch16_224.fb_in1k``).

    A HydraViT checkpoint of the same architecture loads as it is. A timm ViT/DeiT (a state dict, a timm
    train.py checkpoint, whose EMA weights are preferred, or hub weights) of the same or a smaller width
    goes into the leading slices, so its subnetwork *is* that ViT at step 0.
    """
    if not Path(source).is_file():
        state = load_pretrained_vit(source)
    elif is_hydravit_file(source):
        _, state = load_config_and_state(source)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'--initial-checkpoint {source}: HydraViT weights do not fit this model '
                                  f'({" ".join(str(e).split())[:400]})') from None
        return
    else:
        state = read_checkpoint(source)[0]
    head = state.get('head.weight')
    ignore_head = head is None or head.shape[0] != model.num_classes
    if head is not None and ignore_head:
        logger.warning('initial checkpoint has %d classes, model %d: keeping a fresh classifier', head.shape[0],
                       model.num_classes)
    try:
        init_from_vit(model, state, ignore_head=ignore_head)
    except (CheckpointMismatchError, RuntimeError) as e:
        raise CheckpointError(f'--initial-checkpoint {source} does not fit {model.config.num_heads} heads of '
                              f'{model.config.head_dim}, depth {model.config.depth}: '
                              f'{" ".join(str(e).split())[:400]}') from None


def pretrained_model_name(source: str) -> Optional[str]:
    """The timm model name of ``timm/<name>.<tag>``, ``hf-hub:<repo>`` or ``<name>.<tag>``; None if it is none."""
    import timm

    if source.startswith('hf-hub:'):
        return source
    name = source[len('timm/'):] if source.startswith('timm/') else source
    return name if timm.is_model(name.split('.')[0]) else None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face hub lookups from the local cache only (huggingface_hub reads this flag at each call)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or 'huggingface.co'
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained_vit(source: str) -> Dict[str, torch.Tensor]:
    """The state dict of a timm model with pretrained weights, through timm's own pretrained machinery.

    The local Hugging Face cache is tried first; a download follows only when the hub answers within a few
    seconds, so a machine without network fails at once with a clear message instead of retrying for
    a minute.
    """
    import timm

    name = pretrained_model_name(source)
    if name is None:
        raise FileNotFoundError(f'--initial-checkpoint {source}: no such file, and not a timm model name with a '
                                'pretrained tag (e.g. timm/deit_tiny_patch16_224.fb_in1k)')
    try:
        with _hub_offline():
            vit = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as cached_error:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or not _hub_reachable():
            raise FileNotFoundError(
                f'--initial-checkpoint {source}: the weights are not in the local Hugging Face cache and the hub '
                f'is {"switched off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "unreachable"}; '
                'download them where there is network (timm.create_model(name, pretrained=True)) or pass a '
                f'.safetensors/.pth file ({type(cached_error).__name__})') from None
        vit = timm.create_model(name, pretrained=True)
    origin: Dict[str, Any] = dict(getattr(vit, 'pretrained_cfg', None) or {})
    logger.info('--initial-checkpoint: %s weights from timm (%s)', name,
                origin.get('hf_hub_id') or origin.get('url') or 'local')
    return vit.state_dict()
