"""Budget-driven choice of k from a benchmark table: pure selection logic, file parsing and the CLI."""

import pytest

from hydravit.cli import main
from hydravit.deployment.selection import (
    Budget,
    NoSubnetworkFits,
    analytic_table,
    benchmark_table,
    merge_accuracy,
    select_subnet,
)
from hydravit.models.costs import subnet_cost
from hydravit.models.factory import create_model
from hydravit.storage.checkpoint import save_model
from hydravit.storage.results import write_results

from helpers import reference_cost


def bench_rows(ks=(1, 2, 3, 4), batch_size=64, mode='sliced'):
    """Benchmark-file rows: latency and memory grow with k, throughput falls."""
    return [dict(k=k, mode=mode, infer_samples_per_sec=1000.0 / k, infer_batch_size=batch_size,
                 infer_latency_ms=2.0 * k, infer_latency_ms_p10=1.9 * k, infer_latency_ms_p90=2.2 * k,
                 train_samples_per_sec=None, peak_mem_mb=10.0 * k, param_count=0.01 * k, gmacs=0.1 * k,
                 flop_counter_gmacs=None, device='cpu') for k in ks]


TABLE = benchmark_table(bench_rows())


@pytest.mark.parametrize('metric,limit,expected', [
    ('latency_ms', 6.5, 3),      # 2, 4, 6 ms fit
    ('latency_ms', 8.0, 4),      # limit is inclusive
    ('throughput', 400.0, 2),    # 1000, 500 fit; 333 does not
    ('gmacs', 0.25, 2),
    ('memory_mb', 35.0, 3),
])
def test_without_accuracy_the_largest_fitting_k_wins(metric, limit, expected):
    choice = select_subnet(TABLE, Budget(metric, limit))
    assert choice.k == expected and choice.ranked_by == 'k'
    assert choice.fitting == list(range(1, expected + 1))
    assert 'assuming accuracy grows with k' in choice.describe()


def test_accuracy_decides_when_known():
    """k=3 is the most accurate fitting subnetwork here, although k=4 fits too."""
    table = merge_accuracy(TABLE, {1: dict(top1=60.0), 2: dict(top1=70.0), 3: dict(top1=75.0), 4: dict(top1=74.0)})
    choice = select_subnet(table, Budget('latency_ms', 100.0))
    assert choice.k == 3 and choice.ranked_by == 'top1'
    assert 'top1 75.00' in choice.describe()
    tie = merge_accuracy(TABLE, {k: dict(top1=70.0) for k in (1, 2, 3, 4)})
    assert select_subnet(tie, Budget('latency_ms', 100.0)).k == 1  # equal accuracy: the cheaper one


def test_none_fits_names_the_closest():
    with pytest.raises(NoSubnetworkFits, match=r'closest, k=1, has latency_ms=2'):
        select_subnet(TABLE, Budget('latency_ms', 1.0))
    with pytest.raises(NoSubnetworkFits, match=r'closest, k=1, has infer_samples_per_sec=1000'):
        select_subnet(TABLE, Budget('throughput', 5000.0))


def test_bad_budgets_and_tables():
    with pytest.raises(ValueError, match=r"unknown budget 'joules': choose one of \['latency_ms', 'throughput', "
                                         r"'gmacs', 'memory_mb'\]"):
        Budget('joules', 1.0)
    with pytest.raises(ValueError, match=r'budget latency_ms must be > 0, got 0'):
        Budget('latency_ms', 0)
    with pytest.raises(ValueError, match='empty table'):
        select_subnet([], Budget('gmacs', 1.0))
    with pytest.raises(ValueError, match="no 'peak_mem_mb' value"):
        select_subnet([dict(k=1, peak_mem_mb=None)], Budget('memory_mb', 1.0))


