"""Seed-to-seed statistics: mean, sample std and Student-t confidence intervals, for values and paired gaps.

A gap between two methods is paired by seed (both trained with the same data order and init seed), so
its interval is the t-interval of the per-seed differences, not of two independent means. The t quantile
is computed here (regularised incomplete beta by continued fractions) so no SciPy is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

__all__ = ['Interval', 't_quantile', 'mean_interval', 'paired_interval', 'seeds_to_exclude_zero']


@dataclass(frozen=True)
class Interval:
    """``mean`` ± ``half_width`` is the ``confidence`` t-interval of ``n`` values with sample std ``std``."""
    mean: float
    std: float
    half_width: float
    n: int
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (the gap is larger than the seed noise)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def seeds_to_exclude_zero(self, limit: int = 1000) -> Optional[int]:
        """See :func:`seeds_to_exclude_zero`, for this interval's mean, std and confidence."""
        return seeds_to_exclude_zero(self.mean, self.std, self.confidence, limit)

    def columns(self, name: str) -> Dict[str, float]:
        """``name_mean``, ``name_std``, ``name_ci_low``, ``name_ci_high`` and ``name_n`` for a table row."""
        return {f'{name}_mean': self.mean, f'{name}_std': self.std, f'{name}_ci_low': self.low,
                f'{name}_ci_high': self.high, f'{name}_n': self.n}

    def __str__(self) -> str:
        if self.n < 2:
            return f'{self.mean:.2f} (1 seed)'
        return f'{self.mean:.2f} ± {self.std:.2f} [{self.low:.2f}, {self.high:.2f}]'


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. 0.975, 4 -> 2.776)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f'p must be in (0, 1), got {p}')
    if df < 1:
        raise ValueError(f'df must be >= 1, got {df}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):  # bisection: the CDF is monotone
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean, sample std (n - 1) and the two-sided t-interval of ``values`` (one value: no spread, width 0)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError('no values: an interval needs at least one')
    if not 0.0 < confidence < 1.0:
        raise ValueError(f'confidence must be in (0, 1), got {confidence}')
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, 0.0, 0.0, 1, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, half, n, confidence)


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """The t-interval of ``a[i] - b[i]`` (values paired by seed)."""
    if len(a) != len(b):
        raise ValueError(f'paired values need equal counts, got {len(a)} and {len(b)}')
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], confidence)


def seeds_to_exclude_zero(mean: float, std: float, confidence: float = 0.95, limit: int = 1000) -> Optional[int]:
    """The fewest seeds whose t-interval would exclude 0 if their mean and std were ``mean`` and ``std``.

    A planning figure, not a power analysis: it says how many seeds a gap of the measured size needs before
    it can be told from seed noise. None where no count up to ``limit`` would do (a mean of 0, or too small).
    """
    if std < 0:
        raise ValueError(f'std must be >= 0, got {std}')
    quantile = 0.5 + confidence / 2.0

    def excludes_zero(n: int) -> bool:
        return t_quantile(quantile, n - 1) * std / math.sqrt(n) < abs(mean)

    if limit < 2 or not excludes_zero(limit):
        return None
    # the half width shrinks as n grows (smaller t quantile, larger sqrt(n)): bisect for the first n that does
    too_few, enough = 1, limit
    while enough - too_few > 1:
        mid = (too_few + enough) // 2
        too_few, enough = (too_few, mid) if excludes_zero(mid) else (mid, enough)
    return enough
