"""Fitting a cascade to a goal on a calibration split that holds none of the images it is reported on.

The search runs on every candidate k's logits, computed once per image: for every increasing stage list of up to
``max_stages`` of the candidate k and every combination of per-stage thresholds on a grid of score quantiles, the
accuracy and average cost follow from a few vectorised ``where``s (equal to the batched run,
:func:`~hydravit.cascade.runner.simulate_cascade`). Goals are classes in a registry:

* ``max-drop``: the cheapest cascade within P p.p. of the largest candidate k's top-1 (on the calibration split);
* ``target-gmacs``: the most accurate cascade whose average GMACs per image stay <= G;
* ``latency-ms``: the most accurate cascade whose expected batch-1 latency (per-k latencies measured on this
  machine, summed over the stages an image runs through) stays <= L.

:func:`cross_fit` is the split-half protocol for a single labelled set: fit on one half, report on the other,
then swap and average. The policy it returns was fitted on the first half only.
"""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from ..models.kchoices import check_k_choices
from .policy import NEVER, CascadePolicy
from .runner import simulate_cascade
from .scores import create_score

__all__ = ['Goal', 'MaxDrop', 'TargetGMACs', 'LatencyTarget', 'GOALS', 'register_goal', 'create_goal',
           'CalibrationData', 'Candidate', 'Fit', 'fit_policy', 'evaluate_policy', 'split_halves', 'cross_fit',
           'CrossFit']


# ------------------------------------------------------------------------------------------ goals
class Goal:
    """What a fitted cascade must achieve; ``cost`` names the per-image cost it constrains or minimises."""
    name: str = ''
    cost: str = 'gmacs'  # or 'latency_ms'
    unit: str = ''

    def __init__(self, value: float, confidence: float = 0.5) -> None:
        value = float(value)
        if not value >= 0 or value != value or value == float('inf'):
            raise ValueError(f'--{self.name} must be a finite number >= 0, got {value}')
        if not 0.5 <= confidence < 1:
            raise ValueError(f'confidence must be in [0.5, 1), got {confidence}')
        self.value = value
        self.confidence = confidence
        self.z = statistics.NormalDist().inv_cdf(confidence)

    def best(self, top1: torch.Tensor, cost: torch.Tensor, reference_top1: float,
             drop_se: torch.Tensor) -> Optional[int]:
        """Index of the best candidate (``top1`` in %, ``cost`` per image), None if none is feasible.

        ``drop_se``: standard error (p.p.) of each candidate's paired top-1 difference to the reference k.
        """
        raise NotImplementedError

    def describe(self) -> str:
        return f'{self.name} {self.value:g}{self.unit}'


def _pick(feasible: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor) -> Optional[int]:
    """Among ``feasible``, the smallest ``primary``, ties broken by the smallest ``secondary``."""
    if not bool(feasible.any()):
        return None
    idx = feasible.nonzero().flatten()
    p = primary[idx]
    tied = idx[p <= p.min() + 1e-12]
    return int(tied[secondary[tied].argmin()])


GOALS: Dict[str, Type[Goal]] = {}


def register_goal(cls: Type[Goal]) -> Type[Goal]:
    if not cls.name:
        raise ValueError(f'{cls.__name__} needs a name to be registered')
    GOALS[cls.name] = cls
    return cls


def create_goal(name: str, value: float, confidence: float = 0.5) -> Goal:
    if name not in GOALS:
        raise ValueError(f'unknown calibration goal {name!r}: choose one of {sorted(GOALS)}')
    return GOALS[name](value, confidence)


@register_goal
class MaxDrop(Goal):
    """With ``confidence`` c > 0.5 the drop must hold at the one-sided level c (paired normal bound), not only
    on average on the calibration split: it guards against picking, among many candidates, one that was lucky."""
    name, cost, unit = 'max-drop', 'gmacs', ' p.p.'

    def best(self, top1: torch.Tensor, cost: torch.Tensor, reference_top1: float,
             drop_se: torch.Tensor) -> Optional[int]:
        return _pick(top1 - self.z * drop_se >= reference_top1 - self.value - 1e-9, cost, -top1)


