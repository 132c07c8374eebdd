"""Serving policies: which subnetwork answers each batch. Plug-ins with a registry (``--policy NAME[:ARG]``).

A policy sees one batch at a time, from the batcher's single inference thread, together with the
:class:`Backlog` behind it (images queued, in the same unit as ``max_batch``, and how long the batch's
oldest image has waited); it runs the forward pass itself (a cascade runs several k on one batch) and
returns the logits, the k that answered each image and the time the forward took. A policy that can
predict its cheapest batch (:meth:`ServingPolicy.fastest_batch_ms`) lets the batcher refuse, at once, a
request that could not be answered within the target anyway.

- ``adaptive``: the latency controller of :mod:`hydravit.deployment.adaptive`, told the backlog and the
  arrival rate: k drops at the next batch when the queue (or the oldest image's wait) would miss the target
  at the current k or when its full batches could not keep up with the images arriving, and climbs only
  once the queue is empty.
- ``fixed:K``: always K.
- ``cascade:POLICY.json``: the early-exit cascade of :mod:`hydravit.cascade`, through :func:`load_cascade_runner`
  (the one place that knows that package); each image answers at the stage it exits.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..deployment.adaptive import Forward, LatencyController, calibrate_latencies, timed_forward
from ..models.factory import UniversalModel

__all__ = ['Backlog', 'BatchCost', 'BatchOutput', 'ServingPolicy', 'AdaptivePolicy', 'FixedPolicy',
           'CascadeServingPolicy', 'SERVING_POLICIES', 'register_serving_policy', 'parse_policy', 'create_policy',
           'load_cascade_runner']

Clock = Callable[[], float]


@dataclass
class BatchOutput:
    logits: torch.Tensor          # (N, classes)
    ks: List[int]                 # the k that answered each image
    forward_ms: float


@dataclass(frozen=True)
class Backlog:
    """What waits behind a batch when it starts: ``queued`` images (not batches), the age of its oldest image,
    the time a batch cycle spends outside the forward pass, and the images per second arriving (all measured
    by the batcher)."""
    queued: int = 0
    waited_ms: float = 0.0
    overhead_ms: float = 0.0
    arrival_per_s: float = 0.0


class BatchCost:
    """Forward time at k of a batch of n images, from calibrated times of one image and of a full batch.

    Linear in n between the two (a forward has a fixed cost plus a cost per image), so a half-empty batch
    at low load is not read as a faster machine. ``load`` is the median measured / predicted ratio of the
    last ``window`` batches: one slow batch (a preempted thread, a first call) does not move it.
    """

    def __init__(self, one_ms: Dict[int, float], full_ms: Dict[int, float], max_batch: int, window: int = 9) -> None:
        self.one, self.full, self.max_batch = dict(one_ms), dict(full_ms), max_batch
        self._ratios: Deque[float] = deque(maxlen=window)

    @property
    def load(self) -> float:
        return statistics.median(self._ratios) if self._ratios else 1.0

    @classmethod
    def calibrate(cls, model: UniversalModel, ks: Sequence[int], max_batch: int,
                  clock: Clock = time.perf_counter, forward: Optional[Forward] = None) -> BatchCost:
        """Times of ``forward`` (default: the model itself) on random batches of ``model``'s input shape."""
        forward = forward or model
        full = calibrate_latencies(forward, _batch_of(model, max_batch), ks, clock=clock)
        one = calibrate_latencies(forward, _batch_of(model, 1), ks, clock=clock) if max_batch > 1 else full
        return cls({k: min(one[k], full[k]) for k in ks}, full, max_batch)

    def base_ms(self, k: int, n: int) -> float:
        if self.max_batch == 1:
            return self.full[k]
        return self.one[k] + (self.full[k] - self.one[k]) * (min(n, self.max_batch) - 1) / (self.max_batch - 1)

    def as_full_batch(self, k: int, n: int, ms: float) -> float:
        """A measured time of ``n`` images scaled to a full batch."""
        return ms * self.full[k] / self.base_ms(k, n)

    def observe(self, k: int, n: int, ms: float) -> None:
        self._ratios.append(max(ms, 1e-3) / self.base_ms(k, n))

    def batch_ms(self, k: int) -> float:
        return self.load * self.full[k]


