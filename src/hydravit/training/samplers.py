"""Which subnetwork(s) k to train at each optimiser step.

A sampler holds no RNG state: the k of a step is a pure function of (seed, epoch, step) -- and of the
rank only with ``per_rank=True`` -- so every process of a multi-GPU run trains the same subnetwork in
the same step (the all-reduced gradient belongs to one k) and a resumed run needs no sampler state.

* ``uniform``: one k per step, uniformly (the paper).
* ``weighted``: one k per step, with probability proportional to ``weights`` (one per k choice).
* ``sandwich``: the largest and the smallest k plus ``num_random`` distinct others, largest first; with
  ``weights``, those others are drawn in proportion to their weights (e.g. towards the middle k).
* ``random``: ``num_random`` distinct k drawn uniformly, largest first (SortedNet's update: the sampled
  sub-models' gradients are accumulated before one optimiser step).
* ``all``: every k each step, largest first.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Type

from ..models.kchoices import check_k_choices, is_int

__all__ = ['SAMPLERS', 'SubnetSampler', 'UniformSampler', 'WeightedSampler', 'SandwichSampler', 'RandomSubsetSampler',
           'AllSampler', 'create_sampler']



def _validate_k_choices(k_choices: Sequence[int]) -> Tuple[int, ...]:
    """The project's k rule (ints >= 1, each once), keeping the caller's order (weights follow it)."""
    check_k_choices(k_choices)
    return tuple(int(k) for k in k_choices)


def _check_index(name: str, value: int) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f'{name} must be an integer >= 0, got {value!r}')


class SubnetSampler:
    """Base class: subclasses draw the ks of one step from the :class:`random.Random` they are given."""
    name = ''
    uses_weights = False  # takes --head-weights

    def __init__(self, k_choices: Sequence[int], *, seed: int = 0, per_rank: bool = False) -> None:
        self.k_choices = _validate_k_choices(k_choices)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f'seed must be an integer, got {seed!r}')
        self.seed, self.per_rank = seed, bool(per_rank)

    @classmethod
    def from_options(cls, k_choices: Sequence[int], *, seed: int, weights: Optional[Sequence[float]],
                     num_random: int, per_rank: bool) -> SubnetSampler:
        """Build from :func:`create_sampler`'s options, taking the ones this sampler uses."""
        return cls(k_choices, seed=seed, per_rank=per_rank)

    def _rng(self, epoch: int, step: int, rank: int) -> random.Random:
        """A generator seeded from a hash of (sampler, seed, epoch, step[, rank]): same inputs, same draws."""
        key = f'{self.name}/{self.seed}/{epoch}/{step}/{rank if self.per_rank else "*"}'
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'little'))

    def ks_for_step(self, epoch: int, step: int, rank: int = 0) -> List[int]:
        """The k values to train at this optimiser step (largest first when there are several)."""
        _check_index('epoch', epoch)
        _check_index('step', step)
        _check_index('rank', rank)
        return self._draw(self._rng(epoch, step, rank))

    def _draw(self, rng: random.Random) -> List[int]:
        raise NotImplementedError

    def probabilities(self) -> Dict[int, float]:
        """Expected share of forward passes per k (sums to 1)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}(k_choices={list(self.k_choices)}, seed={self.seed}, per_rank={self.per_rank})'


class UniformSampler(SubnetSampler):
    """One k per step, each equally likely (the paper's stochastic dropout training)."""
    name = 'uniform'

    def _draw(self, rng: random.Random) -> List[int]:
        return [rng.choice(self.k_choices)]

    def probabilities(self) -> Dict[int, float]:
        return {k: 1.0 / len(self.k_choices) for k in self.k_choices}


def _validate_weights(weights: Sequence[float], k_choices: Tuple[int, ...]) -> Tuple[float, ...]:
    """One finite weight >= 0 per k choice, not all zero."""
    values = [float(w) for w in weights]
    if len(values) != len(k_choices):
        raise ValueError(f'got {len(values)} weights {values} for {len(k_choices)} k choices '
                         f'{list(k_choices)}: give one weight per k')
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f'weights must be finite and >= 0, got {values}')
    if sum(values) <= 0:
        raise ValueError(f'weights are all zero {values}: at least one must be > 0')
    return tuple(values)


