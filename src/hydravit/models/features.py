"""A universal model as a dense-prediction backbone: timm's feature getter with an explicit k.

``timm.create_model('hydravit_…', features_only=True, feature_k=6)`` returns a :class:`KFeatureGetterNet`:
``net(x)`` gives the block outputs of subnetwork 6 (6·head_dim channels each) and ``net(x, k=3)`` those of
subnetwork 3, from the same weights. ``feature_info`` describes the default k.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from timm.models._features import FeatureGetterNet

__all__ = ['KFeatureGetterNet']


class KFeatureGetterNet(FeatureGetterNet):
    """timm's ``FeatureGetterNet`` over ``forward_intermediates(..., k=k)``; ``k`` (default ``feature_k``) per call."""

    def __init__(self, model: Any, out_indices: Union[int, Sequence[int]] = 3, out_map: Optional[Sequence] = None,
                 return_dict: bool = False, output_fmt: str = 'NCHW', norm: bool = False, prune: bool = True,
                 k: Optional[int] = None) -> None:
        super().__init__(model, out_indices=out_indices, out_map=out_map, return_dict=return_dict,  # type: ignore[arg-type]
                         output_fmt=output_fmt, norm=norm, prune=prune)
        self.default_k = model.resolve_k(k) if k is not None else model.active_k
        for info in self.feature_info.info:
            info['num_chs'] = model.feature_channels(self.default_k)

    @property
    def k_choices(self) -> Any:
        return self.backbone.k_choices

    @property
    def backbone(self) -> Any:
        """The wrapped universal model (timm stores it as ``model``; torch types module attributes loosely)."""
        return self['model']

    def channels(self, k: Optional[int] = None) -> List[int]:
        """Channels of each returned feature map at subnetwork ``k`` (default: ``default_k``)."""
        width = self.backbone.feature_channels(self.default_k if k is None else k)
        return [width] * len(self.feature_info.info)

    def forward(self, x: torch.Tensor, k: Optional[int] = None) -> Any:
        return self.backbone.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                   output_fmt=self.output_fmt, intermediates_only=True,
                                                   k=self.default_k if k is None else k)
