"""Which model a results row was measured on: architecture, config hash and checkpoint sha256.

Eval, benchmark and training results files carry these columns on every row, so ``select``, ``report`` and
``compare`` can refuse to join numbers of different models (a benchmark of another architecture, two models'
rows under one label) instead of mixing them silently. Speed depends on the architecture only (``config_hash``);
accuracy on the weights too (``checkpoint_sha256``).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..models.config import HydraViTConfig
from ..models.factory import UniversalModel

__all__ = ['IDENTITY_COLUMNS', 'ARCHITECTURE_FIELDS', 'model_identity', 'with_identity', 'rows_identity',
           'file_sha256', 'config_hash', 'architecture_name', 'check_same_model', 'describe_identity']

PathLike = Union[str, os.PathLike]
IDENTITY_COLUMNS = ('model_arch', 'config_hash', 'checkpoint_sha256')
# the fields that fix the tensors' shapes and the computation (not dropout rates nor the trained k)
ARCHITECTURE_FIELDS = ('img_size', 'patch_size', 'in_chans', 'num_classes', 'num_heads', 'head_dim', 'depth',
                       'mlp_ratio', 'qkv_bias', 'class_token', 'global_pool', 'separate_heads', 'nesting')
Identity = Dict[str, str]


def architecture_name(config: HydraViTConfig) -> str:
    """A readable name of the architecture, e.g. ``hydravit-h12x64-d12-p16-224-c1000``."""
    return (f'{config.nesting}-h{config.num_heads}x{config.head_dim}-d{config.depth}-p{config.patch_size}-'
            f'{config.img_size}-c{config.num_classes}{"-separate-heads" if config.separate_heads else ""}')


def config_hash(config: HydraViTConfig) -> str:
    """The first 16 hex digits of the sha256 of the architecture fields (canonical JSON)."""
    arch = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: PathLike) -> str:
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def model_identity(model: UniversalModel, checkpoint: Optional[PathLike] = None) -> Identity:
    """The identity columns of ``model`` (``checkpoint_sha256`` empty for a model not loaded from a file)."""
    return {'model_arch': architecture_name(model.config), 'config_hash': config_hash(model.config),
            'checkpoint_sha256': file_sha256(checkpoint) if checkpoint else ''}


def with_identity(rows: Sequence[Mapping[str, Any]], model: UniversalModel,
                  checkpoint: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    identity = model_identity(model, checkpoint)
    return [{**r, **identity} for r in rows]


def rows_identity(rows: Sequence[Mapping[str, Any]], source: str) -> Optional[Identity]:
    """The one identity of a results file's rows; None for files written before these columns existed."""
    found = {tuple(str(r.get(c) or '') for c in IDENTITY_COLUMNS) for r in rows if r.get('config_hash')}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f'{source} mixes rows of {len(found)} models: '
                         f'{sorted(describe_identity(dict(zip(IDENTITY_COLUMNS, f, strict=True))) for f in found)}')
    return dict(zip(IDENTITY_COLUMNS, found.pop(), strict=True))


def describe_identity(identity: Mapping[str, str]) -> str:
    sha = identity.get('checkpoint_sha256') or ''
    return f'{identity.get("model_arch")} (config {identity.get("config_hash")}' + (
        f', checkpoint sha256 {sha[:12]})' if sha else ', no checkpoint)')


def check_same_model(sources: Sequence[Tuple[str, Optional[Mapping[str, str]]]], *, weights: bool,
                     hint: str) -> None:
    """Refuse ``(name, identity)`` sources that describe different models (unknown identities pass).

    ``weights``: the checkpoints must be the same too (accuracy); else only the architecture (speed).
    """
    known = [(name, ident) for name, ident in sources if ident]
    for name, ident in known[1:]:
        first_name, first = known[0]
        # a model without a checkpoint file is compared by its architecture only
        both_files = bool(first.get('checkpoint_sha256') and ident.get('checkpoint_sha256'))
        keys_now: Tuple[str, ...] = IDENTITY_COLUMNS if weights and both_files else IDENTITY_COLUMNS[:2]
        if any(first.get(k) != ident.get(k) for k in keys_now):
            raise ValueError(f'{first_name} and {name} come from different models: {describe_identity(first)} vs '
                             f'{describe_identity(ident)}; {hint}')
