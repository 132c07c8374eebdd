"""Subnetworks as data: pure functions between HydraViT and timm ``VisionTransformer`` state dicts.

``subnet_state_dict`` cuts subnetwork k out of a universal state dict (for every nesting of
:data:`hydravit.models.config.NESTINGS`); ``inflate_state_dict`` goes the other way and writes a smaller (or
equal-width) timm ViT into the leading slices.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union, cast

import timm
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from .config import HydraViTConfig, SubnetShape, nested_shape
from .factory import UniversalModel
from .separate import SeparateViTs

__all__ = [
    'subnet_state_dict', 'model_subnet_state_dict', 'subnet_vit_kwargs', 'extract_subnet', 'inflate_state_dict',
    'init_from_vit', 'CheckpointMismatchError', 'PARAMETER_AXES', 'parameter_axes', 'qkv_blocks', 'SUBNET_ARCHITECTURE',
    'subnet_pretrained_cfg', 'subnet_vit',
]

# the timm architecture a subnetwork is built as (and named in its config.json); its shape arguments are overridden
SUBNET_ARCHITECTURE = 'vit_base_patch16_224'
# preprocessing and metadata of the universal model that a subnetwork keeps in its pretrained_cfg
_CFG_KEYS = ('interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'label_names', 'license')

StateDict = Dict[str, torch.Tensor]

# Which nested unit each dimension of a parameter indexes: residual 'channels', attention 'heads'
# rows (head_dim per head) or MLP 'neurons'. q/k/v tensors are read as (3, D, ...) blocks first (see
# qkv_blocks), so the rows of q, k and v each index heads. Subnetworks keep a prefix of every axis
# (this module); DynaBERT's reordering permutes them (hydravit.training.importance).
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


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the architecture it is loaded into."""


REQUIRED_KEYS = ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc1.weight')


