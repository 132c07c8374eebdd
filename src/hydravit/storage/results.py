"""Result tables as files and text: one row per k (or per k and mode) as CSV/JSON, aligned or Markdown tables.

Rows are plain dicts so eval, benchmark, training and export output mix freely. Files are written
atomically; numbers are rounded to 6 significant digits on the way out and parsed back on the way in.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .checkpoint import atomic_write
from .provenance import IDENTITY_COLUMNS

__all__ = ['Row', 'RESULT_FORMATS', 'COLUMN_UNITS', 'write_results', 'read_results', 'format_table', 'markdown_table',
           'result_label', 'results_format', 'table_columns', 'table_context', 'units_of']

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
Row = Dict[str, Any]
RESULT_FORMATS = ('csv', 'json')


# the unit of every table column that has one; every table a command prints or writes names them through
# table_context / units_of, so a reader never has to guess M vs units or GMACs vs MMACs
COLUMN_UNITS: Dict[str, str] = {
    'param_count': 'M parameters', 'gmacs': 'GMACs per image (analytic)', 'flop_gmacs': 'GMACs per image',
    'top1': '%', 'top5': '%', 'top1_err': '%', 'top5_err': '%', 'ema_top1': '%', 'ema_top5': '%', 'mean_top1': '%',
    'infer_samples_per_sec': 'images/s (median of interleaved rounds)', 'train_samples_per_sec': 'images/s',
    'infer_latency_ms': 'ms at batch 1', 'latency_ms': 'ms per batch', 'p50_ms': 'ms per batch',
    'p90_ms': 'ms per batch', 'peak_mem_mb': 'MB', 'infer_spread_pct': '% of the median',
    'met_target': 'share of batches within the target', 'mean_k': 'heads',
}


def units_of(columns: Sequence[str]) -> str:
    """``param_count in M parameters, gmacs in GMACs per image (analytic), ...`` for the columns that have a unit."""
    return ', '.join(f'{c} in {COLUMN_UNITS[c]}' for c in dict.fromkeys(columns) if c in COLUMN_UNITS)


def table_context(columns: Sequence[str], *settings: Optional[str]) -> str:
    """The line that goes with a table: the settings its numbers come from (benchmark mode, batch, threads,
    samples evaluated, ...; None entries are left out), then the unit of each of its ``columns``."""
    parts = [', '.join(s for s in settings if s), units_of(columns)]
    return '; '.join(p for p in parts if p)


def table_columns(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Union of the rows' keys in first-seen order (rows may differ, e.g. optional train throughput)."""
    seen: Dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _round(value: Any) -> Any:
    return float(f'{value:.6g}') if isinstance(value, float) and math.isfinite(value) else value


def _cell(value: Any) -> str:
    if value is None or value == '':
        return '-'
    if isinstance(value, float):
        return f'{value:.1f}' if abs(value) >= 1000 else f'{value:.2f}' if abs(value) >= 1 else f'{value:.4g}'
    return str(value)


def format_table(rows: Sequence[Row], columns: Optional[Sequence[str]] = None) -> str:
    """An aligned plain-text table (numbers right-aligned)."""
    columns = list(columns or table_columns(rows))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = [' '.join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [' '.join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return '\n'.join(lines)


def markdown_table(rows: Sequence[Row], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or table_columns(rows))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---:' for _ in columns) + '|']
    lines += ['| ' + ' | '.join(_cell(r.get(c)) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def write_results(rows: Sequence[Row], out_dir: PathLike, name: str = 'results', fmt: str = 'csv',
                  *, verbose: bool = True) -> Path:
    """Write ``rows`` to ``out_dir/name.{csv,json}`` atomically (and log them as an aligned table)."""
    if fmt not in RESULT_FORMATS:
        raise ValueError(f'results format must be one of {RESULT_FORMATS}, got {fmt!r}')
    if not rows:
        raise ValueError('no result rows to write')
    rows = [{k: _round(v) for k, v in r.items()} for r in rows]
    columns = table_columns(rows)
    if fmt == 'json':
        text = json.dumps(rows, indent=2) + '\n'
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    path = atomic_write(Path(out_dir) / f'{name}.{fmt}', lambda tmp: Path(tmp).write_text(text))
    if verbose:  # the provenance columns are for tools, not for reading
        logger.info('%s', format_table(rows, [c for c in columns if c not in IDENTITY_COLUMNS]))
    return path


def _parse(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return None if value == '' else value


def read_results(path: PathLike) -> List[Row]:
    """Rows of a results file written by :func:`write_results` (CSV numbers parsed back)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'results file {path} does not exist')
    if path.suffix == '.json':
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f'{path}: expected a JSON list of row objects')
        return data
    if path.suffix != '.csv':
        raise ValueError(f'{path}: results files are .csv or .json')
    with open(path, newline='') as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def result_label(path: PathLike) -> str:
    """Default label of a results file: its stem without an eval/benchmark suffix, else its folder name.

    ``run1/eval.csv`` and ``run1/benchmark.csv`` both get ``run1``, so they are joined in one series.
    """
    path = Path(path)
    stem = path.stem
    for suffix in ('eval', 'benchmark', 'bench', 'results'):
        for sep in ('_', '-', '.'):
            if stem.endswith(sep + suffix):
                return stem[:-len(suffix) - 1]
        if stem == suffix:
            return path.resolve().parent.name
    return stem


def results_format(path: PathLike, fmt: Optional[str] = None) -> str:
    """``fmt``, else the format named by ``path``'s suffix, else csv."""
    suffix = Path(path).suffix[1:]
    return fmt or (suffix if suffix in RESULT_FORMATS else 'csv')
