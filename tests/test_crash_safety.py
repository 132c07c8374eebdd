"""Checkpoints survive repeated failure: a real training process is SIGKILLed (or its disk fills up) inside
checkpoint writes, twice in a row, and ``--resume`` still ends bit-identical to an uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import pytest

from crash_harness import differences, faulted_then_resumed, read_trace, run_train

from helpers import FMNIST, needs_fmnist

pytestmark = [pytest.mark.slow, needs_fmnist]

# 2 epochs x 4 steps, a checkpoint every 2 steps and at each epoch end, with EMA: tiny model and data
ARGS = ['--dataset', 'fashion-mnist', '--data-dir', str(FMNIST), '--max-train-samples', '64', '--max-val-samples',
        '32', '-b', '16', '--heads', '2', '3', '--sampler', 'uniform', '--lr', '3e-3', '--warmup-epochs', '0',
        '--epochs', '2', '--val-interval', '1', '--checkpoint-interval-steps', '2', '--model-ema',
        '--model-ema-decay', '0.9', '--no-report', '--log-interval', '1000']


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('reference')
    proc = run_train([*ARGS, '--output', str(out), '--experiment', 'run'], out / 'run', trace=out / 'trace.txt')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_the_uninterrupted_run_has_the_fault_points_the_cases_name(reference):
    points = {(op, name) for _, op, name in read_trace(reference / 'trace.txt')}
    for point in [('fsync', 'last.state.pth.tmp'), ('replace', 'last.safetensors'),
                  ('fsync', 'last_ema.safetensors.tmp'), ('replace', 'last.prev.safetensors'),
                  ('fsync', 'model_best.safetensors.tmp')]:
        assert point in points, point


@pytest.mark.parametrize('faults', [
    # new weights written, state not: then the resumed run dies right after its first weights write (the data loss
    # of the old protocol, which renamed the only committed weights to *.prev)
    ['kill@fsync:last.state.pth.tmp:2', 'kill-after@replace:last.safetensors:1'],
    # killed between the two weights files, then inside the resumed run's rename of the committed file
    ['kill-after@replace:last.safetensors:3', 'kill-after@replace:last.prev.safetensors:1'],
], ids=['before-commit-twice', 'between-weights-then-rename'])
def test_sigkill_twice_inside_checkpoint_writes_then_resume_is_bit_identical(reference, tmp_path, faults):
    run = tmp_path / 'run'
    problems = faulted_then_resumed([*ARGS, '--output', str(tmp_path), '--experiment', 'run'], run, faults)
    assert not problems, problems
    assert not differences(reference / 'run', run)


@pytest.mark.parametrize('faults', [
    # the state file fails to fit after the new weights did, then the resumed run's EMA weights fail to fit
    ['enospc@fsync:last.state.pth.tmp:2', 'enospc@fsync:last_ema.safetensors.tmp:1'],
], ids=['state-then-ema'])
def test_disk_full_partway_through_a_write_then_resume_is_bit_identical(reference, tmp_path, faults):
    run = tmp_path / 'run'
    problems = faulted_then_resumed([*ARGS, '--output', str(tmp_path), '--experiment', 'run'], run, faults)
    assert not problems, problems
    assert not differences(reference / 'run', run)
    assert not list(run.glob('.*.tmp')), 'the half-written temporary is removed'
