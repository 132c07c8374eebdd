"""One cascade study: fit a policy, score it and its threshold sweep on the reported split, and time it next to
every static k in the same run. The command ``hydravit cascade`` and ``benchmarks/bench_cascade.py`` are thin
layers over :func:`cascade_study`; its dict is the results file (keys ``policy``, ``points``, ``static``, ...).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..models.factory import UniversalModel
from .calibrate import Goal, cross_fit, evaluate_policy, fit_policy, split_halves
from .measure import measure_speed
from .policy import CascadePolicy
from .runner import Cascade, at_k, stage_macs

__all__ = ['cascade_study', 'compare_with_static', 'curve_rows', 'static_rows', 'read_cascade_results',
           'sweep_policies', 'score_points', 'time_points']

logger = logging.getLogger(__name__)
Images = Callable[[torch.Tensor], torch.Tensor]  # indices into the reported split -> their images


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """Linear interpolation of ``ys`` at ``x`` along increasing ``xs``; None outside their range."""
    pairs = sorted(zip(xs, ys, strict=True))
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if pairs and x == pairs[0][0]:
        return pairs[0][1]
    return None


def compare_with_static(point: Mapping[str, Any], static: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The fitted cascade against the largest static k, the static k of equal GMACs and at equal throughput."""
    largest = max(static, key=lambda r: r['k'])
    out: Dict[str, Any] = {
        'largest_k': largest['k'],
        'top1_minus_largest': point['top1'] - largest['top1'],
        'gmacs_fraction_of_largest': point['gmacs'] / largest['gmacs'],
    }
    at_least = [r for r in static if r['gmacs'] >= point['gmacs']]
    if at_least:
        equal = min(at_least, key=lambda r: r['gmacs'])
        out.update(equal_gmacs_k=equal['k'], equal_gmacs_k_top1=equal['top1'], equal_gmacs_k_gmacs=equal['gmacs'])
    out['static_top1_interpolated_at_gmacs'] = _interpolate([r['gmacs'] for r in static],
                                                            [r['top1'] for r in static], point['gmacs'])
    if point.get('img_per_s') is not None and all(r.get('img_per_s') for r in static):
        out['throughput_ratio_to_largest'] = point['img_per_s'] / largest['img_per_s']
        if equal_k := out.get('equal_gmacs_k'):
            equal_rate = next(r['img_per_s'] for r in static if r['k'] == equal_k)
            out['throughput_ratio_to_equal_gmacs_k'] = point['img_per_s'] / equal_rate
        faster = [r for r in static if r['img_per_s'] >= point['img_per_s']]
        out['static_ks_at_least_as_fast'] = [r['k'] for r in faster]
        out['more_accurate_than_every_static_k_at_least_as_fast'] = all(point['top1'] > r['top1'] for r in faster)
        out['static_top1_interpolated_at_throughput'] = _interpolate([r['img_per_s'] for r in static],
                                                                     [r['top1'] for r in static], point['img_per_s'])
    if point.get('latency_ms') is not None and largest.get('latency_ms'):
        out['latency_ratio_to_largest'] = point['latency_ms'] / largest['latency_ms']
    return out


def _take(stage_logits: Mapping[int, torch.Tensor], index: torch.Tensor) -> Dict[int, torch.Tensor]:
    return {k: v.index_select(0, index) for k, v in stage_logits.items()}


def sweep_policies(policy: CascadePolicy) -> List[CascadePolicy]:
    """The policy itself, then the threshold settings of its stored sweep (``info['sweep']``) other than its own."""
    sweep = [policy]
    for thresholds in policy.info.get('sweep') or []:
        if tuple(float(t) for t in thresholds) != policy.thresholds:
            sweep.append(CascadePolicy(policy.ks, tuple(thresholds), policy.score))
    return sweep


