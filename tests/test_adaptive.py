"""The adaptive controller on simulated time: latency kept under target as load changes, k always valid."""
import random

import pytest
import torch

from hydravit import HydraViT
from hydravit.deployment.adaptive import (
    AdaptivePredictor,
    LatencyController,
    LoadPhase,
    applied_load,
    run_under_load,
    summarize,
)

KS = list(range(3, 13))
TRUE_MS = {k: 2.0 + 0.25 * k * k for k in KS}  # 4.25 ms at k=3 .. 38 ms at k=12 when unloaded
TARGET = 45.0
LOADS = [1.0] * 120 + [3.0] * 120 + [1.6] * 120 + [1.0] * 120  # k=12 misses at 3.0 and 1.6, k=3 never does


def simulate(controller, loads, rng, noise=0.05):
    served = []
    for load in loads:
        k = controller.choose()
        latency = TRUE_MS[k] * load * (1 + rng.uniform(-noise, noise))
        controller.observe(k, latency)
        served.append((k, latency))
    return served


def phase_slices(loads, settle=8):
    """Indices of each constant-load phase, minus its first ``settle`` batches (reaction time)."""
    bounds, start = [], 0
    for i in range(1, len(loads) + 1):
        if i == len(loads) or loads[i] != loads[start]:
            bounds.append((loads[start], slice(start + settle, i)))
            start = i
    return bounds


@pytest.mark.parametrize('calibration_error', [1.0, 0.5, 2.0])
def test_controller_keeps_latency_under_target_as_load_changes(calibration_error):
    """Calibrated under a different load (x0.5 or x2): the shared load factor absorbs it."""
    rng = random.Random(0)
    base = {k: TRUE_MS[k] * calibration_error for k in KS}
    served = simulate(LatencyController(KS, TARGET, base), LOADS, rng)
    for load, idx in phase_slices(LOADS):
        window = served[idx]
        met = sum(lat <= TARGET for _, lat in window) / len(window)
        assert met >= 0.95, f'load {load}: only {met:.0%} of batches met the target'
        best_fitting = max(k for k in KS if TRUE_MS[k] * load * 1.05 <= TARGET)
        mean_k = sum(k for k, _ in window) / len(window)
        # not the trivial always-smallest policy: close to the largest k that can meet the target
        assert mean_k >= best_fitting - 2, f'load {load}: mean k {mean_k:.1f}, best feasible {best_fitting}'
    # the scenario is meaningful: always-largest misses the target under load
    assert TRUE_MS[12] * 3.0 > TARGET and TRUE_MS[12] * 1.6 > TARGET


def test_controller_reacts_down_at_once_and_up_with_hysteresis():
    ctrl = LatencyController(KS, TARGET, TRUE_MS, up_patience=3, probe_every=0)
    assert ctrl.choose() == max(k for k in KS if TRUE_MS[k] <= 0.7 * TARGET)
    start = ctrl.current
    ctrl.observe(start, TRUE_MS[start] * 4)  # sudden load: next batch already smaller
    assert ctrl.choose() < start
    low = ctrl.current
    for _ in range(30):
        ctrl.observe(low, TRUE_MS[low] * 4)
        ctrl.choose()
    ctrl.observe(ctrl.current, TRUE_MS[ctrl.current])  # load gone: the first good batch alone is not enough
    assert ctrl.choose() == ctrl.current
    ks = []
    for _ in range(12):
        ctrl.observe(ctrl.current, TRUE_MS[ctrl.current])
        ks.append(ctrl.choose())
    assert ks[-1] > low, 'never climbed back once the load was gone'


