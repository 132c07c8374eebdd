"""The k samplers: their distributions (binomial bounds), determinism per (seed, epoch, step, rank), bad settings."""
import math
from collections import Counter

import pytest

from hydravit.training.samplers import SAMPLERS, create_sampler

KS = list(range(3, 13))
STEPS = 4000


def _counts(sampler, steps=STEPS, epoch=0):
    return Counter(k for step in range(steps) for k in sampler.ks_for_step(epoch, step))


def _assert_binomial(counts, probabilities, draws):
    """Each count within 4.5 binomial standard deviations of its expectation (false alarm ~1e-5 per k)."""
    for k, p in probabilities.items():
        std = math.sqrt(draws * p * (1 - p))
        assert abs(counts[k] - draws * p) <= 4.5 * std + 1e-9, (k, counts[k], draws * p, std)


def test_uniform_draws_each_k_about_equally_often():
    sampler = create_sampler('uniform', KS, seed=3)
    assert sampler.probabilities() == pytest.approx({k: 1 / len(KS) for k in KS})
    counts = _counts(sampler)
    assert sum(counts.values()) == STEPS and set(counts) == set(KS)
    _assert_binomial(counts, sampler.probabilities(), STEPS)


def test_weighted_draws_in_proportion_to_the_weights():
    weights = [0, 1, 1, 2, 2, 3, 3, 4, 4, 10]
    sampler = create_sampler('weighted', KS, seed=3, weights=weights)
    expected = {k: w / sum(weights) for k, w in zip(KS, weights, strict=True)}
    assert sampler.probabilities() == pytest.approx(expected)
    counts = _counts(sampler)
    assert counts[3] == 0  # weight 0: never drawn
    _assert_binomial(counts, expected, STEPS)


def test_sandwich_always_trains_largest_and_smallest_plus_distinct_middle_ks():
    sampler = create_sampler('sandwich', KS, seed=5, num_random=3)
    for step in range(300):
        ks = sampler.ks_for_step(2, step)
        assert ks[0] == 12 and ks[-1] == 3 and len(ks) == 5
        middle = ks[1:-1]
        assert len(set(middle)) == 3 and set(middle) <= set(range(4, 12))
        assert ks == sorted(ks, reverse=True)  # largest first (in-place distillation teaches down)
    counts = _counts(sampler, steps=2000)
    probabilities = sampler.probabilities()
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert counts[12] == counts[3] == 2000
    for k in range(4, 12):  # each middle k is in a step with probability 3/8
        assert abs(counts[k] - 2000 * 3 / 8) <= 4.5 * math.sqrt(2000 * 3 / 8 * 5 / 8)
        assert probabilities[k] == pytest.approx(3 / 8 / 5)


def test_weighted_sandwich_inclusion_probabilities_match_a_hand_computed_example():
    # middle k 4, 5, 6 with weights 1, 2, 1, two drawn per step without replacement:
    # P(5) = 1/2 + 2 * (1/4 * 2/3) = 5/6; P(4) = 1/4 + 1/2 * 1/2 + 1/4 * 1/3 = 7/12 = P(6)
    sampler = create_sampler('sandwich', [3, 4, 5, 6, 7], num_random=2, weights=[9, 1, 2, 1, 9])
    per_step = 4
    assert sampler.probabilities() == pytest.approx({3: 1 / per_step, 4: 7 / 12 / per_step, 5: 5 / 6 / per_step,
                                                     6: 7 / 12 / per_step, 7: 1 / per_step})
    counts = _counts(sampler)
    assert counts[3] == counts[7] == STEPS
    _assert_binomial({k: counts[k] for k in (4, 5, 6)}, {4: 7 / 12, 5: 5 / 6, 6: 7 / 12}, STEPS)


def test_weighted_sandwich_favours_the_weighted_middle_and_never_draws_weight_zero():
    weights = [1, 0, 1, 2, 3, 3, 2, 1, 1, 1]  # k = 4 never; 7 and 8 three times as often as 5 or 10
    sampler = create_sampler('sandwich', KS, seed=5, weights=weights)
    counts = _counts(sampler)
    assert counts[4] == 0 and counts[3] == counts[12] == STEPS
    middle = {k: w / sum(weights[1:-1]) for k, w in zip(KS[1:-1], weights[1:-1], strict=True)}
    _assert_binomial({k: counts[k] for k in middle}, middle, STEPS)
    assert sampler.probabilities()[7] == pytest.approx(middle[7] / 3)
    for step in range(200):  # still distinct, largest first
        ks = sampler.ks_for_step(1, step)
        assert ks == sorted(set(ks), reverse=True)


def test_sandwich_edge_cases():
    assert create_sampler('sandwich', [4, 9], num_random=0).ks_for_step(0, 0) == [9, 4]
    assert create_sampler('sandwich', [6], num_random=0).ks_for_step(0, 0) == [6]
    full = create_sampler('sandwich', KS, num_random=len(KS) - 2)
    assert full.ks_for_step(1, 7) == sorted(KS, reverse=True)


