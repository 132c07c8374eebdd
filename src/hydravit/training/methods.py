"""The nesting methods HydraViT is compared with, as plug-ins of one trainer (``--method``).

A method is a nesting (which widths follow k: :data:`hydravit.models.config.NESTINGS`) plus an update
scheme, expressed through the hooks of :class:`NestingMethod`: the settings it fixes or forbids, the k
trained at each step, what happens at the start of an epoch (DynaBERT's reordering), the soft targets
every k learns from, what a resumed run must restore, and how a comparison configures it. Everything
downstream (evaluation, benchmark, extraction, export) reads the nesting from the checkpoint's config.

Adding a method: subclass :class:`NestingMethod`, override the hooks that differ, decorate the class with
:func:`register_method`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, ContextManager, Dict, List, Optional, Protocol, Sequence, Type, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..models.config import defined_ks
from ..models.factory import UniversalModel, create_model
from ..storage.checkpoint import load_model, save_model
from ..storage.run_folder import RunFolder
from .config import TrainConfig
from .distributed import DistEnv, all_reduce_tensor
from .importance import measure_importance, permutation_from_importance, permute_optimizer_state, reorder_model
from .loaders import EpochSeededDataset, rng_preserving
from .samplers import SAMPLERS, SubnetSampler, create_sampler

__all__ = ['NestingMethod', 'CompareOptions', 'TrainerView', 'METHODS', 'register_method', 'method_class',
           'create_method', 'default_methods', 'HydraViTMethod', 'SortedNet', 'MatFormer', 'DynaBERT',
           'SeparateViTsMethod', 'HeadsOnly', 'WidthOnly']

logger = logging.getLogger(__name__)


class TrainerView(Protocol):
    """What a method's hooks may read and change of the running trainer."""
    cfg: TrainConfig
    env: DistEnv
    model: UniversalModel
    optimizer: torch.optim.Optimizer
    ema: Any  # timm ModelEmaV3 or None
    train_set: EpochSeededDataset
    sampler: SubnetSampler
    epoch: int
    run: RunFolder

    def metadata(self) -> Dict[str, str]: ...

    def autocast(self) -> ContextManager[Any]: ...


@dataclass(frozen=True)
class CompareOptions:
    """Settings of a comparison that some methods need: the k trained, DynaBERT's phase, separate ViTs' k."""
    k_choices: Sequence[int]
    teacher_epochs: Optional[int] = None
    separate_ks: Optional[Sequence[int]] = None