class ServingPolicy:
    """Base class: ``name`` is the registry key; ``arg`` the text after ``NAME:`` in ``--policy``.

    ``forward`` runs a batch at one k (default: the model itself; a server passes the model's TorchScript
    traces, :class:`hydravit.deployment.torchscript.TracedSubnetworks`, which give the same logits)."""
    name: str = ''
    needs_arg: bool = False
    arg_help: str = ''

    def __init__(self, model: UniversalModel, arg: Optional[str], *, target_ms: float, max_batch: int,
                 max_wait_ms: float, clock: Clock = time.perf_counter, forward: Optional[Forward] = None) -> None:
        self.model, self.target_ms, self.max_batch, self.max_wait_ms = model, target_ms, max_batch, max_wait_ms
        self.clock = clock
        self.forward: Forward = forward or model

    def run(self, x: torch.Tensor, backlog: Backlog) -> BatchOutput:
        raise NotImplementedError

    def fastest_batch_ms(self) -> Optional[float]:
        """Predicted time of a full batch at the cheapest choice this policy would make now (None: unknown)."""
        return None

    def run_at(self, x: torch.Tensor, k: int) -> BatchOutput:
        """A batch whose requests asked for ``k`` (validated already): the policy is bypassed, not informed."""
        logits, ms = timed_forward(self.forward, x, k, self.clock)
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
    """k per batch from :class:`LatencyController`, calibrated at start-up on one image and on full batches.

    The controller's target is the request's: it is told how many full batches wait behind this one
    (at least one: an image arriving now waits for the batch in progress, then for its own) and how long
    this batch's oldest image has waited already (its arrival is when its request reached the server), and
    what a batch cycle costs besides the forward pass; k climbs only when nothing is queued behind the batch.
    """
    name = 'adaptive'
    # Lower than the batch-level controller's defaults (0.7 / 0.9): a request's latency also holds its HTTP
    # read, decoding and answer, which the controller does not see, and varies by tens of ms from one request
    # to the next on a busy machine. Not lower: at low load the controller counts two full batches of the
    # largest k ahead of a new image, which must still fit under the up-fraction of a tight target.
    UP_FRACTION, DOWN_FRACTION = 0.6, 0.75
    # Full batches of the chosen k must keep up with the arrivals with this much to spare: Poisson arrivals
    # come in bursts, and the batch cycle's cost outside the forward grows with the load.
    MAX_UTILIZATION = 0.8

    def __init__(self, model: UniversalModel, arg: Optional[str], *, base_latency_ms: Optional[Dict[int, float]] = None,
                 one_image_ms: Optional[Dict[int, float]] = None, **kwargs) -> None:
        super().__init__(model, arg, **kwargs)
        self.ks = list(model.k_choices)
        if not self.target_ms > self.max_wait_ms:
            raise ValueError(f'--latency-ms {self.target_ms:g} leaves no time for inference after --max-wait-ms '
                             f'{self.max_wait_ms:g}: need latency > max-wait')
        if base_latency_ms is None:
            self.cost = BatchCost.calibrate(model, self.ks, self.max_batch, clock=self.clock, forward=self.forward)
        else:  # given (tests, a known machine): without one-image times a batch costs the same at any size
            self.cost = BatchCost(dict(one_image_ms or base_latency_ms), dict(base_latency_ms), self.max_batch)
        self.base_latency_ms = dict(self.cost.full)
        # a climb goes straight to the largest k that fits the target and keeps up with the arrivals (one k at a
        # time took longer than a phase of low load to get back to the largest k after an overload)
        self.controller = LatencyController(self.ks, self.target_ms, self.base_latency_ms,
                                            up_fraction=self.UP_FRACTION, down_fraction=self.DOWN_FRACTION,
                                            batch_images=self.max_batch, max_utilization=self.MAX_UTILIZATION)

    def run(self, x: torch.Tensor, backlog: Backlog) -> BatchOutput:
        n = x.shape[0]
        queued_batches = max(1, math.ceil(max(0, backlog.queued) / self.max_batch))
        k = self.controller.choose(queued_batches, max(0.0, backlog.waited_ms), max(0.0, backlog.overhead_ms),
                                   drained=backlog.queued <= 0, arrival_per_s=max(0.0, backlog.arrival_per_s))
        logits, ms = timed_forward(self.forward, x, k, self.clock)
        self.controller.observe(k, self.cost.as_full_batch(k, n, max(ms, 1e-3)))
        self.cost.observe(k, n, ms)
        return BatchOutput(logits, [k] * n, ms)

    def fastest_batch_ms(self) -> Optional[float]:
        return self.cost.batch_ms(self.ks[0])

    def current_k(self) -> Optional[int]:
        return self.controller.current

    def describe(self) -> Dict[str, object]:
        return {'policy': 'adaptive',
                'calibrated_ms_per_full_batch': {str(k): round(v, 3) for k, v in self.cost.full.items()},
                'calibrated_ms_per_image': {str(k): round(v, 3) for k, v in self.cost.one.items()}}


@register_serving_policy
class FixedPolicy(ServingPolicy):
    name, needs_arg, arg_help = 'fixed', True, 'K'

    def __init__(self, model: UniversalModel, arg: Optional[str], *, base_latency_ms: Optional[Dict[int, float]] = None,
                 **kwargs) -> None:
        super().__init__(model, arg, **kwargs)
        try:
            k = int(str(arg))
        except ValueError:
            raise ValueError(f'--policy fixed:K needs an integer K, got {arg!r} (trained k: '
                             f'{list(model.k_choices)})') from None
        self.k = model.resolve_k(k)
        if base_latency_ms is None:
            self.cost = BatchCost.calibrate(model, [self.k], self.max_batch, clock=self.clock, forward=self.forward)
        else:
            self.cost = BatchCost({self.k: base_latency_ms[self.k]}, {self.k: base_latency_ms[self.k]},
                                  self.max_batch)

    def run(self, x: torch.Tensor, backlog: Backlog) -> BatchOutput:
        out = self.run_at(x, self.k)
        self.cost.observe(self.k, x.shape[0], out.forward_ms)
        return out

    def fastest_batch_ms(self) -> Optional[float]:
        return self.cost.batch_ms(self.k)

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

    def run(self, x: torch.Tensor, backlog: Backlog) -> BatchOutput:
        start = self.clock()
        with torch.inference_mode():
            logits, ks = self.runner(x)
        return BatchOutput(logits, [int(k) for k in ks], (self.clock() - start) * 1e3)

    def describe(self) -> Dict[str, object]:
        return {'policy': f'cascade:{self.path}'}
