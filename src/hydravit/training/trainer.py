"""Stochastic-dropout training of a universal model: each step trains the subnetwork(s) k its method picks.

Built on timm's pieces (optimizer and scheduler factories, Mixup/CutMix, losses, ModelEmaV3, NativeScaler)
and PyTorch DDP. Every rank trains the same k in the same step (the sampler is a pure function of seed,
epoch and step), so the all-reduced gradient belongs to one subnetwork. A run resumed from any
checkpoint ends with the same weights as an uninterrupted one: data order, augmentation and k are
functions of (seed, epoch, index), and the remaining RNG states are saved.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, get_outdir, random_seed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..evaluation.evaluate import evaluate_subnets, scored_classes
from ..models.compiled import PerKCompiled, compile_universal
from ..models.factory import UniversalModel
from ..storage.checkpoint import save_model
from ..storage.provenance import with_identity
from ..storage.run_folder import (
    CLASS_NAMES_KEY,
    EPOCHS_KEY,
    PREPROCESSING_KEYS,
    PRETRAINED_CFG_KEY,
    TRAIN_CONFIG_KEY,
    RunFolder,
    read_summary,
    write_summary,
)
from .config import AMP_DTYPES, TrainConfig, effective_lr
from .distributed import DistEnv, all_gather, all_reduce_sum, check_replicas_in_sync, init_distributed
from .launch import inside_launched_process, launch_local, node_threads
from .loaders import EpochSeededDataset, build_datasets, rng_preserving, run_data_config, train_loader, val_loader
from .methods import create_method
from .model_setup import build_model
from .nonfinite import NonFiniteGuard
from .outputs import PerK, metric_value, results_table, summary_row, write_run_results
from .per_k import PerKTrainingStats
from .preflight import check_eval_metric
from .run_settings import OPTIMIZER_SETTINGS, SCHEDULE_SETTINGS, check_resume
from .samplers import create_sampler
from .schedule import create_schedule
from .slice_optimizer import ActiveSliceAdamW
from .state import (
    GENERATION_KEY,
    capture_rng,
    load_training_checkpoint,
    read_training_state,
    remove_stale_temporaries,
    remove_superseded_weights,
    resolve_resume,
    restore_rng,
    save_training_checkpoint,
)

__all__ = ['Trainer', 'TrainResult', 'train']

logger = logging.getLogger(__name__)
FUSED_OPTIMIZERS = ('adam', 'adamw')  # torch.optim classes with fused CPU and CUDA kernels
Window = Sequence[Tuple[torch.Tensor, torch.Tensor]]  # the micro-batches of one optimiser step


@dataclass
class TrainResult:
    out_dir: Optional[Path]
    results: List[Dict[str, Any]]
    summary: List[Dict[str, Any]]
    best_metric: Optional[float]
    best_epoch: Optional[int]


class PlainUpdate:
    """timm ``NativeScaler``'s interface without loss scaling (fp32 and bf16): backward, clip, step.

    ``before_step`` (if set) runs between backward and the optimizer step; returning False skips the step.
    """

    def __init__(self, before_step: Optional[Callable[[], bool]] = None) -> None:
        self.before_step = before_step

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: Optional[float] = None,
                 clip_mode: str = 'norm', parameters: Any = None, need_update: bool = True) -> None:
        loss.backward()
        if need_update and (self.before_step is None or self.before_step()):
            if clip_grad is not None:
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _output_folder(cfg: TrainConfig, data_config: Dict[str, Any]) -> Path:
    """``output/<experiment>`` (timm's default name: time-model-size), ``-1``, ``-2`` ... if it exists."""
    name = cfg.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), cfg.model,
                                       str(data_config['input_size'][-1])])
    return Path(get_outdir(cfg.output, name, inc=True))



