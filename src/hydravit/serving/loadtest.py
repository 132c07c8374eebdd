"""An open-loop load generator for ``hydravit serve``: labelled test images at a scheduled rate.

Open loop: request i is sent at its scheduled time whether or not earlier ones were answered (as real
clients do), so an overloaded server shows up as latency and errors, not as a politely slower client.
It is bounded: a schedule of phases (rate x duration) fixes how many requests are sent, each has a
timeout, the number in flight is capped (a request over the cap counts as an error, never waits), and
it talks only to loopback addresses. Reported per phase: throughput, latency quantiles, the fraction
within the target, errors, the mean k served and the accuracy served (from the labels).
"""
from __future__ import annotations

import asyncio
import io
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from ..data.datasets import load_dataset
from .addresses import is_loopback
from .metrics import quantile

logger = logging.getLogger(__name__)

__all__ = ['Phase', 'parse_schedule', 'check_url', 'encode_images', 'run_load', 'summarize_load', 'LoadRecord',
           'MAX_REQUESTS', 'MAX_SECONDS']

MAX_REQUESTS = 200_000
MAX_SECONDS = 3600.0
_PHASE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*s\s*$')


@dataclass(frozen=True)
class Phase:
    rps: float
    seconds: float

    @property
    def name(self) -> str:
        return f'{self.rps:g}rps x {self.seconds:g}s'

    @property
    def requests(self) -> int:
        return int(round(self.rps * self.seconds))


def parse_schedule(text: str) -> List[Phase]:
    """``'rps:50x20s,200x20s,50x20s'`` -> three phases; bounded in total requests and time."""
    kind, sep, body = str(text).partition(':')
    if kind.strip() != 'rps' or not sep or not body.strip():
        raise ValueError(f"--schedule {text!r}: expected 'rps:RATExSECONDSs,...', e.g. 'rps:50x20s,200x20s'")
    phases = []
    for part in body.split(','):
        m = _PHASE.match(part)
        if not m:
            raise ValueError(f'--schedule phase {part!r}: expected RATExSECONDSs, e.g. 50x20s')
        phase = Phase(float(m.group(1)), float(m.group(2)))
        if phase.rps <= 0 or phase.seconds <= 0 or phase.requests < 1:
            raise ValueError(f'--schedule phase {part!r}: rate and duration must be > 0 and give >= 1 request')
        phases.append(phase)
    total, seconds = sum(p.requests for p in phases), sum(p.seconds for p in phases)
    if total > MAX_REQUESTS or seconds > MAX_SECONDS:
        raise ValueError(f'--schedule {text!r} sends {total} requests over {seconds:g} s; the load test is bounded '
                         f'to {MAX_REQUESTS} requests and {MAX_SECONDS:g} s')
    return phases


def check_url(url: str) -> str:
    """The base URL, refused unless it is http(s) on a loopback address (this tool never loads other hosts)."""
    parts = urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise ValueError(f'--url {url!r}: expected http://127.0.0.1:PORT')
    if not is_loopback(parts.hostname):
        raise ValueError(f'--url {url!r}: the load test only targets loopback addresses (127.0.0.0/8, ::1, '
                         f'localhost), not {parts.hostname}')
    return url.rstrip('/')


def encode_images(dataset_name: str, data_dir: Optional[str] = None, max_samples: int = 2000,
                  seed: int = 0) -> List[Tuple[bytes, int]]:
    """(PNG bytes, label) of a seeded sample of the data set's test split (encoded once, before sending)."""
    dataset = load_dataset(dataset_name, data_dir, split='val', max_samples=max_samples, seed=seed)
    out = []
    for i in range(len(dataset)):
        img, label = dataset[i]
        buf = io.BytesIO()
        img.save(buf, format='PNG')
        out.append((buf.getvalue(), int(label)))
    return out


@dataclass
class LoadRecord:
    phase: int
    scheduled_s: float
    send_lag_ms: float
    status: int            # HTTP status; 0 for a client-side failure (timeout, refused, in-flight cap)
    latency_ms: float
    error: str = ''
    k: Optional[float] = None          # mean k over the request's images
    images: int = 1
    correct: int = 0                   # images whose served class matches the label
    server_latency_ms: Optional[float] = None


def _arrivals(phases: Sequence[Phase], arrival: str, seed: int) -> List[Tuple[int, float]]:
    """(phase index, send time in s from the start) for every request of the schedule."""
    rng = random.Random(seed)
    out, start = [], 0.0
    for i, p in enumerate(phases):
        n = p.requests
        if arrival == 'uniform':
            times = [start + j / p.rps for j in range(n)]
        else:  # Poisson process conditioned on n arrivals in the phase: sorted uniforms
            times = sorted(start + rng.random() * p.seconds for _ in range(n))
        out += [(i, t) for t in times]
        start += p.seconds
    return out


def _request(sample: Sequence[Tuple[bytes, int]]) -> Dict[str, Any]:
    """One image as the raw body, several as a multipart batch; stamped with the send time (``X-Request-Start``,
    as a front proxy does) so the server counts the time a request waited before its handler ran."""
    headers = {'x-request-start': f't={time.time():.6f}'}
    if len(sample) == 1:
        return dict(content=sample[0][0], headers={**headers, 'content-type': 'image/png'})
    return dict(files=[('file', (f'{i}.png', data, 'image/png')) for i, (data, _) in enumerate(sample)],
                headers=headers)


