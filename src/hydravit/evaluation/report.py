"""The accuracy-cost report of one or several runs: eval and benchmark rows joined per k, and Pareto plots.

Plots use matplotlib's Agg canvas directly: no pyplot global state, no display needed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ..models.config import HydraViTConfig
from ..models.costs import add_costs
from ..storage.checkpoint import atomic_write
from ..storage.results import Row, format_table, markdown_table, units_of, write_results

__all__ = ['bench_conditions', 'plot_accuracy', 'plot_per_k_curves', 'join_results', 'write_report', 'PLOT_AXES']

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
PLOT_AXES = {
    'gmacs': 'GMACs per image (analytic)',
    'infer_samples_per_sec': 'inference throughput (images/s)',
    'param_count': 'parameters (M)',
    'infer_latency_ms': 'latency at batch 1 (ms)',
}
REPORT_COLUMNS = ('method', 'k', 'top1', 'top5', 'loss', 'param_count', 'gmacs', 'infer_samples_per_sec',
                  'infer_latency_ms', 'peak_mem_mb')


def join_results(eval_rows: Sequence[Row], bench_rows: Sequence[Row] = (), bench_mode: str = 'sliced') -> List[Row]:
    """Eval rows with the throughput, latency and memory of the same k from a benchmark (one mode)."""
    modes = [r.get('mode') for r in bench_rows]
    mode = modes[0] if bench_rows and bench_mode not in modes else bench_mode
    by_k = {int(r['k']): r for r in bench_rows if r.get('mode', mode) == mode}
    joined = []
    for row in eval_rows:
        bench = by_k.get(int(row['k']), {})
        extra: Row = {c: bench[c] for c in ('param_count', 'gmacs') if c in bench and c not in row}
        extra.update({c: bench[c] for c in ('infer_samples_per_sec', 'infer_samples_per_sec_min',
                                            'infer_samples_per_sec_max', 'infer_latency_ms', 'peak_mem_mb')
                      if c in bench})
        joined.append({**row, **extra})
    return joined


def bench_conditions(bench_rows: Iterable[Row]) -> str:
    """``'on cpu, in mode sliced, at batch 256 (latency: batch 1), with 2 thread(s)'``: what a benchmark's
    speeds depend on, so a report's throughput is never compared with one taken under other conditions."""
    rows = list(bench_rows)
    on_cpu = all(str(r.get('device', 'cpu')).startswith('cpu') for r in rows)
    phrases = {'device': 'on {}', 'mode': 'in mode {}', 'infer_batch_size': 'at batch {} (latency: batch 1)',
               'threads': 'with {} thread(s)' if on_cpu else None}
    parts = []
    for key, phrase in phrases.items():
        values = '/'.join(str(v) for v in dict.fromkeys(r[key] for r in rows if r.get(key) is not None))
        if values and phrase:
            parts.append(phrase.format(values))
    return ', '.join(parts)


def _spread(rows: Sequence[Row], x: str, xs: Sequence[float]) -> Optional[List[List[float]]]:
    """[below, above] distances of ``x``'s ``_min``/``_max`` from each point, when every row has them."""
    by_x = {}
    for r in rows:
        lo, hi = r.get(f'{x}_min'), r.get(f'{x}_max')
        if r.get(x) is None or lo in (None, '') or hi in (None, ''):
            return None
        by_x[float(r[x])] = (float(lo), float(hi))
    if not by_x:
        return None
    return [[v - by_x[v][0] for v in xs], [by_x[v][1] - v for v in xs]]


def plot_accuracy(series: Mapping[str, Sequence[Row]], x: str, path: PathLike, title: Optional[str] = None,
                  *, y: str = 'top1', curves: Optional[Mapping[str, Sequence[Row]]] = None,
                  error_bars: Optional[str] = None) -> Path:
    """Accuracy against cost, one line per method and each point labelled with its k; a PNG file.

    ``x`` is ``'gmacs'`` or ``'infer_samples_per_sec'`` (or ``param_count``/``infer_latency_ms``). ``curves``
    are further lines whose points have no k (e.g. an early-exit cascade's threshold sweep); a point with a
    ``label`` is annotated with it. ``error_bars`` names a column of half widths (e.g. a 95 % interval over
    seeds) drawn around ``y``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in PLOT_AXES:
        raise ValueError(f'x must be one of {list(PLOT_AXES)}, got {x!r}')
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for label, rows in series.items():
        points = sorted((float(r[x]), float(r[y]), int(r['k']), float(r.get(error_bars) or 0.0) if error_bars else 0.0)
                        for r in rows if r.get(x) is not None and r.get(y) is not None)
        if not points:
            continue
        xs, ys, ks, errs = zip(*points, strict=True)
        spread = _spread(rows, x, xs)
        if spread is not None or error_bars:
            # x: the range of the timed rounds (how far each point could move on this machine); y: across seeds
            ax.errorbar(xs, ys, xerr=spread, yerr=errs if error_bars else None, marker='o', capsize=3,
                        label=f'{label} (bars: range of timed rounds)' if spread is not None else label)
        else:
            ax.plot(xs, ys, marker='o', label=label)
        for px, py, k, _ in points:
            ax.annotate(f'k={k}', (px, py), textcoords='offset points', xytext=(4, -10), fontsize=7)
        plotted += 1
    for label, rows in (curves or {}).items():
        curve = sorted((float(r[x]), float(r[y]), str(r.get('label') or '')) for r in rows
                       if r.get(x) is not None and r.get(y) is not None)
        if not curve:
            continue
        xs, ys, names = zip(*curve, strict=True)
        ax.plot(xs, ys, marker='s', linestyle='--', label=label)
        for px, py, name in curve:
            if name:
                ax.annotate(name, (px, py), textcoords='offset points', xytext=(4, 4), fontsize=7)
        plotted += 1
    if not plotted:
        raise ValueError(f'no rows with both {x!r} and {y!r}: nothing to plot')
    ax.set_xlabel(PLOT_AXES[x])
    ax.set_ylabel(f'{y} accuracy (%)' if y.startswith('top') else y)
    ax.set_title(title or f'{y} vs {PLOT_AXES[x].split(" (")[0]}')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='best')  # accuracy rises with cost but falls with throughput
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))


def plot_per_k_curves(summary: Sequence[Row], path: PathLike, title: Optional[str] = None, *,
                      metric: str = 'train_loss') -> Path:
    """``metric_k<N>`` columns of ``summary.csv`` rows against the epoch, one line per k; a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prefix = f'{metric}_k'
    ks = sorted({int(key[len(prefix):]) for row in summary for key in row
                 if key.startswith(prefix) and key[len(prefix):].isdigit()})
    if not ks:
        raise ValueError(f'no {prefix}<N> columns in the summary rows: nothing to plot')
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k in ks:
        points = [(int(r['epoch']) + 1, float(r[f'{prefix}{k}'])) for r in summary
                  if r.get(f'{prefix}{k}') not in (None, '')]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker='o', label=f'k={k}')
    ax.set_xlabel('epoch')
    ax.set_ylabel(metric.replace('_', ' '))
    ax.set_title(title or f'{metric} per k')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='best', fontsize=7, ncol=2)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))


