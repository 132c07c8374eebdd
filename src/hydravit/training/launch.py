"""Multi-process training on one machine without torchrun: ``nproc_per_node`` local processes joined by DDP.

Why on a CPU: a small ViT's training step is a chain of small operations, and one process with two OpenMP
threads spends much of it synchronising them; two one-thread processes with DDP on gloo keep both cores busy
(1.75x the images per second on 2 cores, ``benchmarks/README.md``). As with torchrun and timm, the batch
size is per process: with the same global batch (``batch_size x nproc_per_node``) every optimizer step sees the
same images and the averaged gradient of a single-process run, so the two differ only by float rounding.

The parent process starts the workers, relays their log records to its own loggers (only rank 0 logs below
WARNING), re-raises the first worker's error as it was raised there, and returns rank 0's result.
"""
from __future__ import annotations

import ctypes
import faulthandler
import logging
import logging.handlers
import os
import pickle
import queue
import signal
import socket
import sys
import threading
from dataclasses import replace
from typing import Any, Callable, List, Tuple, TypeVar

import torch
import torch.multiprocessing as mp

from .config import TrainConfig

__all__ = ['launch_local', 'inside_launched_process', 'default_threads_per_process', 'available_cores',
           'node_threads']

logger = logging.getLogger(__name__)
T = TypeVar('T')
LOOPBACK = '127.0.0.1'
JOIN_POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def inside_launched_process() -> bool:
    """Whether this process is one of a multi-process run already (torchrun's or :func:`launch_local`'s)."""
    return 'WORLD_SIZE' in os.environ


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads_per_process(nproc: int) -> int:
    """An equal share of the cores for each of ``nproc`` processes (at least one thread)."""
    return max(1, available_cores() // nproc)


def node_threads(threads_per_process: int) -> int:
    """The threads of every process of this node together: what one process may use while the others wait
    (torchrun and :func:`launch_local` set ``LOCAL_WORLD_SIZE``), capped at the cores it may run on."""
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    return max(1, min(threads_per_process * local_processes, available_cores()))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _check_processes(cfg: TrainConfig) -> None:
    nproc = cfg.nproc_per_node
    if torch.device(cfg.device).type == 'cuda':
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > gpus:
            raise ValueError(f'nproc_per_node {nproc} needs {nproc} GPUs with --device {cfg.device}; this machine '
                             f'has {gpus}: give --nproc-per-node 1..{max(gpus, 1)}')
    elif nproc > available_cores():
        logger.warning('nproc_per_node %d is more than the %d cores available: the processes will share cores',
                       nproc, available_cores())


def _die_with_launcher(launcher_pid: int) -> None:
    """SIGKILL this worker when the launcher dies (Linux; the run folder's writes are atomic, so that is safe).

    torch's spawn asks for SIGINT, which Python ignores where the launcher was started with SIGINT ignored, as a
    shell does for a background job (``hydravit train ... &``): the workers would go on training as orphans.
    """
    if not sys.platform.startswith('linux'):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        logger.warning('could not tie this worker to its launcher (prctl errno %d)', ctypes.get_errno())
    if os.getppid() != launcher_pid:  # the launcher died before the request took effect
        os._exit(1)


def _worker(rank: int, fn: Callable[..., Any], cfg: TrainConfig, args: Tuple[Any, ...], port: int,
            log_queue: Any, results: Any, log_level: int, launcher_pid: int) -> None:
    """One process of the run: torchrun's environment, the parent's log level, ``fn(cfg, *args)``."""
    _die_with_launcher(launcher_pid)
    faulthandler.enable()  # a worker killed by a signal leaves its Python stack on stderr
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), WORLD_SIZE=str(cfg.nproc_per_node),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(cfg.nproc_per_node))
    package_logger = logging.getLogger('hydravit')
    package_logger.handlers = [logging.handlers.QueueHandler(log_queue)]
    package_logger.propagate = False
    package_logger.setLevel(log_level if rank == 0 else max(log_level, logging.WARNING))
    try:
        result = fn(cfg, *args)
    except BaseException as error:
        results.put(('error', rank, _picklable(error)))
        raise
    if rank == 0:
        results.put(('ok', rank, result))


def _picklable(error: BaseException) -> BaseException:
    """``error`` itself where it survives pickling (the parent re-raises the same type), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f'{type(error).__name__}: {error}')


class _LogRelay(threading.Thread):
    """Hands the workers' log records to the parent's logger of the same name until stopped."""

    def __init__(self, records: Any) -> None:
        super().__init__(daemon=True, name='hydravit-log-relay')
        self.records = records
        self.stopping = threading.Event()

    def run(self) -> None:
        while not (self.stopping.is_set() and self.records.empty()):
            try:
                record = self.records.get(timeout=0.1)
            except queue.Empty:
                continue
            logging.getLogger(record.name).handle(record)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def launch_local(fn: Callable[..., T], cfg: TrainConfig, *args: Any) -> T:
    """``fn(cfg, *args)`` in ``cfg.nproc_per_node`` new local processes; rank 0's return value.

    ``fn`` and ``args`` must be picklable (processes are spawned, never forked: a forked OpenMP runtime can hang).
    Each process gets ``cfg.threads`` threads, by default an equal share of the cores. Each worker asks Linux to
    kill it when the launcher dies, even by SIGKILL, so no orphan goes on writing the run folder.
    """
    _check_processes(cfg)
    cfg = replace(cfg, threads=cfg.threads or default_threads_per_process(cfg.nproc_per_node))
    context = mp.get_context('spawn')
    log_queue, results = context.Queue(), context.Queue()
    relay = _LogRelay(log_queue)
    relay.start()
    level = logging.getLogger('hydravit').getEffectiveLevel()
    logger.info('starting %d local processes of %d thread(s) each (DDP, batch size %d per process)',
                cfg.nproc_per_node, cfg.threads, cfg.batch_size)
    processes = mp.start_processes(_worker, args=(fn, cfg, args, _free_loopback_port(), log_queue, results, level,
                                                  os.getpid()),
                                   nprocs=cfg.nproc_per_node, join=False, start_method='spawn')
    outcomes: List[Tuple[str, int, Any]] = []
    try:
        while not processes.join(timeout=JOIN_POLL_S):
            outcomes += _drain(results, wait_s=0.0)  # a worker cannot exit while its queue holds unread data
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
        errors = [value for kind, _, value in outcomes + _drain(results) if kind == 'error']
        raise (errors[0] if errors else RuntimeError(f'a training process failed: {failure}')) from failure
    except BaseException:  # an interrupt of this process alone: take the workers down with it
        for process in processes.processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        relay.stop()
    returned = [value for kind, _, value in outcomes + _drain(results) if kind == 'ok']
    if not returned:
        raise RuntimeError('the training processes ended without a result from rank 0')
    return returned[0]


def _drain(results: Any, wait_s: float = 0.5) -> List[Tuple[str, int, Any]]:
    """Everything in the ``results`` queue now (waiting up to ``wait_s`` for each item still in flight)."""
    items = []
    while True:
        try:
            items.append(results.get(timeout=wait_s) if wait_s else results.get_nowait())
        except queue.Empty:
            return items
