"""The training and validation data of a run, in an order that makes resume exact.

The data order, each sample's augmentation and the k of each step are functions of (seed, epoch,
index), so a run resumed mid-epoch sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import random
from itertools import islice
from typing import Any, Dict, Iterable, Iterator, Mapping, Sized, Tuple, cast

import numpy as np
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..data.datasets import LoadedDataset, load_dataset
from ..data.transforms import build_transform
from ..models.factory import create_model
from .config import TrainConfig
from .distributed import DistEnv

__all__ = ['EpochSeededDataset', 'rng_preserving', 'SkipSampler', 'run_data_config', 'build_datasets', 'train_loader',
           'val_loader']


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
        return len(cast(Sized, self.dataset))  # map-style: torch's Dataset type declares no __len__

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
        return max(0, len(cast(Sized, self.sampler)) - self.skip)  # torch's Sampler type declares no __len__


def run_data_config(cfg: TrainConfig) -> Dict[str, Any]:
    pretrained = get_pretrained_cfg(cfg.model)
    if pretrained is None:
        create_model(cfg.model)  # raises the clear "unknown model" error
    assert pretrained is not None  # every registered hydravit_* model has a default cfg
    # timm's resolve_data_config assumes 3 channels when img_size is given: keep the model's own
    args = {'img_size': cfg.img_size, 'in_chans': pretrained.input_size[0]} if cfg.img_size else {}
    return resolve_data_config(args, pretrained_cfg=pretrained.to_dict())


def build_datasets(cfg: TrainConfig, data_config: Mapping[str, Any]) -> Tuple[LoadedDataset, LoadedDataset]:
    aug = dict(no_aug=cfg.no_aug, scale=tuple(cfg.scale) if cfg.scale else None,
               ratio=tuple(cfg.ratio) if cfg.ratio else None, hflip=cfg.hflip, vflip=cfg.vflip,
               color_jitter=cfg.color_jitter, auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode,
               interpolation=cfg.train_interpolation)
    common: Dict[str, Any] = dict(seed=cfg.seed, skip_bad_images=cfg.skip_bad_images, num_classes=cfg.num_classes)
    train_set = load_dataset(cfg.dataset, cfg.data_dir, split='train', max_samples=cfg.max_train_samples,
                             transform=build_transform(data_config, is_training=True, **aug), **common)
    # validation folders map to the training classes (by name), never on their own
    val_set = load_dataset(cfg.dataset, cfg.data_dir, split='val', max_samples=cfg.max_val_samples,
                           transform=build_transform(data_config, is_training=False),
                           **{**common, 'num_classes': train_set.num_classes}, class_names=train_set.classes)
    if cfg.num_classes is not None and train_set.num_classes != cfg.num_classes:
        raise ValueError(f'--num-classes {cfg.num_classes} does not match data set {cfg.dataset!r}, '
                         f'which has {train_set.num_classes} classes')
    return train_set, val_set


def train_loader(train_set: EpochSeededDataset, cfg: TrainConfig, env: DistEnv, epoch: int,
                  skip_batches: int) -> DataLoader:
    sampler: DistributedSampler[int] = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                                          shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    train_set.set_epoch(epoch)
    return DataLoader(train_set, batch_size=cfg.batch_size,
                      sampler=SkipSampler(sampler, skip_batches * cfg.batch_size), num_workers=cfg.workers,
                      drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      persistent_workers=False)


def val_loader(val_set: Dataset, cfg: TrainConfig, env: DistEnv) -> DataLoader:
    # map-style: torch's Dataset type declares no __len__
    shard = (Subset(val_set, range(env.rank, len(cast(Sized, val_set)), env.world_size)) if env.distributed
             else val_set)
    return DataLoader(shard, batch_size=cfg.validation_batch_size or cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers)
