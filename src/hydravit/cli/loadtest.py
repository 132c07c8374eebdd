"""``hydravit loadtest``: open-loop load on a local ``hydravit serve``, per-phase latency, errors, accuracy served."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.datasets import DATASETS
from ..serving import require_extra
from ..storage.results import RESULT_FORMATS, format_table, results_format, write_results

logger = logging.getLogger(__name__)

COLUMNS = ('phase', 'sent', 'ok', 'errors', 'throughput_rps', 'images_per_s', 'p50_ms', 'p95_ms', 'p99_ms',
           'within_target', 'accuracy', 'mean_k', 'max_send_lag_ms', 'error_kinds')


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser('loadtest', help='open-loop load test of a local hydravit serve (loopback only)',
                       description='Send labelled test images to POST /predict at a scheduled rate, whether or not '
                                   'earlier requests were answered, and report per phase: throughput, p50/p95/p99 '
                                   'latency, the fraction within the target, errors, mean k and accuracy served. '
                                   'Bounded: the schedule fixes the requests sent; it stops by itself.')
    p.add_argument('--url', default='http://127.0.0.1:8000', help='server (loopback only; default: %(default)s)')
    p.add_argument('--data', default='fashion-mnist', choices=DATASETS, help='labelled images to send')
    p.add_argument('--data-dir', help='data root (default: the built-in Fashion-MNIST files)')
    p.add_argument('--schedule', default='rps:50x20s,200x20s,50x20s',
                   help="phases RATExSECONDS, e.g. 'rps:50x20s,200x20s,50x20s' (default: %(default)s)")
    p.add_argument('--target-ms', type=float, help="latency target (default: the server's, from /info)")
    p.add_argument('--arrival', choices=('poisson', 'uniform'), default='poisson',
                   help='request spacing within a phase (default: %(default)s)')
    p.add_argument('--images-per-request', type=int, default=1,
                   help='images per request; > 1 sends multipart batches (default: %(default)s)')
    p.add_argument('--samples', type=int, default=2000, help='test images drawn from (default: %(default)s)')
    p.add_argument('--timeout', type=float, default=10.0, help='seconds per request (default: %(default)s)')
    p.add_argument('--max-inflight', type=int, default=512, help='requests in flight at most; more count as errors')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--results-file', help='write the per-phase table here (.csv or .json)')
    p.add_argument('--results-format', choices=RESULT_FORMATS, help='default: from --results-file suffix, else csv')
    return p


def run(args: argparse.Namespace) -> int:
    require_extra('httpx')
    from ..serving.loadtest import check_url, encode_images, parse_schedule, run_load, server_info, summarize_load

    phases = parse_schedule(args.schedule)
    url = check_url(args.url)
    if args.samples < 1:
        raise ValueError(f'--samples must be >= 1, got {args.samples}')
    target = args.target_ms if args.target_ms is not None else float(server_info(url)['latency_target_ms'])
    images = encode_images(args.data, args.data_dir, args.samples, args.seed)
    logger.info(f'{sum(p.requests for p in phases)} requests over {sum(p.seconds for p in phases):g} s to {url}, '
                f'target {target:g} ms')
    rows = summarize_load(run_load(url, images, phases, arrival=args.arrival, seed=args.seed,
                                   timeout_s=args.timeout, max_inflight=args.max_inflight,
                                   images_per_request=args.images_per_request), phases, target)
    logger.info(format_table(rows, list(COLUMNS)))
    if args.results_file:
        out = Path(args.results_file)
        logger.info(f'-> {write_results(rows, out.parent, out.stem, results_format(out, args.results_format))}')
    return 0
