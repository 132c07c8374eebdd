"""The serving entry point: a universal model (or per-k models) answering batches under a cascade policy."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..models.factory import UniversalModel
from ..storage.checkpoint import load_model
from ..storage.run_folder import resolve_checkpoint
from .policy import CascadePolicy, load_policy, policy_path
from .runner import Cascade, CascadeOutput, Stage, model_stages

__all__ = ['CascadePredictor']

PathLike = Union[str, os.PathLike]


class CascadePredictor:
    """``predictor(images) -> CascadeOutput`` (logits, exit k and MACs per image) under ``policy``.

    The policy may be replaced at run time (:meth:`set_policy`, e.g. lower thresholds under load) as long as
    its stages are among the predictor's: the stages are views of one model, nothing is reloaded.
    """

    def __init__(self, model: Optional[UniversalModel], policy: CascadePolicy, *,
                 stages: Optional[Sequence[Stage]] = None, device: Optional[Union[str, torch.device]] = None) -> None:
        if (model is None) == (stages is None):
            raise ValueError('give either a universal model or per-k stages')
        self.model = model
        if model is not None:
            policy.check_ks(model.k_choices, model.config.num_heads)
            self.model = model.eval()
            if device is not None:
                self.model = self.model.to(device)
            stages = model_stages(self.model, self.model.k_choices)
        assert stages is not None
        self._stages = list(stages)
        self.device = torch.device(device) if device is not None else None
        self.cascade = Cascade(self._stages, policy)

    @classmethod
    def from_files(cls, checkpoint: PathLike, policy: Optional[PathLike] = None, *,
                   device: Optional[Union[str, torch.device]] = None) -> CascadePredictor:
        """The model of ``checkpoint`` (file or run folder) with ``policy`` (default: the one saved next to it)."""
        path = resolve_checkpoint(checkpoint)
        chosen = load_policy(Path(policy) if policy is not None else policy_path(path))
        return cls(load_model(path), chosen, device=device)

    @property
    def policy(self) -> CascadePolicy:
        return self.cascade.policy

    @property
    def ks(self) -> list:
        return [s.k for s in self._stages]

    def set_policy(self, policy: CascadePolicy) -> None:
        self.cascade = Cascade(self._stages, policy)

    def __call__(self, images: torch.Tensor) -> CascadeOutput:
        if self.device is not None:
            images = images.to(self.device)
        return self.cascade(images)
