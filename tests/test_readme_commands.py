"""Every command of README.md's bash blocks runs as written, on tiny settings, so the README cannot drift.

Each command is parsed from the README, run in a scratch folder where ``output/train/<run>`` (and ``run/``) is a
tiny trained run, with the tiny flags of its subcommand appended (argparse keeps the last value of a flag, so they
shrink the run without changing what the command does). A command that needs data or hardware this machine lacks
is skipped with its reason. A new subcommand in the README fails the test until it has an entry in TINY_FLAGS (or
a reason in SKIPPED_SUBCOMMANDS): that is the one place to extend.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from hydravit.cli import main
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

from helpers import FMNIST, needs_fmnist

README = Path(__file__).resolve().parents[1] / 'README.md'
ONE_THREAD = ['--threads', '1']
# appended to a README command of that subcommand; small data, few timing rounds, one thread
TINY_FLAGS = {
    'train': ['--max-train-samples', '256', '--max-val-samples', '64', '--epochs', '2', '--warmup-epochs', '0',
              '--no-report', '--heads', '3', '6', '12', *ONE_THREAD],
    'compare': ['--max-train-samples', '128', '--max-val-samples', '32', '--epochs', '2', '--warmup-epochs', '0',
                '--heads', '3', '6', '12', '--no-benchmark', *ONE_THREAD],
    'eval': ['--max-val-samples', '64', '-b', '64', *ONE_THREAD],
    'benchmark': ['-b', '8', '--rounds', '1', '--min-seconds', '0.01', '--latency-iters', '2', '--no-memory',
                  '--switch-repeats', '2', '--k', '3', '12', *ONE_THREAD],
    'export': [*ONE_THREAD],
    'select': [*ONE_THREAD],
    'serve-demo': ['-b', '4', '--batches', '2', '--busy', '1', *ONE_THREAD],
    'predict': [*ONE_THREAD],
    'report': [],
    'info': [],
    'cascade': ['--max-val-samples', '256', '--no-timing', '-b', '64', *ONE_THREAD],
}
# a README flag that the tiny --epochs or --heads would refuse -> what replaces its value after them
TINY_PHASES = {'--full-width-epochs': ['--full-width-epochs', '1'], '--head-weights': ['--head-weights', '1', '2', '1'],
               '--loss-weights': ['--loss-weights', '1', '2', '1']}
# a resumed run takes its settings from its args.yaml: nothing is appended
NO_TINY_FLAGS_WITH = ('--resume',)
# an exit status 2 that is a correct answer, not a failure: the message it must come with
EXPECTED_REFUSALS = {'select': 'no subnetwork meets'}  # a latency budget a loaded test machine may not meet
# subcommand -> why its README commands cannot run here as one-shot commands
SKIPPED_SUBCOMMANDS: dict = {
    'serve': 'a long-running server: test_serve.py starts real servers on loopback ports and stops them',
    'loadtest': 'needs a running server: test_serve.py runs the load test against one',
}
SCRATCH_PATHS = ('/tmp/',)  # absolute output paths in the README, moved into the scratch folder


def _readme_commands(text: str) -> List[str]:
    """The commands of every ```bash block: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        joined = re.sub(r'\\\n\s*', ' ', block)
        for line in joined.splitlines():
            tokens = shlex.split(line, comments=True)
            if not tokens:
                continue
            # a chain (a && b) is one command per part
            part: List[str] = []
            for tok in tokens + ['&&']:
                if tok == '&&':
                    if part:
                        commands.append(shlex.join(part))
                    part = []
                else:
                    part.append(tok)
    return commands


def _hydravit_argv(tokens: List[str]) -> Optional[List[str]]:
    """The argv of ``hydravit ...``, ``.venv/bin/hydravit ...`` or ``python -m hydravit ...``; else None."""
    if tokens[0].endswith('hydravit'):
        return tokens[1:]
    if tokens[0].endswith('python') and tokens[1:3] == ['-m', 'hydravit']:
        return tokens[3:]
    return None


def _skip_reason(tokens: List[str]) -> Optional[str]:
    """Why a command cannot run in a test on this machine (None: it runs)."""
    if tokens[:2] == ['bash', 'scripts/setup.sh']:
        return 'creates a virtual environment and installs packages (the setup, not a command of the package)'
    if tokens[0] == 'curl':
        return 'a request to a running server: test_serve.py sends the same requests to a real one'
    if tokens[0] == 'torchrun':
        return 'several processes: the multi-process run is tested in test_train.py (gloo)'
    if tokens[0].endswith('python') and tokens[1:3] == ['-m', 'pytest']:
        return 'the test suite itself'
    if '--data-dir' in tokens:
        data_dir = tokens[tokens.index('--data-dir') + 1]
        if not Path(data_dir).exists():
            return f'needs the data set at {data_dir}, not on this machine'
    argv = _hydravit_argv(tokens)
    if argv is not None:
        command = _subcommand(argv)
        if command in SKIPPED_SUBCOMMANDS:
            return SKIPPED_SUBCOMMANDS[command]
    return None


def _subcommand(argv: List[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith('-')), None)


def _localise(tokens: List[str], scratch: Path) -> List[str]:
    """``<run>`` names the tiny run; absolute scratch paths move into the scratch folder."""
    out = []
    for tok in tokens:
        tok = tok.replace('<run>', 'run')
        for prefix in SCRATCH_PATHS:
            if tok.startswith(prefix):
                tok = str(scratch / tok[len(prefix):])
        out.append(tok)
    return out


def test_every_readme_command_is_known_to_this_test():
    """A README command is either run below (its subcommand has tiny flags) or skipped with a stated reason."""
    commands = _readme_commands(README.read_text())
    assert len(commands) >= 20, commands  # the parser found the blocks
    unknown = []
    for command in commands:
        tokens = shlex.split(command)
        if _skip_reason(tokens):
            continue
        argv = _hydravit_argv(tokens)
        if argv is None:
            if not (tokens[0].endswith('python') and tokens[1] == '-c'):
                unknown.append(command)
        elif _subcommand(argv) not in TINY_FLAGS:
            unknown.append(command)
    assert not unknown, (f'README commands this test does not know how to run on tiny settings: {unknown}; add '
                         'the subcommand to TINY_FLAGS (or a reason to SKIPPED_SUBCOMMANDS) in this file')


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder with a tiny trained run at output/train/run (also reachable as run/) and the inputs the README
    takes as given (another method's results file, a folder of unlabelled images)."""
    run = tmp_path / 'output' / 'train' / 'run'
    threads = torch.get_num_threads()
    train(load_train_config(None, data_dir=str(FMNIST), max_train_samples=256, max_val_samples=64, epochs=1,
                            warmup_epochs=0, heads=[3, 6, 12], output=str(run.parent), experiment='run',
                            report=False, threads=1))
    torch.set_num_threads(threads)  # a run sets its thread count for the process: give the others theirs back
    (tmp_path / 'run').symlink_to(run, target_is_directory=True)
    shutil.copy(run / 'results.csv', tmp_path / 'other_method.csv')
    (tmp_path / 'images').mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(tmp_path / 'images' / f'{i}.png')
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@needs_fmnist
def test_every_readme_command_runs_as_written(scratch, capsys):
    threads = torch.get_num_threads()
    ran, skipped, failed = [], [], []
    for command in _readme_commands(README.read_text()):
        tokens = _localise(shlex.split(command), scratch)
        reason = _skip_reason(tokens)
        if reason:
            skipped.append((command, reason))
            continue
        argv = _hydravit_argv(tokens)
        try:
            if argv is None:  # python -c "...": run the code here
                exec(compile(tokens[2], '<README>', 'exec'), {})
                status = 0
            else:
                tiny = [] if any(f in argv for f in NO_TINY_FLAGS_WITH) else TINY_FLAGS[_subcommand(argv)]
                tiny = [*tiny, *(arg for flag, args in TINY_PHASES.items() if flag in argv and tiny for arg in args)]
                capsys.readouterr()
                status = main([*argv, *tiny])
                refusal = EXPECTED_REFUSALS.get(_subcommand(argv))
                if status == 2 and refusal and refusal in capsys.readouterr().err:
                    status = 0
        except Exception as e:  # noqa: BLE001  (collect every broken command, then fail once)
            failed.append((command, f'{type(e).__name__}: {e}'))
            continue
        finally:
            torch.set_num_threads(threads)
        (ran if status == 0 else failed).append(command if status == 0 else (command, f'exit status {status}'))
    assert not failed, 'README commands that fail as written:\n' + '\n'.join(f'{c}\n    {why}' for c, why in failed)
    assert len(ran) >= 15, (ran, skipped)
    assert all(reason for _, reason in skipped)