@register_goal
class TargetGMACs(Goal):
    name, cost, unit = 'target-gmacs', 'gmacs', ' GMACs'

    def best(self, top1: torch.Tensor, cost: torch.Tensor, reference_top1: float,
             drop_se: torch.Tensor) -> Optional[int]:
        return _pick(cost <= self.value * (1 + 1e-9), -top1, cost)


@register_goal
class LatencyTarget(Goal):
    name, cost, unit = 'latency-ms', 'latency_ms', ' ms'

    def best(self, top1: torch.Tensor, cost: torch.Tensor, reference_top1: float,
             drop_se: torch.Tensor) -> Optional[int]:
        return _pick(cost <= self.value * (1 + 1e-9), -top1, cost)


# ------------------------------------------------------------------------------------------ data
@dataclass
class CalibrationData:
    """Per candidate k: each image's confidence score and whether its top-1 answer is right."""
    scores: Dict[int, torch.Tensor]
    correct: Dict[int, torch.Tensor]

    @classmethod
    def from_logits(cls, stage_logits: Mapping[int, torch.Tensor], labels: torch.Tensor,
                    score: str = 'max-softmax') -> CalibrationData:
        scorer = create_score(score)
        labels = torch.as_tensor(labels).cpu()
        bad = [k for k, v in stage_logits.items() if v.shape[0] != labels.shape[0]]
        if bad:
            raise ValueError(f'logits of k {bad} do not have one row per label ({labels.shape[0]})')
        if labels.numel() == 0:
            raise ValueError('the calibration split is empty')
        return cls(scores={int(k): scorer(v).cpu() for k, v in stage_logits.items()},
                   correct={int(k): v.argmax(-1).cpu().eq(labels) for k, v in stage_logits.items()})

    @property
    def ks(self) -> List[int]:
        return sorted(self.scores)

    def top1(self, k: int) -> float:
        return 100.0 * float(self.correct[k].float().mean())


@dataclass(frozen=True)
class Candidate:
    """One evaluated (stage list, thresholds) on the calibration split."""
    ks: Tuple[int, ...]
    thresholds: Tuple[float, ...]
    top1: float
    cost: float
    both_right: float  # % of images right both here and at the reference k (for the paired difference)


@dataclass
class Fit:
    """The fitted policy, its calibration figures and the Pareto front of its stage list (for sweeps)."""
    policy: CascadePolicy
    goal: Goal
    calibration_top1: float
    calibration_cost: float
    reference_k: int
    reference_top1: float
    front: List[CascadePolicy] = field(default_factory=list)
    candidates_evaluated: int = 0


def _threshold_grid(scores: torch.Tensor, size: int) -> torch.Tensor:
    """0 (all exit), ``size`` quantiles of the scores, and :data:`NEVER` (none exit)."""
    quantiles = torch.quantile(scores.double(), torch.linspace(0, 1, max(2, size), dtype=torch.double))
    return torch.unique(torch.cat([torch.zeros(1, dtype=torch.double), quantiles,
                                   torch.full((1,), NEVER, dtype=torch.double)]))


def _evaluate_stage_list(data: CalibrationData, ks: Tuple[int, ...], costs: Mapping[int, float],
                         grids: Mapping[int, torch.Tensor], reference: torch.Tensor) -> List[Candidate]:
    """Every threshold combination of one stage list; vectorised over the first stage's thresholds."""
    cumulative = list(itertools.accumulate(float(costs[k]) for k in ks))
    last = len(ks) - 1
    if last == 0:
        right = 100.0 * float((data.correct[ks[0]] & reference).double().mean())
        return [Candidate(ks, (), data.top1(ks[0]), cumulative[0], right)]
    out = []
    later = [grids[k].tolist() for k in ks[1:last]]
    first_grid = grids[ks[0]]
    s0 = data.scores[ks[0]].double()
    c0 = data.correct[ks[0]]
    for rest in itertools.product(*later):
        correct = data.correct[ks[last]]
        cost = torch.full(correct.shape, cumulative[last], dtype=torch.double)
        for i in reversed(range(1, last)):
            exits = data.scores[ks[i]].double() >= rest[i - 1]
            correct = torch.where(exits, data.correct[ks[i]], correct)
            cost = torch.where(exits, cumulative[i], cost)
        exits0 = s0[None, :] >= first_grid[:, None]
        answers = torch.where(exits0, c0[None, :], correct[None, :])
        top1 = 100.0 * answers.double().mean(1)
        both = 100.0 * (answers & reference[None, :]).double().mean(1)
        mean_cost = torch.where(exits0, cumulative[0], cost[None, :]).mean(1)
        out += [Candidate(ks, (float(t0), *rest), float(a), float(c), float(b))
                for t0, a, c, b in zip(first_grid.tolist(), top1.tolist(), mean_cost.tolist(), both.tolist(),
                                       strict=True)]
    return out


