"""Checkpoints are safe to load, self-describing, and rejected clearly when they are not HydraViT's."""
import argparse
import fractions
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from hydravit import HydraViT
from hydravit.models.subnet import CheckpointMismatchError, init_from_vit
from hydravit.storage.checkpoint import (
    CheckpointError,
    atomic_write,
    load_model,
    load_state_dict_file,
    read_metadata,
    save_model,
)

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, num_heads=4, head_dim=8, depth=2)


def test_save_and_load_round_trip(tmp_path, randomize):
    model = randomize(HydraViT(**TINY, k_choices=(2, 4), separate_heads=True)).eval()
    path = save_model(tmp_path / 'm.safetensors', model, metadata={'epoch': '3'})
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    assert read_metadata(path)['epoch'] == '3'
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, k=2), loaded(x, k=2))
    assert not list(tmp_path.glob('.*.tmp')), 'temporary file left behind'


def test_overrides_widen_k_choices(tmp_path):
    path = save_model(tmp_path / 'm.safetensors', HydraViT(**TINY, k_choices=(3, 4)))
    assert load_model(path, k_choices=range(1, 5)).k_choices == (1, 2, 3, 4)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError,
                       match=r'evil\.pth holds Python objects other than tensors.*refusing to unpickle'):
        load_state_dict_file(path)


def test_timm_train_checkpoint_with_namespace_args_loads_its_state_dict(tmp_path):
    path = tmp_path / 'checkpoint-3.pth.tar'
    weights = {'w': torch.arange(3.0)}
    torch.save({'epoch': 3, 'arch': 'vit', 'state_dict': weights, 'args': argparse.Namespace(lr=0.1)}, path)
    assert torch.equal(load_state_dict_file(path)['w'], weights['w'])


def test_torch_state_dict_of_tensors_loads(tmp_path):
    path = tmp_path / 'ok.pth'
    model = HydraViT(**TINY)
    torch.save({'model': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    sd = load_state_dict_file(path)
    assert set(sd) == set(model.state_dict())  # the DDP prefix is dropped
    assert all(torch.equal(sd[name], tensor) for name, tensor in model.state_dict().items())


def test_non_tensor_mapping_is_not_a_state_dict(tmp_path):
    path = tmp_path / 'cfg.pth'
    torch.save({'lr': 0.1, 'name': 'x'}, path)
    with pytest.raises(CheckpointError,
                       match=r'cfg\.pth is not a state dict: expected a mapping of parameter names to tensors'):
        load_state_dict_file(path)


def test_other_architecture_is_a_clear_error(tmp_path):
    resnet_like = {'conv1.weight': torch.zeros(8, 3, 3, 3), 'fc.weight': torch.zeros(10, 8)}
    path = tmp_path / 'resnet.safetensors'
    save_file(resnet_like, str(path))
    message = r'resnet\.safetensors is not a HydraViT checkpoint nor a timm ViT state dict \(no patch_embed\.proj'
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_other_architecture_as_init_source_is_a_clear_error():
    resnet_like = {'conv1.weight': torch.zeros(8, 3, 3, 3), 'fc.weight': torch.zeros(10, 8)}
    with pytest.raises(CheckpointMismatchError, match=r'not a timm VisionTransformer|patch_embed\.proj\.weight'):
        init_from_vit(HydraViT(**TINY), resnet_like)


def test_config_and_weights_disagree(tmp_path):
    model = HydraViT(**TINY)
    path = tmp_path / 'bad.safetensors'
    config = dict(model.config.to_dict(), depth=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={'hydravit_config': json.dumps(config)})
    with pytest.raises(CheckpointError, match='bad.safetensors: weights do not match the config stored with them'):
        load_model(path)


def test_garbage_files(tmp_path):
    (tmp_path / 'x.safetensors').write_bytes(b'not a safetensors file at all')
    with pytest.raises(CheckpointError, match=r'x\.safetensors: not a readable safetensors file'):
        load_model(tmp_path / 'x.safetensors')
    with pytest.raises(CheckpointError, match=r'checkpoint .*missing\.pth does not exist'):
        load_state_dict_file(tmp_path / 'missing.pth')


def test_garbage_torch_file_is_reported_unreadable_not_unsafe(tmp_path):
    (tmp_path / 'x.pth').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match=r'x\.pth: not a readable torch checkpoint'):
        load_state_dict_file(tmp_path / 'x.pth')


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / 'f.bin'
    target.write_bytes(b'old')

    def failing(tmp):
        open(tmp, 'wb').write(b'half')
        raise RuntimeError('killed')

    with pytest.raises(RuntimeError, match='killed'):
        atomic_write(target, failing)
    assert target.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['f.bin']


def test_atomic_write_gives_the_permissions_a_plain_write_would(tmp_path):
    plain = tmp_path / 'plain.txt'
    plain.write_text('x')
    written = atomic_write(tmp_path / 'atomic.txt', lambda tmp: open(tmp, 'w').write('x'))
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777  # not mkstemp's private 0600
