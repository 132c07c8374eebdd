"""Dynamic batching: images from many requests collected into one forward pass.

A batch closes when it holds ``max_batch`` images or ``max_wait_ms`` after its first image arrived,
whichever is first; while the model runs, new images queue, so under load batches fill without waiting.
The forward pass runs on one dedicated thread (the policy is used from that thread only) and the event
loop keeps accepting requests meanwhile. :meth:`DynamicBatcher.stop` serves everything queued before it
returns: no accepted image is dropped on shutdown.

With ``shed_late`` (the default) a request that could not be answered within the target even at the
policy's cheapest batch -- its age plus the queue ahead of it plus the batch in progress -- is refused
with 503 at once instead of queued: the backlog stays bounded by the target, so an overload ends when
the load does instead of when a queue many seconds long has drained.
"""
from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import torch

from .inputs import InputError
from .metrics import ServerMetrics
from .policies import Backlog, BatchOutput, ServingPolicy

logger = logging.getLogger(__name__)

__all__ = ['DynamicBatcher', 'Prediction']


@dataclass
class Prediction:
    logits: torch.Tensor   # (classes,)
    k: int
    batch_size: int


class ArrivalRate:
    """Images per second offered to the server: the larger of the rates over a short and a long window.

    The short window sees a step up in load within a fraction of a second; the long one keeps a lull between
    bursts of a steady load from reading as a drop. Offered, not accepted: a shed request is load as well.
    """

    def __init__(self, windows_s: Tuple[float, float] = (0.5, 2.0)) -> None:
        if not 0 < windows_s[0] <= windows_s[1]:
            raise ValueError(f'need 0 < short window <= long window, got {windows_s}')
        self.windows_s = windows_s
        self._events: Deque[Tuple[float, int]] = deque()

    def add(self, now: float, images: int) -> None:
        self._events.append((now, images))
        while self._events and self._events[0][0] < now - self.windows_s[1]:
            self._events.popleft()

    def per_s(self, now: float) -> float:
        return max(sum(n for t, n in self._events if t >= now - w) / w for w in self.windows_s)


