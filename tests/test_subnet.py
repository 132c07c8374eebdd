"""Every subnetwork k is exactly a standalone timm ViT: same outputs, same parameters, loadable both ways."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from hydravit import HydraViT
from hydravit.models.costs import subnet_cost
from hydravit.models.subnet import (
    CheckpointMismatchError,
    extract_subnet,
    inflate_state_dict,
    init_from_vit,
    subnet_state_dict,
    subnet_vit_kwargs,
)

from helpers import CONFIGS


def make(name, randomize, **extra):
    model = randomize(HydraViT(**CONFIGS[name], **extra)).eval()
    x = torch.randn(3, model.config.in_chans, model.config.img_size, model.config.img_size,
                    generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize('name', CONFIGS)
def test_every_k_equals_extracted_timm_vit(name, randomize):
    model, x = make(name, randomize)
    for k in model.k_choices:
        vit = extract_subnet(model, k)
        assert isinstance(vit, VisionTransformer) and not vit.training
        with torch.no_grad():
            ours, theirs = model(x, k=k), vit(x)
        assert (ours - theirs).abs().max().item() <= 1e-5, f'k={k}'
        assert subnet_cost(model.config, k).params == sum(p.numel() for p in vit.parameters())


@pytest.mark.parametrize('name', CONFIGS)
def test_full_width_equals_timm_vit_loaded_from_same_state_dict(name, randomize):
    model, x = make(name, randomize)
    vit = VisionTransformer(**subnet_vit_kwargs(model.config, model.config.num_heads)).eval()
    vit.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', ['default', 'odd', 'avg_no_cls'])
def test_heads_beyond_k_never_change_output_at_k(name, randomize):
    model, x = make(name, randomize)
    for k in model.k_choices[:-1]:
        with torch.no_grad():
            before, after = model(x, k=k), _perturb_tail(model, k)(x, k=k)
            changed_full = _perturb_tail(model, k)(x)
        assert torch.equal(before, after), f'k={k}: weights of heads > k leaked into the output'
        assert not torch.allclose(model(x), changed_full), 'the perturbation did not touch the tail'


def _perturb_tail(model, k):
    """A copy of ``model`` whose every entry outside subnetwork k's slice is replaced by noise."""
    clone = HydraViT(**model.config.to_dict()).eval()
    clone.load_state_dict(model.state_dict())
    hd = model.config.head_dim
    sub = subnet_state_dict(model.state_dict(), k, head_dim=hd)
    with torch.no_grad():
        noisy = {n: torch.randn_like(t) * 3 for n, t in clone.state_dict().items()}
        restored = inflate_state_dict(sub, noisy, head_dim=hd)
        clone.load_state_dict(restored)
    return clone


def test_changing_a_head_within_k_changes_output(randomize):
    model, x = make('default', randomize)
    hd, D = model.config.head_dim, model.config.embed_dim
    for k in model.k_choices:
        with torch.no_grad():
            before = model(x, k=k)
            j = k - 1  # the last head subnetwork k uses
            q_rows = model.blocks[0].attn.qkv.weight.view(3, D, D)[0, j * hd:(j + 1) * hd]
            q_rows.add_(1.0)
            after = model(x, k=k)
            q_rows.sub_(1.0)
        assert not torch.allclose(before, after), f'k={k}: head {j} had no effect'


def test_subnet_state_dict_is_contiguous_and_loads_strictly(randomize):
    model, _ = make('odd', randomize)
    sd = subnet_state_dict(model.state_dict(), 2, head_dim=model.config.head_dim)
    assert all(t.is_contiguous() for t in sd.values())
    vit = VisionTransformer(**subnet_vit_kwargs(model.config, 2))
    vit.load_state_dict(sd, strict=True)
    assert sd['blocks.0.attn.qkv.weight'].shape == (3 * 12, 12)


def test_qkv_rows_are_taken_from_each_block(randomize):
    model, _ = make('default', randomize)
    D, d = model.config.embed_dim, 2 * model.config.head_dim
    w = model.state_dict()['blocks.1.attn.qkv.weight']
    sub = subnet_state_dict(model.state_dict(), 2, head_dim=model.config.head_dim)['blocks.1.attn.qkv.weight']
    for i in range(3):  # q, k, v
        assert torch.equal(sub[i * d:(i + 1) * d], w[i * D:i * D + d, :d])


