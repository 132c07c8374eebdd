"""What one server process has done, as Prometheus text (exposition format 0.0.4).

Counters and histograms are cumulative; latency quantiles are over the last ``window`` requests (a
Prometheus summary), since a quantile since start-up hides the present. All updates happen on the
event loop thread, so nothing here locks. With ``--workers N`` each worker reports its own numbers.
"""
from __future__ import annotations

import bisect
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence

__all__ = ['ServerMetrics', 'quantile']

QUANTILES = (0.5, 0.9, 0.95, 0.99)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (nan for none)."""
    if not sorted_values:
        return float('nan')
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return float(sorted_values[rank - 1])


@dataclass
class _Histogram:
    bounds: List[float]
    counts: List[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def add(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def lines(self, name: str) -> List[str]:
        out, running = [], 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            running += c
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f'{name}_sum {self.total:g}', f'{name}_count {self.count}']
        return out


class ServerMetrics:
    def __init__(self, ks: Sequence[int], max_batch: int, target_ms: float, window: int = 4096) -> None:
        self.ks, self.target_ms = list(ks), target_ms
        self.requests: Counter = Counter()          # (endpoint, status) -> count
        self.images = 0
        self.within_target = 0
        self.batches = 0
        bounds, b = [], 1
        while b < max_batch:
            bounds.append(float(b))
            b *= 2
        self.batch_size = _Histogram(bounds + [float(max_batch)])
        self.k_images = _Histogram([float(k) for k in self.ks])
        self.images_by_k: Counter = Counter()
        self.latency_window: Deque[float] = deque(maxlen=window)
        self.forward_window: Deque[float] = deque(maxlen=window)
        self.latency_sum_s = 0.0
        self.latency_count = 0
        self.forward_sum_s = 0.0
        self.queue_length = 0
        self.shed_images = 0                        # refused with 503 (predicted late, or queue full)
        self.current_k: Optional[int] = None

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, int(status))] += 1

    def record_batch(self, size: int, ks: Sequence[int], forward_ms: float) -> None:
        self.batches += 1
        self.batch_size.add(size)
        for k in ks:
            self.k_images.add(k)
            self.images_by_k[k] += 1
        self.forward_window.append(forward_ms / 1e3)
        self.forward_sum_s += forward_ms / 1e3

    def record_image_latency(self, latency_ms: float) -> None:
        self.images += 1
        self.within_target += latency_ms <= self.target_ms
        self.latency_window.append(latency_ms / 1e3)
        self.latency_sum_s += latency_ms / 1e3
        self.latency_count += 1

    def total_requests(self, endpoint: str = '/predict') -> int:
        return sum(c for (e, _), c in self.requests.items() if e == endpoint)

    def render(self) -> str:
        pid = os.getpid()
        lines: List[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.extend([f'# HELP {name} {text}', f'# TYPE {name} {kind}'])

        def single(name: str, kind: str, text: str, value: object) -> None:
            head(name, kind, text)
            lines.append(f'{name} {value}')

        head('hydravit_requests_total', 'counter', 'HTTP requests by endpoint and status code')
        for (endpoint, status), c in sorted(self.requests.items()):
            lines.append(f'hydravit_requests_total{{endpoint="{endpoint}",status="{status}"}} {c}')
        single('hydravit_images_total', 'counter', 'images answered', self.images)
        single('hydravit_images_within_target_total', 'counter', 'images answered within the latency target',
               self.within_target)
        single('hydravit_latency_target_seconds', 'gauge', 'the latency target', f'{self.target_ms / 1e3:g}')
        single('hydravit_shed_images_total', 'counter', 'images refused with 503: late or queue full',
               self.shed_images)
        head('hydravit_batch_size', 'histogram', 'images per model batch')
        lines += self.batch_size.lines('hydravit_batch_size')
        head('hydravit_k', 'histogram', 'heads k that answered each image')
        lines += self.k_images.lines('hydravit_k')
        head('hydravit_images_by_k_total', 'counter', 'images answered per k')
        for k in self.ks:
            lines.append(f'hydravit_images_by_k_total{{k="{k}"}} {self.images_by_k[k]}')
        for name, window, total, count, text in (
                ('hydravit_request_latency_seconds', self.latency_window, self.latency_sum_s, self.latency_count,
                 'server-side latency per image, arrival to answer (quantiles over the last requests)'),
                ('hydravit_forward_latency_seconds', self.forward_window, self.forward_sum_s, self.batches,
                 'model forward time per batch (quantiles over the last batches)')):
            head(name, 'summary', text)
            values = sorted(window)
            for q in QUANTILES:
                lines.append(f'{name}{{quantile="{q:g}"}} {quantile(values, q):g}')
            lines += [f'{name}_sum {total:g}', f'{name}_count {count}']
        single('hydravit_queue_length', 'gauge', 'images waiting for a batch', self.queue_length)
        single('hydravit_current_k', 'gauge', 'k the policy would give the next batch (-1: decided per image)',
               self.current_k if self.current_k is not None else -1)
        single('hydravit_worker_pid', 'gauge', 'process id of the worker that answered this scrape', pid)
        return '\n'.join(lines) + '\n'

    def snapshot(self) -> Dict[str, object]:
        return {'requests': self.total_requests(), 'images': self.images, 'batches': self.batches,
                'images_by_k': {str(k): self.images_by_k[k] for k in self.ks}}
