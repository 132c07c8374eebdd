"""HydraViT: one Vision Transformer, a working subnetwork for every number of heads k."""
from .model import HydraViT, HydraViTConfig, SubnetShape

__version__ = '0.1.0'
__all__ = ['HydraViT', 'HydraViTConfig', 'SubnetShape', '__version__']
