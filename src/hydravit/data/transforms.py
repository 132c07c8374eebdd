"""Image transforms: timm's ``create_transform`` after a conversion to the model's channel count."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from PIL import Image

from .datasets import DataError

__all__ = ['ConvertMode', 'build_transform', 'pillow_safe_posterize']


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
    timm_transform = pillow_safe_posterize(create_transform(**kwargs))
    return transforms.Compose([ConvertMode('L' if channels == 1 else 'RGB'), timm_transform])


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning a black image (what Pillow < 13 returned) instead of an error."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def pillow_safe_posterize(transform: Callable) -> Callable:
    """Make the posterize ops of timm RandAugment/AutoAugment inside ``transform`` work with Pillow >= 13.

    timm's ``PosterizeIncreasing`` keeps ``4 - int(magnitude / 10 * 4)`` bits, 0 at magnitude 10, which DeiT's
    rand-m9-mstd0.5 draws for about 2 % of its ops; Pillow 13 rejects 0 bits with a ValueError, which would stop
    a run after a few thousand images. Only this transform's op objects change (timm itself is untouched).
    """
    from timm.data.auto_augment import posterize as timm_posterize

    stack = [transform]
    while stack:
        node = stack.pop()
        stack.extend(getattr(node, 'transforms', None) or [])  # Compose
        ops = list(getattr(node, 'ops', None) or [])  # RandAugment
        for sub_policy in getattr(node, 'policy', None) or []:  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is timm_posterize:
                op.aug_fn = _posterize
    return transform
