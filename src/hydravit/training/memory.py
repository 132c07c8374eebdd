"""Peak memory of one training step: per sampler and nesting method, against one ViT and the separate ViTs.

A step is what the trainer does: forward and backward at every k the sampler draws for it (one k at a
time, gradients accumulated), then one AdamW step, whose moment buffers are allocated on that first step.
Of the first :data:`STEPS_SEARCHED` steps the heaviest draw (widest k first) is measured, so a random
sampler is reported at its worst case, not at a lucky draw. References: a standalone timm ViT of the
largest k, and the separate ViTs (one per k) trained in one step as ``--method separate`` does.

CPU: peak resident set (VmHWM) of a fresh ``forkserver`` child per configuration above its resident set
after a warm-up on tiny tensors (the libraries' lazy set-up), so peaks of different configurations never
mix. CUDA: ``torch.cuda.max_memory_allocated`` after a reset, in process.
DynaBERT's frozen teacher and distillation targets are not included (the step measured is the plain one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..evaluation.benchmark import fresh_process_peak_mb
from ..models.config import HydraViTConfig, defined_ks
from ..models.factory import model_from_config
from ..models.subnet import subnet_vit
from .methods import METHODS, method_class
from .samplers import SAMPLERS, create_sampler

__all__ = ['TrainMemoryCase', 'train_memory_cases', 'train_step_peak_mb', 'train_memory_table', 'STEPS_SEARCHED']

STEPS_SEARCHED = 50
Row = Dict[str, Any]


@dataclass(frozen=True)
class TrainMemoryCase:
    """One configuration: a nesting's model trained at ``ks`` in one step (``vit``: a standalone timm ViT)."""
    label: str
    nesting: str
    ks: Tuple[int, ...]
    sampler: str = ''
    vit: bool = False


def _heaviest_draw(sampler_name: str, k_choices: Sequence[int], num_random: int) -> Tuple[int, ...]:
    sampler = create_sampler(sampler_name, k_choices, num_random=num_random,
                             weights=[1.0] * len(k_choices) if sampler_name == 'weighted' else None)
    draws = [tuple(sorted(sampler.ks_for_step(0, step), reverse=True)) for step in range(STEPS_SEARCHED)]
    return max(draws)  # widest first: the largest k decides the activation peak, then the count


def train_memory_cases(config: HydraViTConfig, *, samplers: Sequence[str] = ('uniform', 'sandwich', 'all', 'random'),
                       methods: Optional[Sequence[str]] = None, method_sampler: str = 'sandwich',
                       num_random: int = 2) -> List[TrainMemoryCase]:
    """Every sampler with HydraViT's nesting, every method with ``method_sampler`` (or its own), the references."""
    for name in samplers:
        if name not in SAMPLERS:
            raise ValueError(f'unknown sampler {name!r}: choose from {", ".join(SAMPLERS)}')
    ks = list(config.k_choices)
    cases = []
    for name in samplers:
        label = f'{name} (n={num_random})' if name in ('random', 'sandwich') else name
        cases.append(TrainMemoryCase(f'HydraViT, {label}', 'hydravit', _heaviest_draw(name, ks, num_random), name))
    for method in (methods if methods is not None else [m for m in METHODS if m not in ('hydravit', 'separate')]):
        cls = method_class(method)
        allowed = [k for k in ks if k in defined_ks(cls.nesting, config.num_heads, config.head_dim)]
        sampler = cls.sampler or method_sampler
        draw = _heaviest_draw(sampler, allowed, num_random)
        label = f'{sampler} (n={num_random})' if sampler in ('random', 'sandwich') else sampler
        cases.append(TrainMemoryCase(f'{cls.label}, {label}', cls.nesting, draw, sampler))
    top = max(ks)
    cases.append(TrainMemoryCase(f'one ViT of k={top}', 'hydravit', (top,), vit=True))
    cases.append(TrainMemoryCase(f'separate ViTs k={ks[0]}..{top}', 'separate', tuple(sorted(ks, reverse=True)), 'all'))
    return cases


def _build(config: HydraViTConfig, case: TrainMemoryCase) -> Tuple[nn.Module, List[Optional[int]]]:
    if case.vit:
        return subnet_vit(replace(config, nesting='hydravit'), case.ks[0]), [None]
    ks = sorted(set(case.ks))
    model = model_from_config(replace(config, nesting=case.nesting, k_choices=tuple(ks), separate_heads=False))
    return model, list(case.ks)


def _one_step(config: HydraViTConfig, case: TrainMemoryCase, batch_size: int, device: torch.device) -> None:
    model, ks = _build(config, case)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images = torch.randn(batch_size, config.in_chans, config.img_size, config.img_size, device=device)
    target = torch.randint(0, max(config.num_classes, 1), (batch_size,), device=device)
    for k in ks:  # one k at a time, as the trainer does: its graph is freed before the next k runs
        logits = model(images) if k is None else model(images, k=k)
        F.cross_entropy(logits, target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _warm_up() -> None:
    """Run every kind of op once on tiny tensors: the libraries' lazy set-up is not charged to the step."""
    layer = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters())
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    y = F.conv2d(x, torch.randn(4, 1, 2, 2), stride=2).flatten(2).transpose(1, 2)
    y = F.layer_norm(layer(y), (4,))
    y = F.scaled_dot_product_attention(y[:, None], y[:, None], y[:, None])
    F.cross_entropy(F.gelu(y).mean(dim=(1, 2)), torch.tensor([0, 1])).backward()
    optimizer.step()


def _cpu_step(config: dict, case: TrainMemoryCase, batch_size: int) -> None:
    _one_step(HydraViTConfig(**config), case, batch_size, torch.device('cpu'))


def train_step_peak_mb(config: HydraViTConfig, case: TrainMemoryCase, batch_size: int,
                       device: str | torch.device = 'cpu', threads: int = 1) -> float:
    """Peak memory (MB) of one training step of ``case``: CPU RSS in a fresh child, or CUDA max allocated."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _one_step(config, case, batch_size, device)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    if not os.path.exists('/proc/self/status'):
        raise RuntimeError('CPU peak memory needs Linux /proc')
    return fresh_process_peak_mb(_cpu_step, (config.to_dict(), case, batch_size),
                                 f'training-memory child for {case.label}', threads=threads, warm_up=_warm_up)


def train_memory_table(config: HydraViTConfig, cases: Sequence[TrainMemoryCase], *, batch_size: int = 128,
                       device: str | torch.device = 'cpu', threads: int = 1) -> List[Row]:
    """One row per case: its k per step, peak MB, and the ratios to one ViT of the largest k and to separate ViTs."""
    peaks = [train_step_peak_mb(config, case, batch_size, device, threads) for case in cases]
    vit = next((p for c, p in zip(cases, peaks, strict=True) if c.vit), None)
    separate = next((p for c, p in zip(cases, peaks, strict=True) if c.nesting == 'separate'), None)
    rows = []
    for case, peak in zip(cases, peaks, strict=True):
        row: Row = {'config': case.label, 'ks_per_step': ' '.join(map(str, case.ks)), 'train_peak_mem_mb': peak}
        if vit:
            row['vs_one_vit'] = peak / vit
        if separate:
            row['vs_separate_vits'] = peak / separate
        rows.append({**row, 'batch_size': batch_size, 'device': str(torch.device(device))})
    return rows
