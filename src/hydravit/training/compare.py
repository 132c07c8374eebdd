"""The paper's comparison, reproducible: every nesting method trained alike, measured alike, on one plot.

Each method is trained by the same trainer with the same recipe, data order, epochs and seed; only its
nesting and update scheme differ (:mod:`hydravit.training.methods`; each method's ``compare_config``).
SortedNet draws as many sub-models per step as the recipe's sampler trains, so both see the same number of
forward passes. Every run folder is a normal training run; an interrupted comparison resumes its unfinished run
and skips finished ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

import numpy as np
import torch

from ..evaluation.benchmark import benchmark_subnets
from ..evaluation.evaluate import eval_dataset, load_for_eval
from ..evaluation.report import plot_accuracy, write_report
from ..evaluation.robustness import (
    CorruptionSuite,
    corrupted_accuracy,
    describe_scored,
    drop_table,
    robustness_section,
)
from ..evaluation.statistics import mean_interval, paired_interval
from ..models.factory import create_model
from ..models.kchoices import check_k_choices, is_int
from ..storage.checkpoint import load_model
from ..storage.provenance import file_sha256, with_identity
from ..storage.results import markdown_table, read_results, write_results
from ..storage.run_folder import RunFolder
from .config import TrainConfig
from .launch import default_threads_per_process
from .methods import CompareOptions, NestingMethod, default_methods, method_class
from .preflight import check_before_training
from .run_settings import describe_differences, settings_differences
from .trainer import train

__all__ = ['Run', 'run_config', 'method_config', 'train_runs', 'score_robustness', 'compare_methods',
           'write_comparison', 'gaps_at_equal_cost', 'gaps_at_equal_k', 'seed_statistics', 'paired_gaps',
           'write_seed_comparison']

logger = logging.getLogger(__name__)
Row = Dict[str, Any]


@dataclass
class Run:
    """One training run of a comparison: its settings and, once trained, its per-k results and speed."""
    label: str  # for tables and plot legends
    config: TrainConfig
    results: List[Row] = field(default_factory=list)
    train_seconds: Optional[float] = None  # None when it had finished before this comparison started
    benchmark: List[Row] = field(default_factory=list)
    robustness: List[Row] = field(default_factory=list)  # per k, corruption and severity (score_robustness)

    @property
    def folder(self) -> Path:
        return Path(self.config.output) / str(self.config.experiment)

    @property
    def method(self) -> Type[NestingMethod]:
        return method_class(self.config.method)


def run_config(cfg: TrainConfig, out_dir: Path, name: str) -> TrainConfig:
    """``cfg`` writing to ``out_dir/name``, resuming the run found there if it was interrupted.

    A run stopped before its first checkpoint left only ``args.yaml``: it starts again in that folder
    (the trainer would otherwise pick ``name-1``). Any other folder without a checkpoint is an error.
    """
    run = RunFolder(out_dir / name)
    resume = str(run.path) if run.is_resumable() else None
    if resume is None and run.path.is_dir() and not run.is_finished():
        leftovers = sorted(p.name for p in run.path.iterdir())
        if set(leftovers) - {run.args.name}:
            raise ValueError(f'{run.path} holds {leftovers} but no checkpoint ({run.state.name}) to resume from: '
                             'move it away to train this run again')
        run.args.unlink(missing_ok=True)
        run.path.rmdir()
    return replace(cfg, output=str(out_dir), experiment=name, resume=resume, report=False)


def method_config(base: TrainConfig, method: str, out_dir: Path, options: CompareOptions) -> TrainConfig:
    """``base`` with ``method``'s nesting and update scheme, written to ``out_dir/method``."""
    return run_config(method_class(method).compare_config(base, options), out_dir, method)


