"""HydraViT: one Vision Transformer, a working subnetwork for every number of heads k.

Subpackages, lowest layer first (each imports only from those before it): ``models`` (the universal model,
k rules, subnetworks, costs), ``storage`` (checkpoints, run folders, result tables), ``data``,
``evaluation`` (accuracy, speed, reports), ``training`` (trainer, samplers, nesting methods, comparison),
``deployment`` (export, budget selection, adaptive inference) and ``cli``.
"""
from .models import HydraViT, HydraViTConfig, SubnetShape

__version__ = '0.1.0'
__all__ = ['HydraViT', 'HydraViTConfig', 'SubnetShape', '__version__']