def test_random_draws_distinct_ks_each_equally_often():
    sampler = create_sampler('random', KS, seed=11, num_random=3)
    for step in range(300):
        ks = sampler.ks_for_step(1, step)
        assert len(ks) == len(set(ks)) == 3 and set(ks) <= set(KS)
        assert ks == sorted(ks, reverse=True)
    counts = _counts(sampler, steps=2000)
    assert sum(counts.values()) == 3 * 2000
    for k in KS:  # each k is in a step with probability 3/10, the ends of the range included
        assert abs(counts[k] - 2000 * 0.3) <= 4.5 * math.sqrt(2000 * 0.3 * 0.7), (k, counts[k])
    assert sampler.probabilities() == pytest.approx({k: 0.1 for k in KS})
    assert create_sampler('random', KS, num_random=len(KS)).ks_for_step(0, 0) == sorted(KS, reverse=True)


def test_all_trains_every_k_each_step():
    sampler = create_sampler('all', [5, 3, 9])
    assert all(sampler.ks_for_step(e, s) == [9, 5, 3] for e in range(3) for s in range(20))
    assert sampler.probabilities() == pytest.approx({3: 1 / 3, 5: 1 / 3, 9: 1 / 3})


@pytest.mark.parametrize('name', SAMPLERS)
def test_draws_are_a_pure_function_of_seed_epoch_step(name):
    weights = [1.0] * len(KS) if name == 'weighted' else None
    a = create_sampler(name, KS, seed=11, weights=weights)
    b = create_sampler(name, KS, seed=11, weights=weights)
    order = [(e, s) for e in range(3) for s in range(40)]
    first = {key: a.ks_for_step(*key) for key in order}
    # another instance, visited in reverse order and after other calls: no hidden state
    assert all(b.ks_for_step(*key) == first[key] for key in reversed(order))
    assert all(a.ks_for_step(*key, rank=r) == first[key] for key in order[:20] for r in range(1, 4))


def test_seed_and_epoch_change_the_draws():
    base = create_sampler('uniform', KS, seed=1)
    draws = [base.ks_for_step(0, s) for s in range(100)]
    assert draws != [create_sampler('uniform', KS, seed=2).ks_for_step(0, s) for s in range(100)]
    assert draws != [base.ks_for_step(1, s) for s in range(100)]


@pytest.mark.parametrize('name', ['uniform', 'sandwich'])
def test_per_rank_sampling_differs_across_ranks_but_is_reproducible(name):
    sampler = create_sampler(name, KS, seed=7, per_rank=True, num_random=2)
    draws = [[sampler.ks_for_step(0, s, r) for r in range(4)] for s in range(50)]
    assert sum(len({tuple(d) for d in step}) > 1 for step in draws) > 25
    assert draws == [[sampler.ks_for_step(0, s, r) for r in range(4)] for s in range(50)]


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='roulette'), r"unknown sampler 'roulette': choose one of uniform, weighted, sandwich, random, all"),
    (dict(name='random', num_random=0), r'num_random \(--num-random\) must be an integer in 1\.\.3 .*got 0'),
    (dict(name='random', num_random=4), r'num_random \(--num-random\) must be an integer in 1\.\.3 .*got 4'),
    (dict(k_choices=[]), r'k_choices is empty'),
    (dict(k_choices=[3, 4, 3]), r'k_choices \[3, 4, 3\] names \[3\] more than once'),
    (dict(k_choices=[0, 4]), r'k_choices \[0\] below 1'),
    (dict(k_choices=[2.5, 4]), r'k_choices must be integers, got \[2\.5\]'),
    (dict(k_choices=[True, 4]), r'k_choices must be integers, got \[True\]'),
    (dict(name='weighted'), r'the weighted sampler needs weights \(--head-weights\): one per k in \[3, 6, 9\]'),
    (dict(name='weighted', weights=[1, 2]), r'got 2 weights \[1\.0, 2\.0\] for 3 k choices .*give one weight per k'),
    (dict(name='weighted', weights=[1, -1, 1]), r'weights must be finite and >= 0, got \[1\.0, -1\.0, 1\.0\]'),
    (dict(name='weighted', weights=[0, 0, 0]), r'weights are all zero'),
    (dict(name='uniform', weights=[1, 1, 1]), r"used only by the weighted and sandwich samplers, not 'uniform'"),
    (dict(name='sandwich', weights=[1, 0, 1]),
     r'draws 1 of the middle k \[6\] per step, but only 0 of them have a weight > 0'),
    (dict(name='sandwich', weights=[1, 1]), r'got 2 weights .* for 3 k choices'),
    (dict(name='sandwich', num_random=-1), r'num_random \(--num-random\) must be an integer in 0\.\.1 .*got -1'),
    (dict(name='sandwich', num_random=2), r'num_random \(--num-random\) must be an integer in 0\.\.1 .*got 2'),
    (dict(name='sandwich', k_choices=[3, 4], num_random=1),
     r'num_random \(--num-random\) must be an integer in 0\.\.0 .*got 1'),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    args = dict(name='uniform', k_choices=[3, 6, 9])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        create_sampler(args.pop('name'), args.pop('k_choices'), **args)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match=r'step must be an integer >= 0, got -1'):
        create_sampler('uniform', KS).ks_for_step(0, -1)