def test_benchmark_table_batch_latency_and_modes():
    rows = bench_rows() + bench_rows(mode='timm')
    table = benchmark_table(rows, mode='sliced', batch_size=64)
    assert [r['k'] for r in table] == [1, 2, 3, 4]
    assert table[1]['latency_ms'] == pytest.approx(1e3 * 64 / 500.0)  # a batch of 64 at 500 img/s
    assert benchmark_table(rows, mode='sliced')[1]['latency_ms'] == 4.0  # batch 1: measured median
    with pytest.raises(ValueError, match='batch size \\[64\\], not 32'):
        benchmark_table(rows, batch_size=32)
    with pytest.raises(ValueError, match="no rows for mode 'extracted'"):
        benchmark_table(rows, mode='extracted')
    with pytest.raises(ValueError, match=r'no .sliced. rows for k \[7\]'):
        benchmark_table(rows, ks=[1, 7])


def test_analytic_table_is_enough_for_gmacs():
    model = create_model('hydravit_test_patch4_16')
    table = analytic_table(model.config)
    assert [r['k'] for r in table] == [1, 2, 3, 4]
    counted = [reference_cost(model.config, k)[1] for k in (1, 2, 3, 4)]  # MACs of the equivalent timm ViTs
    assert [r['gmacs'] * 1e9 for r in table] == pytest.approx(counted)
    limit = subnet_cost(model.config, 3).gmacs
    assert select_subnet(table, Budget('gmacs', limit)).k == 3  # the limit is inclusive
    assert select_subnet(table, Budget('gmacs', limit * (1 - 1e-9))).k == 2


@pytest.fixture
def run_folder(tmp_path):
    model = create_model('hydravit_test_patch4_16')
    ck = save_model(tmp_path / 'run' / 'last.safetensors', model)
    write_results([dict(k=k, top1=[40.0, 70.0, 65.0, 60.0][k - 1]) for k in model.k_choices], ck.parent, 'results',
                  verbose=False)
    bench = write_results(bench_rows(), tmp_path, 'bench', 'json', verbose=False)
    return ck, bench


def test_cli_uses_the_benchmark_file_and_results_next_to_the_checkpoint(run_folder, capsys):
    ck, bench = run_folder
    assert main(['select', '--checkpoint', str(ck.parent), '--latency-ms', '100', '--benchmark-file', str(bench)]) == 0
    out = capsys.readouterr().out
    assert 'selected k=2' in out and 'top1 70.00' in out  # k=2 is the most accurate in results.csv


def test_cli_none_fits_exits_non_zero(run_folder, capsys):
    ck, bench = run_folder
    assert main(['select', '--checkpoint', str(ck), '--latency-ms', '0.5', '--benchmark-file', str(bench)]) == 2
    captured = capsys.readouterr()
    assert 'no subnetwork meets latency_ms <= 0.5' in captured.err
    table = [line.split() for line in captured.out.splitlines()[2:]]  # the numbers behind the verdict
    assert [(r[0], r[1], r[2]) for r in table] == [('1', 'no', '2.00'), ('2', 'no', '4.00'), ('3', 'no', '6.00'),
                                                   ('4', 'no', '8.00')]


def test_cli_rejects_k_outside_the_model(run_folder, capsys):
    ck, bench = run_folder
    assert main(['select', '--checkpoint', str(ck), '--gmacs', '1', '--k', '9']) == 2
    assert ('hydravit select: error: k=9 is not a valid subnetwork: allowed values are [1, 2, 3, 4]'
            in capsys.readouterr().err)


def test_cli_measures_live_when_no_file(tmp_path, capsys):
    """A real (tiny, quick) measurement: the choice must be one of the measured k and fit the budget."""
    ck = save_model(tmp_path / 'ck.safetensors', create_model('hydravit_test_patch4_16'))
    assert main(['select', '--checkpoint', str(ck), '--throughput', '1', '--k', '1', '2', '-b', '4']) == 0
    out = capsys.readouterr().out
    assert 'selected k=2' in out and 'assuming accuracy grows with k' in out
