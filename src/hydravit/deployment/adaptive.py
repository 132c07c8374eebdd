"""Adaptive inference: one universal model, a k chosen per batch so that latency stays under a target.

:class:`LatencyController` is the policy and knows no clock: per-k base latencies (calibrated once,
refined slowly) times one shared load factor estimated from the latest observations predict what each
k costs *now*. It drops k as soon as the current one is predicted to miss, climbs only with a margin
and after a few agreeing batches (hysteresis), and now and then probes the next larger k when that is
predicted to fit, to correct a stale estimate. :class:`AdaptivePredictor` wraps a HydraViT with it and
times each batch with an injectable clock, so tests run on simulated time. :class:`AdaptiveCascadePredictor`
serves an early-exit cascade instead: under load it first lowers the cascade's thresholds (more images leave
at the first stage), and only once they are at zero lowers k below the first stage.
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..cascade.policy import CascadePolicy
from ..cascade.runner import Cascade
from ..evaluation.benchmark import torch_threads
from ..models.factory import UniversalModel
from ..models.kchoices import check_k_choices

__all__ = [
    'LatencyController', 'AdaptivePredictor', 'AdaptiveOutput', 'LoadPhase', 'applied_load', 'DEFAULT_PHASES',
    'fixed_k_policy', 'adaptive_policy', 'run_under_load', 'summarize', 'calibrate_latencies', 'timed_forward',
    'reexec_with_passive_omp', 'ServingLevel', 'cascade_levels', 'AdaptiveCascadePredictor', 'AdaptiveCascadeOutput',
    'THRESHOLD_FACTORS', 'Forward',
]


class LatencyController:
    """Chooses k per batch to keep latency <= ``target_ms``; learns from :meth:`observe`.

    Prediction for k: ``load * base[k]``. The current k is kept while its prediction stays within
    ``down_fraction`` of the target; a move (down at once, up after ``up_patience`` agreeing batches)
    goes to the largest k predicted within ``up_fraction`` -- the gap between the two is the hysteresis;
    with ``climb_steps`` an up-move goes at most that many k up.

    A server also tells :meth:`choose` what is waiting: ``queued_batches`` full batches behind this one and
    ``waited_ms`` already spent by its oldest image. The prediction is then the later of the oldest image's
    answer (``waited + p``) and the last queued one's (``(1 + queued) * p``), so a backlog lowers k at the
    next batch, and k climbs (or probes) only once the queue is drained (by default: fits in one batch).

    With ``batch_images`` (the images of a full batch) the server may also tell :meth:`choose` the rate at
    which images arrive: no k is chosen whose full batches could not keep up with it at ``max_utilization``.
    A queue only shows an overload after it has built, and a controller that reacts to the queue alone
    climbs back as soon as the queue drains, builds it again, and misses on every swing; the arrival rate
    says before that which k can sustain the load at all.
    """

    def __init__(
            self,
            ks: Sequence[int],
            target_ms: float,
            base_latency_ms: Mapping[int, float],
            *,
            up_fraction: float = 0.7,
            down_fraction: float = 0.9,
            up_patience: int = 3,
            probe_every: int = 50,
            load_smoothing: float = 0.5,
            base_smoothing: float = 0.1,
            climb_steps: Optional[int] = None,
            batch_images: Optional[int] = None,
            max_utilization: float = 0.85,
    ) -> None:
        self.ks = list(check_k_choices(ks, what='ks'))
        if not self.ks:
            raise ValueError('ks must name at least one subnetwork')
        if not target_ms > 0:
            raise ValueError(f'target_ms must be > 0, got {target_ms}')
        missing = [k for k in self.ks if k not in base_latency_ms]
        if missing:
            raise ValueError(f'base_latency_ms lacks k {missing} (needs every k of {self.ks})')
        if not 0 < up_fraction <= down_fraction <= 1:
            raise ValueError(f'need 0 < up_fraction <= down_fraction <= 1, got {up_fraction}, {down_fraction}')
        if not (0 < load_smoothing <= 1 and 0 <= base_smoothing < 1):
            raise ValueError('load_smoothing must be in (0, 1] and base_smoothing in [0, 1)')
        self.target_ms = float(target_ms)
        self.base = {k: self._checked(k, base_latency_ms[k]) for k in self.ks}
        self.up_fraction, self.down_fraction, self.up_patience = up_fraction, down_fraction, max(1, int(up_patience))
        self.probe_every = int(probe_every)
        if climb_steps is not None and climb_steps < 1:
            raise ValueError(f'climb_steps must be >= 1 (or None: up to the largest k that fits), got {climb_steps}')
        self.climb_steps = climb_steps
        if batch_images is not None and batch_images < 1:
            raise ValueError(f'batch_images must be >= 1 (or None: no arrival-rate cap), got {batch_images}')
        if not 0 < max_utilization <= 1:
            raise ValueError(f'max_utilization must be in (0, 1], got {max_utilization}')
        self.batch_images, self.max_utilization = batch_images, float(max_utilization)
        self.load_smoothing, self.base_smoothing = load_smoothing, base_smoothing
        self.load = 1.0
        self.current = self._largest_within(self.up_fraction)
        self._streak = 0
        self._step = 0

    @staticmethod
    def _checked(k: int, latency_ms: float) -> float:
        if not (isinstance(latency_ms, (int, float)) and math.isfinite(latency_ms) and latency_ms > 0):
            raise ValueError(f'latency for k={k} must be a finite number > 0 ms, got {latency_ms!r}')
        return float(latency_ms)

    def predicted_ms(self, k: int, queued_batches: float = 0.0, waited_ms: float = 0.0,
                     overhead_ms: float = 0.0) -> float:
        """Time until the last image now waiting is answered at ``k`` (one batch when nothing waits);
        ``overhead_ms`` is what each batch cycle costs besides the forward pass."""
        batch = self.load * self.base[k]
        return max(waited_ms + batch, (1 + queued_batches) * (batch + overhead_ms))

    def sustainable_k(self, arrival_per_s: float, overhead_ms: float = 0.0) -> int:
        """The largest k whose full batches keep up with ``arrival_per_s`` images/s at ``max_utilization``
        (the smallest k where none does; the largest where no batch size is known)."""
        if self.batch_images is None or arrival_per_s <= 0:
            return self.ks[-1]
        keeps_up = [k for k in self.ks if self.max_utilization * self.batch_images * 1e3
                    / (self.batch_ms(k) + overhead_ms) >= arrival_per_s]
        return max(keeps_up) if keeps_up else self.ks[0]

    def _largest_within(self, fraction: float, *backlog: float) -> int:
        fits = [k for k in self.ks if self.predicted_ms(k, *backlog) <= fraction * self.target_ms]
        return max(fits) if fits else self.ks[0]

    def choose(self, queued_batches: float = 0.0, waited_ms: float = 0.0, overhead_ms: float = 0.0,
               drained: Optional[bool] = None, arrival_per_s: float = 0.0) -> int:
        """The k for the next batch (always one of :attr:`ks`), given the backlog behind it and the rate images
        arrive at (see the class); ``drained`` (default: at most one batch queued) says whether k may climb now."""
        if not all(math.isfinite(v) and v >= 0 for v in (queued_batches, waited_ms, overhead_ms, arrival_per_s)):
            raise ValueError(f'need finite queued_batches, waited_ms, overhead_ms and arrival_per_s >= 0, got '
                             f'{queued_batches}, {waited_ms}, {overhead_ms}, {arrival_per_s}')
        self._step += 1
        backlog = (queued_batches, waited_ms, overhead_ms)
        drained = queued_batches <= 1 if drained is None else drained
        cap = self.sustainable_k(arrival_per_s, overhead_ms)
        target = min(cap, self._largest_within(self.up_fraction, *backlog))
        if self.current > cap or self.predicted_ms(self.current, *backlog) > self.down_fraction * self.target_ms:
            self.current, self._streak = min(target, self.current), 0
        elif target > self.current:
            # only a drained batch counts towards a climb; one with images behind it (the first batches of a
            # request larger than a batch) neither counts nor breaks the streak
            self._streak += int(drained)
            if self._streak >= self.up_patience:
                if self.climb_steps is not None:  # a few k at a time: a backlog shows before the largest is reached
                    target = self.ks[min(self.ks.index(self.current) + self.climb_steps, self.ks.index(target))]
                self.current, self._streak = target, 0
        else:
            self._streak = 0
        if (drained and self.probe_every > 0 and self._step % self.probe_every == 0
                and self.current < self.ks[-1]):
            larger = self.ks[self.ks.index(self.current) + 1]
            if larger <= cap and self.predicted_ms(larger, *backlog) <= self.target_ms:
                return larger
        return self.current

    def batch_ms(self, k: int) -> float:
        """Predicted time of one batch at ``k`` now (base latency times the current load factor)."""
        return self.load * self.base[k]

    def observe(self, k: int, latency_ms: float) -> None:
        """Update the load factor and k's base latency from one measured batch."""
        if k not in self.base:
            raise ValueError(f'k={k} is not one of the controlled subnetworks {self.ks}')
        latency_ms = self._checked(k, latency_ms)
        a = self.load_smoothing
        self.load = (1 - a) * self.load + a * latency_ms / self.base[k]
        b = self.base_smoothing
        self.base[k] = (1 - b) * self.base[k] + b * latency_ms / self.load


