"""--opt-active-slice: AdamW over the active slice changes only that slice, exactly as a standalone ViT's AdamW."""
import pytest
import torch
import torch.nn.functional as F

from hydravit.models import HydraViT, extract_subnet, init_from_vit
from hydravit.training import load_train_config
from hydravit.training.slice_optimizer import ActiveSliceAdamW

# no q/k/v bias: the key bias has an exactly-zero gradient (softmax ignores it), whose rounding noise Adam would
# blow up to a full step in either model
SHAPE = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, num_heads=4, head_dim=8, depth=2, qkv_bias=False)


def _steps(model, optimizer, x, y, ks, k_of_step):
    for k in ks:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, k=k) if k_of_step else model(x), y).backward()
        if isinstance(optimizer, ActiveSliceAdamW):
            optimizer.active_k = k
        optimizer.step()


def test_active_slice_step_equals_the_standalone_vits_adamw_and_leaves_the_tail_untouched(randomize):
    torch.manual_seed(0)
    model = randomize(HydraViT(**SHAPE)).train()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 7, (5,))
    k = 2
    vit = extract_subnet(model, k).train()
    expected = HydraViT(**SHAPE)
    expected.load_state_dict(model.state_dict())
    hyper = dict(lr=1e-2, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    _steps(model, ActiveSliceAdamW(model.parameters(), model, **hyper), x, y, [k, k, k], True)
    _steps(vit, torch.optim.AdamW(vit.parameters(), foreach=True, **hyper), x, y, [None] * 3, False)

    # the standalone ViT after three AdamW steps, written into the leading slices of the untrained weights
    init_from_vit(expected, vit)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    tail = model.blocks[1].attn.qkv.weight.detach().view(3, 32, 32)[:, 16:]  # rows of heads 3-4 in q, k and v
    assert torch.equal(tail, expected.blocks[1].attn.qkv.weight.detach().view(3, 32, 32)[:, 16:])  # exact


def test_larger_k_of_the_step_sets_the_slice_and_state_resumes_as_plain_adamw(randomize):
    model = randomize(HydraViT(**SHAPE)).train()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 7, (5,))
    optimizer = ActiveSliceAdamW(model.parameters(), model, lr=1e-2, weight_decay=0.05)
    tail = model.blocks[0].mlp.fc1.weight.detach()[96:].clone()  # neurons only k=4 uses
    _steps(model, optimizer, x, y, [3], True)
    assert torch.equal(model.blocks[0].mlp.fc1.weight.detach()[96:], tail)
    _steps(model, optimizer, x, y, [4], True)
    assert not torch.equal(model.blocks[0].mlp.fc1.weight.detach()[96:], tail)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    plain.load_state_dict(optimizer.state_dict())  # same state layout: a run can switch the flag on resume
    assert float(plain.state[model.blocks[0].mlp.fc1.weight]['step']) == 2


def test_paper_default_moves_the_inactive_tail(randomize):
    """The default AdamW (the paper's behaviour): weight decay shrinks weights that k=2 never used."""
    model = randomize(HydraViT(**SHAPE)).train()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 7, (5,))
    tail_before = model.blocks[0].mlp.fc1.weight.detach()[-1].clone()  # neuron 127: only k=4 uses it
    _steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05), x, y, [2], True)
    assert not torch.equal(model.blocks[0].mlp.fc1.weight.detach()[-1], tail_before)
    model2 = randomize(HydraViT(**SHAPE)).train()
    _steps(model2, ActiveSliceAdamW(model2.parameters(), model2, lr=1e-2, weight_decay=0.05), x, y, [2], True)
    assert torch.equal(model2.blocks[0].mlp.fc1.weight.detach()[-1], tail_before)


def test_opt_active_slice_needs_adamw():
    with pytest.raises(ValueError, match='--opt-active-slice'):
        load_train_config(None, opt='sgd', opt_active_slice=True)
