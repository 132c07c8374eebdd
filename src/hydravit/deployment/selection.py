"""Pick the subnetwork to deploy: the most accurate k that meets a latency, throughput, GMACs or memory budget.

:func:`select_subnet` is pure (a table of per-k rows and a budget in, a :class:`Selection` out). The
table comes from a ``hydravit benchmark`` results file (:func:`benchmark_table`) or from measuring this
device now (:func:`measure_table`, which calls :func:`hydravit.evaluation.benchmark_subnets`).
(Named ``selection`` because a ``select`` module would shadow the standard library's.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..evaluation.benchmark import benchmark_subnets
from ..models.config import HydraViTConfig
from ..models.costs import cost_row
from ..models.factory import UniversalModel

__all__ = [
    'BUDGETS', 'Budget', 'Selection', 'NoSubnetworkFits', 'select_subnet', 'benchmark_table', 'analytic_table',
    'measure_table', 'merge_accuracy',
]

Row = Dict[str, Any]
# budget name -> (table column, 'max' if the column must stay <= the limit else 'min', unit)
BUDGETS = {
    'latency_ms': ('latency_ms', 'max', 'ms per batch'),
    'throughput': ('infer_samples_per_sec', 'min', 'images/s'),
    'gmacs': ('gmacs', 'max', 'GMACs per image'),
    'memory_mb': ('peak_mem_mb', 'max', 'MB peak'),
}


class NoSubnetworkFits(ValueError):
    """No subnetwork of the table meets the budget."""


@dataclass(frozen=True)
class Budget:
    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in BUDGETS:
            raise ValueError(f'unknown budget {self.metric!r}: choose one of {list(BUDGETS)}')
        if not self.limit > 0:
            raise ValueError(f'budget {self.metric} must be > 0, got {self.limit}')

    @property
    def column(self) -> str:
        return BUDGETS[self.metric][0]

    def fits(self, row: Mapping[str, Any]) -> bool:
        value = row.get(self.column)
        if value is None:
            raise ValueError(f'k={row.get("k")} has no {self.column!r} value: the table cannot answer a '
                             f'{self.metric} budget (measure it, or use a benchmark file that has it)')
        return value <= self.limit if BUDGETS[self.metric][1] == 'max' else value >= self.limit

    def __str__(self) -> str:
        op = '<=' if BUDGETS[self.metric][1] == 'max' else '>='
        return f'{self.column} {op} {self.limit:g} ({BUDGETS[self.metric][2]})'


@dataclass
class Selection:
    k: int
    row: Row
    budget: Budget
    ranked_by: str
    fitting: List[int] = field(default_factory=list)

    def describe(self) -> str:
        value = self.row[self.budget.column]
        acc = f', top1 {self.row[self.ranked_by]:.2f}' if self.ranked_by != 'k' else ''
        note = ('' if self.ranked_by != 'k' else
                '\n(no accuracy numbers: assuming accuracy grows with k, so the largest fitting k is chosen)')
        return (f'selected k={self.k}: {self.budget.column}={value:.4g}{acc}; budget {self.budget}; '
                f'fitting k: {self.fitting}{note}')


def select_subnet(table: Sequence[Row], budget: Budget, accuracy_key: str = 'top1') -> Selection:
    """The most accurate row of ``table`` that meets ``budget`` (largest k if accuracy is unknown).

    Accuracy ranks only when every fitting row has ``accuracy_key``; ties go to the smaller k (cheaper).
    """
    if not table:
        raise ValueError('empty table: no subnetworks to choose from')
    fitting = [r for r in table if budget.fits(r)]
    if not fitting:
        best_key = min if BUDGETS[budget.metric][1] == 'max' else max
        closest = best_key(table, key=lambda r: r[budget.column])
        raise NoSubnetworkFits(
            f'no subnetwork meets {budget}: the closest, k={closest["k"]}, has {budget.column}='
            f'{closest[budget.column]:.4g}')
    ranked_by = accuracy_key if all(r.get(accuracy_key) is not None for r in fitting) else 'k'
    best = max(fitting, key=lambda r: (r[ranked_by], -r['k']) if ranked_by != 'k' else r['k'])
    return Selection(k=int(best['k']), row=dict(best), budget=budget, ranked_by=ranked_by,
                     fitting=sorted(int(r['k']) for r in fitting))


# ------------------------------------------------------------------------------------------ tables
def _batch_latency_ms(row: Row, batch_size: int) -> Optional[float]:
    """Per-batch latency: the batch-1 median for B=1, else B / throughput at the benchmark's batch size."""
    if batch_size == 1:
        return row.get('infer_latency_ms')
    if row.get('infer_batch_size') == batch_size and row.get('infer_samples_per_sec'):
        return 1e3 * batch_size / row['infer_samples_per_sec']
    return None