# a forward at one k: the universal model itself, or anything called like it (``forward(x, k=k)``)
Forward = Callable[..., torch.Tensor]


def timed_forward(model: Forward, x: torch.Tensor, k: int,
                  clock: Callable[[], float] = time.perf_counter) -> Tuple[torch.Tensor, float]:
    """(logits, milliseconds) of one forward at k; waits for a CUDA device so the time is the forward's."""
    start = clock()
    with torch.inference_mode():
        logits = model(x, k=k)
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)
    return logits, (clock() - start) * 1e3


def calibrate_latencies(model: Forward, x: torch.Tensor, ks: Sequence[int], *, repeats: int = 3,
                        clock: Callable[[], float] = time.perf_counter) -> Dict[int, float]:
    """Median latency (ms) of batch ``x`` at every k, after one warm-up call each."""
    base = {}
    for k in ks:
        timed_forward(model, x, k, clock)
        base[k] = statistics.median(timed_forward(model, x, k, clock)[1] for _ in range(max(1, repeats)))
    return base


@dataclass
class AdaptiveOutput:
    logits: torch.Tensor
    k: int
    latency_ms: float


class AdaptivePredictor:
    """A HydraViT served at a per-batch k that keeps batch latency under ``target_ms``.

    Base latencies come from ``base_latency_ms`` or from :meth:`calibrate` on the first batch. Latency
    is per batch, so batches should have similar sizes. ``clock`` returns seconds (injectable for tests).
    """

    def __init__(self, model: UniversalModel, target_ms: float, *, ks: Optional[Sequence[int]] = None,
                 base_latency_ms: Optional[Mapping[int, float]] = None,
                 clock: Callable[[], float] = time.perf_counter, **controller_kwargs) -> None:
        self.model = model.eval()
        self.ks = model.resolve_ks(ks)
        if not self.ks:
            raise ValueError(f'ks must name at least one subnetwork of {list(model.k_choices)}')
        self.target_ms = target_ms
        self.clock = clock
        self._controller_kwargs = controller_kwargs
        self.controller: Optional[LatencyController] = None
        if base_latency_ms is not None:
            self.controller = LatencyController(self.ks, target_ms, base_latency_ms, **controller_kwargs)

    def _run(self, x: torch.Tensor, k: int) -> tuple:
        return timed_forward(self.model, x, k, self.clock)

    def calibrate(self, x: torch.Tensor, repeats: int = 3) -> Dict[int, float]:
        """Median latency (ms) of every k on batch ``x``; (re)starts the controller from them."""
        base = calibrate_latencies(self.model, x, self.ks, repeats=repeats, clock=self.clock)
        self.controller = LatencyController(self.ks, self.target_ms, base, **self._controller_kwargs)
        return base

    def __call__(self, x: torch.Tensor) -> AdaptiveOutput:
        if self.controller is None:
            self.calibrate(x)
        controller = self.controller
        assert controller is not None  # calibrate() starts it
        k = controller.choose()
        logits, latency = self._run(x, k)
        controller.observe(k, latency)
        return AdaptiveOutput(logits=logits, k=k, latency_ms=latency)


