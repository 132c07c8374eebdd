"""The HydraViT universal model: one ViT whose first k heads form a standalone ViT for every k.

Parameter names are those of timm's ``VisionTransformer`` so that a subnetwork is a pure slice of the
state dict (see :mod:`hydravit.models.subnet`). Every sliced weight is a view: no per-forward copies.
The config's ``nesting`` says which widths subnetwork k has, so the same model also hosts the
nested-width methods HydraViT is compared with (except ``'separate'``: :mod:`hydravit.models.separate`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Set, Tuple, Union, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from .config import HydraViTConfig, SubnetShape, square_size
from .kchoices import check_k, check_k_choices
from .layers import SlicedBlock, SlicedPatchEmbed, sliced_norm

__all__ = ['HydraViT', 'KChoices']


class KChoices:
    """The explicit, validated k of every universal model (HydraViT and the separate-ViTs baseline).

    Subclasses set ``self.config`` (a :class:`HydraViTConfig`) and ``self._active_k``.
    """
    config: HydraViTConfig
    _active_k: int

    @property
    def k_choices(self) -> Tuple[int, ...]:
        return self.config.k_choices

    @property
    def active_k(self) -> int:
        """The k used when a call passes none; change it only through :meth:`use_k`."""
        return self._active_k

    def resolve_k(self, k: Optional[int] = None) -> int:
        """Validate ``k`` (None means :attr:`active_k`) and return it as an int."""
        if k is None:
            return self._active_k
        return check_k(k, self.k_choices, num_heads=self.config.num_heads)

    def resolve_ks(self, ks: Optional[Sequence[int]] = None) -> List[int]:
        """Validate a set of k (None means every trained k): the project's k rule, then each a trained k."""
        if ks is None:
            return list(self.k_choices)
        return [self.resolve_k(k) for k in check_k_choices(ks, what='k')]

    @contextmanager
    def use_k(self, k: int) -> Iterator[Any]:
        """Run calls that cannot pass ``k`` (timm scripts, ONNX export) at subnetwork ``k``."""
        k = self.resolve_k(k)
        previous, self._active_k = self._active_k, k
        try:
            yield self
        finally:
            self._active_k = previous

    def subnet_shape(self, k: Optional[int] = None) -> SubnetShape:
        return self.config.subnet_shape(self.resolve_k(k))

    def _default_k(self) -> int:
        cfg = self.config
        return cfg.num_heads if cfg.num_heads in cfg.k_choices else cfg.k_choices[-1]


class HydraViT(KChoices, nn.Module):
    """A ViT trained so that its first k heads (and k·head_dim channels) work on their own.

    Every method takes an optional ``k`` (default: :attr:`active_k`, which is ``num_heads`` unless
    set with :meth:`use_k`). ``k`` must be one of ``k_choices``. ``nesting`` picks which widths follow
    k (:data:`NESTINGS`; default: HydraViT's).
    """

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            num_heads: int = 12,
            head_dim: int = 64,
            depth: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            class_token: bool = True,
            global_pool: Literal['token', 'avg'] = 'token',
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            k_choices: Optional[Sequence[int]] = None,
            separate_heads: bool = False,
            nesting: str = 'hydravit',
    ) -> None:
        super().__init__()
        if nesting == 'separate':
            raise ValueError("nesting='separate' is one ViT per k: build it with "
                             'hydravit.models.SeparateViTs or hydravit.models.model_from_config')
        cfg = HydraViTConfig(
            img_size=square_size('img_size', img_size), patch_size=square_size('patch_size', patch_size),
            in_chans=in_chans, num_classes=num_classes,
            num_heads=num_heads, head_dim=head_dim, depth=depth, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            class_token=class_token, global_pool=global_pool, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
            attn_drop_rate=attn_drop_rate, proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate,
            k_choices=tuple(k_choices or ()), separate_heads=separate_heads, nesting=nesting)
        self.config = cfg
        dim = cfg.embed_dim
        # timm attribute names, so timm utilities (optimizer factory, EMA, data config) work unchanged
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.num_prefix_tokens = int(class_token)
        self.has_class_token = class_token
        self.grad_checkpointing = False
        self._active_k = self._default_k()

        self.patch_embed = SlicedPatchEmbed(cfg.img_size, cfg.patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([SlicedBlock(cfg, dpr[i]) for i in range(depth)])
        use_fc_norm = global_pool == 'avg'  # timm's default placement of the final norm
        self.norm = nn.Identity() if use_fc_norm else sliced_norm(dim)
        self.fc_norm = sliced_norm(dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self._build_classifier(num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------- timm API
    def _build_classifier(self, num_classes: int) -> None:
        cfg = self.config
        self.head: Union[nn.Linear, nn.Identity]
        self.heads: Optional[nn.ModuleDict]
        if cfg.separate_heads and num_classes > 0:
            self.head = nn.Identity()
            self.heads = nn.ModuleDict(
                {str(k): nn.Linear(cfg.subnet_shape(k).embed_dim, num_classes) for k in cfg.k_choices})
        else:
            self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self.heads = None

    def init_weights(self) -> None:
        """timm's ViT init (trunc-normal .02 Linear, zero bias), so training matches timm's recipe."""
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if module is not self:
                init_weights_vit_timm(module)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, k: Optional[int] = None) -> nn.Module:
        return self.heads[str(self.resolve_k(k))] if self.heads is not None else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError(
                f'changing global_pool ({self.global_pool!r} -> {global_pool!r}) would move the final norm; '
                'build a new model with the pooling you want')
        self.num_classes = num_classes
        self.config = replace(self.config, num_classes=num_classes)
        device = self.pos_embed.device
        self._build_classifier(num_classes)
        self.head.to(device)
        if self.heads is not None:
            self.heads.to(device)
        for module in (self.head, self.heads):
            if module is not None:
                module.apply(init_weights_vit_timm)

    # ----------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token[..., :dim].expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed[..., :dim])

    def forward_features(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        return self._features(x, self.subnet_shape(k))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, k: Optional[int] = None) -> torch.Tensor:
        return self._head(x, self.subnet_shape(k), pre_logits)

    def forward(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        shape = self.subnet_shape(k)  # validated once; both halves run on the same shape
        return self._head(self._features(x, shape), shape)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool == 'token' else x[:, self.num_prefix_tokens:].mean(dim=1)

    def _features(self, x: torch.Tensor, shape: SubnetShape) -> torch.Tensor:
        x = self.patch_embed(x, shape.embed_dim)
        x = self._pos_embed(x, shape.embed_dim)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, shape.num_heads, shape.mlp_hidden, shape.head_dim, use_reentrant=False)
            else:
                x = block(x, shape.num_heads, shape.mlp_hidden, shape.head_dim)
        return self.norm(x)

    def _head(self, x: torch.Tensor, shape: SubnetShape, pre_logits: bool = False) -> torch.Tensor:
        if x.shape[-1] != shape.embed_dim:
            raise ValueError(f'features have width {x.shape[-1]} but subnetwork k={shape.k} has '
                             f'width {shape.embed_dim}: pass the same k to forward_features and forward_head')
        x = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits or self.num_classes == 0:
            return x
        if self.heads is not None:
            return self.heads[str(shape.k)](x)
        head = cast(nn.Linear, self.head)  # num_classes > 0 and one shared head: the Linear of _build_classifier
        return F.linear(x, head.weight[:, :shape.embed_dim], head.bias)

    def extra_repr(self) -> str:
        return f'k_choices={list(self.k_choices)}, active_k={self.active_k}'


