"""The same HTTP app as a Ray Serve deployment, for more than one machine (optional: ``pip install "ray[serve]"``).

Each replica unpickles its own copy of the app, so each has its own model, batcher and latency
controller, exactly like a ``--workers`` process; Ray routes requests between replicas and machines.

    from ray import serve
    from hydravit.serving.ray_app import deployment
    from hydravit.serving.server import ServeConfig

    serve.run(deployment(ServeConfig(checkpoint='runs/x', latency_ms=50), num_replicas=4), route_prefix='/')
"""
from __future__ import annotations

from typing import Any

from .server import ServeConfig, build_app

__all__ = ['deployment']


def deployment(cfg: ServeConfig, num_replicas: int = 1, **options: Any) -> Any:
    """A bound Ray Serve application serving ``cfg``'s checkpoint with ``num_replicas`` replicas."""
    try:
        from ray import serve
    except ImportError:
        raise ValueError('the Ray Serve deployment needs ray: pip install "ray[serve]"') from None
    app = build_app(cfg.check())

    @serve.deployment(num_replicas=num_replicas, **options)
    @serve.ingress(app)
    class HydraViTServer:
        """One replica: the FastAPI app's lifespan starts its batcher; its routes are the app's."""

    bound: Any = HydraViTServer  # a Ray deployment after the decorators
    return bound.bind()
