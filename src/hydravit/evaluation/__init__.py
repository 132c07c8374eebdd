"""Measuring subnetworks: accuracy per k, speed/memory/switching per k, and the accuracy-cost report."""
from .benchmark import benchmark_subnets, measure_switching
from .evaluate import evaluate_dataset, evaluate_subnets, load_for_eval
from .report import plot_accuracy, write_report

__all__ = ['benchmark_subnets', 'measure_switching', 'evaluate_dataset', 'evaluate_subnets', 'load_for_eval',
           'plot_accuracy', 'write_report']
