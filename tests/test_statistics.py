"""Statistics over seeds: t quantiles, intervals and paired gaps against hand-computed values, and the report."""
import csv
import math

import pytest

from hydravit.evaluation.statistics import mean_interval, paired_interval, seeds_to_exclude_zero, t_quantile
from hydravit.training.compare import Run, paired_gaps, seed_statistics, write_seed_comparison
from hydravit.training.config import TrainConfig


def test_t_quantiles_match_the_printed_table():
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4), df
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    assert t_quantile(0.975, 100000) == pytest.approx(1.95996, abs=1e-4)  # the normal limit
    with pytest.raises(ValueError, match='df must be >= 1'):
        t_quantile(0.975, 0)


def test_interval_of_one_to_five_by_hand():
    # mean 3, sample variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5, half width t(0.975, 4) * sqrt(2.5) / sqrt(5)
    iv = mean_interval([1, 2, 3, 4, 5])
    assert (iv.mean, iv.n) == (3.0, 5)
    assert iv.std == pytest.approx(math.sqrt(2.5))
    assert iv.half_width == pytest.approx(1.96324, abs=1e-5)
    assert (iv.low, iv.high) == (pytest.approx(1.03676, abs=1e-5), pytest.approx(4.96324, abs=1e-5))
    one = mean_interval([7.0])
    assert (one.std, one.half_width) == (0.0, 0.0) and not one.excludes_zero()
    with pytest.raises(ValueError, match='no values'):
        mean_interval([])


def test_paired_gap_by_hand():
    # differences 1, 2, -0.5: mean 0.8333, sample std 1.25831, half width 4.302653 * 1.25831 / sqrt(3) = 3.1258
    iv = paired_interval([80.0, 82.0, 81.0], [79.0, 80.0, 81.5])
    assert iv.mean == pytest.approx(0.833333, abs=1e-6)
    assert iv.std == pytest.approx(1.258306, abs=1e-6)
    assert iv.half_width == pytest.approx(3.12581, abs=1e-4)
    assert not iv.excludes_zero()
    assert paired_interval([3.0, 3.1, 2.9], [1.0, 1.0, 1.0]).excludes_zero()  # a clear gap: 2 ± 0.25
    with pytest.raises(ValueError, match='equal counts'):
        paired_interval([1.0], [1.0, 2.0])


def test_seeds_a_gap_would_need_by_hand():
    # mean 0.3, std 0.3: t(0.975, n-1) / sqrt(n) < 1 first at n = 7 (6: 2.5706 / 2.4495 = 1.049; 7: 2.4469 / 2.6458)
    assert seeds_to_exclude_zero(0.3, 0.3) == 7
    assert seeds_to_exclude_zero(-0.3, 0.3) == 7  # the sign does not matter
    assert seeds_to_exclude_zero(0.3, 0.0) == 2
    assert seeds_to_exclude_zero(0.0, 0.3) is None and seeds_to_exclude_zero(0.001, 1.0, limit=50) is None
    assert paired_interval([80.3, 80.6, 80.0], [80.0, 80.0, 80.0]).seeds_to_exclude_zero() == 7  # 0.3 ± 0.3
    with pytest.raises(ValueError, match='std must be >= 0'):
        seeds_to_exclude_zero(0.3, -1.0)


def _rows(values, gmacs=(1.0, 2.0, 4.0)):
    return [dict(k=k, gmacs=g, top1=v) for k, g, v in zip((3, 6, 12), gmacs, values, strict=True)]


def test_seed_table_and_paired_gaps_per_k():
    seeds = [_rows([70.0, 80.0, 85.0]), _rows([72.0, 81.0, 85.0]), _rows([71.0, 79.0, 85.0])]
    stats = {r['k']: r for r in seed_statistics(seeds)}
    assert stats[3]['top1'] == pytest.approx(71.0) and stats[3]['top1_std'] == pytest.approx(1.0)
    assert stats[3]['top1_ci'] == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert stats[12]['top1_ci'] == 0.0 and stats[6]['gmacs'] == 2.0
    other = [_rows([69.0, 80.0, 84.0]), _rows([70.0, 80.0, 84.0]), _rows([68.0, 80.0, 84.0])]
    gaps = {g['k']: g for g in paired_gaps(seeds, other, 'k')}
    assert gaps[3]['gap_mean'] == pytest.approx(2.0) and gaps[3]['gap_std'] == pytest.approx(1.0)
    assert gaps[12]['gap_mean'] == pytest.approx(1.0) and gaps[12]['excludes_zero']  # 1.0 every seed
    assert not gaps[3]['excludes_zero']
    # at equal GMACs: the reference is interpolated at 3 GMACs (halfway from k=6 to k=12)
    shifted = [_rows([75.0, 82.0, 84.0], gmacs=(0.5, 3.0, 5.0)) for _ in range(3)]
    at_cost = paired_gaps(seeds, shifted, 'gmacs')
    assert [g['k'] for g in at_cost] == [6]  # 0.5 and 5.0 GMACs lie outside the reference's range
    assert at_cost[0]['gap_mean'] == pytest.approx((82.5 + 83.0 + 82.0) / 3 - 82.0)