def _paired_se(top1: torch.Tensor, both: torch.Tensor, reference_top1: float, n: int) -> torch.Tensor:
    """Standard error (p.p.) of mean(right_here - right_at_reference) over ``n`` images, per candidate."""
    a, r, ab = top1 / 100, reference_top1 / 100, both / 100
    mean = a - r
    second_moment = a + r - 2 * ab  # d in {-1, 0, 1}: d^2 = a + r - 2ab per image
    variance = (second_moment - mean ** 2).clamp(min=0) * n / max(1, n - 1)
    return 100.0 * (variance / n).sqrt()


def _front(candidates: Sequence[Candidate]) -> List[Candidate]:
    """Pareto-optimal candidates (no other is both cheaper-or-equal and more accurate), by cost."""
    best: List[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.cost, -c.top1)):
        if not best or c.top1 > best[-1].top1 + 1e-12:
            best.append(c)
    return best


def _spread(front: Sequence[Candidate], count: int) -> List[Candidate]:
    """``count`` front points evenly spaced in cost (both ends kept)."""
    if len(front) <= count:
        return list(front)
    lo, hi = front[0].cost, front[-1].cost
    picked = []
    for i in range(count):
        target = lo + (hi - lo) * i / (count - 1)
        picked.append(min(front, key=lambda c: abs(c.cost - target)))
    return list(dict.fromkeys(picked))


def fit_policy(stage_logits: Mapping[int, torch.Tensor], labels: torch.Tensor, costs: Mapping[int, float],
               goal: Goal, *, score: str = 'max-softmax', ks: Optional[Sequence[int]] = None,
               max_stages: int = 3, grid: int = 20, fixed_stages: bool = False, sweep_points: int = 10,
               info: Optional[Mapping[str, Any]] = None) -> Fit:
    """The best policy for ``goal`` on this (calibration) split: labels of no other split are read.

    ``costs``: per-k cost of one image in the goal's unit (GMACs, or batch-1 ms for a latency goal). ``ks``:
    candidate stages (default: every k with logits). The stage list is searched too (increasing subsets of
    up to ``max_stages`` k, static single k included) unless ``fixed_stages`` (then exactly ``ks``).
    """
    data = CalibrationData.from_logits(stage_logits, labels, score)
    candidates_ks = list(check_k_choices(ks if ks is not None else data.ks, what='cascade ks'))
    missing = [k for k in candidates_ks if k not in data.scores or k not in costs]
    if missing:
        raise ValueError(f'no logits or cost for candidate k {missing}')
    if max_stages < 1:
        raise ValueError(f'max_stages must be >= 1, got {max_stages}')
    grids = {k: _threshold_grid(data.scores[k], grid) for k in candidates_ks}
    if fixed_stages:
        stage_lists: List[Tuple[int, ...]] = [tuple(candidates_ks)]
    else:
        stage_lists = [c for n in range(1, min(max_stages, len(candidates_ks)) + 1)
                       for c in itertools.combinations(candidates_ks, n)]
    reference_k = candidates_ks[-1]
    reference = data.top1(reference_k)
    evaluated: List[Candidate] = []
    for stage_list in stage_lists:
        evaluated += _evaluate_stage_list(data, stage_list, costs, grids, data.correct[reference_k])
    top1 = torch.tensor([c.top1 for c in evaluated], dtype=torch.double)
    cost = torch.tensor([c.cost for c in evaluated], dtype=torch.double)
    both = torch.tensor([c.both_right for c in evaluated], dtype=torch.double)
    drop_se = _paired_se(top1, both, reference, int(data.correct[reference_k].numel()))
    index = goal.best(top1, cost, reference, drop_se)
    if index is None:
        cheapest = float(cost.min())
        raise ValueError(f'no cascade of k {candidates_ks} meets {goal.describe()}: the cheapest costs '
                         f'{cheapest:.4g} {goal.cost} per image on the calibration split')
    chosen = evaluated[index]
    meta = dict(info or {}, goal=goal.name, goal_value=goal.value, confidence=goal.confidence,
                calibration_top1=chosen.top1, calibration_drop_se=float(drop_se[index]),
                calibration_cost=chosen.cost, cost_unit=goal.cost, reference_k=reference_k,
                reference_top1=reference, candidate_ks=candidates_ks, max_stages=max_stages)
    policy = CascadePolicy(chosen.ks, chosen.thresholds, score, info=meta)
    same_list = [c for c in evaluated if c.ks == chosen.ks]
    front = [CascadePolicy(c.ks, c.thresholds, score) for c in _spread(_front(same_list), sweep_points)]
    return Fit(policy=policy, goal=goal, calibration_top1=chosen.top1, calibration_cost=chosen.cost,
               reference_k=reference_k, reference_top1=reference, front=front, candidates_evaluated=len(evaluated))


