"""Shipping and serving subnetworks: export per k, picking k for a budget, adaptive k under load."""
from .adaptive import AdaptivePredictor, LatencyController
from .export import export_subnets
from .selection import Budget, select_subnet

__all__ = ['AdaptivePredictor', 'LatencyController', 'export_subnets', 'Budget', 'select_subnet']
