"""Training universal models: settings and recipes, data order, samplers, nesting methods, the trainer, comparison."""
from .config import TrainConfig
from .methods import METHODS, NestingMethod, create_method, method_class, register_method
from .recipe import load_train_config
from .samplers import SAMPLERS, create_sampler
from .trainer import Trainer, TrainResult, train

__all__ = ['TrainConfig', 'METHODS', 'NestingMethod', 'create_method', 'method_class', 'register_method',
           'load_train_config', 'SAMPLERS', 'create_sampler', 'Trainer', 'TrainResult', 'train']