class NestingMethod:
    """A nesting method: the defaults here are plain stochastic-dropout training of a sliced model."""
    name: ClassVar[str]
    label: ClassVar[str]  # for tables and plot legends
    nesting: ClassVar[str]
    summary: ClassVar[str]
    sampler: ClassVar[Optional[str]] = None  # the sampler the update scheme prescribes; None: the recipe's
    is_baseline: ClassVar[bool] = False  # the reference every shared-weight method's gap is measured against
    is_ablation: ClassVar[bool] = False  # a part of HydraViT on its own: trained by a comparison only on request
    allows_inplace_distill: ClassVar[bool] = True
    allows_separate_heads: ClassVar[bool] = True
    has_teacher_phase: ClassVar[bool] = False  # trains the full width first for --teacher-epochs
    allows_full_width_epochs: ClassVar[bool] = True  # --full-width-epochs: only the largest k trains first
    # every k reads (a slice of) every parameter; False: DDP must look for the parameters a step left unused
    shares_every_parameter: ClassVar[bool] = True
    _why_no_distill: ClassVar[str] = ''  # the reasons, where a method allows neither
    _why_no_heads: ClassVar[str] = ''
    _why_no_full_width: ClassVar[str] = ''

    def __init__(self, cfg: TrainConfig) -> None:
        self.check(cfg)
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Raise a ValueError for settings the method fixes differently or cannot honour."""
        if cls.sampler and cfg.sampler != cls.sampler:
            raise ValueError(f'--method {cls.name} trains with --sampler {cls.sampler} ({cls.summary}); '
                             f'got --sampler {cfg.sampler}')
        if cfg.inplace_distill and not cls.allows_inplace_distill:
            raise ValueError(f'--inplace-distill is not available with --method {cls.name}: {cls._why_no_distill}')
        if cfg.separate_heads and not cls.allows_separate_heads:
            raise ValueError(f'--separate-heads is not available with --method {cls.name}: {cls._why_no_heads}')
        if cfg.teacher_epochs is not None and not cls.has_teacher_phase:
            raise ValueError(f'--teacher-epochs is a --method dynabert setting, not {cls.name}')
        if cfg.full_width_epochs and not cls.allows_full_width_epochs:
            raise ValueError(f'--full-width-epochs is not available with --method {cls.name}: {cls._why_no_full_width}')

    # ---------------------------------------------------------------------------------- training hooks
    def ks_for_step(self, trainer: TrainerView, step: int) -> List[int]:
        """The k trained at optimiser step ``step`` of the current epoch (largest first for distillation).

        During the first ``--full-width-epochs`` only the largest k trains (on a schedule of its own,
        :mod:`hydravit.training.schedule`): the shared weights learn as one full-width ViT before the
        smaller subnetworks start from them.
        """
        if trainer.epoch < self.cfg.full_width_epochs:
            return [max(trainer.model.k_choices)]
        ks = list(trainer.sampler.ks_for_step(trainer.epoch, step, trainer.env.rank))
        return sorted(ks, reverse=True) if self.cfg.inplace_distill else ks

    def on_epoch_start(self, trainer: TrainerView) -> None:
        """Called before every epoch's first step (also right after a resume)."""

    def distill_target(self, trainer: TrainerView, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Soft targets (probabilities) every k of this batch learns from; None: the labels."""
        return None

    def on_resume(self, trainer: TrainerView, epoch: int, step: int) -> None:
        """Restore what the method keeps outside the model and optimizer, for a run resumed at (epoch, step)."""

    # ---------------------------------------------------------------------------------- comparison
    @classmethod
    def compare_config(cls, base: TrainConfig, options: CompareOptions) -> TrainConfig:
        """``base`` set up for this method in a comparison: same recipe, the method's own update scheme."""
        sampler = cls.sampler or base.sampler
        distill = base.inplace_distill and cls.allows_inplace_distill
        return replace(base, method=cls.name, sampler=sampler,
                       head_weights=base.head_weights if SAMPLERS[sampler].uses_weights else None,
                       inplace_distill=distill, distill_start_epoch=base.distill_start_epoch if distill else 0.0,
                       distill_weight=base.distill_weight if distill else 1.0,
                       separate_heads=base.separate_heads and cls.allows_separate_heads,
                       **{'teacher_epochs': None, **cls.full_width_phase(base.full_width_epochs)})

    @classmethod
    def full_width_phase(cls, epochs: int) -> Dict[str, Any]:
        """The settings that give a recipe's full-width phase of ``epochs`` to this method: as it is where the
        method allows one, else none."""
        return {'full_width_epochs': epochs if cls.allows_full_width_epochs else 0}


METHODS: Dict[str, Type[NestingMethod]] = {}
M = TypeVar('M', bound=Type[NestingMethod])


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f'a method called {cls.name!r} is registered already')
    METHODS[cls.name] = cls
    return cls


def default_methods() -> List[str]:
    """The methods a comparison trains when none are named: every registered one except the ablations."""
    return [name for name, cls in METHODS.items() if not cls.is_ablation]


def method_class(name: str) -> Type[NestingMethod]:
    """The method called ``name``, or an error listing them all."""
    if name not in METHODS:
        raise ValueError(f'unknown method {name!r}: choose one of {", ".join(METHODS)}')
    return METHODS[name]


def create_method(cfg: TrainConfig) -> NestingMethod:
    """The plug-in of ``cfg.method``, with the settings checked."""
    return method_class(cfg.method)(cfg)


@register_method
class HydraViTMethod(NestingMethod):
    name, label, nesting = 'hydravit', 'HydraViT', 'hydravit'
    summary = 'heads, embedding and MLP nested: subnetwork k is the first k heads and k*head_dim channels'