def check_vit_state_dict(state_dict: Any, what: str = 'state dict') -> Tuple[int, int]:
    """(width D, MLP hidden width) of a timm ViT / HydraViT state dict, or an error naming what is expected.

    Every tensor named like a ViT parameter must have the full width on each nested axis: channels and
    attention rows D (q/k/v: 3*D rows), MLP neurons as ``blocks.0.mlp.fc1.weight`` has rows.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointMismatchError(f'{what}: expected a mapping of parameter names to tensors (a timm '
                                      f'VisionTransformer state_dict()), got {type(state_dict).__name__}')
    missing = [key for key in REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f'{what} is not a timm VisionTransformer / HydraViT state dict: it lacks {missing} (expected keys '
            f'such as {list(REQUIRED_KEYS)}; it has {sorted(state_dict)[:5]}{" ..." if len(state_dict) > 5 else ""})')
    dim = int(state_dict['patch_embed.proj.weight'].shape[0])
    full = {'channels': dim, 'heads': dim, 'neurons': int(state_dict['blocks.0.mlp.fc1.weight'].shape[0])}
    for name, tensor in state_dict.items():
        axes = parameter_axes(name)
        if axes is None:
            continue
        qkv = QKV_PARAMETER.fullmatch(name) is not None
        if qkv and tensor.shape[0] != 3 * dim:
            raise CheckpointMismatchError(f'{what}: {name} has shape {tuple(tensor.shape)}; a ViT of width {dim} '
                                          f'(patch_embed.proj.weight) has {3 * dim} q/k/v rows')
        blocks = qkv_blocks(name, tensor)
        for axis, unit in axes.items():
            if axis >= blocks.ndim or -axis > blocks.ndim or blocks.shape[axis] != full[unit]:
                shape = tuple(tensor.shape)
                raise CheckpointMismatchError(
                    f'{what}: {name} has shape {shape}; expected {full[unit]} {unit} on axis {axis}'
                    f'{" of its (3, D, ...) q/k/v view" if qkv else ""} for a ViT of width {dim} with '
                    f'{full["neurons"]} MLP neurons')
    return dim, full['neurons']


def _shape_of(state_dict: Mapping[str, torch.Tensor], k: int, head_dim: int,
              mlp_ratio: Optional[float], nesting: str) -> SubnetShape:
    full_dim, _ = check_vit_state_dict(state_dict)
    if full_dim % head_dim:
        raise CheckpointMismatchError(f'embedding width {full_dim} is not a multiple of head_dim {head_dim}')
    num_heads = full_dim // head_dim
    if not 1 <= k <= num_heads:
        raise ValueError(f'k={k} outside 1..{num_heads} for a state dict with {num_heads} heads of {head_dim}')
    if mlp_ratio is None:
        mlp_ratio = state_dict['blocks.0.mlp.fc1.weight'].shape[0] / full_dim
    return nested_shape(nesting, k, num_heads, head_dim, mlp_ratio)


def _member_state_dict(state_dict: Mapping[str, torch.Tensor], k: int) -> StateDict:
    """The tensors of ViT ``k`` of a separate-ViTs state dict (``subnets.<k>.*``)."""
    prefix = f'subnets.{k}.'
    out = {name[len(prefix):]: t.detach().clone().contiguous() for name, t in state_dict.items()
           if name.startswith(prefix)}
    if not out:
        held = sorted({int(n.split('.')[1]) for n in state_dict if n.startswith('subnets.')})
        raise ValueError(f'k={k} is not among the separately trained ViTs of this state dict: k in {held}')
    return out


def _prefix(name: str, tensor: torch.Tensor, sizes: Mapping[str, int], heads: Tuple[int, int, int]) -> torch.Tensor:
    """The leading ``sizes[unit]`` entries of every nested axis of parameter ``name``.

    ``heads`` is (full head_dim, active heads, active channels per head): a 'heads' axis keeps the first
    channels of each of the first heads (a view unless heads are narrowed, as in the ``'width'`` nesting).
    """
    axes = parameter_axes(name)
    if axes is None:
        raise CheckpointMismatchError(
            f'unexpected tensor {name!r}: not a parameter of a HydraViT / timm VisionTransformer')
    blocks = qkv_blocks(name, tensor)
    index = [slice(None)] * blocks.ndim
    for dim, unit in axes.items():
        if unit != 'heads':
            index[dim] = slice(0, sizes[unit])
    sliced = blocks[tuple(index)]
    head_axis = next((dim for dim, unit in axes.items() if unit == 'heads'), None)
    if head_axis is not None:
        full_head_dim, num_heads, head_dim = heads
        split = sliced.unflatten(head_axis, (-1, full_head_dim))
        index = [slice(None)] * split.ndim
        index[head_axis], index[head_axis + 1] = slice(0, num_heads), slice(0, head_dim)
        sliced = split[tuple(index)].flatten(head_axis, head_axis + 1)
    return sliced.flatten(0, 1) if blocks is not tensor else sliced


def subnet_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        k: int,
        *,
        head_dim: int,
        mlp_ratio: Optional[float] = None,
        nesting: str = 'hydravit',
) -> StateDict:
    """The tensors of subnetwork ``k`` (contiguous copies), named as timm's ``VisionTransformer``.

    A model built with :func:`subnet_vit_kwargs` (for HydraViT: ``embed_dim=k*head_dim, num_heads=k``)
    loads the result with ``strict=True``. Separate per-k classifiers (``heads.<k>.*``) become ``head.*``.
    """
    if nesting == 'separate':
        if not isinstance(state_dict, Mapping):
            raise CheckpointMismatchError(f'expected a state dict (mapping of names to tensors), got '
                                          f'{type(state_dict).__name__}')
        return _member_state_dict(state_dict, k)
    shape = _shape_of(state_dict, k, head_dim, mlp_ratio, nesting)
    sizes = {'channels': shape.embed_dim, 'neurons': shape.mlp_hidden}
    heads = (head_dim, shape.num_heads, shape.head_dim)
    out: StateDict = {}
    for name, tensor in state_dict.items():
        separate = re.fullmatch(r'heads\.(\d+)\.(weight|bias)', name)
        if separate:
            if int(separate.group(1)) == k:
                out[f'head.{separate.group(2)}'] = tensor.detach().clone().contiguous()
            continue
        out[name] = _prefix(name, tensor.detach(), sizes, heads).clone().contiguous()
    return out


def subnet_vit_kwargs(config: HydraViTConfig, k: int) -> Dict[str, Any]:
    """Constructor arguments of the standalone timm ``VisionTransformer`` equal to subnetwork ``k``.

    The ``'heads'`` nesting has none: its attention is narrower than the embedding, which timm's
    ``VisionTransformer`` constructor cannot express (its ``Attention`` can: see :func:`subnet_vit`).
    """
    shape = config.subnet_shape(k)
    if shape.attn_dim != shape.embed_dim:
        raise ValueError(
            f'subnetwork k={k} of nesting {config.nesting!r} has {shape.num_heads} heads of {shape.head_dim} '
            f"({shape.attn_dim} channels) inside a {shape.embed_dim}-wide embedding: timm's VisionTransformer "
            'constructor (and so timm.create_model, config.json, ONNX metadata) cannot express attention narrower '
            'than the embedding; use hydravit.models.extract_subnet for a timm ViT with timm Attention(attn_head_dim) '
            'layers, or the universal model itself')
    return dict(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, global_pool=config.global_pool, embed_dim=shape.embed_dim,
        depth=config.depth, num_heads=shape.num_heads, mlp_ratio=shape.mlp_ratio, qkv_bias=config.qkv_bias,
        class_token=config.class_token, drop_rate=config.drop_rate, pos_drop_rate=config.pos_drop_rate,
        attn_drop_rate=config.attn_drop_rate, proj_drop_rate=config.proj_drop_rate,
    )


def model_subnet_state_dict(model: UniversalModel, k: int) -> StateDict:
    """:func:`subnet_state_dict` of a universal model's weights, with the shape rules of its config."""
    c = model.config
    return subnet_state_dict(model.state_dict(), model.resolve_k(k), head_dim=c.head_dim, mlp_ratio=c.mlp_ratio,
                             nesting=c.nesting)


