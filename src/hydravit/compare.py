"""The paper's comparison, reproducible: every nesting method trained alike, measured alike, on one plot.

Each method is trained by the same trainer with the same recipe, data order, epochs and seed; only its
nesting and update scheme differ (:mod:`hydravit.methods`). SortedNet draws as many sub-models per step
as the recipe's sampler trains, so both see the same number of forward passes. Every run folder is a
normal training run; an interrupted comparison resumes its unfinished run and skips finished ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .methods import METHODS, get_method
from .report import markdown_table, read_results, write_report, write_results
from .sampling import create_sampler
from .train import TrainConfig, train
from .train_state import STATE_FILE

__all__ = ['MethodRun', 'method_config', 'compare_methods', 'gaps_at_equal_cost', 'gaps_at_equal_k']

Row = Dict[str, float]
RESULTS_FILE = 'results.csv'


@dataclass
class MethodRun:
    method: str
    folder: Path
    results: List[Row]
    train_seconds: Optional[float]  # None when the run had finished before this comparison started
    benchmark: List[Row]


def subnets_per_step(cfg: TrainConfig, k_choices: Sequence[int]) -> int:
    """Forward passes per step of the recipe's sampler (SortedNet gets the same number)."""
    sampler = create_sampler(cfg.sampler, k_choices, weights=cfg.head_weights, num_random=cfg.num_random)
    return len(sampler.ks_for_step(0, 0))


def method_config(base: TrainConfig, method: str, out_dir: Path, k_choices: Sequence[int],
                  teacher_epochs: Optional[int] = None) -> TrainConfig:
    """``base`` with ``method``'s nesting and update scheme, written to ``out_dir/method``."""
    scheme = get_method(method).sampler
    sampler = scheme or base.sampler
    num_random = subnets_per_step(base, k_choices) if method == 'sortednet' else base.num_random
    folder = out_dir / method
    resume = str(folder) if (folder / STATE_FILE).is_file() else None
    return replace(base, method=method, sampler=sampler, num_random=num_random,
                   head_weights=base.head_weights if sampler == 'weighted' else None,
                   inplace_distill=base.inplace_distill and method not in ('dynabert', 'separate'),
                   separate_heads=base.separate_heads and method not in ('dynabert', 'separate'),
                   teacher_epochs=teacher_epochs if method == 'dynabert' else None,
                   output=str(out_dir), experiment=method, resume=resume, report=False)


def _train_or_reuse(cfg: TrainConfig, folder: Path) -> Tuple[List[Row], Optional[float]]:
    if (folder / RESULTS_FILE).is_file():
        print(f'{cfg.method}: finished earlier, reusing {folder / RESULTS_FILE}')
        return read_results(folder / RESULTS_FILE), None
    tic = time.perf_counter()
    result = train(cfg)
    return result.results, time.perf_counter() - tic


def _benchmark(folder: Path, ks: Sequence[int], batch_size: int, seconds: float, measure_memory: bool) -> List[Row]:
    """Speed of each extracted subnetwork (what is deployed), saved next to the run."""
    from .benchmark import benchmark_subnets
    from .checkpoint import load_model

    rows = benchmark_subnets(load_model(folder / 'last.safetensors'), ks, modes=('extracted',),
                             batch_size=batch_size, rounds=3, min_seconds=seconds, latency_iters=20,
                             measure_memory=measure_memory, flop_count=False)
    write_results(rows, folder, 'benchmark', verbose=False)
    return rows


def compare_methods(base: TrainConfig, methods: Sequence[str] = tuple(METHODS), out_dir: str | Path = 'output/compare',
                    *, separate_ks: Optional[Sequence[int]] = None, teacher_epochs: Optional[int] = None,
                    benchmark: bool = True,
                    bench_batch_size: int = 256, bench_seconds: float = 0.2,
                    measure_memory: bool = False) -> Dict[str, MethodRun]:
    """Train, evaluate and benchmark every method; write ``out_dir/report`` (table, plots, gaps).

    ``separate_ks`` trains separate ViTs for these k only (one ViT per k costs the most to train);
    ``teacher_epochs`` is DynaBERT's full-width phase (default: see ``TrainConfig.dynabert_teacher_epochs``).
    Throughput is timed over interleaved rounds of ``bench_seconds`` at ``bench_batch_size``.
    """
    from .registry import create_model

    for m in methods:
        get_method(m)
    out_dir = Path(out_dir)
    k_choices = list(base.heads or create_model(base.model).k_choices)
    runs: Dict[str, MethodRun] = {}
    for method in methods:
        cfg = method_config(base, method, out_dir, k_choices, teacher_epochs)
        if method == 'separate' and separate_ks:
            cfg = replace(cfg, heads=sorted(separate_ks))
        folder = out_dir / method
        results, seconds = _train_or_reuse(cfg, folder)
        bench = (_benchmark(folder, [r['k'] for r in results], bench_batch_size, bench_seconds, measure_memory)
                 if benchmark else [])
        runs[method] = MethodRun(method, folder, results, seconds, bench)
    _write_comparison(runs, out_dir, base)
    return runs


