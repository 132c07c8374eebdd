"""The over-seeds report of ``hydravit compare --seeds N`` from finished run folders trained separately.

Runs trained by different commands (the main job per seed, one ``compare --methods separate`` per seed, ...) are
put together as if one comparison had trained them: per method and k the mean, std and 95 % t-interval of
top-1, and every gap paired by seed (``hydravit.training.compare.write_seed_comparison``). Each folder's
``args.yaml`` must name the method and seed it is given for. ``METHOD/VARIANT`` puts two recipes of one method
side by side (e.g. ``hydravit/lr3e-3``); each variant is paired by seed with ``hydravit`` and the separate ViTs.

    python benchmarks/seed_report.py -o output/seeds \\
        --run hydravit:42=/work/runs/main --run separate:42=output/separate42/separate ...
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict

from hydravit.storage.results import read_results
from hydravit.storage.run_folder import RunFolder
from hydravit.training import load_train_config
from hydravit.training.compare import Run, write_seed_comparison
from hydravit.training.methods import method_class


def parse_run(spec: str) -> tuple[str, int, Path]:
    """``METHOD[/VARIANT]:SEED=FOLDER`` -> (name, seed, folder); a variant tells two runs of one method apart."""
    key, sep, folder = spec.partition('=')
    name, colon, seed = key.partition(':')
    if not (sep and colon and folder and seed.lstrip('-').isdigit()):
        raise SystemExit(f'--run {spec!r}: expected METHOD[/VARIANT]:SEED=FOLDER, e.g. hydravit:42=/work/runs/main '
                         'or hydravit/lr3e-3:42=/work/runs/lr')
    return name, int(seed), Path(folder)


def load_run(name: str, seed: int, folder: Path) -> Run:
    method, _, variant = name.partition('/')
    run = RunFolder(folder)
    if not run.is_finished():
        raise SystemExit(f'{folder}: not a finished run (no {run.results.name})')
    config = load_train_config(run.args)
    if config.method != method or config.seed != seed:
        raise SystemExit(f'{folder}: its args.yaml says method {config.method!r}, seed {config.seed}; '
                         f'given as {method}:{seed}')
    label = method_class(method).label + (f' ({variant})' if variant else '')
    return Run(label, config, results=read_results(run.results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--run', action='append', required=True, metavar='METHOD:SEED=FOLDER')
    p.add_argument('-o', '--output', required=True, help='the report goes to OUTPUT/report')
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    per_seed: Dict[int, Dict[str, Run]] = {}
    for method, seed, folder in map(parse_run, args.run):
        per_seed.setdefault(seed, {})[method] = load_run(method, seed, folder)
    methods = [sorted(runs) for runs in per_seed.values()]
    if any(m != methods[0] for m in methods):
        raise SystemExit(f'every seed needs the same methods, got {dict(zip(per_seed, methods, strict=True))}')
    for name, path in write_seed_comparison(per_seed, args.output).items():
        logging.info('%s: %s', name, path)


if __name__ == '__main__':
    main()