class WeightedSampler(SubnetSampler):
    """One k per step, drawn with probability proportional to its weight (e.g. to favour small subnets)."""
    name = 'weighted'
    uses_weights = True

    def __init__(self, k_choices: Sequence[int], weights: Optional[Sequence[float]], *, seed: int = 0,
                 per_rank: bool = False) -> None:
        super().__init__(k_choices, seed=seed, per_rank=per_rank)
        if weights is None:
            raise ValueError(f'the weighted sampler needs weights (--head-weights): '
                             f'one per k in {list(self.k_choices)}')
        self.weights = _validate_weights(weights, self.k_choices)

    @classmethod
    def from_options(cls, k_choices: Sequence[int], *, seed: int, weights: Optional[Sequence[float]],
                     num_random: int, per_rank: bool) -> SubnetSampler:
        return cls(k_choices, weights, seed=seed, per_rank=per_rank)

    def _draw(self, rng: random.Random) -> List[int]:
        return rng.choices(self.k_choices, weights=self.weights)

    def probabilities(self) -> Dict[int, float]:
        total = sum(self.weights)
        return {k: w / total for k, w in zip(self.k_choices, self.weights, strict=True)}


class _NumRandomSampler(SubnetSampler):
    """A sampler that draws ``num_random`` k per step besides any fixed ones."""

    def __init__(self, k_choices: Sequence[int], num_random: int = 1, *, seed: int = 0,
                 per_rank: bool = False) -> None:
        super().__init__(k_choices, seed=seed, per_rank=per_rank)
        self.num_random = num_random

    @classmethod
    def from_options(cls, k_choices: Sequence[int], *, seed: int, weights: Optional[Sequence[float]],
                     num_random: int, per_rank: bool) -> SubnetSampler:
        return cls(k_choices, num_random, seed=seed, per_rank=per_rank)


class SandwichSampler(_NumRandomSampler):
    """The largest and smallest k plus ``num_random`` distinct others per step (the sandwich rule).

    With ``weights`` (one per k choice) the others are drawn one after another in proportion to their weights,
    without replacement; the weights of the largest and smallest k are unused, as those train at every step.
    """
    name = 'sandwich'
    uses_weights = True

    def __init__(self, k_choices: Sequence[int], num_random: int = 1, *, seed: int = 0,
                 per_rank: bool = False, weights: Optional[Sequence[float]] = None) -> None:
        super().__init__(k_choices, num_random, seed=seed, per_rank=per_rank)
        ordered = sorted(self.k_choices)
        self.largest, self.smallest, self.middle = ordered[-1], ordered[0], tuple(ordered[1:-1])
        if not is_int(num_random) or not 0 <= num_random <= len(self.middle):
            raise ValueError(f'num_random (--num-random) must be an integer in 0..{len(self.middle)} (the k choices '
                             f'{ordered} have {len(self.middle)} between the largest and the smallest), '
                             f'got {num_random!r}')
        self.middle_weights: Optional[Tuple[float, ...]] = None
        if weights is not None:
            by_k = dict(zip(self.k_choices, _validate_weights(weights, self.k_choices), strict=True))
            self.middle_weights = tuple(by_k[k] for k in self.middle)
            drawable = sum(w > 0 for w in self.middle_weights)
            if drawable < num_random:
                raise ValueError(f'the sandwich draws {num_random} of the middle k {list(self.middle)} per step, but '
                                 f'only {drawable} of them have a weight > 0')

    @classmethod
    def from_options(cls, k_choices: Sequence[int], *, seed: int, weights: Optional[Sequence[float]],
                     num_random: int, per_rank: bool) -> SubnetSampler:
        return cls(k_choices, num_random, seed=seed, per_rank=per_rank, weights=weights)

    def _draw(self, rng: random.Random) -> List[int]:
        if self.middle_weights is None:
            picked = rng.sample(self.middle, self.num_random)
        else:
            remaining = dict(zip(self.middle, self.middle_weights, strict=True))
            picked = []
            for _ in range(self.num_random):
                k = rng.choices(list(remaining), weights=list(remaining.values()))[0]
                picked.append(k)
                del remaining[k]
        smallest = [self.smallest] if self.smallest != self.largest else []
        return [self.largest] + sorted(picked, reverse=True) + smallest

    def probabilities(self) -> Dict[int, float]:
        per_step = len(self.ks_for_step(0, 0))
        weights = self.middle_weights or (1.0,) * len(self.middle)
        drawn = _inclusion_probabilities(dict(zip(self.middle, weights, strict=True)), self.num_random)
        share = {k: drawn[k] / per_step for k in self.middle}
        share[self.largest] = share[self.smallest] = 1.0 / per_step
        return {k: share[k] for k in self.k_choices}