def _answers(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    return body['predictions'] if 'predictions' in body else [body]


async def _load(url: str, images: Sequence[Tuple[bytes, int]], phases: Sequence[Phase], *, arrival: str,
                seed: int, timeout_s: float, max_inflight: int, per_request: int) -> List[LoadRecord]:
    import httpx

    schedule = _arrivals(phases, arrival, seed)
    order = random.Random(seed + 1)
    records: List[LoadRecord] = []
    inflight = 0
    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, trust_env=False) as client:
        async def one(phase: int, at: float, lag_ms: float, sample: Sequence[Tuple[bytes, int]]) -> None:
            nonlocal inflight
            inflight += 1
            start = time.perf_counter()
            n = len(sample)
            try:
                r = await client.post('/predict', **_request(sample))
                latency = (time.perf_counter() - start) * 1e3
                if r.status_code == 200:
                    body = r.json()
                    answers = _answers(body)
                    hits = sum(int(a['class']) == lab for a, (_, lab) in zip(answers, sample, strict=True))
                    records.append(LoadRecord(phase, at, lag_ms, 200, latency, images=n,
                                              k=sum(a['k'] for a in answers) / n, correct=hits,
                                              server_latency_ms=float(body['latency_ms'])))
                else:
                    records.append(LoadRecord(phase, at, lag_ms, r.status_code, latency, images=n,
                                              error=f'http {r.status_code}'))
            except httpx.HTTPError as e:
                records.append(LoadRecord(phase, at, lag_ms, 0, (time.perf_counter() - start) * 1e3, images=n,
                                          error=type(e).__name__))
            finally:
                inflight -= 1

        tasks = []
        t0 = time.perf_counter()
        for phase, at in schedule:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            lag_ms = max(0.0, (time.perf_counter() - t0 - at) * 1e3)
            sample = [images[order.randrange(len(images))] for _ in range(per_request)]
            if inflight >= max_inflight:
                records.append(LoadRecord(phase, at, lag_ms, 0, float('nan'), images=per_request,
                                          error='in-flight cap'))
                continue
            tasks.append(asyncio.create_task(one(phase, at, lag_ms, sample)))
        await asyncio.gather(*tasks)
    return records


def run_load(url: str, images: Sequence[Tuple[bytes, int]], phases: Sequence[Phase], *, arrival: str = 'poisson',
             seed: int = 0, timeout_s: float = 10.0, max_inflight: int = 512,
             images_per_request: int = 1) -> List[LoadRecord]:
    """Send the schedule and wait for every answer (or its timeout); one record per scheduled request.

    ``images_per_request`` > 1 sends each request as a multipart batch of that many images (clients that
    batch themselves pay the HTTP overhead once per batch).
    """
    if images_per_request < 1:
        raise ValueError(f'images per request must be >= 1, got {images_per_request}')
    if arrival not in ('poisson', 'uniform'):
        raise ValueError(f"arrival must be 'poisson' or 'uniform', got {arrival!r}")
    if not images:
        raise ValueError('no images to send')
    if timeout_s <= 0 or max_inflight < 1:
        raise ValueError('timeout must be > 0 and max_inflight >= 1')
    return asyncio.run(_load(check_url(url), images, phases, arrival=arrival, seed=seed, timeout_s=timeout_s,
                             max_inflight=max_inflight, per_request=images_per_request))


def _row(name: str, seconds: float, rs: Sequence[LoadRecord], target_ms: float) -> Dict[str, Any]:
    ok = [r for r in rs if r.status == 200]
    lat = sorted(r.latency_ms for r in ok)
    errors = Counter(r.error for r in rs if r.status != 200)
    images = sum(r.images for r in ok)
    return dict(phase=name, sent=len(rs), ok=len(ok), errors=len(rs) - len(ok),
                error_kinds=';'.join(f'{k}={v}' for k, v in sorted(errors.items())),
                throughput_rps=len(ok) / seconds if seconds > 0 else float('nan'),
                images_per_s=images / seconds if seconds > 0 else float('nan'),
                p50_ms=quantile(lat, 0.5), p95_ms=quantile(lat, 0.95), p99_ms=quantile(lat, 0.99),
                within_target=sum(r.latency_ms <= target_ms for r in ok) / len(rs) if rs else float('nan'),
                accuracy=100.0 * sum(r.correct for r in ok) / images if images else float('nan'),
                mean_k=sum((r.k or 0) * r.images for r in ok) / images if images else float('nan'),
                max_send_lag_ms=max((r.send_lag_ms for r in rs), default=0.0))


def summarize_load(records: Sequence[LoadRecord], phases: Sequence[Phase], target_ms: float) -> List[Dict[str, Any]]:
    """One row per phase and one for the whole run. ``within_target`` counts errors as misses."""
    rows = [_row(f'{i}: {p.name}', p.seconds, [r for r in records if r.phase == i], target_ms)
            for i, p in enumerate(phases)]
    rows.append(_row('all', sum(p.seconds for p in phases), records, target_ms))
    for row in rows:
        row['target_ms'] = target_ms
    return rows


def server_info(url: str, timeout_s: float = 10.0) -> Dict[str, Any]:
    import httpx

    try:
        r = httpx.get(check_url(url) + '/info', timeout=timeout_s, trust_env=False)
        r.raise_for_status()
        return r.json()
    except httpx.HTTPError as e:
        raise ValueError(f'no hydravit server answers at {url}/info: {type(e).__name__}: {e}') from None
