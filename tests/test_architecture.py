"""The package's structure: an acyclic import graph that only points down the layers, plug-in methods, one k rule."""
from __future__ import annotations

import ast
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch
from torch.utils.data import TensorDataset

import hydravit
from hydravit.cli import main
from hydravit.models import HydraViTConfig, create_model
from hydravit.models.kchoices import check_k_choices, parse_ks
from hydravit.storage.checkpoint import load_model, read_metadata
from hydravit.storage.run_folder import PRETRAINED_CFG_KEY, preprocessing_config
from hydravit.training import METHODS, TrainConfig, load_train_config, method_class, register_method, train
from hydravit.training.methods import HydraViTMethod
from hydravit.training.samplers import create_sampler

PACKAGE = Path(hydravit.__file__).parent
# lowest first: a module may import from its own layer's modules and from layers before it, never after
LAYERS = ('models', 'storage', 'data', 'evaluation', 'cascade', 'training', 'deployment', 'serving', 'cli')


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    """The hydravit modules an ``from ... import ...`` names (its module, plus submodules it imports)."""
    if node.level:
        base = module.split('.') if is_package else module.split('.')[:-1]
        base = base[:len(base) - node.level + 1]
        target = '.'.join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ''
    return [target] + [f'{target}.{alias.name}' for alias in node.names]