def benchmark_table(rows: Sequence[Row], *, mode: str = 'sliced', batch_size: Optional[int] = None,
                    ks: Optional[Sequence[int]] = None) -> List[Row]:
    """Selection rows (one per k) from ``hydravit benchmark`` rows of one ``mode``.

    ``latency_ms`` is the batch-1 median latency when ``batch_size`` is 1 (the default), otherwise the
    time per batch derived from the throughput measured at that batch size (None if it was not).
    """
    modes = sorted({str(r.get('mode')) for r in rows})
    picked = [r for r in rows if r.get('mode', mode) == mode]
    if not picked:
        raise ValueError(f'benchmark has no rows for mode {mode!r} (modes present: {modes})')
    if batch_size is not None and batch_size != 1:
        sizes = sorted({int(r['infer_batch_size']) for r in picked if r.get('infer_batch_size') is not None})
        if batch_size not in sizes:
            raise ValueError(f'benchmark measured batch size {sizes}, not {batch_size}: re-run the benchmark '
                             f'with -b {batch_size} or measure live')
    batch_size = batch_size or 1
    table: List[Row] = []
    for r in picked:
        if ks is not None and int(r['k']) not in ks:
            continue
        table.append(dict(k=int(r['k']), latency_ms=_batch_latency_ms(r, batch_size), batch_size=batch_size,
                          infer_samples_per_sec=r.get('infer_samples_per_sec'), gmacs=r.get('gmacs'),
                          peak_mem_mb=r.get('peak_mem_mb'), param_count=r.get('param_count'), device=r.get('device')))
    if ks is not None and sorted(r['k'] for r in table) != sorted(set(ks)):
        missing = sorted(set(ks) - {r['k'] for r in table})
        raise ValueError(f'benchmark has no {mode!r} rows for k {missing}')
    return sorted(table, key=lambda r: r['k'])


def analytic_table(config: HydraViTConfig, ks: Optional[Sequence[int]] = None) -> List[Row]:
    """Rows with analytic GMACs and params only: enough for a GMACs budget, nothing timed."""
    ks = config.k_choices if ks is None else ks
    return [{key: cost_row(config, k)[key] for key in ('k', 'gmacs', 'param_count')} for k in ks]


def measure_table(model: UniversalModel, budget: Budget, *, batch_size: int = 1, device: str = 'cpu',
                  mode: str = 'sliced', ks: Optional[Sequence[int]] = None, quick: bool = True) -> List[Row]:
    """Measure this device now (``hydravit.evaluation.benchmark``) and return selection rows for ``budget``."""
    if budget.metric == 'gmacs':
        return analytic_table(model.config, ks)
    timing: Dict[str, Any] = dict(rounds=2, min_seconds=0.1, latency_iters=15, warmup=2) if quick else {}
    rows = benchmark_subnets(model, ks, modes=(mode,), batch_size=batch_size, device=device,
                             measure_memory=budget.metric == 'memory_mb', flop_count=False, **timing)
    return benchmark_table(rows, mode=mode, batch_size=batch_size)


def merge_accuracy(table: Sequence[Row], accuracy: Mapping[int, Mapping[str, Any]]) -> List[Row]:
    """``table`` rows with the accuracy columns of the same k added (rows without accuracy unchanged)."""
    return [{**r, **{key: v for key, v in accuracy.get(int(r['k']), {}).items() if key != 'results_file'}}
            for r in table]
