"""The separately trained baseline as one model: an independent ViT per k behind HydraViT's interface.

DeiT-Ti/S/B trained on their own are the reference every nested method is measured against. Holding
them in one module lets the trainer, evaluation, benchmark, extraction and export treat the baseline
exactly like a universal model: ``model(x, k=k)`` runs the ViT of width ``k * head_dim``. The members
share no parameter, so training all of them on each batch (the ``all`` sampler) with a per-parameter
optimiser such as AdamW is the same as training each on its own with the same data order.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union, cast

import torch
import torch.nn as nn

from .config import HydraViTConfig, square_size
from .hydravit import HydraViT, KChoices

__all__ = ['SeparateViTs', 'member_config']


def member_config(config: HydraViTConfig, k: int) -> HydraViTConfig:
    """The config of the standalone ViT that serves subnetwork ``k``: ``k`` heads, all of them used."""
    return replace(config, num_heads=k, k_choices=(k,), nesting='hydravit')


class SeparateViTs(KChoices, nn.Module):
    """One ordinary ViT per k (``subnets.<k>``); takes the arguments of :class:`HydraViT`.

    ``dynamic_img_size`` is passed to every member, so each accepts any multiple of the patch size.
    """

    def __init__(self, dynamic_img_size: bool = False, **kwargs: Any) -> None:
        super().__init__()
        sizes: Dict[str, int] = {name: square_size(name, kwargs[name])
                                 for name in ('img_size', 'patch_size') if name in kwargs}
        self.config = HydraViTConfig(**{**kwargs, **sizes, 'nesting': 'separate'})
        self.dynamic_img_size = dynamic_img_size
        members = {str(k): HydraViT(**member_config(self.config, k).to_dict(), dynamic_img_size=dynamic_img_size)
                   for k in self.config.k_choices}
        self.subnets = nn.ModuleDict(members)
        widest = members[str(self.config.k_choices[-1])]
        # timm attribute names, so timm utilities (optimizer factory, EMA, data config) work unchanged
        self.num_classes, self.in_chans, self.global_pool = widest.num_classes, widest.in_chans, widest.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = self.config.embed_dim
        self.num_prefix_tokens = widest.num_prefix_tokens
        self._active_k = self._default_k()

    def subnet(self, k: Optional[int] = None) -> HydraViT:
        """The ViT that serves subnetwork ``k``."""
        return cast(HydraViT, self.subnets[str(self.resolve_k(k))])

    def _members(self) -> Iterator[Tuple[str, HydraViT]]:
        """(k as a string, its ViT) for every k: ``subnets`` holds nothing but HydraViTs."""
        return ((k, cast(HydraViT, vit)) for k, vit in self.subnets.items())

    def forward_features(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        return self.subnet(k).forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, k: Optional[int] = None) -> torch.Tensor:
        return self.subnet(k).forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        return self.subnet(k)(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f'subnets.{k}.{name}' for k, vit in self._members() for name in vit.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^subnets\.\d+\.(cls_token|pos_embed|patch_embed)',
            blocks=[(r'^subnets\.\d+\.blocks\.(\d+)', None), (r'^subnets\.\d+\.norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for _, vit in self._members():
            vit.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self, k: Optional[int] = None) -> nn.Module:
        return self.subnet(k).get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        for _, vit in self._members():
            vit.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.config = replace(self.config, num_classes=num_classes)

    def extra_repr(self) -> str:
        return f'k_choices={list(self.k_choices)}, active_k={self.active_k}'
