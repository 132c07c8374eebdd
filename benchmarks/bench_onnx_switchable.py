"""Switchable ONNX files (every k in one file, k an input) vs the per-k ONNX file of each k, in onnxruntime, one run.

Constructions (all hold the weights once and are checked against PyTorch at every k before timing):

* ``tree``: what ``hydravit export --format onnx-switchable`` writes: per-k branches with their shape arithmetic
  folded (:mod:`hydravit.deployment.onnx_fold`), picked by a balanced tree of ``If`` nodes;
* ``tree_unfolded``: the same tree, branches keeping the exporter's shape arithmetic (``fold_shapes=False``);
* ``chain``: the folded branches behind a chain of ``If (k == k_i)`` nodes;
* ``runtime_slices``: no ``If``; one graph that slices the weights with bounds computed from ``k`` at run time.

References: ``per_k`` is the per-k file (the extracted timm ViT, what ``hydravit export --format onnx``
writes, shape arithmetic folded like ``tree``'s branches); ``per_k_unfolded`` is that file as the exporter
writes it (``fold_shapes=False``); ``per_k_no_mem_pattern`` is the per-k file run with onnxruntime's memory
pattern off, which is how onnxruntime runs the graph inside an ``If`` branch, to show where ``tree``'s cost
is. Per k, all sessions are called in turn, call by call (interleaved rounds, so a shared machine's load hits
all alike); figures are medians; ratios are per-k file time / construction time (>= 1: as fast as the per-k
file). Peak memory: a fresh process loads one file and runs every k at batch 64; VmHWM above the RSS after
importing onnxruntime.

    python benchmarks/bench_onnx_switchable.py --checkpoint /work/runs/main/model_best.safetensors
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
import onnxruntime as ort

from hydravit.deployment.export import export_onnx
from hydravit.deployment.onnx_switchable import build_switchable_model, check_switchable_onnx
from hydravit.models.factory import create_model
from hydravit.storage.checkpoint import load_model
from hydravit.storage.results import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from switchable_variants import build_if_chain, build_runtime_slices  # noqa: E402

CONSTRUCTIONS = ('tree', 'tree_unfolded', 'chain', 'runtime_slices')
REFERENCES = ('per_k_unfolded', 'per_k_no_mem_pattern')  # besides per_k, the per-k file every ratio is to

PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
def rss(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
ort.set_default_logger_severity(3)
base = rss('VmRSS')
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
x = np.zeros((64, %(chans)d, %(size)d, %(size)d), np.float32)
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, o, providers=['CPUExecutionProvider'])
    if sys.argv[1] == 'switchable':
        for k in [%(ks)s]:
            s.run(None, {'input': x, 'k': np.array(k, np.int64)})
    else:
        s.run(None, {'input': x})
print((rss('VmHWM') - base) / 1024)
"""


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