# ------------------------------------------------------------------------------------------ analysis
def gaps_at_equal_k(rows: Sequence[Row], reference: Sequence[Row]) -> List[Row]:
    """``top1 - reference top1`` at every k both have (methods with the same shapes per k)."""
    ref = {int(r['k']): r for r in reference}
    return [dict(k=int(r['k']), top1=r['top1'], reference_top1=ref[int(r['k'])]['top1'],
                 gap=r['top1'] - ref[int(r['k'])]['top1']) for r in rows if int(r['k']) in ref]


def gaps_at_equal_cost(rows: Sequence[Row], other: Sequence[Row], x: str = 'gmacs') -> List[Row]:
    """``rows``' accuracy, linearly interpolated at each of ``other``'s costs within its range, minus ``other``'s.

    Positive: ``rows``' method is more accurate at the same cost. Points outside ``rows``' cost range
    are skipped (no extrapolation).
    """
    xs, ys = zip(*sorted((float(r[x]), float(r['top1'])) for r in rows))
    out = []
    for r in sorted(other, key=lambda r: float(r[x])):
        cost = float(r[x])
        if xs[0] <= cost <= xs[-1]:
            interpolated = float(np.interp(cost, xs, ys))
            out.append({x: cost, 'k': int(r['k']), 'top1': float(r['top1']), 'reference_top1': interpolated,
                        'gap': interpolated - float(r['top1'])})
    return out


def _summary_lines(runs: Dict[str, MethodRun], reference: str = 'hydravit') -> List[str]:
    lines = []
    ref = runs.get(reference)
    if ref is None:
        return lines
    if 'separate' in runs:
        gaps = gaps_at_equal_k(runs['separate'].results, ref.results)
        lines += ['## Separately trained ViTs minus HydraViT at the same k (p.p.)', '',
                  markdown_table([{'k': g['k'], 'separate': g['top1'], 'HydraViT': g['reference_top1'],
                                   'gap': g['gap']} for g in gaps]), '']
    for method in ('sortednet', 'dynabert', 'matformer'):
        if method not in runs:
            continue
        x = 'gmacs'
        gaps = gaps_at_equal_cost(ref.results, runs[method].results, x)
        label = get_method(method).label
        if not gaps:
            lines += [f'{label}: no point within HydraViT\'s GMACs range.', '']
            continue
        values = [g['gap'] for g in gaps]
        lines += [f'## HydraViT minus {label} at equal GMACs (HydraViT interpolated; p.p.)', '',
                  f'ahead at {sum(v > 0 for v in values)} of {len(values)} points; mean {sum(values) / len(values):+.2f}, '
                  f'min {min(values):+.2f}, max {max(values):+.2f}', '',
                  markdown_table([{'k': g['k'], 'gmacs': g['gmacs'], label: g['top1'], 'HydraViT': g['reference_top1'],
                                   'gap': g['gap']} for g in gaps]), '']
    return lines


def _write_comparison(runs: Dict[str, MethodRun], out_dir: Path, base: TrainConfig) -> None:
    labels = {m: get_method(m).label for m in runs}
    evals = {labels[m]: run.results for m, run in runs.items()}
    benches = {labels[m]: run.benchmark for m, run in runs.items() if run.benchmark}
    timing = [{'method': labels[m], 'train_minutes': run.train_seconds / 60 if run.train_seconds else None,
               'k': ' '.join(str(r['k']) for r in run.results), 'folder': str(run.folder)} for m, run in runs.items()]
    extra = ['## Runs', '', f'recipe: {base.model} on {base.dataset}, {base.epochs} epochs, batch {base.batch_size}, '
             f'seed {base.seed}', '', markdown_table(timing), '', *_summary_lines(runs)]
    paths = write_report(evals, benches, out_dir / 'report', title='Nested-width methods compared',
                         extra_sections=extra)
    print('\n'.join(extra))
    print('report: ' + ', '.join(str(p) for p in paths.values()))
