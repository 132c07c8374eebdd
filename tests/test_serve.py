"""``hydravit serve`` and ``hydravit loadtest``: real servers on loopback ports, started and stopped here."""
from __future__ import annotations

import base64
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

pytest.importorskip('fastapi', reason='the serve extra is not installed (pip install hydravit[serve])')
pytest.importorskip('uvicorn', reason='the serve extra is not installed (pip install hydravit[serve])')
httpx = pytest.importorskip('httpx', reason='the serve extra is not installed (pip install hydravit[serve])')

from timm.data import resolve_data_config  # noqa: E402

from hydravit.cli import main  # noqa: E402
from hydravit.data.transforms import build_transform  # noqa: E402
from hydravit.deployment.torchscript import TracedSubnetworks  # noqa: E402
from hydravit.evaluation.evaluate import load_for_eval  # noqa: E402
from hydravit.serving.app import create_app, request_arrival  # noqa: E402
from hydravit.serving.batcher import ArrivalRate, DynamicBatcher  # noqa: E402
from hydravit.serving.inputs import ImageDecoder, InputError  # noqa: E402
from hydravit.serving.loadtest import check_url, parse_schedule, run_load, summarize_load  # noqa: E402
from hydravit.serving.metrics import ServerMetrics  # noqa: E402
from hydravit.serving.policies import AdaptivePolicy, Backlog, ServingPolicy, create_policy, parse_policy  # noqa: E402
from hydravit.serving.server import ServeConfig, bind_socket, build_state, uvicorn_config  # noqa: E402
from hydravit.storage.run_folder import resolve_checkpoint  # noqa: E402
from hydravit.training import load_train_config, train  # noqa: E402

from helpers import needs_fmnist  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / 'src')


def _tiny_data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    data.num_classes = 10  # type: ignore[attr-defined]
    return data


@pytest.fixture(scope='module')
def run_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('runs')
    cfg = load_train_config(None, model='hydravit_test_patch4_16', epochs=1, heads=[2, 4], num_random=0,
                            batch_size=8, warmup_epochs=0, output=str(out), experiment='run', report=False)
    return train(cfg, datasets=(_tiny_data(), _tiny_data())).out_dir


@contextmanager
def live_server(checkpoint: Path, **settings) -> Iterator[tuple]:
    """A real uvicorn server on a free loopback port, in a thread of this process; stopped on exit."""
    import uvicorn

    cfg = ServeConfig(checkpoint=str(checkpoint), port=0, **{'latency_ms': 1000.0, **settings}).check()
    state = build_state(cfg)
    sock = bind_socket('127.0.0.1', 0)
    server = uvicorn.Server(uvicorn_config(create_app(state), cfg))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, 'server did not start'
    try:
        yield f'http://127.0.0.1:{sock.getsockname()[1]}', state, server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png(array: np.ndarray, mode: str = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format='PNG')
    return buf.getvalue()


def images(n: int, seed: int = 0) -> List[bytes]:
    rng = np.random.default_rng(seed)
    out = [png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n - 1)]
    return out + [png(rng.integers(0, 256, (28, 28), dtype=np.uint8))]  # another size and mode: converted


def metric(text: str, name: str) -> float:
    m = re.search(rf'^{re.escape(name)} (\S+)$', text, re.M)
    assert m, f'{name} not in /metrics'
    return float(m.group(1))


