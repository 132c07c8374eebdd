"""The sliced layers of a universal model: timm's ViT layers that run on a prefix of their weights.

Each layer reads views of its full-size parameters, so running subnetwork k copies nothing. The active
width ``dim`` is an explicit int where the caller knows it (then every slice bound is a constant for
TorchScript, FX and ONNX export, which can fold the weight slices) and the input's last dimension otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, use_fused_attn

from .config import HydraViTConfig, mlp_hidden_dim

__all__ = ['SlicedLayerNorm', 'SlicedPatchEmbed', 'SlicedAttention', 'SlicedMlp', 'SlicedBlock', 'SlicedLinear',
           'SlicedIdentity', 'sliced_norm', 'check_image_batch']

LAYER_NORM_EPS = 1e-6  # timm's ViT default


class SlicedLayerNorm(nn.LayerNorm):
    """LayerNorm over the active width only: statistics of the first d features, weight/bias [:d]."""

    def forward(self, x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        d = x.shape[-1] if dim is None else dim
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


class SlicedIdentity(nn.Identity):
    """``nn.Identity`` that takes (and ignores) the active width, where a sliced norm or classifier may sit."""

    def forward(self, x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        return x


class SlicedLinear(nn.Linear):
    """A Linear over the first ``dim`` input features (all outputs): the shared classifier of every k."""

    def forward(self, x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        d = x.shape[-1] if dim is None else dim
        return F.linear(x, self.weight[:, :d], self.bias)


def sliced_norm(dim: int) -> SlicedLayerNorm:
    return SlicedLayerNorm(dim, eps=LAYER_NORM_EPS)


def check_image_batch(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], patch_size: Tuple[int, int],
                      strict_img_size: bool) -> torch.Tensor:
    """``x`` if it is a (batch, in_chans, H, W) image batch of the expected size, else a ValueError.

    A leaf of FX graphs (``torch.fx.wrap``): a traced model still checks its input when it runs.
    """
    shape = x.shape
    if strict_img_size:
        if len(shape) != 4 or shape[1] != in_chans or shape[2] != img_size[0] or shape[3] != img_size[1]:
            got = '(' + ', '.join([str(n) for n in shape]) + ')'
            raise ValueError(
                f'expected images of shape (batch, {in_chans}, {img_size[0]}, {img_size[1]}) '
                f'(in_chans, img_size, img_size), got {got}')
    elif len(shape) != 4 or shape[1] != in_chans or shape[2] % patch_size[0] or shape[3] % patch_size[1]:
        got = '(' + ', '.join([str(n) for n in shape]) + ')'
        raise ValueError(
            f'expected images of shape (batch, {in_chans}, H, W) with H and W multiples of the patch size '
            f'{patch_size[0]} (dynamic_img_size), got {got}')
    if not x.is_floating_point():
        raise ValueError(
            f"expected floating-point images normalised with the model's mean/std, got dtype {x.dtype}: "
            'convert uint8 pixels with the eval transform (hydravit.data.transforms.build_transform, as '
            "timm's) or x.float().div(255) followed by (x - mean) / std")
    return x


torch.fx.wrap('check_image_batch')


class SlicedPatchEmbed(nn.Module):
    """Patch embedding whose output channels are sliced to the active width.

    ``strict_img_size=False`` (the model's ``dynamic_img_size``) accepts any multiple of the patch size.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 strict_img_size: bool = True) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self._set_img_size(img_size)

    def _set_img_size(self, img_size: int) -> None:
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // self.patch_size[0], img_size // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> None:
        """timm's ``PatchEmbed.set_input_size``: a new patch size resamples the kernel (timm's resample_patch_embed)."""
        from timm.layers import resample_patch_embed
        if patch_size is not None and (patch_size, patch_size) != self.patch_size:
            with torch.no_grad():
                weight = resample_patch_embed(self.proj.weight, [patch_size, patch_size], verbose=True)
                proj = nn.Conv2d(self.in_chans, self.proj.out_channels, kernel_size=patch_size, stride=patch_size,
                                 bias=self.proj.bias is not None, device=weight.device, dtype=weight.dtype)
                proj.weight.copy_(weight)
                if self.proj.bias is not None and proj.bias is not None:
                    proj.bias.copy_(self.proj.bias)
            proj.train(self.proj.training)
            proj.weight.requires_grad_(self.proj.weight.requires_grad)
            self.proj = proj
            self.patch_size = (patch_size, patch_size)
        self._set_img_size(img_size or self.img_size[0])

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid of an image of ``img_size`` (timm's name)."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_image_batch(x, self.in_chans, self.img_size, self.patch_size, self.strict_img_size)

    def forward(self, x: torch.Tensor, embed_dim: int) -> torch.Tensor:
        x = self.check_input(x)
        proj_bias = self.proj.bias
        bias = proj_bias[:embed_dim] if proj_bias is not None else None
        x = F.conv2d(x, self.proj.weight[:embed_dim], bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


def _exporting_onnx() -> bool:
    if torch.jit.is_scripting():
        return False
    else:
        return torch.onnx.is_in_onnx_export()


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
        self.fused_attn = use_fused_attn()  # timm's switch: off under set_layer_config(exportable=True)

    def _qkv(self, x: torch.Tensor, num_heads: int, d: int, head_dim: int
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the first ``head_dim`` channels of the first ``num_heads`` heads, each (B, heads, N, head_dim)."""
        B, N = x.shape[0], x.shape[1]
        inner = num_heads * head_dim
        heads = self.dim // self.head_dim
        weight = self.qkv.weight.view(3, heads, self.head_dim, self.dim)[:, :num_heads, :head_dim, :d]
        weight = weight.reshape(3, inner, d)
        qkv_bias = self.qkv.bias
        bias = qkv_bias.view(3, heads, self.head_dim)[:, :num_heads, :head_dim].reshape(3, inner) \
            if qkv_bias is not None else None
        if _exporting_onnx():
            # one matmul over the (copied) q/k/v slices: the exported graph folds the copy into a constant weight
            qkv = F.linear(x, weight.reshape(3 * inner, d), bias.reshape(3 * inner) if bias is not None else None)
            q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q, k, v = [F.linear(x, weight[i], bias[i] if bias is not None else None)
                   .view(B, N, num_heads, head_dim).transpose(1, 2) for i in range(3)]
        return q, k, v

    def forward(self, x: torch.Tensor, num_heads: int, dim: Optional[int] = None,
                head_dim: Optional[int] = None) -> torch.Tensor:
        B, N = x.shape[0], x.shape[1]
        d = x.shape[-1] if dim is None else dim
        hd = self.head_dim if head_dim is None else head_dim
        inner = num_heads * hd
        q, k, v = self._qkv(x, num_heads, d, hd)
        drop = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # timm Attention's explicit path, for exporters without a fused kernel
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
            x = F.dropout(attn.softmax(dim=-1), drop) @ v
        x = x.transpose(1, 2).reshape(B, N, inner)
        heads = self.dim // self.head_dim
        proj = self.proj.weight.view(self.dim, heads, self.head_dim)[:d, :num_heads, :hd].reshape(d, inner)
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

    def forward(self, x: torch.Tensor, hidden: int, dim: Optional[int] = None) -> torch.Tensor:
        d = x.shape[-1] if dim is None else dim
        x = self.drop1(self.act(F.linear(x, self.fc1.weight[:hidden, :d], self.fc1.bias[:hidden])))
        return self.drop2(F.linear(x, self.fc2.weight[:d, :hidden], self.fc2.bias[:d]))


class SlicedBlock(nn.Module):
    """Pre-norm transformer block; its width is ``dim`` (default: that of its input)."""

    def __init__(self, cfg: HydraViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = sliced_norm(dim)
        self.attn = SlicedAttention(dim, cfg.head_dim, cfg.qkv_bias, cfg.attn_drop_rate, cfg.proj_drop_rate)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = sliced_norm(dim)
        self.mlp = SlicedMlp(dim, mlp_hidden_dim(dim, cfg.mlp_ratio), cfg.proj_drop_rate)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_heads: int, mlp_hidden: int, dim: Optional[int] = None,
                head_dim: Optional[int] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x, dim), num_heads, dim, head_dim))
        return x + self.drop_path2(self.mlp(self.norm2(x, dim), mlp_hidden, dim))