def _train_or_reuse(run: Run) -> None:
    folder = RunFolder(run.folder)
    if folder.is_finished():
        differences = settings_differences(folder.read_args(), run.config)
        if differences:
            raise ValueError(f'{folder.path} holds a finished {run.label} run trained with other settings '
                             f'({describe_differences(differences)}): move it away or give another output folder '
                             'to train it with the requested ones')
        logger.info('%s: finished earlier with the same settings, reusing %s', run.label, folder.results)
        run.results = read_results(folder.results)
        return
    tic = time.perf_counter()
    run.results = train(run.config).results
    run.train_seconds = time.perf_counter() - tic


def _benchmark(run: Run, batch_size: int, seconds: float, measure_memory: bool) -> None:
    """Speed of each extracted subnetwork (what is deployed), saved next to the run."""
    weights = RunFolder(run.folder).weights('last')
    model = load_model(weights)
    run.benchmark = with_identity(
        benchmark_subnets(model, [r['k'] for r in run.results], modes=('extracted',), batch_size=batch_size, rounds=3,
                          min_seconds=seconds, latency_iters=20, measure_memory=measure_memory, flop_count=False),
        model, weights)
    write_results(run.benchmark, run.folder, 'benchmark', verbose=False)


def score_robustness(run: Run, suite: CorruptionSuite, batch_size: int = 256) -> None:
    """Every k of a finished run on the suite's corrupted test sets, saved as ``robustness.csv`` in its folder
    and reused while the weights, the suite and the number of test images stay the same."""
    weights = RunFolder(run.folder).weights('last')
    model, ks = load_for_eval(weights)
    dataset = eval_dataset(model, run.config.dataset, run.config.data_dir, 'val',
                           max_samples=suite.max_samples or run.config.max_val_samples)
    saved = run.folder / 'robustness.csv'
    earlier = read_results(saved) if saved.is_file() else []
    if (earlier and suite.matches(earlier, len(dataset))
            and {r.get('checkpoint_sha256') for r in earlier} == {file_sha256(weights)}):
        logger.info('%s: robustness scored earlier on the same corrupted sets, reusing %s', run.label, saved)
        run.robustness = read_results(saved)
        return
    logger.info('%s: scoring every k on %s', run.label, suite.describe(len(dataset)))
    run.robustness = with_identity(suite.score(model, dataset, ks, batch_size=batch_size), model, weights)
    write_results(run.robustness, run.folder, 'robustness', verbose=False)


def train_runs(runs: Sequence[Run], *, benchmark: bool = True, bench_batch_size: int = 256,
               bench_seconds: float = 0.2, measure_memory: bool = False,
               corruptions: Optional[CorruptionSuite] = None) -> None:
    """Train (or reuse) each run in turn, then time its subnetworks and score them under ``corruptions``;
    fills the runs' results in place."""
    for i, run in enumerate(runs, start=1):
        logger.info('run %d of %d: %s -> %s', i, len(runs), run.label, run.folder)
        _train_or_reuse(run)
        if benchmark:
            _benchmark(run, bench_batch_size, bench_seconds, measure_memory)
        if corruptions is not None:
            score_robustness(run, corruptions, bench_batch_size)


