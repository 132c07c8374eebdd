"""Building universal models: the registered ``hydravit_*`` variants (timm's registry) and the config factory.

Importing this module registers the variants with timm, so ``timm.create_model('hydravit_base_patch16_224')``
works after ``import hydravit``. :func:`model_from_config` is the one place that maps a config to its class.
"""
from __future__ import annotations

from typing import Any, Dict, Type, Union, cast

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .config import HydraViTConfig
from .hydravit import HydraViT
from .separate import SeparateViTs

__all__ = ['UniversalModel', 'model_from_config', 'create_model', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD',
           'default_cfgs']

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


def _create_hydravit(variant: str, pretrained: bool = False, **kwargs: Any) -> UniversalModel:
    if pretrained:
        raise ValueError(f'no pretrained weights are published for {variant}; load a checkpoint with '
                         'hydravit.storage.load_model(path) instead')
    model = build_model_with_cfg(_model_class(kwargs.get('nesting', 'hydravit')), variant, pretrained=False,
                                 **kwargs)
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
