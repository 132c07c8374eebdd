"""Stochastic-dropout training of a HydraViT: each step trains the subnetwork(s) k drawn by a sampler.

Built on timm's pieces (data transforms, Mixup/CutMix, optimizer and scheduler factories, ModelEmaV3) and
PyTorch DDP. Every rank trains the same k in the same step (the sampler is a pure function of seed,
epoch and step), so the all-reduced gradient belongs to one subnetwork. A run resumed from any
checkpoint ends with the same weights as an uninterrupted one: the data order, each sample's
augmentation and the k of each step are functions of (seed, epoch, index), and the remaining RNG
states are saved.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .checkpoint import (CheckpointError, atomic_write, load_config_and_state, load_model, load_state_dict_file,
                         read_metadata, save_model)
from .costs import subnet_cost
from .importance import measure_importance, permutation_from_importance, permute_optimizer_state, reorder_model
from .methods import get_method
from .model import HydraViT
from .registry import create_model
from .subnet import init_from_vit
from .train_state import (capture_rng, load_training_checkpoint, read_summary, resolve_resume, restore_rng,
                          save_training_checkpoint, write_summary)

__all__ = ['TrainConfig', 'TrainResult', 'load_train_config', 'train', 'DEFAULT_CONFIG']

DEFAULT_CONFIG = 'fmnist_cpu.yaml'
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
FUSED_OPTIMIZERS = ('adam', 'adamw')  # torch.optim classes with fused CPU and CUDA kernels
EVAL_METRIC = re.compile(r'top[15]_(mean|k(\d+))')
TEACHER_FILE = 'teacher.safetensors'  # DynaBERT's frozen full-width teacher, in the run folder


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
    opt: str = 'adamw'
    momentum: float = 0.9
    weight_decay: float = 0.05
    sched: str = 'cosine'
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
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
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = 'pixel'
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    amp: bool = False
    amp_dtype: str = 'float16'
    grad_accum_steps: int = 1
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
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    skip_bad_images: bool = False
    method: str = 'hydravit'
    heads: Optional[List[int]] = None
    sampler: str = 'uniform'
    head_weights: Optional[List[float]] = None
    num_random: int = 1
    k_per_rank: bool = False
    inplace_distill: bool = False
    separate_heads: bool = False
    teacher_epochs: Optional[int] = None
    importance_samples: int = 2048
    eval_heads: Optional[List[int]] = None
    eval_metric: str = 'top1_mean'
    checkpoint_interval_steps: int = 0
    report: bool = True

    def __post_init__(self) -> None:
        for name in ('batch_size', 'epochs', 'grad_accum_steps', 'val_interval', 'log_interval', 'importance_samples'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('workers', 'checkpoint_interval_steps', 'num_random'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f'amp_dtype must be one of {list(AMP_DTYPES)}, got {self.amp_dtype!r}')
        if not EVAL_METRIC.fullmatch(self.eval_metric):
            raise ValueError(f"eval_metric must be 'top1_mean', 'top5_mean' or 'top1_k<N>'/'top5_k<N>', "
                             f'got {self.eval_metric!r}')
        if self.heads is not None:
            if len(set(self.heads)) != len(self.heads):
                raise ValueError(f'--heads {self.heads}: each k may appear once')
            if self.head_weights is not None:
                if len(self.head_weights) != len(self.heads):
                    raise ValueError(f'--head-weights has {len(self.head_weights)} weights for {len(self.heads)} '
                                     f'--heads {self.heads}: give one weight per k')
                # the model sorts its k choices: keep each weight with its k
                pairs = sorted(zip(self.heads, self.head_weights))
                self.heads, self.head_weights = [k for k, _ in pairs], [w for _, w in pairs]
        for name in ('scale', 'ratio'):
            value = getattr(self, name)
            if value is not None and len(value) != 2:
                raise ValueError(f'{name} takes two numbers (min max), got {value!r}')
        self._check_method()

    def _check_method(self) -> None:
        """Settings a method's update scheme fixes or cannot honour."""
        method = get_method(self.method)
        if method.sampler and self.sampler != method.sampler:
            raise ValueError(f'--method {self.method} trains with --sampler {method.sampler} ({method.summary}); '
                             f'got --sampler {self.sampler}')
        if self.method == 'separate' and self.clip_grad is not None:
            raise ValueError('--clip-grad clips one global norm, which would couple the separate ViTs\' updates; '
                             'train --method separate without it')
        if self.method in ('separate', 'dynabert') and self.separate_heads:
            raise ValueError(f'--separate-heads is not available with --method {self.method} (separate: every k '
                             'has its own ViT already; dynabert: reordering needs the shared classifier)')
        if self.method != 'dynabert':
            if self.teacher_epochs is not None:
                raise ValueError(f'--teacher-epochs is a --method dynabert setting, not {self.method}')
            return
        if self.inplace_distill:
            raise ValueError('--method dynabert distils every k from its full-width teacher; drop --inplace-distill')
        if self.teacher_epochs is not None and not 0 <= self.teacher_epochs < self.epochs:
            raise ValueError(f'--teacher-epochs must be in 0..{self.epochs - 1} (below --epochs), '
                             f'got {self.teacher_epochs}')

    @property
    def dynabert_teacher_epochs(self) -> int:
        """Epochs of full-width training before reordering: as set, else 0 from a checkpoint, else a quarter."""
        if self.teacher_epochs is not None:
            return self.teacher_epochs
        return 0 if self.initial_checkpoint else self.epochs // 4

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_train_config(path: Optional[str | os.PathLike] = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML recipe (default: the built-in ``configs/fmnist_cpu.yaml``)."""
    if path is None:
        text = resources.files('hydravit').joinpath('configs', DEFAULT_CONFIG).read_text()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'--config: {path} does not exist')
        text = path.read_text()
    recipe = yaml.safe_load(text) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f'{path or DEFAULT_CONFIG}: a recipe is a YAML mapping of setting: value')
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted((set(recipe) | set(overrides)) - names)
    if unknown:
        raise ValueError(f'unknown setting(s) {unknown}; valid settings: {", ".join(sorted(names))}')
    prescribed = get_method(overrides['method']).sampler if 'method' in overrides else None
    if prescribed and 'sampler' not in overrides:  # the method's update scheme wins over the recipe's sampler
        overrides = {**overrides, 'sampler': prescribed}
    return TrainConfig(**{**recipe, **overrides})


@dataclass
class TrainResult:
    out_dir: Optional[Path]
    results: List[Dict[str, Any]]
    summary: List[Dict[str, Any]]
    best_metric: Optional[float]
    best_epoch: Optional[int]


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistEnv:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
    if world <= 1:
        return DistEnv(device=dev)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if dev.type == 'cuda':
        dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, owns_group=owns)


def _all_reduce_sum(values: Sequence[float], env: DistEnv) -> List[float]:
    return _all_reduce_tensor(torch.tensor(list(values), dtype=torch.float64), env).tolist()


def _all_reduce_tensor(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (itself in a single-process run), on the CPU."""
    if not env.distributed:
        return tensor
    summed = tensor.to(env.device)
    dist.all_reduce(summed)
    return summed.cpu()


# ------------------------------------------------------------------------------------------ data
class EpochSeededDataset(Dataset):
    """Seeds the python/numpy/torch RNGs per sample from (seed, epoch, index) before the base item.

    Augmentations then depend on neither the worker count nor the samples drawn before, which makes
    mid-epoch resume exact. With ``workers=0`` this runs in the trainer's process: iterate the loader
    through :func:`rng_preserving` so the trainer's own RNG streams (mixup, drop-path) stay untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = hash((self.seed, self.epoch, int(index))) % (1 << 62)
        random.seed(sample_seed)
        np.random.seed(sample_seed % (1 << 32))
        torch.default_generator.manual_seed(sample_seed)  # torch.manual_seed costs 100x more (all devices)
        return self.dataset[index]


def rng_preserving(iterable: Iterable) -> Iterator:
    """Items of ``iterable`` with the global RNG states restored after each fetch."""
    iterator = iter(iterable)
    while True:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        yield item


class SkipSampler(Sampler):
    """The indices of ``sampler`` after the first ``skip`` (resume mid-epoch without loading them)."""

    def __init__(self, sampler: Sampler, skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _data_config(cfg: TrainConfig) -> Dict[str, Any]:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(cfg.model)
    if pretrained is None:
        create_model(cfg.model)  # raises the clear "unknown model" error
    args = {'img_size': cfg.img_size} if cfg.img_size else {}
    return resolve_data_config(args, pretrained_cfg=pretrained.to_dict())


def build_datasets(cfg: TrainConfig, data_config: Mapping[str, Any]) -> Tuple[Dataset, Dataset]:
    from .data import build_transform, load_dataset

    aug = dict(no_aug=cfg.no_aug, scale=tuple(cfg.scale) if cfg.scale else None, ratio=tuple(cfg.ratio) if cfg.ratio else None,
               hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
               re_prob=cfg.reprob, re_mode=cfg.remode)
    common = dict(seed=cfg.seed, skip_bad_images=cfg.skip_bad_images, num_classes=cfg.num_classes)
    train_set = load_dataset(cfg.dataset, cfg.data_dir, split='train', max_samples=cfg.max_train_samples,
                             transform=build_transform(data_config, is_training=True, **aug), **common)
    val_set = load_dataset(cfg.dataset, cfg.data_dir, split='val', max_samples=cfg.max_val_samples,
                           transform=build_transform(data_config, is_training=False), **common)
    if cfg.num_classes is not None and train_set.num_classes != cfg.num_classes:
        raise ValueError(f'--num-classes {cfg.num_classes} does not match data set {cfg.dataset!r}, '
                         f'which has {train_set.num_classes} classes')
    return train_set, val_set


def _train_loader(train_set: EpochSeededDataset, cfg: TrainConfig, env: DistEnv, epoch: int,
                  skip_batches: int) -> DataLoader:
    sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    train_set.set_epoch(epoch)
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=SkipSampler(sampler, skip_batches * cfg.batch_size),
                      num_workers=cfg.workers, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      persistent_workers=False)


def _val_loader(val_set: Dataset, cfg: TrainConfig, env: DistEnv) -> DataLoader:
    shard = Subset(val_set, range(env.rank, len(val_set), env.world_size)) if env.distributed else val_set
    return DataLoader(shard, batch_size=cfg.validation_batch_size or cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers)


# ------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, num_classes: int) -> HydraViT:
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path,
                                  separate_heads=cfg.separate_heads, nesting=get_method(cfg.method).nesting)
    if cfg.heads:
        kwargs['k_choices'] = tuple(cfg.heads)
    if cfg.img_size:
        kwargs['img_size'] = cfg.img_size
    try:
        model = create_model(cfg.model, **kwargs)
    except ValueError as e:
        if cfg.heads and 'k_choices' in str(e):
            raise ValueError(f'--heads {cfg.heads}: {e}') from None
        raise
    if cfg.initial_checkpoint:
        load_initial_checkpoint(model, cfg.initial_checkpoint)
    return model


def load_initial_checkpoint(model: HydraViT, path: str) -> None:
    """Start from a HydraViT checkpoint (same architecture) or a timm ViT/DeiT of the same or a smaller width (leading slices)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f'--initial-checkpoint {path} does not exist')
    is_hydra = path.endswith('.safetensors') and 'hydravit_config' in read_metadata(path)
    if is_hydra:
        _, state = load_config_and_state(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'--initial-checkpoint {path}: HydraViT weights do not fit this model ({e})') from e
        return
    state = load_state_dict_file(path)
    head = state.get('head.weight')
    ignore_head = head is None or head.shape[0] != model.num_classes
    if head is not None and ignore_head:
        print(f'initial checkpoint has {head.shape[0]} classes, model {model.num_classes}: keeping a fresh classifier')
    init_from_vit(model, state, ignore_head=ignore_head)


