"""``hydravit report``: eval and benchmark results of one or several runs -> Markdown table and Pareto plots."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, List

from ..cascade.study import curve_rows, read_cascade_results, static_rows
from ..evaluation.report import write_report
from ..storage.results import read_results, result_label

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('report', help='join eval and benchmark results into report.md and two Pareto plots',
                       description='Eval results (rows with top1) and benchmark results (rows with '
                                   'infer_samples_per_sec) that share a label are joined per k. Label: --labels, '
                                   'else the file stem without _eval/_benchmark, else the folder name '
                                   '(run1/eval.csv and run1/benchmark.csv are both "run1").')
    p.add_argument('results', nargs='+', help='results files (.csv/.json) from hydravit eval / benchmark / train, '
                                              'or a hydravit cascade results file (its cascade curve and the '
                                              'static k it was timed against)')
    p.add_argument('--labels', nargs='+', help='one label (method name) per results file')
    p.add_argument('-o', '--output', default='report', help='output folder (default: %(default)s)')
    p.add_argument('--title', default='HydraViT accuracy-cost report')
    return p


def load_labelled(files: List[str], labels: List[str] | None):
    """(eval rows by label, benchmark rows by label, cascade curves by label) from results files."""
    if labels and len(labels) != len(files):
        raise ValueError(f'--labels needs one label per results file: {len(labels)} labels, {len(files)} files')
    evals: Dict[str, list] = {}
    benches: Dict[str, list] = {}
    curves: Dict[str, list] = {}
    for i, name in enumerate(files):
        label = labels[i] if labels else result_label(name)
        cascade = read_cascade_results(name)
        if cascade is not None:
            evals.setdefault(label, []).extend(static_rows(cascade))
            curves[f'{label} cascade'] = curve_rows(cascade)
            continue
        rows = read_results(name)
        if rows and all('top1' in r for r in rows):
            evals.setdefault(label, []).extend(rows)
        elif rows and all('infer_samples_per_sec' in r for r in rows):
            benches.setdefault(label, []).extend(rows)
        elif rows and all('load_ms' in r for r in rows):
            continue  # a switching table: reported by the benchmark itself
        else:
            raise ValueError(f'{name}: neither eval results (top1 per k) nor benchmark results '
                             '(infer_samples_per_sec per k)')
    if not evals:
        raise ValueError('no eval results among the files: the report plots accuracy, give at least one')
    return evals, benches, curves


def run(args: argparse.Namespace) -> int:
    evals, benches, curves = load_labelled(args.results, args.labels)
    paths = write_report(evals, benches, Path(args.output), title=args.title, curves=curves)
    logger.info('report: ' + ', '.join(str(p) for p in paths.values()))
    return 0
