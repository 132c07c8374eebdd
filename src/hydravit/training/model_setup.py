"""The model a run starts from: a registered HydraViT built for the recipe, optionally initialised from weights."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from ..models.factory import UniversalModel, create_model
from ..models.subnet import init_from_vit
from ..storage.checkpoint import CheckpointError, load_config_and_state, load_state_dict_file, read_metadata
from .config import TrainConfig
from .methods import method_class

__all__ = ['build_model', 'load_initial_checkpoint']

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, num_classes: int) -> UniversalModel:
    """``cfg.model`` with the recipe's classes, drop-path, k set and the method's nesting."""
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=cfg.drop, drop_path_rate=cfg.drop_path,
                                  separate_heads=cfg.separate_heads, nesting=method_class(cfg.method).nesting)
    if cfg.heads:
        kwargs['k_choices'] = tuple(cfg.heads)
    if cfg.img_size:
        kwargs['img_size'] = cfg.img_size
    try:
        model = create_model(cfg.model, **kwargs)
    except ValueError as e:
        if cfg.heads and 'k_choices' in str(e):
            raise ValueError(f'--heads {cfg.heads}: {e}') from None
        raise
    if cfg.initial_checkpoint:
        load_initial_checkpoint(model, cfg.initial_checkpoint)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_initial_checkpoint(model: UniversalModel, path: str) -> None:
    """Start from a HydraViT checkpoint (same architecture) or a timm ViT/DeiT of the same or a smaller width.

    A narrower ViT goes into the leading slices, so its subnetwork *is* that ViT at step 0.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f'--initial-checkpoint {path} does not exist')
    if path.endswith('.safetensors') and 'hydravit_config' in read_metadata(path):
        _, state = load_config_and_state(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'--initial-checkpoint {path}: HydraViT weights do not fit this model ({e})') from e
        return
    state = load_state_dict_file(path)
    head = state.get('head.weight')
    ignore_head = head is None or head.shape[0] != model.num_classes
    if head is not None and ignore_head:
        logger.warning('initial checkpoint has %d classes, model %d: keeping a fresh classifier', head.shape[0],
                       model.num_classes)
    init_from_vit(model, state, ignore_head=ignore_head)