@register_method
class SortedNet(NestingMethod):
    name, label, nesting, sampler = 'sortednet', 'SortedNet', 'hydravit', 'random'
    summary = ("HydraViT's shapes; SortedNet's update: --num-random random sub-models per step, their gradients "
               'accumulated before one optimiser step')

    @classmethod
    def compare_config(cls, base: TrainConfig, options: CompareOptions) -> TrainConfig:
        """As many sub-models per step as the recipe's sampler trains: the same number of forward passes."""
        recipe = create_sampler(base.sampler, options.k_choices, weights=base.head_weights,
                                num_random=base.num_random)
        return replace(super().compare_config(base, options), num_random=len(recipe.ks_for_step(0, 0)))


@register_method
class MatFormer(NestingMethod):
    name, label, nesting = 'matformer', 'MatFormer', 'matformer'
    summary = 'only the MLP hidden width nested (r*D*k/H); attention and embedding always full'


def _frozen(model: UniversalModel) -> UniversalModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@register_method
class DynaBERT(NestingMethod):
    """Full width first, then heads, neurons and channels reordered by importance and distillation from it."""
    name, label, nesting = 'dynabert', 'DynaBERT', 'dynabert'
    summary = ('heads and embedding nested, MLP full; the full width trains first (--teacher-epochs), heads, '
               'neurons and channels are reordered by importance, then every k learns from that teacher')
    allows_inplace_distill, allows_separate_heads, has_teacher_phase = False, False, True
    allows_full_width_epochs = False
    _why_no_distill = 'every k distils from the full-width teacher already'
    _why_no_heads = 'reordering needs the shared classifier'
    _why_no_full_width = 'its full-width phase is --teacher-epochs'

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.teacher: Optional[UniversalModel] = None  # the frozen full-width model, once reordered
        if cfg.teacher_epochs == 0 and not cfg.initial_checkpoint:
            logger.warning('--method dynabert --teacher-epochs 0 without --initial-checkpoint: every k distils from '
                           'an untrained teacher')

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.teacher_epochs is not None and not 0 <= cfg.teacher_epochs < cfg.epochs:
            raise ValueError(f'--teacher-epochs must be in 0..{cfg.epochs - 1} (below --epochs), '
                             f'got {cfg.teacher_epochs}')
        if cfg.teacher_epochs is None and not cfg.initial_checkpoint and cfg.epochs < 2:
            raise ValueError(f'--method dynabert trains its full-width teacher for at least one epoch before the '
                             f'width-adaptive phase: give --epochs >= 2 (got {cfg.epochs}), or --initial-checkpoint '
                             'to distil from trained weights, or --teacher-epochs 0 to distil from the initial weights')

    @staticmethod
    def teacher_epochs(cfg: TrainConfig) -> int:
        """Epochs of full-width training before reordering: as set, else 0 from a checkpoint, else a quarter
        (at least one: a teacher trained for 0 epochs teaches nothing)."""
        if cfg.teacher_epochs is not None:
            return cfg.teacher_epochs
        return 0 if cfg.initial_checkpoint else max(1, cfg.epochs // 4)

    def ks_for_step(self, trainer: TrainerView, step: int) -> List[int]:
        if self.teacher is None:  # the full width trains first
            return [max(trainer.model.k_choices)]
        return super().ks_for_step(trainer, step)

    def on_epoch_start(self, trainer: TrainerView) -> None:
        if self.teacher is None and trainer.epoch >= self.teacher_epochs(self.cfg):
            self._start_width_adaptive(trainer)

    def distill_target(self, trainer: TrainerView, images: torch.Tensor) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        with torch.no_grad(), trainer.autocast():
            return F.softmax(self.teacher(images).float(), dim=-1)

    def on_resume(self, trainer: TrainerView, epoch: int, step: int) -> None:
        if (epoch, step) > (self.teacher_epochs(self.cfg), 0):
            self.teacher = _frozen(load_model(trainer.run.teacher, map_location=str(trainer.env.device)))

    @classmethod
    def compare_config(cls, base: TrainConfig, options: CompareOptions) -> TrainConfig:
        """The teacher trains for ``--teacher-epochs``, else for the recipe's full-width phase, if it has one."""
        cfg = super().compare_config(base, options)
        return cfg if options.teacher_epochs is None else replace(cfg, teacher_epochs=options.teacher_epochs)

    @classmethod
    def full_width_phase(cls, epochs: int) -> Dict[str, Any]:
        """A recipe's full-width phase becomes the teacher's (None, the default, where there is none)."""
        return {'full_width_epochs': 0, 'teacher_epochs': epochs or None}

    def _start_width_adaptive(self, trainer: TrainerView) -> None:
        """Reorder heads, neurons and channels by importance, then freeze a copy as the teacher.

        Every rank measures its share of the same training images and the scores are summed across
        ranks, so all of them apply the same permutation.
        """
        cfg, env = self.cfg, trainer.env
        trainer.train_set.set_epoch(trainer.epoch)
        images = Subset(trainer.train_set, range(env.rank, min(cfg.importance_samples, len(trainer.train_set)),
                                                 env.world_size))
        batches = rng_preserving(DataLoader(images, batch_size=cfg.batch_size))
        importance = measure_importance(trainer.model, batches)
        importance = replace(importance, **{f.name: all_reduce_tensor(getattr(importance, f.name), env)
                                            for f in fields(importance)})
        perm = permutation_from_importance(importance)
        reorder_model(trainer.model, perm)
        permute_optimizer_state(trainer.optimizer, trainer.model, perm)
        if trainer.ema is not None:
            reorder_model(trainer.ema.module, perm)
        self.teacher = _frozen(copy.deepcopy(trainer.model))
        if env.is_main:
            save_model(trainer.run.teacher, self.teacher, trainer.metadata())
            logger.info('epoch %d: reordered heads, MLP neurons and channels by importance (%d images); every k '
                        'now learns from the full width', trainer.epoch, len(images) * env.world_size)


@register_method
class SeparateViTsMethod(NestingMethod):
    name, label, nesting, sampler = 'separate', 'Separate ViTs', 'separate', 'all'
    summary = 'one ordinary ViT per k, each trained on its own (the DeiT-Ti/S/B reference)'
    is_baseline = True
    shares_every_parameter = False
    allows_inplace_distill, allows_separate_heads, allows_full_width_epochs = False, False, False
    _why_no_distill = "the smaller ViTs would learn from the largest one's output"
    _why_no_heads = 'every k has its own ViT already'
    _why_no_full_width = 'every ViT trains on its own from the first step'

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.clip_grad is not None:
            raise ValueError("--clip-grad clips one global norm, which would couple the separate ViTs' updates; "
                             'train --method separate without it')

    @classmethod
    def compare_config(cls, base: TrainConfig, options: CompareOptions) -> TrainConfig:
        """Separate ViTs cost the most to train: a comparison may train them for a few k only."""
        cfg = super().compare_config(base, options)
        return replace(cfg, heads=sorted(options.separate_ks)) if options.separate_ks else cfg



@register_method
class HeadsOnly(NestingMethod):
    """Ablation: HydraViT's head stacking without its width slicing."""
    name, label, nesting = 'heads', 'Heads only', 'heads'
    is_ablation = True
    summary = 'only the heads stacked: k heads of head_dim inside the full residual width and the full MLP'


@register_method
class WidthOnly(NestingMethod):
    """Ablation: HydraViT's width slicing without its head stacking (Scala-style narrower heads)."""
    name, label, nesting = 'width', 'Width only', 'width'
    is_ablation = True
    summary = ('no head stacking: all H heads kept, each k*head_dim/H wide, embedding k*head_dim and MLP sliced as '
               "HydraViT's; only k with k*head_dim divisible by H exist")

    @classmethod
    def compare_config(cls, base: TrainConfig, options: CompareOptions) -> TrainConfig:
        """The comparison's k that this nesting has (k*head_dim divisible by H), with their weights."""
        cfg = super().compare_config(base, options)
        config = create_model(base.model).config
        allowed = defined_ks(cls.nesting, config.num_heads, config.head_dim)
        keep = [i for i, k in enumerate(options.k_choices) if k in allowed]
        if not keep:
            raise ValueError(f'--method width has none of the k {list(options.k_choices)}: '
                             f'it needs k in {list(allowed)}')
        weights = [cfg.head_weights[i] for i in keep] if cfg.head_weights else None
        loss_weights = [cfg.loss_weights[i] for i in keep] if cfg.loss_weights else None
        return replace(cfg, heads=[options.k_choices[i] for i in keep], head_weights=weights,
                       loss_weights=loss_weights)
