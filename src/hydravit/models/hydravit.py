"""The HydraViT universal model: one ViT whose first k heads form a standalone ViT for every k.

Parameter names are those of timm's ``VisionTransformer`` so that a subnetwork is a pure slice of the
state dict (see :mod:`hydravit.models.subnet`). Every sliced weight is a view: no per-forward copies.
The config's ``nesting`` says which widths subnetwork k has, so the same model also hosts the
nested-width methods HydraViT is compared with (except ``'separate'``: :mod:`hydravit.models.separate`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Literal, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._input import update_model_args, update_model_input_size
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from .config import HydraViTConfig, SubnetShape, square_size
from .kchoices import check_k, check_k_choices
from .layers import SlicedBlock, SlicedIdentity, SlicedLinear, SlicedPatchEmbed, sliced_norm

__all__ = ['HydraViT', 'KChoices', 'POOLINGS']

# global_pool values of reset_classifier: '' keeps every token (dense features), as in timm
POOLINGS = ('token', 'avg', '')
# (k, embed_dim, num_heads, mlp_hidden): a subnetwork's widths as plain ints (TorchScript and traced graphs)
Widths = Tuple[int, int, int, int, int]  # k, embed_dim, num_heads, mlp_hidden, head_dim


def check_traced_k(x: torch.Tensor, k: Optional[int], traced_k: int) -> torch.Tensor:
    """``x`` unless a graph traced at ``traced_k`` is asked for another k (a leaf of FX graphs)."""
    if k is not None and k != traced_k:
        raise ValueError(f'this graph was traced at k={traced_k} and runs only that subnetwork, got k={k}; '
                         'trace the model once per k (e.g. concrete_args={"k": k} or inside model.use_k(k))')
    return x


torch.fx.wrap('check_traced_k')


class KChoices:
    """The explicit, validated k of every universal model (HydraViT and the separate-ViTs baseline).

    Subclasses set ``self.config`` (a :class:`HydraViTConfig`) and ``self._active_k``.
    """
    if TYPE_CHECKING:  # declared for type checkers only: TorchScript cannot read string class annotations
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
    k (:data:`NESTINGS`; default: HydraViT's). ``dynamic_img_size`` accepts any multiple of the patch size
    and resamples the position embedding per input (timm's flag; not part of the stored config).

    TorchScript (``torch.jit.script``) takes k as an int argument; FX tracing fixes k at trace time
    (``concrete_args={'k': k}``, or the active k inside :meth:`use_k`). k is validated in Python at the
    call or the trace; the traced graph only checks that it is asked for its own k.
    """
    # Python-side settings TorchScript neither needs nor can type (the scripted forward reads _k_widths)
    __jit_ignored_attributes__ = ['config', 'feature_info', 'pretrained_cfg', 'default_cfg', 'pretrained_model_args']
    __jit_unused_properties__ = ['k_choices', 'active_k']

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
            dynamic_img_size: bool = False,
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
        self.global_pool: str = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.num_prefix_tokens = int(class_token)
        self.has_class_token = class_token
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self._active_k = self._default_k()
        self._k_widths = self._widths_table()

        self.patch_embed = SlicedPatchEmbed(cfg.img_size, cfg.patch_size, in_chans, dim,
                                            strict_img_size=not dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # on the CPU even under a meta-device context (weights built without storage, to be loaded)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([SlicedBlock(cfg, dpr[i]) for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=dim, reduction=cfg.patch_size) for i in range(depth)]
        use_fc_norm = global_pool == 'avg'  # timm's default placement of the final norm
        self.norm = SlicedIdentity() if use_fc_norm else sliced_norm(dim)
        self.fc_norm = sliced_norm(dim) if use_fc_norm else SlicedIdentity()
        self.head_drop = nn.Dropout(drop_rate)
        self._build_classifier(num_classes)
        self.init_weights()

    def _widths_table(self) -> Dict[int, Widths]:
        """Widths of every trained k as ints, for the scripted forward (which cannot read the config)."""
        shapes = [self.config.subnet_shape(k) for k in self.config.k_choices]
        return {s.k: (s.k, s.embed_dim, s.num_heads, s.mlp_hidden, s.head_dim) for s in shapes}

    # ----------------------------------------------------------------------------------- timm API
    def _build_classifier(self, num_classes: int) -> None:
        cfg = self.config
        self.head: Union[SlicedLinear, SlicedIdentity]
        self.heads: Optional[nn.ModuleDict]
        if cfg.separate_heads and num_classes > 0:
            self.head = SlicedIdentity()
            self.heads = nn.ModuleDict(
                {str(k): nn.Linear(cfg.subnet_shape(k).embed_dim, num_classes) for k in cfg.k_choices})
        else:
            self.head = SlicedLinear(self.embed_dim, num_classes) if num_classes > 0 else SlicedIdentity()
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

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's contract: a new head of ``num_classes`` (0: none, pre-logits out); ``global_pool=''`` keeps
        every token. The final norm stays where it was built (timm does the same)."""
        if global_pool is not None:
            if global_pool not in POOLINGS:
                raise ValueError(f'global_pool must be one of {list(POOLINGS)}, got {global_pool!r}')
            if global_pool == 'token' and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token; use 'avg' or ''")
            self.global_pool = global_pool
            update_model_args(self, global_pool=global_pool)
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

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """timm's ``set_input_size``: new image and/or patch size; the position embedding is resampled
        (timm's ``resample_abs_pos_embed``) and the config follows, so a saved checkpoint rebuilds at the new size."""
        new_img = square_size('img_size', img_size) if img_size is not None else self.config.img_size
        new_patch = square_size('patch_size', patch_size) if patch_size is not None else self.config.patch_size
        config = replace(self.config, img_size=new_img, patch_size=new_patch)  # validates the sizes
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=new_img, patch_size=new_patch)
        if self.patch_embed.grid_size != old_grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.detach(), new_size=list(self.patch_embed.grid_size), old_size=list(old_grid),
                num_prefix_tokens=self.num_prefix_tokens, verbose=True), requires_grad=self.pos_embed.requires_grad)
        self.config = config
        for info in self.feature_info:
            info['reduction'] = new_patch
        update_model_input_size(self, (new_img, new_img), patch_size=patch_size)

    # ----------------------------------------------------------------------------------- k
    def _subnet(self, x: torch.Tensor, k: Optional[int]) -> Tuple[torch.Tensor, Widths]:
        """``x`` and the widths of subnetwork ``k`` (validated); the one place every forward resolves k."""
        if torch.jit.is_scripting():
            key = self._active_k if k is None else k
            if key not in self._k_widths:
                raise ValueError(f'k={key} is not a valid subnetwork: allowed values are {list(self._k_widths)}')
            return x, self._k_widths[key]
        else:
            return self._python_subnet(x, k)

    @torch.jit.unused
    def _python_subnet(self, x: torch.Tensor, k: Optional[int]) -> Tuple[torch.Tensor, Widths]:
        if isinstance(k, torch.fx.Proxy):  # FX tracing without a concrete k: the graph runs the active k
            x = check_traced_k(x, k, self._active_k)
            k = None
        shape = self.subnet_shape(k)
        return x, (shape.k, shape.embed_dim, shape.num_heads, shape.mlp_hidden, shape.head_dim)

    # ----------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor, dim: int, grid: Tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed[..., :dim]
        if self.dynamic_img_size:  # resampling works per channel, so it commutes with the slice
            pos_embed = resample_abs_pos_embed(pos_embed, new_size=[grid[0], grid[1]],
                                               old_size=[self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]],
                                               num_prefix_tokens=self.num_prefix_tokens)
        cls_token = self.cls_token
        if cls_token is not None:
            x = torch.cat([cls_token[..., :dim].expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        x, (_, dim, num_heads, mlp_hidden, head_dim) = self._subnet(x, k)
        return self._features(x, dim, num_heads, mlp_hidden, head_dim)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, k: Optional[int] = None) -> torch.Tensor:
        x, (kk, dim, _, _, _) = self._subnet(x, k)
        if x.shape[-1] != dim:
            raise ValueError(f'features have width {x.shape[-1]} but subnetwork k={kk} has '
                             f'width {dim}: pass the same k to forward_features and forward_head')
        return self._head(x, kk, dim, pre_logits)

    def forward(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        x, (kk, dim, num_heads, mlp_hidden, head_dim) = self._subnet(x, k)  # validated once; both halves use one k
        return self._head(self._features(x, dim, num_heads, mlp_hidden, head_dim), kk, dim, False)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'token':
            return x[:, 0]
        if self.global_pool == 'avg':
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def _embed(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        grid = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        return self._pos_embed(self.patch_embed(x, dim), dim, grid)

    def _run_block(self, block: nn.Module, x: torch.Tensor, dim: int, num_heads: int, mlp_hidden: int, head_dim: int
                   ) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, num_heads, mlp_hidden, dim, head_dim, use_reentrant=False)
        return block(x, num_heads, mlp_hidden, dim, head_dim)

    def _features(self, x: torch.Tensor, dim: int, num_heads: int, mlp_hidden: int, head_dim: int) -> torch.Tensor:
        x = self._embed(x, dim)
        for block in self.blocks:
            if torch.jit.is_scripting():
                x = block(x, num_heads, mlp_hidden, dim, head_dim)
            else:
                x = self._run_block(block, x, dim, num_heads, mlp_hidden, head_dim)
        return self.norm(x, dim)

    def _head(self, x: torch.Tensor, k: int, dim: int, pre_logits: bool) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x), dim))
        if pre_logits or self.num_classes == 0:
            return x
        heads = self.heads
        if heads is not None:  # one classifier per k
            for key, head in heads.items():
                if key == str(k):
                    return head(x)
        return self.head(x, dim)

    # ----------------------------------------------------------------------------------- features
    @torch.jit.ignore
    def feature_channels(self, k: Optional[int] = None) -> int:
        """Channels of every intermediate feature map of subnetwork ``k``: ``embed_dim`` of k (k·head_dim)."""
        return self.subnet_shape(k).embed_dim

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            k: Optional[int] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[Any]], Dict[str, Any]]:
        """timm's ``VisionTransformer.forward_intermediates`` at subnetwork ``k``: block outputs of
        ``k * head_dim`` channels, as (B, C, H, W) maps (``'NCHW'``) or token sequences (``'NLC'``)."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        x, (_, dim, num_heads, mlp_hidden, head_dim) = self._subnet(x, k)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        x = self._embed(x, dim)
        blocks = list(self.blocks)[:max_index + 1] if stop_early else list(self.blocks)
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, dim, num_heads, mlp_hidden, head_dim)
            if i in take_indices:
                intermediates.append(self.norm(x, dim) if norm else x)
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            out: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                out['image_features'] = self.norm(x, dim)
            return out
        taken: List[Any] = intermediates
        if return_prefix_tokens and prefix_tokens is not None:
            taken = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return taken
        return self.norm(x, dim), taken

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's contract: drop the blocks after the last index asked for (and the norm / head if told)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = nn.ModuleList(list(self.blocks)[:max_index + 1])
        self.feature_info = self.feature_info[:max_index + 1]
        self.config = replace(self.config, depth=max_index + 1)
        if prune_norm:
            self.norm = SlicedIdentity()
        if prune_head:
            self.fc_norm = SlicedIdentity()
            self.reset_classifier(0, '')
        return take_indices

    def extra_repr(self) -> str:
        return f'k_choices={list(self.k_choices)}, active_k={self.active_k}'