def compare_methods(base: TrainConfig, methods: Optional[Sequence[str]] = None, out_dir: str | Path = 'output/compare',
                    *, separate_ks: Optional[Sequence[int]] = None, teacher_epochs: Optional[int] = None,
                    seeds: int = 1, **bench: Any) -> Dict[str, Run]:
    """Train, evaluate and benchmark every method; write ``out_dir/report`` (table, plots, gaps).

    ``separate_ks`` trains separate ViTs for these k only (one ViT per k costs the most to train);
    ``teacher_epochs`` is DynaBERT's full-width phase (default: see :meth:`DynaBERT.teacher_epochs`);
    ``seeds`` > 1 trains every method once per seed ``base.seed``, ``base.seed + 1``, ... into
    ``out_dir/seed<S>/<method>`` (all methods of a seed share its data order and init seed) and reports mean,
    std and 95 % t-intervals per k, and gaps paired by seed (:func:`write_seed_comparison`); the runs of the
    first seed are returned.
    ``bench`` goes to :func:`train_runs` (``benchmark``, ``bench_batch_size``, ``bench_seconds``, ``measure_memory``,
    ``corruptions``: a :class:`CorruptionSuite` that adds every method's robustness per k to the reports).
    """
    if not is_int(seeds) or seeds < 1:
        raise ValueError(f'--seeds must be a positive int, got {seeds!r}')
    classes = [method_class(m) for m in (default_methods() if methods is None else methods)]
    out_dir = Path(out_dir)
    config = create_model(base.model).config
    k_choices = list(base.heads or config.k_choices)
    if separate_ks:  # a bad k fails now, not after hours of training the other methods
        check_k_choices(separate_ks, config.num_heads, what='--separate-ks')
    options = CompareOptions(k_choices=k_choices, teacher_epochs=teacher_epochs, separate_ks=separate_ks)
    per_seed: Dict[int, Dict[str, Run]] = {}
    for seed in range(base.seed, base.seed + seeds):
        seed_dir = out_dir / f'seed{seed}' if seeds > 1 else out_dir
        seeded = replace(base, seed=seed)
        per_seed[seed] = {cls.name: Run(cls.label, method_config(seeded, cls.name, seed_dir, options))
                          for cls in classes}
    for runs in per_seed.values():  # every run's settings, before the first one trains
        for run in runs.values():
            check_before_training(run.config)
    for seed, runs in per_seed.items():
        seed_dir = out_dir / f'seed{seed}' if seeds > 1 else out_dir
        train_runs(list(runs.values()), **bench)
        baseline = next((run for run in runs.values() if run.method.is_baseline), None)
        title = 'Nested-width methods compared' + (f' (seed {seed})' if seeds > 1 else '')
        write_comparison(list(runs.values()), seed_dir, title=title, separate=baseline,
                         reference=runs.get('hydravit'))
    if seeds > 1:
        write_seed_comparison(per_seed, out_dir)
    return per_seed[base.seed]


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
    xs, ys = zip(*sorted((float(r[x]), float(r['top1'])) for r in rows), strict=True)
    out = []
    for r in sorted(other, key=lambda r: float(r[x])):
        cost = float(r[x])
        if xs[0] <= cost <= xs[-1]:
            interpolated = float(np.interp(cost, xs, ys))
            out.append({x: cost, 'k': int(r['k']), 'top1': float(r['top1']), 'reference_top1': interpolated,
                        'gap': interpolated - float(r['top1'])})
    return out


def _runs_table(runs: Sequence[Run]) -> List[str]:
    rows = [{'run': run.label, 'method': run.config.method, 'sampler': run.config.sampler,
             'train_minutes': run.train_seconds / 60 if run.train_seconds else None,
             'k': ' '.join(str(r['k']) for r in run.results), 'folder': str(run.folder)} for run in runs]
    c = runs[0].config
    return ['## Runs', '', f'{c.model} on {c.dataset}, {c.epochs} epochs, {_process_layout(c)}, seed {c.seed}, '
            f'{c.max_val_samples or "all"} validation samples (train_minutes: empty when the run '
            'was reused; benchmark: extracted subnetworks, median of 3 interleaved rounds)', '',
            markdown_table(rows), '']


def _process_layout(cfg: TrainConfig) -> str:
    """The batch and the threads of a run, per process where it ran several (the weights depend on both)."""
    procs = cfg.nproc_per_node
    if procs == 1:
        return f'batch {cfg.batch_size}, {cfg.threads or torch.get_num_threads()} threads'
    threads = cfg.threads or default_threads_per_process(procs)
    return f'batch {cfg.batch_size} x {procs} processes of {threads} thread(s)'


