"""The universal models: config and k rules, sliced layers, HydraViT, separate ViTs, subnetworks and costs.

Importing this package registers the ``hydravit_*`` variants with timm.
"""
from .config import NESTINGS, HydraViTConfig, SubnetShape, nested_shape
from .costs import add_costs, cost_row, cost_table, subnet_cost
from .factory import UniversalModel, create_model, model_from_config
from .hydravit import HydraViT, KChoices
from .kchoices import check_k, check_k_choices, parse_ks
from .separate import SeparateViTs
from .subnet import extract_subnet, init_from_vit, subnet_state_dict, subnet_vit_kwargs

__all__ = ['NESTINGS', 'HydraViTConfig', 'SubnetShape', 'nested_shape', 'add_costs', 'cost_row', 'cost_table',
           'subnet_cost', 'UniversalModel', 'create_model', 'model_from_config', 'HydraViT', 'KChoices', 'check_k',
           'check_k_choices', 'parse_ks', 'SeparateViTs', 'extract_subnet', 'init_from_vit', 'subnet_state_dict',
           'subnet_vit_kwargs']