def score_points(stage_logits: Mapping[int, torch.Tensor], labels: torch.Tensor, policies: Sequence[CascadePolicy],
                 macs: Mapping[int, int]) -> List[Dict[str, Any]]:
    """One results point per policy (the first is marked ``fitted``): top-1, GMACs and exit fractions."""
    points = []
    for i, p in enumerate(policies):
        scored = evaluate_policy(stage_logits, labels, p, macs)
        points.append(dict(fitted=i == 0, ks=list(p.ks), thresholds=list(p.thresholds), top1=scored['top1'],
                           gmacs=scored['gmacs'],
                           exit_fractions={str(k): v for k, v in scored['exit_fractions'].items()}))
    return points


def time_points(model: UniversalModel, policies: Sequence[CascadePolicy], points: List[Dict[str, Any]],
                images: torch.Tensor, *, static: Sequence[Dict[str, Any]] = (), batch_size: int = 256,
                rounds: int = 3, latency_images: int = 64) -> None:
    """Add measured ``img_per_s`` and ``latency_ms`` to ``points`` (one per policy) and ``static`` rows, all
    timed in the same interleaved rounds."""
    contenders: Dict[str, Callable[[torch.Tensor], Any]] = {
        f'k={r["k"]}': at_k(model, r['k']) for r in static}
    for i, p in enumerate(policies):
        contenders[f'cascade {i}'] = Cascade.from_model(model, p)
    logger.info('timing %d static k and %d cascade points in %d interleaved rounds (batch %d, %d images; '
                'batch 1, %d images)', len(static), len(policies), rounds, batch_size, images.shape[0],
                min(latency_images, images.shape[0]))
    speed = measure_speed(contenders, images, batch_size=batch_size, rounds=rounds, latency_images=latency_images)
    for row in static:
        row.update(speed[f'k={row["k"]}'])
    for i, point in enumerate(points):
        point.update(speed[f'cascade {i}'])


