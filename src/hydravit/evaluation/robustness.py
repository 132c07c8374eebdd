"""Accuracy of every k under common corruptions, and how much of the clean accuracy each k loses."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ..data.corruptions import CorruptedDataset, parse_corruptions
from ..models.factory import UniversalModel
from .evaluate import evaluate_dataset

__all__ = ['evaluate_corruptions', 'drop_table']

Row = Dict[str, Any]


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
