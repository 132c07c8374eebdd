"""Fault injection for checkpoint writes: run ``hydravit train`` and kill it (SIGKILL) or fail a write (ENOSPC).

Run as ``python crash_harness.py TRAIN ARGS...`` with

- ``HYDRAVIT_FAULT_DIR``: the run folder; only file operations inside it are fault points;
- ``HYDRAVIT_FAULT``: ``ACTION@POINT`` or unset (count only). ``ACTION`` is ``kill`` (SIGKILL before the
  operation), ``kill-after`` (SIGKILL right after it) or ``enospc`` (the file being synced is cut to half its
  size and the sync raises ``OSError(ENOSPC)``, as a write that runs out of disk partway does). ``POINT`` is the
  number of the operation (1-based, counted over the whole process) or ``OP:NAME:M``, the M-th ``OP``
  (``replace``, ``unlink``, ``fsync``) on file ``NAME`` (temporary files ``.NAME.XXXX.tmp`` count as
  ``NAME.tmp``; ``replace`` is named by its destination);
- ``HYDRAVIT_FAULT_TRACE``: a file that receives one line ``N OP NAME`` per fault point.

The fault points are the calls every checkpoint write is made of: ``os.fsync`` (a file fully written, not yet
renamed into place), ``os.replace`` (renames) and ``os.unlink`` (deletions). The process under test is the real
CLI; only these three functions are wrapped.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['FAULT_ENV', 'DIR_ENV', 'TRACE_ENV', 'install', 'read_trace', 'point_name', 'run_train', 'differences',
           'faulted_then_resumed']

FAULT_ENV, DIR_ENV, TRACE_ENV = 'HYDRAVIT_FAULT', 'HYDRAVIT_FAULT_DIR', 'HYDRAVIT_FAULT_TRACE'
TEMPORARY = re.compile(r'^\.(?P<name>.+)\.[^.]+\.tmp$')  # storage.checkpoint.atomic_write's temporaries


def point_name(path: str) -> str:
    name = os.path.basename(path)
    m = TEMPORARY.match(name)
    return f'{m.group("name")}.tmp' if m else name


def read_trace(path: Path) -> list:
    """``[(N, op, name), ...]`` of a trace file."""
    rows = []
    for line in path.read_text().splitlines():
        n, op, name = line.split(' ', 2)
        rows.append((int(n), op, name))
    return rows


class _Injector:
    def __init__(self, folder: Path, fault: Optional[str], trace: Optional[str]) -> None:
        self.folder = str(folder.resolve())
        self.count = 0
        self.per_name: Dict[Tuple[str, str], int] = {}
        if trace:
            Path(trace).parent.mkdir(parents=True, exist_ok=True)
        self.trace = open(trace, 'a', buffering=1) if trace else None  # noqa: SIM115  (open for the process)
        self.action, self.point = None, None
        if fault:
            self.action, _, self.point = fault.partition('@')
            if self.action not in ('kill', 'kill-after', 'enospc'):
                raise SystemExit(f'{FAULT_ENV}: unknown action {self.action!r}')

    def _inside(self, path: str) -> bool:
        return os.path.abspath(path).startswith(self.folder + os.sep)

    def _hit(self, op: str, path: str) -> bool:
        self.count += 1
        name = point_name(path)
        key = (op, name)
        self.per_name[key] = self.per_name.get(key, 0) + 1
        if self.trace:
            self.trace.write(f'{self.count} {op} {name}\n')
        if self.point is None:
            return False
        if self.point.isdigit():
            return self.count == int(self.point)
        want_op, want_name, want_m = self.point.split(':')
        return (op, name) == (want_op, want_name) and self.per_name[key] == int(want_m)

    def wrap(self, op: str, real: Callable, path_of: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            path = path_of(*args)
            if path is None or not self._inside(path) or not self._hit(op, path):
                return real(*args, **kwargs)
            if self.action == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            if self.action == 'enospc':
                if op != 'fsync':
                    raise SystemExit(f'{FAULT_ENV}: enospc applies to fsync points, not {op}')
                os.truncate(path, os.path.getsize(path) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # kill-after
            return result
        return wrapped


def _fd_path(fd: int, *_: object) -> Optional[str]:
    try:
        return os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        return None


def install(folder: Path, fault: Optional[str], trace: Optional[str]) -> None:
    injector = _Injector(folder, fault, trace)
    os.fsync = injector.wrap('fsync', os.fsync, _fd_path)
    os.replace = injector.wrap('replace', os.replace, lambda src, dst, *a: os.fspath(dst))
    os.unlink = injector.wrap('unlink', os.unlink, lambda path, *a: os.fspath(path))


# ------------------------------------------------------------------------------------------ driving it
def run_train(args: Sequence[str], folder: Path, fault: Optional[str] = None, trace: Optional[Path] = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``hydravit train ARGS`` in a fresh process, faults injected in ``folder``; returns the finished process."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', DIR_ENV: str(folder)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    if trace:
        env[TRACE_ENV] = str(trace)
    return subprocess.run([sys.executable, __file__, 'train', *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _without_file_hash(path: Path) -> List[dict]:
    """The rows of a CSV file without ``checkpoint_sha256``: a resumed run's weights files are bit-identical in
    their tensors, but their metadata records the ``--resume`` setting, so the files' hashes differ."""
    import csv

    with open(path, newline='') as f:
        return [{k: v for k, v in row.items() if k != 'checkpoint_sha256'} for row in csv.DictReader(f)]


