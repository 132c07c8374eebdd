"""Every table a command prints says what its numbers were measured with and in which units: serve-demo and select
as eval, benchmark, export and report.md do (one helper, storage.results.table_context)."""
from __future__ import annotations

import re

import pytest
import torch

from hydravit.cli import main
from hydravit.models.factory import create_model
from hydravit.models.subnet import extract_subnet
from hydravit.storage.checkpoint import save_model
from hydravit.storage.results import read_results, write_results
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = 'hydravit_test_patch4_16'  # k = 1..4


def _context(out: str, marker: str) -> str:
    lines = [line for line in out.splitlines() if marker in line]
    assert len(lines) == 1, out
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny checkpoint with an eval file next to it that records 123 samples per k."""
    path = save_model(tmp_path / 'run' / 'last.safetensors', create_model(TINY))
    write_results([dict(k=k, top1=10.0 * k, num_samples=123) for k in (1, 2, 3, 4)], path.parent, 'eval',
                  verbose=False)
    return path


def _bench_file(tmp_path):
    rows = [dict(k=k, mode='sliced', infer_samples_per_sec=1000.0 / k, infer_batch_size=64, infer_latency_ms=2.0 * k,
                 peak_mem_mb=10.0 * k, param_count=0.01 * k, gmacs=0.1 * k, device='cpu', threads=3)
            for k in (1, 2, 3, 4)]
    return write_results(rows, tmp_path, 'bench', 'csv', verbose=False)


def test_serve_demo_states_model_size_mode_batch_threads_samples_and_units(checkpoint, capsys):
    assert main(['serve-demo', '--checkpoint', str(checkpoint), '--target-ms', '10000', '-b', '2', '--batches', '2',
                 '--busy', '0', '--threads', '1']) == 0
    line = _context(capsys.readouterr().out, 'batches per phase')
    for expected in ('mode sliced', 'batch 2', '1 threads', 'target 10000.0 ms per batch', '2 batches per phase',
                     'top1 of 123 samples evaluated', 'met_target in share of batches', 'p50_ms in ms per batch',
                     'mean_top1 in %', 'MMACs per image'):
        assert expected in line, (expected, line)
    model = create_model(TINY)  # params counted on the extracted standalone ViTs, not by the cost model
    smallest, largest = (sum(p.numel() for p in extract_subnet(model, k).parameters()) / 1e6 for k in (1, 4))
    sizes = re.search(r'k 1\.\.4: ([\d.e-]+)\.\.([\d.e-]+) M params', line)
    assert sizes is not None, line
    assert float(sizes.group(1)) == pytest.approx(smallest, rel=2e-3)
    assert float(sizes.group(2)) == pytest.approx(largest, rel=2e-3)


def test_select_from_a_benchmark_file_states_its_mode_batch_threads_and_units(checkpoint, tmp_path, capsys):
    bench = _bench_file(tmp_path)
    assert main(['select', '--checkpoint', str(checkpoint), '--throughput', '100', '-b', '64',
                 '--benchmark-file', str(bench)]) == 0
    line = _context(capsys.readouterr().out, 'measured by hydravit benchmark')
    for expected in (str(bench), 'mode sliced', 'batch 64', 'cpu', '3 threads', 'top1 of 123 samples evaluated',
                     'latency_ms in ms per batch', 'infer_samples_per_sec in images/s', 'param_count in M parameters',
                     'gmacs in GMACs per image', 'peak_mem_mb in MB', 'top1 in %'):
        assert expected in line, (expected, line)


def test_select_measured_live_states_batch_and_threads(checkpoint, capsys):
    assert main(['select', '--checkpoint', str(checkpoint), '--throughput', '1', '--k', '1', '2', '-b', '4',
                 '--threads', '1']) == 0
    line = _context(capsys.readouterr().out, 'measured now')
    for expected in ('mode sliced', 'batch 4', '1 threads', 'infer_samples_per_sec in images/s'):
        assert expected in line, (expected, line)
    assert torch.get_num_threads() == 1


def test_select_on_gmacs_says_nothing_was_timed_and_a_run_folder_gives_its_validation_samples(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)

    class Tensors(torch.utils.data.TensorDataset):
        num_classes = 10

    data = Tensors(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    val = Tensors(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g))
    cfg = load_train_config(None, model=TINY, heads=[2, 4], sampler='all', batch_size=8, epochs=1, warmup_epochs=0,
                            output=str(tmp_path), experiment='run', report=False,
                            nproc_per_node=1)  # its data set is a local class: it stays in this process
    train(cfg, datasets=(data, val))
    assert [int(r['num_samples']) for r in read_results(tmp_path / 'run' / 'results.csv')] == [12, 12]
    assert main(['select', '--checkpoint', str(tmp_path / 'run'), '--gmacs', '1']) == 0
    line = _context(capsys.readouterr().out, 'analytic costs, nothing timed')
    assert 'top1 of 12 samples evaluated' in line and 'gmacs in GMACs per image (analytic)' in line, line
