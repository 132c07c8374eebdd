"""Analytic size and cost per k: fixed reference numbers of the base model, timm's DeiTs, and ``hydravit info``."""
import json
import re

import pytest
import timm

import hydravit  # noqa: F401  (registers the models)
from hydravit.cli import main as cli_main
from hydravit.models.costs import cost_table
from hydravit.storage.checkpoint import save_model

# k -> (params in M, GMACs per 224x224 image) of hydravit_base_patch16_224, written out as fixed numbers so that
# any change of the cost formula shows: k=3, 6 and 12 are the DeiT-Ti, DeiT-S and ViT-B/DeiT-B shapes
BASE_COSTS = {3: (5.717, 1.254), 4: (9.982, 2.136), 5: (15.427, 3.251), 6: (22.051, 4.599), 7: (29.854, 6.179),
              8: (38.838, 7.991), 9: (49.001, 10.036), 10: (60.343, 12.313), 11: (72.866, 14.822), 12: (86.568, 17.564)}


@pytest.mark.slow
def test_base_model_reproduces_the_reference_table_and_the_deits():
    config = timm.create_model('hydravit_base_patch16_224').config
    rows = {c.k: c for c in cost_table(config)}
    assert sorted(rows) == sorted(BASE_COSTS)
    for k, (params_m, gmacs) in BASE_COSTS.items():
        assert (round(rows[k].params_m, 3), round(rows[k].gmacs, 3)) == (params_m, gmacs), k
    for k, deit in ((3, 'deit_tiny_patch16_224'), (6, 'deit_small_patch16_224'), (12, 'deit_base_patch16_224')):
        assert rows[k].params == sum(p.numel() for p in timm.create_model(deit).parameters()), deit


@pytest.mark.slow
def test_info_prints_every_k_for_a_model_or_another_nesting(capsys):
    assert cli_main(['info', '--model', 'hydravit_base_patch16_224', '--format', 'json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r['k'], round(r['param_count'], 3), round(r['gmacs'], 3)) for r in rows] == \
        [(k, *BASE_COSTS[k]) for k in sorted(BASE_COSTS)]
    assert cli_main(['info', '--model', 'hydravit_base_patch16_224', '--nesting', 'matformer', '--k', '3', '12']) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['k', 'embed_dim', 'num_heads', 'mlp_hidden', 'params', '(M)', 'GMACs']
    assert table[1].split() == ['3', '768', '12', '768', '44.073', '9.198']  # full attention, MLP 768
    assert table[2].split() == ['12', '768', '12', '3072', '86.568', '17.564'] and len(table) == 3


def test_info_nesting_applies_to_a_model_name_only(tmp_path, capsys):
    path = save_model(tmp_path / 'm.safetensors', timm.create_model('hydravit_test_patch4_16'))
    assert cli_main(['info', '--checkpoint', str(path), '--nesting', 'dynabert']) == 2
    err = capsys.readouterr().err
    assert re.search(r'hydravit info: error: --nesting is for --model: the checkpoint is a hydravit model', err), err
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown nesting and lists the known ones
        cli_main(['info', '--model', 'hydravit_test_patch4_16', '--nesting', 'slimmable'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"invalid choice: 'slimmable' \(choose from 'hydravit', 'matformer', 'dynabert', 'separate', "
                     r"'heads', 'width'\)", err), err
