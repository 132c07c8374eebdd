"""Result files, the join of eval and benchmark rows, and the accuracy-cost report (tables, plots, CLI)."""
import logging
import struct

import pytest

from hydravit.cli import main
from hydravit.evaluation.report import bench_conditions, join_results, plot_accuracy, write_report
from hydravit.storage.results import read_results, result_label, write_results


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return struct.unpack('>II', data[16:24])


def eval_rows(offset=0.0):
    return [dict(k=k, top1=60.0 + 3 * k + offset, top1_err=40.0 - 3 * k - offset, top5=90.0, top5_err=10.0,
                 loss=1.0 / k, param_count=0.5 * k * k, gmacs=0.01 * k * k) for k in (3, 6, 12)]


def bench_rows():
    return [dict(k=k, mode=mode, infer_samples_per_sec=(1000.0 if mode == 'sliced' else 2000.0) / k,
                 infer_latency_ms=0.1 * k, peak_mem_mb=10.0 + k, gmacs=0.01 * k * k)
            for k in (3, 6, 12) for mode in ('sliced', 'timm')]


@pytest.mark.parametrize('fmt', ['csv', 'json'])
def test_results_round_trip(tmp_path, fmt, caplog):
    caplog.set_level(logging.INFO, logger='hydravit')
    rows = eval_rows() + [dict(k=1, top1=1 / 3, note='x', extra=None)]
    path = write_results(rows, tmp_path, 'eval', fmt)
    assert path == tmp_path / f'eval.{fmt}'
    back = read_results(path)
    assert [r['k'] for r in back] == [3, 6, 12, 1]
    assert back[0]['top1'] == pytest.approx(69.0) and back[3]['top1'] == pytest.approx(1 / 3, rel=1e-5)
    assert back[3]['note'] == 'x' and back[3]['extra'] is None
    printed = caplog.messages[-1].splitlines()
    assert printed[0].split()[:3] == ['k', 'top1', 'top1_err'] and len(printed) == 5
    with pytest.raises(ValueError, match=r"results format must be one of \('csv', 'json'\), got 'xml'"):
        write_results(rows, tmp_path, 'eval', 'xml')


def test_join_takes_the_sliced_benchmark_rows():
    joined = join_results(eval_rows(), bench_rows())
    assert [r['infer_samples_per_sec'] for r in joined] == [1000 / 3, 1000 / 6, 1000 / 12]
    assert joined[1]['peak_mem_mb'] == 16.0 and joined[1]['top1'] == 78.0
    trainer_rows = [dict(k=3, param_count=1.5, top1=50.0)]  # an eval row's own size wins over the benchmark's
    assert join_results(trainer_rows, bench_rows())[0]['param_count'] == 1.5


def test_write_report_from_saved_results(tmp_path):
    a = read_results(write_results(eval_rows(), tmp_path / 'runs', 'hydra_eval', verbose=False))
    b = read_results(write_results(eval_rows(-2.0), tmp_path / 'runs', 'sorted_eval', verbose=False))
    bench = read_results(write_results(bench_rows(), tmp_path / 'runs', 'hydra_benchmark', verbose=False))
    paths = write_report({'hydra': a, 'sorted': b}, {'hydra': bench}, tmp_path / 'out')
    assert set(paths) == {'csv', 'plot_gmacs', 'plot_throughput', 'markdown'}
    for key in ('plot_gmacs', 'plot_throughput'):
        assert png_size(paths[key]) == (640, 480)
        assert paths[key].stat().st_size > 10_000  # lines, labels and legend drawn, not a blank canvas
    md = paths['markdown'].read_text()
    assert md.count('| hydra |') == 3 and md.count('| sorted |') == 3
    assert 'accuracy_vs_gmacs.png' in md and 'infer_samples_per_sec' in md
    table = read_results(paths['csv'])
    assert [(r['method'], r['k']) for r in table][:4] == [('hydra', 3), ('hydra', 6), ('hydra', 12), ('sorted', 3)]
    with pytest.raises(ValueError,
                       match=r"benchmark labels \['other'\] match no evaluation label \['hydra', 'sorted'\]"):
        write_report({'hydra': a, 'sorted': b}, {'other': bench}, tmp_path / 'bad')


def test_a_report_says_what_its_speeds_were_measured_with(tmp_path):
    cpu = [{**r, 'device': 'cpu', 'threads': 3, 'infer_batch_size': 64} for r in bench_rows()]
    md = write_report({'hydra': eval_rows()}, {'hydra': cpu}, tmp_path / 'cpu')['markdown'].read_text()
    assert 'Speed measured on cpu, in mode sliced/timm, at batch 64 (latency: batch 1), with 3 thread(s).' in md
    gpu = [{**r, 'device': 'cuda:0', 'threads': 3, 'infer_batch_size': 256} for r in bench_rows()]
    assert bench_conditions(gpu) == 'on cuda:0, in mode sliced/timm, at batch 256 (latency: batch 1)'  # no threads
    md = write_report({'hydra': eval_rows()}, None, tmp_path / 'none')['markdown'].read_text()
    assert 'Speed measured' not in md  # nothing was timed


def test_plot_rejects_unknown_axis_and_empty_series(tmp_path):
    with pytest.raises(ValueError, match=r"x must be one of \['gmacs', 'infer_samples_per_sec', .*\], got 'flops'"):
        plot_accuracy({'a': eval_rows()}, 'flops', tmp_path / 'p.png')
    with pytest.raises(ValueError, match=r"no rows with both 'infer_samples_per_sec' and 'top1': nothing to plot"):
        plot_accuracy({'a': eval_rows()}, 'infer_samples_per_sec', tmp_path / 'p.png')
    assert not (tmp_path / 'p.png').exists()


def test_result_labels(tmp_path):
    assert result_label(tmp_path / 'run1' / 'eval.csv') == 'run1'
    assert result_label('x/hydra_benchmark.json') == 'hydra'
    assert result_label('x/sortednet.csv') == 'sortednet'


def test_report_cli(tmp_path, capsys):
    run = tmp_path / 'run1'
    write_results(eval_rows(), run, 'eval', verbose=False)
    write_results(bench_rows(), run, 'benchmark', verbose=False)
    write_results(eval_rows(-1.0), tmp_path, 'baseline', 'json', verbose=False)
    out = tmp_path / 'report'
    assert main(['report', str(run / 'eval.csv'), str(run / 'benchmark.csv'), str(tmp_path / 'baseline.json'),
                 '-o', str(out)]) == 0
    md = (out / 'report.md').read_text()
    assert '| run1 |' in md and '| baseline |' in md
    assert png_size(out / 'accuracy_vs_throughput.png') == (640, 480)
    assert main(['report', str(run / 'benchmark.csv')]) == 2
    assert 'hydravit report: error: no eval results among the files' in capsys.readouterr().err
    assert main(['report', str(run / 'eval.csv'), '--labels', 'a', 'b']) == 2
    assert ('hydravit report: error: --labels needs one label per results file: 2 labels, 1 files'
            in capsys.readouterr().err)
