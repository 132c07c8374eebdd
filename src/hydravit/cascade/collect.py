"""Every candidate k's logits on every image of a split, computed once: what calibration and sweeps work on."""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch

from ..models.factory import UniversalModel

__all__ = ['collect_logits', 'stack_images']


def collect_logits(model: UniversalModel, loader: Iterable, ks: Sequence[int], *,
                   device: str | torch.device = 'cpu') -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
    """``({k: logits (N, classes)}, labels (N,))`` on CPU, one pass over ``loader`` for all ``ks``."""
    ks = [model.resolve_k(k) for k in ks]
    device = torch.device(device)
    logits: Dict[int, list] = {k: [] for k in ks}
    labels = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                images = batch[0].to(device)
                labels.append(torch.as_tensor(batch[1]).cpu())
                for k in ks:
                    logits[k].append(model(images, k=k).float().cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError('the data loader yielded no images')
    return {k: torch.cat(v) for k, v in logits.items()}, torch.cat(labels)


def stack_images(dataset, indices: Sequence[int]) -> torch.Tensor:
    """Images ``indices`` of ``dataset`` (transformed) as one tensor: the batches timed on this machine."""
    if not len(indices):
        raise ValueError('no images to time')
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])
