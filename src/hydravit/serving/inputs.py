"""Request bytes -> model input, with the checkpoint's own preprocessing; every bad input a clear 4xx.

The transform is the evaluation transform of ``hydravit eval`` (:func:`hydravit.data.transforms.build_transform`
on the checkpoint's stored data config), so a served image gets exactly the logits eval computed for it.
Images of another size or mode are converted by that transform (resize + centre crop, mode to L/RGB), or
with ``strict=True`` refused unless they already have the model's size and mode. An image that already has the
model's size and mode skips the resize and crop where the transform leaves such an image unchanged (checked on a
probe image when the decoder is built): the same tensor, at a quarter of the cost per image.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.transforms import build_transform

__all__ = ['InputError', 'ImageDecoder', 'CONVERTIBLE_MODES']

# modes PIL converts to L / RGB without losing the meaning of the values (16-bit and float modes would clip)
CONVERTIBLE_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 'La')


class InputError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code (4xx), the message names the problem."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ImageDecoder:
    """Decodes one image file (PNG, JPEG, ... as PIL reads them) into a (C, H, W) tensor for the model."""
    data_config: Mapping[str, Any]
    strict: bool = False
    max_pixels: int = 16_000_000  # a decompression bomb is refused before it is decoded

    def __post_init__(self) -> None:
        c, h, w = (int(v) for v in self.data_config['input_size'])
        self.channels, self.size = c, (w, h)
        self.mode = 'L' if c == 1 else 'RGB'
        self.transform: Callable = build_transform(dict(self.data_config), is_training=False)
        self.mean = np.asarray(self.data_config['mean'], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(self.data_config['std'], dtype=np.float32).reshape(-1, 1, 1)
        self.direct = self._direct_equals_transform()

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        """What ``ToTensor`` + ``Normalize`` make of an image at the model's size and mode, with no resampling.

        The same float32 operations in the same order, in numpy (a few torch dispatches cost more than the
        arithmetic on one small image).
        """
        w, h = self.size
        pixels = np.asarray(img, dtype=np.float32).reshape(h, w, self.channels).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray((pixels / np.float32(255) - self.mean) / self.std))

    def _direct_equals_transform(self) -> bool:
        """Whether the transform maps an image at the model's size and mode to exactly :meth:`_to_tensor`'s result."""
        shape = (self.size[1], self.size[0]) + (() if self.channels == 1 else (self.channels,))
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), self.mode)
        try:
            return torch.equal(self.transform(probe), self._to_tensor(probe))
        except (RuntimeError, ValueError):  # a transform of another output shape or dtype
            return False

    def describe(self) -> Dict[str, Any]:
        cfg = self.data_config
        return {'input_size': [self.channels, self.size[1], self.size[0]], 'mode': self.mode,
                'mean': list(cfg['mean']), 'std': list(cfg['std']), 'interpolation': cfg.get('interpolation'),
                'crop_pct': cfg.get('crop_pct'), 'strict': self.strict, 'source': cfg.get('source')}

    def open(self, data: bytes, name: str = 'image') -> Image.Image:
        if not data:
            raise InputError(f'{name} is empty: send the bytes of an image file (PNG, JPEG, ...)')
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('error', Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                if width * height > self.max_pixels:
                    raise InputError(f'{name} is {width}x{height} pixels, more than the {self.max_pixels} allowed',
                                     status=413)
                img.load()  # decodes now: truncated files fail here, not in the transform
        except InputError:
            raise
        except UnidentifiedImageError:
            raise InputError(f'{name} is not an image file PIL can read ({len(data)} bytes starting '
                             f'{data[:8]!r}): send PNG, JPEG or another image format') from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f'{name} is too large to decode: {e}', status=413) from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise InputError(f'{name} is a broken or truncated image ({type(e).__name__}: {e})') from None
        return img

    def check(self, img: Image.Image, name: str = 'image') -> None:
        if img.mode not in CONVERTIBLE_MODES:
            raise InputError(f'{name} has image mode {img.mode!r}; the model takes {self.mode} and converts only '
                             f'modes {", ".join(CONVERTIBLE_MODES)}')
        if self.strict and (img.size != self.size or img.mode != self.mode):
            raise InputError(f'{name} is {img.size[0]}x{img.size[1]} {img.mode}; this server (strict input) takes '
                             f'only {self.size[0]}x{self.size[1]} {self.mode} images')
        if min(img.size) < 1:
            raise InputError(f'{name} has no pixels ({img.size[0]}x{img.size[1]})')

    def __call__(self, data: bytes, name: str = 'image') -> torch.Tensor:
        img = self.open(data, name)
        self.check(img, name)
        if self.direct and img.size == self.size and img.mode == self.mode:
            return self._to_tensor(img)
        try:
            x = self.transform(img)
        except Exception as e:  # a mode PIL lists but cannot convert, an odd palette, ...
            raise InputError(f'{name} could not be converted to the model input: {type(e).__name__}: {e}') from None
        expected: Tuple[int, ...] = (self.channels, self.size[1], self.size[0])
        if tuple(x.shape) != expected:
            raise InputError(f'{name} became a tensor of shape {tuple(x.shape)}, not {expected}')
        return x
