"""Batched early-exit inference: each stage runs only on the images that are still undecided.

The images left after a stage are gathered (``index_select``) into a smaller batch for the next stage, and each
image's logits are scattered back (``index_copy_``) from the stage it exited at, so a later stage really costs
time in proportion to the images that reach it. MACs are analytic (:mod:`hydravit.models.costs`): an image that
exits at stage i has paid for stages 0..i (every stage is a full forward of its own subnetwork).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ..models.costs import subnet_cost
from ..models.factory import UniversalModel
from .policy import CascadePolicy
from .scores import ConfidenceScore

__all__ = ['at_k', 'Stage', 'CascadeOutput', 'Cascade', 'model_stages', 'module_stages', 'simulate_cascade',
           'stage_macs']

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One step of a cascade: subnetwork ``k`` as a batch -> logits function, and its MACs per image."""
    k: int
    forward: Forward
    macs: int


@dataclass
class CascadeOutput:
    logits: torch.Tensor   # (N, classes): each image's logits from the stage it exited at
    exit_k: torch.Tensor   # (N,) int64: the k that answered
    macs: torch.Tensor     # (N,) int64: MACs spent on the image (every stage it went through)
    stage_counts: List[int]  # images that ran through each stage

    @property
    def mean_gmacs(self) -> float:
        return float(self.macs.double().mean()) / 1e9

    def exit_fractions(self, ks: Sequence[int]) -> Dict[int, float]:
        n = max(1, self.exit_k.numel())
        return {int(k): float((self.exit_k == k).sum()) / n for k in ks}


def at_k(model: UniversalModel, k: int) -> Forward:
    """``model`` as a batch -> logits function of subnetwork ``k``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x, k=k)
    return forward


def stage_macs(model: UniversalModel, ks: Sequence[int]) -> Dict[int, int]:
    return {int(k): subnet_cost(model.config, k).macs for k in ks}


def model_stages(model: UniversalModel, ks: Sequence[int]) -> List[Stage]:
    """Stages that run the universal model (of any nesting method) at each k: views of one set of weights."""
    ks = [model.resolve_k(k) for k in ks]
    macs = stage_macs(model, ks)
    return [Stage(k, at_k(model, k), macs[k]) for k in ks]


def module_stages(modules: Mapping[int, Callable[[torch.Tensor], torch.Tensor]], macs: Mapping[int, int],
                  ks: Optional[Sequence[int]] = None) -> List[Stage]:
    """Stages from per-k standalone models (extracted or exported timm ViTs, ONNX sessions): one per k."""
    ks = sorted(modules) if ks is None else list(ks)
    missing = [k for k in ks if k not in modules or k not in macs]
    if missing:
        raise ValueError(f'no model or MAC count for cascade stage k {missing} (models given for {sorted(modules)})')
    return [Stage(int(k), modules[k], int(macs[k])) for k in ks]


class Cascade:
    """A policy bound to its stages; call it on a batch to get a :class:`CascadeOutput`."""

    def __init__(self, stages: Sequence[Stage], policy: CascadePolicy) -> None:
        by_k = {s.k: s for s in stages}
        missing = [k for k in policy.ks if k not in by_k]
        if missing:
            raise ValueError(f'policy stages {list(policy.ks)} need k {missing}, available: {sorted(by_k)}')
        self.policy = policy
        self.stages = [by_k[k] for k in policy.ks]
        self.score: ConfidenceScore = policy.create_score()

    @classmethod
    def from_model(cls, model: UniversalModel, policy: CascadePolicy) -> Cascade:
        policy.check_ks(model.k_choices, model.config.num_heads)
        return cls(model_stages(model, policy.ks), policy)

    def with_policy(self, policy: CascadePolicy) -> Cascade:
        """The same stages under other thresholds (stages of ``policy`` must be among these)."""
        return Cascade(self.stages, policy)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> CascadeOutput:
        n = x.shape[0]
        remaining = torch.arange(n, device=x.device)
        exit_k = torch.full((n,), -1, dtype=torch.long, device=x.device)
        macs = torch.zeros(n, dtype=torch.long, device=x.device)
        logits: Optional[torch.Tensor] = None
        spent, counts = 0, []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            batch = x if i == 0 else x.index_select(0, remaining)
            out = stage.forward(batch)
            counts.append(int(batch.shape[0]))
            spent += stage.macs
            if logits is None:
                logits = out.new_empty((n, out.shape[-1]))
            if i == last:
                done_rows = remaining
                done = None
            else:
                done = self.score(out) >= self.policy.thresholds[i]
                done_rows = remaining[done]
            logits.index_copy_(0, done_rows, out if done is None else out[done])
            exit_k[done_rows] = stage.k
            macs[done_rows] = spent
            if done is None:
                break
            remaining = remaining[~done]
            if remaining.numel() == 0:
                break
        assert logits is not None  # a policy has at least one stage
        return CascadeOutput(logits=logits, exit_k=exit_k, macs=macs, stage_counts=counts)


def simulate_cascade(stage_logits: Mapping[int, torch.Tensor], policy: CascadePolicy,
                     macs: Mapping[int, int]) -> CascadeOutput:
    """What :class:`Cascade` returns, computed from every stage's logits on every image (for calibration).

    Much cheaper for a threshold search (the logits are computed once), and equal to the batched run.
    """
    ks = list(policy.ks)
    missing = [k for k in ks if k not in stage_logits or k not in macs]
    if missing:
        raise ValueError(f'no logits or MAC count for cascade stage k {missing}')
    score = policy.create_score()
    first = stage_logits[ks[0]]
    n = first.shape[0]
    exit_stage = torch.full((n,), len(ks) - 1, dtype=torch.long)
    for i in reversed(range(len(ks) - 1)):
        exit_stage = torch.where(score(stage_logits[ks[i]]).cpu() >= policy.thresholds[i], i, exit_stage)
    stacked = torch.stack([stage_logits[k].cpu() for k in ks])  # (stages, N, classes)
    logits = stacked[exit_stage, torch.arange(n)]
    cumulative = torch.tensor([sum(int(macs[k]) for k in ks[:i + 1]) for i in range(len(ks))], dtype=torch.long)
    counts = [int((exit_stage >= i).sum()) for i in range(len(ks))]
    return CascadeOutput(logits=logits, exit_k=torch.tensor(ks)[exit_stage], macs=cumulative[exit_stage],
                         stage_counts=counts)
