"""Measured speed of cascades and static subnetworks, side by side in one run.

Speed on a shared machine drifts, so every contender is timed once per round, rounds are interleaved (the
order rotates each round) and medians are reported: ratios between contenders of one run are what count.
Throughput is images/s over the timing images in batches of ``batch_size``; latency is the mean time per
image at batch 1 over the first ``latency_images`` (a cascade's latency depends on the image, so the mean
over real images, not one repeated image, is its figure).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Mapping

import torch

__all__ = ['measure_speed']

Runner = Callable[[torch.Tensor], Any]


def _sync(x: torch.Tensor) -> None:
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)


def _seconds(fn: Runner, batches: List[torch.Tensor]) -> float:
    _sync(batches[0])
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    _sync(batches[0])
    return time.perf_counter() - start


def measure_speed(contenders: Mapping[str, Runner], images: torch.Tensor, *, batch_size: int = 256,
                  rounds: int = 3, latency_images: int = 64, measure_latency: bool = True,
                  measure_throughput: bool = True) -> Dict[str, Dict[str, float]]:
    """``{name: {'img_per_s', 'latency_ms'}}`` for every contender, timed in interleaved rounds (medians)."""
    if batch_size < 1 or rounds < 1:
        raise ValueError(f'batch_size and rounds must be >= 1, got {batch_size}, {rounds}')
    if images.shape[0] == 0:
        raise ValueError('no images to time')
    full = images.shape[0] // batch_size * batch_size or images.shape[0]
    batches = list(images[:full].split(batch_size))
    singles = list(images[:max(1, min(latency_images, images.shape[0]))].split(1))
    names = list(contenders)
    rates: Dict[str, List[float]] = {n: [] for n in names}
    latencies: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up: allocator, kernels for these shapes
            if measure_throughput:
                contenders[name](batches[0])
            if measure_latency:
                contenders[name](singles[0])
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                if measure_throughput:
                    rates[name].append(full / _seconds(contenders[name], batches))
                if measure_latency:
                    latencies[name].append(1e3 * _seconds(contenders[name], singles) / len(singles))
    out: Dict[str, Dict[str, float]] = {}
    for name in names:
        out[name] = {}
        if measure_throughput:
            out[name]['img_per_s'] = statistics.median(rates[name])
        if measure_latency:
            out[name]['latency_ms'] = statistics.median(latencies[name])
    return out
