"""The one rule for the number of heads k: validation of a single k, of a set of k, and of CLI values.

Every entry point (model config, samplers, trainer, each subcommand) goes through these functions, so a
k is accepted or refused the same way everywhere: an int (``True`` and ``2.5`` are refused, never cast),
within ``1..num_heads``, each k at most once.
"""
from __future__ import annotations

import numbers
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ['is_int', 'check_k', 'check_k_choices', 'parse_ks']


def is_int(value: Any) -> bool:
    """An integer value that is not a bool (numpy and torch integer scalars count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_k(k: Any, allowed: Sequence[int], *, num_heads: Optional[int] = None) -> int:
    """``k`` as an int if it is one of ``allowed``, else a ValueError naming the allowed values."""
    where = f' (num_heads={num_heads})' if num_heads is not None else ''
    if not is_int(k):
        raise ValueError(f'k must be an int, one of {list(allowed)}{where}; got {k!r}')
    if int(k) not in allowed:
        raise ValueError(f'k={int(k)} is not a valid subnetwork: allowed values are {list(allowed)}{where}')
    return int(k)


def check_k_choices(ks: Sequence[Any], num_heads: Optional[int] = None, *, what: str = 'k_choices') -> Tuple[int, ...]:
    """A non-empty set of k as a sorted tuple: ints in ``1..num_heads`` (or >= 1), no duplicates."""
    values = list(ks)
    if not values:
        raise ValueError(f'{what} is empty: give at least one head count k >= 1')
    bad_type = [k for k in values if not is_int(k)]
    if bad_type:
        raise ValueError(f'{what} must be integers, got {bad_type} in {values}')
    ints = [int(k) for k in values]
    upper = num_heads if num_heads is not None else max(ints)
    out_of_range = [k for k in ints if not 1 <= k <= upper]
    if out_of_range:
        bound = f'outside 1..{num_heads} (num_heads)' if num_heads is not None else 'below 1: every k must be >= 1'
        raise ValueError(f'{what} {out_of_range} {bound}')
    duplicates = sorted({k for k in ints if ints.count(k) > 1})
    if duplicates:
        raise ValueError(f'{what} {ints} names {duplicates} more than once: give each k once')
    return tuple(sorted(ints))


def parse_ks(values: Optional[Sequence[Any]], allowed: Optional[Sequence[int]] = None,
             num_heads: Optional[int] = None, *, what: str = '--k') -> Optional[List[int]]:
    """Command-line k values: ``None`` or ``['all']`` -> None (the caller's default); else checked ints.

    Strings must spell integers ('2.5' and 'x' are refused). With ``allowed`` every k must be one of
    them; otherwise the set is checked against ``num_heads``.
    """
    if values is None or [str(v) for v in values] == ['all']:
        return None
    ints: List[Any] = []
    for v in values:
        if isinstance(v, str):
            text = v.strip()
            if not text.lstrip('+-').isdigit():
                raise ValueError(f"{what} takes 'all' or integers, got {list(values)}")
            ints.append(int(text))
        else:
            ints.append(v)
    if allowed is None:
        return list(check_k_choices(ints, num_heads, what=what))
    checked = check_k_choices(ints, what=what)  # types and duplicates; membership names the allowed values
    return [check_k(k, allowed, num_heads=num_heads) for k in checked]
