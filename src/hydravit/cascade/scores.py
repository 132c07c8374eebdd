"""Confidence scores that decide whether an image may leave the cascade at a stage: a registry of classes.

Every score maps logits to one value per image in [0, 1] (1 = certain), so a threshold of 0 lets every
image exit at the first stage and a threshold above 1 lets none exit before the last.
"""
from __future__ import annotations

import math
from typing import Dict, List, Type

import torch

__all__ = ['ConfidenceScore', 'MaxSoftmax', 'Margin', 'Entropy', 'SCORES', 'register_score', 'score_class',
           'create_score']


class ConfidenceScore:
    """How sure a stage is of its answer, per image, from its logits; subclasses set ``name`` and ``__call__``."""
    name: str = ''
    summary: str = ''

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


SCORES: Dict[str, Type[ConfidenceScore]] = {}


def register_score(cls: Type[ConfidenceScore]) -> Type[ConfidenceScore]:
    """Class decorator: make ``cls`` available by its ``name`` (``--score``, policy JSON)."""
    if not cls.name:
        raise ValueError(f'{cls.__name__} needs a name to be registered')
    if cls.name in SCORES and SCORES[cls.name] is not cls:
        raise ValueError(f'a confidence score named {cls.name!r} is already registered ({SCORES[cls.name].__name__})')
    SCORES[cls.name] = cls
    return cls


def score_class(name: str) -> Type[ConfidenceScore]:
    if name not in SCORES:
        raise ValueError(f'unknown confidence score {name!r}: choose one of {sorted(SCORES)}')
    return SCORES[name]


def create_score(name: str) -> ConfidenceScore:
    return score_class(name)()


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


@register_score
class MaxSoftmax(ConfidenceScore):
    name = 'max-softmax'
    summary = 'probability of the top class'

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _probabilities(logits).amax(dim=-1)


@register_score
class Margin(ConfidenceScore):
    name = 'margin'
    summary = 'probability of the top class minus that of the second'

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = _probabilities(logits)
        if probs.shape[-1] < 2:
            return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]


@register_score
class Entropy(ConfidenceScore):
    name = 'entropy'
    summary = '1 - entropy / log(classes): 1 for a one-hot answer, 0 for a uniform one'

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        classes = logp.shape[-1]
        if classes < 2:
            return torch.ones(logp.shape[:-1], dtype=logp.dtype, device=logp.device)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return (1.0 - entropy / math.log(classes)).clamp(0.0, 1.0)


def score_names() -> List[str]:
    return sorted(SCORES)
