"""The universal model as a timm citizen at every k: feature API, TorchScript/FX, resizing, timm conventions."""
import os
import warnings

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, set_layer_config
from timm.models import create_feature_extractor
from timm.models.vision_transformer import VisionTransformer

from hydravit.models import HydraViT, extract_subnet
from hydravit.models.factory import create_model
from hydravit.models.features import KFeatureGetterNet
from hydravit.storage.checkpoint import save_model

from helpers import CONFIGS

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, num_heads=4, head_dim=8, depth=3)


@pytest.fixture
def model(randomize):
    return randomize(HydraViT(**TINY, k_choices=(2, 3, 4))).eval()


def _silent(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script's deprecation notice
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ features
@pytest.mark.parametrize('name', ['default', 'odd', 'avg_no_cls'])
@pytest.mark.parametrize('output_fmt', ['NCHW', 'NLC'])
def test_intermediates_at_k_equal_the_extracted_subnets(randomize, name, output_fmt):
    model = randomize(HydraViT(**CONFIGS[name])).eval()
    x = torch.randn(2, model.in_chans, model.config.img_size, model.config.img_size)
    for k in model.k_choices:
        vit = extract_subnet(model, k)
        for norm in (False, True):
            kwargs = dict(indices=[0, -1], norm=norm, output_fmt=output_fmt)
            with torch.no_grad():
                final, ours = model.forward_intermediates(x, k=k, **kwargs)
                vit_final, theirs = vit.forward_intermediates(x, **kwargs)
            assert len(ours) == 2
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == b.shape and a.shape[1 if output_fmt == 'NCHW' else -1] == k * model.config.head_dim
                assert (a - b).abs().max().item() <= 1e-5
            assert (final - vit_final).abs().max().item() <= 1e-5


def test_intermediates_options_follow_timm(model):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        only = model.forward_intermediates(x, k=3, indices=2, intermediates_only=True, output_fmt='NLC')
        vit = extract_subnet(model, 3)
        theirs = vit.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt='NLC')
        pairs = model.forward_intermediates(x, k=3, indices=1, return_prefix_tokens=True, intermediates_only=True)
        as_dict = model.forward_intermediates(x, k=2, indices=[1], output_dict=True)
    assert len(only) == 2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(only, theirs, strict=True))
    (spatial, prefix), = pairs
    assert spatial.shape == (2, 24, 4, 4) and prefix.shape == (2, 1, 24)
    assert as_dict['image_intermediates'][0].shape == (2, 16, 4, 4) and as_dict['image_features'].shape == (2, 17, 16)
    with pytest.raises(ValueError, match=r"output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(x, output_fmt='NHWC')
    with pytest.raises(ValueError, match=r'k=1 is not a valid subnetwork: allowed values are \[2, 3, 4\]'):
        model.forward_intermediates(x, k=1)


def test_prune_intermediate_layers_keeps_the_features(model):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model.forward_intermediates(x, k=2, indices=[0, 1], intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.blocks) == 2 and len(model.feature_info) == 2
    assert model.num_classes == 0 and model.global_pool == ''
    with torch.no_grad():
        after = model.forward_intermediates(x, k=2, indices=[0, 1], intermediates_only=True)
        assert model(x, k=2).shape == (2, 17, 16)  # no head, no pooling: the tokens
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_pruned_model_saves_and_reloads_or_is_refused(randomize, tmp_path):
    from hydravit.storage.checkpoint import load_model
    model = randomize(HydraViT(**TINY, k_choices=(2, 4))).eval()
    model.prune_intermediate_layers([0], prune_head=False)  # fewer blocks: the config's depth says so
    path = save_model(tmp_path / 'pruned.safetensors', model)
    reloaded = load_model(path).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert len(reloaded.blocks) == 1 and torch.equal(reloaded(x, k=2), model(x, k=2))
    for kwargs, problem in ((dict(), "global_pool '' where the config has 'token'"),
                            (dict(prune_head=False, prune_norm=True), 'the final norm was dropped')):
        pruned = HydraViT(**TINY, k_choices=(2, 4))
        pruned.prune_intermediate_layers([0], **kwargs)  # nothing in the config records these: no checkpoint
        with pytest.raises(ValueError, match=rf'refusing to write .*\({problem}\).*save it before pruning'):
            save_model(path, pruned)
        assert torch.equal(load_model(path)(x, k=2), reloaded(x, k=2))  # the file already there is untouched


def test_features_only_through_timm_with_selectable_k(randomize):
    net = timm.create_model('hydravit_test_patch4_16', features_only=True, out_indices=(0, 1), feature_k=2)
    assert isinstance(net, KFeatureGetterNet)
    randomize(net)
    assert net.feature_info.channels() == [16, 16] and net.feature_info.reduction() == [4, 4]
    assert net.channels(4) == [32, 32]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        at_default, at_4 = net(x), net(x, k=4)
        expected = net.model.forward_intermediates(x, k=4, indices=[0, 1], intermediates_only=True)
    assert [f.shape for f in at_default] == [(2, 16, 4, 4)] * 2
    assert all(torch.equal(a, b) for a, b in zip(at_4, expected, strict=True))
    with pytest.raises(ValueError, match=r'k=7 is not a valid subnetwork'):
        timm.create_model('hydravit_test_patch4_16', features_only=True, feature_k=7)
    with pytest.raises(ValueError, match=r'feature_k selects the k of a features_only=True model'):
        timm.create_model('hydravit_test_patch4_16', feature_k=2)


def test_fx_feature_extraction_at_a_fixed_k(model):
    x = torch.randn(2, 3, 16, 16)
    with model.use_k(3):
        extractor = create_feature_extractor(model, ['blocks.0', 'blocks.2'])
    with torch.no_grad():
        out = extractor(x)
        expected = model.forward_intermediates(x, k=3, indices=[0, 2], intermediates_only=True, output_fmt='NLC')
    assert [v.shape for v in out.values()] == [(2, 17, 24)] * 2
    assert all(torch.equal(a[:, 1:], b) for a, b in zip(out.values(), expected, strict=True))
    graph_net = timm.create_model('hydravit_test_patch4_16', features_only=True, feature_cls='fx', out_indices=(1,))
    assert graph_net(x)[0].shape == (2, 17, 32)


# ------------------------------------------------------------------------------------------ TorchScript / FX
def test_torchscript_takes_k_as_an_int_and_equals_eager(model):
    scripted = _silent(torch.jit.script, model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for k in model.k_choices:
            assert torch.equal(scripted(x, k), model(x, k=k))
        assert torch.equal(scripted(x), model(x))
    with pytest.raises(torch.jit.Error, match=r'k=1 is not a valid subnetwork: allowed values are \[2, 3, 4\]'):
        scripted(x, 1)


def test_torchscript_with_timm_scriptable_and_separate_heads(randomize):
    with set_layer_config(scriptable=True):
        model = randomize(HydraViT(**TINY, separate_heads=True)).eval()
    scripted = _silent(torch.jit.script, model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for k in model.k_choices:
            assert torch.equal(scripted(x, k), model(x, k=k))


def test_exportable_layer_config_uses_the_explicit_attention_like_timm(randomize):
    with set_layer_config(exportable=True):
        model = randomize(create_model('hydravit_test_patch4_16')).eval()
        vit = extract_subnet(model, 2)
    assert not model.blocks[0].attn.fused_attn and not vit.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x, k=2) - vit(x)).abs().max().item() <= 1e-5


def test_fx_symbolic_trace_fixes_k_at_trace_time(model):
    x = torch.randn(2, 3, 16, 16)
    traced = torch.fx.symbolic_trace(model, concrete_args={'k': 3})
    with torch.no_grad():
        assert torch.equal(traced(x, 3), model(x, k=3))
    with model.use_k(2):
        traced_active = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for k in (2, 4):
            assert torch.equal(torch.fx.symbolic_trace(model, concrete_args={'k': k})(x, k), model(x, k=k))
        assert torch.equal(traced_active(x), model(x, k=2))
    with pytest.raises(ValueError, match=r'traced at k=2 and runs only that subnetwork, got k=4'):
        traced_active(x, 4)
    with pytest.raises(ValueError, match=r'expected images of shape \(batch, 3, 16, 16\)'):
        traced_active(torch.randn(2, 3, 20, 20))  # the input check runs in the traced graph too
    with pytest.raises(ValueError, match=r'k=1 is not a valid subnetwork'):
        torch.fx.symbolic_trace(model, concrete_args={'k': 1})  # k is validated in Python, at trace time


# ------------------------------------------------------------------------------------------ resizing
def test_set_input_size_resamples_like_timm(model):
    vit = extract_subnet(model, 3)
    model.set_input_size(img_size=24)
    vit.set_input_size(img_size=(24, 24))
    assert model.config.img_size == 24 and model.pos_embed.shape == (1, 37, 32)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert (model(x, k=3) - vit(x)).abs().max().item() <= 1e-5
        assert (extract_subnet(model, 3)(x) - vit(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r'img_size 25 is not a multiple of patch_size 4'):
        model.set_input_size(img_size=25)
    model.set_input_size(patch_size=8)
    assert model.patch_embed.proj.weight.shape[-1] == 8 and model(x, k=2).shape == (2, 5)


def test_dynamic_img_size_equals_timm(randomize):
    model = randomize(HydraViT(**TINY, dynamic_img_size=True)).eval()
    vit = extract_subnet(model, 3)
    assert vit.dynamic_img_size
    for size in (16, 24, 8):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert (model(x, k=3) - vit(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r'H and W multiples of the patch size 4 \(dynamic_img_size\), got \(1, 3, 18'):
        model(torch.randn(1, 3, 18, 18))


def test_separate_vits_take_dynamic_img_size_like_timm(randomize):
    model = randomize(create_model('hydravit_test_patch4_16', nesting='separate', k_choices=(2, 4),
                                   dynamic_img_size=True)).eval()
    for k in (2, 4):
        vit = extract_subnet(model, k)  # timm's own VisionTransformer, resampling its position embedding itself
        assert vit.dynamic_img_size and model.subnet(k).dynamic_img_size
        for size in (24, 8):
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                assert (model(x, k=k) - vit(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r'multiples of the patch size 4 \(dynamic_img_size\)'):
        model(torch.randn(1, 3, 18, 18), k=2)


def test_pretrained_file_loads_at_a_new_resolution(tmp_path, randomize):
    small = randomize(create_model('hydravit_fmnist_patch7_28', depth=1)).eval()
    path = save_model(tmp_path / 'model_best.safetensors', small)
    big = timm.create_model('hydravit_fmnist_patch7_28', depth=1, img_size=56, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    expected_pos = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[8, 8], old_size=[4, 4],
                                          num_prefix_tokens=1)
    assert torch.equal(big.pos_embed, expected_pos)
    manual = create_model('hydravit_fmnist_patch7_28', depth=1, img_size=56).eval()
    manual.load_state_dict({**small.state_dict(), 'pos_embed': expected_pos})
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        for k in (3, 12):
            assert torch.equal(big(x, k=k), manual(x, k=k))
    same = timm.create_model('hydravit_fmnist_patch7_28', depth=1, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), small.state_dict().values(), strict=True))


def test_pretrained_needs_a_local_file(tmp_path):
    with pytest.raises(ValueError, match=r'no pretrained weights are published for hydravit_test_patch4_16: pass a '
                                         r'checkpoint file with pretrained_cfg_overlay=dict\(file='):
        timm.create_model('hydravit_test_patch4_16', pretrained=True)
    with pytest.raises(FileNotFoundError, match=r'pretrained file .*missing.safetensors does not exist'):
        timm.create_model('hydravit_test_patch4_16', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.safetensors')))


# ------------------------------------------------------------------------------------------ conventions
def test_reset_classifier_and_num_classes_zero_give_pre_logits(model):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x, k=3), pre_logits=True, k=3)
        model.reset_classifier(0, '')
        tokens = model(x, k=3)
        model.reset_classifier(0, 'token')
        pooled = model(x, k=3)
    assert tokens.shape == (2, 17, 24) and torch.equal(pooled, pre)
    vit = extract_subnet(model, 3)
    assert vit.num_classes == 0 and vit.global_pool == 'token'
    no_head = timm.create_model('hydravit_test_patch4_16', num_classes=0).eval()
    assert no_head(torch.randn(1, 3, 16, 16), k=2).shape == (1, 16)
    with pytest.raises(ValueError, match=r"global_pool must be one of \['token', 'avg', ''\], got 'max'"):
        model.reset_classifier(0, 'max')


def test_extracted_subnet_carries_a_plain_vit_pretrained_cfg(tmp_path, randomize):
    from timm.models import save_for_hf
    model = randomize(create_model('hydravit_fmnist_patch7_28', depth=1)).eval()
    vit = extract_subnet(model, 6)
    cfg = vit.pretrained_cfg
    assert cfg['architecture'] == 'vit_base_patch16_224' and tuple(cfg['input_size']) == (1, 28, 28)
    assert tuple(cfg['mean']) == model.pretrained_cfg['mean'] and tuple(cfg['std']) == model.pretrained_cfg['std']
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear' and cfg['num_classes'] == 10
    save_for_hf(vit, tmp_path / 'k6', safe_serialization=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "k6"}', pretrained=True).eval()
    assert isinstance(reloaded, VisionTransformer) and reloaded.embed_dim == 48
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert (reloaded(x) - model(x, k=6)).abs().max().item() <= 1e-5


def test_written_files_are_0644_under_a_022_umask(tmp_path, randomize):
    from hydravit.deployment.export import export_subnets
    previous = os.umask(0o022)
    try:
        model = randomize(create_model('hydravit_test_patch4_16')).eval()
        path = save_model(tmp_path / 'run' / 'model_best.safetensors', model)
        export_subnets(path, [2], ['timm', 'safetensors'], tmp_path / 'out', model_name='hydravit_test_patch4_16')
    finally:
        os.umask(previous)
    files = [path, *(p for p in (tmp_path / 'out').rglob('*') if p.is_file())]
    assert {p.name for p in files} >= {'model_best.safetensors', 'k2.safetensors', 'model.safetensors', 'config.json'}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: '0o644' for p in files}
