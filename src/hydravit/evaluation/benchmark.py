"""Speed, memory and switching cost of every subnetwork k, in three modes measured in one run.

Modes: ``sliced`` (the universal model run at k), ``extracted`` (``subnet.extract_subnet``) and ``timm``
(a fresh timm ``VisionTransformer`` of the same shape). Ratios between them are only meaningful within
one run, so modes are timed in interleaved rounds and reported side by side.

CPU memory is the peak resident set of a fresh child process per (k, mode) above its start-up RSS: a
high-water mark cannot be reset inside one process once a bigger model has run. Children are forked
from a ``forkserver`` that has only imported torch, so they start in milliseconds and never inherit
an OpenMP thread pool. They rebuild the model from its config: memory does not depend on weight values.

On CPU, glibc's malloc returns large blocks to the OS after every free, so each forward pays page
faults that depend on the allocation history more than on the model; :data:`MALLOC_ENV` fixes the
thresholds so all modes are timed alike. The variables are read once at process start, which is why
the CLI re-executes itself with them (:func:`reexec_with_malloc_env`) before anything is timed.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from ..models.compiled import CompileOptions, compile_module, compile_universal
from ..models.config import HydraViTConfig
from ..models.costs import subnet_cost
from ..models.factory import UniversalModel, model_from_config
from ..models.subnet import extract_subnet, subnet_vit, subnet_vit_kwargs

__all__ = [
    'BENCH_MODES', 'MALLOC_ENV', 'benchmark_subnets', 'measure_switching', 'build_runner', 'flop_counter_gmacs',
    'peak_memory_mb', 'reexec_with_malloc_env', 'spread_pct', 'torch_threads', 'NOISY_SPREAD_PCT',
]

BENCH_MODES = ('sliced', 'extracted', 'timm')
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(1 << 28), 'MALLOC_TRIM_THRESHOLD_': str(1 << 28)}
Runner = Callable[[torch.Tensor], torch.Tensor]
NOISY_SPREAD_PCT = 10.0  # rounds further apart than this: the timing is marked noisy


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (``None``: left as it is), restored
    after it: a timing is only comparable with one taken at the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reexec_with_malloc_env(argv: Sequence[str]) -> None:
    """Restart this Python process with :data:`MALLOC_ENV` set, unless it is set already (no return then)."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **MALLOC_ENV})


def build_runner(model: UniversalModel, k: int, mode: str,
                 compile_options: Optional[CompileOptions] = None) -> nn.Module | Runner:
    """The callable that runs subnetwork ``k`` in ``mode`` (eval mode), compiled with ``compile_options``."""
    if mode == 'sliced':
        model.eval()
        if compile_options is not None:
            return compile_universal(model, compile_options).bind(k)
        return lambda x: model(x, k=k)
    vit = _standalone_vit(model, k, mode)
    return compile_module(vit, compile_options) if compile_options is not None else vit