# ------------------------------------------------------------------------------------------ cascades under load
THRESHOLD_FACTORS = (1.0, 0.75, 0.5, 0.25, 0.0)  # the policy's thresholds times these, before any k is lowered


@dataclass(frozen=True)
class ServingLevel:
    """One way to serve a batch, cheaper the lower it stands: a scaled cascade, or one static k."""
    name: str
    policy: Optional[CascadePolicy] = None  # None: the static ``k``
    k: Optional[int] = None
    threshold_factor: Optional[float] = None


def cascade_levels(model: UniversalModel, policy: CascadePolicy,
                   factors: Sequence[float] = THRESHOLD_FACTORS) -> List[ServingLevel]:
    """Serving levels from cheapest to most accurate: each trained k below the cascade's first stage, then the
    cascade with its thresholds times each factor (0 = its first stage alone) up to the policy itself."""
    policy.check_ks(model.k_choices, model.config.num_heads)
    bad = [f for f in factors if not (math.isfinite(f) and 0 <= f <= 1)]
    if bad or not factors:
        raise ValueError(f'threshold factors must be numbers in [0, 1], got {list(factors)}')
    levels = [ServingLevel(f'k={k}', k=k) for k in model.k_choices if k < policy.ks[0]]
    for f in sorted(set(float(f) for f in factors)):
        levels.append(ServingLevel(f'cascade x{f:g}', policy=policy.scaled(f), threshold_factor=f))
    return levels