def peak_mb(kind: str, paths: List[Path], model) -> float:
    c = model.config
    script = PEAK_SCRIPT % dict(chans=c.in_chans, size=c.img_size, ks=','.join(map(str, model.k_choices)))
    out = subprocess.run([sys.executable, '-c', script, kind, *map(str, paths)], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='hydravit_fmnist_patch7_28')
    p.add_argument('--checkpoint', default=None, help='trained weights (default: random weights of --model)')
    p.add_argument('--threads', type=int, default=1, help='onnxruntime intra-op threads')
    p.add_argument('--repeats-b1', type=int, default=600, help='interleaved calls per session at batch 1')
    p.add_argument('--repeats-b64', type=int, default=25, help='interleaved calls per session at batch 64')
    args = p.parse_args()
    model = (load_model(args.checkpoint) if args.checkpoint else create_model(args.model)).eval()
    c = model.config
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    no_mem_pattern = ort.SessionOptions()
    no_mem_pattern.intra_op_num_threads, no_mem_pattern.inter_op_num_threads = args.threads, 1
    no_mem_pattern.enable_mem_pattern = False
    ort.set_default_logger_severity(4)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {name: folder / f'{name}.onnx' for name in CONSTRUCTIONS}
        build_s = {}
        for name, build in (('tree', lambda: build_switchable_model(model)),
                            ('tree_unfolded', lambda: build_switchable_model(model, fold_shapes=False)),
                            ('chain', lambda: build_if_chain(model))):
            start = time.perf_counter()
            onnx.save(build(), str(files[name]))
            build_s[name] = time.perf_counter() - start
        start = time.perf_counter()
        build_runtime_slices(model, str(files['runtime_slices']))  # writes and checks the file
        build_s['runtime_slices'] = time.perf_counter() - start
        diffs = {name: check_switchable_onnx(model, path, batch_sizes=(1, 3, 64)) for name, path in files.items()}
        sessions = {name: ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
                    for name, path in files.items()}
        rows = []
        for k in model.k_choices:
            export_onnx(model, k, folder / f'k{k}.onnx')
            export_onnx(model, k, folder / f'k{k}_unfolded.onnx', fold_shapes=False)
            references = {name: ort.InferenceSession(str(folder / f'k{k}{suffix}.onnx'), options,
                                                     providers=['CPUExecutionProvider'])
                          for name, suffix, options in (('per_k', '', opts), ('per_k_unfolded', '_unfolded', opts),
                                                        ('per_k_no_mem_pattern', '', no_mem_pattern))}
            row: Dict[str, object] = dict(k=k, per_k_file_kb=(folder / f'k{k}.onnx').stat().st_size / 1e3,
                                          max_abs_diff=max(d[k] for d in diffs.values()))
            for batch, repeats in ((1, args.repeats_b1), (64, args.repeats_b64)):
                x = np.random.default_rng(k).standard_normal((batch, c.in_chans, c.img_size, c.img_size),
                                                             dtype=np.float32)
                feeds = {'input': x, 'k': np.array(k, dtype=np.int64)}
                calls: Dict[str, Callable[[], object]] = {
                    name: (lambda x=x, s=s: s.run(None, {'input': x})) for name, s in references.items()}
                calls.update({name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()})
                t = interleaved_medians(calls, repeats)
                tag = f'b{batch}'
                row[f'{tag}_per_k_ms'] = t['per_k'] * 1e3
                for name in (*REFERENCES, *CONSTRUCTIONS):
                    row[f'{tag}_{name}'] = t['per_k'] / t[name]
            rows.append(row)
        per_k_files = [folder / f'k{k}.onnx' for k in model.k_choices]
        memory = {name: peak_mb('switchable', [path], model) for name, path in files.items()}
        memory[f'per_k k={model.k_choices[-1]} only'] = peak_mb('per_k', per_k_files[-1:], model)
        memory['all per_k files'] = peak_mb('per_k', per_k_files, model)
        sizes = {name: path.stat().st_size / 1e3 for name, path in files.items()}
    print(markdown_table(rows, list(rows[0])))
    top = float(str(rows[-1]['per_k_file_kb']))
    print('\n' + markdown_table([dict(construction=n, file_kb=sizes[n], x_k_max_file=sizes[n] / top,
                                      build_s=build_s[n], max_abs_diff=max(diffs[n].values()),
                                      peak_rss_mb=memory[n]) for n in CONSTRUCTIONS],
                                ['construction', 'file_kb', 'x_k_max_file', 'build_s', 'max_abs_diff',
                                 'peak_rss_mb']))
    print('\n' + '; '.join(f'{n}: {v:.1f} MB' for n, v in memory.items() if n not in CONSTRUCTIONS)
          + ' (peak RSS, per-k references)')
    for name in (*REFERENCES, *CONSTRUCTIONS):
        for tag in ('b1', 'b64'):
            ratios = [float(str(r[f'{tag}_{name}'])) for r in rows]
            print(f'{name} {tag}: {min(ratios):.3f} .. {max(ratios):.3f} x the per-k file'
                  f'{"  (>= 0.9 at every k)" if min(ratios) >= 0.9 else ""}')


if __name__ == '__main__':
    main()
