"""Serving over HTTP: a FastAPI app with dynamic batching and a per-batch k policy, and a load generator.

The web stack is an optional extra (``pip install hydravit[serve]``): this package's ``__init__`` imports
only what needs none of it; ``hydravit.serving.server`` / ``.app`` need FastAPI and uvicorn, and
``hydravit.serving.loadtest`` needs httpx.
"""
from .policies import SERVING_POLICIES, ServingPolicy, create_policy, parse_policy, register_serving_policy

__all__ = ['SERVING_POLICIES', 'ServingPolicy', 'create_policy', 'parse_policy', 'register_serving_policy',
           'require_extra']


def require_extra(*modules: str) -> None:
    """A clear error when the ``serve`` extra is not installed (instead of an ImportError traceback)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f'serving needs {", ".join(missing)}: install the extra with `pip install hydravit[serve]`')
