"""Image transforms: timm's ``create_transform`` after a conversion to the model's channel count."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from PIL import Image

from .datasets import DataError

__all__ = ['ConvertMode', 'build_transform']


class ConvertMode:
    """PIL image to ``mode`` ('L' for 1-channel models, 'RGB' for 3): any data set feeds any model."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.mode!r})'


def build_transform(data_config: Mapping[str, Any], is_training: bool, **aug: Any) -> Callable:
    """timm's ``create_transform`` for ``data_config`` (as from ``resolve_data_config``), after a conversion
    of the PIL image to the model's channel count. ``aug``: timm keyword arguments (scale, ratio, hflip,
    auto_augment, re_prob, color_jitter, ...); ``None`` values take timm's defaults. Images of <= 32 px
    are not resize-cropped for evaluation (crop_pct 1.0)."""
    from timm.data import create_transform
    from torchvision import transforms

    input_size = tuple(data_config['input_size'])
    channels, size = input_size[0], input_size[-2:]
    if channels not in (1, 3):
        raise DataError(f'input_size {input_size}: only 1 or 3 channels are supported')
    mean, std = tuple(data_config.get('mean', ())), tuple(data_config.get('std', ()))
    if len(mean) != channels or len(std) != channels:
        raise DataError(f'mean {mean} and std {std} must have one value per channel ({channels})')
    crop_pct = data_config.get('crop_pct')
    if max(size) <= 32:
        crop_pct = 1.0
    kwargs = dict(input_size=input_size, is_training=is_training, mean=mean, std=std,
                  interpolation=data_config.get('interpolation', 'bilinear'), crop_pct=crop_pct,
                  crop_mode=data_config.get('crop_mode'))
    kwargs.update({k: v for k, v in aug.items() if v is not None})
    timm_transform = create_transform(**kwargs)
    return transforms.Compose([ConvertMode('L' if channels == 1 else 'RGB'), timm_transform])
