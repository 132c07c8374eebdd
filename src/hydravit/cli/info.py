"""``hydravit info``: the shape, size and cost of every subnetwork of a model."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import timm

from ..models.config import NESTINGS
from ..models.costs import cost_row
from ..models.kchoices import parse_ks
from . import add_model_source, model_from_args

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('info', help='per-k embed width, heads, MLP width, params and GMACs',
                       description='Print one row per subnetwork k: embed_dim, num_heads, mlp_hidden, '
                                   'params (M) and GMACs (analytic, per image).')
    add_model_source(p, 'hydravit_base_patch16_224')
    p.add_argument('--k', nargs='+', help="subnetworks to list (default: the model's k choices)")
    p.add_argument('--nesting', choices=NESTINGS,
                   help="widths of another nesting method for --model (default: the model's own, hydravit)")
    p.add_argument('--format', choices=('table', 'json'), default='table')
    p.add_argument('--list', action='store_true', help='list the registered HydraViT models and exit')
    return p


def run(args: argparse.Namespace) -> int:
    if args.list:
        logger.info('\n'.join(timm.list_models('hydravit_*')))
        return 0
    model, _ = model_from_args(args)
    ks = parse_ks(args.k, model.k_choices, model.config.num_heads) or model.k_choices
    config = model.config
    if args.nesting:
        if args.checkpoint:
            raise ValueError(f'--nesting is for --model: the checkpoint is a {config.nesting} model')
        config = replace(config, nesting=args.nesting)  # costs need the config only, not a model of that nesting
    rows = [cost_row(config, k) for k in ks]
    if args.format == 'json':
        logger.info(json.dumps(rows, indent=2))
        return 0
    logger.info(f'{"k":>3} {"embed_dim":>9} {"num_heads":>9} {"mlp_hidden":>10} {"params (M)":>11} {"GMACs":>8}')
    for r in rows:
        logger.info(f'{r["k"]:>3} {r["embed_dim"]:>9} {r["num_heads"]:>9} {r["mlp_hidden"]:>10} '
              f'{r["param_count"]:>11.3f} {r["gmacs"]:>8.3f}')
    return 0
