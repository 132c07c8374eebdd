"""One way to get a HydraViT from the command line: a registered name or a checkpoint file."""
from __future__ import annotations

from typing import Any, Optional

import timm

from . import model as _model  # noqa: F401  (registers the hydravit_* models with timm)
from .checkpoint import load_model
from .model import HydraViT

__all__ = ['create_model', 'create_model_or_load']


def create_model(name: str, **kwargs: Any) -> HydraViT:
    """``timm.create_model`` for HydraViT names, with the valid names listed on a typo."""
    names = timm.list_models('hydravit_*')
    if name not in names:
        raise ValueError(f'unknown model {name!r}; HydraViT models: {", ".join(names)}')
    return timm.create_model(name, **kwargs)


def create_model_or_load(model_name: Optional[str] = None, checkpoint: Optional[str] = None,
                         **kwargs: Any) -> HydraViT:
    if checkpoint:
        return load_model(checkpoint, **kwargs)
    if not model_name:
        raise ValueError('give a model name (--model) or a checkpoint (--checkpoint)')
    return create_model(model_name, **kwargs)