def test_separate_heads_extract_their_own_classifier(randomize):
    model, x = make('default', randomize, separate_heads=True)
    assert set(model.heads.keys()) == {'1', '2', '3', '4'}
    for k in model.k_choices:
        vit = extract_subnet(model, k)
        assert torch.equal(vit.head.weight, model.heads[str(k)].weight)
        with torch.no_grad():
            assert torch.allclose(model(x, k=k), vit(x), atol=1e-5, rtol=0)


def test_deit_tiny_shape_initialises_smallest_subnetwork(randomize):
    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, num_heads=6, head_dim=16, depth=2)
    small = randomize(VisionTransformer(embed_dim=48, num_heads=3, depth=2, img_size=32, patch_size=8,
                                        num_classes=10), seed=5).eval()
    model = HydraViT(**cfg, k_choices=range(3, 7)).eval()
    init_from_vit(model, small)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (model(x, k=3) - small(x)).abs().max().item() <= 1e-5
        assert model(x, k=6).shape == (4, 10)


def test_equal_width_source_becomes_the_full_model(randomize):
    model = HydraViT(**CONFIGS['default']).eval()
    vit = randomize(VisionTransformer(**subnet_vit_kwargs(model.config, 4)), seed=3).eval()
    init_from_vit(model, vit.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize('source_kwargs, message', [
    (dict(depth=3), r'depth mismatch: source has 3 blocks, HydraViT 2'),
    (dict(patch_size=8), r'patch embedding mismatch: source \(in_chans, p, p\) = \(3, 8, 8\), HydraViT \(3, 4, 4\)'),
    (dict(num_classes=4), r'classifier mismatch: source has 4 classes, HydraViT 7; pass ignore_head=True'),
    (dict(embed_dim=48, num_heads=6), r'source width 48 must be a multiple of head_dim 8 and at most 32'),
])
def test_incompatible_source_is_a_clear_error(source_kwargs, message):
    model = HydraViT(**CONFIGS['default'])
    kwargs = dict(img_size=16, patch_size=4, num_classes=7, embed_dim=16, num_heads=2, depth=2)
    vit = VisionTransformer(**{**kwargs, **source_kwargs})
    with pytest.raises(CheckpointMismatchError, match=message):
        init_from_vit(model, vit.state_dict())


def test_head_dim_mismatch_of_a_module_is_a_clear_error():
    model = HydraViT(**CONFIGS['default'])  # head_dim 8
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=7, embed_dim=16, num_heads=1, depth=2)
    with pytest.raises(CheckpointMismatchError, match=r'head_dim mismatch: source heads have 16 channels, HydraViT 8'):
        init_from_vit(model, vit)


def test_foreign_tensor_is_rejected():
    model = HydraViT(**CONFIGS['default'])
    sd = dict(model.state_dict(), **{'stem.conv.weight': torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"unexpected tensor 'stem\.conv\.weight': not a parameter of a HydraViT"):
        subnet_state_dict(sd, 2, head_dim=8)


def test_timm_create_model_registers_variants():
    names = timm.list_models('hydravit_*')
    assert {'hydravit_base_patch16_224', 'hydravit_fmnist_patch7_28', 'hydravit_test_patch4_16'} <= set(names)
    model = timm.create_model('hydravit_test_patch4_16', num_classes=3)
    assert isinstance(model, HydraViT) and model.num_classes == 3
    assert model.pretrained_cfg['input_size'] == (3, 16, 16)
    with pytest.raises(ValueError, match='no pretrained weights are published for hydravit_test_patch4_16'):
        timm.create_model('hydravit_test_patch4_16', pretrained=True)


@pytest.mark.slow
def test_deit_tiny_initialises_k3_of_the_base_model_exactly():
    """The real DeiT-Ti shape into hydravit_base_patch16_224 makes k=3 equal to it (no download: its weights are
    a perturbed random init)."""
    deit = timm.create_model('deit_tiny_patch16_224').eval()
    with torch.no_grad():
        for p in deit.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # norms and biases away from 1 and 0
    model = timm.create_model('hydravit_base_patch16_224')
    init_from_vit(model, deit)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, k=3), deit(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x, k=4), deit(x), atol=1e-3)
