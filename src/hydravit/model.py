"""The HydraViT universal model: one ViT whose first k heads form a standalone ViT for every k.

Parameter names are those of timm's ``VisionTransformer`` so that a subnetwork is a pure slice of the
state dict (see :mod:`hydravit.subnet`). Every sliced weight is a view: no per-forward copies.

The same sliced model also hosts the nested-width methods HydraViT is compared with: the config's
``nesting`` says which widths subnetwork k has (:func:`nested_shape`). ``'separate'`` (one independent
ViT per k) is :class:`hydravit.separate.SeparateViTs`; :func:`model_from_config` builds either.
"""
from __future__ import annotations

import math
import numbers
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

__all__ = ['HydraViT', 'HydraViTConfig', 'SubnetShape', 'KChoices', 'NESTINGS', 'nested_shape', 'model_from_config',
           'PARAMETER_AXES', 'parameter_axes', 'qkv_blocks', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD']

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
LAYER_NORM_EPS = 1e-6  # timm's ViT default
# which widths follow k (SPEC §4): 'hydravit' heads + embedding + MLP; 'matformer' the MLP only;
# 'dynabert' heads + embedding, full MLP; 'separate' HydraViT's shapes as independent ViTs
NESTINGS = ('hydravit', 'matformer', 'dynabert', 'separate')


@dataclass(frozen=True)
class SubnetShape:
    """Widths of subnetwork k: what a standalone ViT of the same shape would be built with."""
    k: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int

    @property
    def mlp_ratio(self) -> float:
        """The ``mlp_ratio`` for which timm's ``int(embed_dim * mlp_ratio)`` gives exactly ``mlp_hidden``."""
        ratio = self.mlp_hidden / self.embed_dim
        while int(self.embed_dim * ratio) < self.mlp_hidden:  # e.g. 96 * (128 / 96) = 127.99999...
            ratio = math.nextafter(ratio, math.inf)
        return ratio


# Which nested unit each dimension of a parameter indexes (SPEC §2): residual 'channels', attention 'heads'
# rows (head_dim per head) or MLP 'neurons'. q/k/v tensors are read as (3, D, ...) blocks first (see
# qkv_blocks), so the rows of q, k and v each index heads. Subnetworks keep a prefix of every axis
# (hydravit.subnet); DynaBERT's reordering permutes them (hydravit.importance).
PARAMETER_AXES: Tuple[Tuple[re.Pattern, Dict[int, str]], ...] = tuple((re.compile(pattern), axes) for pattern, axes in (
    (r'patch_embed\.proj\.(weight|bias)', {0: 'channels'}),
    (r'cls_token|pos_embed', {-1: 'channels'}),
    (r'(blocks\.\d+\.norm[12]|norm|fc_norm)\.(weight|bias)', {0: 'channels'}),
    (r'blocks\.\d+\.attn\.qkv\.weight', {1: 'heads', 2: 'channels'}),
    (r'blocks\.\d+\.attn\.qkv\.bias', {1: 'heads'}),
    (r'blocks\.\d+\.attn\.proj\.weight', {0: 'channels', 1: 'heads'}),
    (r'blocks\.\d+\.(attn\.proj|mlp\.fc2)\.bias', {0: 'channels'}),
    (r'blocks\.\d+\.mlp\.fc1\.weight', {0: 'neurons', 1: 'channels'}),
    (r'blocks\.\d+\.mlp\.fc1\.bias', {0: 'neurons'}),
    (r'blocks\.\d+\.mlp\.fc2\.weight', {0: 'channels', 1: 'neurons'}),
    (r'head\.weight', {1: 'channels'}),
    (r'head\.bias', {}),
))
QKV_PARAMETER = re.compile(r'blocks\.\d+\.attn\.qkv\.(weight|bias)')


def parameter_axes(name: str) -> Optional[Dict[int, str]]:
    """``{dim: unit}`` of parameter ``name`` as read through :func:`qkv_blocks`; None if not a ViT parameter."""
    return next((axes for pattern, axes in PARAMETER_AXES if pattern.fullmatch(name)), None)


def qkv_blocks(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A fused q/k/v tensor as (3, D, ...) (its q, k and v blocks; a view when contiguous); others unchanged."""
    return tensor.reshape(3, -1, *tensor.shape[1:]) if QKV_PARAMETER.fullmatch(name) else tensor


def mlp_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """timm's rule (``int(dim * mlp_ratio)``), so a slice matches a standalone timm ViT exactly."""
    return int(embed_dim * mlp_ratio)


def nested_shape(nesting: str, k: int, num_heads: int, head_dim: int, mlp_ratio: float) -> SubnetShape:
    """Widths of subnetwork ``k`` (1 <= k <= num_heads) of a universal model nested as ``nesting``."""
    if nesting not in NESTINGS:
        raise ValueError(f'nesting must be one of {", ".join(NESTINGS)}; got {nesting!r}')
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_heads:
        raise ValueError(f'k={k!r} outside 1..{num_heads} (num_heads)')
    full_dim = num_heads * head_dim
    full_hidden = mlp_hidden_dim(full_dim, mlp_ratio)
    if nesting == 'matformer':  # MatFormer: only the MLP hidden width is nested, in H equal steps
        return SubnetShape(k=k, embed_dim=full_dim, num_heads=num_heads, mlp_hidden=full_hidden * k // num_heads)
    dim = k * head_dim
    hidden = full_hidden if nesting == 'dynabert' else mlp_hidden_dim(dim, mlp_ratio)
    return SubnetShape(k=k, embed_dim=dim, num_heads=k, mlp_hidden=hidden)


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
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
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
        choices = tuple(sorted(set(int(k) for k in self.k_choices))) or tuple(range(1, self.num_heads + 1))
        bad = [k for k in choices if not 1 <= k <= self.num_heads]
        if bad:
            raise ValueError(f'k_choices {bad} outside 1..{self.num_heads} (num_heads)')
        object.__setattr__(self, 'k_choices', choices)
        if self.nesting not in NESTINGS:
            raise ValueError(f'nesting must be one of {", ".join(NESTINGS)}; got {self.nesting!r}')
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


def _square(name: str, value: Union[int, Sequence[int]]) -> int:
    """timm passes sizes as (h, w); HydraViT supports square images and patches."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'{name} must be an int or a square (n, n) pair, got {value!r}')
        value = value[0]
    return value


class SlicedLayerNorm(nn.LayerNorm):
    """LayerNorm over the active width only: statistics of the first d features, weight/bias [:d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


def _norm(dim: int) -> SlicedLayerNorm:
    return SlicedLayerNorm(dim, eps=LAYER_NORM_EPS)


class SlicedPatchEmbed(nn.Module):
    """Patch embedding whose output channels are sliced to the active width."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_chans, *self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f'expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) '
                f'(in_chans, img_size, img_size), got {tuple(x.shape)}')

    def forward(self, x: torch.Tensor, embed_dim: int) -> torch.Tensor:
        self.check_input(x)
        bias = self.proj.bias[:embed_dim] if self.proj.bias is not None else None
        x = F.conv2d(x, self.proj.weight[:embed_dim], bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


class SlicedAttention(nn.Module):
    """Multi-head attention over the first ``num_heads`` heads, q/k/v read as a (3, D, D) view."""

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.dim = dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        B, N, d = x.shape
        inner = num_heads * self.head_dim
        weight = self.qkv.weight.view(3, self.dim, self.dim)[:, :inner, :d]
        bias = self.qkv.bias.view(3, self.dim)[:, :inner] if self.qkv.bias is not None else (None,) * 3
        q, k, v = (F.linear(x, weight[i], bias[i]).view(B, N, num_heads, self.head_dim).transpose(1, 2)
                   for i in range(3))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, inner)
        x = F.linear(x, self.proj.weight[:d, :inner], self.proj.bias[:d])
        return self.proj_drop(x)


class SlicedMlp(nn.Module):
    """timm's Mlp (fc1 -> GELU -> fc2) over the first ``hidden`` neurons and the active width."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        d = x.shape[-1]
        x = self.drop1(self.act(F.linear(x, self.fc1.weight[:hidden, :d], self.fc1.bias[:hidden])))
        return self.drop2(F.linear(x, self.fc2.weight[:d, :hidden], self.fc2.bias[:d]))


class SlicedBlock(nn.Module):
    """Pre-norm transformer block; its width is that of its input."""

    def __init__(self, cfg: HydraViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = _norm(dim)
        self.attn = SlicedAttention(dim, cfg.head_dim, cfg.qkv_bias, cfg.attn_drop_rate, cfg.proj_drop_rate)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(dim)
        self.mlp = SlicedMlp(dim, mlp_hidden_dim(dim, cfg.mlp_ratio), cfg.proj_drop_rate)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_heads: int, mlp_hidden: int) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), num_heads))
        return x + self.drop_path2(self.mlp(self.norm2(x), mlp_hidden))


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
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f'k must be an int, one of {list(self.k_choices)}; got {k!r}')
        k = int(k)
        if k not in self.k_choices:
            raise ValueError(
                f'k={k} is not a valid subnetwork: allowed values are {list(self.k_choices)} '
                f'(num_heads={self.config.num_heads})')
        return k

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
                             'hydravit.separate.SeparateViTs or hydravit.model.model_from_config')
        cfg = HydraViTConfig(
            img_size=_square('img_size', img_size), patch_size=_square('patch_size', patch_size), in_chans=in_chans, num_classes=num_classes,
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
        self.norm = nn.Identity() if use_fc_norm else _norm(dim)
        self.fc_norm = _norm(dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self._build_classifier(num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------- timm API
    def _build_classifier(self, num_classes: int) -> None:
        cfg = self.config
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
        shape = self.subnet_shape(k)
        x = self.patch_embed(x, shape.embed_dim)
        x = self._pos_embed(x, shape.embed_dim)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, shape.num_heads, shape.mlp_hidden, use_reentrant=False)
            else:
                x = block(x, shape.num_heads, shape.mlp_hidden)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool == 'token' else x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, k: Optional[int] = None) -> torch.Tensor:
        shape = self.subnet_shape(k)
        if x.shape[-1] != shape.embed_dim:
            raise ValueError(f'features have width {x.shape[-1]} but subnetwork k={shape.k} has '
                             f'width {shape.embed_dim}: pass the same k to forward_features and forward_head')
        x = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits or self.num_classes == 0:
            return x
        if self.heads is not None:
            return self.heads[str(shape.k)](x)
        return F.linear(x, self.head.weight[:, :shape.embed_dim], self.head.bias)

    def forward(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        k = self.resolve_k(k)
        return self.forward_head(self.forward_features(x, k), k=k)

    def extra_repr(self) -> str:
        return f'k_choices={list(self.k_choices)}, active_k={self.active_k}'


# --------------------------------------------------------------------------------------- registry
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


_FMNIST_CFG = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation='bilinear',
                   mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

default_cfgs = generate_default_cfgs({
    'hydravit_base_patch16_224': _cfg(),
    'hydravit_fmnist_patch7_28': _cfg(**_FMNIST_CFG),
    'hydravit_test_patch4_16': _cfg(num_classes=10, input_size=(3, 16, 16), crop_pct=1.0),
})


def model_from_config(config: HydraViTConfig, **overrides: Any) -> nn.Module:
    """The universal model a config describes: a :class:`HydraViT`, or ``SeparateViTs`` for ``'separate'``."""
    kwargs = {**config.to_dict(), **overrides}
    return _model_class(kwargs.get('nesting', 'hydravit'))(**kwargs)


def _model_class(nesting: str) -> type:
    if nesting == 'separate':
        from .separate import SeparateViTs  # it builds on this module
        return SeparateViTs
    return HydraViT


def _create_hydravit(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(f'no pretrained weights are published for {variant}; load a checkpoint with '
                         'hydravit.checkpoint.load_model(path) instead')
    return build_model_with_cfg(_model_class(kwargs.get('nesting', 'hydravit')), variant, pretrained=False,
                                **kwargs)


@register_model
def hydravit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> HydraViT:
    """H=12 heads of 64, depth 12: k=3, 6, 12 have exactly the shapes of DeiT-Ti, DeiT-S, DeiT-B."""
    args = dict(patch_size=16, num_heads=12, head_dim=64, depth=12, k_choices=tuple(range(3, 13)))
    return _create_hydravit('hydravit_base_patch16_224', pretrained, **dict(args, **kwargs))


@register_model
def hydravit_fmnist_patch7_28(pretrained: bool = False, **kwargs: Any) -> HydraViT:
    """CPU-sized variant for 28x28 grey images (Fashion-MNIST): widths 24..96, 16 patches of 7x7.

    Heads of 8 channels: at the 10-minute CPU budget of the built-in run a narrow model that sees the
    data set several times beats a wider one that sees it once or twice (see configs/fmnist_cpu.yaml).
    """
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, num_heads=12, head_dim=8, depth=6,
                mlp_ratio=4.0, k_choices=tuple(range(3, 13)))
    return _create_hydravit('hydravit_fmnist_patch7_28', pretrained, **dict(args, **kwargs))


@register_model
def hydravit_test_patch4_16(pretrained: bool = False, **kwargs: Any) -> HydraViT:
    """A few-thousand-parameter model for unit tests."""
    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, num_heads=4, head_dim=8, depth=2,
                mlp_ratio=2.0)
    return _create_hydravit('hydravit_test_patch4_16', pretrained, **dict(args, **kwargs))