def cascade_study(
        model: UniversalModel,
        stage_logits: Mapping[int, torch.Tensor],
        labels: torch.Tensor,
        goal: Goal,
        *,
        images: Optional[Images] = None,
        calibration: Optional[Tuple[Mapping[int, torch.Tensor], torch.Tensor]] = None,
        ks: Optional[Sequence[int]] = None,
        score: str = 'max-softmax',
        max_stages: int = 3,
        fixed_stages: bool = False,
        grid: int = 20,
        sweep_points: int = 8,
        seed: int = 0,
        timing_images: int = 1024,
        batch_size: int = 256,
        rounds: int = 3,
        latency_images: int = 64,
        info: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Fit, score and time a cascade for ``goal``; the results dict (see the module docstring).

    ``stage_logits``/``labels``: every candidate k's logits on the test split. With ``calibration`` (logits and
    labels of a held-out split) the policy is fitted there and reported on the whole test split; without it,
    split-half: fitted on one half, reported on the other (and swapped, averaged). ``images`` returns images of
    the test split by index, for timing (None: no timing).
    """
    ks = model.resolve_ks(ks if ks is not None else sorted(stage_logits))
    macs = stage_macs(model, ks)
    gmacs = {k: m / 1e9 for k, m in macs.items()}
    labels = torch.as_tensor(labels).cpu()
    n = labels.shape[0]
    split_half = calibration is None
    if split_half:
        report_index = split_halves(n, seed)[1]
    else:
        report_index = torch.arange(n)
    timing_index = report_index[:timing_images]
    timing_batch = images(timing_index) if images is not None and timing_images > 0 else None
    costs: Mapping[int, float] = gmacs
    static_latency: Dict[int, float] = {}
    if goal.cost == 'latency_ms':
        if timing_batch is None:
            raise ValueError('a latency goal needs images to time each k on this machine')
        measured = measure_speed({str(k): at_k(model, k) for k in ks}, timing_batch,
                                 rounds=max(1, rounds), latency_images=latency_images, measure_throughput=False)
        static_latency = {k: measured[str(k)]['latency_ms'] for k in ks}
        costs = static_latency
    fit_args: Dict[str, Any] = dict(score=score, ks=ks, max_stages=max_stages, fixed_stages=fixed_stages, grid=grid,
                                    sweep_points=sweep_points, info=dict(info or {}))
    result: Dict[str, Any] = {}
    if split_half:
        crossed = cross_fit(stage_logits, labels, costs, macs, goal, seed=seed, **fit_args)
        fit = crossed.fit
        result['calibration'] = dict(
            mode='split-half', seed=seed, calibration_images=int(crossed.halves[0].numel()),
            reported_images=int(crossed.halves[1].numel()), reported=crossed.reported,
            swapped_policy=crossed.swapped_fit.policy.to_dict(), swapped_reported=crossed.swapped_reported,
            averaged=crossed.averaged)
    else:
        assert calibration is not None
        fit = fit_policy(calibration[0], calibration[1], costs, goal, **{
            **fit_args, 'info': {**fit_args['info'], 'calibration': 'held-out'}})
        result['calibration'] = dict(mode='held-out', calibration_images=int(torch.as_tensor(calibration[1]).numel()),
                                     reported_images=n)
    reported_logits = _take(stage_logits, report_index)
    reported_labels = labels[report_index]
    policy = CascadePolicy(fit.policy.ks, fit.policy.thresholds, fit.policy.score,
                           info={**fit.policy.info, 'sweep': [list(p.thresholds) for p in fit.front],
                                 'costs_gmacs': gmacs})
    static = []
    for k in ks:
        top1 = 100.0 * float(reported_logits[k].argmax(-1).eq(reported_labels).double().mean())
        row: Dict[str, Any] = dict(k=k, top1=top1, gmacs=gmacs[k])
        if k in static_latency:
            row['calibration_latency_ms'] = static_latency[k]
        static.append(row)
    sweep = sweep_policies(policy)
    points = score_points(reported_logits, reported_labels, sweep, macs)
    if timing_batch is not None:
        time_points(model, sweep, points, timing_batch, static=static, batch_size=batch_size, rounds=rounds,
                    latency_images=latency_images)
        result['measurement'] = dict(batch_size=batch_size, timing_images=int(timing_batch.shape[0]),
                                     latency_images=min(latency_images, int(timing_batch.shape[0])), rounds=rounds,
                                     threads=torch.get_num_threads(), device=str(timing_batch.device),
                                     note='medians of interleaved rounds in one process; ratios are the figure')
    result = dict(policy=policy.to_dict(), points=points, static=static, **result)
    result['summary'] = compare_with_static(points[0], static)
    result['summary'].update(candidates_evaluated=fit.candidates_evaluated, goal=goal.describe())
    return result


def static_rows(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """A cascade results dict's static k as report rows (eval + benchmark columns of the same run)."""
    return [dict(k=r['k'], top1=r['top1'], gmacs=r['gmacs'],
                 **({'infer_samples_per_sec': r['img_per_s']} if r.get('img_per_s') is not None else {}),
                 **({'infer_latency_ms': r['latency_ms']} if r.get('latency_ms') is not None else {}))
            for r in results['static']]


def curve_rows(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """A cascade results dict's points as report curve rows (``label`` marks the fitted policy)."""
    rows = []
    for p in results['points']:
        row: Dict[str, Any] = dict(top1=p['top1'], gmacs=p['gmacs'],
                                   stages='-'.join(str(k) for k in p['ks']))
        if p.get('img_per_s') is not None:
            row['infer_samples_per_sec'] = p['img_per_s']
        if p.get('latency_ms') is not None:
            row['infer_latency_ms'] = p['latency_ms']
        if p.get('fitted'):
            row['label'] = 'fitted'
        rows.append(row)
    return rows


def read_cascade_results(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The results dict of a ``hydravit cascade --results-file`` JSON, None for any other file."""
    path = Path(path)
    if path.suffix != '.json' or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from e
    if not isinstance(data, dict) or not {'policy', 'points', 'static'} <= set(data):
        return None
    return data
