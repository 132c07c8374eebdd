"""``--model`` together with ``--checkpoint`` on every subcommand that takes a model: the file's weights in the named
architecture (needed where the shapes cannot tell it, e.g. heads of 8 channels), and a clear error when the name
disagrees with the file."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hydravit.cli import main as cli_main
from hydravit.models import create_model
from hydravit.serving.server import ServeConfig, build_state
from hydravit.storage import CheckpointError, load_model, save_model
from hydravit.storage.run_folder import load_or_create_model

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = 'hydravit_test_patch4_16'  # 16x16 input, 4 heads of 8 channels, depth 2, 10 classes
OTHER = 'hydravit_fmnist_patch7_28'  # 28x28 grey input, 12 heads of 8, depth 6
# a few cheap settings per subcommand, enough to run it to the end on the tiny model
QUICK = {
    'info': [],
    'benchmark': ['--k', '2', '--batch-size', '2', '--rounds', '1', '--modes', 'sliced', '--no-memory',
                  '--no-switching', '--min-seconds', '0.01', '--latency-iters', '2'],
    'select': ['--gmacs', '1'],
    'serve-demo': ['-b', '1', '--batches', '1', '--busy', '0', '--target-ms', '1000'],
}


@pytest.fixture
def timm_state_dict(tmp_path, randomize):
    """A plain timm ViT state dict of TINY's shape: its 32 channels could be 4 heads of 8 or anything else."""
    torch.manual_seed(0)
    vit = randomize(timm.create_model('vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32, num_heads=4,
                                      depth=2, mlp_ratio=2.0, num_classes=10), 1).eval()
    path = tmp_path / 'vit.pth'
    torch.save(vit.state_dict(), path)
    return path, vit


@pytest.mark.parametrize('command', sorted(QUICK))
def test_model_names_the_architecture_of_a_checkpoint_that_stores_none(command, timm_state_dict, capsys):
    path, _ = timm_state_dict
    assert cli_main([command, '--checkpoint', str(path), *QUICK[command]]) == 2
    assert 'expected a ViT with heads of 64 channels; pass the model name (--model)' in capsys.readouterr().err
    assert cli_main([command, '--checkpoint', str(path), '--model', TINY, *QUICK[command]]) == 0
    out = capsys.readouterr()
    assert 'Error' not in out.err and 'error:' not in out.err, out.err


def test_both_give_the_files_weights_in_the_named_architecture(timm_state_dict):
    path, vit = timm_state_dict
    model, checkpoint = load_or_create_model(TINY, path)
    assert checkpoint == path and model.config.head_dim == 8 and model.config.num_heads == 4
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, k=4), vit(x), atol=1e-5)  # the file's weights, not TINY's init


@pytest.mark.parametrize('command', sorted(QUICK) + ['eval', 'export', 'predict', 'cascade'])
def test_a_model_that_disagrees_with_the_file_is_a_clear_error(command, tmp_path, capsys):
    torch.manual_seed(0)
    path = save_model(tmp_path / 'tiny.safetensors', create_model(TINY))
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    extra = {'export': ['--output', str(tmp_path / 'out')], 'predict': [str(image)],
             'cascade': ['--max-drop', '1']}.get(command, QUICK.get(command, []))
    assert cli_main([command, '--checkpoint', str(path), '--model', OTHER, *extra]) == 2
    err = capsys.readouterr().err
    assert f'--model {OTHER} disagrees with {path} (its stored config)' in err, err
    assert 'in_chans 3 (file) vs 1' in err and 'depth 2 (file) vs 6' in err and 'patch_size 4 (file) vs 7' in err
    assert 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_serve_refuses_a_disagreeing_model_before_serving(tmp_path):
    path = save_model(tmp_path / 'tiny.safetensors', create_model(TINY))
    with pytest.raises(CheckpointError, match=f'--model {OTHER} disagrees with .*depth 2 .file. vs 6'):
        build_state(ServeConfig(checkpoint=str(path), latency_ms=100, model=OTHER))
    assert build_state(ServeConfig(checkpoint=str(path), latency_ms=100, model=TINY)).model.config.depth == 2


def test_shapes_that_disagree_with_the_named_model_are_listed(tmp_path, randomize):
    """A timm ViT of another width and depth under --model TINY: named field by field, before any load."""
    vit = randomize(timm.create_model('vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=64, num_heads=8,
                                      depth=3, mlp_ratio=2.0, num_classes=10), 2)
    torch.save(vit.state_dict(), tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError, match=r'--model hydravit_test_patch4_16 disagrees with the tensor shapes of '
                                              r'.*wide\.pth: embed_dim 64 \(file\) vs 32 .*; depth 3 \(file\) vs 2'):
        load_model(tmp_path / 'wide.pth', model_name=TINY)
    # a training run with another input size (hydravit train --img-size) keeps its model name
    torch.manual_seed(0)
    path = save_model(tmp_path / 'big.safetensors', create_model(TINY, img_size=32))
    assert load_model(path, model_name=TINY).config.img_size == 32