def _loss_weights(cfg: TrainConfig, k_choices: Sequence[int]) -> Dict[int, float]:
    """Each k's factor in a step's summed loss: --loss-weights, one per k choice, else 1."""
    if cfg.loss_weights is None:
        return {k: 1.0 for k in k_choices}
    if len(cfg.loss_weights) != len(k_choices):
        raise ValueError(f'--loss-weights has {len(cfg.loss_weights)} weights for the {len(k_choices)} k choices '
                         f'{list(k_choices)}: give one weight per k')
    return dict(zip(sorted(k_choices), cfg.loss_weights, strict=True))


class Trainer:
    """One training run; ``fit()`` returns the per-k results. Build it through :func:`train`."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, datasets: Optional[Tuple[Dataset, Dataset]] = None) -> None:
        if cfg.threads is not None:  # the weights depend on the thread count: args.yaml records the one used
            torch.set_num_threads(cfg.threads)
        cfg = replace(cfg, threads=torch.get_num_threads())
        self.cfg, self.env = cfg, env
        self.method = create_method(cfg)
        resume_dir = resolve_resume(cfg.resume) if cfg.resume else None
        resume_state = read_training_state(resume_dir) if resume_dir else None
        self.overridden: Set[str] = set()
        if resume_dir is not None and resume_state is not None:  # before building anything from the settings
            self.overridden = check_resume(_saved_settings(resume_dir, resume_state), cfg, str(resume_dir),
                                           saved_world_size=resume_state.get('world_size'),
                                           world_size=env.world_size, mid_epoch=bool(resume_state.get('step')))
        self.data_config = run_data_config(cfg)
        self.resuming = resume_dir is not None and resume_state is not None
        self._setup_data(datasets or build_datasets(cfg, self.data_config))
        self._setup_optimisation()
        self.epoch, self.step, self.num_updates = 0, 0, 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.per_k = PerKTrainingStats(self.model.k_choices)
        self.epoch_nonfinite = 0  # steps of this epoch the non-finite guard skipped
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.summary: List[Dict[str, Any]] = []
        self.epoch_throughput = 0.0
        self.rng_to_restore: Optional[Dict[str, Any]] = None
        self.generation: Optional[int] = None  # of the checkpoint committed in the run folder
        self.legacy_updates: Optional[int] = None
        out_dir = resume_dir or (_output_folder(cfg, self.data_config) if env.is_main else Path(cfg.output))
        self.run = RunFolder(out_dir)
        random_seed(cfg.seed, env.rank)  # per-rank streams for drop-path, mixup, ...
        if resume_dir is not None and resume_state is not None:
            self._resume(resume_dir, resume_state)

    @property
    def out_dir(self) -> Path:
        return self.run.path

    def _setup_data(self, datasets: Tuple[Dataset, Dataset]) -> None:
        cfg, env = self.cfg, self.env
        train_set, val_set = datasets
        num_classes = cfg.num_classes if cfg.num_classes is not None else getattr(train_set, 'num_classes', None)
        if num_classes is None:
            raise ValueError('the training set has no num_classes attribute: give num_classes')
        self.class_names = list(getattr(train_set, 'classes', []) or [])
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (EMA copies them before DDP)
        self.model: UniversalModel = build_model(cfg, int(num_classes), self.resuming).to(env.device)
        self.eval_ks = self.model.resolve_ks(cfg.eval_heads or None)
        self._check_eval_metric()
        self.sampler = create_sampler(cfg.sampler, self.model.k_choices, seed=cfg.seed, weights=cfg.head_weights,
                                      num_random=cfg.num_random, per_rank=cfg.k_per_rank)
        self.loss_weights = _loss_weights(cfg, self.model.k_choices)
        self.train_set = EpochSeededDataset(train_set, cfg.seed)
        self.batches_per_epoch = len(self.train_set) // (cfg.batch_size * env.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f'{len(self.train_set)} training images make no full batch of {cfg.batch_size} '
                             'per process')
        present = scored_classes(val_set, self.model.num_classes)  # as hydravit eval scores the same set
        self.val_classes = present if len(present) < self.model.num_classes else None
        self.val_loader = val_loader(val_set, cfg, env)

    def _setup_optimisation(self) -> None:
        cfg, env = self.cfg, self.env
        self.lr = effective_lr(cfg, env.world_size)
        # fused Adam(W): the sliced model updates its full tensors every step (the paper's behaviour), and one
        # fused pass over them is what keeps a small-k step as fast as a standalone ViT's (bench_train_step.py)
        fused: Dict[str, Any] = {'fused': True} if cfg.opt.lower() in FUSED_OPTIMIZERS else {}
        if cfg.opt_eps is not None:
            fused['eps'] = cfg.opt_eps
        if cfg.opt_betas is not None:
            fused['betas'] = tuple(cfg.opt_betas)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum, **fused)
        if cfg.opt_active_slice:  # timm's param groups (no decay on norms, biases, pos_embed), stepped slice-wise
            self.optimizer = ActiveSliceAdamW(self.optimizer.param_groups, self.model, lr=self.lr,
                                              weight_decay=cfg.weight_decay)
        updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.scheduler, self.num_epochs = create_schedule(self.optimizer, cfg, updates_per_epoch)
        self.amp_dtype = AMP_DTYPES[cfg.amp_dtype] if cfg.amp else None
        fp16_cuda = self.amp_dtype == torch.float16 and env.device.type == 'cuda'
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        self.step_ks: List[int] = []  # the k of the step being trained (named by the non-finite guard)
        self.loss_scaler = (NativeScaler(device=env.device.type) if fp16_cuda  # its GradScaler skips inf gradients
                            else PlainUpdate(before_step=self._gradients_finite))
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                            switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                            num_classes=self.model.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup else LabelSmoothingCrossEntropy(cfg.smoothing)
                          if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss())
        self.distill_loss = SoftTargetCrossEntropy()
        # a shared-weight method uses every parameter at every k (sliced views), except the other k's classifiers
        # with separate heads; separate ViTs use one k's ViT per pass (DDP then finds those a step left unused)
        unused = cfg.separate_heads or not self.method.shares_every_parameter
        self.ddp = (DistributedDataParallel(self.model, device_ids=[env.device] if env.device.type == 'cuda' else None,
                                            find_unused_parameters=unused) if env.distributed else None)
        # torch.compile: one graph per k (models.compiled); the EMA copy is evaluated through its own
        compile_options = cfg.compile_options()
        self.train_forward: Callable[..., torch.Tensor] = (
            compile_universal(self.model, compile_options, self.ddp or self.model) if compile_options
            else (self.ddp or self.model))
        self.eval_forwards: Dict[int, Optional[PerKCompiled]] = {}

    def _check_eval_metric(self) -> None:
        check_eval_metric(self.cfg.eval_metric, self.eval_ks)

    # -------------------------------------------------------------------------------------- resume
    def _resume(self, folder: Path, state: Dict[str, Any]) -> None:
        remove_stale_temporaries(folder)
        state = load_training_checkpoint(folder, self.ema is not None, state=state)
        if self.env.is_main:
            remove_superseded_weights(folder, state, self.ema is not None)
        self.model.load_state_dict(state['model'], strict=True)
        if self.ema is not None:
            self.ema.module.load_state_dict(state['ema'], strict=True)
        self.optimizer.load_state_dict(state['optimizer'])
        for group in self.optimizer.param_groups:  # overridden optimizer settings replace the restored ones
            for name in OPTIMIZER_SETTINGS & self.overridden:
                if name in group and not (name == 'weight_decay' and group[name] == 0):  # no-decay groups stay 0
                    group[name] = getattr(self.cfg, name)
        if not SCHEDULE_SETTINGS & self.overridden:  # else the schedule built from the new settings is kept
            self.scheduler.load_state_dict(state['scheduler'])
        self.loss_scaler.load_state_dict(state['scaler'])
        self.epoch, self.step, self.num_updates = state['epoch'], state['step'], state['num_updates']
        # the epoch's running sums were saved as totals over the processes: one process carries them on
        main = self.env.is_main
        self.loss_sum, self.loss_count = (state['loss_sum'], state['loss_count']) if main else (0.0, 0)
        self.per_k.load_state_dict(state.get('per_k') if main else None)
        self.best_metric, self.best_epoch = state['best_metric'], state['best_epoch']
        self.generation = state.get(GENERATION_KEY)
        self.legacy_updates = None if GENERATION_KEY in state else self.num_updates  # a folder from before generations
        self.guard.skipped = int(state.get('nonfinite_steps', 0))
        self.epoch_nonfinite = int(state.get('epoch_nonfinite_steps', 0))
        rngs = state['rng']
        if len(rngs) != self.env.world_size:
            logger.warning("resuming a %d-process run on %d: RNG streams restart from rank 0's", len(rngs),
                           self.env.world_size)
        self.rng_to_restore = rngs[min(self.env.rank, len(rngs) - 1)]
        self.summary = [r for r in read_summary(self.run.summary) if r['epoch'] < self.epoch]
        self.scheduler.step_update(self.num_updates)
        self.method.on_resume(self, self.epoch, self.step)
        if self.env.is_main:
            logger.info('resumed %s at epoch %d, step %d (%d updates)', folder, self.epoch, self.step,
                        self.num_updates)

    def _state(self) -> Dict[str, Any]:
        loss_sum, loss_count = all_reduce_sum([self.loss_sum, self.loss_count], self.env)  # every process's steps
        return dict(epoch=self.epoch, step=self.step, num_updates=self.num_updates,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.loss_scaler.state_dict(), rng=all_gather(capture_rng(), self.env),
                    loss_sum=loss_sum, loss_count=int(loss_count), per_k=self.per_k.state_dict(self.env),
                    best_metric=self.best_metric,
                    best_epoch=self.best_epoch, world_size=self.env.world_size, batch_size=self.cfg.batch_size,
                    nonfinite_steps=self.guard.skipped, epoch_nonfinite_steps=self.epoch_nonfinite,
                    config=self.cfg.to_dict())

    def metadata(self) -> Dict[str, str]:
        """What every weights file of the run records besides the model config (read back by eval/export)."""
        pretrained_cfg = {k: self.data_config[k] for k in PREPROCESSING_KEYS if k in self.data_config}
        pretrained_cfg.update(num_classes=self.model.num_classes, first_conv='patch_embed.proj', classifier='head')
        return {CLASS_NAMES_KEY: json.dumps(self.class_names), EPOCHS_KEY: str(self.epoch),
                TRAIN_CONFIG_KEY: json.dumps(self.cfg.to_dict()), PRETRAINED_CFG_KEY: json.dumps(pretrained_cfg)}

    def save_checkpoint(self) -> None:
        state = self._state()  # a collective: every rank takes part
        if self.env.is_main:
            self.generation = save_training_checkpoint(self.out_dir, self.model, self.ema.module if self.ema else None,
                                                       state, self.metadata(), committed=self.generation,
                                                       committed_updates=self.legacy_updates)

    # -------------------------------------------------------------------------------------- training
    def fit(self) -> TrainResult:
        if self.env.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.write_args(self.cfg.to_dict())
            logger.info('training %s as %s k=%s (%s sampler) on %s: %d steps/epoch x %d epochs, lr %.3g, '
                        'world size %d -> %s', self.cfg.model, self.method.label, list(self.model.k_choices),
                        self.cfg.sampler, self.cfg.dataset, self.batches_per_epoch, self.num_epochs, self.lr,
                        self.env.world_size, self.out_dir)
        if self.rng_to_restore is not None:
            restore_rng(self.rng_to_restore)
        last_rows = None
        while self.epoch < self.num_epochs:
            train_loss = self.train_epoch()
            evaluate = (self.epoch + 1) % self.cfg.val_interval == 0 or self.epoch + 1 == self.num_epochs
            rows = self.validate() if evaluate else None
            last_rows = rows or last_rows
            self._end_epoch(train_loss, rows)
        if last_rows is None:  # resumed after the final epoch's checkpoint
            last_rows = self.validate()
        results = results_table(self.model, last_rows)
        if self.env.is_main:  # measured on the last weights: results.csv names them
            results = with_identity(results, self.model, self.run.weights('last'))
            write_run_results(self.run, results, self.model, label=self.method.label, device=self.env.device,
                              title=f'{self.cfg.model} on {self.cfg.dataset}', report=self.cfg.report,
                              summary=self.summary, bench_threads=self._report_threads())
        return TrainResult(self.out_dir, results, self.summary, self.best_metric, self.best_epoch)

    def _report_threads(self) -> Optional[int]:
        """Rank 0 times the report while this node's other processes wait at the closing barrier: on CPU it
        uses their threads too, so the report's speeds are those of the whole job's cores, as in one process.
        None (torch's count unchanged) on a GPU."""
        return node_threads(torch.get_num_threads()) if self.env.device.type == 'cpu' else None

    def train_epoch(self) -> float:
        """One epoch (or its remainder after a resume); the mean training loss over all processes."""
        cfg, env = self.cfg, self.env
        self.method.on_epoch_start(self)
        loader = train_loader(self.train_set, cfg, env, self.epoch, self.step)
        self.model.train()
        progress = _progress(self.batches_per_epoch, self.step, self.epoch, env)
        window: List[Tuple[torch.Tensor, torch.Tensor]] = []
        tic, seen = time.perf_counter(), 0
        for batch_idx, (images, target) in enumerate(rng_preserving(loader), start=self.step):
            window.append((images, target))
            first_of_window = (batch_idx // cfg.grad_accum_steps) * cfg.grad_accum_steps
            if len(window) < min(cfg.grad_accum_steps, self.batches_per_epoch - first_of_window):
                continue
            ks, loss = self.train_update(window, batch_idx + 1 - len(window))
            self.step, seen = batch_idx + 1, seen + images.shape[0] * len(window)
            self._log_step(progress, len(window), ks, loss, seen * env.world_size / (time.perf_counter() - tic))
            window = []
            if cfg.checkpoint_interval_steps and self.num_updates % cfg.checkpoint_interval_steps == 0:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        self.epoch_throughput = seen * env.world_size / max(time.perf_counter() - tic, 1e-9)
        total, count = all_reduce_sum([self.loss_sum, self.loss_count], env)
        return total / max(count, 1)

    def _log_step(self, progress: Any, batches: int, ks: List[int], loss: float, img_s: float) -> None:
        if progress is not None:
            progress.update(batches)
            progress.set_postfix(loss=f'{self.loss_sum / max(self.loss_count, 1):.4f}', k=ks, img_s=f'{img_s:.0f}')
        elif self.env.is_main and self.num_updates % self.cfg.log_interval == 0:
            logger.info('epoch %d step %d/%d k=%s loss %.4f lr %.3g', self.epoch, self.step, self.batches_per_epoch,
                        ks, loss, self.optimizer.param_groups[0]['lr'])

    def train_update(self, window: Window, start: int) -> Tuple[List[int], float]:
        """One optimizer step over the micro-batches of ``window`` (gradient accumulation) and their k."""
        step_losses = []
        trained: List[Tuple[int, float, torch.Tensor, torch.Tensor]] = []  # counted once the step is applied
        for i, (images, target) in enumerate(window):
            images = images.to(self.env.device, non_blocking=True)
            target = target.to(self.env.device, non_blocking=True)
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            ks = self.method.ks_for_step(self, start + i)
            self.step_ks = ks
            soft_target = self.method.distill_target(self, images)
            soft_weight = 1.0  # a method's own teacher replaces the labels
            distill_now = soft_target is None and len(ks) > 1 and self._inplace_distilling(start + i)
            for j, k in enumerate(ks):
                last = i == len(window) - 1 and j == len(ks) - 1
                if isinstance(self.optimizer, ActiveSliceAdamW):  # the largest k of the step, before its update
                    self.optimizer.active_k = k if i == j == 0 else max(k, self.optimizer.active_k or k)
                loss, logits = self._backward(images, target, (soft_target, soft_weight), k, len(window), last)
                trained.append((k, loss, logits.detach(), target))
                if distill_now and soft_target is None:  # the step's largest k teaches the others
                    soft_target = torch.softmax(logits.detach().float(), dim=-1)
                    soft_weight = self.cfg.distill_weight
                step_losses.append(loss)
        finite = self.guard.finish_step(self.epoch, start, self.num_updates + 1)
        self._after_optimizer_step(applied=finite)
        loss = sum(step_losses) / len(step_losses)
        if finite:  # a skipped step trained nothing, and its NaN/inf loss would poison the epoch's means
            self.loss_sum += loss
            self.loss_count += 1
            for entry in trained:
                self.per_k.add(*entry)
        else:
            self.epoch_nonfinite += 1
        return ks, loss

    def _inplace_distilling(self, batch: int) -> bool:
        """Whether this batch's smaller k learn from its largest: with --inplace-distill, from
        --distill-start-epoch on (a teacher that has barely trained only adds noise to their labels)."""
        progress = self.epoch + batch / self.batches_per_epoch
        return self.cfg.inplace_distill and progress >= self.cfg.distill_start_epoch

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, soft_target: Optional[torch.Tensor],
              soft_weight: float) -> torch.Tensor:
        """The labels' loss, the soft targets' loss, or ``soft_weight`` of the latter and the rest of the former."""
        if soft_target is None:
            return self.criterion(logits, target)
        soft = self.distill_loss(logits, soft_target)
        return soft if soft_weight == 1.0 else soft_weight * soft + (1.0 - soft_weight) * self.criterion(logits, target)

    def _backward(self, images: torch.Tensor, target: torch.Tensor, soft: Tuple[Optional[torch.Tensor], float],
                  k: int, micro_batches: int, last: bool) -> Tuple[float, torch.Tensor]:
        """Forward and backward at k; the step's last call also steps the optimizer. Returns (loss, logits).

        ``soft`` is (soft target, its share of the loss): no soft target, or a share below 1, keeps the labels'
        loss for the rest. The losses of a step's k are summed (slimmable/US-Nets), each times its --loss-weights
        factor; micro-batches are averaged. The returned loss is the unweighted one.
        """
        soft_target, soft_weight = soft
        no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                logits = self.train_forward(images, k=k)
                loss = self._loss(logits, target, soft_target, soft_weight)
            self.loss_scaler(loss * self.loss_weights[k] / micro_batches, self.optimizer, clip_grad=self.cfg.clip_grad,
                             clip_mode=self.cfg.clip_mode, parameters=self.model.parameters(), need_update=last)
        value = float(loss.detach())
        self.guard.record_loss(value, k)
        return value, logits

    def _gradients_finite(self) -> bool:
        """Between backward and the optimizer step: no NaN/inf loss or gradient on any process."""
        self.guard.check_gradients(self.model.parameters(), self.step_ks)
        if self.env.distributed:  # every process must take the same decision
            flagged, = all_reduce_sum([float(self.guard.reason is not None)], self.env)
            if flagged and self.guard.reason is None:
                self.guard.reason = 'loss or gradient on another process'
        return self.guard.reason is None

    def _after_optimizer_step(self, applied: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)
        if self.ema is not None and applied:
            self.ema.update(self.model, step=self.num_updates)

    def autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # -------------------------------------------------------------------------------------- evaluation
    def validate(self) -> PerK:
        """Per-k rows of the model (and of its EMA), reduced over all processes."""
        out = {'': self._evaluate(self.model)}
        if self.ema is not None:
            out['ema_'] = self._evaluate(self.ema.module)
        return out

    def _evaluate(self, model: UniversalModel) -> List[Dict[str, Any]]:
        compile_options = self.cfg.compile_options()
        if compile_options and id(model) not in self.eval_forwards:
            self.eval_forwards[id(model)] = compile_universal(model, compile_options, pad_batches=True)
        rows = evaluate_subnets(model, self.val_loader, self.eval_ks, device=self.env.device,
                                amp_dtype=self.amp_dtype, forward=self.eval_forwards.get(id(model)),
                                class_indices=self.val_classes)
        sums: List[float] = []
        for r in rows:
            n = r['num_samples']
            sums += [r['top1'] * n, r['top5'] * n, r['loss'] * n, n]
        sums = all_reduce_sum(sums, self.env)
        reduced = []
        for i, k in enumerate(self.eval_ks):
            t1, t5, loss, n = sums[4 * i:4 * i + 4]
            reduced.append(dict(k=k, top1=t1 / n, top5=t5 / n, loss=loss / n, num_samples=int(n)))
        return reduced

    def _end_epoch(self, train_loss: float, rows: Optional[PerK]) -> None:
        row = summary_row(self.epoch, train_loss, self.optimizer.param_groups[0]['lr'], rows,
                          per_k_train=self.per_k.columns(self.env),
                          nonfinite_skipped=self.epoch_nonfinite)  # every process skips the same steps
        self.per_k.reset()
        self.epoch_nonfinite = 0
        improved = False
        if rows:
            value = metric_value(row, self.cfg.eval_metric, use_ema=self.ema is not None)
            improved = self.best_metric is None or value > self.best_metric
            if improved:
                self.best_metric, self.best_epoch = value, self.epoch
        self.summary.append(row)
        if self.env.distributed:
            check_replicas_in_sync(self.model, self.env, self.epoch)
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum, self.loss_count = 0.0, 0
        if self.env.is_main:  # before the commit: a run resumed from the previous one rewrites them identically
            self._write_epoch(row, train_loss, improved, bool(rows))
        self.save_checkpoint()

    def _write_epoch(self, row: Dict[str, Any], train_loss: float, improved: bool, evaluated: bool) -> None:
        write_summary(self.run.summary, self.summary)
        if improved:
            save_model(self.run.weights('model_best'), self.model, self.metadata())
            if self.ema is not None:
                save_model(self.run.weights('model_best', ema=True), self.ema.module, self.metadata())
        evals = ', '.join(f'k{k}={row[f"eval_top1_k{k}"]:.2f}' for k in self.eval_ks) if evaluated else 'no eval'
        logger.info('epoch %d: train_loss %.4f (%.0f img/s), top1 %s', row['epoch'], train_loss,
                    self.epoch_throughput, evals)


def _saved_settings(folder: Path, state: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a run folder was trained with: recorded in its state file (older folders: args.yaml)."""
    saved = state.get('config')
    return dict(saved) if isinstance(saved, dict) else RunFolder(folder).read_args()


def _progress(total: int, done: int, epoch: int, env: DistEnv) -> Any:
    """A tqdm bar on an interactive rank-0 terminal, else None (log lines instead)."""
    if not env.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True)


def train(cfg: TrainConfig, datasets: Optional[Tuple[Dataset, Dataset]] = None) -> TrainResult:
    """Run (or resume) a training run; under torchrun every process calls this.

    ``datasets`` = (train, val) replaces the ``dataset``/``data_dir`` settings: any map-style data sets
    yielding (image tensor, label) with the model's input shape (the train set needs ``num_classes``).
    ``nproc_per_node`` > 1 outside torchrun starts that many local processes (:mod:`hydravit.training.launch`;
    ``datasets`` must then be picklable).
    """
    if cfg.nproc_per_node > 1 and not inside_launched_process():
        return launch_local(train, cfg, datasets)
    env = init_distributed(cfg.device)
    try:
        result = Trainer(cfg, env, datasets).fit()
        if env.distributed:  # rank 0 writes the results last: no process tears the group down before it is done
            dist.barrier()
        return result
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            # the trainer's DDP holds the group inside reference cycles: free them now, not at interpreter exit,
            # where the group's C++ threads aborted a process that had finished its work
            gc.collect()
