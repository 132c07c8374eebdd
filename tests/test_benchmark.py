"""Benchmark tables: one row per (k, mode) under timm's column names, sizes and costs counted, switching cost."""
import json

import pytest
import timm
import torch

import hydravit  # noqa: F401
from hydravit.cli import main
from hydravit.evaluation.benchmark import BENCH_MODES, benchmark_subnets, measure_switching, peak_memory_mb
from hydravit.models.costs import subnet_cost

from helpers import reference_cost

SCHEMA = ['k', 'mode', 'infer_samples_per_sec', 'infer_samples_per_sec_min', 'infer_samples_per_sec_max',
          'infer_spread_pct', 'infer_rounds', 'infer_batch_size', 'threads', 'infer_latency_ms', 'infer_latency_ms_p10',
          'infer_latency_ms_p90', 'train_samples_per_sec', 'peak_mem_mb', 'param_count', 'gmacs',
          'flop_counter_gmacs', 'device', 'compiled']
QUICK = dict(rounds=1, min_seconds=0.005, warmup=1, latency_iters=5)


# these tests check schemas and counts, not speed: one thread avoids OpenMP stalls on a busy machine
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def rows(one_thread):
    model = timm.create_model('hydravit_test_patch4_16')
    return benchmark_subnets(model, [1, 4], batch_size=4, train=True, train_iters=2, measure_memory=False, **QUICK)


def test_schema_one_row_per_k_and_mode(rows):
    assert [(r['k'], r['mode']) for r in rows] == [(k, m) for k in (1, 4) for m in BENCH_MODES]
    for r in rows:
        assert list(r) == SCHEMA
        assert r['infer_samples_per_sec'] > 0 and r['train_samples_per_sec'] > 0
        assert r['infer_latency_ms_p10'] <= r['infer_latency_ms'] <= r['infer_latency_ms_p90']
        assert r['infer_batch_size'] == 4 and r['device'] == 'cpu' and r['peak_mem_mb'] is None


def test_params_and_gmacs_equal_counts_on_an_equivalent_timm_vit(rows):
    cfg = timm.create_model('hydravit_test_patch4_16').config
    for r in rows:
        params, macs = reference_cost(cfg, r['k'])  # numel and unfused-attention FlopCounterMode of a timm ViT
        assert r['param_count'] * 1e6 == pytest.approx(params, abs=0.5), (r['k'], r['mode'])
        assert r['gmacs'] * 1e9 == pytest.approx(macs, rel=1e-12), (r['k'], r['mode'])
        # the benchmark's own counter sees the linear layers and patch conv but not the fused attention matmuls
        attention_macs = cfg.depth * 2 * cfg.num_tokens ** 2 * subnet_cost(cfg, r['k']).embed_dim
        assert r['flop_counter_gmacs'] * 1e9 == pytest.approx(macs - attention_macs, rel=1e-9)


def test_benchmark_leaves_weights_unchanged_and_rejects_bad_input():
    model = timm.create_model('hydravit_test_patch4_16')
    before = {n: t.clone() for n, t in model.state_dict().items()}
    benchmark_subnets(model, [2], modes=['sliced'], batch_size=2, train=True, train_iters=1, measure_memory=False,
                      flop_count=False, **QUICK)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match=r"modes must be a non-empty subset of \('sliced', 'extracted', 'timm'\), "
                                         r"got \['onnx'\]"):
        benchmark_subnets(model, [2], modes=['onnx'])
    with pytest.raises(ValueError, match=r'k=9 is not a valid subnetwork: allowed values are \[1, 2, 3, 4\]'):
        benchmark_subnets(model, [9])


@pytest.mark.slow
def test_peak_memory_grows_with_batch_and_width():
    cfg = timm.create_model('hydravit_fmnist_patch7_28').config
    small = peak_memory_mb(cfg, 3, 'timm', batch_size=8)
    large = peak_memory_mb(cfg, 12, 'timm', batch_size=512)
    assert 0 < small < large


def test_memory_rows_from_a_device_given_as_a_string():
    model = timm.create_model('hydravit_test_patch4_16')
    rows = benchmark_subnets(model, [1, 4], modes=('sliced', 'timm'), batch_size=4, device='cpu', flop_count=False,
                             **QUICK)
    assert [(r['k'], r['mode']) for r in rows] == [(1, 'sliced'), (1, 'timm'), (4, 'sliced'), (4, 'timm')]
    for r in rows:  # measured in a child process: a number (possibly 0 for so tiny a model), not None
        assert r['device'] == 'cpu' and isinstance(r['peak_mem_mb'], float) and r['peak_mem_mb'] >= 0, r


def test_switching_table():
    model = timm.create_model('hydravit_test_patch4_16')
    rows = measure_switching(model, [1, 4], repeats=2)
    assert [(r['k'], r['k_from']) for r in rows] == [(1, 4), (4, 3)]
    for r in rows:
        assert r['switch_ms'] >= r['use_k_us'] / 1e3 > 0
        assert r['switch_ms'] == pytest.approx(r['use_k_us'] / 1e3 + max(r['switch_overhead_ms'], 0))
        assert r['load_ms'] > 0
        assert r['load_vs_switch'] == pytest.approx(r['load_ms'] / r['switch_ms'])


def test_cli_writes_results_and_switching_files(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    code = main(['benchmark', '--model', 'hydravit_test_patch4_16', '--k', '2', '3', '-b', '2', '--rounds', '1',
                 '--min-seconds', '0.005', '--latency-iters', '3', '--no-memory', '--results-file', str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r['k'], r['mode']) for r in rows] == [(k, m) for k in (2, 3) for m in BENCH_MODES]
    switching = json.loads((tmp_path / 'bench_switching.json').read_text())
    assert [r['k'] for r in switching] == [2, 3]
    # the printed summary: throughput of each mode relative to timm's, per k, from the same rows
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.split() == ['k', 'sliced/timm', 'extracted/timm']))
    speed = {(r['k'], r['mode']): r['infer_samples_per_sec'] for r in rows}
    for line, k in zip(out[header + 1:header + 3], (2, 3), strict=True):
        printed = line.split()
        assert int(printed[0]) == k
        assert float(printed[1]) == pytest.approx(speed[k, 'sliced'] / speed[k, 'timm'], rel=0.01, abs=0.01)
        assert float(printed[2]) == pytest.approx(speed[k, 'extracted'] / speed[k, 'timm'], rel=0.01, abs=0.01)
    assert main(['benchmark', '--model', 'hydravit_test_patch4_16', '--k', '9']) == 2
    assert 'hydravit benchmark: error: --k [9] outside 1..4 (num_heads)' in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_rows_report_allocator_peak_memory():
    model = timm.create_model('hydravit_test_patch4_16')
    rows = benchmark_subnets(model, [1, 4], batch_size=8, device='cuda', **QUICK)
    assert all(r['device'].startswith('cuda') and r['peak_mem_mb'] > 0 for r in rows)
    sliced = {r['k']: r['peak_mem_mb'] for r in rows if r['mode'] == 'sliced'}
    assert sliced[1] <= sliced[4]
