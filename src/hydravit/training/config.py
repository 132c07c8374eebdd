"""Every setting of a training run, named as timm ``train.py``'s arguments (the YAML keys of ``--config``).

Only checks that need no knowledge of a nesting method live here; what a method fixes or forbids is
checked by its plug-in (:mod:`hydravit.training.methods`), and recipes are read by
:mod:`hydravit.training.recipe`.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models.compiled import CompileOptions
from ..models.kchoices import check_k_choices

__all__ = ['TrainConfig', 'AMP_DTYPES', 'effective_lr']

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
LR_BASE_SCALES = ('', 'linear', 'sqrt')  # '': timm's choice by optimizer (sqrt for Adam-like and LAMB)
EVAL_METRIC = re.compile(r'top[15]_(mean|k(\d+))')


@dataclass
class TrainConfig:
    """Every setting of a run; names are timm ``train.py`` argument names (YAML keys of ``--config``)."""
    model: str = 'hydravit_fmnist_patch7_28'
    dataset: str = 'fashion-mnist'
    data_dir: Optional[str] = None
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    batch_size: int = 128
    validation_batch_size: Optional[int] = None
    epochs: int = 300
    lr: Optional[float] = None
    lr_base: float = 5e-4
    lr_base_size: int = 512
    lr_base_scale: str = 'linear'
    opt: str = 'adamw'
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    sched: str = 'cosine'
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    drop: float = 0.0
    drop_path: float = 0.0
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    no_aug: bool = False
    scale: Optional[Tuple[float, float]] = None
    ratio: Optional[Tuple[float, float]] = None
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.0
    train_interpolation: Optional[str] = None
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = 'pixel'
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    amp: bool = False
    amp_dtype: str = 'float16'
    grad_accum_steps: int = 1
    grad_checkpointing: bool = False
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    initial_checkpoint: Optional[str] = None
    resume: Optional[str] = None
    output: str = 'output/train'
    experiment: Optional[str] = None
    seed: int = 42
    workers: int = 0
    log_interval: int = 50
    val_interval: int = 1
    device: str = 'cpu'
    nproc_per_node: int = 1  # local processes joined by DDP (training.launch); batch_size is per process
    threads: Optional[int] = None  # torch CPU threads per process; recorded in args.yaml: the weights depend on it
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    skip_bad_images: bool = False
    method: str = 'hydravit'
    heads: Optional[List[int]] = None
    sampler: str = 'uniform'
    head_weights: Optional[List[float]] = None
    loss_weights: Optional[List[float]] = None  # one per k: its loss's factor in a step's sum (default 1 each)
    num_random: int = 1
    k_per_rank: bool = False
    inplace_distill: bool = False
    distill_start_epoch: float = 0.0  # in-place distillation from here on (before: labels only)
    distill_weight: float = 1.0  # the soft labels' share of a smaller k's loss; the rest is the labels' cross-entropy
    separate_heads: bool = False
    teacher_epochs: Optional[int] = None
    full_width_epochs: int = 0  # the largest k alone first, on a schedule of its own (training.schedule)
    importance_samples: int = 2048
    eval_heads: Optional[List[int]] = None
    eval_metric: str = 'top1_mean'
    checkpoint_interval_steps: int = 0
    report: bool = True
    torchcompile: Optional[str] = None  # a torch.compile backend (timm's flag): one graph per k
    torchcompile_mode: Optional[str] = None
    opt_active_slice: bool = False  # AdamW over the step's active slice only (training.slice_optimizer)
    resume_override: Optional[List[str]] = None
    max_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.nproc_per_node, bool) or not isinstance(self.nproc_per_node, int):
            raise ValueError(f'nproc_per_node must be an integer >= 1 (processes), got {self.nproc_per_node!r}')
        for name in ('batch_size', 'epochs', 'grad_accum_steps', 'val_interval', 'log_interval', 'importance_samples',
                     'nproc_per_node'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.lr_base_size < 1:
            raise ValueError(f'lr_base_size must be >= 1, got {self.lr_base_size}')
        if self.lr_base_scale not in LR_BASE_SCALES:
            raise ValueError(f'lr_base_scale must be one of {list(LR_BASE_SCALES)}, got {self.lr_base_scale!r}')
        for name in ('workers', 'checkpoint_interval_steps', 'num_random', 'max_nonfinite_steps', 'full_width_epochs'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if self.full_width_epochs >= self.epochs:
            raise ValueError(f'full_width_epochs must be in 0..{self.epochs - 1} (below epochs, so that every k '
                             f'trains), got {self.full_width_epochs}')
        self._check_distill()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f'threads must be an integer >= 1, got {self.threads!r}')
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f'amp_dtype must be one of {list(AMP_DTYPES)}, got {self.amp_dtype!r}')
        if not EVAL_METRIC.fullmatch(self.eval_metric):
            raise ValueError(f"eval_metric must be 'top1_mean', 'top5_mean' or 'top1_k<N>'/'top5_k<N>', "
                             f'got {self.eval_metric!r}')
        if self.eval_heads is not None:
            check_k_choices(self.eval_heads, what='--eval-heads')
        if self.heads is not None:
            check_k_choices(self.heads, what='--heads')
            self._sort_heads_with_their_weights()
        if self.loss_weights is not None and any(not math.isfinite(w) or w <= 0 for w in self.loss_weights):
            raise ValueError(f'--loss-weights must be finite and > 0, got {self.loss_weights}')
        if self.torchcompile_mode is not None and self.torchcompile is None:
            raise ValueError('--torchcompile-mode needs --torchcompile (the backend, e.g. inductor)')
        self.compile_options()  # validates backend and mode
        if self.opt_active_slice and self.opt.lower() != 'adamw':
            raise ValueError(f'--opt-active-slice is an AdamW step over the active slice: it needs --opt adamw, '
                             f'got --opt {self.opt}')
        for name in ('scale', 'ratio'):
            value = getattr(self, name)
            if value is not None and len(value) != 2:
                raise ValueError(f'{name} takes two numbers (min max), got {value!r}')

    def _sort_heads_with_their_weights(self) -> None:
        """The model sorts its k choices: keep each per-k weight with its k."""
        assert self.heads is not None
        order = sorted(range(len(self.heads)), key=self.heads.__getitem__)
        for name in ('head_weights', 'loss_weights'):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != len(self.heads):
                raise ValueError(f'--{name.replace("_", "-")} has {len(values)} weights for {len(self.heads)} '
                                 f'--heads {self.heads}: give one weight per k')
            setattr(self, name, [values[i] for i in order])
        self.heads = [self.heads[i] for i in order]

    def _check_distill(self) -> None:
        if not 0.0 < self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in (0, 1] (the soft labels' share of the loss), "
                             f'got {self.distill_weight}')
        if not 0.0 <= self.distill_start_epoch < self.epochs:
            raise ValueError(f'distill_start_epoch must be in [0, {self.epochs}) (an epoch of the run), '
                             f'got {self.distill_start_epoch}')
        if not self.inplace_distill and (self.distill_start_epoch or self.distill_weight != 1.0):
            raise ValueError('--distill-start-epoch and --distill-weight set up in-place distillation: '
                             'they need --inplace-distill')

    def compile_options(self) -> Optional[CompileOptions]:
        """The torch.compile settings, or None when the run is eager."""
        if self.torchcompile is None:
            return None
        return CompileOptions(self.torchcompile, self.torchcompile_mode)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def effective_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``lr``, or timm train.py's rule when ``lr`` is not given: ``lr_base * (global batch / lr_base_size)``,
    linearly or by its square root (``lr_base_scale``; empty: sqrt for Adam-like and LAMB optimizers)."""
    if cfg.lr is not None:
        return cfg.lr
    ratio = cfg.batch_size * world_size * cfg.grad_accum_steps / cfg.lr_base_size
    scale = cfg.lr_base_scale or ('sqrt' if any(o in cfg.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return cfg.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
