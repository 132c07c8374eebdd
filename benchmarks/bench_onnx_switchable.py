"""One switchable ONNX file (every k, k an input) vs the per-k ONNX file of each k, in onnxruntime, in one run.

Per k: latency at batch 1 and throughput at batch 64 of the switchable file, of the per-k file (the extracted
timm ViT, what ``hydravit export --format onnx`` writes) and of the universal model exported at that fixed k
(the same graph as the switchable file's branch, without the ``If`` around it). The three sessions are called
in turn, call by call, so a shared machine's load changes hit all three alike; the figures are medians and the
ratios are per-k-file time / switchable time (>= 1: the switchable file is as fast). Also prints file sizes.

    python benchmarks/bench_onnx_switchable.py --model hydravit_fmnist_patch7_28
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import onnxruntime as ort

from hydravit.deployment.export import export_onnx
from hydravit.deployment.onnx_switchable import export_switchable_onnx, export_universal_onnx
from hydravit.models.factory import create_model
from hydravit.storage.results import markdown_table


def interleaved_medians(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds per call of each callable, calling them in turn ``repeats`` times (after one warm-up)."""
    times: Dict[str, list] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--threads', type=int, default=1, help='onnxruntime intra-op threads')
    p.add_argument('--repeats-b1', type=int, default=600, help='interleaved calls per session at batch 1')
    p.add_argument('--repeats-b64', type=int, default=25, help='interleaved calls per session at batch 64')
    args = p.parse_args()
    model = create_model(args.model).eval()
    c = model.config
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        check = export_switchable_onnx(model, folder / 'switchable.onnx')
        switch_s = time.perf_counter() - start
        switchable = ort.InferenceSession(str(folder / 'switchable.onnx'), opts, providers=['CPUExecutionProvider'])
        rows = []
        for k in model.k_choices:
            export_onnx(model, k, folder / f'k{k}.onnx')
            export_universal_onnx(model, k, folder / f'u{k}.onnx')
            per_k = ort.InferenceSession(str(folder / f'k{k}.onnx'), opts, providers=['CPUExecutionProvider'])
            fixed = ort.InferenceSession(str(folder / f'u{k}.onnx'), opts, providers=['CPUExecutionProvider'])
            row: Dict[str, object] = dict(k=k, per_k_file_kb=(folder / f'k{k}.onnx').stat().st_size / 1e3,
                                          max_abs_diff=check['onnx_switchable_diffs'][k])
            for batch, repeats in ((1, args.repeats_b1), (64, args.repeats_b64)):
                x = np.random.default_rng(k).standard_normal((batch, c.in_chans, c.img_size, c.img_size),
                                                             dtype=np.float32)
                k_in = np.array(k, dtype=np.int64)
                t = interleaved_medians({
                    'switchable': lambda x=x, k_in=k_in: switchable.run(None, {'input': x, 'k': k_in}),
                    'per_k': lambda x=x, s=per_k: s.run(None, {'input': x}),
                    'fixed_k': lambda x=x, s=fixed: s.run(None, {'input': x}),
                }, repeats)
                if batch == 1:
                    row.update(b1_switchable_ms=t['switchable'] * 1e3, b1_per_k_ms=t['per_k'] * 1e3,
                               b1_ratio=t['per_k'] / t['switchable'], b1_fixed_k_ratio=t['per_k'] / t['fixed_k'])
                else:
                    row.update(b64_switchable_img_s=batch / t['switchable'], b64_per_k_img_s=batch / t['per_k'],
                               b64_ratio=t['per_k'] / t['switchable'], b64_fixed_k_ratio=t['per_k'] / t['fixed_k'])
            rows.append(row)
        size = (folder / 'switchable.onnx').stat().st_size / 1e3
    print(markdown_table(rows, list(rows[0])))
    sizes = [float(str(r['per_k_file_kb'])) for r in rows]
    print(f'\nswitchable file: {size:.0f} kB ({size / sizes[-1]:.3f} x the k={rows[-1]["k"]} file, '
          f'{size / sum(sizes):.3f} x all per-k files together); written and checked in {switch_s:.1f} s')
    for batch in ('b1', 'b64'):
        ratios = [float(str(r[f'{batch}_ratio'])) for r in rows]
        print(f'{batch}: switchable / per-k speed from {min(ratios):.3f} to {max(ratios):.3f}')


if __name__ == '__main__':
    main()
