"""The sliced layers of a universal model: timm's ViT layers that run on a prefix of their weights.

Each layer takes the active width from its input (or an explicit head/neuron count) and reads views of
its full-size parameters, so running subnetwork k copies nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .config import HydraViTConfig, mlp_hidden_dim

__all__ = ['SlicedLayerNorm', 'SlicedPatchEmbed', 'SlicedAttention', 'SlicedMlp', 'SlicedBlock', 'sliced_norm']

LAYER_NORM_EPS = 1e-6  # timm's ViT default


class SlicedLayerNorm(nn.LayerNorm):
    """LayerNorm over the active width only: statistics of the first d features, weight/bias [:d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


def sliced_norm(dim: int) -> SlicedLayerNorm:
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
    """Multi-head attention over the first ``num_heads`` heads and the first ``head_dim`` channels of each.

    q/k/v are read as a (3, H, head_dim, D) view; with whole heads (HydraViT) the slice stays a view, with
    narrower heads (the ``'width'`` ablation) it is gathered into one copy per forward. The scale is
    ``head_dim ** -0.5`` of the active head width, as in a standalone ViT of that shape.
    """

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.dim = dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
        B, N, d = x.shape
        inner = num_heads * head_dim
        heads = self.dim // self.head_dim
        weight = self.qkv.weight.view(3, heads, self.head_dim, self.dim)[:, :num_heads, :head_dim, :d]
        weight = weight.reshape(3, inner, d)
        bias = self.qkv.bias.view(3, heads, self.head_dim)[:, :num_heads, :head_dim].reshape(3, inner) \
            if self.qkv.bias is not None else (None,) * 3
        q, k, v = (F.linear(x, weight[i], bias[i]).view(B, N, num_heads, head_dim).transpose(1, 2)
                   for i in range(3))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, inner)
        proj = self.proj.weight.view(self.dim, heads, self.head_dim)[:d, :num_heads, :head_dim].reshape(d, inner)
        x = F.linear(x, proj, self.proj.bias[:d])
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
        self.norm1 = sliced_norm(dim)
        self.attn = SlicedAttention(dim, cfg.head_dim, cfg.qkv_bias, cfg.attn_drop_rate, cfg.proj_drop_rate)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = sliced_norm(dim)
        self.mlp = SlicedMlp(dim, mlp_hidden_dim(dim, cfg.mlp_ratio), cfg.proj_drop_rate)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_heads: int, mlp_hidden: int, head_dim: int) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), num_heads, head_dim))
        return x + self.drop_path2(self.mlp(self.norm2(x), mlp_hidden))

