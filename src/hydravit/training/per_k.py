"""Running training loss and accuracy of every k over an epoch's batches: how each subnetwork converges.

The trainer adds one entry per (batch, k) it trains; at the end of an epoch the sums are reduced over
processes and become ``summary.csv`` columns ``train_loss_k<N>`` and ``train_top1_k<N>`` (k never drawn
in an epoch: empty cells). Accuracy is on the training batches as trained (augmented; with mixup/cutmix
against the dominant label of each mixed target).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from .distributed import DistEnv, all_reduce_sum

__all__ = ['PerKTrainingStats', 'per_k_columns']


def per_k_columns(ks: Sequence[int]) -> List[str]:
    """The summary columns of :class:`PerKTrainingStats`, in their order."""
    return [f'train_{metric}_k{k}' for k in ks for metric in ('loss', 'top1')]


class PerKTrainingStats:
    """Sums of loss, correct predictions and images per trained k since the last :meth:`reset`."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = sorted(int(k) for k in ks)
        self.sums: Dict[int, List[float]] = {}
        self.reset()

    def reset(self) -> None:
        self.sums = {k: [0.0, 0.0, 0.0] for k in self.ks}  # loss * images, correct, images

    def add(self, k: int, loss: float, logits: torch.Tensor, target: torch.Tensor) -> None:
        """One batch trained at ``k``: its mean ``loss``, ``logits`` and (hard or soft) ``target``."""
        labels = target.argmax(dim=-1) if target.ndim == 2 else target
        n = logits.shape[0]
        sums = self.sums[int(k)]
        sums[0] += loss * n
        sums[1] += float((logits.detach().argmax(dim=-1) == labels).sum())
        sums[2] += n

    def columns(self, env: DistEnv) -> Dict[str, Optional[float]]:
        """``train_loss_k<N>`` (mean loss) and ``train_top1_k<N>`` (%) of every k, summed over processes."""
        flat = self._totals(env)
        row: Dict[str, Optional[float]] = {}
        for i, k in enumerate(self.ks):
            loss, correct, n = flat[3 * i:3 * i + 3]
            row[f'train_loss_k{k}'] = loss / n if n else None
            row[f'train_top1_k{k}'] = 100.0 * correct / n if n else None
        return row

    def _totals(self, env: DistEnv) -> List[float]:
        """(loss, correct, images) of every k in order, summed over the processes of ``env``."""
        return all_reduce_sum([v for k in self.ks for v in self.sums[k]], env)

    def state_dict(self, env: Optional[DistEnv] = None) -> Dict[str, Any]:
        """The sums so far, over every process of ``env`` (a collective there): restore them on one process."""
        flat = self._totals(env or DistEnv())
        return {'ks': list(self.ks), 'sums': {str(k): flat[3 * i:3 * i + 3] for i, k in enumerate(self.ks)}}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore the sums of a run stopped mid-epoch (None, from an older checkpoint: start from zero)."""
        self.reset()
        for k, values in (state or {}).get('sums', {}).items():
            if int(k) in self.sums:
                self.sums[int(k)] = [float(v) for v in values]
