"""``hydravit serve``: one checkpoint behind HTTP, dynamic batching, k chosen per batch to hold a latency target."""
from __future__ import annotations

import argparse
import sys

from ..deployment.adaptive import reexec_with_passive_omp
from ..serving import SERVING_POLICIES, require_extra


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    policies = ', '.join(f'{n}:{c.arg_help}' if c.needs_arg else n for n, c in SERVING_POLICIES.items())
    p = sub.add_parser('serve', help='HTTP server: dynamic batching, adaptive k under a latency target',
                       description='Serve a checkpoint over HTTP (FastAPI + uvicorn; pip install hydravit[serve]). '
                                   'POST /predict (raw image body, multipart field "file", or JSON base64 batch; '
                                   '?k=K pins a k), GET /healthz, /metrics (Prometheus), /info. SIGINT/SIGTERM '
                                   'stop accepting and answer every accepted request first.')
    p.add_argument('--checkpoint', required=True, help='a .safetensors checkpoint or a run folder (model_best, last)')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default: %(default)s, this machine only)')
    p.add_argument('--port', type=int, default=8000, help='port (default: %(default)s; 0: any free port)')
    p.add_argument('--latency-ms', type=float, required=True, help='latency target per request, arrival to answer')
    p.add_argument('--policy', default='adaptive', help=f'which k answers: {policies} (default: %(default)s)')
    p.add_argument('--max-batch', type=int, default=32, help='images per forward pass at most (default: %(default)s)')
    p.add_argument('--max-wait-ms', type=float, default=5.0,
                   help='how long a batch waits for more images after its first (default: %(default)s)')
    p.add_argument('--max-queue', type=int, default=4096, help='queued images before 503 (default: %(default)s)')
    p.add_argument('--no-shed', dest='shed_late', action='store_false',
                   help='queue every request (up to --max-queue) instead of answering 503 at once to one predicted '
                        'to miss --latency-ms even at the cheapest batch')
    p.add_argument('--max-body-bytes', type=int, default=8 * 1024 * 1024,
                   help='largest request body accepted, 413 above (default: %(default)s)')
    p.add_argument('--max-images-per-request', type=int, default=64, help='largest batch in one request')
    p.add_argument('--strict-input', action='store_true',
                   help="refuse images whose size or mode differ from the model's input instead of converting them")
    p.add_argument('--workers', type=int, default=1, help='uvicorn worker processes, each with its own model')
    p.add_argument('--model', help='registered model whose preprocessing training used (old checkpoints only)')
    p.add_argument('--results', help='per-k accuracy file for /info (default: results.csv next to the checkpoint)')
    p.add_argument('--use-ema', action='store_true', help='serve the *_ema.safetensors next to the checkpoint')
    p.add_argument('--torchscript', action=argparse.BooleanOptionalAction, default=True,
                   help='run forwards from a TorchScript trace per k, checked at start-up to give the same logits: '
                        'the inference thread then takes the GIL once per batch, not once per operator, and the '
                        'event loop cannot starve it under load (default: on; the cascade policy runs eagerly)')
    p.add_argument('--omp-active', action='store_true',
                   help="keep OpenMP's spin-waiting (default: restart with OMP_WAIT_POLICY=PASSIVE, see adaptive.py)")
    return p


def config_from_args(args: argparse.Namespace):
    from ..serving.server import ServeConfig

    return ServeConfig(checkpoint=args.checkpoint, latency_ms=args.latency_ms, policy=args.policy, host=args.host,
                       port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                       max_images_per_request=args.max_images_per_request, strict_input=args.strict_input,
                       shed_late=args.shed_late,
                       model=args.model, results=args.results, workers=args.workers, use_ema=args.use_ema,
                       torchscript=args.torchscript).check()


def run(args: argparse.Namespace) -> int:
    require_extra('fastapi', 'uvicorn', 'multipart')
    cfg = config_from_args(args)
    if not args.omp_active and sys.argv[1:2] == ['serve']:  # launched as a command, not main(argv)
        reexec_with_passive_omp(['-c', 'import sys; from hydravit.cli import main; sys.exit(main())', *sys.argv[1:]])
    from ..serving.server import serve

    return serve(cfg)
