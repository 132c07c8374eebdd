"""The ways of nesting a ViT that HydraViT is compared with, as settings of one trainer (``--method``).

A method is a nesting (which widths follow k: :data:`hydravit.model.NESTINGS`) plus an update scheme.
Everything downstream -- evaluation, benchmark, extraction, export -- reads the nesting from the
checkpoint's config, so every method's subnetworks are ordinary timm ViTs with analytic costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['Method', 'METHODS', 'get_method']


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for tables and plot legends
    nesting: str
    sampler: Optional[str]  # the sampler the method's update scheme prescribes; None: any (the recipe's)
    summary: str


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method('hydravit', 'HydraViT', 'hydravit', None,
           'heads, embedding and MLP nested: subnetwork k is the first k heads and k*head_dim channels'),
    Method('sortednet', 'SortedNet', 'hydravit', 'random',
           "HydraViT's shapes; SortedNet's update: --num-random random sub-models per step, their gradients "
           'accumulated before one optimiser step'),
    Method('matformer', 'MatFormer', 'matformer', None,
           'only the MLP hidden width nested (r*D*k/H); attention and embedding always full'),
    Method('dynabert', 'DynaBERT', 'dynabert', None,
           'heads and embedding nested, MLP full; the full width trains first (--teacher-epochs), heads, '
           'neurons and channels are reordered by importance, then every k learns from that teacher'),
    Method('separate', 'Separate ViTs', 'separate', 'all',
           'one ordinary ViT per k, each trained on its own (the DeiT-Ti/S/B reference)'),
)}


def get_method(name: str) -> Method:
    """The method called ``name``, or an error listing them all."""
    if name not in METHODS:
        raise ValueError(f'unknown method {name!r}: choose one of {", ".join(METHODS)}')
    return METHODS[name]
