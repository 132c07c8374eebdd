"""The two ablation nestings: heads stacked alone ('heads') and width sliced inside every head alone ('width')."""
import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from hydravit.models.config import HydraViTConfig, defined_ks
from hydravit.models.costs import subnet_cost
from hydravit.models.factory import model_from_config
from hydravit.models.subnet import extract_subnet, model_subnet_state_dict, subnet_vit_kwargs
from hydravit.training.config import TrainConfig
from hydravit.training.methods import CompareOptions, default_methods, method_class

from helpers import reference_cost

BASE = dict(num_heads=12, head_dim=64, depth=12)


def test_heads_keeps_the_residual_width_and_mlp_and_stacks_heads():
    cfg = HydraViTConfig(**BASE, nesting='heads')
    assert cfg.k_choices == tuple(range(1, 13))
    shape = cfg.subnet_shape(3)
    assert (shape.embed_dim, shape.num_heads, shape.head_dim, shape.attn_dim, shape.mlp_hidden) == \
        (768, 3, 64, 192, 3072)


def test_width_keeps_every_head_and_narrows_each_one_only_where_it_divides():
    assert defined_ks('width', 12, 64) == (3, 6, 9, 12)  # 64k/12 channels per head: k a multiple of 3
    assert defined_ks('width', 12, 16) == (3, 6, 9, 12)
    assert defined_ks('width', 6, 4) == (3, 6)
    assert defined_ks('width', 4, 8) == (1, 2, 3, 4)
    cfg = HydraViTConfig(**BASE, nesting='width')
    assert cfg.k_choices == (3, 6, 9, 12)  # the default is every k the nesting has
    shape = cfg.subnet_shape(3)
    assert (shape.embed_dim, shape.num_heads, shape.head_dim, shape.mlp_hidden) == (192, 12, 16, 768)
    with pytest.raises(ValueError, match=r'k=4 is not; use k in \[3, 6, 9, 12\]'):
        cfg.subnet_shape(4)
    with pytest.raises(ValueError, match=r"nesting 'width' has no subnetwork k=\[4, 5\] .*among \[3, 6, 9, 12\]"):
        HydraViTConfig(**BASE, nesting='width', k_choices=(3, 4, 5, 6))


def test_ablation_costs_against_the_hydravit_widths_and_an_independent_count():
    hydra, width, heads = (HydraViTConfig(**BASE, nesting=n) for n in ('hydravit', 'width', 'heads'))
    for k in (3, 6, 9, 12):  # same tensor sizes as HydraViT (more, narrower heads cost nothing extra)
        assert (subnet_cost(width, k).params, subnet_cost(width, k).macs) == \
            (subnet_cost(hydra, k).params, subnet_cost(hydra, k).macs)
    assert subnet_cost(heads, 12).macs == subnet_cost(hydra, 12).macs
    assert subnet_cost(hydra, 3).macs < subnet_cost(heads, 3).macs < subnet_cost(heads, 4).macs
    small = dict(img_size=12, patch_size=4, in_chans=2, num_classes=3, num_heads=6, head_dim=4, depth=2, mlp_ratio=3.0)
    for nesting in ('heads', 'width'):
        cfg = HydraViTConfig(**small, nesting=nesting)
        for k in cfg.k_choices:  # numel and an unfused-attention FlopCounterMode of the timm ViT of that shape
            assert reference_cost(cfg, k) == (subnet_cost(cfg, k).params, subnet_cost(cfg, k).macs), (nesting, k)


def test_width_slices_the_leading_channels_of_every_head(randomize):
    cfg = HydraViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=2, num_heads=6, head_dim=4, depth=1,
                         nesting='width')
    model = randomize(model_from_config(cfg))
    sub = model_subnet_state_dict(model, 3)  # 12 channels over 6 heads: 2 per head
    rows = [block * 24 + h * 4 + c for block in range(3) for h in range(6) for c in range(2)]
    qkv = model.state_dict()['blocks.0.attn.qkv.weight']
    assert torch.equal(sub['blocks.0.attn.qkv.weight'], qkv[rows, :12])
    cols = [h * 4 + c for h in range(6) for c in range(2)]
    assert torch.equal(sub['blocks.0.attn.proj.weight'], model.state_dict()['blocks.0.attn.proj.weight'][:12, cols])
    vit = extract_subnet(model, 3)
    assert (vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim, vit.embed_dim) == (6, 2, 12)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert (model(x, k=3) - vit(x)).abs().max().item() <= 1e-5


def test_heads_extracts_to_a_vit_with_timm_attention_but_has_no_constructor_kwargs(randomize):
    cfg = HydraViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=2, num_heads=6, head_dim=4, depth=2,
                         nesting='heads')
    model = randomize(model_from_config(cfg))
    vit = extract_subnet(model, 5)  # 5 heads of 4 in a 24-wide residual stream: 24 % 5 != 0
    assert isinstance(vit, VisionTransformer) and vit.embed_dim == 24
    assert all(type(b.attn) is Attention and (b.attn.num_heads, b.attn.head_dim) == (5, 4) for b in vit.blocks)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert (model(x, k=5) - vit(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"5 heads of 4 \(20 channels\) inside a 24-wide embedding: timm's "
                                         r'VisionTransformer constructor .* cannot express'):
        subnet_vit_kwargs(cfg, 5)
    assert subnet_vit_kwargs(cfg, 6)['num_heads'] == 6  # the full model is an ordinary ViT


def test_ablations_are_opt_in_methods_and_width_trains_only_its_k():
    assert {'heads', 'width'}.isdisjoint(default_methods()) and 'hydravit' in default_methods()
    assert method_class('heads').nesting == 'heads'
    base = TrainConfig(model='hydravit_fmnist_patch7_28', heads=list(range(3, 13)), sampler='weighted',
                       head_weights=[1.0] * 9 + [3.0])
    cfg = method_class('width').compare_config(base, CompareOptions(k_choices=list(range(3, 13))))
    assert (cfg.method, cfg.heads, cfg.head_weights) == ('width', [3, 6, 9, 12], [1.0, 1.0, 1.0, 3.0])