# ------------------------------------------------------------------------------------------ predictions
def test_predict_gives_the_class_eval_computes_at_that_k(run_folder):
    model, _ = load_for_eval(resolve_checkpoint(run_folder))
    transform = build_transform(resolve_data_config({}, model=model), is_training=False)
    files = images(5)
    with live_server(run_folder, policy='fixed:2') as (url, state, _):
        with httpx.Client(base_url=url) as client:
            for k in (2, 4):
                for data in files:
                    x = transform(Image.open(io.BytesIO(data)))[None]
                    with torch.no_grad():
                        probs = torch.softmax(model(x, k=k), -1)[0]
                    r = client.post('/predict', content=data, params={} if k == 2 else {'k': k})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert body['k'] == k and body['class'] == int(probs.argmax())
                    assert [p['class'] for p in body['top5']] == probs.topk(5).indices.tolist()
                    assert body['top5'][0]['probability'] == pytest.approx(float(probs.max()), abs=1e-5)
                    assert body['latency_ms'] > 0
            # the same images as one multipart batch and as a JSON batch: the same classes, in order
            expected = [client.post('/predict', content=d).json()['class'] for d in files]
            r = client.post('/predict', files=[('file', (f'{i}.png', d, 'image/png')) for i, d in enumerate(files)])
            assert [p['class'] for p in r.json()['predictions']] == expected
            r = client.post('/predict', json={'images': [base64.b64encode(d).decode() for d in files]})
            assert [p['class'] for p in r.json()['predictions']] == expected
            info = client.get('/info').json()
    assert info['k_choices'] == [2, 4] and info['policy'] == 'fixed:2' and info['torchscript'] is True
    assert [row['k'] for row in info['per_k']] == [2, 4]
    assert all('top1' in row and row['gmacs'] > 0 for row in info['per_k'])  # accuracy from results.csv, cost
    assert info['preprocessing']['input_size'] == [3, 16, 16]


@pytest.mark.parametrize('channels, size, crop_pct, direct', [(1, 16, 0.875, True), (3, 16, 1.0, True),
                                                          (3, 48, 0.875, False)])
def test_images_at_the_model_size_skip_resampling_only_where_the_transform_leaves_them_unchanged(
        channels, size, crop_pct, direct):
    config = dict(input_size=(channels, size, size), interpolation='bilinear', crop_pct=crop_pct, crop_mode='center',
                  mean=(0.3,) * channels, std=(0.2,) * channels)
    decoder = ImageDecoder(config)
    # images of <= 32 px are not resize-cropped; at 48 px crop 0.875 resizes to 54 and crops: not the identity
    assert decoder.direct is direct
    mode = 'L' if channels == 1 else 'RGB'
    rng = np.random.default_rng(3)
    for width, height in ((size, size), (size + 4, size + 8)):  # the model's size, and one the transform resizes
        shape = (height, width) + (() if channels == 1 else (3,))
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        buffer = io.BytesIO()
        img.save(buffer, format='PNG')
        assert torch.equal(decoder(buffer.getvalue()), decoder.transform(img))


def test_metrics_count_what_was_sent(run_folder):
    files = images(4, seed=1)
    with live_server(run_folder, policy='fixed:4', max_wait_ms=1.0) as (url, state, _):
        with httpx.Client(base_url=url) as client:
            for d in files:
                assert client.post('/predict', content=d).status_code == 200
            assert client.post('/predict', files=[('file', ('a.png', d, 'image/png')) for d in files[:3]]
                               ).status_code == 200
            assert client.post('/predict', content=b'not an image').status_code == 422
            text = client.get('/metrics').text
    assert metric(text, 'hydravit_requests_total{endpoint="/predict",status="200"}') == 5
    assert metric(text, 'hydravit_requests_total{endpoint="/predict",status="422"}') == 1
    assert metric(text, 'hydravit_images_total') == 7
    assert metric(text, 'hydravit_images_by_k_total{k="4"}') == 7
    assert metric(text, 'hydravit_images_by_k_total{k="2"}') == 0
    assert metric(text, 'hydravit_k_count') == 7 and metric(text, 'hydravit_k_bucket{le="2"}') == 0
    assert metric(text, 'hydravit_batch_size_sum') == 7
    assert metric(text, 'hydravit_request_latency_seconds_count') == 7
    assert 0 < metric(text, 'hydravit_request_latency_seconds{quantile="0.5"}') <= metric(
        text, 'hydravit_request_latency_seconds{quantile="0.99"}')
    assert metric(text, 'hydravit_queue_length') == 0 and metric(text, 'hydravit_current_k') == 4


