"""Training recipes: a YAML file of :class:`TrainConfig` settings, the built-in one, and flags on top."""
from __future__ import annotations

import os
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import TrainConfig
from .methods import method_class

__all__ = ['DEFAULT_CONFIG', 'load_train_config']

DEFAULT_CONFIG = 'fmnist_cpu.yaml'


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, as 'line L, column C: problem' (1-based, as editors count)."""
    mark = getattr(error, 'problem_mark', None)
    problem = getattr(error, 'problem', None) or str(error)
    context = getattr(error, 'context', None)
    where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
    return f'{where}{problem}' + (f' ({context})' if context else '')


def load_train_config(path: Optional[str | os.PathLike] = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML recipe (default: the built-in ``configs/fmnist_cpu.yaml``)."""
    if path is None:
        text = resources.files('hydravit').joinpath('configs', DEFAULT_CONFIG).read_text()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'--config: {path} does not exist')
        text = path.read_text()
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{path or DEFAULT_CONFIG}: not valid YAML: {_yaml_problem(e)}') from None
    if not isinstance(recipe, dict):
        raise ValueError(f'{path or DEFAULT_CONFIG}: a recipe is a YAML mapping of setting: value')
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted((set(recipe) | set(overrides)) - names)
    if unknown:
        raise ValueError(f'unknown setting(s) {unknown}; valid settings: {", ".join(sorted(names))}')
    prescribed = method_class(overrides['method']).sampler if 'method' in overrides else None
    if prescribed and 'sampler' not in overrides:  # the method's update scheme wins over the recipe's sampler
        overrides = {**overrides, 'sampler': prescribed}
    cfg = TrainConfig(**{**recipe, **overrides})
    method_class(cfg.method).check(cfg)
    return cfg
