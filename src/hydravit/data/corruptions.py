"""Common corruptions of test images at five severities, deterministic per seed (Fashion-MNIST-C style).

The maintained corruption libraries (``imagecorruptions``: ImageNet-C's code) need SciPy, scikit-image and
OpenCV and their frost/fog/glass kernels assume 224-pixel RGB images, so the corruptions here are written with
torch and torchvision's functional transforms, on images in [0, 1]; the severity constants follow ImageNet-C's
where a pixel-size-free constant exists (noise levels, contrast, brightness, pixelation, JPEG quality) and are
scaled to 28-pixel images for the blur. Every image gets its own random generator seeded from (seed,
corruption, severity, index), so a corrupted test set is the same on every run, worker count and batch size.
"""
from __future__ import annotations

import io
import math
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['CORRUPTIONS', 'SEVERITIES', 'Corruption', 'CorruptedDataset', 'corrupt', 'parse_corruptions']

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _gaussian_noise(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=g) * sigma


def _shot_noise(x: torch.Tensor, rate: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x.clamp(0, 1) * rate, generator=g) / rate


def _impulse_noise(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    hit = u < amount
    return torch.where(hit, salt.to(x.dtype), x)


def _gaussian_blur(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def _contrast(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x: torch.Tensor, shift: float, g: torch.Generator) -> torch.Tensor:
    return x + shift


def _pixelate(x: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x[None], size=(max(1, int(h * scale)), max(1, int(w * scale))), mode='area')
    return F.interpolate(small, size=(h, w), mode='nearest')[0]


def _jpeg(x: torch.Tensor, quality: float, g: torch.Generator) -> torch.Tensor:
    """A JPEG round trip through PIL (torchvision's own codec is deprecated)."""
    as_bytes = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    image = TF.to_pil_image(as_bytes)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=int(quality))
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return TF.pil_to_tensor(decoded.convert(image.mode)).float() / 255


# name -> (function, its parameter at severities 1..5)
CORRUPTIONS: Dict[str, Tuple[Corruption, Tuple[float, ...]]] = {
    'gaussian_noise': (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    'shot_noise': (_shot_noise, (60.0, 25.0, 12.0, 5.0, 3.0)),
    'impulse_noise': (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    'gaussian_blur': (_gaussian_blur, (0.4, 0.6, 0.8, 1.0, 1.3)),
    'contrast': (_contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    'brightness': (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    'pixelate': (_pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
    'jpeg': (_jpeg, (25.0, 18.0, 15.0, 10.0, 7.0)),
}


def parse_corruptions(names: Sequence[str]) -> List[str]:
    """``names`` checked against :data:`CORRUPTIONS` (``'all'``: every one), in the order given."""
    if list(names) == ['all']:
        return list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f'unknown corruption(s) {unknown}: choose from all, {", ".join(CORRUPTIONS)}')
    return list(dict.fromkeys(names))


def _check_severity(severity: int) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {list(SEVERITIES)}, got {severity!r}')
    return int(severity)


def _seed(seed: int, name: str, severity: int, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + severity) * 10_000_019 + index


def corrupt(image: torch.Tensor, name: str, severity: int, *, seed: int = 0, index: int = 0) -> torch.Tensor:
    """``image`` (C, H, W in [0, 1]) under corruption ``name`` at ``severity`` 1..5, clamped to [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f'unknown corruption {name!r}: choose from {", ".join(CORRUPTIONS)}')
    fn, levels = CORRUPTIONS[name]
    g = torch.Generator().manual_seed(_seed(seed, name, _check_severity(severity), index) % (2 ** 63))
    return fn(image.float(), levels[severity - 1], g).clamp(0, 1)


class CorruptedDataset(Dataset):
    """A data set of normalised tensors (the model's eval transform) under one corruption at one severity.

    Images are de-normalised with ``mean``/``std``, corrupted in [0, 1] and normalised again, so the
    corruption acts on the pixels the model was trained to see, whatever its eval transform.
    """

    def __init__(self, dataset: Dataset, name: str, severity: int, *, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0) -> None:
        if name not in CORRUPTIONS:
            raise ValueError(f'unknown corruption {name!r}: choose from {", ".join(CORRUPTIONS)}')
        self.dataset, self.name, self.severity, self.seed = dataset, name, _check_severity(severity), seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        for attr in ('num_classes', 'class_indices', 'classes'):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, target = self.dataset[index]
        pixels = image * self.std + self.mean
        corrupted = corrupt(pixels, self.name, self.severity, seed=self.seed, index=index)
        return (corrupted - self.mean) / self.std, target