@dataclass
class AdaptiveCascadeOutput:
    logits: torch.Tensor
    exit_k: torch.Tensor  # (N,): the k that answered each image
    level: ServingLevel
    latency_ms: float


class AdaptiveCascadePredictor:
    """A cascade policy served under a latency target per batch: thresholds drop before k does.

    The levels of :func:`cascade_levels` are controlled like the k of :class:`AdaptivePredictor` (one
    :class:`LatencyController` over level numbers 1..L, cheapest first), so the controller's hysteresis and
    probing apply unchanged. A cascade's latency depends on how many images of the batch exit early; the
    controller's load factor absorbs that variation like any other.
    """

    def __init__(self, model: UniversalModel, policy: CascadePolicy, target_ms: float, *,
                 factors: Sequence[float] = THRESHOLD_FACTORS, base_latency_ms: Optional[Mapping[int, float]] = None,
                 clock: Callable[[], float] = time.perf_counter, **controller_kwargs) -> None:
        self.model = model.eval()
        self.levels = cascade_levels(model, policy, factors)
        self.target_ms = target_ms
        self.clock = clock
        self._cascades = {i: Cascade.from_model(model, lvl.policy) for i, lvl in enumerate(self.levels, 1)
                          if lvl.policy is not None}
        self._controller_kwargs = controller_kwargs
        self.controller: Optional[LatencyController] = None
        if base_latency_ms is not None:
            self.controller = LatencyController(self.level_ids, target_ms, base_latency_ms, **controller_kwargs)

    @property
    def level_ids(self) -> List[int]:
        return list(range(1, len(self.levels) + 1))

    def _run(self, x: torch.Tensor, level: int) -> tuple:
        start = self.clock()
        with torch.inference_mode():
            if level in self._cascades:
                out = self._cascades[level](x)
                logits, exit_k = out.logits, out.exit_k
            else:
                k = self.levels[level - 1].k
                assert k is not None
                logits = self.model(x, k=k)
                exit_k = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        if x.device.type == 'cuda':
            torch.cuda.synchronize(x.device)
        return logits, exit_k, (self.clock() - start) * 1e3

    def calibrate(self, x: torch.Tensor, repeats: int = 3) -> Dict[int, float]:
        """Median latency (ms) of every level on batch ``x``; (re)starts the controller from them."""
        base = {}
        for level in self.level_ids:
            self._run(x, level)
            base[level] = statistics.median(self._run(x, level)[2] for _ in range(max(1, repeats)))
        self.controller = LatencyController(self.level_ids, self.target_ms, base, **self._controller_kwargs)
        return base

    def __call__(self, x: torch.Tensor) -> AdaptiveCascadeOutput:
        if self.controller is None:
            self.calibrate(x)
        controller = self.controller
        assert controller is not None  # calibrate() starts it
        level = controller.choose()
        logits, exit_k, latency = self._run(x, level)
        controller.observe(level, latency)
        return AdaptiveCascadeOutput(logits=logits, exit_k=exit_k, level=self.levels[level - 1], latency_ms=latency)