# ------------------------------------------------------------------------------------------ the run
def effective_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``lr``, or timm's linear rule ``lr_base * global batch / 512`` when ``lr`` is not given."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * cfg.batch_size * world_size * cfg.grad_accum_steps / 512

def _eval_metric_value(row: Mapping[str, Any], metric: str, prefix: str) -> float:
    return float(row[f'{prefix}eval_{metric}'])


def _output_dir(cfg: TrainConfig, data_config: Mapping[str, Any]) -> Path:
    name = cfg.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), cfg.model,
                                       str(data_config['input_size'][-1])])
    path = Path(cfg.output) / name
    suffix = 1
    while path.exists():
        path = Path(cfg.output) / f'{name}-{suffix}'
        suffix += 1
    return path


class Trainer:
    """One training run; ``fit()`` returns the per-k results. Build it through :func:`train`."""

    def __init__(self, cfg: TrainConfig, env: DistEnv,
                 datasets: Optional[Tuple[Dataset, Dataset]] = None) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3
        from .sampling import create_sampler

        self.cfg, self.env = cfg, env
        resume_dir = resolve_resume(cfg.resume) if cfg.resume else None
        self.data_config = _data_config(cfg)
        train_set, val_set = datasets or build_datasets(cfg, self.data_config)
        train_classes = getattr(train_set, 'num_classes', None)
        if cfg.num_classes is None and train_classes is None:
            raise ValueError('the training set has no num_classes attribute: give num_classes')
        self.class_names = list(getattr(train_set, 'classes', []) or [])
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (EMA copies them before DDP)
        self.model = build_model(cfg, cfg.num_classes or train_classes).to(env.device)
        self.eval_ks = [self.model.resolve_k(k) for k in (cfg.eval_heads or self.model.k_choices)]
        self._check_eval_metric()
        self.sampler = create_sampler(cfg.sampler, self.model.k_choices, seed=cfg.seed, weights=cfg.head_weights,
                                      num_random=cfg.num_random, per_rank=cfg.k_per_rank)
        self.train_set = EpochSeededDataset(train_set, cfg.seed)
        self.batches_per_epoch = len(train_set) // (cfg.batch_size * env.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f'{len(train_set)} training images make no full batch of {cfg.batch_size} per process')
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.val_loader = _val_loader(val_set, cfg, env)

        self.lr = effective_lr(cfg, env.world_size)
        # fused Adam(W): the sliced model updates its full tensors every step (the paper's behaviour), and one
        # fused pass over them is what keeps a small-k step as fast as a standalone ViT's (bench_train_step.py)
        fused = {'fused': True} if cfg.opt.lower() in FUSED_OPTIMIZERS else {}
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum, **fused)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
            step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        self.amp_dtype = AMP_DTYPES[cfg.amp_dtype] if cfg.amp else None
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16
                                           and env.device.type == 'cuda')
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                            switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                            num_classes=self.model.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup else
                          LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss())
        self.distill_loss = SoftTargetCrossEntropy()
        # every parameter is used at every k (sliced views), except the other k's classifiers with separate heads
        self.ddp = (DistributedDataParallel(self.model, device_ids=[env.device] if env.device.type == 'cuda' else None,
                                            find_unused_parameters=cfg.separate_heads)
                    if env.distributed else None)
        self.epoch, self.step, self.num_updates = 0, 0, 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.summary: List[Dict[str, Any]] = []
        self.out_dir = resume_dir or (_output_dir(cfg, self.data_config) if env.is_main else None)
        torch.manual_seed(cfg.seed + env.rank)  # per-rank streams for drop-path, mixup, ...
        np.random.seed((cfg.seed + env.rank) % (1 << 32))
        random.seed(cfg.seed + env.rank)
        self.rng_to_restore = None
        self.epoch_throughput = 0.0
        self.teacher: Optional[torch.nn.Module] = None  # DynaBERT's frozen full-width model, once reordered
        if resume_dir:
            self._resume(resume_dir)

    def _check_eval_metric(self) -> None:
        m = EVAL_METRIC.fullmatch(self.cfg.eval_metric)
        if m.group(2) and int(m.group(2)) not in self.eval_ks:
            raise ValueError(f'--eval-metric {self.cfg.eval_metric}: k={m.group(2)} is not evaluated; '
                             f'--eval-heads are {self.eval_ks}')

    # -------------------------------------------------------------------------------------- resume
    def _resume(self, folder: Path) -> None:
        state = load_training_checkpoint(folder, self.ema is not None)
        self.model.load_state_dict(state['model'], strict=True)
        if self.ema is not None:
            self.ema.module.load_state_dict(state['ema'], strict=True)
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.step, self.num_updates = state['epoch'], state['step'], state['num_updates']
        self.loss_sum, self.loss_count = state['loss_sum'], state['loss_count']
        self.best_metric, self.best_epoch = state['best_metric'], state['best_epoch']
        rngs = state['rng']
        if self.step and (state['world_size'] != self.env.world_size or state.get('batch_size') != self.cfg.batch_size):
            raise ValueError(f'{folder} stopped mid-epoch with {state["world_size"]} process(es) x batch '
                             f'{state.get("batch_size")}: resume with the same world size and --batch-size '
                             f'(now {self.env.world_size} x {self.cfg.batch_size}) to skip exactly the trained batches')
        if len(rngs) != self.env.world_size:
            print(f'resuming a {len(rngs)}-process run on {self.env.world_size}: RNG streams restart from rank 0\'s')
        self.rng_to_restore = rngs[min(self.env.rank, len(rngs) - 1)]
        self.summary = [r for r in read_summary(folder / 'summary.csv') if r['epoch'] < self.epoch]
        self.scheduler.step_update(self.num_updates)
        if self.cfg.method == 'dynabert' and (self.epoch, self.step) > (self.cfg.dynabert_teacher_epochs, 0):
            self.teacher = self._frozen(load_model(folder / TEACHER_FILE, map_location=str(self.env.device)))
        if self.env.is_main:
            print(f'resumed {folder} at epoch {self.epoch}, step {self.step} ({self.num_updates} updates)')

    def _state(self) -> Dict[str, Any]:
        rng = capture_rng()
        if self.env.distributed:
            gathered: List[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return dict(epoch=self.epoch, step=self.step, num_updates=self.num_updates,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), rng=gathered, loss_sum=self.loss_sum,
                    loss_count=self.loss_count, best_metric=self.best_metric, best_epoch=self.best_epoch,
                    world_size=self.env.world_size, batch_size=self.cfg.batch_size)

    def _metadata(self) -> Dict[str, str]:
        return {'class_names': json.dumps(self.class_names), 'epochs_completed': str(self.epoch),
                'train_config': json.dumps(self.cfg.to_dict())}

    def save_checkpoint(self) -> None:
        state = self._state()  # a collective: every rank takes part
        if self.env.is_main:
            save_training_checkpoint(self.out_dir, self.model, self.ema.module if self.ema else None, state,
                                     self._metadata())

    # -------------------------------------------------------------------------------------- training
    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            args = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            atomic_write(self.out_dir / 'args.yaml', lambda tmp: Path(tmp).write_text(args))
            print(f'training {cfg.model} as {get_method(cfg.method).label} k={list(self.model.k_choices)} '
                  f'({cfg.sampler} sampler) on {cfg.dataset}: '
                  f'{self.batches_per_epoch} steps/epoch x {self.num_epochs} epochs, lr {self.lr:.3g}, '
                  f'world size {env.world_size} -> {self.out_dir}')
        if self.rng_to_restore is not None:
            restore_rng(self.rng_to_restore)
        last_rows = None
        while self.epoch < self.num_epochs:
            train_loss = self.train_epoch()
            evaluate = (self.epoch + 1) % cfg.val_interval == 0 or self.epoch + 1 == self.num_epochs
            rows = self.validate() if evaluate else None
            last_rows = rows or last_rows
            self._end_epoch(train_loss, rows)
        if last_rows is None:  # resumed after the final epoch's checkpoint
            last_rows = self.validate()
        results = self._results(last_rows)
        if env.is_main:
            self._write_results(results)
        return TrainResult(self.out_dir, results, self.summary, self.best_metric, self.best_epoch)

    def train_epoch(self) -> float:
        cfg, env = self.cfg, self.env
        if cfg.method == 'dynabert' and self.teacher is None and self.epoch >= cfg.dynabert_teacher_epochs:
            self._start_width_adaptive()
        loader = _train_loader(self.train_set, cfg, env, self.epoch, self.step)
        self.model.train()
        progress = _progress(self.batches_per_epoch, self.step, self.epoch, env)
        window: List[Tuple[torch.Tensor, torch.Tensor]] = []
        tic, seen = time.perf_counter(), 0
        for batch_idx, (images, target) in enumerate(rng_preserving(loader), start=self.step):
            window.append((images, target))
            window_len = min(cfg.grad_accum_steps,
                             self.batches_per_epoch - (batch_idx // cfg.grad_accum_steps) * cfg.grad_accum_steps)
            if len(window) < window_len:
                continue
            start = batch_idx + 1 - len(window)
            ks, loss = self.train_update(window, start)
            window = []
            self.step = batch_idx + 1
            seen += images.shape[0] * window_len
            if progress is not None:
                progress.update(window_len)
                progress.set_postfix(loss=f'{self.loss_sum / max(self.loss_count, 1):.4f}', k=ks,
                                     img_s=f'{seen * env.world_size / (time.perf_counter() - tic):.0f}')
            elif env.is_main and self.num_updates % cfg.log_interval == 0:
                print(f'epoch {self.epoch} step {self.step}/{self.batches_per_epoch} k={ks} loss {loss:.4f} '
                      f'lr {self.optimizer.param_groups[0]["lr"]:.3g}', flush=True)
            if cfg.checkpoint_interval_steps and self.num_updates % cfg.checkpoint_interval_steps == 0:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        self.epoch_throughput = seen * env.world_size / max(time.perf_counter() - tic, 1e-9)
        total, count = _all_reduce_sum([self.loss_sum, self.loss_count], env)
        return total / max(count, 1)

    def train_update(self, window: Sequence[Tuple[torch.Tensor, torch.Tensor]], start: int) -> Tuple[List[int], float]:
        """One optimizer step over the micro-batches of ``window`` (gradient accumulation) and their k."""
        cfg, env = self.cfg, self.env
        step_losses = []
        for i, (images, target) in enumerate(window):
            images, target = images.to(env.device, non_blocking=True), target.to(env.device, non_blocking=True)
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            ks = self._ks_for_step(start + i)
            teacher = self._teacher_probs(images)
            for j, k in enumerate(ks):
                sync = i == len(window) - 1 and j == len(ks) - 1
                with self._no_sync(sync), self._autocast():
                    logits = (self.ddp or self.model)(images, k=k)
                    if teacher is None:
                        loss = self.criterion(logits, target)
                    else:
                        loss = self.distill_loss(logits, teacher)
                if cfg.inplace_distill and teacher is None and len(ks) > 1:
                    teacher = F.softmax(logits.detach().float(), dim=-1)
                # the losses of the step's k are summed (slimmable/US-Nets); micro-batches are averaged
                with self._no_sync(sync):
                    self.scaler.scale(loss / len(window)).backward()
                step_losses.append(float(loss.detach()))
        self._optimizer_step()
        loss = sum(step_losses) / len(step_losses)
        self.loss_sum += loss
        self.loss_count += 1
        return ks, loss

    def _ks_for_step(self, step: int) -> List[int]:
        if self.cfg.method == 'dynabert' and self.teacher is None:  # DynaBERT trains the full width first
            return [max(self.model.k_choices)]
        ks = list(self.sampler.ks_for_step(self.epoch, step, self.env.rank))
        return sorted(ks, reverse=True) if self.cfg.inplace_distill else ks

    def _teacher_probs(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        with torch.no_grad(), self._autocast():
            return F.softmax(self.teacher(images).float(), dim=-1)

    # -------------------------------------------------------------------------------------- DynaBERT
    def _start_width_adaptive(self) -> None:
        """DynaBERT's second phase: reorder heads, neurons and channels by importance, freeze a teacher.

        Every rank measures its share of the same training images and the scores are summed across
        ranks, so all of them apply the same permutation.
        """
        cfg, env = self.cfg, self.env
        self.train_set.set_epoch(self.epoch)
        images = Subset(self.train_set, range(env.rank, min(cfg.importance_samples, len(self.train_set)),
                                              env.world_size))
        importance = measure_importance(self.model, rng_preserving(DataLoader(images, batch_size=cfg.batch_size)))
        importance = replace(importance, **{f.name: _all_reduce_tensor(getattr(importance, f.name), env)
                                            for f in fields(importance)})
        perm = permutation_from_importance(importance)
        reorder_model(self.model, perm)
        permute_optimizer_state(self.optimizer, self.model, perm)
        if self.ema is not None:
            reorder_model(self.ema.module, perm)
        self.teacher = self._frozen(copy.deepcopy(self.model))
        if env.is_main:
            save_model(self.out_dir / TEACHER_FILE, self.teacher, self._metadata())
            print(f'epoch {self.epoch}: reordered heads, MLP neurons and channels by importance '
                  f'({len(images) * env.world_size} images); every k now learns from the full width', flush=True)

    @staticmethod
    def _frozen(model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _optimizer_step(self) -> None:
        from timm.utils import dispatch_clip_grad

        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), self.cfg.clip_grad, mode=self.cfg.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)

    def _no_sync(self, sync: bool):
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # -------------------------------------------------------------------------------------- evaluation
    def validate(self) -> Dict[str, List[Dict[str, Any]]]:
        """Per-k rows of the model (and of its EMA), reduced over all processes."""
        from .evaluate import evaluate_subnets

        out = {'': self._evaluate(evaluate_subnets, self.model)}
        if self.ema is not None:
            out['ema_'] = self._evaluate(evaluate_subnets, self.ema.module)
        return out

    def _evaluate(self, evaluate_subnets, model: HydraViT) -> List[Dict[str, Any]]:
        rows = evaluate_subnets(model, self.val_loader, self.eval_ks, device=self.env.device,
                                amp_dtype=self.amp_dtype)
        sums = []
        for r in rows:
            n = r['num_samples']
            sums += [r['top1'] * n, r['top5'] * n, r['loss'] * n, n]
        sums = _all_reduce_sum(sums, self.env)
        reduced = []
        for i, k in enumerate(self.eval_ks):
            t1, t5, loss, n = sums[4 * i:4 * i + 4]
            reduced.append(dict(k=k, top1=t1 / n, top5=t5 / n, loss=loss / n, num_samples=int(n)))
        return reduced

    def _end_epoch(self, train_loss: float, rows: Optional[Dict[str, List[Dict[str, Any]]]]) -> None:
        row: Dict[str, Any] = {'epoch': self.epoch, 'train_loss': train_loss,
                               'lr': self.optimizer.param_groups[0]['lr']}
        for prefix, per_k in (rows or {}).items():
            for r in per_k:
                for metric in ('top1', 'top5', 'loss'):
                    row[f'{prefix}eval_{metric}_k{r["k"]}'] = r[metric]
            row[f'{prefix}eval_top1_mean'] = sum(r['top1'] for r in per_k) / len(per_k)
            row[f'{prefix}eval_top5_mean'] = sum(r['top5'] for r in per_k) / len(per_k)
        improved = False
        if rows:
            value = _eval_metric_value(row, self.cfg.eval_metric, 'ema_' if self.ema is not None else '')
            improved = self.best_metric is None or value > self.best_metric
            if improved:
                self.best_metric, self.best_epoch = value, self.epoch
        self.summary.append(row)
        if self.env.distributed:
            self.check_replicas_in_sync()
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.save_checkpoint()
        if self.env.is_main:
            write_summary(self.out_dir / 'summary.csv', self.summary)
            if improved:
                save_model(self.out_dir / 'model_best.safetensors', self.model, self._metadata())
                if self.ema is not None:
                    save_model(self.out_dir / 'model_best_ema.safetensors', self.ema.module, self._metadata())
            evals = ', '.join(f'k{k}={row[f"eval_top1_k{k}"]:.2f}' for k in self.eval_ks) if rows else 'no eval'
            print(f'epoch {row["epoch"]}: train_loss {train_loss:.4f} ({self.epoch_throughput:.0f} img/s), '
                  f'top1 {evals}', flush=True)

    def check_replicas_in_sync(self) -> str:
        """SHA-256 of the weights, compared across processes: DDP must keep every replica identical."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests: List[Any] = [None] * self.env.world_size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f'epoch {self.epoch}: the processes hold different weights: {digests}')
        if self.env.is_main:
            print(f'epoch {self.epoch}: weights identical on all {self.env.world_size} processes '
                  f'(sha256 {digests[0][:16]})', flush=True)
        return digests[0]

    def _results(self, rows: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
        table = []
        for i, r in enumerate(rows['']):
            cost = subnet_cost(self.model.config, r['k'])
            row = dict(k=r['k'], embed_dim=cost.embed_dim, params_m=cost.params_m,
                       gmacs=cost.gmacs, top1=r['top1'], top5=r['top5'], loss=r['loss'])
            if 'ema_' in rows:
                ema = rows['ema_'][i]
                row.update(ema_top1=ema['top1'], ema_top5=ema['top5'], ema_loss=ema['loss'])
            table.append(row)
        return table

    def _write_results(self, results: List[Dict[str, Any]]) -> None:
        from .report import plot_accuracy, write_results

        write_results(results, self.out_dir, 'results')
        label = get_method(self.cfg.method).label
        series = {label: results}
        if 'ema_top1' in results[0]:
            series[f'{label} (EMA)'] = [{**r, 'top1': r['ema_top1']} for r in results]
        plot_accuracy(series, 'gmacs', self.out_dir / 'accuracy_vs_gmacs.png',
                      f'{self.cfg.model} on {self.cfg.dataset}: top-1 vs GMACs')
        print(f'results: {self.out_dir / "results.csv"}, {self.out_dir / "accuracy_vs_gmacs.png"}')
        if self.cfg.report:
            self._write_report(series)

    def _write_report(self, series: Dict[str, List[Dict[str, Any]]]) -> None:
        """The accuracy-cost report of ``hydravit report``, with a quick throughput pass on this device."""
        from .benchmark import benchmark_subnets
        from .report import write_report

        bench = benchmark_subnets(self.model, [r['k'] for r in next(iter(series.values()))], modes=('sliced',),
                                  device=self.env.device, rounds=1, min_seconds=0.1, latency_iters=3,
                                  measure_memory=False, flop_count=False)
        paths = write_report(series, {label: bench for label in series}, self.out_dir / 'report',
                             config=self.model.config, title=f'{self.cfg.model} on {self.cfg.dataset}')
        print('report: ' + ', '.join(str(p) for p in paths.values()))


def _progress(total: int, done: int, epoch: int, env: DistEnv):
    if not env.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True)


def train(cfg: TrainConfig, datasets: Optional[Tuple[Dataset, Dataset]] = None) -> TrainResult:
    """Run (or resume) a training run; under torchrun every process calls this.

    ``datasets`` = (train, val) replaces the ``dataset``/``data_dir`` settings: any map-style data sets
    yielding (image tensor, label) with the model's input shape (the train set needs ``num_classes``).
    """
    env = init_distributed(cfg.device)
    try:
        return Trainer(cfg, env, datasets).fit()
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
