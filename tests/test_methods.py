"""The nested-width methods HydraViT is compared with: their shapes, costs and exact extraction."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import hydravit  # noqa: F401  (registers the models)
from hydravit import HydraViT, HydraViTConfig
from hydravit.models import NESTINGS, model_from_config
from hydravit.models.costs import subnet_cost
from hydravit.models.separate import SeparateViTs
from hydravit.models.subnet import (
    CheckpointMismatchError,
    extract_subnet,
    inflate_state_dict,
    init_from_vit,
    model_subnet_state_dict,
    subnet_vit,
    subnet_vit_kwargs,
)
from hydravit.storage.checkpoint import load_model, save_model

from helpers import CONFIGS, reference_cost

SHARED = ('hydravit', 'matformer', 'dynabert')  # nestings that share one set of weights


def make(name, nesting, randomize):
    model = randomize(model_from_config(HydraViTConfig(**CONFIGS[name], nesting=nesting))).eval()
    x = torch.randn(2, model.config.in_chans, model.config.img_size, model.config.img_size,
                    generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize('nesting', NESTINGS)
@pytest.mark.parametrize('name', CONFIGS)
def test_every_k_of_every_method_is_its_extracted_timm_vit(name, nesting, randomize):
    model, x = make(name, nesting, randomize)
    for k in model.k_choices:
        vit = extract_subnet(model, k)
        shape = model.subnet_shape(k)
        assert (vit.embed_dim, len(vit.blocks[0].attn.qkv.weight) // 3, vit.blocks[0].mlp.fc1.out_features) == \
            (shape.embed_dim, shape.attn_dim, shape.mlp_hidden)
        assert (vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim) == (shape.num_heads, shape.head_dim)
        with torch.no_grad():
            assert (model(x, k=k) - vit(x)).abs().max().item() <= 1e-5, (nesting, k)
        assert subnet_cost(model.config, k).params == sum(p.numel() for p in vit.parameters())


@pytest.mark.parametrize('nesting', SHARED)
def test_weights_outside_a_subnetwork_never_change_its_output(nesting, randomize):
    model, x = make('odd', nesting, randomize)
    for k in model.k_choices[:-1]:
        noisy = {n: torch.randn_like(t) * 3 for n, t in model.state_dict().items()}
        clone = model_from_config(model.config).eval()
        clone.load_state_dict(inflate_state_dict(model_subnet_state_dict(model, k), noisy, head_dim=6))
        with torch.no_grad():
            assert torch.equal(model(x, k=k), clone(x, k=k)), (nesting, k)
            assert not torch.allclose(model(x), clone(x)), 'the noise did not reach the full model'


def test_matformer_nests_only_the_mlp_and_dynabert_keeps_it_full():
    base = dict(num_heads=12, head_dim=64, depth=12, k_choices=tuple(range(3, 13)))
    mat = HydraViTConfig(**base, nesting='matformer')
    dyna = HydraViTConfig(**base, nesting='dynabert')
    for k in range(3, 13):
        m, d = mat.subnet_shape(k), dyna.subnet_shape(k)
        assert (m.embed_dim, m.num_heads, m.mlp_hidden) == (768, 12, 256 * k)  # full attention, MLP 768..3072
        assert (d.embed_dim, d.num_heads, d.mlp_hidden) == (64 * k, k, 3072)  # heads nested, full MLP
    # at ViT-B/16 size MatFormer spans 9.20 .. 17.56 GMACs (k=3: full attention, MLP 768); every method's widest
    # subnetwork is ViT-B
    assert round(subnet_cost(mat, 3).gmacs, 2) == 9.20
    for nesting in SHARED:
        assert round(subnet_cost(HydraViTConfig(**base, nesting=nesting), 12).gmacs, 3) == 17.564
    # DynaBERT's smallest costs more than HydraViT's (full MLP) and less than MatFormer's (narrow attention)
    hydra = HydraViTConfig(**base)
    assert subnet_cost(hydra, 3).macs < subnet_cost(dyna, 3).macs < subnet_cost(mat, 3).macs


@pytest.mark.parametrize('nesting', NESTINGS)
def test_analytic_macs_match_a_flop_counter_plus_fused_attention(nesting):
    """FlopCounterMode does not see inside fused attention: it must count the formula minus L*2*N^2*d; with the
    attention unfused it sees everything and must count the formula exactly."""
    cfg = HydraViTConfig(**CONFIGS['odd'], nesting=nesting)
    for k in [k for k in (1, 3, 5) if k in cfg.k_choices]:
        vit = subnet_vit(cfg, k).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vit(torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size))
        attention = cfg.depth * 2 * cfg.num_tokens ** 2 * cfg.subnet_shape(k).attn_dim
        assert counter.get_total_flops() // 2 == subnet_cost(cfg, k).macs - attention, (nesting, k)
        assert reference_cost(cfg, k) == (subnet_cost(cfg, k).params, subnet_cost(cfg, k).macs), (nesting, k)


def test_separate_vits_are_independent_standalone_models(randomize, tmp_path):
    model = randomize(timm.create_model('hydravit_test_patch4_16', nesting='separate', k_choices=(2, 4))).eval()
    assert isinstance(model, SeparateViTs) and model.config.nesting == 'separate'
    assert sorted(model.subnets) == ['2', '4'] and model.subnet(2).embed_dim == 16
    assert all(name.startswith(('subnets.2.', 'subnets.4.')) for name in model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x, k=2)
        for p in model.subnet(4).parameters():
            p.add_(1.0)  # another k's ViT shares nothing with this one
        assert torch.equal(model(x, k=2), before)
        with model.use_k(2):
            assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match=r'k=3 is not a valid subnetwork: allowed values are \[2, 4\]'):
        model(x, k=3)
    path = save_model(tmp_path / 'separate.safetensors', model)
    loaded = load_model(path).eval()
    assert isinstance(loaded, SeparateViTs)
    with torch.no_grad():
        assert torch.equal(loaded(x, k=4), model(x, k=4))
    assert {f'subnets.2.{n}' for n in ('pos_embed', 'cls_token')} <= model.no_weight_decay()


def test_separate_vit_starts_from_a_timm_vit_of_its_width(randomize):
    model = SeparateViTs(**CONFIGS['default'], k_choices=(2, 4))
    source = randomize(VisionTransformer(**subnet_vit_kwargs(model.config, 2))).eval()
    init_from_vit(model, source)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, k=2), source(x), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointMismatchError, match=r'widths \[16, 32\]'):
        init_from_vit(model, VisionTransformer(**subnet_vit_kwargs(model.config, 3)))


def test_matformer_starts_only_from_a_full_width_vit():
    model = HydraViT(**CONFIGS['default'], nesting='matformer')
    narrow = VisionTransformer(**subnet_vit_kwargs(HydraViTConfig(**CONFIGS['default']), 2))
    with pytest.raises(CheckpointMismatchError, match='full width 32'):
        init_from_vit(model, narrow)


@pytest.mark.parametrize('kwargs, message', [
    (dict(nesting='slimmable'),
     r"nesting must be one of hydravit, matformer, dynabert, separate, heads, width; got 'slimmable'"),
    (dict(nesting='separate', separate_heads=True), r"separate_heads needs a shared universal model: "
                                                    r"nesting='separate' already has one classifier per k"),
])
def test_bad_nesting_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_from_config(HydraViTConfig(**CONFIGS['default'], **kwargs))


def test_a_sliced_model_cannot_be_built_with_one_vit_per_k():
    with pytest.raises(ValueError, match=r"nesting='separate' is one ViT per k: build it with .*SeparateViTs"):
        HydraViT(**CONFIGS['default'], nesting='separate')
