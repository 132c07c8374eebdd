"""What a run reports: the per-epoch summary row, the final per-k results table, its plot and the report."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..evaluation.benchmark import benchmark_subnets, torch_threads
from ..evaluation.report import plot_accuracy, plot_per_k_curves, write_report
from ..models.costs import cost_row
from ..models.factory import UniversalModel
from ..storage.results import write_results
from ..storage.run_folder import RunFolder

__all__ = ['PerK', 'summary_row', 'metric_value', 'results_table', 'write_run_results', 'TRAIN_CURVES_FILE']

logger = logging.getLogger(__name__)
Row = Dict[str, Any]
PerK = Dict[str, List[Row]]  # evaluation rows per weights: '' the model, 'ema_' its EMA
TRAIN_CURVES_FILE = 'train_loss_per_k.png'  # every k's training loss per epoch, next to results.csv


def summary_row(epoch: int, train_loss: float, lr: float, rows: Optional[PerK],
                per_k_train: Optional[Mapping[str, Any]] = None, nonfinite_skipped: Optional[int] = None) -> Row:
    """One line of ``summary.csv``: timm's columns, ``train_loss_k<N>``/``train_top1_k<N>`` after
    ``train_loss``, ``lr``, ``nonfinite_skipped`` (steps the non-finite guard skipped; no train column
    counts them), then ``eval_top1_k<N>`` ... and their means."""
    row: Row = {'epoch': epoch, 'train_loss': train_loss, **(per_k_train or {}), 'lr': lr}
    if nonfinite_skipped is not None:
        row['nonfinite_skipped'] = nonfinite_skipped
    for prefix, per_k in (rows or {}).items():
        for r in per_k:
            for metric in ('top1', 'top5', 'loss'):
                row[f'{prefix}eval_{metric}_k{r["k"]}'] = r[metric]
        row[f'{prefix}eval_top1_mean'] = sum(r['top1'] for r in per_k) / len(per_k)
        row[f'{prefix}eval_top5_mean'] = sum(r['top5'] for r in per_k) / len(per_k)
    return row


def metric_value(row: Mapping[str, Any], metric: str, use_ema: bool) -> float:
    """The ``--eval-metric`` of a summary row (of the EMA weights when there are any)."""
    return float(row[f'{"ema_" if use_ema else ""}eval_{metric}'])


def results_table(model: UniversalModel, rows: PerK) -> List[Row]:
    """``results.csv``: per k its cost columns and accuracy (``ema_*`` columns with EMA)."""
    table = []
    for i, r in enumerate(rows['']):
        row = {**cost_row(model.config, r['k']), 'top1': r['top1'], 'top5': r['top5'], 'loss': r['loss'],
               'num_samples': r['num_samples']}
        if 'ema_' in rows:
            ema = rows['ema_'][i]
            row.update(ema_top1=ema['top1'], ema_top5=ema['top5'], ema_loss=ema['loss'])
        table.append(row)
    return table


def write_run_results(run: RunFolder, results: Sequence[Row], model: UniversalModel, *, label: str, title: str,
                      device: torch.device, report: bool, summary: Sequence[Row] = (),
                      bench_threads: Optional[int] = None) -> None:
    """``results.csv``, its accuracy-vs-GMACs plot, every k's training loss over the epochs of ``summary``
    and (``report``) the accuracy-cost report of the run, its speeds timed with ``bench_threads`` CPU threads
    (default: torch's current count)."""
    write_results(results, run.path, run.results.stem)
    if any(key.startswith('train_loss_k') for row in summary for key in row):
        curves = plot_per_k_curves(summary, run.path / TRAIN_CURVES_FILE, f'{title}: training loss per k')
        logger.info('training curves: %s', curves)
    series = {label: list(results)}
    if 'ema_top1' in results[0]:
        series[f'{label} (EMA)'] = [{**r, 'top1': r['ema_top1']} for r in results]
    plot_accuracy(series, 'gmacs', run.plot, f'{title}: top-1 vs GMACs')
    logger.info('results: %s, %s', run.results, run.plot)
    if report:
        # as `hydravit benchmark` times: interleaved rounds (every k in each), median, the spread as error bars
        with torch_threads(bench_threads):
            bench = benchmark_subnets(model, [r['k'] for r in results], modes=('sliced',), device=device,
                                      rounds=5, min_seconds=0.1, latency_iters=3, measure_memory=False,
                                      flop_count=False, interleave_ks=True)
        paths = write_report(series, {name: bench for name in series}, run.report, config=model.config,
                             title=title)
        logger.info('report: %s', ', '.join(str(p) for p in paths.values()))