def _separate_gap_lines(runs: Sequence[Run], separate: Run) -> List[str]:
    """Separate ViTs' top-1 minus each HydraViT-shaped run's, at every k both trained."""
    shaped = [run for run in runs if run is not separate and run.method.nesting == 'hydravit']
    table = []
    for run in shaped:
        gaps = {g['k']: g['gap'] for g in gaps_at_equal_k(separate.results, run.results)}
        if gaps:
            table.append({'run': run.label, **{f'k{k}': v for k, v in gaps.items()},
                          'mean': sum(gaps.values()) / len(gaps), 'max': max(gaps.values())})
    if not table:
        return []
    return [f'## {separate.label} minus each run at the same k (p.p.; <= 0 means the gap is closed)', '',
            markdown_table(table), '']


def _equal_cost_lines(reference: Run, other: Run, x: str = 'gmacs') -> List[str]:
    gaps = gaps_at_equal_cost(reference.results, other.results, x)
    if not gaps:
        return [f"{other.label}: no point within {reference.label}'s {x} range.", '']
    values = [g['gap'] for g in gaps]
    return [f'## {reference.label} minus {other.label} at equal {x} ({reference.label} interpolated; p.p.)', '',
            f'ahead at {sum(v > 0 for v in values)} of {len(values)} points; mean {sum(values) / len(values):+.2f}, '
            f'min {min(values):+.2f}, max {max(values):+.2f}', '',
            markdown_table([{'k': g['k'], x: g[x], other.label: g['top1'], reference.label: g['reference_top1'],
                             'gap': g['gap']} for g in gaps]), '']


def _robustness_lines(runs: Sequence[Run], report_dir: Path) -> List[str]:
    """Every scored run's drop per k and corruption, and its top-1 under corruption plotted against GMACs."""
    tables = {run.label: drop_table(run.robustness) for run in runs}
    plot = plot_accuracy({label: corrupted_accuracy(table) for label, table in tables.items()}, 'gmacs',
                         report_dir / 'corrupted_accuracy_vs_gmacs.png', 'Top-1 under corruption vs GMACs')
    return [*robustness_section(tables, describe_scored(runs[0].robustness)), f'![{plot.stem}]({plot.name})', '']


def write_comparison(runs: Sequence[Run], out_dir: str | Path, *, title: str, separate: Optional[Run] = None,
                     reference: Optional[Run] = None) -> Dict[str, Path]:
    """``out_dir/report``: the joined table, both Pareto plots, the runs, the gaps and, for runs scored
    under corruptions, their robustness per k.

    Gaps: ``separate`` minus every HydraViT-shaped run at equal k; ``reference`` minus every other run
    (except ``separate``) at equal GMACs.
    """
    extra = _runs_table(runs)
    if separate is not None:
        extra += _separate_gap_lines(runs, separate)
    for run in runs:
        if reference is not None and run not in (reference, separate):
            extra += _equal_cost_lines(reference, run)
    scored = [run for run in runs if run.robustness]
    if scored:
        extra += _robustness_lines(scored, Path(out_dir) / 'report')
    paths = write_report({run.label: run.results for run in runs},
                         {run.label: run.benchmark for run in runs if run.benchmark},
                         Path(out_dir) / 'report', title=title, extra_sections=extra)
    logger.info('%s', '\n'.join(extra))
    logger.info('report: %s', ', '.join(str(p) for p in paths.values()))
    return paths


# ------------------------------------------------------------------------------------------ over seeds
def seed_statistics(results_per_seed: Sequence[Sequence[Row]], metric: str = 'top1') -> List[Row]:
    """Per k (those every seed has): the cost columns of the first seed and ``metric`` as mean, std, 95 % interval.

    ``top1`` (the mean) and ``top1_ci`` (the interval's half width) are what the Pareto plots draw.
    """
    by_seed = [{int(r['k']): r for r in rows} for rows in results_per_seed]
    common = sorted(set.intersection(*(set(rows) for rows in by_seed)))
    out: List[Row] = []
    for k in common:
        interval = mean_interval([float(rows[k][metric]) for rows in by_seed])
        first = by_seed[0][k]
        costs: Row = {c: first[c] for c in ('embed_dim', 'num_heads', 'mlp_hidden', 'param_count', 'gmacs')
                      if c in first}
        row: Row = {'k': k, **costs, metric: interval.mean, f'{metric}_ci': interval.half_width}
        out.append({**row, **interval.columns(metric)})
    return out