# ------------------------------------------------------------------------------------------ load
def reexec_with_passive_omp(argv: Sequence[str]) -> None:
    """Restart Python with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (no return then).

    OpenMP threads spin while waiting; next to other busy processes on few cores that makes every k
    10-100x slower (measured on 2 cores), which no choice of k can repair. Read once at start-up.
    """
    if os.environ.get('OMP_WAIT_POLICY') is None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'})


@dataclass(frozen=True)
class LoadPhase:
    """A period of changed compute: ``busy`` spinning child processes and/or fewer torch threads."""
    name: str
    busy: int = 0
    threads: Optional[int] = None


@contextmanager
def applied_load(phase: LoadPhase) -> Iterator[List[subprocess.Popen]]:
    """Apply ``phase`` (start its busy-loop processes, set torch threads); undo it on exit. Yields the processes."""
    if phase.busy < 0 or (phase.threads is not None and phase.threads < 1):
        raise ValueError(f'phase {phase.name!r}: busy must be >= 0 and threads >= 1')
    procs: List[subprocess.Popen] = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
                                     for _ in range(phase.busy)]
    try:
        with torch_threads(phase.threads):
            yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


# ------------------------------------------------------------------------------------------ load runs
Policy = Callable[[torch.Tensor], tuple]  # batch -> (k served, latency ms)

DEFAULT_PHASES = (LoadPhase('quiet'), LoadPhase('2 busy procs', busy=2), LoadPhase('1 thread', threads=1),
                  LoadPhase('quiet again'))


def fixed_k_policy(model: UniversalModel, k: int, clock: Callable[[], float] = time.perf_counter) -> Policy:
    """Always serve ``k``: the baseline an adaptive policy is compared with."""
    k = model.resolve_k(k)
    return lambda x: (k, timed_forward(model, x, k, clock)[1])


def adaptive_policy(predictor: AdaptivePredictor) -> Policy:
    def serve(x: torch.Tensor) -> tuple:
        out = predictor(x)
        return out.k, out.latency_ms
    return serve


def run_under_load(policies: Mapping[str, Policy], x: torch.Tensor, phases: Sequence[LoadPhase] = DEFAULT_PHASES,
                   batches_per_phase: int = 30) -> List[Dict]:
    """Serve ``batches_per_phase`` batches per phase with every policy, interleaved batch by batch.

    Interleaving makes every policy see the same load. One record per batch: phase, policy, k, latency_ms.
    """
    records = []
    for phase in phases:
        with applied_load(phase):
            for i in range(batches_per_phase):
                for name, policy in policies.items():
                    k, latency = policy(x)
                    records.append(dict(phase=phase.name, policy=name, batch=i, k=k, latency_ms=latency))
    return records


def summarize(records: Sequence[Mapping], target_ms: float,
              accuracy: Optional[Mapping[int, float]] = None) -> List[Dict]:
    """Per (phase, policy) and overall per policy: share of batches within target, mean k and accuracy served."""
    groups: Dict[tuple, List[Mapping]] = {}
    for r in records:
        groups.setdefault((r['phase'], r['policy']), []).append(r)
    for r in records:
        groups.setdefault(('all', r['policy']), []).append(r)
    rows = []
    for (phase, policy), rs in groups.items():
        lat = sorted(r['latency_ms'] for r in rs)
        row = dict(phase=phase, policy=policy, batches=len(rs),
                   met_target=sum(v <= target_ms for v in lat) / len(lat), mean_k=statistics.mean(r['k'] for r in rs),
                   p50_ms=statistics.median(lat), p90_ms=lat[min(len(lat) - 1, int(0.9 * len(lat)))])
        if accuracy:
            row['mean_top1'] = statistics.mean(accuracy[r['k']] for r in rs)
        rows.append(row)
    return rows