def subnet_pretrained_cfg(model: UniversalModel) -> Dict[str, Any]:
    """A plain ViT ``pretrained_cfg`` for a subnetwork: timm's architecture, the model's input size and classes,
    and the preprocessing (mean/std, crop, interpolation) the universal model carries from training."""
    c = model.config
    source = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg = {key: source[key] for key in _CFG_KEYS if source.get(key) is not None}
    cfg.update(architecture=SUBNET_ARCHITECTURE, input_size=(c.in_chans, c.img_size, c.img_size),
               num_classes=c.num_classes, fixed_input_size=not getattr(model, 'dynamic_img_size', False),
               first_conv='patch_embed.proj', classifier='head')
    return cfg


def subnet_vit(config: HydraViTConfig, k: int, pretrained_cfg: Optional[Dict[str, Any]] = None,
               **overrides: Any) -> VisionTransformer:
    """A fresh timm ``VisionTransformer`` of subnetwork ``k``'s shape (random weights), built by timm's factory.

    For the ``'heads'`` nesting (k heads inside the full width) it is a ViT of the full width whose blocks'
    attention is timm's ``Attention(dim, num_heads=k, attn_head_dim=head_dim)``: timm modules throughout,
    but not rebuildable from constructor arguments (see :func:`subnet_vit_kwargs`).
    """
    shape = config.subnet_shape(k)
    narrow = shape.attn_dim != shape.embed_dim
    kwargs = (subnet_vit_kwargs(replace(config, nesting='hydravit', k_choices=()), config.num_heads) if narrow
              else subnet_vit_kwargs(config, k))
    kwargs.update(overrides)
    vit = cast(VisionTransformer, timm.create_model(SUBNET_ARCHITECTURE, pretrained=False,
                                                    pretrained_cfg=pretrained_cfg, **kwargs))
    if narrow:
        for block in vit.blocks:
            block.attn = Attention(shape.embed_dim, num_heads=shape.num_heads, attn_head_dim=shape.head_dim,
                                   qkv_bias=config.qkv_bias, attn_drop=config.attn_drop_rate,
                                   proj_drop=config.proj_drop_rate)
    return vit


def extract_subnet(model: UniversalModel, k: int) -> VisionTransformer:
    """Subnetwork ``k`` of a universal model as an ordinary timm ``VisionTransformer`` in eval mode (copied).

    Built by timm's factory as :data:`SUBNET_ARCHITECTURE` with the subnetwork's shape, so its ``pretrained_cfg``
    describes a plain ViT (:func:`subnet_pretrained_cfg`) and ``save_for_hf`` writes a config that reloads it.
    """
    k = model.resolve_k(k)
    kwargs: Dict[str, Any] = {}
    pool = getattr(model, 'global_pool', model.config.global_pool)
    if pool != model.config.global_pool:  # reset_classifier changed the pooling; the norm stays where it was built
        kwargs.update(global_pool=pool, fc_norm=model.config.global_pool == 'avg')
    if getattr(model, 'dynamic_img_size', False):
        kwargs['dynamic_img_size'] = True
    vit = subnet_vit(model.config, k, pretrained_cfg=subnet_pretrained_cfg(model), **kwargs)
    vit.load_state_dict(model_subnet_state_dict(model, k), strict=True)
    return vit.to(next(model.parameters()).device).eval()


def _leading_slice(dst: torch.Tensor, src: torch.Tensor, name: str) -> torch.Tensor:
    """Index of ``dst`` that ``src`` occupies: the leading block of every dimension."""
    if dst.ndim != src.ndim or any(s > t for s, t in zip(src.shape, dst.shape, strict=True)):
        raise CheckpointMismatchError(
            f'{name}: source shape {tuple(src.shape)} does not fit into target shape {tuple(dst.shape)}')
    return dst[tuple(slice(0, s) for s in src.shape)]


