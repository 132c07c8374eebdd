"""Build a server from a checkpoint and run it with uvicorn (one process, or ``workers`` processes).

Each worker process builds its own model, policy and controller from the same :class:`ServeConfig`
(handed to spawned workers as JSON in an environment variable), so workers share nothing but the socket.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, cast

from ..deployment.torchscript import TracedSubnetworks
from ..evaluation.evaluate import load_for_eval
from ..storage.run_folder import read_accuracy, resolve_checkpoint, training_metadata
from .addresses import is_loopback
from .app import ServerState, create_app
from .inputs import ImageDecoder
from .policies import create_policy, parse_policy

logger = logging.getLogger(__name__)

__all__ = ['ServeConfig', 'build_state', 'build_app', 'app_from_env', 'serve', 'bind_socket', 'CONFIG_ENV']

CONFIG_ENV = 'HYDRAVIT_SERVE_CONFIG'


@dataclass
class ServeConfig:
    checkpoint: str
    latency_ms: float
    policy: str = 'adaptive'
    host: str = '127.0.0.1'
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_body_bytes: int = 8 * 1024 * 1024
    max_images_per_request: int = 64
    shed_late: bool = True            # 503 at once for a request predicted to miss the target
    strict_input: bool = False
    model: Optional[str] = None       # registered model whose preprocessing applies (old checkpoints)
    results: Optional[str] = None     # per-k accuracy file (default: the one next to the checkpoint)
    workers: int = 1
    use_ema: bool = False
    torchscript: bool = True          # forwards from TorchScript traces: the GIL once per batch, not per operator

    def check(self) -> ServeConfig:
        if not self.latency_ms > 0:
            raise ValueError(f'--latency-ms must be > 0, got {self.latency_ms}')
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_queue < 1:
            raise ValueError('--max-batch and --max-queue must be >= 1 and --max-wait-ms >= 0')
        if self.max_wait_ms >= self.latency_ms:
            raise ValueError(f'--max-wait-ms {self.max_wait_ms:g} must be below --latency-ms {self.latency_ms:g}')
        if self.max_body_bytes < 1 or self.max_images_per_request < 1:
            raise ValueError('--max-body-bytes and --max-images-per-request must be >= 1')
        if self.workers < 1:
            raise ValueError(f'--workers must be >= 1, got {self.workers}')
        if not 0 <= self.port <= 65535:
            raise ValueError(f'--port must be in 0..65535, got {self.port}')
        parse_policy(self.policy)
        return self


def build_state(cfg: ServeConfig) -> ServerState:
    """Model (with the checkpoint's preprocessing), policy, decoder and the /info contents of one process."""
    cfg.check()
    path = resolve_checkpoint(cfg.checkpoint, cfg.use_ema)
    model, _ = load_for_eval(path, None, cfg.model)
    model.eval()
    data_config: Dict[str, Any] = dict(cast(Dict[str, Any], model.pretrained_cfg))  # set by load_for_eval
    forward = TracedSubnetworks(model) if cfg.torchscript else None
    policy = create_policy(cfg.policy, model, target_ms=cfg.latency_ms, max_batch=cfg.max_batch,
                           max_wait_ms=cfg.max_wait_ms, forward=forward)
    trained = training_metadata(path)
    return ServerState(model=model, policy=policy, decoder=ImageDecoder(data_config, strict=cfg.strict_input),
                       target_ms=cfg.latency_ms, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                       max_queue=cfg.max_queue, max_body_bytes=cfg.max_body_bytes,
                       max_images_per_request=cfg.max_images_per_request, shed_late=cfg.shed_late,
                       class_names=trained['class_names'],
                       accuracy=read_accuracy(path, cfg.results), model_name=trained['model'] or path.parent.name,
                       checkpoint=str(path))


def build_app(cfg: ServeConfig):
    return create_app(build_state(cfg))


def app_from_env():
    """uvicorn factory for worker processes: the config comes from ``HYDRAVIT_SERVE_CONFIG``."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f'{CONFIG_ENV} is not set: start workers through `hydravit serve --workers N`')
    return build_app(ServeConfig(**json.loads(raw)))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip('[]'), port))
    except OSError as e:
        sock.close()
        raise ValueError(f'cannot listen on {host}:{port}: {e.strerror or e}') from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_settings(cfg: ServeConfig) -> dict:
    # no graceful-shutdown timeout: on SIGTERM every accepted request is answered before the process exits
    return dict(workers=cfg.workers, log_level='warning', access_log=False, timeout_graceful_shutdown=None,
                lifespan='on')


def uvicorn_config(app: Any, cfg: ServeConfig):
    import uvicorn

    return uvicorn.Config(app, host=cfg.host, port=cfg.port, **_uvicorn_settings(cfg))


def serve(cfg: ServeConfig) -> int:
    """Run until SIGINT/SIGTERM; then stop accepting, answer every accepted request, and return 0."""
    import uvicorn

    cfg.check()
    if not is_loopback(cfg.host):
        logger.warning('listening on %s: reachable from other machines (the default is 127.0.0.1)', cfg.host)
    state = build_state(cfg)  # bad settings and load errors surface here, once, before the first request
    sock = bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    url = f'http://{cfg.host if ":" not in cfg.host else f"[{cfg.host}]"}:{port}'
    if cfg.workers == 1:
        server = uvicorn.Server(uvicorn_config(create_app(state), cfg))
        logger.info('serving %s on %s (policy %s, latency target %g ms); Ctrl-C stops', state.model_name, url,
                    cfg.policy, cfg.latency_ms)
        server.run(sockets=[sock])
        return 0
    del state
    os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
    logger.info('serving on %s with %d workers (policy %s, latency target %g ms); Ctrl-C stops', url, cfg.workers,
                cfg.policy, cfg.latency_ms)
    uvicorn.run('hydravit.serving.server:app_from_env', factory=True, fd=sock.fileno(), **_uvicorn_settings(cfg))
    return 0
