"""Accuracy of every k under common corruptions, and how much of the clean accuracy each k loses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from timm.data import resolve_data_config

from ..data.corruptions import SEVERITIES, CorruptedDataset, parse_corruptions
from ..models.factory import UniversalModel
from ..storage.results import markdown_table
from .evaluate import evaluate_dataset

__all__ = ['CorruptionSuite', 'evaluate_corruptions', 'describe_scored', 'drop_table', 'corrupted_accuracy',
           'robustness_section']

Row = Dict[str, Any]


@dataclass(frozen=True)
class CorruptionSuite:
    """The corrupted test sets to score a model on; the same suite gives the same corrupted images every run.

    ``max_samples``: score on a fixed random subset of the test set of that size (every k x every
    corruption x every severity is one pass over it); ``None``: the whole set.
    """
    corruptions: Tuple[str, ...] = ('all',)
    severities: Tuple[int, ...] = (1, 3, 5)
    seed: int = 0
    max_samples: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, 'corruptions', tuple(parse_corruptions(self.corruptions)))
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad or not self.severities:
            raise ValueError(f'corruption severities {list(self.severities)}: choose from {list(SEVERITIES)}')
        object.__setattr__(self, 'severities', tuple(int(s) for s in self.severities))
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or self.max_samples < 1):
            raise ValueError(f'corruption samples must be a positive int or None, got {self.max_samples!r}')

    def describe(self, num_images: int) -> str:
        return _describe(self.corruptions, self.severities, self.seed, num_images)

    def matches(self, rows: Sequence[Row], num_images: int) -> bool:
        """Whether ``rows`` (of :func:`evaluate_corruptions`) scored exactly this suite on ``num_images`` images."""
        scored = {(r['corruption'], int(r['severity'])) for r in rows if r['corruption'] != 'none'}
        wanted = {(c, s) for c in self.corruptions for s in self.severities}
        return (scored == wanted and all(int(r['num_samples']) == num_images for r in rows)
                and all(int(r.get('corruption_seed', -1)) == self.seed for r in rows))

    def score(self, model: UniversalModel, dataset: Any, ks: Sequence[int], **eval_kwargs: Any) -> List[Row]:
        """:func:`evaluate_corruptions` with the model's own normalisation, each row tagged with the seed."""
        data_config = resolve_data_config({}, model=model)
        rows = evaluate_corruptions(model, dataset, ks, self.corruptions, self.severities, mean=data_config['mean'],
                                    std=data_config['std'], seed=self.seed, **eval_kwargs)
        return [{**r, 'corruption_seed': self.seed} for r in rows]


def _describe(corruptions: Sequence[str], severities: Sequence[int], seed: Any, num_images: Any) -> str:
    return (f'{len(corruptions)} corruption(s) ({", ".join(corruptions)}) at severities {list(severities)}, '
            f'corruption seed {seed}, {num_images} test images')


def describe_scored(rows: Sequence[Row]) -> str:
    """What rows of :func:`evaluate_corruptions` were scored on, in :meth:`CorruptionSuite.describe`'s words."""
    corrupted = [r for r in rows if r['corruption'] != 'none']
    return _describe(list(dict.fromkeys(r['corruption'] for r in corrupted)),
                     sorted({int(r['severity']) for r in corrupted}), rows[0].get('corruption_seed', '?'),
                     rows[0]['num_samples'])


def evaluate_corruptions(model: UniversalModel, dataset: Any, ks: Sequence[int], corruptions: Sequence[str],
                         severities: Sequence[int], *, mean: Sequence[float], std: Sequence[float], seed: int = 0,
                         **eval_kwargs: Any) -> List[Row]:
    """Rows of :func:`evaluate_dataset` for the clean set (``corruption='none'``, severity 0) and every
    (corruption, severity), each with ``drop`` = clean top-1 minus its top-1 at the same k (p.p.)."""
    names = parse_corruptions(corruptions)
    clean = evaluate_dataset(model, dataset, ks, **eval_kwargs)
    clean_top1 = {r['k']: r['top1'] for r in clean}
    rows = [{**r, 'corruption': 'none', 'severity': 0, 'drop': 0.0} for r in clean]
    for name in names:
        for severity in severities:
            corrupted = CorruptedDataset(dataset, name, severity, mean=mean, std=std, seed=seed)
            for r in evaluate_dataset(model, corrupted, ks, **eval_kwargs):
                rows.append({**r, 'corruption': name, 'severity': severity, 'drop': clean_top1[r['k']] - r['top1']})
    return rows


def drop_table(rows: Sequence[Row]) -> List[Row]:
    """Per k: clean top-1, the mean drop per corruption over its severities, and the mean over all (p.p.)."""
    ks = sorted({int(r['k']) for r in rows})
    names = list(dict.fromkeys(r['corruption'] for r in rows if r['corruption'] != 'none'))
    table = []
    for k in ks:
        at_k = [r for r in rows if int(r['k']) == k]
        row: Row = {'k': k, 'gmacs': at_k[0].get('gmacs'),
                    'clean_top1': next(r['top1'] for r in at_k if r['corruption'] == 'none')}
        drops = []
        for name in names:
            values = [r['drop'] for r in at_k if r['corruption'] == name]
            row[name] = sum(values) / len(values)
            drops += values
        row['mean_drop'] = sum(drops) / len(drops) if drops else 0.0
        row['corrupted_top1'] = row['clean_top1'] - row['mean_drop']
        table.append(row)
    return table


def corrupted_accuracy(table: Sequence[Row]) -> List[Row]:
    """A :func:`drop_table` as accuracy rows (``k``, ``gmacs``, ``top1`` = top-1 averaged over the corrupted
    sets), the shape the Pareto plots and the over-seeds statistics take."""
    return [{'k': r['k'], 'gmacs': r['gmacs'], 'top1': r['corrupted_top1'], 'mean_drop': r['mean_drop']}
            for r in table]


def robustness_section(tables: Mapping[str, Sequence[Row]], context: str) -> List[str]:
    """Markdown lines: per method (the mapping's keys) and k, the drop per corruption and on average."""
    rows = [{'method': label, **r} for label, table in tables.items() for r in table]
    if len(tables) == 1:
        rows = [{c: v for c, v in r.items() if c != 'method'} for r in rows]
    return ['## Robustness per k', '', f'{context}. Cells: top-1 drop in p.p. (clean minus corrupted), mean over '
            'the severities; mean_drop over every corrupted set; corrupted_top1 = clean_top1 - mean_drop.', '',
            markdown_table(rows), '']
