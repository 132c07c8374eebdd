"""Building universal models: the registered ``hydravit_*`` variants (timm's registry) and the config factory.

Importing this module registers the variants with timm, so ``timm.create_model('hydravit_base_patch16_224')``
works after ``import hydravit``. :func:`model_from_config` is the one place that maps a config to its class.

timm's conventions hold: ``pretrained=True`` loads a local file named by ``pretrained_cfg_overlay=dict(file=…)``
(through :func:`checkpoint_filter_fn`, so a checkpoint loads at another ``img_size`` / ``patch_size``), and
``features_only=True`` returns timm's feature getter with a selectable k (``feature_k``, :mod:`.features`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Type, Union, cast

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .config import HydraViTConfig
from .features import KFeatureGetterNet
from .hydravit import HydraViT
from .separate import SeparateViTs

__all__ = ['UniversalModel', 'model_from_config', 'create_model', 'checkpoint_filter_fn', 'FASHION_MNIST_MEAN',
           'FASHION_MNIST_STD', 'default_cfgs']

# every model that serves subnetworks by k: the sliced ViT, or one ViT per k
UniversalModel = Union[HydraViT, SeparateViTs]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


_FMNIST_CFG = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation='bilinear',
                   mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

default_cfgs = generate_default_cfgs({
    'hydravit_base_patch16_224': _cfg(),
    'hydravit_fmnist_patch7_28': _cfg(**_FMNIST_CFG),
    'hydravit_test_patch4_16': _cfg(num_classes=10, input_size=(3, 16, 16), crop_pct=1.0),
})


def model_from_config(config: HydraViTConfig, **overrides: Any) -> UniversalModel:
    """The universal model a config describes: a :class:`HydraViT`, or ``SeparateViTs`` for ``'separate'``."""
    kwargs = {**config.to_dict(), **overrides}
    return _model_class(kwargs.get('nesting', 'hydravit'))(**kwargs)


def _model_class(nesting: str) -> Union[Type[HydraViT], Type[SeparateViTs]]:
    return SeparateViTs if nesting == 'separate' else HydraViT


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A universal (or timm ViT) state dict made to fit ``model``: timm's pure filter for ``pretrained=True``.

    Position embeddings of another token grid are resampled with timm's ``resample_abs_pos_embed`` and patch
    kernels of another size with ``resample_patch_embed`` (both act per channel, so every subnetwork's slice
    is resampled exactly as a standalone ViT's would be). A timm train.py checkpoint dict is unwrapped.
    """
    for key in ('state_dict', 'model'):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping):
            state_dict = inner
    target = model.state_dict()
    prefix_tokens = int(getattr(model, 'num_prefix_tokens', 1))
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        wanted = target.get(name)
        if wanted is not None and tensor.shape != wanted.shape:
            if re.fullmatch(r'(.+\.)?pos_embed', name):
                old = int(round((tensor.shape[1] - prefix_tokens) ** 0.5))
                new = int(round((wanted.shape[1] - prefix_tokens) ** 0.5))
                tensor = resample_abs_pos_embed(tensor, new_size=[new, new], old_size=[old, old],
                                                num_prefix_tokens=prefix_tokens, verbose=True)
            elif re.fullmatch(r'(.+\.)?patch_embed\.proj\.weight', name):
                tensor = resample_patch_embed(tensor, list(wanted.shape[-2:]), verbose=True)
        out[name] = tensor
    return out


def _check_pretrained_source(variant: str, kwargs: Mapping[str, Any]) -> None:
    """``pretrained=True`` needs a local file: nothing is published to download (and nothing is downloaded)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.state_dict is not None:
        return
    if not cfg.file:
        raise ValueError(f'no pretrained weights are published for {variant}: pass a checkpoint file with '
                         "pretrained_cfg_overlay=dict(file='model_best.safetensors'), or load one with "
                         'hydravit.storage.load_model(path)')
    from pathlib import Path
    if not Path(cfg.file).is_file():
        raise FileNotFoundError(f'pretrained file {cfg.file} does not exist')


def _create_hydravit(variant: str, pretrained: bool = False, **kwargs: Any) -> UniversalModel:
    if pretrained:
        _check_pretrained_source(variant, kwargs)
    feature_k = kwargs.pop('feature_k', None)
    feature_cfg: Dict[str, Any] = {}
    if kwargs.get('features_only'):
        feature_cfg['out_indices'] = kwargs.pop('out_indices', min(3, int(kwargs.get('depth', 12))))
        feature_cfg['feature_cls'] = kwargs.pop('feature_cls', KFeatureGetterNet)
        if feature_k is not None:
            if feature_cfg['feature_cls'] is not KFeatureGetterNet:
                raise ValueError(f"feature_k needs the default feature class (k-aware getter), not "
                                 f"feature_cls={feature_cfg['feature_cls']!r}; an FX extractor is fixed at the k it "
                                 'was traced at (trace inside model.use_k(k))')
            feature_cfg['k'] = feature_k
    elif feature_k is not None:
        raise ValueError('feature_k selects the k of a features_only=True model; pass features_only=True or k to '
                         'forward_intermediates')
    model = build_model_with_cfg(_model_class(kwargs.get('nesting', 'hydravit')), variant, pretrained=pretrained,
                                 pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)
    return cast(UniversalModel, model)  # timm types the result as nn.Module; it is the class passed in


@register_model
def hydravit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> UniversalModel:
    """H=12 heads of 64, depth 12: k=3, 6, 12 have exactly the shapes of DeiT-Ti, DeiT-S, DeiT-B."""
    args = dict(patch_size=16, num_heads=12, head_dim=64, depth=12, k_choices=tuple(range(3, 13)))
    return _create_hydravit('hydravit_base_patch16_224', pretrained, **dict(args, **kwargs))


@register_model
def hydravit_fmnist_patch7_28(pretrained: bool = False, **kwargs: Any) -> UniversalModel:
    """CPU-sized variant for 28x28 grey images (Fashion-MNIST): widths 24..96, 16 patches of 7x7.

    Heads of 8 channels: at the 10-minute CPU budget of the built-in run a narrow model that sees the
    data set several times beats a wider one that sees it once or twice (see configs/fmnist_cpu.yaml).
    """
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, num_heads=12, head_dim=8, depth=6,
                mlp_ratio=4.0, k_choices=tuple(range(3, 13)))
    return _create_hydravit('hydravit_fmnist_patch7_28', pretrained, **dict(args, **kwargs))


@register_model
def hydravit_test_patch4_16(pretrained: bool = False, **kwargs: Any) -> UniversalModel:
    """A few-thousand-parameter model for unit tests."""
    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, num_heads=4, head_dim=8, depth=2,
                mlp_ratio=2.0)
    return _create_hydravit('hydravit_test_patch4_16', pretrained, **dict(args, **kwargs))


def create_model(name: str, **kwargs: Any) -> UniversalModel:
    """``timm.create_model`` for HydraViT names, with the valid names listed on a typo."""
    names = timm.list_models('hydravit_*')
    if name not in names:
        raise ValueError(f'unknown model {name!r}; HydraViT models: {", ".join(names)}')
    return cast(UniversalModel, timm.create_model(name, **kwargs))  # every hydravit_* entry point builds one
