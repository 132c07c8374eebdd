"""Local multi-process training (``nproc_per_node``): the same steps as one process, errors and logs in the caller."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hydravit.evaluation.benchmark import torch_threads
from hydravit.training.config import TrainConfig
from hydravit.training.launch import (
    _check_processes,
    available_cores,
    default_threads_per_process,
    node_threads,
)
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

from helpers import FMNIST, needs_fmnist

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_config(tmp_path, experiment: str, **overrides) -> TrainConfig:
    base = dict(dataset='fashion-mnist', data_dir=str(FMNIST), max_train_samples=256, max_val_samples=128,
                heads=[2, 3, 4], lr=3e-3, warmup_epochs=0, epochs=1, log_interval=1000, output=str(tmp_path),
                report=False, sampler='sandwich', experiment=experiment, threads=1)
    return load_train_config(None, **{**base, **overrides})


@pytest.mark.slow
@needs_fmnist
def test_two_local_processes_train_as_one_process_of_the_global_batch(tmp_path, caplog):
    """Each step of 2 x 16 images sees the 32 images and the mean gradient of a 1-process step of 32.

    SGD, because Adam's first steps are about the sign of each gradient: float rounding of a near-zero gradient
    there moves a weight by a whole learning rate, and no tolerance separates that from a wrong batch.
    """
    caplog.set_level(logging.INFO, logger='hydravit')
    sgd = dict(opt='sgd', lr=0.05, momentum=0.9)
    one = train(tiny_config(tmp_path, 'one', batch_size=32, nproc_per_node=1, **sgd))
    two = train(tiny_config(tmp_path, 'two', batch_size=16, nproc_per_node=2, report=True, **sgd))
    assert two.out_dir == tmp_path / 'two'  # rank 0's result comes back to the caller
    assert [r['k'] for r in two.results] == [2, 3, 4]
    a, b = load_file(tmp_path / 'one' / 'last.safetensors'), load_file(tmp_path / 'two' / 'last.safetensors')
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    moved = load_file(tmp_path / 'two' / 'last.safetensors')['head.weight']
    assert not torch.equal(moved, torch.zeros_like(moved))
    for r1, r2 in zip(one.results, two.results, strict=True):  # the halves of the validation set are summed
        assert r2['top1'] == pytest.approx(r1['top1'], abs=1.0)
    args = load_train_config(tmp_path / 'two' / 'args.yaml')
    assert (args.nproc_per_node, args.threads) == (2, 1)
    # rank 0 timed the report with both processes' threads (rank 1 waits idle), and says so
    report = (tmp_path / 'two' / 'report' / 'report.md').read_text()
    assert f'with {min(2, available_cores())} thread(s)' in report, report
    # rank 0's log lines reach the caller's loggers once; rank 1 logs only warnings
    messages = [r.getMessage() for r in caplog.records]
    assert sum('weights identical on all 2 processes' in m for m in messages) == 1, messages
    assert sum(m.startswith('starting 2 local processes') for m in messages) == 1, messages


@needs_fmnist
def test_a_worker_error_reaches_the_caller_as_raised(tmp_path):
    missing = tmp_path / 'no-such-folder'
    with pytest.raises((ValueError, FileNotFoundError)) as single:
        train(tiny_config(tmp_path, 'one', data_dir=str(missing), nproc_per_node=1))
    with pytest.raises(type(single.value), match=re.escape(str(single.value))):
        train(tiny_config(tmp_path, 'two', data_dir=str(missing), nproc_per_node=2))
    assert not (tmp_path / 'two').exists()


@pytest.mark.parametrize('value', [0, -1, 2.5, True, '2'])
def test_nproc_per_node_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=r'nproc_per_node must be .*>= 1'):
        TrainConfig(nproc_per_node=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_more_gpu_processes_than_gpus_are_refused_before_starting():
    with pytest.raises(ValueError, match=r'nproc_per_node 2 needs 2 GPUs .* has 0: give --nproc-per-node 1\.\.1'):
        _check_processes(TrainConfig(nproc_per_node=2, device='cuda'))


def test_each_process_gets_an_equal_share_of_the_cores(monkeypatch):
    monkeypatch.setattr('hydravit.training.launch.available_cores', lambda: 8)
    assert [default_threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_one_process_may_use_the_threads_of_its_whole_node(monkeypatch):
    monkeypatch.setattr('hydravit.training.launch.available_cores', lambda: 8)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert node_threads(3) == 3  # alone: its own threads
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert [node_threads(n) for n in (1, 3, 4, 6)] == [2, 6, 8, 8]  # capped at the cores it may run on


def test_torch_threads_restores_the_count_after_the_block():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match='inside'):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError('inside')
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: the count is left as it is
        assert torch.get_num_threads() == before


def test_cli_refuses_a_bad_process_count():
    proc = subprocess.run([sys.executable, '-m', 'hydravit', 'train', '--nproc-per-node', '0'], capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'})
    assert proc.returncode == 2
    assert re.search(r'--nproc-per-node.*must be >= 1, got 0', proc.stderr), proc.stderr


def _children(pid: int) -> set:
    path = f'/proc/{pid}/task/{pid}/children'
    try:
        with open(path) as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a parent that never reaps it)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            return not any(line.startswith('State:') and 'Z' in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.slow
@needs_fmnist
@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='reads the process tree from Linux /proc')
def test_killing_the_launcher_takes_its_workers_down(tmp_path):
    args = ['--dataset', 'fashion-mnist', '--data-dir', str(FMNIST), '--max-train-samples', '2048', '--epochs', '50',
            '--no-report', '--nproc-per-node', '2', '--threads', '1', '--output', str(tmp_path)]
    # started with SIGINT ignored, as a shell starts a background job (`hydravit train ... &`)
    launcher = subprocess.Popen([sys.executable, '-m', 'hydravit', 'train', *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline, workers = time.monotonic() + 90, set()
        while time.monotonic() < deadline and not list(tmp_path.glob('*/args.yaml')):  # rank 0 is training
            workers |= _children(launcher.pid)
            time.sleep(0.2)
        workers |= _children(launcher.pid)
        assert len(workers) >= 2, 'the launcher started no workers'
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for p in workers):
            time.sleep(0.1)
        assert not [p for p in workers if _running(p)], 'workers outlived their launcher'
    finally:
        if launcher.poll() is None:
            launcher.kill()