def test_controller_climbs_one_k_at_a_time_and_only_once_the_queue_is_drained():
    ctrl = LatencyController(KS, TARGET, TRUE_MS, up_patience=2, probe_every=0, climb_steps=1)
    ctrl.observe(ctrl.choose(), 1e3)                          # one very slow batch: down to k = 3 at once
    assert ctrl.choose() == 3
    for _ in range(6):                                        # fast again, but 5 batches still queued
        ctrl.observe(3, TRUE_MS[3])
        assert ctrl.choose(queued_batches=5) == 3
    climbed = []
    for _ in range(8):                                        # queue drained: one k every second batch
        ctrl.observe(ctrl.current, TRUE_MS[ctrl.current])
        climbed.append(ctrl.choose())
    assert climbed == [3, 4, 4, 5, 5, 6, 6, 7]
    jumping = LatencyController(KS, TARGET, TRUE_MS, up_patience=2, probe_every=0)
    jumping.observe(jumping.choose(), 1e3)
    for _ in range(6):
        jumping.observe(3, TRUE_MS[3])
        assert jumping.choose(queued_batches=5) == 3
    for _ in range(2):
        jumping.observe(jumping.current, TRUE_MS[jumping.current])
        k = jumping.choose()
    assert k >= 6  # without climb_steps: several k in one move, to the largest predicted to fit
    with pytest.raises(ValueError, match='climb_steps must be >= 1'):
        LatencyController(KS, TARGET, TRUE_MS, climb_steps=0)


def test_batches_with_images_behind_them_neither_count_towards_a_climb_nor_break_it():
    """Requests of two batches each: every other batch has the request's second half behind it."""
    ctrl = LatencyController(KS, TARGET, TRUE_MS, up_patience=3, probe_every=0)
    ctrl.observe(ctrl.choose(), 1e3)                          # one very slow batch: down to k = 3
    for _ in range(10):                                       # fast again, with a queue: the load factor settles
        ctrl.observe(3, TRUE_MS[3])
        assert ctrl.choose(queued_batches=1, drained=False) == 3
    ks = []
    for i in range(6):
        ctrl.observe(ctrl.current, TRUE_MS[ctrl.current])
        ks.append(ctrl.choose(queued_batches=1, drained=i % 2 == 1))
    assert ks[:5] == [3] * 5 and ks[5] > 3                    # the third drained batch climbs


def test_controller_caps_k_at_what_keeps_up_with_the_arrivals():
    """Full batches of 32 at 10 / 20 / 40 ms, 85 % utilisation at most: k = 2 keeps up with 0.85 x 32 / 10 ms
    = 2720 images/s, k = 4 with 1360, k = 8 with 680. The latency target alone (1 s) would allow k = 8."""
    base = {2: 10.0, 4: 20.0, 8: 40.0}
    ctrl = LatencyController([2, 4, 8], 1000.0, base, batch_images=32, probe_every=0, up_patience=1)
    assert ctrl.choose(arrival_per_s=600.0) == 8
    assert ctrl.choose(arrival_per_s=700.0) == 4               # no backlog yet: the rate alone moves it down
    assert ctrl.choose(arrival_per_s=3000.0) == 2              # nothing keeps up: the cheapest
    assert ctrl.choose(arrival_per_s=1300.0) == 4              # climbs again as far as the rate allows
    assert ctrl.choose(arrival_per_s=1300.0, overhead_ms=8.0) == 2  # 32 / 28 ms x 0.85 = 971 images/s < 1300
    assert ctrl.sustainable_k(1360.0) == 4 and ctrl.sustainable_k(1361.0) == 2
    uncapped = LatencyController([2, 4, 8], 1000.0, base, probe_every=0)
    assert uncapped.choose(arrival_per_s=3000.0) == 8          # without batch_images the rate is not used
    with pytest.raises(ValueError, match='batch_images must be >= 1'):
        LatencyController([2], 1.0, {2: 1.0}, batch_images=0)
    with pytest.raises(ValueError, match=r'max_utilization must be in \(0, 1\], got 1.5'):
        LatencyController([2], 1.0, {2: 1.0}, max_utilization=1.5)
    with pytest.raises(ValueError, match='arrival_per_s >= 0'):
        ctrl.choose(arrival_per_s=-1.0)