def paired_gaps(reference_per_seed: Sequence[Sequence[Row]], other_per_seed: Sequence[Sequence[Row]],
                equal: str = 'gmacs') -> List[Row]:
    """``reference`` minus ``other`` per seed (at ``other``'s k: equal ``'k'``, or interpolated at equal
    ``'gmacs'``), and per point the mean, std and 95 % t-interval of those paired differences."""
    per_point: Dict[int, List[Row]] = {}
    for ref, other in zip(reference_per_seed, other_per_seed, strict=True):
        gaps = gaps_at_equal_k(other, ref) if equal == 'k' else gaps_at_equal_cost(ref, other, equal)
        for g in gaps:
            per_point.setdefault(int(g['k']), []).append(g)
    out = []
    for k, gaps in sorted(per_point.items()):
        if len(gaps) != len(reference_per_seed):
            continue  # a point outside the reference's range for some seed: no pairing
        interval = paired_interval([g['reference_top1'] for g in gaps], [g['top1'] for g in gaps])
        row: Row = {'k': k}
        if equal != 'k':
            row[equal] = gaps[0][equal]
        out.append({**row, **interval.columns('gap'), 'excludes_zero': interval.excludes_zero(),
                    'seeds_to_exclude_zero': interval.seeds_to_exclude_zero()})
    return out


def _seeds_needed(gap: Row) -> str:
    """How many seeds a gap still within the noise would need to leave it, were its mean and std to hold."""
    if gap['excludes_zero'] or gap['gap_n'] < 2:
        return ''
    needed = gap['seeds_to_exclude_zero']
    return '> 1000' if needed is None else str(needed)


def _interval_cell(row: Row, name: str) -> str:
    if row[f'{name}_n'] < 2:
        return f"{row[f'{name}_mean']:.2f}"
    return (f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std']:.2f} "
            f"[{row[f'{name}_ci_low']:.2f}, {row[f'{name}_ci_high']:.2f}]")


def _interval_table(stats: Mapping[str, Sequence[Row]], label: Mapping[str, str], metric: str = 'top1') -> str:
    """One row per method, one column per k: ``metric``'s mean ± std [95 % interval] over the seeds."""
    ks = sorted({r['k'] for rows in stats.values() for r in rows})
    table = []
    for name, rows in stats.items():
        by_k = {r['k']: r for r in rows}
        table.append({'method': label[name], **{f'k{k}': _interval_cell(by_k[k], metric) if k in by_k else '-'
                                                for k in ks}})
    return markdown_table(table)


def _paired_gap_lines(results: Mapping[str, Sequence[Sequence[Row]]], runs: Mapping[str, Run],
                      what: str = '') -> List[str]:
    """Separate ViTs minus every run of HydraViT's shapes at equal k, HydraViT minus every other run at equal
    GMACs (interpolated): per point the gap's mean ± std [95 % interval] over the seeds, paired by seed."""
    label = {name: run.label for name, run in runs.items()}
    baseline = next((n for n, run in runs.items() if run.method.is_baseline), None)
    lines: List[str] = []
    for ref, equal in ((baseline, 'k'), ('hydravit', 'gmacs')):
        if ref is None or ref not in results:
            continue
        gap_rows = []
        for name in results:
            if name == ref or (equal == 'gmacs' and name == baseline):
                continue
            if equal == 'k' and runs[name].method.nesting not in ('hydravit', 'width'):
                continue  # equal k is equal shape only for HydraViT's widths
            for g in paired_gaps(results[ref], results[name], equal):
                gap_rows.append({'run': label[name], 'k': g['k'], **({equal: g[equal]} if equal != 'k' else {}),
                                 'gap (p.p.)': _interval_cell(g, 'gap'),
                                 'beyond the noise': 'yes' if g['excludes_zero'] else 'no',
                                 'seeds it would need': _seeds_needed(g)})
        if gap_rows:
            at = 'at equal k' if equal == 'k' else f'at equal {equal} ({label[ref]} interpolated)'
            lines += [f'## {label[ref]} minus each run {at}{what}, paired by seed (p.p.)', '',
                      markdown_table(gap_rows), '',
                      'seeds it would need: the fewest seeds whose 95 % interval would exclude 0 if the mean and '
                      'std of the gap stayed as measured (a planning figure, not a power analysis).', '']
    return lines


