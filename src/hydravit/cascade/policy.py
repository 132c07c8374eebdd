"""A cascade policy: the ordered stages (k), one exit threshold per stage but the last, and the confidence score.

Policies are plain JSON, saved next to the checkpoint they were fitted for (``model_best.cascade.json`` beside
``model_best.safetensors``), so ``eval``, ``export``, the adaptive predictor and servers load the same file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..models.kchoices import check_k, check_k_choices
from ..storage.checkpoint import atomic_write
from ..storage.run_folder import resolve_checkpoint
from .scores import ConfidenceScore, create_score, score_class

__all__ = ['CascadePolicy', 'load_policy', 'save_policy', 'policy_path', 'POLICY_FORMAT', 'NEVER']

PathLike = Union[str, os.PathLike]
POLICY_FORMAT = 'hydravit-cascade-policy'
POLICY_VERSION = 1
POLICY_SUFFIX = '.cascade.json'
NEVER = 1.01  # a threshold above every score: no image exits at that stage


@dataclass(frozen=True)
class CascadePolicy:
    """Run ``ks[0]`` on every image; an image whose score at stage i is >= ``thresholds[i]`` exits there,
    the rest go on to ``ks[i + 1]``; the last stage answers for everything still left.

    ``info`` carries how the policy was fitted (goal, calibration split, checkpoint); it is not used to run it.
    """
    ks: Tuple[int, ...]
    thresholds: Tuple[float, ...]
    score: str = 'max-softmax'
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        ks = list(self.ks)
        checked = check_k_choices(ks, what='cascade ks')
        if list(checked) != ks:
            raise ValueError(f'cascade ks must be increasing (each stage larger than the one before), got {ks}')
        thresholds = [float(t) for t in self.thresholds]
        if len(thresholds) != len(ks) - 1:
            raise ValueError(f'a cascade of {len(ks)} stages {ks} needs {len(ks) - 1} thresholds (one per stage '
                             f'but the last), got {len(thresholds)}: {list(self.thresholds)}')
        bad = [t for t in thresholds if not (math.isfinite(t) and t >= 0)]
        if bad:
            raise ValueError(f'thresholds must be finite numbers >= 0 (0: every image exits, > 1: none), got {bad}')
        score_class(self.score)
        object.__setattr__(self, 'ks', tuple(int(k) for k in ks))
        object.__setattr__(self, 'thresholds', tuple(thresholds))
        object.__setattr__(self, 'info', dict(self.info))

    @property
    def num_stages(self) -> int:
        return len(self.ks)

    def create_score(self) -> ConfidenceScore:
        return create_score(self.score)

    def with_thresholds(self, thresholds: Sequence[float]) -> CascadePolicy:
        return replace(self, thresholds=tuple(thresholds))

    def scaled(self, factor: float) -> CascadePolicy:
        """Thresholds times ``factor`` (< 1: more images exit early; 0: the first stage alone)."""
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f'threshold factor must be a finite number >= 0, got {factor}')
        return self.with_thresholds([t * factor for t in self.thresholds])

    def check_ks(self, allowed: Sequence[int], num_heads: Optional[int] = None) -> CascadePolicy:
        """This policy if every stage is one of ``allowed`` (e.g. a model's ``k_choices``), else a ValueError."""
        for k in self.ks:
            check_k(k, allowed, num_heads=num_heads)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=POLICY_FORMAT, version=POLICY_VERSION, ks=list(self.ks), thresholds=list(self.thresholds),
                    score=self.score, info=dict(self.info))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CascadePolicy:
        if not isinstance(data, Mapping):
            raise ValueError(f'a cascade policy is a JSON object, got {type(data).__name__}')
        if data.get('format', POLICY_FORMAT) != POLICY_FORMAT:
            raise ValueError(f'not a cascade policy: format {data.get("format")!r}, expected {POLICY_FORMAT!r}')
        if int(data.get('version', POLICY_VERSION)) > POLICY_VERSION:
            raise ValueError(f'cascade policy version {data["version"]} is newer than this hydravit reads '
                             f'({POLICY_VERSION})')
        missing = [key for key in ('ks', 'thresholds') if key not in data]
        if missing:
            raise ValueError(f'cascade policy lacks {missing} (needs ks, thresholds and optionally score, info)')
        unknown = sorted(set(data) - {'format', 'version', 'ks', 'thresholds', 'score', 'info'})
        if unknown:
            raise ValueError(f'unknown keys {unknown} in cascade policy (allowed: format, version, ks, thresholds, '
                             'score, info)')
        if not isinstance(data['ks'], list) or not isinstance(data['thresholds'], list):
            raise ValueError('cascade policy ks and thresholds must be JSON lists')
        return cls(ks=tuple(data['ks']), thresholds=tuple(data['thresholds']),
                   score=str(data.get('score', 'max-softmax')), info=dict(data.get('info') or {}))

    def describe(self) -> str:
        stages = ' -> '.join(f'k={k}' + (f' (exit if {self.score} >= {t:.4g})' if i < len(self.thresholds) else '')
                             for i, (k, t) in enumerate(zip(self.ks, [*self.thresholds, None], strict=True)))
        return stages


def policy_path(checkpoint: PathLike) -> Path:
    """Where the policy of ``checkpoint`` lives: ``<stem>.cascade.json`` next to it."""
    path = Path(checkpoint)
    return path.with_name(path.stem + POLICY_SUFFIX)


def save_policy(policy: CascadePolicy, path: PathLike) -> Path:
    text = json.dumps(policy.to_dict(), indent=2) + '\n'
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_policy(path: PathLike) -> CascadePolicy:
    """The policy in a JSON file (or the one next to a checkpoint file / in a run folder's best checkpoint)."""
    path = Path(path)
    if path.is_dir() or path.suffix == '.safetensors':
        path = policy_path(resolve_checkpoint(path))
    if not path.is_file():
        raise FileNotFoundError(f'cascade policy {path} does not exist (fit one with hydravit cascade)')
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from e
    try:
        return CascadePolicy.from_dict(data)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e