def test_probe_corrects_a_stale_estimate_of_a_larger_k():
    """k=9..12 calibrated 1.8x too slow: probing the next larger k (predicted to fit) walks back up."""
    base = {k: TRUE_MS[k] * (1.8 if k >= 9 else 1.0) for k in KS}
    settled = max(k for k in KS if TRUE_MS[k] <= 0.7 * TARGET)  # where a correct calibration settles
    ctrl = LatencyController(KS, TARGET, base, probe_every=5, base_smoothing=0.5)
    assert ctrl.current < settled
    served = simulate(ctrl, [1.0] * 300, random.Random(1), noise=0.0)
    assert ctrl.current == settled and sum(k == settled for k, _ in served[-20:]) >= 16  # others: probes
    assert all(lat <= TARGET for _, lat in served)
    no_probe = simulate(LatencyController(KS, TARGET, base, probe_every=0), [1.0] * 300, random.Random(1), 0.0)
    assert no_probe[-1][0] < settled


def test_controller_never_returns_k_outside_its_set():
    ks = [3, 5, 9]
    rng = random.Random(2)
    ctrl = LatencyController(ks, 10.0, {3: 1.0, 5: 4.0, 9: 30.0}, probe_every=3)
    for _ in range(2000):
        k = ctrl.choose()
        assert k in ks
        ctrl.observe(k, 10 ** rng.uniform(-3, 4))  # from 1 us to 10 s


@pytest.mark.parametrize('kwargs,match', [
    (dict(ks=[], target_ms=1.0, base_latency_ms={}), r'ks is empty: give at least one'),
    (dict(ks=[3, 3], target_ms=1.0, base_latency_ms={3: 1.0}), r'ks \[3, 3\] names \[3\] more than once'),
    (dict(ks=[True], target_ms=1.0, base_latency_ms={1: 1.0}), r'ks must be integers, got \[True\]'),
    (dict(ks=[3], target_ms=0.0, base_latency_ms={3: 1.0}), r'target_ms must be > 0, got 0\.0'),
    (dict(ks=[3, 4], target_ms=1.0, base_latency_ms={3: 1.0}), r'base_latency_ms lacks k \[4\]'),
    (dict(ks=[3], target_ms=1.0, base_latency_ms={3: -1.0}), r'latency for k=3 must be a finite number > 0 ms, got -1'),
    (dict(ks=[3], target_ms=1.0, base_latency_ms={3: 1.0}, up_fraction=0.95, down_fraction=0.9),
     r'need 0 < up_fraction <= down_fraction <= 1, got 0\.95, 0\.9'),
])
def test_controller_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyController(**kwargs)


def test_observe_rejects_unknown_k_and_bad_latency():
    ctrl = LatencyController([3, 4], 5.0, {3: 1.0, 4: 2.0})
    with pytest.raises(ValueError, match=r'k=7 is not one of the controlled subnetworks \[3, 4\]'):
        ctrl.observe(7, 1.0)
    with pytest.raises(ValueError, match=r'latency for k=3 must be a finite number > 0 ms, got nan'):
        ctrl.observe(3, float('nan'))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_predictor(randomize, clock, load, ks=None):
    """A tiny HydraViT whose forward advances ``clock`` by a simulated latency of its k times ``load[0]``."""
    model = randomize(HydraViT(img_size=8, patch_size=4, num_classes=5, num_heads=4, head_dim=4, depth=1)).eval()
    forward = model.forward

    def timed_forward(x, k=None):
        clock.now += (1.0 + 2.0 * k) * load[0] / 1e3
        return forward(x, k=k)

    model.forward = timed_forward
    return model, AdaptivePredictor(model, target_ms=8.0, ks=ks, clock=clock, probe_every=0)