def test_seed_report_has_intervals_gaps_and_error_bars(tmp_path):
    def run(method, label, values):
        cfg = TrainConfig(model='hydravit_test_patch4_16', method=method, output=str(tmp_path), experiment=method)
        return Run(label, cfg, results=_rows(values))
    per_seed = {s: {'hydravit': run('hydravit', 'HydraViT', [70.0 + d, 80.0, 85.0]),
                    'separate': run('separate', 'Separate ViTs', [72.0 + 2 * d, 81.0, 86.0])}
                for s, d in ((1, 0.0), (2, 1.0), (3, -1.0))}
    paths = write_seed_comparison(per_seed, tmp_path)
    text = paths['markdown'].read_text()
    assert '71.00 ± 1.00' not in text and '70.00 ± 1.00 [67.52, 72.48]' in text  # HydraViT k=3
    assert 'Separate ViTs minus each run at equal k, paired by seed' in text
    # k=3: differences 2, 3, 1; t(0.975, n-1) / sqrt(n) < 2 first at n = 4 (3.1824 / 2)
    assert '| 2.00 ± 1.00 [-0.48, 4.48] | no | 4 |' in text, text
    with open(tmp_path / 'report' / 'seeds.csv', newline='') as f:
        rows = {(r['method'], int(r['k'])): r for r in csv.DictReader(f)}
    assert float(rows[('Separate ViTs', 3)]['top1_std']) == pytest.approx(2.0)
    assert paths['plot_gmacs'].stat().st_size > 0


def _robustness(k_clean_noise):
    """evaluate_corruptions-shaped rows: per k its clean top-1 and its top-1 under noise at severities 1 and 3."""
    rows = []
    for k, gmacs, clean, noisy in k_clean_noise:
        rows.append(dict(k=k, gmacs=gmacs, top1=clean, corruption='none', severity=0, drop=0.0, num_samples=100,
                         corruption_seed=0))
        rows += [dict(k=k, gmacs=gmacs, top1=v, corruption='gaussian_noise', severity=s, drop=clean - v,
                      num_samples=100, corruption_seed=0) for s, v in zip((1, 3), noisy, strict=True)]
    return rows


def test_seed_report_gives_robustness_intervals_and_paired_gaps_under_corruption(tmp_path):
    def run(method, label, values, noisy):
        cfg = TrainConfig(model='hydravit_test_patch4_16', method=method, output=str(tmp_path), experiment=method)
        rob = _robustness([(3, 1.0, values[0], noisy[0]), (6, 2.0, values[1], noisy[1])])
        return Run(label, cfg, results=_rows([*values, 85.0])[:2], robustness=rob)
    # HydraViT k=3 under noise: (60+d, 50+d) -> corrupted top-1 55+d, drop 15; separate: 58+2d, 48+2d -> 53+2d
    per_seed = {s: {'hydravit': run('hydravit', 'HydraViT', [70.0 + d, 80.0], [(60.0 + d, 50.0 + d), (70.0, 60.0)]),
                    'separate': run('separate', 'Separate ViTs', [72.0, 81.0],
                                    [(58.0 + 2 * d, 48.0 + 2 * d), (71.0, 61.0)])}
                for s, d in ((1, 0.0), (2, 1.0), (3, -1.0))}
    text = write_seed_comparison(per_seed, tmp_path)['markdown'].read_text()
    robust = text[text.index('## Robustness over seeds'):]
    assert '1 corruption(s) (gaussian_noise) at severities [1, 3], corruption seed 0, 100 test images' in robust
    assert '| HydraViT | 55.00 ± 1.00 [52.52, 57.48] | 65.00 ± 0.00 [65.00, 65.00] |' in robust  # corrupted top-1
    assert '| Separate ViTs | 53.00 ± 2.00 [48.03, 57.97] |' in robust
    assert '| HydraViT | 15.00 ± 0.00 [15.00, 15.00] |' in robust  # the mean drop: the same every seed
    # separate minus HydraViT under corruption at k=3: -2 + d per seed = -2, -1, -3 -> -2 ± 1
    gaps = robust[robust.index('Separate ViTs minus each run at equal k under corruption'):]
    assert '| HydraViT | 3 | -2.00 ± 1.00 [-4.48, 0.48] | no |' in gaps, gaps
    assert (tmp_path / 'report' / 'corrupted_accuracy_vs_gmacs.png').stat().st_size > 0
    per_seed[2]['separate'].robustness = []  # one run not scored: no robustness over seeds at all
    assert '## Robustness over seeds' not in write_seed_comparison(per_seed, tmp_path)['markdown'].read_text()
