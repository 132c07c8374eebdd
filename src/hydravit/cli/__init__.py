"""``hydravit`` command line: one subcommand per module in this package, each a thin layer over the API."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from ..models.factory import UniversalModel
from ..storage.run_folder import load_or_create_model
from .common import describe_os_error, process_env, reexec_with_env, safe_message

LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR')
# subcommand -> module defining ``add_parser(subparsers)`` and ``run(args) -> int``
COMMANDS = {
    'info': 'hydravit.cli.info',
    'eval': 'hydravit.cli.eval',
    'benchmark': 'hydravit.cli.benchmark',
    'report': 'hydravit.cli.report',
    'train': 'hydravit.cli.train',
    'compare': 'hydravit.cli.compare',
    'export': 'hydravit.cli.export',
    'select': 'hydravit.cli.select',
    'serve-demo': 'hydravit.cli.adaptive',
    'predict': 'hydravit.cli.predict',
    'cascade': 'hydravit.cli.cascade',
    'serve': 'hydravit.cli.serve',
    'loadtest': 'hydravit.cli.loadtest',
}


def add_model_source(parser: argparse.ArgumentParser, default_model: Optional[str] = None, *,
                     checkpoint_help: str = 'a HydraViT .safetensors checkpoint') -> None:
    """``--model NAME``, ``--checkpoint PATH`` or both (the file's weights in that architecture, which must agree
    with the file's): the ways every command that needs a model accepts one (:func:`model_from_args`)."""
    default = f' (default: {default_model})' if default_model else ''
    parser.add_argument('--model', help=f'registered model name{default}; with --checkpoint, the architecture of '
                        'a file that stores none (a timm checkpoint or state dict), checked against its shapes')
    parser.add_argument('--checkpoint', help=f'{checkpoint_help} (also a timm train.py checkpoint or a timm ViT '
                        'state dict: .pth, .pth.tar, .bin, .safetensors)')
    parser.set_defaults(default_model=default_model)
    add_ema_choice(parser)


def add_ema_choice(parser: argparse.ArgumentParser) -> None:
    """``--use-ema`` / ``--no-use-ema``: which weights of a checkpoint (default: EMA when a file holds both)."""
    parser.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=None,
                        help="the EMA weights: a run's *_ema.safetensors twin, or the EMA inside a timm checkpoint; "
                             '--no-use-ema: the raw weights (default: the file named; EMA in a file holding both)')


def model_from_args(args: argparse.Namespace) -> Tuple[UniversalModel, Optional[Path]]:
    """The model of ``--model NAME`` and/or ``--checkpoint PATH`` (a file or a run folder), and the checkpoint file.

    The one loader of every subcommand taking a model: :func:`hydravit.storage.run_folder.load_or_create_model`.
    """
    return load_or_create_model(model_name_from_args(args), args.checkpoint, use_ema=getattr(args, 'use_ema', None))


def model_name_from_args(args: argparse.Namespace) -> Optional[str]:
    """``--model``, else the subcommand's default model when no ``--checkpoint`` is given."""
    return args.model or (None if args.checkpoint else getattr(args, 'default_model', None))


class StrictParser(argparse.ArgumentParser):
    """An argument parser without prefix matching (an abbreviation is an unknown flag, never another flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # no prefix matching anywhere: an abbreviation such as the official code's --drop-p must never be read as
    # one of our flags (--drop-path)
    parser = argparse.ArgumentParser(
        prog='hydravit', description='HydraViT: one ViT checkpoint, a working subnetwork for every k heads.',
        allow_abbrev=False)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument('-v', '--verbose', action='store_const', dest='log_level', const='DEBUG',
                           help='also print debug messages')
    verbosity.add_argument('-q', '--quiet', action='store_const', dest='log_level', const='WARNING',
                           help='print only warnings and errors')
    verbosity.add_argument('--log-level', choices=LOG_LEVELS, help='message level (default: INFO)')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True,
                                parser_class=StrictParser)
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


@contextmanager
def console_logging(level: str) -> Iterator[None]:
    """Messages of the ``hydravit`` loggers on the console for one command: results and progress on stdout,
    warnings and errors on stderr; only rank 0 of a multi-process run prints below WARNING. The
    logger is restored afterwards, so calling :func:`main` from Python leaves no handlers behind."""
    logger = logging.getLogger('hydravit')
    saved = (logger.level, logger.propagate, list(logger.handlers))
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_BelowWarning())
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter('%(message)s'))
    rank = int(os.environ.get('RANK', '0'))
    logger.handlers = [out, err]
    logger.setLevel(level if rank == 0 else max(logging.getLevelName(level), logging.WARNING))
    logger.propagate = False
    try:
        yield
    finally:
        for handler in (out, err):
            handler.flush()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    if argv is None:  # launched as a program: restart once with what the command needs from process start
        with console_logging('ERROR'):
            reexec_with_env(process_env(parser.parse_args(argv)), sys.argv[1:])
    with console_logging('WARNING'):  # an old flag spelling warns while parsing, once
        args = parser.parse_args(argv)
    with console_logging(args.log_level or 'INFO'):
        try:
            return int(args._run(args) or 0)
        except (ValueError, FileNotFoundError) as e:
            logging.getLogger('hydravit').error('hydravit %s: error: %s', args.command, safe_message(e))
            return 2
        except OSError as e:  # a full disk, a read-only or vanished output folder: the reason, not a traceback
            logging.getLogger('hydravit').error('hydravit %s: error: %s', args.command, describe_os_error(e))
            return 2