def test_predictor_serves_valid_k_with_the_model_outputs(randomize):
    clock, load = FakeClock(), [1.0]
    model, predictor = make_predictor(randomize, clock, load)
    x = torch.randn(2, 3, 8, 8)
    out = predictor(x)  # first call calibrates: 3 ms .. 9 ms simulated
    assert predictor.controller.base == pytest.approx({1: 3.0, 2: 5.0, 3: 7.0, 4: 9.0})
    assert out.k == 2 and out.latency_ms == pytest.approx(5.0)  # largest within 0.7 * 8 ms
    with torch.no_grad():
        assert torch.equal(out.logits, model(x, k=out.k))
    load[0] = 2.5
    ks = [predictor(x).k for _ in range(10)]
    assert set(ks) <= set(model.k_choices) and ks[-1] == 1
    load[0] = 0.5
    ks = [predictor(x).k for _ in range(10)]
    assert ks[-1] == 4


def test_predictor_validates_ks(randomize):
    model = HydraViT(img_size=8, patch_size=4, num_classes=5, num_heads=4, head_dim=4, depth=1, k_choices=[2, 4])
    with pytest.raises(ValueError, match=r'k=3 is not a valid subnetwork: allowed values are \[2, 4\]'):
        AdaptivePredictor(model, 5.0, ks=[3])
    predictor = AdaptivePredictor(model, 5.0, base_latency_ms={2: 1.0, 4: 2.0})
    assert predictor.controller.ks == [2, 4]


def test_applied_load_restores_threads_and_stops_processes():
    threads = torch.get_num_threads()
    with applied_load(LoadPhase('busy', busy=1, threads=1)) as procs:
        assert torch.get_num_threads() == 1
        assert len(procs) == 1 and procs[0].poll() is None
    assert torch.get_num_threads() == threads
    assert procs[0].poll() is not None
    with pytest.raises(ValueError, match=r"phase 'bad': busy must be >= 0"):
        with applied_load(LoadPhase('bad', busy=-1)):
            pass


def test_summarize_counts_batches_within_target_and_accuracy_served():
    records = [dict(phase='quiet', policy='a', batch=0, k=4, latency_ms=5.0),
               dict(phase='quiet', policy='a', batch=1, k=2, latency_ms=12.0),
               dict(phase='busy', policy='a', batch=0, k=2, latency_ms=9.0),
               dict(phase='quiet', policy='b', batch=0, k=4, latency_ms=20.0)]
    rows = summarize(records, target_ms=10.0, accuracy={2: 70.0, 4: 80.0})
    by = {(r['phase'], r['policy']): r for r in rows}
    assert [(r['phase'], r['policy']) for r in rows][-2:] == [('all', 'a'), ('all', 'b')]
    assert by['quiet', 'a']['met_target'] == 0.5 and by['quiet', 'a']['mean_top1'] == 75.0
    assert by['all', 'a']['batches'] == 3 and by['all', 'a']['met_target'] == pytest.approx(2 / 3)
    assert by['quiet', 'b']['met_target'] == 0.0 and by['all', 'a']['mean_k'] == pytest.approx(8 / 3)


def test_run_under_load_interleaves_policies_per_batch():
    calls = []
    policies = {name: (lambda x, name=name: calls.append(name) or (3, 1.0)) for name in ('p', 'q')}
    records = run_under_load(policies, torch.zeros(1), [LoadPhase('one'), LoadPhase('two')], batches_per_phase=2)
    assert calls == ['p', 'q'] * 4
    assert [(r['phase'], r['batch']) for r in records[:4]] == [('one', 0), ('one', 0), ('one', 1), ('one', 1)]


def test_serve_demo_with_a_loose_target_serves_the_largest_k(capsys):
    """Real (tiny) timing, no timed assertion: with a 10 s target every batch must fit at the largest k."""
    from hydravit.cli import main
    threads = torch.get_num_threads()
    try:
        assert main(['serve-demo', '--model', 'hydravit_test_patch4_16', '--target-ms', '10000', '-b', '2',
                     '--batches', '4', '--busy', '0', '--compare', '--threads', '1']) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if ' adaptive ' in line]
    assert [line[0] for line in lines] == ['quiet', '0', '1', 'quiet', 'all']  # phases, then the total
    assert all(line[-4] == '1.00' and line[-3] == '4' for line in lines)  # met_target, mean_k
