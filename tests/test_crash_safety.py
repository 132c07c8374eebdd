"""Checkpoints survive repeated failure: a real training process is SIGKILLed (or its disk fills up) inside
checkpoint writes, twice in a row, and ``--resume`` still ends bit-identical to an uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import pytest

from crash_harness import differences, faulted_then_resumed, read_trace, run_train

from helpers import FMNIST, needs_fmnist

# 2 epochs x 4 steps, a checkpoint every 2 steps and at each epoch end, with EMA: tiny model and data
ARGS = ['--dataset', 'fashion-mnist', '--data-dir', str(FMNIST), '--max-train-samples', '64', '--max-val-samples',
        '32', '-b', '16', '--heads', '2', '3', '--sampler', 'uniform', '--lr', '3e-3', '--warmup-epochs', '0',
        '--epochs', '2', '--val-interval', '1', '--checkpoint-interval-steps', '2', '--model-ema',
        '--model-ema-decay', '0.9', '--no-report', '--log-interval', '1000',
        '--nproc-per-node', '1']  # one process: the faults are injected into its own file operations


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('reference')
    proc = run_train([*ARGS, '--output', str(out), '--experiment', 'run'], out / 'run', trace=out / 'trace.txt')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.slow
@needs_fmnist
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
@pytest.mark.slow
@needs_fmnist
def test_sigkill_twice_inside_checkpoint_writes_then_resume_is_bit_identical(reference, tmp_path, faults):
    run = tmp_path / 'run'
    problems = faulted_then_resumed([*ARGS, '--output', str(tmp_path), '--experiment', 'run'], run, faults)
    assert not problems, problems
    assert not differences(reference / 'run', run)


@pytest.mark.parametrize('faults', [
    # the state file fails to fit after the new weights did, then the resumed run's EMA weights fail to fit
    ['enospc@fsync:last.state.pth.tmp:2', 'enospc@fsync:last_ema.safetensors.tmp:1'],
], ids=['state-then-ema'])
@pytest.mark.slow
@needs_fmnist
def test_disk_full_partway_through_a_write_then_resume_is_bit_identical(reference, tmp_path, faults):
    run = tmp_path / 'run'
    problems = faulted_then_resumed([*ARGS, '--output', str(tmp_path), '--experiment', 'run'], run, faults)
    assert not problems, problems
    assert not differences(reference / 'run', run)
    assert not list(run.glob('.*.tmp')), 'the half-written temporary is removed'


@pytest.mark.parametrize('legacy', [False, True], ids=['generations', 'folder-from-before-generations'])
def test_failed_state_writes_twice_in_a_row_keep_the_committed_weights(tmp_path, monkeypatch, legacy):
    """In-process: the new weights land, the state write fails (disk full), twice; the committed pair still loads."""
    import torch

    from hydravit.models.factory import create_model
    from hydravit.storage.checkpoint import save_model
    from hydravit.storage.run_folder import STATE_FILE
    from hydravit.training import state as state_module

    model = create_model('hydravit_test_patch4_16')
    committed_weights = {n: t.clone() for n, t in model.state_dict().items()}
    if legacy:  # the layout older versions wrote: update counts only
        save_model(tmp_path / 'last.safetensors', model, {'num_updates': '5'})
        torch.save({'num_updates': 5}, tmp_path / STATE_FILE)
        committed = dict(committed=None, committed_updates=5)
    else:
        generation = state_module.save_training_checkpoint(tmp_path, model, None, {'num_updates': 5}, {})
        committed = dict(committed=generation)

    def disk_full(path, write):
        if str(path).endswith(STATE_FILE):
            raise OSError(28, 'No space left on device')
        return real_atomic_write(path, write)

    real_atomic_write = state_module.atomic_write
    monkeypatch.setattr(state_module, 'atomic_write', disk_full)
    for updates in (6, 7):  # the run, then the resumed run, each fail after writing new weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        with pytest.raises(OSError):
            state_module.save_training_checkpoint(tmp_path, model, None, {'num_updates': updates}, {}, **committed)
    loaded = state_module.load_training_checkpoint(tmp_path, with_ema=False)
    assert loaded['num_updates'] == 5
    assert all(torch.equal(loaded['model'][n], committed_weights[n]) for n in committed_weights)