# ------------------------------------------------------------------------------------------ bad input
def _bad_requests(good: bytes) -> List[tuple]:
    i16 = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint16)).save(i16, format='PNG')  # mode I;16
    return [
        ('non-image bytes', dict(content=b'hello, not an image'), 422, 'not an image file'),
        ('truncated image', dict(content=good[:len(good) // 2]), 422, 'broken or truncated'),
        ('empty body', dict(content=b''), 422, 'empty'),
        ('oversize upload', dict(content=b'\0' * 5000), 413, 'larger than the 4000 bytes allowed'),
        ('16-bit image', dict(content=i16.getvalue()), 422, "mode 'I;16'"),
        ('empty batch', dict(json={'images': []}), 422, 'empty batch'),
        ('bad base64', dict(json={'images': ['%%%']}), 422, 'not valid base64'),
        ('not json', dict(content=b'{', headers={'content-type': 'application/json'}), 400, 'not valid JSON'),
        ('form without file', dict(data={'x': '1'}, files=[('other', ('a.png', good, 'image/png'))]), 422,
         'no field "file"'),
        ('too many images', dict(files=[('file', ('a.png', good, 'image/png'))] * 3), 413, 'more than the 2'),
        ('k outside the trained set', dict(content=good, params={'k': 3}), 422, r'allowed values are \[2, 4\]'),
        ('k not a number', dict(content=good, params={'k': 'big'}), 422, 'k=big is not a trained subnetwork'),
    ]


def test_bad_inputs_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(run_folder):
    good = images(1)[0]
    with live_server(run_folder, policy='fixed:4', max_body_bytes=4000, max_images_per_request=2) as (url, _, __):
        with httpx.Client(base_url=url) as client:
            for what, request, status, message in _bad_requests(good):
                r = client.post('/predict', **request)
                assert r.status_code == status, (what, r.text)
                assert re.search(message, r.json()['error']), (what, r.json())
                assert client.get('/healthz').json()['status'] == 'ok'
            r = client.post('/predict', content=good)
            assert r.status_code == 200 and r.json()['k'] == 4


def test_strict_input_refuses_another_size_or_mode_which_the_default_converts(run_folder):
    rng = np.random.default_rng(0)
    grey = png(rng.integers(0, 256, (16, 16), dtype=np.uint8))
    big = png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    exact = png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    with live_server(run_folder, policy='fixed:2', strict_input=True) as (url, _, __):
        with httpx.Client(base_url=url) as client:
            for data, problem in ((grey, '16x16 L'), (big, '24x20 RGB')):
                r = client.post('/predict', content=data)
                assert r.status_code == 422 and problem in r.json()['error'] and '16x16 RGB' in r.json()['error']
            assert client.post('/predict', content=exact).status_code == 200
    with live_server(run_folder, policy='fixed:2') as (url, _, __):
        assert all(httpx.post(url + '/predict', content=d).status_code == 200 for d in (grey, big))


def test_overload_is_a_503_not_a_crash(run_folder):
    good = images(1)[0]
    with live_server(run_folder, policy='fixed:2', max_queue=1, max_wait_ms=150.0) as (url, _, __):
        with httpx.Client(base_url=url) as client:
            r = client.post('/predict', files=[('file', ('a.png', good, 'image/png'))] * 2)
            assert r.status_code == 503 and 'overloaded' in r.json()['error']
            assert client.post('/predict', content=good).status_code == 200


# ------------------------------------------------------------------------------------------ policies
def test_policy_spellings_are_checked_with_the_choices_named(run_folder, capsys):
    model, _ = load_for_eval(resolve_checkpoint(run_folder))
    kw = dict(target_ms=50.0, max_batch=4, max_wait_ms=1.0)
    with pytest.raises(ValueError, match='unknown --policy .* choose one of adaptive, fixed:K, cascade:POLICY.json'):
        parse_policy('fastest')
    with pytest.raises(ValueError, match='--policy fixed needs an argument: fixed:K'):
        parse_policy('fixed')
    with pytest.raises(ValueError, match=r'k=3 is not a valid subnetwork: allowed values are \[2, 4\]'):
        create_policy('fixed:3', model, **kw)
    with pytest.raises(FileNotFoundError, match='cascade:policy.json: no such policy file'):
        create_policy('cascade:policy.json', model, **kw)
    serve = ['serve', '--checkpoint', str(run_folder), '--port', '0']
    assert main([*serve, '--latency-ms', '50', '--policy', 'fixed:3']) == 2
    assert main([*serve, '--latency-ms', '5', '--max-wait-ms', '10']) == 2
    assert main([*serve, '--latency-ms', '50', '--policy', 'cascade:p.json']) == 2
    err = capsys.readouterr().err
    assert 'allowed values are [2, 4]' in err and 'must be below --latency-ms 5' in err and 'no such policy' in err


def test_cascade_policy_answers_each_image_at_its_exit_stage(run_folder, tmp_path):
    from hydravit.cascade import CascadePolicy, save_policy

    model, _ = load_for_eval(resolve_checkpoint(run_folder))
    transform = build_transform(resolve_data_config({}, model=model), is_training=False)
    files = images(8, seed=5)
    x = torch.stack([transform(Image.open(io.BytesIO(d))) for d in files])
    with torch.no_grad():
        confidence = torch.softmax(model(x, k=2), -1).max(-1).values
    low, high = confidence.sort().values[3:5].tolist()
    threshold = (low + high) / 2  # half the images exit at k = 2, none close to the threshold
    policy = save_policy(CascadePolicy(ks=(2, 4), thresholds=(threshold,)), tmp_path / 'p.cascade.json')
    with live_server(run_folder, policy=f'cascade:{policy}') as (url, _, __):
        answers = [httpx.post(url + '/predict', content=d).json() for d in files]
    exits = [a['k'] for a in answers]
    assert exits == [2 if c >= threshold else 4 for c in confidence.tolist()] and set(exits) == {2, 4}
    with torch.no_grad():
        for a, xi in zip(answers, x, strict=True):
            assert a['class'] == int(model(xi[None], k=a['k']).argmax())


def test_adaptive_policy_drops_k_at_the_first_backlogged_batch_and_climbs_only_once_drained(run_folder):
    """Simulated time: a forward at k costs k ms whatever the batch size; the target is 60 ms (the serving
    policy moves down above 0.75 x 60 = 45 ms, up to what fits in 0.6 x 60 = 36 ms), and an image waits for
    the batch in progress, then for its own."""
    model, _ = load_for_eval(resolve_checkpoint(run_folder))
    now = [0.0]
    policy = AdaptivePolicy(model, None, target_ms=60.0, max_batch=8, max_wait_ms=10.0,
                            base_latency_ms={2: 2.0, 4: 4.0}, clock=lambda: now[0])
    real_forward = model.forward

    def costed(x, k):
        now[0] += k / 1e3
        return real_forward(x, k=k)

    model.forward = costed  # type: ignore[method-assign]
    x = torch.randn(8, 3, 16, 16)

    def serve(backlog: Backlog, times: int) -> List[int]:
        return [policy.run(x, backlog).ks[0] for _ in range(times)]

    quiet = serve(Backlog(0), 5)                        # 2 batches x 4 ms = 8 ms
    flooded = serve(Backlog(8 * 12), 3)                 # 13 batches x 4 ms = 52 ms > 45: k = 2 at once
    draining = serve(Backlog(8 * 5), 6) + serve(Backlog(1), 2)  # 6 x 4 ms would fit, but images still wait
    old_head = serve(Backlog(0, waited_ms=44.0), 2)     # its oldest image waited 44 ms: 44 + 4 > 45
    drained = serve(Backlog(0), 4)                      # the third agreeing batch climbs
    assert quiet == [4] * 5 and flooded == [2] * 3 and draining == [2] * 8
    assert old_head == [2, 2] and drained == [2, 2, 4, 4]
    # a cycle that costs 4 ms besides the forward: 7 x (4 + 4) ms = 56 ms > 45 with 6 batches queued
    assert serve(Backlog(8 * 6, overhead_ms=4.0), 1) == [2]
    # nothing queued, but images arrive faster than full batches of k = 4 answer them at 80 % utilisation
    # (0.8 x 8 images / 4 ms = 1600 images/s): k = 2 before any queue builds
    assert serve(Backlog(0), 4)[-1] == 4
    assert serve(Backlog(0, arrival_per_s=2000.0), 2) == [2, 2]


def test_arrival_rate_sees_a_step_within_the_short_window_and_a_lull_through_the_long_one():
    rate = ArrivalRate((0.5, 2.0))
    for i in range(20):                        # 16 images every 0.1 s for 2 s: 160 images/s
        rate.add(i * 0.1, 16)
    assert rate.per_s(1.95) == pytest.approx(max(5 * 16 / 0.5, 20 * 16 / 2.0))  # 160 both ways
    for i in range(3):                         # a burst: 64 images at 2.0, 2.05, 2.1 s
        rate.add(2.0 + i * 0.05, 64)
    # the short window (1.62..2.12 s) holds 3 steady arrivals and the burst: 480 images/s, the long one 240
    assert rate.per_s(2.12) == pytest.approx((3 * 16 + 3 * 64) / 0.5)
    # a 1 s lull after that: the short window is empty, the long one (1.15..3.15 s) still holds 8 + 3 arrivals
    assert rate.per_s(3.15) == pytest.approx((8 * 16 + 3 * 64) / 2.0)
    assert rate.per_s(10.0) == 0.0
    with pytest.raises(ValueError, match='short window <= long window'):
        ArrivalRate((2.0, 0.5))


def test_torchscript_traces_give_the_eager_logits_at_every_k_and_batch_size(run_folder):
    model, _ = load_for_eval(resolve_checkpoint(run_folder))
    traced = TracedSubnetworks(model)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for k in model.k_choices:
            for n in (1, 5, 32):
                x = torch.randn(n, 3, 16, 16, generator=g)
                assert torch.equal(traced(x, k=k), model(x, k=k)), (k, n)
        again = pickle.loads(pickle.dumps(traced))  # a Ray replica or a spawned worker traces again
        x = torch.randn(4, 3, 16, 16, generator=g)
        assert torch.equal(again(x, k=4), model(x, k=4))
    with pytest.raises(ValueError, match=r'k=3 was not traced; traced k: \[2, 4\]'):
        traced(x, k=3)
    only = TracedSubnetworks(model, ks=[4])
    with pytest.raises(ValueError, match=r'traced k: \[4\]'):
        only(x, k=2)


def test_a_request_predicted_to_miss_the_target_is_refused_at_once_and_counted():
    """Batches at the cheapest choice take 10 ms: a request waits for the batch in progress and its own."""
    class Cheapest(ServingPolicy):
        def fastest_batch_ms(self):
            return 10.0

    now = [100.0]
    metrics = ServerMetrics([2], 8, 25.0)
    batcher = DynamicBatcher(Cheapest(None, None, target_ms=25.0, max_batch=8, max_wait_ms=1.0), metrics,
                             max_batch=8, max_wait_ms=1.0, target_ms=25.0, clock=lambda: now[0])
    batcher.refuse_if_late(64, arrival=now[0] - 0.020)         # idle: no wait of its own, 20 ms waited already
    with pytest.raises(InputError, match='predicted answer after 26 ms'):
        batcher.refuse_if_late(1, arrival=now[0] - 0.026)      # late before it reached the batcher
    batcher._running = True                                    # a batch in progress from here on
    batcher.refuse_if_late(8, arrival=now[0])                  # 2 batches x 10 ms = 20 ms <= 25
    with pytest.raises(InputError, match='predicted answer after 30 ms, beyond the 25 ms') as e:
        batcher.refuse_if_late(8, arrival=now[0] - 0.010)      # waited 10 ms already
    with pytest.raises(InputError, match='predicted answer after 30 ms'):
        batcher.refuse_if_late(9, arrival=now[0])              # 9 images fill 2 batches after the one running
    assert e.value.status == 503 and metrics.shed_images == 18
    assert 'hydravit_shed_images_total 18' in metrics.render()
    lenient = DynamicBatcher(Cheapest(None, None, target_ms=25.0, max_batch=8, max_wait_ms=1.0), metrics,
                             max_batch=8, max_wait_ms=1.0, target_ms=25.0, shed_late=False, clock=lambda: now[0])
    lenient._running = True
    lenient.refuse_if_late(64, arrival=now[0] - 1.0)           # shedding off: queued up to --max-queue instead


def test_x_request_start_moves_the_arrival_back_but_never_forward():
    from starlette.requests import Request

    def arrival(value: str) -> float:
        scope = {'type': 'http', 'method': 'POST', 'path': '/predict',
                 'headers': [(b'x-request-start', value.encode())]}
        return request_arrival(Request(scope), handler_start=1000.0)

    now = time.time()
    assert arrival(f't={now - 0.25:.6f}') == pytest.approx(1000.0 - 0.25, abs=0.05)   # seconds, as nginx writes it
    assert arrival(f'{(now - 0.5) * 1e3:.0f}') == pytest.approx(1000.0 - 0.5, abs=0.05)  # milliseconds
    assert arrival(f'{(now - 0.5) * 1e6:.0f}') == pytest.approx(1000.0 - 0.5, abs=0.05)  # microseconds
    assert arrival(f't={now + 60:.3f}') == 1000.0                                       # from the future: ignored
    assert arrival('t=soon') == 1000.0 and arrival('t=nan') == 1000.0
    assert arrival('t=1') == 1000.0 - 3600.0                                            # clamped to an hour


# ------------------------------------------------------------------------------------------ load test
def test_schedules_and_urls_are_bounded_and_checked():
    phases = parse_schedule('rps:50x20s,200x2.5s')
    assert [(p.rps, p.seconds, p.requests) for p in phases] == [(50, 20, 1000), (200, 2.5, 500)]
    for bad, problem in (('50x20s', 'expected'), ('rps:50x', 'RATExSECONDSs'), ('rps:0x5s', '> 0'),
                         ('rps:1000x3600s', 'bounded')):
        with pytest.raises(ValueError, match=problem):
            parse_schedule(bad)
    assert check_url('http://127.0.0.1:8000/') == 'http://127.0.0.1:8000'
    assert check_url('http://localhost:1') and check_url('http://[::1]:1')
    for url in ('http://10.0.0.1:8000', 'http://example.com', 'ftp://127.0.0.1'):
        with pytest.raises(ValueError, match='loopback|expected'):
            check_url(url)


def test_loadtest_sends_the_schedule_and_the_server_counts_it(run_folder):
    files = images(6, seed=2)
    phases = parse_schedule('rps:40x1s,80x0.5s')
    with live_server(run_folder, policy='fixed:4', max_batch=8, max_wait_ms=2.0, latency_ms=500.0,
                     shed_late=False) as (url, _, __):  # every request counted, however busy the machine
        classes = [httpx.post(url + '/predict', content=d).json()['class'] for d in files]
        right = [(d, c) for d, c in zip(files, classes, strict=True)]     # labels the server agrees with
        wrong = [(d, (c + 1) % 10) for d, c in right]                     # labels it never gives
        records = run_load(url, right, phases, seed=0)
        batched = run_load(url, wrong, phases[:1], seed=1, images_per_request=3)
        served = httpx.get(url + '/metrics').text
    rows = summarize_load(records, phases, target_ms=500.0)
    assert [r['sent'] for r in rows] == [40, 40, 80]
    assert rows[-1]['ok'] == 80 and rows[-1]['errors'] == 0 and rows[-1]['mean_k'] == 4
    assert rows[-1]['accuracy'] == 100.0
    assert summarize_load(batched, phases[:1], target_ms=500.0)[-1]['accuracy'] == 0.0
    assert metric(served, 'hydravit_requests_total{endpoint="/predict",status="200"}') == 6 + 80 + 40
    assert metric(served, 'hydravit_images_total') == 6 + 80 + 40 * 3
    assert 0 <= rows[-1]['within_target'] <= 1 and rows[-1]['p50_ms'] <= rows[-1]['p99_ms']


@needs_fmnist
def test_loadtest_command_reports_every_phase(run_folder, capsys, tmp_path):
    with live_server(run_folder, max_batch=8, max_wait_ms=2.0) as (url, _, __):
        assert main(['loadtest', '--url', url, '--schedule', 'rps:20x0.5s,40x0.5s', '--samples', '30',
                     '--results-file', str(tmp_path / 'load.csv')]) == 0
    out = capsys.readouterr().out
    assert '0: 20rps x 0.5s' in out and '1: 40rps x 0.5s' in out and 'accuracy' in out
    assert (tmp_path / 'load.csv').read_text().count('\n') == 4  # header, two phases, all
    assert main(['loadtest', '--url', 'http://192.168.1.1:8000', '--schedule', 'rps:1x1s']) == 2


# ------------------------------------------------------------------------------------------ the command itself
def _start(args: List[str]) -> tuple:
    env = {**os.environ, 'PYTHONPATH': SRC + os.pathsep + os.environ.get('PYTHONPATH', ''), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-m', 'hydravit', 'serve', '--port', '0', *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r'on (http://127\.0\.0\.1:\d+)', line)
        if m:
            url = m.group(1)
            while time.monotonic() < deadline:  # workers may still be loading
                try:
                    if httpx.get(url + '/healthz', timeout=5).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    time.sleep(0.2)
    proc.kill()
    raise AssertionError('server did not start:\n' + ''.join(lines))


@pytest.mark.slow
def test_sigterm_answers_every_accepted_request_before_exiting(run_folder):
    # a batch waits 5 s for more images: long enough for all eight to be queued when the signal comes
    proc, url = _start(['--checkpoint', str(run_folder), '--latency-ms', '20000', '--policy', 'fixed:2',
                        '--max-wait-ms', '5000', '--max-batch', '64'])
    files = images(8, seed=3)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + '/predict', content=d, timeout=30) for d in files]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # all eight accepted and waiting in the batcher's queue
                if metric(httpx.get(url + '/metrics').text, 'hydravit_queue_length') == 8:
                    break
                time.sleep(0.02)
            queued = metric(httpx.get(url + '/metrics').text, 'hydravit_queue_length')
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        status = proc.wait(30)
    finally:
        proc.kill()
    assert status in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
    assert queued == 8
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.json()['batch_size'] for a in answers} == {8}  # served together, after the signal
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + '/healthz', timeout=2)


def _children(pid: int) -> List[int]:
    path = Path(f'/proc/{pid}/task/{pid}/children')
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path('/proc/self/task').is_dir(), reason='counts worker processes through /proc (Linux)')
def test_workers_each_load_their_own_model_and_answer(run_folder):
    proc, url = _start(['--checkpoint', str(run_folder), '--latency-ms', '500', '--workers', '2'])
    try:
        pids: Dict[int, int] = {}
        for d in images(6, seed=4):
            with httpx.Client(base_url=url) as client:  # a new connection each time
                assert client.post('/predict', content=d).status_code == 200
                pid = int(metric(client.get('/metrics').text, 'hydravit_worker_pid'))
                pids[pid] = pids.get(pid, 0) + 1
        workers = [p for p in _children(proc.pid) if Path(f'/proc/{p}/cmdline').read_bytes().count(b'spawn')]
        assert len(workers) == 2 and set(pids) <= set(workers) and proc.pid not in pids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# ------------------------------------------------------------------------------------------ Ray Serve
