"""torch.compile of a universal model: each k compiles once, switching back and forth compiles nothing more.

Compilations are counted with dynamo's ``CompileCounter`` backend (it runs the captured graph as it is), so no
C++ compiler is involved and the tests stay fast.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hydravit.cli import main
from hydravit.evaluation.evaluate import evaluate_subnets
from hydravit.models import HydraViT
from hydravit.models.compiled import CompileOptions, compile_universal
from hydravit.training import load_train_config

# more k (10) than dynamo's default recompile limit (8), tiny everything else
TEN_K = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, num_heads=10, head_dim=2, depth=1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No cached graphs, and dynamo's release default recompile limit (under pytest torch raises it)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        yield
    torch._dynamo.reset()


def test_each_k_compiles_once_in_training_and_switching_back_compiles_nothing(randomize):
    assert len(HydraViT(**TEN_K).k_choices) > torch._dynamo.config.recompile_limit  # the case that needs care
    model = randomize(HydraViT(**TEN_K)).train()
    counter = CompileCounter()
    compiled = compile_universal(model, CompileOptions(backend=counter))
    x = torch.randn(4, 1, 8, 8)
    after_first_round, after_second_round = [], []
    for counts in (after_first_round, after_second_round):
        for k in model.k_choices:
            out = compiled(x, k=k)
            out.sum().backward()
            counts.append(counter.frame_count)
            torch.testing.assert_close(out, model(x, k=k))
    assert after_first_round == list(range(1, 11))  # one new graph per new k, none of them fell back to eager
    assert after_second_round == [10] * 10
    assert torch._dynamo.config.recompile_limit == 8  # raised only while a compiled call runs


def test_evaluation_pads_the_last_batch_instead_of_compiling_again(randomize):
    model = randomize(HydraViT(**TEN_K))
    counter = CompileCounter()
    data = [(torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))) for _ in range(2)]
    data.append((torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))))  # a smaller last batch
    ks = [1, 5, 10]
    rows = evaluate_subnets(model, data, ks, compile_options=CompileOptions(backend=counter))
    assert counter.frame_count == len(ks)
    eager = evaluate_subnets(model, data, ks)
    for compiled_row, eager_row in zip(rows, eager, strict=True):
        assert compiled_row['num_samples'] == eager_row['num_samples'] == 17
        assert compiled_row['top1'] == eager_row['top1']
        assert compiled_row['loss'] == pytest.approx(eager_row['loss'], rel=1e-5)


@pytest.mark.slow
def test_train_with_torchcompile_trains_like_eager_and_compiles_once_per_k_and_mode(tmp_path):
    from torch._dynamo.utils import counters

    from hydravit.training.distributed import DistEnv
    from hydravit.training.trainer import Trainer

    class Tensors(torch.utils.data.TensorDataset):
        num_classes = 10

    g = torch.Generator().manual_seed(0)
    data = Tensors(torch.randn(20, 3, 16, 16, generator=g), torch.randint(0, 10, (20,), generator=g))
    val = data  # two batches of 8 and one of 4
    weights = {}
    for backend in (None, 'eager'):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_train_config(None, model='hydravit_test_patch4_16', sampler='all', batch_size=8, epochs=1,
                                warmup_epochs=0, scale=None, ratio=None, report=False, torchcompile=backend,
                                output=str(tmp_path / str(backend)))
        trainer = Trainer(cfg, DistEnv(), datasets=(data, val))
        trainer.fit()
        weights[backend] = trainer.model.state_dict()
        if backend:  # 4 k in train mode + 4 k in eval mode (the last batch of 4 is padded)
            assert counters['stats']['unique_graphs'] == 8
    for name, value in weights[None].items():
        torch.testing.assert_close(weights['eager'][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('args, message', [
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode needs --torchcompile'),
    (['--torchcompile', 'no-such-backend'], 'not a torch.compile backend: choose one of'),
])
def test_bad_compile_flags_are_one_clear_error(tmp_path, capsys, args, message):
    assert main(['benchmark', '--model', 'hydravit_test_patch4_16', *args]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match='torchcompile'):
        load_train_config(None, torchcompile='inductor', torchcompile_mode='fastest')
