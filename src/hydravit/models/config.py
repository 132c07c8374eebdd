"""What a universal model is: its hyper-parameters and the widths every subnetwork k has under each nesting.

The config is stored in every checkpoint, so a model rebuilds from it without code objects. ``nesting``
says which widths follow k (:func:`nested_shape`): ``'hydravit'`` heads, embedding and MLP; ``'matformer'``
the MLP only; ``'dynabert'`` heads and embedding with a full MLP; ``'separate'`` HydraViT's shapes as
independent ViTs. Two ablations split HydraViT's two moves apart: ``'heads'`` stacks heads only (k heads of
head_dim inside the full residual width and MLP) and ``'width'`` slices only the width (all H heads kept, each
head k*head_dim/H wide, embedding and MLP as HydraViT's), which exists only for the k of :func:`defined_ks`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Literal, Tuple, Union

from .kchoices import check_k, check_k_choices, is_int

__all__ = ['HydraViTConfig', 'SubnetShape', 'NESTINGS', 'nested_shape', 'defined_ks', 'mlp_hidden_dim',
           'square_size']

NESTINGS = ('hydravit', 'matformer', 'dynabert', 'separate', 'heads', 'width')


@dataclass(frozen=True)
class SubnetShape:
    """Widths of subnetwork k: what a standalone ViT of the same shape would be built with."""
    k: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    head_dim: int = 0  # channels per attention head; 0: embed_dim // num_heads (timm's rule)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, 'head_dim', self.embed_dim // self.num_heads)

    @property
    def attn_dim(self) -> int:
        """Width of q, k, v and the attention output: num_heads * head_dim (embed_dim except for ``'heads'``)."""
        return self.num_heads * self.head_dim

    @property
    def mlp_ratio(self) -> float:
        """The ``mlp_ratio`` for which timm's ``int(embed_dim * mlp_ratio)`` gives exactly ``mlp_hidden``."""
        ratio = self.mlp_hidden / self.embed_dim
        while int(self.embed_dim * ratio) < self.mlp_hidden:  # e.g. 96 * (128 / 96) = 127.99999...
            ratio = math.nextafter(ratio, math.inf)
        return ratio


def mlp_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """timm's rule (``int(dim * mlp_ratio)``), so a slice matches a standalone timm ViT exactly."""
    return int(embed_dim * mlp_ratio)


def defined_ks(nesting: str, num_heads: int, head_dim: int) -> Tuple[int, ...]:
    """The k a nesting has a subnetwork for: every 1..H, except ``'width'``, where H must divide k*head_dim."""
    ks = range(1, num_heads + 1)
    return tuple(k for k in ks if nesting != 'width' or (k * head_dim) % num_heads == 0)


def nested_shape(nesting: str, k: int, num_heads: int, head_dim: int, mlp_ratio: float) -> SubnetShape:
    """Widths of subnetwork ``k`` (1 <= k <= num_heads) of a universal model nested as ``nesting``."""
    if nesting not in NESTINGS:
        raise ValueError(f'nesting must be one of {", ".join(NESTINGS)}; got {nesting!r}')
    k = check_k(k, range(1, num_heads + 1), num_heads=num_heads)
    full_dim = num_heads * head_dim
    full_hidden = mlp_hidden_dim(full_dim, mlp_ratio)
    if nesting == 'matformer':  # MatFormer: only the MLP hidden width is nested, in H equal steps
        return SubnetShape(k=k, embed_dim=full_dim, num_heads=num_heads, mlp_hidden=full_hidden * k // num_heads,
                           head_dim=head_dim)
    if nesting == 'heads':  # k heads of head_dim read and write the full residual stream; full MLP
        return SubnetShape(k=k, embed_dim=full_dim, num_heads=k, mlp_hidden=full_hidden, head_dim=head_dim)
    dim = k * head_dim
    if nesting == 'width':  # every head kept, each one k/H as wide
        if k not in defined_ks(nesting, num_heads, head_dim):
            raise ValueError(
                f"nesting 'width' splits k*head_dim = {dim} channels over all {num_heads} heads, so k*{head_dim} "
                f'must be divisible by {num_heads}: k={k} is not; use k in '
                f'{list(defined_ks(nesting, num_heads, head_dim))}')
        return SubnetShape(k=k, embed_dim=dim, num_heads=num_heads, mlp_hidden=mlp_hidden_dim(dim, mlp_ratio),
                           head_dim=dim // num_heads)
    hidden = full_hidden if nesting == 'dynabert' else mlp_hidden_dim(dim, mlp_ratio)
    return SubnetShape(k=k, embed_dim=dim, num_heads=k, mlp_hidden=hidden, head_dim=head_dim)


@dataclass(frozen=True)
class HydraViTConfig:
    """Everything needed to rebuild a HydraViT; stored in every checkpoint."""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    num_heads: int = 12
    head_dim: int = 64
    depth: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: Literal['token', 'avg'] = 'token'
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    k_choices: Tuple[int, ...] = field(default=())
    separate_heads: bool = False
    nesting: str = 'hydravit'

    def __post_init__(self) -> None:
        for name in ('img_size', 'patch_size', 'in_chans', 'num_heads', 'head_dim', 'depth'):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if self.num_classes < 0:
            raise ValueError(f'num_classes must be >= 0, got {self.num_classes}')
        if self.img_size % self.patch_size:
            raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')
        if self.global_pool not in ('token', 'avg'):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == 'token' and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True (use global_pool='avg')")
        if self.mlp_ratio <= 0:
            raise ValueError(f'mlp_ratio must be > 0, got {self.mlp_ratio}')
        if self.nesting not in NESTINGS:
            raise ValueError(f'nesting must be one of {", ".join(NESTINGS)}; got {self.nesting!r}')
        if isinstance(self.k_choices, (str, bytes)) or not isinstance(self.k_choices, Iterable):
            raise ValueError(f'k_choices must be a sequence of ints in 1..{self.num_heads} (num_heads), '
                             f'got {self.k_choices!r}')
        defined = defined_ks(self.nesting, self.num_heads, self.head_dim)
        choices = check_k_choices(self.k_choices, self.num_heads) if len(self.k_choices) else defined
        undefined = [k for k in choices if k not in defined]
        if undefined:
            raise ValueError(f'nesting {self.nesting!r} has no subnetwork k={undefined} with {self.num_heads} heads '
                             f'of {self.head_dim}: k_choices must be among {list(defined)}')
        object.__setattr__(self, 'k_choices', choices)
        if self.nesting == 'separate' and self.separate_heads:
            raise ValueError("separate_heads needs a shared universal model: nesting='separate' already has "
                             'one classifier per k (each k is its own ViT)')

    @property
    def trained_k_only(self) -> bool:
        """Whether some weights exist only for the trained k (per-k classifiers or ViTs): no other k runs."""
        return self.separate_heads or self.nesting == 'separate'

    def subnet_shape(self, k: int) -> SubnetShape:
        """Widths of subnetwork ``k`` (any 1 <= k <= num_heads, trained or not)."""
        return nested_shape(self.nesting, k, self.num_heads, self.head_dim, self.mlp_ratio)

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.class_token)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['k_choices'] = list(self.k_choices)
        return d


def square_size(name: str, value: Union[int, Tuple[int, ...], List[int]]) -> int:
    """timm passes sizes as (h, w); HydraViT supports square images and patches."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'{name} must be an int or a square (n, n) pair, got {value!r}')
        value = value[0]
    return value

