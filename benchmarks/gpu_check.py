"""One-command GPU check: the sliced ViT-B against timm's own ViT/DeiT on one CUDA GPU, in under 6 minutes.

Writes ``gpu_check.json`` and ``gpu_check.md`` (tables) into ``--out``:

- inference img/s per k at batch 256 in AMP bf16 and fp32: the sliced universal model (``model(x, k=k)``),
  the extracted subnet (``extract_subnet``) and timm's own model of the same shape (``deit_tiny/small/base`` at
  k = 3/6/12, a ``VisionTransformer`` of that shape otherwise), timed in interleaved rounds (median), with
  ratios to timm and peak memory (``torch.cuda.max_memory_allocated`` after a reset) per model;
- a training step (forward + cross-entropy + backward + fused AdamW, AMP bf16) per k, sliced vs timm, with peak
  memory;
- ``torch.compile`` (inductor) vs eager at a few k, sliced and timm, with compile seconds and the number of graphs
  compiled (each k once: calling every k again compiles nothing);
- a 2-step DistributedDataParallel run on every visible GPU (``mp.spawn``, NCCL), replicas checked identical.

Sections run in the order inference, training, DDP, compiled under a time budget (``--budget-s``, 300 s); one
that would start after it is recorded as skipped, so the command ends within 6 minutes on a GPU where a ViT-B
step takes well under a second.

    python benchmarks/gpu_check.py --out gpu_check/            # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc     # CPU, tiny model, gloo DDP: seconds (the test)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hydravit  # noqa: F401  (registers the models)
from hydravit.models import extract_subnet, subnet_vit_kwargs
from hydravit.models.compiled import CompileOptions, compile_module, compile_universal

logger = logging.getLogger('gpu_check')
Step = Callable[[], Any]
TIMM_NAMES = {(192, 3): 'deit_tiny_patch16_224', (384, 6): 'deit_small_patch16_224', (768, 12): 'deit_base_patch16_224'}
DTYPES = {'bf16': torch.bfloat16, 'fp32': None}


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_call(step: Step, device: torch.device, iters: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def interleaved_img_s(steps: Dict[str, Step], batch: int, device: torch.device, rounds: int, round_s: float,
                      warmup: int) -> Dict[str, float]:
    """Median images/s of each step over ``rounds`` interleaved rounds of about ``round_s`` seconds each."""
    iters = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        iters[name] = max(1, round(round_s / max(seconds_per_call(step, device, 2), 1e-6)))
    rates: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            rates[name].append(batch / seconds_per_call(step, device, iters[name]))
    return {name: statistics.median(r) for name, r in rates.items()}


def peak_mb(step: Step, device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated during one call above what was allocated before it (activations, gradients,
    workspaces; the weights and optimizer state every model holds anyway are left out). None on CPU."""
    if device.type != 'cuda':
        return None
    sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------------------------------ models
def timm_model(config, k: int, device: torch.device) -> tuple:
    """timm's own model of subnetwork k's shape: a DeiT by name where one has it, else a VisionTransformer."""
    kwargs = subnet_vit_kwargs(config, k)
    name = TIMM_NAMES.get((kwargs['embed_dim'], kwargs['num_heads'])) if config.img_size == 224 else None
    if name is not None and config.patch_size == 16 and config.depth == 12:
        net = timm.create_model(name, pretrained=False, num_classes=config.num_classes)
    else:
        name = f'VisionTransformer(embed_dim={kwargs["embed_dim"]}, num_heads={kwargs["num_heads"]})'
        net = timm.models.VisionTransformer(**kwargs)
    return name, net.to(device)


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: Optional[torch.dtype]) -> Step:
    def step() -> None:
        with torch.inference_mode(), autocast(x.device, dtype):
            fn(x)
    return step


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: Optional[torch.dtype], **kwargs) -> Step:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6, weight_decay=0.05, fused=True)  # as the trainer
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, dtype):
            loss = F.cross_entropy(net(x, **kwargs), y)
        loss.backward()
        optimizer.step()
    return step


