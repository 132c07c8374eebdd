"""The HTTP API of ``hydravit serve`` as a FastAPI app: /predict, /healthz, /metrics, /info.

``POST /predict`` takes one image as the raw request body, one or several images as multipart fields
``file`` (several = a batch), or JSON ``{"images": [base64, ...]}``; ``?k=K`` pins a trained k instead of
the policy's choice. It answers per image: class (index and name), the top-5 probabilities, the k used
and the server-side latency. Every bad request gets a 4xx naming the problem and the server goes on; a
request predicted to miss the latency target gets 503 at once (see :mod:`.batcher`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..deployment.torchscript import TracedSubnetworks
from ..models.costs import cost_row
from ..models.factory import UniversalModel
from .batcher import DynamicBatcher
from .inputs import ImageDecoder, InputError
from .metrics import ServerMetrics
from .policies import ServingPolicy

logger = logging.getLogger(__name__)

__all__ = ['ServerState', 'create_app']

TOP = 5
INLINE_DECODE_BYTES = 64 * 1024
BATCH_TYPES = ('multipart/form-data', 'application/json')  # answered as {'predictions': [...]}


@dataclass
class ServerState:
    """Everything one server process holds: model, policy, decoder, batcher settings, /info contents."""
    model: UniversalModel
    policy: ServingPolicy
    decoder: ImageDecoder
    target_ms: float
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_body_bytes: int = 8 * 1024 * 1024
    max_images_per_request: int = 64
    shed_late: bool = True
    class_names: Optional[Sequence[str]] = None
    accuracy: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    model_name: str = ''
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.model.k_choices, self.max_batch, self.target_ms)
        self.batcher = DynamicBatcher(self.policy, self.metrics, max_batch=self.max_batch,
                                      max_wait_ms=self.max_wait_ms, max_queue=self.max_queue,
                                      target_ms=self.target_ms, shed_late=self.shed_late)

    def info(self) -> Dict[str, Any]:
        cfg = self.model.config
        per_k = []
        for k in self.model.k_choices:
            row: Dict[str, Any] = dict(cost_row(cfg, k))
            row.update({key: v for key, v in self.accuracy.get(k, {}).items() if key != 'results_file'})
            per_k.append(row)
        results = next((v.get('results_file') for v in self.accuracy.values() if v.get('results_file')), None)
        return {'model': self.model_name, 'checkpoint': self.checkpoint, 'num_classes': self.model.num_classes,
                'class_names': list(self.class_names) if self.class_names else None,
                'k_choices': list(self.model.k_choices), 'per_k': per_k, 'results_file': results,
                'latency_target_ms': self.target_ms, 'max_batch': self.max_batch, 'max_wait_ms': self.max_wait_ms,
                'max_body_bytes': self.max_body_bytes, 'max_images_per_request': self.max_images_per_request,
                'shed_late': self.shed_late, 'torchscript': isinstance(self.policy.forward, TracedSubnetworks),
                'preprocessing': self.decoder.describe(), **self.policy.describe()}


def _content_type(request: Request) -> str:
    return request.headers.get('content-type', '').split(';')[0].strip().lower()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (Content-Length or streamed)."""
    declared = request.headers.get('content-length')
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(f'Content-Length {declared!r} is not a number', status=400) from None
        if size > limit:
            raise InputError(f'upload of {size} bytes is larger than the {limit} bytes allowed (--max-body-bytes)',
                             status=413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(f'upload is larger than the {limit} bytes allowed (--max-body-bytes)', status=413)
        chunks.append(chunk)
    return b''.join(chunks)


async def _images_of(request: Request, body: bytes, max_images: int) -> List[tuple]:
    """[(name, bytes)] from a raw body, a multipart form (fields ``file``) or JSON ``{"images": [...]}``."""
    ctype = _content_type(request)
    if ctype == 'multipart/form-data':
        async def replay() -> Dict[str, Any]:
            return {'type': 'http.request', 'body': body, 'more_body': False}
        try:
            form = await Request(request.scope, replay).form(max_files=max_images, max_fields=max_images)
        except Exception as e:  # starlette raises its own errors for malformed or too-large forms
            detail = str(getattr(e, 'detail', e))
            if 'Too many' in detail:
                raise InputError(f'more than the {max_images} images allowed in one request ({detail})',
                                 status=413) from None
            raise InputError(f'malformed multipart form: {detail}', status=400) from None
        files = form.getlist('file')
        if not files:
            raise InputError(f'multipart form has no field "file" (fields sent: {sorted(set(form.keys()))}): '
                             'send each image as a field named file')
        out = []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise InputError(f'form field file #{i} is text, not an uploaded file')
            out.append((f'file #{i} ({f.filename})', await f.read()))
        await form.close()
    elif ctype == 'application/json':
        try:
            payload = json.loads(body or b'null')
        except ValueError as e:
            raise InputError(f'request body is not valid JSON: {e}', status=400) from None
        if not isinstance(payload, dict) or not isinstance(payload.get('images'), list):
            raise InputError('a JSON request must be {"images": [base64 image, ...]}')
        out = []
        for i, item in enumerate(payload['images']):
            try:
                out.append((f'images[{i}]', base64.b64decode(str(item), validate=True)))
            except (binascii.Error, ValueError):
                raise InputError(f'images[{i}] is not valid base64') from None
    else:
        out = [('request body', body)]
    if not out:
        raise InputError('empty batch: the request holds no image')
    if len(out) > max_images:
        raise InputError(f'{len(out)} images in one request, more than the {max_images} allowed', status=413)
    return out


async def _decode(decoder: ImageDecoder, data: bytes, name: str) -> torch.Tensor:
    """Small files are decoded on the event loop (a thread hop costs more than decoding them), large ones off it."""
    if len(data) <= INLINE_DECODE_BYTES:
        return decoder(data, name)
    return await asyncio.get_running_loop().run_in_executor(None, decoder, data, name)


REQUEST_START = 'x-request-start'
MAX_QUEUEING_S = 3600.0


def request_arrival(request: Request, handler_start: float) -> float:
    """When the request reached the server, on the ``perf_counter`` clock: the handler's start, or earlier where
    a front proxy or the load generator stamped it (``X-Request-Start: t=SECONDS`` since the epoch, as nginx
    writes it; milliseconds and microseconds are recognised by size). Under load a request can wait long
    before its handler runs; that wait counts against the target too. A stamp in the future or unreadable
    is ignored, one older than an hour is clamped: a client can only make its own request look late."""
    raw = request.headers.get(REQUEST_START)
    if not raw:
        return handler_start
    try:
        stamp = float(raw.strip().removeprefix('t='))
    except ValueError:
        return handler_start
    for scale in (1.0, 1e3, 1e6):  # seconds, milliseconds, microseconds since the epoch
        if stamp / scale < 1e10:
            stamp /= scale
            break
    waited = time.time() - stamp
    if not math.isfinite(waited) or waited <= 0:
        return handler_start
    return handler_start - min(waited, MAX_QUEUEING_S)


def _pinned_k(request: Request, model: UniversalModel) -> Optional[int]:
    raw = request.query_params.get('k')
    if raw is None:
        return None
    try:
        return model.resolve_k(int(raw))
    except ValueError:
        raise InputError(f'k={raw} is not a trained subnetwork of this model: allowed values are '
                         f'{list(model.k_choices)}') from None


def _answers(state: ServerState, predictions: Sequence[Any], latency_ms: float) -> List[Dict[str, Any]]:
    """One answer per image: class, label, k and the top-5 probabilities (one softmax for the whole request)."""
    probs = torch.softmax(torch.stack([p.logits for p in predictions]).float(), dim=-1)
    top = probs.topk(min(TOP, probs.shape[-1]), dim=-1)
    names = state.class_names

    def label(i: int) -> Any:
        return names[i] if names and i < len(names) else str(i)

    answers = []
    for p, values, indices in zip(predictions, top.values.tolist(), top.indices.tolist(), strict=True):
        answers.append({'class': indices[0], 'label': label(indices[0]), 'k': p.k,
                        'top5': [{'class': i, 'label': label(i), 'probability': round(v, 6)}
                                 for v, i in zip(values, indices, strict=True)],
                        'latency_ms': round(latency_ms, 3), 'batch_size': p.batch_size})
    return answers


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        logger.info('model %s ready, k %s, policy %s', state.model_name, list(state.model.k_choices),
                    state.policy.describe()['policy'])
        try:
            yield
        finally:
            await state.batcher.stop()  # every accepted request is answered first
            logger.info('stopped after %d requests', state.metrics.total_requests())

    app = FastAPI(title='hydravit serve', lifespan=lifespan)
    app.state.server = state

    @app.post('/predict')
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            k = _pinned_k(request, state.model)
            arrival = request_arrival(request, start)
            body = await _read_body(request, state.max_body_bytes)
            state.batcher.refuse_if_late(1, arrival)  # before decoding: refusing an overload must stay cheap
            files = await _images_of(request, body, state.max_images_per_request)
            images = [await _decode(state.decoder, data, name) for name, data in files]
            predictions = await state.batcher.submit(images, k, arrival=arrival)
        except InputError as e:
            state.metrics.count_request('/predict', e.status)
            return _error(e.status, str(e))
        except RuntimeError as e:
            state.metrics.count_request('/predict', 500)
            return _error(500, str(e))
        latency_ms = (time.perf_counter() - start) * 1e3
        for _ in predictions:
            state.metrics.record_image_latency(latency_ms)
        state.metrics.count_request('/predict', 200)
        answers = _answers(state, predictions, latency_ms)
        if _content_type(request) not in BATCH_TYPES:  # one raw image: one answer
            return JSONResponse(answers[0])
        return JSONResponse({'predictions': answers, 'latency_ms': round(latency_ms, 3)})

    @app.get('/healthz')
    async def healthz() -> Response:
        state.metrics.count_request('/healthz', 200)
        return JSONResponse({'status': 'ok', 'queue_length': state.batcher.queue_length})

    @app.get('/metrics')
    async def metrics() -> Response:
        state.metrics.count_request('/metrics', 200)
        state.metrics.queue_length = state.batcher.queue_length
        return PlainTextResponse(state.metrics.render(), media_type='text/plain; version=0.0.4')

    @app.get('/info')
    async def info() -> Response:
        state.metrics.count_request('/info', 200)
        return JSONResponse(state.info())

    return app
