"""Export time per k and ONNX (onnxruntime) vs PyTorch CPU latency per k, measured in one run.

An untrained checkpoint is enough for timing. Latency: median of batch-``B`` calls, PyTorch (the
extracted timm ViT) and onnxruntime interleaved in rounds, both on the same number of threads.

    python benchmarks/bench_export.py --model hydravit_fmnist_patch7_28 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import onnxruntime as ort
import torch

from hydravit.deployment.export import export_subnets
from hydravit.models.factory import create_model
from hydravit.models.subnet import extract_subnet
from hydravit.storage.checkpoint import save_model
from hydravit.storage.results import format_table


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--k', nargs='+', default=['all'])
    p.add_argument('-b', '--batch-size', type=int, default=1)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=30, help='timed calls per round')
    p.add_argument('--rounds', type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ck = save_model(Path(tmp) / 'untrained.safetensors', model)
        index = export_subnets(ck, args.k, ['timm', 'safetensors', 'onnx'], Path(tmp) / 'out', model_name=args.model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        c = model.config
        x = torch.randn(args.batch_size, c.in_chans, c.img_size, c.img_size)
        rows = []
        for row in index:
            vit = extract_subnet(model, row['k'])
            sess = ort.InferenceSession(row['onnx'], opts, providers=['CPUExecutionProvider'])
            feed = {'input': x.numpy()}
            torch_fn = partial(vit, x)  # bound now: each round times this k's model and session
            ort_fn = partial(sess.run, None, feed)
            pt, ox = [], []
            with torch.inference_mode():
                for fn in (torch_fn, ort_fn):
                    median_ms(fn, 3)  # warm-up
                for _ in range(args.rounds):
                    pt.append(median_ms(torch_fn, args.iters))
                    ox.append(median_ms(ort_fn, args.iters))
            rows.append(dict(k=row['k'], gmacs=row['gmacs'], timm_export_s=row['timm_export_s'],
                             safetensors_export_s=row['safetensors_export_s'], onnx_export_s=row['onnx_export_s'],
                             onnx_max_abs_diff=row['onnx_max_abs_diff'], torch_ms=statistics.median(pt),
                             onnxruntime_ms=statistics.median(ox),
                             torch_over_ort=statistics.median(pt) / statistics.median(ox)))
    print(f'{args.model}, batch {args.batch_size}, {args.threads} threads (onnx export includes the onnxruntime check)')
    print(format_table(rows))


if __name__ == '__main__':
    main()