# ------------------------------------------------------------------------------------------ sections
def check_inference(model, ks: Sequence[int], args, device: torch.device) -> List[Dict[str, Any]]:
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    rows = []
    model.eval()
    for k in ks:
        timm_name, reference = timm_model(cfg, k, device)
        reference.eval()
        subnet = extract_subnet(model, k).to(device).eval()
        for dtype_name, dtype in DTYPES.items():
            steps = {'sliced': inference_step(lambda t, k=k: model(t, k=k), x, dtype),
                     'extracted': inference_step(subnet, x, dtype),
                     'timm': inference_step(reference, x, dtype)}
            rates = interleaved_img_s(steps, args.batch_size, device, args.rounds, args.round_s, args.warmup)
            mems = {name: peak_mb(step, device) for name, step in steps.items()}
            row: Dict[str, Any] = dict(k=k, dtype=dtype_name, batch_size=args.batch_size, timm_model=timm_name)
            for name in steps:
                row[f'{name}_img_s'] = rates[name]
                row[f'{name}_peak_mb'] = mems[name]
            row['sliced_vs_timm'] = ratio(rates['sliced'], rates['timm'])
            row['extracted_vs_timm'] = ratio(rates['extracted'], rates['timm'])
            rows.append(row)
            logger.info('inference k=%d %s: sliced %.0f, extracted %.0f, timm %.0f img/s (sliced/timm %.3f)', k,
                        dtype_name, rates['sliced'], rates['extracted'], rates['timm'], row['sliced_vs_timm'])
        del subnet, reference
    return rows


def check_training(model, ks: Sequence[int], args, device: torch.device) -> List[Dict[str, Any]]:
    """fwd + bwd + AdamW at AMP bf16, the sliced universal model (full tensors updated) vs timm's model."""
    cfg = model.config
    g = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(args.train_batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (args.train_batch_size,), generator=g).to(device)
    rows = []
    for k in ks:
        timm_name, reference = timm_model(cfg, k, device)
        steps = {'sliced': train_step(model, x, y, torch.bfloat16, k=k), 'timm': train_step(reference, x, y,
                                                                                              torch.bfloat16)}
        rates = interleaved_img_s(steps, args.train_batch_size, device, args.rounds, args.round_s, args.warmup)
        row: Dict[str, Any] = dict(k=k, dtype='bf16 autocast', batch_size=args.train_batch_size, timm_model=timm_name,
                                   sliced_img_s=rates['sliced'], timm_img_s=rates['timm'],
                                   sliced_vs_timm=ratio(rates['sliced'], rates['timm']),
                                   sliced_peak_mb=peak_mb(steps['sliced'], device),
                                   timm_peak_mb=peak_mb(steps['timm'], device))
        rows.append(row)
        logger.info('train k=%d: sliced %.0f, timm %.0f img/s (%.3f)', k, rates['sliced'], rates['timm'],
                    row['sliced_vs_timm'])
        del steps, reference
    model.eval()
    return rows


