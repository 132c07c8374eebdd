"""HydraViT's contract: k is explicit and validated, widths follow k, timm's API is honoured."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

from hydravit import HydraViT
from hydravit.models.subnet import inflate_state_dict, subnet_state_dict, subnet_vit_kwargs

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, num_heads=4, head_dim=8, depth=2)


@pytest.fixture
def model(randomize):
    return randomize(HydraViT(**TINY, k_choices=(2, 3, 4))).eval()


@pytest.mark.parametrize('bad_k', [0, 1, 5, -1])
def test_k_outside_the_trained_set_names_allowed_values(model, bad_k):
    with pytest.raises(ValueError, match=rf'k={bad_k} is not a valid subnetwork: allowed values are \[2, 3, 4\]'):
        model(torch.randn(1, 3, 16, 16), k=bad_k)


@pytest.mark.parametrize('bad_k', [2.0, 2.5, '3', True, None.__class__])
def test_k_that_is_not_an_int_is_refused_not_cast(model, bad_k):
    with pytest.raises(ValueError, match=r'k must be an int, one of \[2, 3, 4\].*; got '):
        model(torch.randn(1, 3, 16, 16), k=bad_k)


@pytest.mark.parametrize('k_choices, message', [
    ((2, 5), r'k_choices \[5\] outside 1\.\.4'),
    ((2, 3, 2), r'k_choices \[2, 3, 2\] names \[2\] more than once'),
    ((True, 2), r'k_choices must be integers, got \[True\]'),
    ((2.5, 4), r'k_choices must be integers, got \[2\.5\]'),
])
def test_bad_k_choices_rejected(k_choices, message):
    with pytest.raises(ValueError, match=message):
        HydraViT(**TINY, k_choices=k_choices)


@pytest.mark.parametrize('shape, what', [((2, 1, 16, 16), '3, 16, 16'), ((2, 3, 32, 32), '3, 16, 16'),
                                         ((3, 16, 16), '3, 16, 16')])
def test_wrong_image_size_or_channels(model, shape, what):
    got = ', '.join(map(str, shape))
    with pytest.raises(ValueError, match=rf'expected images of shape \(batch, {what}\).*got \({got}\)'):
        model(torch.randn(*shape))


def test_use_k_sets_and_restores_active_k(model):
    x = torch.randn(2, 3, 16, 16)
    assert model.active_k == 4
    with torch.no_grad(), model.use_k(2):
        assert model.active_k == 2
        assert torch.equal(model(x), model(x, k=2))
        with model.use_k(3):
            assert torch.equal(model(x), model(x, k=3))
        assert model.active_k == 2
    assert model.active_k == 4
    with pytest.raises(AttributeError, match="'active_k'"):
        model.active_k = 3  # read-only: only use_k changes it
    with pytest.raises(ValueError, match=r'k=1 is not a valid subnetwork: allowed values are \[2, 3, 4\]'):
        with model.use_k(1):
            pass
    assert model.active_k == 4


def test_forward_features_and_head_follow_k(model):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x, k=3)
        assert feats.shape == (2, 17, 24)
        assert model.forward_head(feats, pre_logits=True, k=3).shape == (2, 24)
        assert torch.allclose(model.forward_head(feats, k=3), model(x, k=3))
        with pytest.raises(ValueError, match=r'width 24 but subnetwork k=2 has width 16: pass the same k'):
            model.forward_head(feats, k=2)


def test_gradients_reach_only_the_active_slice(randomize):
    model = randomize(HydraViT(**TINY)).train()
    model(torch.randn(4, 3, 16, 16), k=2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == model.state_dict().keys()
    inside = subnet_state_dict(grads, 2, head_dim=8)  # the gradient entries that subnetwork 2 owns
    # the gradient with everything outside subnetwork 2 set to zero: equal to the gradient itself
    only_inside = inflate_state_dict(inside, {n: torch.zeros_like(g) for n, g in grads.items()}, head_dim=8)
    for name, g in grads.items():
        assert torch.equal(only_inside[name], g), f'{name}: gradient outside subnetwork 2'
        assert inside[name].count_nonzero() > 0, f'{name}: no gradient inside subnetwork 2'
        assert inside[name].numel() < g.numel() or name == 'head.bias', f'{name}: not sliced at k=2'


def test_grad_checkpointing_matches_plain_backward(randomize):
    model = randomize(HydraViT(**TINY, drop_path_rate=0.0)).train()
    x = torch.randn(3, 3, 16, 16)
    model(x, k=3).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    # checkpointing recomputes each block in the backward pass: count the block forwards to see it is on
    calls = []
    for block in model.blocks:
        block.forward = (lambda f: lambda *args: calls.append(1) or f(*args))(block.forward)
    model(x, k=3).square().sum().backward()
    assert len(calls) == 2 * len(model.blocks), 'set_grad_checkpointing(True) did not checkpoint the blocks'
    for a, p in zip(plain, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_drop_path_acts_at_every_k(randomize):
    model = randomize(HydraViT(**TINY, drop_path_rate=0.5)).train()
    x = torch.randn(64, 3, 16, 16)
    for k in (1, 4):
        torch.manual_seed(0)
        a = model(x, k=k)
        torch.manual_seed(1)
        b = model(x, k=k)
        assert a.shape == (64, 5) and not torch.allclose(a, b), 'drop-path did nothing in train mode'
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, k=2), model(x, k=2))


def test_timm_style_methods(model):
    from timm.models import group_parameters
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    # timm's layer-wise grouping (layer decay) puts every parameter where it puts a timm ViT's: embeddings,
    # one group per block (the final norm with the last), the head
    groups = dict(group_parameters(model, model.group_matcher()))
    vit = VisionTransformer(**subnet_vit_kwargs(model.config, 4))
    assert groups == dict(group_parameters(vit, vit.group_matcher()))
    assert groups[0] == ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias']
    assert groups[3] == ['head.weight', 'head.bias']
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.config.num_classes == 7
    assert model(torch.randn(1, 3, 16, 16), k=2).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 16, 16), k=2).shape == (1, 16)


def test_timm_optimizer_factory_and_ema_accept_the_model(model):
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_decay and id(model.blocks[0].norm1.weight) in no_decay
    ema = ModelEmaV3(model, decay=0.9)
    assert isinstance(ema.module, HydraViT) and ema.module.k_choices == model.k_choices
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ema.module(x, k=2), model(x, k=2))
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # every entry moves 10 % of the way to the model's
    for (name, e), p in zip(ema.module.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(e, p - 0.9, msg=name)


class _OpLog(TorchDispatchMode):
    """The ATen operators a forward pass dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func).split('.')[1])
        return func(*args, **(kwargs or {}))


def test_forward_reads_weights_through_views_never_copies(model):
    """Slicing by views: gathering the q/k/v rows of the first k heads by fancy indexing would show as aten.index,
    a copy per call."""
    x = torch.randn(2, 3, 16, 16)
    for k in model.k_choices:
        with torch.no_grad(), _OpLog() as log:
            model(x, k=k)
        assert 'slice' in log.ops and 'addmm' in log.ops, log.ops
        copies = log.ops & {'clone', 'copy_', 'index', 'index_select', '_to_copy', 'contiguous', 'gather'}
        assert not copies, f'k={k}: {copies}'
