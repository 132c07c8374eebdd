"""Predictions for unlabelled images: class names, top-5 probabilities and the k that produced them.

The images go through the checkpoint's own evaluation preprocessing (mean/std, size, crop, channels), the
same as ``hydravit eval``; class names come from the checkpoint's metadata (indices where it has none).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import resolve_data_config

from ..cascade.policy import load_policy
from ..cascade.predictor import CascadePredictor
from ..data.transforms import build_transform
from ..evaluation.evaluate import load_for_eval
from ..models.factory import UniversalModel
from ..storage.run_folder import resolve_checkpoint, training_metadata

__all__ = ['IMAGE_EXTENSIONS', 'image_files', 'Predictor', 'TOP']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
TOP = 5  # classes reported per image


def image_files(inputs: Sequence[str | os.PathLike]) -> List[Path]:
    """Image files named directly, and the image files under each folder (recursively, sorted)."""
    if not inputs:
        raise ValueError('give at least one image file or folder')
    files: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f'{item} holds no image files (extensions {", ".join(IMAGE_EXTENSIONS)})')
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f'{item} does not exist')
    return files


class Predictor:
    """A checkpoint's subnetwork ``k`` (default: its largest trained k), or an early-exit cascade over its
    subnetworks (``cascade``: a policy file), applied to image files."""

    def __init__(self, checkpoint: str | os.PathLike, k: Optional[int] = None, *, device: str = 'cpu',
                 model_name: Optional[str] = None, use_ema: bool = False,
                 cascade: Optional[str | os.PathLike] = None) -> None:
        if cascade is not None and k is not None:
            raise ValueError('give either k or a cascade policy, not both')
        self.path = resolve_checkpoint(checkpoint, use_ema)
        model, ks = load_for_eval(self.path, None if k is None else [k], model_name)
        self.model: UniversalModel = model.to(device).eval()
        self.k = ks[-1] if k is None else ks[0]
        self.cascade = None if cascade is None else CascadePredictor(self.model, load_policy(Path(cascade)))
        self.device = torch.device(device)
        names = training_metadata(self.path)['class_names']
        self.class_names = list(names) if names and len(names) == model.num_classes else \
            [str(i) for i in range(model.num_classes)]
        self.transform: Callable[[Image.Image], torch.Tensor] = build_transform(
            resolve_data_config({}, model=self.model), is_training=False)

    def _load(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                return self.transform(img)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f'{path}: not a readable image ({e})') from None

    def _forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Logits and the k that answered each image (the exit stage under a cascade)."""
        if self.cascade is None:
            return self.model(images, k=self.k), [self.k] * len(images)
        out = self.cascade(images)
        return out.logits, out.exit_k.tolist()

    def predict(self, files: Sequence[Path], batch_size: int = 64,
                progress: Optional[Callable[..., Iterable[Any]]] = None) -> List[Dict[str, Any]]:
        """One row per file: ``file, k, class1, prob1, ..., class5, prob5`` (probabilities in 0..1)."""
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        starts: Iterable[int] = range(0, len(files), batch_size)
        if progress is not None:
            starts = progress(starts, total=-(-len(files) // batch_size), desc='predict')
        rows = []
        top = min(TOP, self.model.num_classes)
        with torch.inference_mode():
            for start in starts:
                chunk = files[start:start + batch_size]
                images = torch.stack([self._load(f) for f in chunk]).to(self.device)
                logits, used_k = self._forward(images)
                probs = torch.softmax(logits.float(), dim=-1)
                values, indices = probs.topk(top, dim=1)
                for f, k, p, i in zip(chunk, used_k, values.tolist(), indices.tolist(), strict=True):
                    row: Dict[str, Any] = {'file': str(f), 'k': k}
                    for rank, (prob, index) in enumerate(zip(p, i, strict=True), start=1):
                        row[f'class{rank}'] = self.class_names[index]
                        row[f'prob{rank}'] = prob
                    rows.append(row)
        return rows
