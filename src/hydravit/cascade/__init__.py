"""Early-exit cascades over the nested subnetworks: small k first, larger k only for the images still in doubt.

A :class:`CascadePolicy` (stages, thresholds, confidence score) is plain JSON next to its checkpoint;
:class:`CascadePredictor` runs one on batches with real gather/scatter; :mod:`.calibrate` fits one to a goal on a
split it is not reported on; :func:`cascade_study` fits, scores and times it next to every static k.
"""
from .calibrate import GOALS, CrossFit, Fit, Goal, create_goal, cross_fit, evaluate_policy, fit_policy, split_halves
from .collect import collect_logits, stack_images
from .measure import measure_speed
from .policy import NEVER, CascadePolicy, load_policy, policy_path, save_policy
from .predictor import CascadePredictor
from .runner import Cascade, CascadeOutput, Stage, model_stages, module_stages, simulate_cascade, stage_macs
from .scores import SCORES, ConfidenceScore, create_score, register_score
from .study import (
    cascade_study,
    compare_with_static,
    curve_rows,
    read_cascade_results,
    score_points,
    static_rows,
    sweep_policies,
    time_points,
)

__all__ = ['GOALS', 'CrossFit', 'Fit', 'Goal', 'create_goal', 'cross_fit', 'evaluate_policy', 'fit_policy',
           'split_halves', 'collect_logits', 'stack_images', 'measure_speed', 'NEVER', 'CascadePolicy', 'load_policy',
           'policy_path', 'save_policy', 'CascadePredictor', 'Cascade', 'CascadeOutput', 'Stage', 'model_stages',
           'module_stages', 'simulate_cascade', 'stage_macs', 'SCORES', 'ConfidenceScore', 'create_score',
           'register_score', 'cascade_study', 'compare_with_static', 'curve_rows', 'static_rows',
           'read_cascade_results', 'score_points', 'sweep_policies', 'time_points']
