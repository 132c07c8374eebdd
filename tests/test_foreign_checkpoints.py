"""Checkpoints from elsewhere: timm CheckpointSaver files (with and without EMA), plain timm ViT state dicts, unsafe
pickles, checkpoints of another shape, and timm pretrained names without network."""
import argparse
import pathlib
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import CheckpointSaver, ModelEmaV3

from hydravit.cli import main as cli_main
from hydravit.models import HydraViT
from hydravit.storage import CheckpointError, load_model
from hydravit.storage.checkpoint import infer_config
from hydravit.training.model_setup import load_initial_checkpoint, load_pretrained_vit

pytestmark = pytest.mark.usefixtures('one_thread')

# a timm ViT with DeiT's head size (64): 2 heads, depth 2, 32x32 input in 8x8 patches
VIT = dict(img_size=32, patch_size=8, embed_dim=128, num_heads=2, depth=2, num_classes=5)


def _vit(seed: int, randomize, **overrides):
    torch.manual_seed(seed)
    return randomize(timm.create_model('vit_base_patch16_224', **{**VIT, **overrides}), seed).eval()


def _saver_checkpoint(tmp_path, randomize, with_ema: bool, args: argparse.Namespace):
    """A checkpoint written by timm's own CheckpointSaver after one AdamW step (the EMA still holds the weights
    before it, so EMA and raw weights differ)."""
    model = _vit(0, randomize)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema = ModelEmaV3(model, decay=0.5) if with_ema else None
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    return tmp_path / 'model_best.pth.tar', model.eval(), (ema.module.eval() if ema else None)


def _logits(model, x, **kw):
    with torch.no_grad():
        return model.eval()(x, **kw)


def test_checkpoint_saver_file_prefers_ema_and_raw_weights_on_request(tmp_path, randomize, caplog):
    args = argparse.Namespace(model='vit_base_patch16_224', heads=[1, 2], lr=0.1, weights=None, drop_p=1)
    path, raw, ema = _saver_checkpoint(tmp_path, randomize, with_ema=True, args=args)
    x = torch.randn(3, 3, 32, 32)
    with caplog.at_level('INFO', logger='hydravit'):
        model = load_model(path)
    assert 'using the EMA weights (state_dict_ema); --no-use-ema for the raw ones' in caplog.text
    assert model.k_choices == (1, 2)  # the official code's --heads, kept in the checkpoint's args
    assert torch.allclose(_logits(model, x, k=2), _logits(ema, x), atol=1e-5)
    assert not torch.allclose(_logits(model, x, k=2), _logits(raw, x), atol=1e-3)
    raw_model = load_model(path, use_ema=False)
    assert torch.allclose(_logits(raw_model, x, k=2), _logits(raw, x), atol=1e-5)


def test_checkpoint_saver_file_without_ema(tmp_path, randomize):
    path, raw, _ = _saver_checkpoint(tmp_path, randomize, with_ema=False, args=argparse.Namespace(model='x'))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_logits(load_model(path), x, k=2), _logits(raw, x), atol=1e-5)
    with pytest.raises(CheckpointError, match=r'--use-ema: .*model_best\.pth\.tar holds no EMA weights'):
        load_model(path, use_ema=True)


def test_every_subcommand_reads_a_checkpoint_saver_file(tmp_path, randomize, capsys):
    path, _, ema = _saver_checkpoint(tmp_path, randomize, with_ema=True, args=argparse.Namespace(model='vit'))
    assert cli_main(['info', '--checkpoint', str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r'\b2\b.*\b128\b', out), out  # k=2 at width 128, read off the shapes
    assert cli_main(['benchmark', '--checkpoint', str(path), '--k', '2', '--no-use-ema', '--batch-size', '2',
                     '--rounds', '1', '--modes', 'sliced', '--no-memory', '--no-switching', '--min-seconds', '0.01',
                     '--latency-iters', '2']) == 0
    capsys.readouterr()
    # a file from elsewhere records no preprocessing: export asks for the model whose mean/std were used
    assert cli_main(['export', '--checkpoint', str(path), '--k', '2', '--format', 'safetensors', '--output',
                     str(tmp_path / 'exported')]) == 2
    assert 'no preprocessing stored with the checkpoint' in capsys.readouterr().err


def test_plain_timm_state_dicts_load_as_the_universal_model(tmp_path, randomize):
    vit = _vit(1, randomize)
    x = torch.randn(2, 3, 32, 32)
    torch.save(vit.state_dict(), tmp_path / 'vit.pth')
    torch.save({'module.' + k: v for k, v in vit.state_dict().items()}, tmp_path / 'pytorch_model.bin')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / 'model.safetensors'))
    for name in ('vit.pth', 'pytorch_model.bin', 'model.safetensors'):
        model = load_model(tmp_path / name)
        assert isinstance(model, HydraViT)
        c = model.config
        assert (c.img_size, c.patch_size, c.num_heads, c.head_dim, c.depth, c.num_classes) == (32, 8, 2, 64, 2, 5)
        assert torch.allclose(_logits(model, x, k=2), _logits(vit, x), atol=1e-5), name


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / 'executed'

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'args': Payload()}, path)
    with pytest.raises(CheckpointError, match=r'holds Python objects other than tensors, plain containers and '
                                              r'argparse\.Namespace; refusing to unpickle it'):
        load_model(path)
    assert cli_main(['info', '--checkpoint', str(path)]) == 2
    assert not marker.exists()