def _free_port() -> int:
    sock = bind_socket('127.0.0.1', 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.slow
def test_the_ray_serve_deployment_answers_like_the_server(run_folder):
    serve = pytest.importorskip('ray.serve', reason='ray[serve] is not installed here (pip install hydravit[ray]): '
                                                    'the optional Ray Serve deployment (hydravit.serving.ray_app) '
                                                    'is untested without it')
    import ray

    from hydravit.serving.ray_app import deployment

    data = images(2, seed=5)
    with live_server(run_folder, policy='fixed:2') as (url, _, __):
        expected = [httpx.post(url + '/predict', content=d, timeout=30).json() for d in data]
    port = _free_port()
    # one local node on loopback: no dashboard, no usage report, the HTTP proxy on a free loopback port
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address='127.0.0.1', log_to_driver=False,
             configure_logging=False, runtime_env={'env_vars': {'PYTHONPATH': SRC, 'OMP_NUM_THREADS': '1'}})
    try:
        serve.start(http_options={'host': '127.0.0.1', 'port': port})
        serve.run(deployment(ServeConfig(checkpoint=str(run_folder), latency_ms=500.0, policy='fixed:2')),
                  route_prefix='/')
        with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=30, trust_env=False) as client:
            answers = [client.post('/predict', content=d) for d in data]
            info = client.get('/info').json()
    finally:
        serve.shutdown()
        ray.shutdown()
    assert [a.status_code for a in answers] == [200, 200]
    for got, want in zip((a.json() for a in answers), expected, strict=True):
        assert (got['class'], got['k']) == (want['class'], 2)
        assert [t['class'] for t in got['top5']] == [t['class'] for t in want['top5']]
        assert [t['probability'] for t in got['top5']] == pytest.approx([t['probability'] for t in want['top5']],
                                                                         abs=1e-5)
    assert info['policy'] == 'fixed:2' and info['k_choices'] == [2, 4]
