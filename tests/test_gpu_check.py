"""benchmarks/gpu_check.py --dry-run: the GPU check's whole path on CPU (tiny model, gloo DDP), its JSON and table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.py'


@pytest.mark.slow
def test_gpu_check_dry_run_writes_measured_ratios_and_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), '--dry-run', '--out', str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['meta']['dry_run'] and report['skipped'] == []
    inference = report['inference']
    assert [(r['k'], r['dtype']) for r in inference] == [(1, 'bf16'), (1, 'fp32'), (4, 'bf16'), (4, 'fp32')]
    for r in inference:
        for mode in ('sliced', 'extracted', 'timm'):
            assert r[f'{mode}_img_s'] > 0
        assert r['sliced_vs_timm'] == pytest.approx(r['sliced_img_s'] / r['timm_img_s'])
        assert r['extracted_vs_timm'] == pytest.approx(r['extracted_img_s'] / r['timm_img_s'])
    assert [r['k'] for r in report['train']] == [1, 4]
    for r in report['train']:
        assert r['sliced_vs_timm'] == pytest.approx(r['sliced_img_s'] / r['timm_img_s'])
    compiled = report['compiled']
    assert [r['k'] for r in compiled['rows']] == [1, 4]
    for r in compiled['rows']:
        assert r['sliced_compiled_vs_eager'] == pytest.approx(r['sliced_compiled_img_s'] / r['sliced_eager_img_s'])
        assert r['sliced_compiled_vs_timm_compiled'] == pytest.approx(
            r['sliced_compiled_img_s'] / r['timm_compiled_img_s'])
    # one graph per k for the sliced model and per timm model; running each k again compiles nothing
    assert compiled['graphs_compiled'] == 4 == compiled['graphs_after_switching_back']
    ddp = report['ddp']
    assert (ddp['world_size'], ddp['backend'], ddp['steps'], ddp['replicas_identical']) == (2, 'gloo', 2, True)
    table = (tmp_path / 'gpu_check.md').read_text()
    first = inference[0]
    assert f'| 1 | bf16 | {first["sliced_img_s"]:.0f} | {first["extracted_img_s"]:.0f} |' in table
    assert f'{first["sliced_vs_timm"]:.3f}' in table and '## DDP' in table
