"""``hydravit`` command line: one subcommand per module in this package, each a thin layer over the API."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

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
}


def add_model_source(parser: argparse.ArgumentParser, default_model: Optional[str] = None, *,
                     required: bool = False, checkpoint_help: str = 'a HydraViT .safetensors checkpoint') -> None:
    """``--model NAME | --checkpoint PATH``: the two ways every command that needs a model accepts one."""
    group = parser.add_mutually_exclusive_group(required=required)
    default = ' (default: %(default)s)' if default_model else ''
    group.add_argument('--model', default=default_model, help=f'registered model name{default}')
    group.add_argument('--checkpoint', help=f'{checkpoint_help}, instead of --model')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hydravit', description='HydraViT: one ViT checkpoint, a working subnetwork for every k heads.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f'hydravit {args.command}: error: {e}', file=sys.stderr)
        return 2