def test_checkpoints_of_another_shape_are_clear_errors(tmp_path, randomize):
    wide = _vit(2, randomize, embed_dim=256, num_heads=4)
    torch.save(wide.state_dict(), tmp_path / 'wide.pth')
    narrow = HydraViT(img_size=32, patch_size=8, num_heads=2, head_dim=64, depth=2, num_classes=5)
    with pytest.raises(CheckpointError, match=r'--initial-checkpoint .*wide\.pth does not fit 2 heads of 64, depth 2'):
        load_initial_checkpoint(narrow, str(tmp_path / 'wide.pth'))
    with pytest.raises(CheckpointError, match=r'--model hydravit_test_patch4_16 disagrees with the tensor shapes of '
                                              r'.*wide\.pth: embed_dim 256'):
        load_model(tmp_path / 'wide.pth', model_name='hydravit_test_patch4_16')
    # a smaller ViT initialises the leading slices: the k=2 subnetwork of a 4-head model is that ViT
    small = _vit(3, randomize)
    torch.save(small.state_dict(), tmp_path / 'small.pth')
    universal = HydraViT(img_size=32, patch_size=8, num_heads=4, head_dim=64, depth=2, num_classes=5)
    load_initial_checkpoint(universal, str(tmp_path / 'small.pth'))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_logits(universal, x, k=2), _logits(small, x), atol=1e-5)


def test_shapes_that_say_nothing_about_heads_need_a_model_name():
    state = {'patch_embed.proj.weight': torch.zeros(48, 3, 4, 4), 'blocks.0.mlp.fc1.weight': torch.zeros(96, 48),
             'pos_embed': torch.zeros(1, 17, 48), 'cls_token': torch.zeros(1, 1, 48)}
    with pytest.raises(CheckpointError, match=r'expected a ViT with heads of 64 channels; pass the model name'):
        infer_config(state)
    with pytest.raises(CheckpointError, match=r'--model vit_x is not a registered HydraViT model'):
        infer_config(state, model_name='vit_x')


def test_timm_pretrained_name_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(FileNotFoundError, match=r'timm/deit_tiny_patch16_224\.fb_in1k: the weights are not in the '
                                                r'local Hugging Face cache and the hub is switched off'):
        load_pretrained_vit('timm/deit_tiny_patch16_224.fb_in1k')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'ENDPOINT', 'https://127.0.0.1:9')  # loopback, nothing listens: refused at once
    with pytest.raises(FileNotFoundError, match=r'local Hugging Face cache and the hub is unreachable'):
        load_pretrained_vit('timm/deit_tiny_patch16_224.fb_in1k')
    assert constants.HF_HUB_OFFLINE is False  # the cache-only lookup restores the hub setting
    with pytest.raises(FileNotFoundError, match=r'no such file, and not a timm model name'):
        load_pretrained_vit('no_such_model.tag')


def test_eval_use_ema_picks_the_weights_inside_a_timm_checkpoint(tmp_path, randomize, capsys):
    """eval --use-ema / --no-use-ema on a CheckpointSaver file, its architecture named by --model (heads of 8 channels
    cannot be read off the shapes)."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    model = randomize(timm.create_model('vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32, num_heads=4,
                                        depth=2, mlp_ratio=2.0, num_classes=10), 4)  # hydravit_test_patch4_16's shape
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    ema = ModelEmaV3(model, decay=0.5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    CheckpointSaver(model, optimizer, args=argparse.Namespace(model='vit_tiny'), model_ema=ema,
                    checkpoint_dir=str(tmp_path), max_history=1).save_checkpoint(epoch=0, metric=1.0)
    rng = np.random.default_rng(0)
    for c in range(10):
        folder = tmp_path / 'data' / 'val' / f'c{c}'
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / 'x.png')
    losses = {}
    for flag in ('--use-ema', '--no-use-ema'):
        out = tmp_path / f'{flag}.csv'
        assert cli_main(['eval', '--checkpoint', str(tmp_path / 'model_best.pth.tar'), flag, '--model',
                         'hydravit_test_patch4_16', '--dataset', 'folder', '--data-dir', str(tmp_path / 'data'),
                         '-j', '0', '--no-benchmark', '--k', '4', '--results-file', str(out)]) == 0
        header, row = out.read_text().splitlines()[:2]
        losses[flag] = float(row.split(',')[header.split(',').index('loss')])
    log = capsys.readouterr().out
    assert 'using the raw weights (state_dict)' in log and 'using the EMA weights (state_dict_ema)' in log
    assert losses['--use-ema'] != pytest.approx(losses['--no-use-ema'], abs=1e-4)
