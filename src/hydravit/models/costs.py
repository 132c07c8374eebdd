"""Analytic size and cost of every subnetwork: exact parameter counts and MACs per image.

FLOP counters miss fused attention, so the formula is the reference and a counter only a cross-check.
Every table of the project (training results, eval, export index, selection, ``hydravit info``) gets its
cost columns from :func:`cost_row`, under timm's names: ``param_count`` (millions) and ``gmacs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .config import HydraViTConfig
from .kchoices import check_k_choices

__all__ = ['SubnetCost', 'subnet_cost', 'cost_table', 'cost_row', 'add_costs', 'COST_COLUMNS']

COST_COLUMNS = ('embed_dim', 'num_heads', 'mlp_hidden', 'param_count', 'gmacs')


@dataclass(frozen=True)
class SubnetCost:
    k: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    params: int
    macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_row(self) -> Dict[str, Any]:
        """The cost columns of a table row (:data:`COST_COLUMNS`), unrounded: tiny models need the digits."""
        return dict(k=self.k, embed_dim=self.embed_dim, num_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
                    param_count=self.params_m, gmacs=self.gmacs)


def _params(cfg: HydraViTConfig, d: int, hidden: int, attn: int) -> int:
    patch = cfg.in_chans * cfg.patch_size ** 2 * d + d
    tokens = cfg.num_tokens * d + (d if cfg.class_token else 0)
    qkv_bias = 3 * attn if cfg.qkv_bias else 0
    block = 4 * d + (3 * attn * d + qkv_bias) + (attn * d + d) + (hidden * d + hidden) + (hidden * d + d)
    final_norm = 2 * d
    head = d * cfg.num_classes + cfg.num_classes if cfg.num_classes > 0 else 0
    return patch + tokens + cfg.depth * block + final_norm + head


def _macs(cfg: HydraViTConfig, d: int, hidden: int, attn: int) -> int:
    n = cfg.num_tokens
    patch = cfg.in_chans * cfg.patch_size ** 2 * d * cfg.num_patches
    block = 4 * n * attn * d + 2 * n * hidden * d + 2 * n * n * attn  # qkv+proj, MLP, q@k^T and attn@v
    return patch + cfg.depth * block + cfg.num_classes * d


def subnet_cost(cfg: HydraViTConfig, k: int) -> SubnetCost:
    """Parameters and MACs of the standalone ViT equal to subnetwork ``k`` (1 MAC = multiply + add).

    The widths follow the config's nesting; q/k/v span ``num_heads * head_dim`` channels, the whole embedding
    except for the ``'heads'`` ablation (k heads inside the full width).
    """
    shape = cfg.subnet_shape(k)
    d, hidden, attn = shape.embed_dim, shape.mlp_hidden, shape.attn_dim
    return SubnetCost(k=shape.k, embed_dim=d, num_heads=shape.num_heads, mlp_hidden=hidden,
                      params=_params(cfg, d, hidden, attn), macs=_macs(cfg, d, hidden, attn))


def cost_table(cfg: HydraViTConfig, ks: Optional[Iterable[int]] = None) -> List[SubnetCost]:
    """One :class:`SubnetCost` per k (default: the model's ``k_choices``)."""
    return [subnet_cost(cfg, k) for k in (cfg.k_choices if ks is None else check_k_choices(list(ks), cfg.num_heads))]


def cost_row(cfg: HydraViTConfig, k: int) -> Dict[str, Any]:
    """``k`` and its cost columns (:data:`COST_COLUMNS`) for a table row."""
    return subnet_cost(cfg, k).to_row()


def add_costs(rows: Iterable[Mapping[str, Any]], cfg: HydraViTConfig, **extra: Any) -> List[Dict[str, Any]]:
    """``rows`` (each with a ``k``) with the cost columns of their k and ``extra`` columns added."""
    return [{**row, **cost_row(cfg, int(row['k'])), **extra} for row in rows]