def inflate_state_dict(
        source: Mapping[str, torch.Tensor],
        target: Mapping[str, torch.Tensor],
        *,
        head_dim: int,
        ignore_head: bool = False,
) -> StateDict:
    """``target`` with a narrower or equal-width ViT's tensors written into its leading slices.

    q/k/v blocks each go into their own block, so subnetwork ``D_src/head_dim`` of the result *is*
    the source model. Tensors the source lacks keep their target values.
    """
    src_dim, dst_dim = source['patch_embed.proj.weight'].shape[0], target['patch_embed.proj.weight'].shape[0]
    _check_compatible(source, target, head_dim, src_dim, dst_dim, ignore_head)
    out = {name: t.detach().clone() for name, t in target.items()}
    for name, src in source.items():
        if name.startswith('head.') and ignore_head:
            continue
        if name not in out:
            raise CheckpointMismatchError(f'source tensor {name!r} has no counterpart in the HydraViT')
        src = qkv_blocks(name, src)
        _leading_slice(qkv_blocks(name, out[name]), src, name).copy_(src)
    return out


def _check_compatible(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], head_dim: int,
                      src_dim: int, dst_dim: int, ignore_head: bool) -> None:
    def depth(sd: Mapping[str, torch.Tensor]) -> int:
        return len({n.split('.')[1] for n in sd if n.startswith('blocks.')})

    if src_dim > dst_dim or src_dim % head_dim:
        raise CheckpointMismatchError(
            f'source width {src_dim} must be a multiple of head_dim {head_dim} and at most {dst_dim}')
    if depth(source) != depth(target):
        raise CheckpointMismatchError(f'depth mismatch: source has {depth(source)} blocks, HydraViT {depth(target)}')
    src_patch, dst_patch = source['patch_embed.proj.weight'].shape[1:], target['patch_embed.proj.weight'].shape[1:]
    if src_patch != dst_patch:
        raise CheckpointMismatchError(
            f'patch embedding mismatch: source (in_chans, p, p) = {tuple(src_patch)}, HydraViT {tuple(dst_patch)}')
    if 'pos_embed' in source and source['pos_embed'].shape[1] != target['pos_embed'].shape[1]:
        raise CheckpointMismatchError(
            f"token count mismatch: source pos_embed has {source['pos_embed'].shape[1]} tokens, "
            f"HydraViT {target['pos_embed'].shape[1]} (different image size or class token)")
    if not ignore_head and 'head.weight' in source and 'head.weight' in target \
            and source['head.weight'].shape[0] != target['head.weight'].shape[0]:
        raise CheckpointMismatchError(
            f"classifier mismatch: source has {source['head.weight'].shape[0]} classes, HydraViT "
            f"{target['head.weight'].shape[0]}; pass ignore_head=True to keep the HydraViT's head")


def init_from_vit(model: UniversalModel, source: Union[nn.Module, Mapping[str, torch.Tensor]], *,
                  ignore_head: bool = False) -> UniversalModel:
    """Initialise ``model`` in place from a timm ViT/DeiT (model or state dict) of the same head size.

    DeiT-Ti into ``hydravit_base_patch16_224`` makes subnetwork k=3 equal to DeiT-Ti at step 0. A
    separate-ViTs model loads the source into the ViT of its width.
    """
    if isinstance(source, nn.Module):
        # a timm ViT's blocks are an nn.Sequential; torch types a Module attribute as Tensor | Module
        attn = getattr(source.blocks[0], 'attn', None) if hasattr(source, 'blocks') else None  # type: ignore[index]
        if attn is None or not hasattr(attn, 'head_dim'):
            raise CheckpointMismatchError(f'{type(source).__name__} is not a timm VisionTransformer')
        if attn.head_dim != model.config.head_dim:
            raise CheckpointMismatchError(
                f'head_dim mismatch: source heads have {attn.head_dim} channels, HydraViT {model.config.head_dim}')
        source = source.state_dict()
    src_dim, _ = check_vit_state_dict(source, 'the source')
    if isinstance(model, SeparateViTs):  # nesting 'separate': the ViT of the source's width takes it whole
        widths = {k * model.config.head_dim: k for k in model.k_choices}
        if src_dim not in widths:
            raise CheckpointMismatchError(
                f"source width {src_dim} is none of the separate ViTs' widths {sorted(widths)}")
        return init_from_vit(model.subnet(widths[src_dim]), source, ignore_head=ignore_head)
    if model.config.nesting in ('matformer', 'heads', 'width') and src_dim != model.config.embed_dim:
        raise CheckpointMismatchError(
            f'no subnetwork of a {model.config.nesting!r} model is a narrower ViT written into the leading slices: it '
            f'can start only from a ViT of the full width {model.config.embed_dim}, not {src_dim}')
    if model.config.separate_heads and not ignore_head and 'head.weight' in source:
        k_source = src_dim // model.config.head_dim
        source = {(f'heads.{k_source}.{n[5:]}' if n.startswith('head.') else n): t for n, t in source.items()}
    state = inflate_state_dict(source, model.state_dict(), head_dim=model.config.head_dim, ignore_head=ignore_head)
    model.load_state_dict(state, strict=True)
    return model
