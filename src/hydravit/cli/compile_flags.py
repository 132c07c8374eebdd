"""``--torchcompile [BACKEND]`` and ``--torchcompile-mode`` (timm's flag names) for eval and benchmark."""
from __future__ import annotations

import argparse
from typing import Optional

from ..models.compiled import COMPILE_MODES, CompileOptions

__all__ = ['add_compile_flags', 'compile_options_from_args']


def add_compile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--torchcompile', nargs='?', const='inductor', metavar='BACKEND',
                        help='torch.compile the model with this backend (inductor when given without one); '
                             'each k compiles once, on its first batch')
    parser.add_argument('--torchcompile-mode', choices=COMPILE_MODES, help='torch.compile mode')


def compile_options_from_args(args: argparse.Namespace) -> Optional[CompileOptions]:
    backend, mode = getattr(args, 'torchcompile', None), getattr(args, 'torchcompile_mode', None)
    if backend is None:
        if mode is not None:
            raise ValueError('--torchcompile-mode needs --torchcompile (the backend, e.g. inductor)')
        return None
    return CompileOptions(backend, mode)