def _seed_robustness_lines(per_seed: Mapping[int, Mapping[str, Run]], report_dir: Path) -> List[str]:
    """Top-1 under corruption and the mean drop per method and k over the seeds, the paired gaps of the
    former, and its Pareto plot with error bars; nothing unless every run was scored."""
    seeds = sorted(per_seed)
    runs = per_seed[seeds[0]]
    if not all(run.robustness for by_name in per_seed.values() for run in by_name.values()):
        return []
    corrupted = {name: [corrupted_accuracy(drop_table(per_seed[s][name].robustness)) for s in seeds]
                 for name in runs}
    label = {name: run.label for name, run in runs.items()}
    accuracy = {name: seed_statistics(rows) for name, rows in corrupted.items()}
    drop = {name: seed_statistics(rows, 'mean_drop') for name, rows in corrupted.items()}
    plot = plot_accuracy({label[n]: rows for n, rows in accuracy.items()}, 'gmacs',
                         report_dir / 'corrupted_accuracy_vs_gmacs.png', 'Top-1 under corruption vs GMACs',
                         error_bars='top1_ci')
    return ['## Robustness over seeds', '', f'{describe_scored(next(iter(runs.values())).robustness)}. Cells: mean ± '
            'sample std [95 % t-interval] over the seeds.', '', 'Top-1 (%) averaged over the corrupted sets:', '',
            _interval_table(accuracy, label), '', 'Mean drop (p.p., clean minus corrupted top-1):', '',
            _interval_table(drop, label, 'mean_drop'), '', f'![{plot.stem}]({plot.name})', '',
            *_paired_gap_lines(corrupted, runs, ' under corruption')]


def write_seed_comparison(per_seed: Mapping[int, Mapping[str, Run]], out_dir: str | Path, *,
                          title: str = 'Nested-width methods compared') -> Dict[str, Path]:
    """``out_dir/report``: per method and k the mean ± std [95 % t-interval] of top-1 over the seeds, Pareto
    plots with those intervals as error bars, every gap paired by seed with its interval and, where every run
    was scored under corruptions, the same for top-1 under corruption.

    Gaps: separate ViTs minus every run at equal k (where its k are HydraViT's shapes), HydraViT minus every
    other run at equal GMACs (HydraViT interpolated).
    """
    seeds = sorted(per_seed)
    runs = per_seed[seeds[0]]
    results = {name: [per_seed[s][name].results for s in seeds] for name in runs}
    label = {name: run.label for name, run in runs.items()}
    stats = {name: seed_statistics(rows) for name, rows in results.items()}
    first = next(iter(runs.values())).config
    out_dir = Path(out_dir)
    lines = ['## Over seeds', '',
             f'{first.model} on {first.dataset}, {first.epochs} epochs, {len(seeds)} seeds '
             f'({", ".join(map(str, seeds))}; '
             'every method of a seed has the same data order and init seed). Cells: mean ± sample std [95 % '
             't-interval] of top-1 (%).', '', _interval_table(stats, label), '',
             *_paired_gap_lines(results, runs), *_seed_robustness_lines(per_seed, out_dir / 'report')]
    flat = [{'method': label[name], **r} for name in runs for r in stats[name]]
    write_results(flat, out_dir / 'report', 'seeds', verbose=False)
    paths = write_report({label[name]: stats[name] for name in runs}, None, out_dir / 'report',
                         title=f'{title} over {len(seeds)} seeds', extra_sections=lines,
                         error_bars='top1_ci')
    logger.info('%s', '\n'.join(lines))
    return paths