def write_report(eval_rows_by_label: Mapping[str, Sequence[Row]],
                 bench_rows_by_label: Optional[Mapping[str, Sequence[Row]]] = None,
                 out_dir: PathLike = '.', *, config: Optional[HydraViTConfig] = None,
                 title: str = 'HydraViT accuracy-cost report',
                 extra_sections: Sequence[str] = (),
                 curves: Optional[Mapping[str, Sequence[Row]]] = None,
                 error_bars: Optional[str] = None) -> Dict[str, Path]:
    """Markdown table, joined CSV and the two Pareto plots of one or several methods.

    ``curves`` (label -> rows with ``top1``, ``gmacs``, optionally ``infer_samples_per_sec``, no k) are drawn
    on both plots beside the per-k lines and listed in a table of their own, e.g. an early-exit cascade's sweep.

    ``config`` (a :class:`HydraViTConfig`) fills ``param_count``/``gmacs`` for rows that lack them
    (e.g. the trainer's per-epoch rows). The throughput plot is written when a benchmark is given.
    ``extra_sections`` (Markdown lines) follow the plots in ``report.md``; ``error_bars`` (a column of half
    widths, e.g. ``top1_ci``) draws error bars on the plots.
    Returns ``{'markdown', 'csv', 'plot_gmacs'[, 'plot_throughput']}`` -> paths.
    """
    if not eval_rows_by_label:
        raise ValueError('no evaluation results to report')
    bench_rows_by_label = bench_rows_by_label or {}
    unknown = sorted(set(bench_rows_by_label) - set(eval_rows_by_label))
    if unknown and len(eval_rows_by_label) == 1 and len(bench_rows_by_label) == 1:
        bench_rows_by_label = {next(iter(eval_rows_by_label)): next(iter(bench_rows_by_label.values()))}
    elif unknown:
        raise ValueError(f'benchmark labels {unknown} match no evaluation label {sorted(eval_rows_by_label)}')
    series = {}
    for label, rows in eval_rows_by_label.items():
        rows = join_results(rows, bench_rows_by_label.get(label, ()))
        if config is not None:
            rows = [r if 'gmacs' in r else add_costs([r], config)[0] for r in rows]
        series[label] = sorted(rows, key=lambda r: int(r['k']))
    out_dir = Path(out_dir)
    table = [{'method': label, **r} for label, rows in series.items() for r in rows]
    columns = [c for c in REPORT_COLUMNS if any(r.get(c) is not None for r in table)]
    curves = {label: list(rows) for label, rows in (curves or {}).items() if rows}
    paths = {'csv': write_results(table, out_dir, 'report', 'csv', verbose=False)}
    if any('gmacs' in r for r in table):
        paths['plot_gmacs'] = plot_accuracy(series, 'gmacs', out_dir / 'accuracy_vs_gmacs.png',
                                            'Top-1 accuracy vs GMACs', curves=curves, error_bars=error_bars)
    if any('infer_samples_per_sec' in r for r in table):
        paths['plot_throughput'] = plot_accuracy(series, 'infer_samples_per_sec',
                                                 out_dir / 'accuracy_vs_throughput.png',
                                                 'Top-1 accuracy vs inference throughput', curves=curves,
                                                 error_bars=error_bars)
    units = f'Units: {units_of(columns)}.'
    text = [f'# {title}', '', markdown_table(table, columns), '', units, '']
    measured = bench_conditions(row for rows in bench_rows_by_label.values() for row in rows)
    text += [f'Speed measured {measured}.', ''] if measured else []
    if curves:
        curve_table = [{'curve': label, **r} for label, rows in curves.items() for r in rows]
        curve_columns = [c for c in ('curve', 'label', 'stages', 'top1', 'gmacs', 'infer_samples_per_sec',
                                     'infer_latency_ms') if any(r.get(c) is not None for r in curve_table)]
        text += [markdown_table(curve_table, curve_columns), '']
    text += [f'![{p.stem}]({p.name})' for key, p in paths.items() if key.startswith('plot')]
    text += ['', *extra_sections] if extra_sections else []
    paths['markdown'] = atomic_write(out_dir / 'report.md', lambda tmp: Path(tmp).write_text('\n'.join(text) + '\n'))
    logger.info('%s', format_table(table, columns))
    return paths
