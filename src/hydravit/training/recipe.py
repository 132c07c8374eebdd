"""Training recipes: YAML files of :class:`TrainConfig` settings (or timm train.py argument files), the named
built-in ones, and flags on top.

``fmnist`` (``configs/fmnist_cpu.yaml``) is the built-in CPU run's recipe, over the ``TrainConfig`` defaults.
Every other recipe goes on top of ``timm`` (``configs/timm_defaults.yaml``: timm train.py's defaults), so a
run on other data or another model never inherits the Fashion-MNIST settings. ``hydravit-paper`` is the
paper's ImageNet recipe.
"""
from __future__ import annotations

import os
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from .config import TrainConfig
from .methods import method_class
from .timm_args import official_model_name, translate_timm_args

__all__ = ['DEFAULT_CONFIG', 'NAMED_CONFIGS', 'BUILTIN_RECIPE', 'TIMM_DEFAULTS', 'load_train_config',
           'is_builtin_run']

NAMED_CONFIGS = {'fmnist': 'fmnist_cpu.yaml', 'timm': 'timm_defaults.yaml', 'hydravit-paper': 'hydravit_paper.yaml'}
BUILTIN_RECIPE, TIMM_DEFAULTS = 'fmnist', 'timm'
DEFAULT_CONFIG = NAMED_CONFIGS[BUILTIN_RECIPE]


def _read(source: str | os.PathLike) -> tuple[Dict[str, Any], str]:
    """(settings, display name) of a named recipe or a YAML file."""
    if isinstance(source, str) and source in NAMED_CONFIGS:
        text, name = resources.files('hydravit').joinpath('configs', NAMED_CONFIGS[source]).read_text(), source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f'--config: {path} does not exist (a YAML file, or one of the named recipes '
                                    f'{", ".join(NAMED_CONFIGS)})')
        text, name = path.read_text(), str(path)
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{name}: not valid YAML: {_yaml_problem(e)}') from None
    if not isinstance(recipe, dict):
        raise ValueError(f'{name}: a recipe is a YAML mapping of setting: value')
    return recipe, name


def is_builtin_run(settings: Dict[str, Any]) -> bool:
    """A run on the built-in data with the built-in model (or neither named): the built-in recipe applies."""
    builtin = TrainConfig()
    return settings.get('model') in (None, builtin.model) and settings.get('dataset') in (None, builtin.dataset)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, as 'line L, column C: problem' (1-based, as editors count)."""
    mark = getattr(error, 'problem_mark', None)
    problem = getattr(error, 'problem', None) or str(error)
    context = getattr(error, 'context', None)
    where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
    return f'{where}{problem}' + (f' ({context})' if context else '')


def _scaled_full_width_phase(recipe: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe's full-width phase, fitted to overrides that do not set it: the same share of other
    ``epochs`` (``--epochs 1`` keeps none), given to an overriding ``method`` as it takes one
    (:meth:`NestingMethod.full_width_phase`; explicit overrides still win)."""
    phase = int(recipe.get('full_width_epochs') or 0)
    if not phase or 'full_width_epochs' in overrides:
        return {}
    if 'epochs' in overrides:
        phase = phase * int(overrides['epochs']) // int(recipe.get('epochs') or 1)
    if 'method' in overrides:
        return method_class(overrides['method']).full_width_phase(phase)
    return {'full_width_epochs': phase}


def load_train_config(path: Optional[str | os.PathLike] = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe and ``overrides`` (setting names as keys).

    ``path``: None or ``'fmnist'`` for the built-in recipe, ``'timm'`` or ``'hydravit-paper'``, or a YAML file
    of settings (a run's ``args.yaml``; timm train.py argument files such as the official HydraViT
    ``args_hydravit.yaml`` are mapped, see :mod:`hydravit.training.timm_args`). A file or a named recipe
    other than ``fmnist`` is layered on timm train.py's defaults.
    """
    names = {f.name for f in fields(TrainConfig)}
    source = BUILTIN_RECIPE if path is None else path
    recipe, name = _read(source)
    recipe = translate_timm_args(recipe, names, name)
    if source not in (BUILTIN_RECIPE, TIMM_DEFAULTS):
        recipe = {**_read(TIMM_DEFAULTS)[0], **recipe}
    unknown = sorted((set(recipe) | set(overrides)) - names)
    if unknown:
        raise ValueError(f'unknown setting(s) {unknown}; valid settings: {", ".join(sorted(names))}')
    prescribed = method_class(overrides['method']).sampler if 'method' in overrides else None
    if prescribed and 'sampler' not in overrides:  # the method's update scheme wins over the recipe's sampler
        overrides = {**overrides, 'sampler': prescribed}
    settings = {**recipe, **_scaled_full_width_phase(recipe, overrides), **overrides}
    if isinstance(settings.get('model'), str):
        settings['model'] = official_model_name(settings['model'])
    cfg = TrainConfig(**settings)
    method_class(cfg.method).check(cfg)
    return cfg