def _inclusion_probabilities(weights: Dict[int, float], draws: int) -> Dict[int, float]:
    """P(k is among ``draws`` successive weighted draws without replacement), exactly, for every k."""
    @functools.cache
    def walk(remaining: FrozenSet[int], left: int) -> Tuple[Tuple[int, float], ...]:
        total = sum(weights[k] for k in remaining)
        if left == 0 or total <= 0:
            return ()
        out: Dict[int, float] = {}
        for k in remaining:
            p = weights[k] / total
            if p > 0:
                out[k] = out.get(k, 0.0) + p
                for j, q in walk(remaining - {k}, left - 1):
                    out[j] = out.get(j, 0.0) + p * q
        return tuple(out.items())

    found = dict(walk(frozenset(weights), draws))
    return {k: found.get(k, 0.0) for k in weights}


class RandomSubsetSampler(_NumRandomSampler):
    """``num_random`` distinct k per step, uniformly, largest first (SortedNet's random sub-models)."""
    name = 'random'

    def __init__(self, k_choices: Sequence[int], num_random: int = 1, *, seed: int = 0,
                 per_rank: bool = False) -> None:
        super().__init__(k_choices, num_random, seed=seed, per_rank=per_rank)
        if not is_int(num_random) or not 1 <= num_random <= len(self.k_choices):
            raise ValueError(f'num_random (--num-random) must be an integer in 1..{len(self.k_choices)} (the number '
                             f'of k choices {sorted(self.k_choices)}), got {num_random!r}')

    def _draw(self, rng: random.Random) -> List[int]:
        return sorted(rng.sample(self.k_choices, self.num_random), reverse=True)

    def probabilities(self) -> Dict[int, float]:
        return {k: 1.0 / len(self.k_choices) for k in self.k_choices}


class AllSampler(SubnetSampler):
    """Every k at every step, largest first."""
    name = 'all'

    def _draw(self, rng: random.Random) -> List[int]:
        return sorted(self.k_choices, reverse=True)

    def probabilities(self) -> Dict[int, float]:
        return {k: 1.0 / len(self.k_choices) for k in self.k_choices}


SAMPLERS: Dict[str, Type[SubnetSampler]] = {cls.name: cls for cls in (
    UniformSampler, WeightedSampler, SandwichSampler, RandomSubsetSampler, AllSampler)}


def create_sampler(name: str, k_choices: Sequence[int], *, seed: int = 0, weights: Optional[Sequence[float]] = None,
                   num_random: int = 1, per_rank: bool = False) -> SubnetSampler:
    """The sampler called ``name`` (one of :data:`SAMPLERS`).

    ``weights`` is for ``weighted`` and ``sandwich`` only and ``num_random`` for ``sandwich`` and ``random``
    (elsewhere ignored);
    ``per_rank=True`` gives each rank its own draws (the paper code's per-GPU sampling).
    """
    if name not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}: choose one of {", ".join(SAMPLERS)}')
    if weights is not None and not SAMPLERS[name].uses_weights:
        users = ' and '.join(n for n, cls in SAMPLERS.items() if cls.uses_weights)
        raise ValueError(f'weights (--head-weights) are used only by the {users} samplers, not {name!r}')
    return SAMPLERS[name].from_options(k_choices, seed=seed, weights=weights, num_random=num_random,
                                       per_rank=per_rank)
