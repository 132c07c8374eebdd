"""Serving policies: which subnetwork answers each batch. Plug-ins with a registry (``--policy NAME[:ARG]``).

A policy sees one batch at a time, from the batcher's single inference thread, together with the queue
length behind it; it runs the forward pass itself (a cascade runs several k on one batch) and returns the
logits, the k that answered each image and the time the forward took.

- ``adaptive``: the latency controller of :mod:`hydravit.deployment.adaptive`, told how long draining the
  work present now would take at the k it served (forward latency x batches queued), so a growing queue
  pushes k down just as a slower machine does.
- ``fixed:K``: always K.
- ``cascade:POLICY.json``: the early-exit cascade of :mod:`hydravit.cascade`, through :func:`load_cascade_runner`
  (the one place that knows that package); each image answers at the stage it exits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..deployment.adaptive import LatencyController, calibrate_latencies
from ..models.factory import UniversalModel

__all__ = ['BatchOutput', 'ServingPolicy', 'AdaptivePolicy', 'FixedPolicy', 'CascadeServingPolicy',
           'SERVING_POLICIES', 'register_serving_policy', 'parse_policy', 'create_policy',
           'load_cascade_runner']

Clock = Callable[[], float]


@dataclass
class BatchOutput:
    logits: torch.Tensor          # (N, classes)
    ks: List[int]                 # the k that answered each image
    forward_ms: float


def timed_forward(model: UniversalModel, x: torch.Tensor, k: int, clock: Clock = time.perf_counter
                  ) -> Tuple[torch.Tensor, float]:
    start = clock()
    with torch.inference_mode():
        logits = model(x, k=k)
    return logits, (clock() - start) * 1e3


class ServingPolicy:
    """Base class: ``name`` is the registry key; ``arg`` the text after ``NAME:`` in ``--policy``."""
    name: str = ''
    needs_arg: bool = False
    arg_help: str = ''

    def __init__(self, model: UniversalModel, arg: Optional[str], *, target_ms: float, max_batch: int,
                 max_wait_ms: float, clock: Clock = time.perf_counter) -> None:
        self.model, self.target_ms, self.max_batch, self.max_wait_ms = model, target_ms, max_batch, max_wait_ms
        self.clock = clock

    def run(self, x: torch.Tensor, queue_length: int) -> BatchOutput:
        raise NotImplementedError

    def run_at(self, x: torch.Tensor, k: int) -> BatchOutput:
        """A batch whose requests asked for ``k`` (validated already): the policy is bypassed, not informed."""
        logits, ms = timed_forward(self.model, x, k, self.clock)
        return BatchOutput(logits, [k] * x.shape[0], ms)

    def current_k(self) -> Optional[int]:
        """The k the next batch would get (for /metrics), None where it depends on the images."""
        return None

    def describe(self) -> Dict[str, object]:
        return {'policy': self.name}


SERVING_POLICIES: Dict[str, Type[ServingPolicy]] = {}


def register_serving_policy(cls: Type[ServingPolicy]) -> Type[ServingPolicy]:
    if not cls.name:
        raise ValueError(f'{cls.__name__} needs a name')
    if cls.name in SERVING_POLICIES:
        raise ValueError(f'serving policy {cls.name!r} is registered already')
    SERVING_POLICIES[cls.name] = cls
    return cls


def _spellings() -> str:
    return ', '.join(f'{n}:{c.arg_help}' if c.needs_arg else n for n, c in SERVING_POLICIES.items())


def parse_policy(spec: str) -> Tuple[Type[ServingPolicy], Optional[str]]:
    """``'adaptive'``, ``'fixed:6'``, ``'cascade:policy.json'`` -> (policy class, argument)."""
    name, sep, arg = str(spec).partition(':')
    cls = SERVING_POLICIES.get(name)
    if cls is None:
        raise ValueError(f'unknown --policy {spec!r}: choose one of {_spellings()}')
    if cls.needs_arg and not arg:
        raise ValueError(f'--policy {name} needs an argument: {name}:{cls.arg_help}')
    if not cls.needs_arg and sep:
        raise ValueError(f'--policy {name} takes no argument, got {spec!r}')
    return cls, (arg or None)


def create_policy(spec: str, model: UniversalModel, **kwargs) -> ServingPolicy:
    cls, arg = parse_policy(spec)
    return cls(model, arg, **kwargs)


def _batch_of(model: UniversalModel, n: int) -> torch.Tensor:
    c = model.config
    return torch.randn(n, c.in_chans, c.img_size, c.img_size)


@register_serving_policy
class AdaptivePolicy(ServingPolicy):
    """k per batch from :class:`LatencyController`, calibrated at start-up on full batches.

    A request waits for the batch in progress, then for its own: two forward passes plus the batcher's
    wait, so the controller's per-batch target is ``(target_ms - max_wait_ms) / 2``. What it observes is
    the measured forward time times the number of full batches needed to clear the queue as it stands.
    """
    name = 'adaptive'

    def __init__(self, model: UniversalModel, arg: Optional[str], *, base_latency_ms: Optional[Dict[int, float]] = None,
                 **kwargs) -> None:
        super().__init__(model, arg, **kwargs)
        self.ks = list(model.k_choices)
        self.batch_target_ms = (self.target_ms - self.max_wait_ms) / 2
        if not self.batch_target_ms > 0:
            raise ValueError(f'--latency-ms {self.target_ms:g} leaves no time for inference after --max-wait-ms '
                             f'{self.max_wait_ms:g}: need latency > max-wait')
        if base_latency_ms is None:
            base_latency_ms = calibrate_latencies(model, _batch_of(model, self.max_batch), self.ks, clock=self.clock)
        self.base_latency_ms = dict(base_latency_ms)
        self.controller = LatencyController(self.ks, self.batch_target_ms, self.base_latency_ms)

    def run(self, x: torch.Tensor, queue_length: int) -> BatchOutput:
        k = self.controller.choose()
        logits, ms = timed_forward(self.model, x, k, self.clock)
        batches_to_drain = 1 + math.ceil(max(0, queue_length) / self.max_batch)
        self.controller.observe(k, max(ms, 1e-3) * batches_to_drain)
        return BatchOutput(logits, [k] * x.shape[0], ms)

    def current_k(self) -> Optional[int]:
        return self.controller.current

    def describe(self) -> Dict[str, object]:
        return {'policy': 'adaptive', 'batch_target_ms': round(self.batch_target_ms, 3),
                'calibrated_ms_per_full_batch': {str(k): round(v, 3) for k, v in self.base_latency_ms.items()}}


@register_serving_policy
class FixedPolicy(ServingPolicy):
    name, needs_arg, arg_help = 'fixed', True, 'K'

    def __init__(self, model: UniversalModel, arg: Optional[str], **kwargs) -> None:
        super().__init__(model, arg, **kwargs)
        try:
            k = int(str(arg))
        except ValueError:
            raise ValueError(f'--policy fixed:K needs an integer K, got {arg!r} (trained k: '
                             f'{list(model.k_choices)})') from None
        self.k = model.resolve_k(k)

    def run(self, x: torch.Tensor, queue_length: int) -> BatchOutput:
        return self.run_at(x, self.k)

    def current_k(self) -> Optional[int]:
        return self.k

    def describe(self) -> Dict[str, object]:
        return {'policy': f'fixed:{self.k}'}


# ------------------------------------------------------------------------------------------ cascade adapter
CascadeRunner = Callable[[torch.Tensor], Tuple[torch.Tensor, Sequence[int]]]  # batch -> (logits, k per image)


def load_cascade_runner(model: UniversalModel, path: str) -> CascadeRunner:
    """Adapter to the early-exit cascade (:mod:`hydravit.cascade`): its policy JSON and predictor, as
    ``batch -> (logits of the exit stage per image, k of that stage per image)``."""
    from ..cascade import CascadePredictor, load_policy

    if not Path(path).is_file():
        raise FileNotFoundError(f'--policy cascade:{path}: no such policy file (write one with hydravit cascade)')
    predictor = CascadePredictor(model, load_policy(path))

    def run(x: torch.Tensor) -> Tuple[torch.Tensor, Sequence[int]]:
        out = predictor(x)
        return out.logits, out.exit_k.tolist()
    return run


@register_serving_policy
class CascadeServingPolicy(ServingPolicy):
    name, needs_arg, arg_help = 'cascade', True, 'POLICY.json'

    def __init__(self, model: UniversalModel, arg: Optional[str], **kwargs) -> None:
        super().__init__(model, arg, **kwargs)
        self.path = str(arg)
        self.runner = load_cascade_runner(model, self.path)

    def run(self, x: torch.Tensor, queue_length: int) -> BatchOutput:
        start = self.clock()
        with torch.inference_mode():
            logits, ks = self.runner(x)
        return BatchOutput(logits, [int(k) for k in ks], (self.clock() - start) * 1e3)

    def describe(self) -> Dict[str, object]:
        return {'policy': f'cascade:{self.path}'}