def import_graph() -> Dict[str, Set[str]]:
    """module -> hydravit modules it imports anywhere in its source (function-level imports included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for module, path in files.items():
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                edges.update(n for n in _absolute(module, path.name == '__init__.py', node) if n in files)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
        graph[module] = edges - {module}
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle (as a path that starts and ends at the same module), or [] if there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def _layer(module: str) -> int:
    parts = module.split('.')
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert 'hydravit.models.config' in graph['hydravit.models.hydravit']  # `from .config import ...`
    assert 'hydravit.models.kchoices' in graph['hydravit.models.config']
    assert len(graph) >= 40 and sum(map(len, graph.values())) > 100


def test_import_graph_of_src_has_no_cycle():
    assert _cycle(import_graph()) == []


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f'{m} -> {t}' for m, targets in import_graph().items() for t in targets
                    if _layer(m) >= 0 and _layer(t) > _layer(m))
    assert upward == []


def test_every_subpackage_is_a_layer_and_every_module_belongs_to_one():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / '__init__.py').is_file()}
    assert subpackages == set(LAYERS)
    top_level = sorted(p.name for p in PACKAGE.glob('*.py'))
    assert top_level == ['__init__.py', '__main__.py']


# ------------------------------------------------------------------------------------------ plug-in methods
def _tiny_data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    data.num_classes = 10  # type: ignore[attr-defined]
    return data


def test_a_new_method_is_one_class_and_one_registration(tmp_path):
    """A method that always trains the smallest k: the trainer calls its hooks, nothing else changes."""
    calls: List[str] = []

    class SmallestOnly(HydraViTMethod):
        name, label = 'smallest-only', 'Smallest only'

        def ks_for_step(self, trainer, step):
            calls.append(f'step {trainer.epoch}.{step}')
            return [min(trainer.model.k_choices)]

        def on_epoch_start(self, trainer):
            calls.append(f'epoch {trainer.epoch}')

    register_method(SmallestOnly)
    try:
        cfg = load_train_config(None, model='hydravit_test_patch4_16', method='smallest-only', epochs=2, heads=[2, 4],
                                num_random=0, batch_size=8, warmup_epochs=0, weight_decay=0.0, output=str(tmp_path),
                                experiment='run', report=False,
                                nproc_per_node=1)  # the method is registered in this process only
        torch.manual_seed(cfg.seed)  # the trainer's initial weights
        before = create_model('hydravit_test_patch4_16', num_classes=10, k_choices=(2, 4)).state_dict()
        result = train(cfg, datasets=(_tiny_data(), _tiny_data()))
    finally:
        del METHODS['smallest-only']
    assert calls == ['epoch 0', *[f'step 0.{s}' for s in range(4)], 'epoch 1', *[f'step 1.{s}' for s in range(4)]]
    after = load_model(result.out_dir / 'last.safetensors').state_dict()
    # k=2 is 16 channels and 32 MLP neurons of 32 and 64: only that slice learned (no weight decay)
    w0, w1 = before['blocks.0.mlp.fc1.weight'], after['blocks.0.mlp.fc1.weight']
    assert not torch.equal(w1[:32, :16], w0[:32, :16])
    assert torch.equal(w1[32:], w0[32:]) and torch.equal(w1[:, 16:], w0[:, 16:])
    assert [r['k'] for r in result.results] == [2, 4]


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'hydravit' is registered already"):
        register_method(type('Again', (HydraViTMethod,), {'name': 'hydravit'}))


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'sorted': choose one of hydravit, sortednet, matformer"):
        method_class('sorted')


@pytest.mark.parametrize('method, settings, problem', [
    ('separate', dict(sampler='all', clip_grad=1.0), '--clip-grad clips one global norm'),
    ('dynabert', dict(inplace_distill=True), '--inplace-distill is not available with --method dynabert'),
    ('separate', dict(sampler='all', separate_heads=True), '--separate-heads is not available with --method separate'),
    ('hydravit', dict(teacher_epochs=1), '--teacher-epochs is a --method dynabert setting, not hydravit'),
    ('sortednet', dict(sampler='uniform'), '--method sortednet trains with --sampler random'),
    ('dynabert', dict(teacher_epochs=5, epochs=5), r'--teacher-epochs must be in 0\.\.4'),
])
def test_each_method_refuses_the_settings_it_cannot_honour(method, settings, problem):
    with pytest.raises(ValueError, match=problem):
        load_train_config(None, method=method, **settings)
    cfg = replace(TrainConfig(), method=method, **settings)
    with pytest.raises(ValueError, match=problem):  # the trainer checks configs built without a recipe, too
        method_class(method)(cfg)


# ------------------------------------------------------------------------------------------ one k rule
@pytest.mark.parametrize('ks, problem', [
    ([3, 3], r'\[3\] more than once'),
    ([2.5, 3], r'must be integers, got \[2\.5\]'),
    ([True, 3], r'must be integers, got \[True\]'),
    ([0, 3], r'\[0\] (below 1|outside 1\.\.4)'),
])
def test_every_entry_point_applies_the_same_k_rule(ks, problem):
    with pytest.raises(ValueError, match=problem):
        HydraViTConfig(num_heads=4, head_dim=8, img_size=16, patch_size=4, k_choices=tuple(ks))
    with pytest.raises(ValueError, match=problem):
        create_sampler('uniform', ks)
    with pytest.raises(ValueError, match=problem):
        check_k_choices(ks, 4)
    if all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        with pytest.raises(ValueError, match=problem):
            TrainConfig(heads=list(ks))


def test_cli_k_values_are_parsed_once_and_never_truncated():
    assert parse_ks(['all'], (3, 6)) is None
    assert parse_ks(['6', '3'], (3, 6)) == [3, 6]
    with pytest.raises(ValueError, match=r"--k takes 'all' or integers, got \['2\.5'\]"):
        parse_ks(['2.5'], (2, 3))
    with pytest.raises(ValueError, match=r'k=5 is not a valid subnetwork: allowed values are \[3, 6\]'):
        parse_ks(['5'], (3, 6), 12)


@pytest.mark.parametrize('command', [['info', '--model', 'hydravit_test_patch4_16', '--k', '2.5'],
                                     ['info', '--model', 'hydravit_test_patch4_16', '--k', '2', '2']])
def test_subcommands_refuse_bad_k_with_a_clear_error(command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith('hydravit info: error: --k') and ('2.5' in err or 'more than once' in err)


def test_forward_validates_k_once_and_runs_on_one_shape(monkeypatch):
    model = create_model('hydravit_test_patch4_16').eval()
    seen = []
    original = HydraViTConfig.subnet_shape

    def counting(self, k):
        seen.append(k)
        return original(self, k)

    monkeypatch.setattr(HydraViTConfig, 'subnet_shape', counting)
    model(torch.randn(1, 3, 16, 16), k=2)
    assert seen == [2]


# ------------------------------------------------------------------------------------------ stored preprocessing
def test_the_trainer_stores_its_data_config_and_export_reads_it_back(tmp_path):
    cfg = load_train_config(None, model='hydravit_test_patch4_16', epochs=1, heads=[2, 4], num_random=0, batch_size=8,
                            warmup_epochs=0, output=str(tmp_path), experiment='run', report=False)
    result = train(cfg, datasets=(_tiny_data(), _tiny_data()))
    path = result.out_dir / 'last.safetensors'
    stored = json.loads(read_metadata(path)[PRETRAINED_CFG_KEY])
    assert stored['input_size'] == [3, 16, 16] and stored['num_classes'] == 10
    assert stored['interpolation'] == 'bicubic' and stored['crop_pct'] == 1.0
    (result.out_dir / 'args.yaml').unlink()  # the weights file alone must say how to preprocess
    model = create_model('hydravit_test_patch4_16', num_classes=10, k_choices=(2, 4))
    pre = preprocessing_config(path, model)
    assert pre['source'] == 'last.safetensors metadata'
    assert pre['mean'] == pytest.approx(stored['mean']) and pre['interpolation'] == 'bicubic'


# ------------------------------------------------------------------------------------------ logging
@pytest.mark.parametrize('flags, env, printed', [
    ([], {}, True), (['-q'], {}, False), (['--log-level', 'ERROR'], {}, False), ([], {'RANK': '1'}, False)])
def test_messages_follow_the_log_level_and_only_rank_0_prints_info(flags, env, printed, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([*flags, 'info', '--model', 'hydravit_test_patch4_16']) == 0
    out = capsys.readouterr().out
    assert ('embed_dim' in out) == printed
    assert main([*flags, 'info', '--model', 'no_such_model']) == 2  # errors are shown at every level
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_cli_leaves_no_logging_handlers_behind():
    logger = logging.getLogger('hydravit')
    before = (list(logger.handlers), logger.level, logger.propagate)
    main(['info', '--model', 'hydravit_test_patch4_16'])
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_cost_rows_hold_plain_ints_and_follow_the_k_rule():
    import numpy as np

    from hydravit.models import cost_row, cost_table
    cfg = create_model('hydravit_test_patch4_16').config
    row = cost_row(cfg, np.int64(2))
    assert type(row['k']) is int and json.loads(json.dumps(row))['embed_dim'] == 16
    with pytest.raises(ValueError, match=r'\[2\] more than once'):
        cost_table(cfg, [2, 2])


def test_eval_heads_follow_the_k_rule_when_the_config_is_built():
    with pytest.raises(ValueError, match=r'--eval-heads \[3, 3\] names \[3\] more than once'):
        TrainConfig(eval_heads=[3, 3])


# ------------------------------------------------------------------------------------------ run folders
@pytest.fixture(scope='module')
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    cfg = load_train_config(None, model='hydravit_test_patch4_16', epochs=1, heads=[2, 4], num_random=0,
                            batch_size=8, warmup_epochs=0, output=str(out), experiment='run', report=False)
    return train(cfg, datasets=(_tiny_data(), _tiny_data())).out_dir


@pytest.mark.parametrize('command, expected', [
    (['info'], 'embed_dim'),
    (['benchmark', '--k', '2', '--modes', 'sliced', '--rounds', '1', '--min-seconds', '0.01', '--latency-iters', '1',
      '--no-memory', '--switch-repeats', '1', '--batch-size', '2'], 'load/switch'),
    (['serve-demo', '--batches', '1', '--busy', '0', '--batch-size', '2'], 'calibrated ms per batch'),
    (['select', '--gmacs', '1'], 'fitting k: [2, 4]'),
])
def test_every_model_command_takes_a_run_folder_as_checkpoint(command, expected, run_folder, capsys):
    assert main([command[0], '--checkpoint', str(run_folder), *command[1:]]) == 0
    captured = capsys.readouterr()
    assert expected in captured.out and captured.err == ''
