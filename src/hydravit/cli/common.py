"""What several subcommands share: ``--threads`` and the OpenMP wait policy, the corruption flags, old flag
spellings, progress.

OpenMP's default wait policy lets idle worker threads spin; on a machine shared with other processes the
spinning threads compete for the cores the work needs and throughput collapses (``benchmarks/README.md``:
shared-machine throughput). libgomp reads ``OMP_WAIT_POLICY`` once, when torch is imported, so a command
launched as a program restarts itself with ``OMP_WAIT_POLICY=PASSIVE`` before any work (unless the variable
is set already or ``--omp-active`` is given). Called as ``hydravit.cli.main(argv)`` from Python, nothing
restarts: the caller's process keeps its own settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from ..evaluation.robustness import CorruptionSuite

__all__ = ['positive_int', 'add_threads', 'apply_threads', 'process_env', 'reexec_with_env', 'add_alias',
           'progress', 'add_omp_flag', 'add_corruption_flags', 'corruption_suite', 'describe_os_error',
           'safe_message', 'check_writable', 'PASSIVE_OMP']

logger = logging.getLogger('hydravit.cli')
PASSIVE_OMP = {'OMP_WAIT_POLICY': 'PASSIVE'}
THREADS_HELP = "torch CPU threads, >= 1 (default: torch's, the number of cores)"
LOG_EVERY_SECONDS = 30.0  # periodic progress lines when stderr is not a terminal
T = TypeVar('T')


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def add_corruption_flags(parser: argparse.ArgumentParser, *, samples: bool = False) -> None:
    """``--corruptions`` (scoring under corruptions is on when given), ``--severities``, ``--corruption-seed``
    and, with ``samples``, ``--corruption-samples``; :func:`corruption_suite` reads them."""
    from ..data.corruptions import CORRUPTIONS

    parser.add_argument('--corruptions', nargs='+', metavar='NAME', default=None,
                        help=f"also score every k under these corruptions ('all' or any of {', '.join(CORRUPTIONS)}); "
                             'the results get corruption, severity and drop (clean minus corrupted top-1) columns')
    parser.add_argument('--severities', type=int, nargs='+', default=[1, 3, 5],
                        help='corruption severities, 1..5 (default: %(default)s)')
    parser.add_argument('--corruption-seed', type=int, default=0,
                        help='seed of the corruptions (same seed, same corrupted images) (default: %(default)s)')
    if samples:
        parser.add_argument('--corruption-samples', type=positive_int, default=None,
                            help='score the corruptions on a fixed random subset of this many test images (each k, '
                                 'corruption and severity is one pass over it; default: the whole test set)')


def corruption_suite(args: argparse.Namespace) -> Optional[CorruptionSuite]:
    """The suite :func:`add_corruption_flags` asked for; ``None`` without ``--corruptions``."""
    from ..evaluation.robustness import CorruptionSuite

    if not args.corruptions:
        return None
    return CorruptionSuite(tuple(args.corruptions), tuple(args.severities), args.corruption_seed,
                           getattr(args, 'corruption_samples', None))


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` and ``--omp-active``; marks the command as one that restarts with a passive OpenMP."""
    parser.add_argument('--threads', type=positive_int, help=THREADS_HELP)
    add_omp_flag(parser)


def add_omp_flag(parser: argparse.ArgumentParser) -> None:
    """``--omp-active``; marks the command as one that restarts with a passive OpenMP wait policy."""
    parser.add_argument('--omp-active', action='store_true', default=False,
                        help="keep OpenMP's spin-waiting threads (default: restart with OMP_WAIT_POLICY=PASSIVE, "
                             'which keeps throughput when other processes share the cores)')
    parser.set_defaults(_passive_omp=True)


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's CPU threads when given; the count in effect."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f'--threads must be an integer >= 1, got {threads!r}')
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def process_env(args: argparse.Namespace) -> Dict[str, str]:
    """Environment variables the command needs from process start: the passive OpenMP policy (unless
    ``--omp-active`` or ``OMP_WAIT_POLICY`` is set already) plus the command's own (``_process_env``)."""
    env: Dict[str, str] = {}
    if getattr(args, '_passive_omp', False) and not getattr(args, 'omp_active', False) \
            and 'OMP_WAIT_POLICY' not in os.environ:
        env.update(PASSIVE_OMP)
    own: Optional[Callable[[argparse.Namespace], Mapping[str, str]]] = getattr(args, '_process_env', None)
    if own is not None:
        env.update(own(args))
    return env


def reexec_with_env(env: Mapping[str, str], argv: Sequence[str]) -> None:
    """Restart this program as ``python -c <hydravit main> argv`` with ``env`` added, unless it is set already
    (then return). One restart for everything a command needs, never a loop."""
    missing = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if not missing:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    program = 'import sys; from hydravit.cli import main; sys.exit(main())'
    os.execve(sys.executable, [sys.executable, '-c', program, *argv], {**os.environ, **missing})


class _Alias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination and says so once."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = '', **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        logger.warning('%s is an old spelling of %s (kept as an alias): use %s', option_string, self.new_flag,
                       self.new_flag)
        setattr(namespace, self.dest, values)


def add_alias(parser: argparse.ArgumentParser | Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as an alias of ``new`` (same destination, same type), with a warning when used."""
    parser.add_argument(old, dest=dest, action=_Alias, new_flag=new, default=argparse.SUPPRESS,
                        help=f'old spelling of {new} (alias)', **kwargs)


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = '', *,
             every_seconds: float = LOG_EVERY_SECONDS) -> Iterator[T]:
    """``items`` with a tqdm bar on an interactive terminal, else an INFO line every ``every_seconds``,
    so logs of long runs show that they move."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_seconds:
            last = now
            logger.info('%s: %d%s done (%.0f s)', desc, done, f'/{total}' if total else '', now - start)


def safe_message(error: BaseException) -> str:
    """The error's message without torch's advice to retry a refused load with ``weights_only=False`` (which would
    run whatever the file holds): a refused file is reported as refused, never with a way around the refusal."""
    text = str(error)
    start = text.find('Weights only load failed')
    if start < 0 and 'weights_only' in text:
        start = text.find('weights_only')
    if start < 0:
        return text
    return text[:start].rstrip(' (:') + ' (refused: it holds Python objects other than tensors and plain types)'


def describe_os_error(error: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    import errno

    where = f' ({error.filename})' if error.filename else ''
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f'no space left on the device{where}: free space or write elsewhere (--output)'
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f'cannot write{where}: {reason}; choose a writable location (--output)'
    return f'{reason}{where}'


def check_writable(folder: str | os.PathLike, flag: str = '--output') -> None:
    """Fail before any work when ``folder`` (or the nearest existing parent it would be created in) cannot be
    written."""
    from pathlib import Path

    path = Path(folder).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f'{flag} {folder}: {existing} is not a folder')
    import tempfile

    try:  # a real write, not os.access: read-only mounts and root-owned folders answer differently
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f'{flag} {folder}: cannot write in {existing} ({e.strerror}); choose a writable '
                         'location') from None