def evaluate_policy(stage_logits: Mapping[int, torch.Tensor], labels: torch.Tensor, policy: CascadePolicy,
                    macs: Mapping[int, int]) -> Dict[str, Any]:
    """``top1`` (%), ``gmacs`` (average per image) and ``exit_fractions`` (per k) of a policy on one split."""
    out = simulate_cascade(stage_logits, policy, macs)
    labels = torch.as_tensor(labels).cpu()
    top1 = 100.0 * float(out.logits.argmax(-1).eq(labels).double().mean())
    return dict(top1=top1, gmacs=out.mean_gmacs, exit_fractions=out.exit_fractions(policy.ks),
                num_samples=int(labels.numel()))


def split_halves(n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)`` into two halves (sorted index tensors)."""
    if n < 2:
        raise ValueError(f'a split-half calibration needs at least 2 labelled images, got {n}')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n // 2].sort().values, order[n // 2:].sort().values


@dataclass
class CrossFit:
    """Split-half calibration: ``fit`` on half A reported on half B, ``swapped`` fit on B reported on A."""
    fit: Fit
    reported: Dict[str, Any]
    swapped_fit: Fit
    swapped_reported: Dict[str, Any]
    halves: Tuple[torch.Tensor, torch.Tensor]

    @property
    def averaged(self) -> Dict[str, float]:
        return {key: statistics.mean([self.reported[key], self.swapped_reported[key]]) for key in ('top1', 'gmacs')}


def _take(stage_logits: Mapping[int, torch.Tensor], index: torch.Tensor) -> Dict[int, torch.Tensor]:
    return {k: v.index_select(0, index.to(v.device)) for k, v in stage_logits.items()}


def cross_fit(stage_logits: Mapping[int, torch.Tensor], labels: torch.Tensor, costs: Mapping[int, float],
              macs: Mapping[int, int], goal: Goal, *, seed: int = 0, **fit_kwargs: Any) -> CrossFit:
    """Fit on one half of a labelled split and report on the other, then the other way round."""
    labels = torch.as_tensor(labels).cpu()
    a, b = split_halves(labels.shape[0], seed)
    info = dict(fit_kwargs.pop('info', None) or {}, calibration='split-half', split_seed=seed)
    fits, reports = [], []
    for half, (calib, report) in zip('AB', ((a, b), (b, a)), strict=True):
        fit = fit_policy(_take(stage_logits, calib), labels[calib], costs, goal,
                         info={**info, 'calibration_half': half}, **fit_kwargs)
        fits.append(fit)
        reports.append(evaluate_policy(_take(stage_logits, report), labels[report], fit.policy, macs))
    return CrossFit(fit=fits[0], reported=reports[0], swapped_fit=fits[1], swapped_reported=reports[1],
                    halves=(a, b))