def _standalone_vit(model: UniversalModel, k: int, mode: str) -> VisionTransformer:
    """Subnetwork ``k`` as its own timm ViT in eval mode: ``extracted`` (its weights) or a fresh ``timm`` one."""
    if mode == 'extracted':
        return extract_subnet(model, k)
    if mode == 'timm':
        device = next(model.parameters()).device
        return subnet_vit(model.config, k).to(device).eval()
    raise ValueError(f'mode must be one of {BENCH_MODES}, got {mode!r}')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor, iters: int) -> List[float]:
    """Seconds of each of ``iters`` calls."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x)
        _sync(x.device)
        times.append(time.perf_counter() - start)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _throughputs(runners: Dict[Any, Runner], x: torch.Tensor, rounds: int, min_seconds: float,
                 warmup: int) -> Dict[Any, List[float]]:
    """Images/s per mode in each of the interleaved rounds of about ``min_seconds``."""
    with torch.inference_mode():
        per_call = {}
        for mode, fn in runners.items():
            _timed(fn, x, warmup)
            per_call[mode] = statistics.median(_timed(fn, x, 2))
        iters = {m: max(1, round(min_seconds / max(t, 1e-6))) for m, t in per_call.items()}
        samples: Dict[Any, List[float]] = {m: [] for m in runners}
        for _ in range(rounds):
            for mode, fn in runners.items():
                samples[mode].append(iters[mode] * x.shape[0] / sum(_timed(fn, x, iters[mode])))
    return samples


def spread_pct(samples: Sequence[float]) -> float:
    """(max - min) / median of repeated timings, in percent: how far one timing could be off."""
    return 100.0 * (max(samples) - min(samples)) / statistics.median(samples)


def _latencies(fn: Runner, x: torch.Tensor, iters: int, warmup: int) -> Dict[str, float]:
    with torch.inference_mode():
        _timed(fn, x, warmup)
        times = [t * 1e3 for t in _timed(fn, x, iters)]
    return dict(infer_latency_ms=statistics.median(times), infer_latency_ms_p10=_percentile(times, 0.1),
                infer_latency_ms_p90=_percentile(times, 0.9))


def _train_throughput(model: UniversalModel, k: int, mode: str, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Images/s of forward + backward + SGD step, on a copy so the caller's weights never move."""
    net: nn.Module = copy.deepcopy(model) if mode == 'sliced' else _standalone_vit(model, k, mode)
    net.train()
    fn = (lambda t: net(t, k=k)) if mode == 'sliced' else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step(t: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(fn(t), target).backward()
        opt.step()

    _timed(step, x, warmup)
    return iters * x.shape[0] / sum(_timed(step, x, iters))


def flop_counter_gmacs(model: nn.Module | Runner, x: torch.Tensor) -> Optional[float]:
    """GMACs per image by PyTorch's FlopCounterMode, or None if it fails (it misses fused attention)."""
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x[:1])
        return counter.get_total_flops() / 2 / 1e9
    except Exception:  # a cross-check only: an unsupported op must not stop the benchmark
        return None