def differences(reference: Path, run: Path) -> List[str]:
    """What differs between two finished run folders: weights (bit for bit), summary.csv, results.csv, leftovers."""
    import torch
    from safetensors.torch import load_file

    out = []
    for name in ('summary.csv', 'results.csv'):
        a, b = reference / name, run / name
        if not b.is_file() or _without_file_hash(a) != _without_file_hash(b):
            out.append(f'{name} differs' if b.is_file() else f'{name} missing')
    for path in sorted(reference.glob('*.safetensors')):
        other = run / path.name
        if not other.is_file():
            out.append(f'{path.name} missing')
            continue
        a, b = load_file(path), load_file(other)
        if a.keys() != b.keys() or not all(torch.equal(a[n], b[n]) for n in a):
            out.append(f'{path.name}: weights differ')
    leftovers = sorted(p.name for p in run.iterdir() if '.prev.' in p.name or p.name.endswith('.tmp'))
    if leftovers:
        out.append(f'leftover files {leftovers}')
    return out


def faulted_then_resumed(args: Sequence[str], folder: Path, faults: Sequence[str]) -> List[str]:
    """Train with the first fault, then ``--resume`` with each further one, then resume to the end.

    Returns a list of problems (empty: every faulted process died or failed as injected and the last resume
    finished). A fault point that the process never reached is reported too.
    """
    problems = []
    for fault in faults:
        # a run stopped before its first commit cannot resume: it starts again (its folder removed, as compare does)
        resumable = (folder / 'last.state.pth').is_file()
        if not resumable:
            shutil.rmtree(folder, ignore_errors=True)
        proc = run_train(['--resume', str(folder)] if resumable else args, folder, fault)
        killed = fault.startswith('kill')
        expected = proc.returncode == -signal.SIGKILL if killed else proc.returncode not in (0, -signal.SIGKILL)
        if not expected:  # a failed write (ENOSPC) ends the process with an error, whatever its exit code
            problems.append(f'{fault}: exit {proc.returncode}, expected {"SIGKILL" if killed else "an error"}: '
                            f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}')
            return problems
    resumable = (folder / 'last.state.pth').is_file()
    if not resumable:
        shutil.rmtree(folder, ignore_errors=True)
    final = run_train(['--resume', str(folder)] if resumable else args, folder)
    if final.returncode != 0:
        problems.append(f'resume after {list(faults)} failed (exit {final.returncode}): '
                        f'{(final.stdout + final.stderr)[-2000:]}')
    return problems


if __name__ == '__main__':
    install(Path(os.environ[DIR_ENV]), os.environ.get(FAULT_ENV), os.environ.get(TRACE_ENV))
    from hydravit.cli import main

    sys.exit(main(sys.argv[1:]))
