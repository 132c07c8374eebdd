"""The non-finite guard: a NaN/inf loss or gradient stops the run (or skips the step, within a budget).

Without it a diverged run keeps "training" on NaN weights, whose NaN logits then score as class 0, and its
``model_best`` is written from them. The guard is asked between backward and the optimizer step.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, List, Optional

import torch

__all__ = ['NonFiniteError', 'NonFiniteGuard']

logger = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """A training step produced a NaN/inf loss or gradient (more often than ``--max-nonfinite-steps`` allows)."""


class NonFiniteGuard:
    """Tracks one optimizer step's losses; says whether the step may be applied.

    ``max_skips`` steps with a non-finite loss or gradient are skipped (no parameter update) before the
    run stops with :class:`NonFiniteError`; 0 (the default) stops at the first one.
    """

    def __init__(self, max_skips: int = 0, skipped: int = 0) -> None:
        self.max_skips, self.skipped = max_skips, skipped
        self.reason: Optional[str] = None

    def record_loss(self, loss: float, k: int) -> None:
        if not math.isfinite(loss) and self.reason is None:
            self.reason = f'loss {loss} at k={k}'

    def check_gradients(self, parameters: Iterable[torch.nn.Parameter], ks: List[int]) -> None:
        if self.reason is not None:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()):
            self.reason = f'gradient at k={ks}'

    def finish_step(self, epoch: int, step: int, update: int) -> bool:
        """Whether the step was finite; counts a skip or raises once the budget is spent. Resets the step."""
        reason, self.reason = self.reason, None
        if reason is None:
            return True
        self.skipped += 1
        where = f'epoch {epoch} step {step} (update {update})'
        if self.skipped > self.max_skips:
            budget = (f'after skipping {self.max_skips} such step(s) (--max-nonfinite-steps)' if self.max_skips
                      else 'lower --lr or use --clip-grad, or skip such steps with --max-nonfinite-steps N')
            raise NonFiniteError(f'non-finite {reason} in {where}: training diverged and stops here, {budget}; '
                                 'no checkpoint was written from it (the last one holds finite weights)')
        logger.warning('skipping %s: non-finite %s (%d of %d allowed)', where, reason, self.skipped, self.max_skips)
        return False
