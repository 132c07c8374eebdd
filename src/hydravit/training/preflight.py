"""Every check of a run that needs no data, done before any training: a comparison checks all its runs first,
so a bad setting of the last method fails in seconds, not after the other methods have trained."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .config import EVAL_METRIC, TrainConfig
from .methods import method_class
from .model_setup import build_model

__all__ = ['check_eval_metric', 'check_before_training']


def check_eval_metric(metric: str, eval_ks: Sequence[int]) -> None:
    """``--eval-metric top1_k<N>`` must name an evaluated k."""
    m = EVAL_METRIC.fullmatch(metric)
    if m is not None and m.group(2) and int(m.group(2)) not in eval_ks:
        raise ValueError(f'--eval-metric {metric}: k={m.group(2)} is not evaluated; --eval-heads are {list(eval_ks)}')


def check_before_training(cfg: TrainConfig, num_classes: Optional[int] = None) -> List[int]:
    """Raise the error a run of ``cfg`` would raise at its start, without data: the method's settings, the
    model it builds (k set, image size, nesting), the evaluated k and the metric. Returns the evaluated k.

    The model is built once on the CPU (the caller's RNG streams untouched) and dropped.
    """
    method_class(cfg.method).check(cfg)
    if cfg.initial_checkpoint and not Path(cfg.initial_checkpoint).is_file():
        raise FileNotFoundError(f'--initial-checkpoint {cfg.initial_checkpoint} does not exist')
    with torch.random.fork_rng(devices=[]):
        model = build_model(replace(cfg, initial_checkpoint=None), num_classes or cfg.num_classes or 10)
    eval_ks = model.resolve_ks(cfg.eval_heads or None)
    check_eval_metric(cfg.eval_metric, eval_ks)
    return eval_ks