@dataclass
class _Pending:
    x: torch.Tensor
    k: Optional[int]
    arrival: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    def __init__(self, policy: ServingPolicy, metrics: ServerMetrics, *, max_batch: int, max_wait_ms: float,
                 max_queue: int = 4096, target_ms: Optional[float] = None, shed_late: bool = True,
                 clock=time.perf_counter) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f'need max_batch >= 1, max_wait_ms >= 0 and max_queue >= 1, got {max_batch}, '
                             f'{max_wait_ms}, {max_queue}')
        self.policy, self.metrics = policy, metrics
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.target_ms, self.shed_late = target_ms, shed_late
        self.clock = clock
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stopping = False
        self._collecting = 0
        self._running = False  # a forward pass is in progress
        # time a backlogged batch cycle spends outside the model (collecting, thread hops, answering): on a
        # busy machine the event loop's share of the CPU makes it comparable to the forward pass itself
        self._overheads: Deque[float] = deque(maxlen=9)
        self._previous: Optional[Tuple[float, float]] = None  # (start, forward ms) of a batch that left a queue
        self.arrivals = ArrivalRate()  # touched on the event loop only

    @property
    def queue_length(self) -> int:
        """Images accepted and not yet in a forward pass (queued, or in the batch being collected)."""
        return (self._queue.qsize() if self._queue is not None else 0) + self._collecting

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='hydravit-infer')
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name='hydravit-batcher')
        self.metrics.current_k = self.policy.current_k()

    async def stop(self) -> None:
        """Refuse new images, serve the queued ones, then end the loop and the inference thread."""
        self._stopping = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    @property
    def overhead_ms(self) -> float:
        """Median time per batch outside the forward pass, measured between back-to-back batches (0 until then)."""
        return statistics.median(self._overheads) if self._overheads else 0.0

    def predicted_wait_ms(self, images: int) -> Optional[float]:
        """Predicted time until ``images`` more images would be answered at the policy's cheapest batch:
        the batch in progress, then every full batch the queue and they fill (None: the policy cannot tell)."""
        batch_ms = self.policy.fastest_batch_ms()
        if batch_ms is None:
            return None
        batches = int(self._running) + math.ceil((self.queue_length + images) / self.max_batch)
        return batches * (batch_ms + self.overhead_ms)

    def refuse_if_late(self, images: int, arrival: float) -> None:
        """503 (InputError) for a request of ``images`` that arrived at ``arrival`` and has waited past the target
        already, or is predicted to miss it even at the cheapest batch (where the policy can predict)."""
        if not self.shed_late or self.target_ms is None:
            return
        waited_ms = (self.clock() - arrival) * 1e3
        # an idle server adds no wait of its own (and would never measure again if it refused on a stale estimate)
        wait = self.predicted_wait_ms(images) if (self._running or self.queue_length) else 0.0
        answer_ms = waited_ms + (wait or 0.0)
        if answer_ms > self.target_ms:
            self.metrics.shed_images += images
            raise InputError(f'the server is overloaded: {self.queue_length} images queued, predicted answer after '
                             f'{answer_ms:.0f} ms, beyond the {self.target_ms:g} ms latency target; retry later',
                             status=503)

    async def submit(self, images: List[torch.Tensor], k: Optional[int] = None,
                     arrival: Optional[float] = None) -> List[Prediction]:
        """Queue ``images`` (each (C, H, W)); ``k`` pins them to one subnetwork instead of the policy's choice.

        ``arrival`` (this batcher's clock) is when the request reached the server, so time spent reading and
        decoding it counts towards its wait; default: now.
        """
        if self._queue is None or self._stopping:
            raise InputError('the server is shutting down', status=503)
        if self._queue.qsize() + len(images) > self.max_queue:
            self.metrics.shed_images += len(images)
            raise InputError(f'the server is overloaded: {self._queue.qsize()} images queued (limit '
                             f'{self.max_queue}); retry later', status=503)
        now = self.clock()
        arrival = now if arrival is None else min(arrival, now)
        self.arrivals.add(now, len(images))
        self.refuse_if_late(len(images), arrival)
        loop = asyncio.get_running_loop()
        pending = [_Pending(x, k, arrival, loop.create_future()) for x in images]
        for p in pending:
            self._queue.put_nowait(p)
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _collect(self) -> List[_Pending]:
        assert self._queue is not None
        first = await self._queue.get()
        batch = [first]
        deadline = first.arrival + self.max_wait_s
        try:
            while len(batch) < self.max_batch:
                self._collecting = len(batch)
                if self._queue.qsize():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
        finally:
            self._collecting = 0
        return batch

    def _run(self, batch: List[_Pending], queued: int, arrival_per_s: float) -> Dict[Optional[int], BatchOutput]:
        """On the inference thread: one forward per group (the policy's images, and each pinned k)."""
        groups: Dict[Optional[int], List[_Pending]] = {}
        for p in batch:
            groups.setdefault(p.k, []).append(p)
        out = {}
        for k, items in groups.items():
            x = torch.stack([p.x for p in items])
            backlog = Backlog(queued, (self.clock() - min(p.arrival for p in items)) * 1e3, self.overhead_ms,
                              arrival_per_s)
            out[k] = self.policy.run(x, backlog) if k is None else self.policy.run_at(x, k)
            logger.debug('batch of %d at k=%s: %d images queued behind it, oldest waited %.1f ms, %.0f images/s '
                         'arriving, forward %.1f ms', len(items), sorted(set(out[k].ks)), queued, backlog.waited_ms,
                         arrival_per_s, out[k].forward_ms)
        return out

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            queued = self._queue.qsize()  # images, like max_batch
            start = self.clock()
            arrival_per_s = self.arrivals.per_s(start)
            if self._previous is not None:
                self._overheads.append(max(0.0, (start - self._previous[0]) * 1e3 - self._previous[1]))
            self._running, self._previous = True, None
            forward_ms = 0.0
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, batch, queued, arrival_per_s)
                forward_ms = sum(o.forward_ms for o in outputs.values())
            except Exception as e:  # a model error fails this batch's requests, not the server
                logger.exception('inference failed for a batch of %d', len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError(f'inference failed: {type(e).__name__}: {e}'))
            else:
                groups: Dict[Optional[int], List[_Pending]] = {}
                for p in batch:
                    groups.setdefault(p.k, []).append(p)
                for k, items in groups.items():
                    result = outputs[k]
                    self.metrics.record_batch(len(items), result.ks, result.forward_ms)
                    for i, p in enumerate(items):
                        if not p.future.done():  # a client that went away cancelled its future
                            p.future.set_result(Prediction(result.logits[i], result.ks[i], len(items)))
            finally:
                self._running = False
                if self._queue.qsize() and forward_ms > 0:
                    self._previous = (start, forward_ms)
                for _ in batch:
                    self._queue.task_done()
                self.metrics.current_k = self.policy.current_k()