# ------------------------------------------------------------------------------------------ memory
def rss_kb(field: str) -> int:
    """A memory field of this process from /proc/self/status, in kB (VmRSS now, VmHWM the peak so far)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} missing from /proc/self/status')


def _peak_child(work: Callable[..., None], args: tuple, threads: int, warm_up: Optional[Callable[[], None]],
                queue: Any) -> None:
    try:
        torch.set_num_threads(threads)
        if warm_up is not None:
            warm_up()
        start = rss_kb('VmRSS')
        work(*args)
        queue.put((rss_kb('VmHWM') - start) / 1024)
    except Exception as e:  # reported to the parent, which raises it
        queue.put(f'{type(e).__name__}: {e}')


def fresh_process_peak_mb(work: Callable[..., None], args: tuple, what: str, *, threads: int = 1,
                          warm_up: Optional[Callable[[], None]] = None) -> float:
    """Peak resident memory (MB) of ``work(*args)`` in a fresh forkserver child, above the child's RSS after
    ``warm_up``: each measurement gets a process of its own, so earlier peaks never mix in. ``work`` and
    ``warm_up`` are module-level functions (they are pickled to the child)."""
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['torch', 'timm', 'hydravit.models'])
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(work, args, threads, warm_up, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    if isinstance(result, str):
        raise RuntimeError(f'{what} failed: {result}')
    return result


def _inference_once(config: dict, k: int, mode: str, batch_size: int) -> None:
    cfg = HydraViTConfig(**config)
    if mode == 'sliced':
        fn = build_runner(model_from_config(cfg), k, mode)
    else:  # a deployed subnet never holds the universal model; extracted and timm have the same tensors
        fn = subnet_vit(cfg, k).eval()
    with torch.inference_mode():
        fn(torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size))


def peak_memory_mb(config: HydraViTConfig, k: int, mode: str, batch_size: int, threads: int = 1) -> float:
    """Peak resident memory (MB) of one inference at ``batch_size`` in a fresh child process, above its start."""
    if not os.path.exists('/proc/self/status'):
        raise RuntimeError('CPU peak memory needs Linux /proc; run with measure_memory=False')
    return fresh_process_peak_mb(_inference_once, (config.to_dict(), k, mode, batch_size),
                                 f'memory child for k={k} mode={mode}', threads=threads)


def _cuda_peak_mb(fn: Runner, x: torch.Tensor) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(x.device)
    with torch.inference_mode():
        fn(x)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) / 2 ** 20


# ------------------------------------------------------------------------------------------ main API
def _prepare(model: UniversalModel, ks: Optional[Sequence[int]], device: str | torch.device,
             batch_size: int) -> Tuple[List[int], UniversalModel, torch.Tensor]:
    """Validated ks, the model in eval mode on ``device`` and a random input batch for it."""
    ks = model.resolve_ks(ks)
    device = torch.device(device)
    model = model.to(device).eval()
    cfg = model.config
    return ks, model, torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)


def benchmark_subnets(
        model: UniversalModel,
        ks: Optional[Sequence[int]] = None,
        *,
        modes: Sequence[str] = BENCH_MODES,
        batch_size: int = 256,
        device: str | torch.device = 'cpu',
        rounds: int = 3,
        min_seconds: float = 0.2,
        warmup: int = 3,
        latency_iters: int = 30,
        train: bool = False,
        train_iters: int = 5,
        measure_memory: bool = True,
        flop_count: bool = True,
        progress: Optional[Callable[..., Iterable[int]]] = None,
        interleave_ks: bool = False,
        compile_options: Optional[CompileOptions] = None,
) -> List[Dict]:
    """One row per (k, mode) with timm ``benchmark.py`` column names (see the module docstring).

    ``infer_samples_per_sec`` at ``batch_size`` (median of interleaved rounds), ``infer_latency_ms`` at
    batch 1 (median, p10, p90), optional ``train_samples_per_sec``, ``peak_mem_mb``, ``param_count``
    (M, counted), analytic ``gmacs`` and ``flop_counter_gmacs`` (misses the attention matmuls). The
    spread of the rounds: ``infer_samples_per_sec_min``/``_max`` and ``infer_spread_pct`` (see
    :func:`spread_pct`). ``progress`` wraps the loop over k (e.g. a tqdm bar). ``interleave_ks`` times every k
    in each round (all runners held at once: meant for the sliced mode, whose runners are views), so a slow
    drift of a shared machine cannot bend the curve across k.
    ``compile_options`` times the ``torch.compile``d runners (compilation happens in the warm-up; memory and
    FLOP counts stay eager; the training figure is eager).
    """
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise ValueError(f'modes must be a non-empty subset of {BENCH_MODES}, got {list(modes)}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    ks, model, x = _prepare(model, ks, device, batch_size)
    cfg, device = model.config, x.device
    rows = []
    all_speeds = None
    if interleave_ks:
        all_speeds = _throughputs({(k, m): build_runner(model, k, m, compile_options) for k in ks for m in modes},
                                  x, rounds, min_seconds, warmup)
    for k in (progress(ks, total=len(ks), desc='benchmark k') if progress is not None else ks):
        runners = {mode: build_runner(model, k, mode, compile_options) for mode in modes}
        speed = ({m: all_speeds[(k, m)] for m in modes} if all_speeds is not None
                 else _throughputs(runners, x, rounds, min_seconds, warmup))
        cost = subnet_cost(cfg, k)
        for mode, fn in runners.items():
            # the sliced runner is the universal model at k: its parameters are the subnetwork's share
            params = sum(p.numel() for p in fn.parameters()) if isinstance(fn, nn.Module) else cost.params
            eager = fn if compile_options is None else build_runner(model, k, mode)
            row = dict(k=k, mode=mode, infer_samples_per_sec=statistics.median(speed[mode]),
                       infer_samples_per_sec_min=min(speed[mode]), infer_samples_per_sec_max=max(speed[mode]),
                       infer_spread_pct=spread_pct(speed[mode]), infer_rounds=len(speed[mode]),
                       infer_batch_size=batch_size, threads=torch.get_num_threads(),
                       **_latencies(fn, x[:1], latency_iters, warmup))
            row['train_samples_per_sec'] = _train_throughput(model, k, mode, x, train_iters, 1) if train else None
            if measure_memory:
                row['peak_mem_mb'] = (_cuda_peak_mb(eager, x) if device.type == 'cuda'
                                      else peak_memory_mb(cfg, k, mode, batch_size, torch.get_num_threads()))
            else:
                row['peak_mem_mb'] = None
            row.update(param_count=params / 1e6, gmacs=cost.gmacs,
                       flop_counter_gmacs=flop_counter_gmacs(eager, x) if flop_count else None, device=str(device),
                       compiled=compile_options is not None)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ switching
def _switch_pair(model: UniversalModel, k_from: int, k: int, x: torch.Tensor) -> tuple:
    """(seconds of use_k(k) + the first forward at k right after running at k_from, seconds of the next one)."""
    model(x, k=k_from)
    _sync(x.device)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with model.use_k(k):
            model(x)
        _sync(x.device)
        times.append(time.perf_counter() - start)
    return tuple(times)


def _use_k_seconds(model: UniversalModel, k: int, iters: int = 1000) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        with model.use_k(k):
            pass
    return (time.perf_counter() - start) / iters


def _load_from_disk(path: Path, kwargs: dict, x: torch.Tensor) -> float:
    """Seconds to build a timm ViT, load its safetensors weights and run its first forward."""
    start = time.perf_counter()
    vit = VisionTransformer(**kwargs)
    vit.load_state_dict(load_file(str(path)), strict=True)
    vit.to(x.device).eval()
    vit(x)
    _sync(x.device)
    return time.perf_counter() - start


def measure_switching(model: UniversalModel, ks: Optional[Sequence[int]] = None, *, batch_size: int = 1,
                      device: str | torch.device = 'cpu', repeats: int = 30) -> List[Dict]:
    """Per k: cost of switching the in-memory universal model to k vs loading a model of that size.

    Each repeat runs the largest other k, then two forwards at k: the first pays any switching cost,
    the second is steady state. A control repeat does the same without switching (run at k first), so
    ``switch_overhead_ms`` = median(first - second) - median(control first - second); noise can make
    it negative. ``switch_ms`` = ``use_k`` cost + max(overhead, 0). ``load_ms`` = build a timm
    ViT + load_state_dict from a safetensors file + first forward (the paper's loading latency).
    """
    ks, model, x = _prepare(model, ks, device, batch_size)
    cfg, device = model.config, x.device
    rows = []
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix='hydravit-switch-') as tmp:
        for k in ks:
            k_from = max((j for j in model.k_choices if j != k), default=k)
            path = Path(tmp) / f'subnet_k{k}.safetensors'
            save_file({n: t.contiguous().cpu() for n, t in extract_subnet(model, k).state_dict().items()}, str(path))
            _load_from_disk(path, subnet_vit_kwargs(cfg, k), x)  # warm the page cache and the allocator
            pairs, controls = [], []
            for _ in range(repeats):  # interleaved, so both see the same machine load
                pairs.append(_switch_pair(model, k_from, k, x))
                controls.append(_switch_pair(model, k, k, x))
            first = statistics.median(p[0] for p in pairs)
            steady = statistics.median(p[1] for p in pairs)
            control = statistics.median(c[0] - c[1] for c in controls)
            overhead = statistics.median(p[0] - p[1] for p in pairs) - control
            use_k = _use_k_seconds(model, k)
            load = statistics.median(_load_from_disk(path, subnet_vit_kwargs(cfg, k), x) for _ in range(repeats))
            switch = use_k + max(overhead, 0.0)
            rows.append(dict(k=k, k_from=k_from, use_k_us=use_k * 1e6, first_forward_ms=first * 1e3,
                             steady_forward_ms=steady * 1e3, switch_overhead_ms=overhead * 1e3,
                             switch_ms=switch * 1e3, load_ms=load * 1e3, load_vs_switch=load / switch,
                             load_vs_forward=load / steady, batch_size=batch_size, device=str(device)))
    return rows