def check_compiled(model, ks: Sequence[int], args, device: torch.device, deadline: float) -> Dict[str, Any]:
    """Eager vs torch.compile'd inference (bf16), sliced and timm; compile seconds and graph counts."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = model.config
    options = CompileOptions(backend=args.compile_backend)
    with torch.inference_mode():  # an inference tensor, as every timed call sees: no per-call copy
        x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    model.eval()
    compiled = compile_universal(model, options)
    rows, skipped = [], []
    for k in ks:
        if time.perf_counter() > deadline - args.compile_reserve_s:  # a compile must not run past the budget
            skipped.append(k)
            continue
        timm_name, reference = timm_model(cfg, k, device)
        reference.eval()
        compiled_reference = compile_module(reference, options)
        steps = {'sliced_eager': inference_step(lambda t, k=k: model(t, k=k), x, torch.bfloat16),
                 'sliced_compiled': inference_step(compiled.bind(k), x, torch.bfloat16),
                 'timm_eager': inference_step(reference, x, torch.bfloat16),
                 'timm_compiled': inference_step(compiled_reference, x, torch.bfloat16)}
        compile_s = {}
        for name in ('sliced_compiled', 'timm_compiled'):
            start = time.perf_counter()
            steps[name]()
            sync(device)
            compile_s[name] = time.perf_counter() - start
        rates = interleaved_img_s(steps, args.batch_size, device, args.rounds, args.round_s, args.warmup)
        rows.append(dict(k=k, dtype='bf16 autocast', batch_size=args.batch_size, timm_model=timm_name,
                         **{f'{n}_img_s': v for n, v in rates.items()},
                         sliced_compile_s=compile_s['sliced_compiled'], timm_compile_s=compile_s['timm_compiled'],
                         sliced_compiled_vs_eager=ratio(rates['sliced_compiled'], rates['sliced_eager']),
                         timm_compiled_vs_eager=ratio(rates['timm_compiled'], rates['timm_eager']),
                         sliced_compiled_vs_timm_compiled=ratio(rates['sliced_compiled'], rates['timm_compiled'])))
        logger.info('compiled k=%d: sliced %.0f (eager %.0f), timm %.0f (eager %.0f) img/s; compile %.1f s / %.1f s',
                    k, rates['sliced_compiled'], rates['sliced_eager'], rates['timm_compiled'], rates['timm_eager'],
                    compile_s['sliced_compiled'], compile_s['timm_compiled'])
    graphs_after_first = int(counters['stats']['unique_graphs'])
    done = [r['k'] for r in rows]
    for k in done:  # switching back to every compiled k must not compile again
        inference_step(compiled.bind(k), x, torch.bfloat16)()
    sync(device)
    return dict(backend=str(args.compile_backend), rows=rows, ks_skipped_for_time=skipped,
                graphs_compiled=graphs_after_first, graphs_after_switching_back=int(counters['stats']['unique_graphs']))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, model_name: str, batch: int, steps: int, use_cuda: bool,
                out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hydravit.training.distributed import DistEnv, check_replicas_in_sync

    device = torch.device('cuda', rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if use_cuda else 'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = timm.create_model(model_name).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device] if use_cuda else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=use_cuda)
        cfg = model.config
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
        ks = [min(model.k_choices), max(model.k_choices)][:steps] + list(model.k_choices)[:max(0, steps - 2)]
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        for k in ks:  # the same k on every rank in a step, as the trainer draws it
            x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
            y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, torch.bfloat16 if use_cuda else None):
                loss = F.cross_entropy(ddp(x, k=k), y)
            loss.backward()
            optimizer.step()
        sync(device)
        seconds = time.perf_counter() - start
        digest = check_replicas_in_sync(model, DistEnv(rank=rank, world_size=world, device=device), epoch=0)
        if rank == 0:
            Path(out_file).write_text(json.dumps(dict(
                world_size=world, backend='nccl' if use_cuda else 'gloo', steps=len(ks), ks=ks, batch_per_rank=batch,
                seconds=seconds, img_s=len(ks) * batch * world / seconds, replicas_identical=True,
                weights_sha256=digest[:16], final_loss=float(loss.detach()))))
    finally:
        dist.destroy_process_group()


def check_ddp(model_name: str, args, device: torch.device) -> Dict[str, Any]:
    import torch.multiprocessing as mp

    use_cuda = device.type == 'cuda'
    world = torch.cuda.device_count() if use_cuda else 2
    with tempfile.TemporaryDirectory(prefix='gpu-check-ddp-') as tmp:
        out_file = os.path.join(tmp, 'ddp.json')
        start = time.perf_counter()
        mp.spawn(_ddp_worker, args=(world, _free_port(), model_name, args.ddp_batch_size, 2, use_cuda, out_file),
                 nprocs=world, join=True)
        result = json.loads(Path(out_file).read_text())
    result['wall_s_with_startup'] = time.perf_counter() - start
    logger.info('DDP: %d process(es), %s, %d steps in %.2f s, replicas identical', result['world_size'],
                result['backend'], result['steps'], result['seconds'])
    return result


# ------------------------------------------------------------------------------------------ output
def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def markdown(report: Dict[str, Any]) -> str:
    meta = report['meta']
    lines = [f'# GPU check: {meta["model"]} on {meta["device_name"]}', '',
             f'torch {meta["torch"]}, timm {meta["timm"]}, CUDA {meta["cuda"]}; {meta["elapsed_s"]:.0f} s in all'
             f'{" (dry run on CPU: tiny model, figures meaningless)" if meta["dry_run"] else ""}.', '']
    inference = report.get('inference') or []
    if inference:
        lines += [f'## Inference, batch {inference[0]["batch_size"]} (img/s, median of interleaved rounds)', '',
                  '| k | dtype | sliced | extracted | timm | timm model | sliced/timm | extracted/timm | '
                  'peak MB above weights: sliced / extracted / timm |',
                  '|---:|---|---:|---:|---:|---|---:|---:|---:|']
        for r in inference:
            lines.append(f'| {r["k"]} | {r["dtype"]} | {_fmt(r["sliced_img_s"])} | {_fmt(r["extracted_img_s"])} | '
                         f'{_fmt(r["timm_img_s"])} | {r["timm_model"]} | {_fmt(r["sliced_vs_timm"], 3)} | '
                         f'{_fmt(r["extracted_vs_timm"], 3)} | {_fmt(r["sliced_peak_mb"])} / '
                         f'{_fmt(r["extracted_peak_mb"])} / {_fmt(r["timm_peak_mb"])} |')
        lines.append('')
    train = report.get('train') or []
    if train:
        lines += [f'## Training step (fwd + bwd + fused AdamW, AMP bf16), batch {train[0]["batch_size"]}', '',
                  '| k | sliced img/s | timm img/s | sliced/timm | peak MB above weights+optimizer: sliced / timm |',
                  '|---:|---:|---:|---:|---:|']
        for r in train:
            lines.append(f'| {r["k"]} | {_fmt(r["sliced_img_s"])} | {_fmt(r["timm_img_s"])} | '
                         f'{_fmt(r["sliced_vs_timm"], 3)} | {_fmt(r["sliced_peak_mb"])} / {_fmt(r["timm_peak_mb"])} |')
        lines.append('')
    compiled = report.get('compiled')
    if compiled and compiled.get('rows'):
        lines += [f'## torch.compile ({compiled["backend"]}) vs eager, inference bf16 (img/s)', '',
                  '| k | sliced eager | sliced compiled | timm eager | timm compiled | sliced compiled/eager | '
                  'timm compiled/eager | sliced/timm compiled | compile s sliced / timm |',
                  '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in compiled['rows']:
            lines.append(f'| {r["k"]} | {_fmt(r["sliced_eager_img_s"])} | {_fmt(r["sliced_compiled_img_s"])} | '
                         f'{_fmt(r["timm_eager_img_s"])} | {_fmt(r["timm_compiled_img_s"])} | '
                         f'{_fmt(r["sliced_compiled_vs_eager"], 3)} | {_fmt(r["timm_compiled_vs_eager"], 3)} | '
                         f'{_fmt(r["sliced_compiled_vs_timm_compiled"], 3)} | {_fmt(r["sliced_compile_s"], 1)} / '
                         f'{_fmt(r["timm_compile_s"], 1)} |')
        lines += ['', f'Graphs compiled: {compiled["graphs_compiled"]}; after running every compiled k again: '
                      f'{compiled["graphs_after_switching_back"]}.', '']
    ddp = report.get('ddp')
    if ddp:
        lines += ['## DDP', '', f'{ddp["world_size"]} process(es), {ddp["backend"]}, {ddp["steps"]} steps at k '
                  f'{ddp["ks"]}, batch {ddp["batch_per_rank"]} per process: {ddp["seconds"]:.2f} s '
                  f'({ddp["img_s"]:.0f} img/s), replicas identical: {ddp["replicas_identical"]}.', '']
    if report['skipped']:
        lines += ['Skipped: ' + '; '.join(report['skipped']), '']
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument('--out', default='gpu_check', help='folder for gpu_check.json and gpu_check.md')
    p.add_argument('--dry-run', action='store_true', help='CPU, tiny model, short rounds, gloo DDP (the test)')
    p.add_argument('--model', help='default: hydravit_base_patch16_224 (dry run: hydravit_test_patch4_16)')
    p.add_argument('--k', nargs='+', type=int, help="inference and training k (default: the model's k choices)")
    p.add_argument('--compile-k', nargs='+', type=int, help='k for compiled vs eager (default: smallest, largest)')
    p.add_argument('--compile-backend', default=None, help='default: inductor (dry run: eager)')
    p.add_argument('--batch-size', type=int, default=256, help='inference batch')
    p.add_argument('--train-batch-size', type=int, default=128)
    p.add_argument('--ddp-batch-size', type=int, default=64, help='per process')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--round-s', type=float, default=0.25, help='seconds per timed round and model')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--budget-s', type=float, default=300.0, help='no section starts after this many seconds')
    p.add_argument('--compile-reserve-s', type=float, default=60.0,
                   help='no compiled k starts later than this before the end of the budget')
    p.add_argument('--skip', nargs='+', default=[], choices=('inference', 'train', 'compiled', 'ddp'))
    args = p.parse_args(argv)
    if args.dry_run:
        args.model = args.model or 'hydravit_test_patch4_16'
        args.compile_backend = args.compile_backend or 'eager'
        args.k = args.k or [1, 4]
        for name, value in dict(batch_size=4, train_batch_size=4, ddp_batch_size=2, rounds=1, round_s=0.005,
                                warmup=1).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.model = args.model or 'hydravit_base_patch16_224'
    args.compile_backend = args.compile_backend or 'inductor'
    return args


def run(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.perf_counter()
    deadline = start + args.budget_s
    if args.dry_run:
        device = torch.device('cpu')
    elif not torch.cuda.is_available():
        raise SystemExit('gpu_check: no CUDA device; use --dry-run to check the script on CPU')
    else:
        device = torch.device('cuda', 0)
    torch.manual_seed(0)
    model = timm.create_model(args.model).to(device).eval()
    ks = model.resolve_ks(args.k)
    compile_ks = model.resolve_ks(args.compile_k or [min(ks), max(ks)])
    report: Dict[str, Any] = dict(meta=dict(
        model=args.model, dry_run=args.dry_run, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU',
        gpus_visible=torch.cuda.device_count() if device.type == 'cuda' else 0, torch=torch.__version__,
        timm=timm.__version__, cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        ks=ks, compile_ks=compile_ks, started=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())), skipped=[])
    sections: List[tuple] = [
        ('inference', lambda: check_inference(model, ks, args, device)),
        ('train', lambda: check_training(model, ks, args, device)),
        ('ddp', lambda: check_ddp(args.model, args, device)),
        ('compiled', lambda: check_compiled(model, compile_ks, args, device, deadline)),
    ]
    for name, section in sections:
        if name in args.skip:
            report['skipped'].append(f'{name}: --skip')
        elif time.perf_counter() > deadline:
            report['skipped'].append(f'{name}: time budget of {args.budget_s:.0f} s spent')
        else:
            report[name] = section()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    report['meta']['elapsed_s'] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, text in (('gpu_check.json', json.dumps(report, indent=1)), ('gpu_check.md', markdown(report))):
        tmp = out / (file_name + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, out / file_name)
    logger.info('-> %s, %s (%.0f s)', out / 'gpu_check.json', out / 'gpu_check.md', report['meta']['elapsed_s'])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    run(parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
