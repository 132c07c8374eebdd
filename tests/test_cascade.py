"""Early-exit cascades: batched gather/scatter equals per-k runs, calibration never reads the reported split."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import timm
import torch

from hydravit.cascade import (
    NEVER,
    Cascade,
    CascadePolicy,
    CascadePredictor,
    create_goal,
    create_score,
    cross_fit,
    evaluate_policy,
    fit_policy,
    load_policy,
    module_stages,
    policy_path,
    save_policy,
    simulate_cascade,
    stage_macs,
)
from hydravit.models import HydraViTConfig, extract_subnet, model_from_config, subnet_cost
from hydravit.storage.checkpoint import save_model


@pytest.fixture
def model(randomize):
    return randomize(timm.create_model('hydravit_test_patch4_16'), seed=3).eval()


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _per_k(model, x, ks):
    with torch.inference_mode():
        return {k: model(x, k=k) for k in ks}


# ------------------------------------------------------------------------------------------ scores
def test_scores_are_in_unit_interval_with_known_extremes():
    uniform = torch.zeros(3, 10)
    certain = torch.tensor([[50.0] + [0.0] * 9])
    assert create_score('max-softmax')(uniform) == pytest.approx(torch.full((3,), 0.1))
    assert create_score('margin')(uniform) == pytest.approx(torch.zeros(3))
    assert create_score('entropy')(uniform) == pytest.approx(torch.zeros(3), abs=1e-6)
    for name in ('max-softmax', 'margin', 'entropy'):
        assert float(create_score(name)(certain)) == pytest.approx(1.0, abs=1e-6)
        random = create_score(name)(torch.randn(100, 7) * 3)
        assert bool(((random >= 0) & (random <= 1)).all())
    # top-2 margin: probabilities 0.5, 0.3, 0.2 -> 0.2
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert float(create_score('margin')(logits)) == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError, match='unknown confidence score .* choose one of'):
        create_score('softmax')


# ------------------------------------------------------------------------------------------ policy
def test_policy_validation_names_the_problem():
    with pytest.raises(ValueError, match='increasing'):
        CascadePolicy((4, 2), (0.5,))
    with pytest.raises(ValueError, match='needs 1 thresholds'):
        CascadePolicy((2, 4), (0.5, 0.5))
    with pytest.raises(ValueError, match='>= 0'):
        CascadePolicy((2, 4), (-0.1,))
    with pytest.raises(ValueError, match='more than once'):
        CascadePolicy((2, 2), (0.1,))
    with pytest.raises(ValueError, match='unknown confidence score'):
        CascadePolicy((2, 4), (0.5,), score='nope')
    with pytest.raises(ValueError, match=r'k=3 is not a valid subnetwork'):
        CascadePolicy((1, 3), (0.5,)).check_ks((1, 2, 4))


def test_policy_json_round_trip_next_to_the_checkpoint(tmp_path, model):
    ckpt = save_model(tmp_path / 'run' / 'model_best.safetensors', model)
    policy = CascadePolicy((1, 2, 4), (0.4, 0.7), 'entropy', info={'goal': 'max-drop'})
    saved = save_policy(policy, policy_path(ckpt))
    assert saved == tmp_path / 'run' / 'model_best.cascade.json'
    for source in (saved, ckpt, ckpt.parent):  # the file, the checkpoint, the run folder
        loaded = load_policy(source)
        assert (loaded.ks, loaded.thresholds, loaded.score, loaded.info) == ((1, 2, 4), (0.4, 0.7), 'entropy',
                                                                             {'goal': 'max-drop'})
    data = json.loads(saved.read_text())
    data['extra'] = 1
    saved.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        load_policy(saved)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_policy(tmp_path / 'missing.json')


# ------------------------------------------------------------------------------------------ batched run
def test_threshold_zero_is_the_first_k_and_above_one_the_last(model):
    x = _images()
    runs = _per_k(model, x, (1, 2, 4))
    macs = stage_macs(model, (1, 2, 4))
    first = Cascade.from_model(model, CascadePolicy((1, 2, 4), (0.0, 0.0)))(x)
    assert torch.equal(first.logits, runs[1])
    assert first.exit_k.tolist() == [1] * 24 and first.stage_counts == [24]
    assert first.macs.tolist() == [macs[1]] * 24
    last = Cascade.from_model(model, CascadePolicy((1, 2, 4), (NEVER, 5.0)))(x)
    assert torch.allclose(last.logits, runs[4], atol=1e-6)
    assert last.exit_k.tolist() == [4] * 24 and last.stage_counts == [24, 24, 24]
    assert last.macs.tolist() == [macs[1] + macs[2] + macs[4]] * 24


def test_gather_scatter_returns_each_images_logits_from_its_exit_stage(model):
    x = _images(40, seed=1)
    runs = _per_k(model, x, (1, 2, 4))
    score = create_score('max-softmax')
    t1, t2 = float(score(runs[1]).median()), float(score(runs[2]).quantile(0.4))
    seen = []

    def recording(k):
        def forward(batch):
            seen.append((k, batch.shape[0]))
            return model(batch, k=k)
        return forward

    macs = stage_macs(model, (1, 2, 4))
    policy = CascadePolicy((1, 2, 4), (t1, t2))
    out = Cascade(module_stages({k: recording(k) for k in (1, 2, 4)}, macs), policy)(x)
    # expected exits, computed from every k run on every image
    exit1 = score(runs[1]) >= t1
    exit2 = ~exit1 & (score(runs[2]) >= t2)
    expected_k = torch.where(exit1, 1, torch.where(exit2, 2, 4))
    assert out.exit_k.tolist() == expected_k.tolist()
    assert 0 < int(exit1.sum()) < 40 and int(exit2.sum()) > 0 and int((expected_k == 4).sum()) > 0
    for i, k in enumerate(expected_k.tolist()):
        assert torch.allclose(out.logits[i], runs[k][i], atol=1e-5), i
    # later stages really ran on fewer images
    assert seen == [(1, 40), (2, int((~exit1).sum())), (4, int((expected_k == 4).sum()))]
    expected_macs = {1: macs[1], 2: macs[1] + macs[2], 4: macs[1] + macs[2] + macs[4]}
    assert out.macs.tolist() == [expected_macs[k] for k in expected_k.tolist()]
    assert out.mean_gmacs == pytest.approx(sum(expected_macs[k] for k in expected_k.tolist()) / 40 / 1e9)
    simulated = simulate_cascade(runs, policy, macs)
    assert torch.equal(simulated.exit_k, out.exit_k) and torch.allclose(simulated.logits, out.logits, atol=1e-5)
    assert simulated.stage_counts == out.stage_counts


def test_per_k_exported_models_give_the_universal_models_cascade(model):
    x = _images(30, seed=2)
    runs = _per_k(model, x, (1, 3))
    score = create_score('max-softmax')
    policy = CascadePolicy((1, 3, 4), (float(score(runs[1]).median()), float(score(runs[3]).median())))
    universal = Cascade.from_model(model, policy)(x)
    vits = {k: extract_subnet(model, k).eval() for k in policy.ks}
    exported = Cascade(module_stages(vits, stage_macs(model, policy.ks)), policy)(x)
    assert torch.equal(universal.exit_k, exported.exit_k)
    assert torch.allclose(universal.logits, exported.logits, atol=1e-5)
    assert len(set(universal.exit_k.tolist())) > 1


@pytest.mark.parametrize('nesting', ['matformer', 'dynabert', 'separate', 'sortednet'])
def test_cascade_runs_on_the_universal_model_of_every_method(nesting, randomize):
    if nesting == 'sortednet':
        nesting = 'hydravit'  # SortedNet trains HydraViT's shapes: the same model class
    config = HydraViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10, num_heads=4, head_dim=8, depth=1,
                            k_choices=(2, 4), nesting=nesting)
    m = randomize(model_from_config(config), seed=5).eval()
    x = _images(8)
    runs = _per_k(m, x, (2, 4))
    out = Cascade.from_model(m, CascadePolicy((2, 4), (0.0,)))(x)
    assert torch.allclose(out.logits, runs[2], atol=1e-6)
    out = Cascade.from_model(m, CascadePolicy((2, 4), (NEVER,)))(x)
    assert torch.allclose(out.logits, runs[4], atol=1e-6)
    assert out.macs[0] == subnet_cost(m.config, 2).macs + subnet_cost(m.config, 4).macs


def test_predictor_swaps_policies_without_reloading(tmp_path, model):
    ckpt = save_model(tmp_path / 'm.safetensors', model)
    save_policy(CascadePolicy((1, 4), (0.0,)), policy_path(ckpt))
    predictor = CascadePredictor.from_files(ckpt)
    x = _images(6)
    assert predictor(x).exit_k.tolist() == [1] * 6
    predictor.set_policy(CascadePolicy((2, 4), (NEVER,)))
    out = predictor(x)
    assert out.exit_k.tolist() == [4] * 6 and torch.allclose(out.logits, _per_k(model, x, (4,))[4], atol=1e-6)
    with pytest.raises(ValueError, match='is not a valid subnetwork'):
        CascadePredictor(model, CascadePolicy((2, 5), (0.1,)))


# ------------------------------------------------------------------------------------------ calibration
def _synthetic(n: int = 400, seed: int = 0):
    """k=1 is right and sure on the first half of the images, wrong and unsure on the rest; k=2 always right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    easy = torch.arange(n) < n // 2
    small = torch.zeros(n, 5)
    small[torch.arange(n), labels] = torch.where(easy, 8.0, 0.0)  # sure and right
    small[torch.arange(n), (labels + 1) % 5] += torch.where(easy, 0.0, 0.5)  # unsure and wrong
    large = torch.zeros(n, 5)
    large[torch.arange(n), labels] = 3.0
    perm = torch.randperm(n, generator=g)
    return {1: small[perm], 2: large[perm]}, labels[perm]


def test_max_drop_finds_the_cheap_exact_cascade():
    logits, labels = _synthetic()
    costs = {1: 1.0, 2: 4.0}
    fit = fit_policy(logits, labels, costs, create_goal('max-drop', 0.0))
    # the only way to keep 100 %: easy images exit at k=1, the others go on to k=2: cost 1 + 0.5 * 4 = 3 < 4
    assert fit.policy.ks == (1, 2)
    assert fit.calibration_top1 == pytest.approx(100.0) and fit.calibration_cost == pytest.approx(3.0)
    budget = fit_policy(logits, labels, costs, create_goal('target-gmacs', 1.0))
    assert budget.policy.ks == (1,) and budget.calibration_top1 == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r'no cascade .* meets target-gmacs 0.5 GMACs: the cheapest costs 1'):
        fit_policy(logits, labels, costs, create_goal('target-gmacs', 0.5))
    fixed = fit_policy(logits, labels, costs, create_goal('target-gmacs', 4.0), ks=[1, 2], fixed_stages=True)
    assert fixed.policy.ks == (1, 2)


def test_confidence_bound_makes_max_drop_more_cautious():
    logits, labels = _synthetic(n=200, seed=1)
    # break the k=1 answers of 3 easy images: a 1.5 p.p. drop, within 2 p.p. on average but not at 99 %
    easy = ((logits[1].argmax(-1) == labels) & (logits[1].amax(-1) > 5)).nonzero().flatten()[:3]
    logits[1][easy] = logits[1][easy].roll(1, dims=1)
    costs = {1: 1.0, 2: 4.0}
    plain = fit_policy(logits, labels, costs, create_goal('max-drop', 2.0))
    cautious = fit_policy(logits, labels, costs, create_goal('max-drop', 2.0, confidence=0.99))
    # on average: the cheap cascade (all confident images exit at k=1) is within 2 p.p.
    assert plain.calibration_top1 == pytest.approx(98.5) and plain.calibration_cost == pytest.approx(3.0)
    # the 1.5 p.p. drop has a standard error of ~0.87 p.p.: at 99 % only the largest k alone is safe
    assert cautious.calibration_top1 == pytest.approx(100.0) and cautious.calibration_cost == pytest.approx(4.0)
    assert plain.policy.info['calibration_drop_se'] == pytest.approx(0.86, abs=0.02)


def test_calibration_never_reads_the_reported_split():
    logits, labels = _synthetic(n=600, seed=2)
    costs = {1: 1.0, 2: 4.0}
    macs = {1: 1, 2: 4}
    goal = create_goal('max-drop', 0.5)
    honest = cross_fit(logits, labels, costs, macs, goal, seed=3)
    half_a, half_b = honest.halves
    assert sorted(torch.cat([half_a, half_b]).tolist()) == list(range(600))
    scrambled = labels.clone()
    scrambled[half_b] = labels[half_b][torch.randperm(len(half_b), generator=torch.Generator().manual_seed(9))]
    scrambled[half_b] = (scrambled[half_b] + 1) % 5  # no reported label stays right
    crossed = cross_fit(logits, scrambled, costs, macs, goal, seed=3)
    # the policy fitted on half A is the same: the reported half's labels were never read
    assert (crossed.fit.policy.ks, crossed.fit.policy.thresholds) == (honest.fit.policy.ks,
                                                                      honest.fit.policy.thresholds)
    assert crossed.fit.calibration_top1 == honest.fit.calibration_top1
    # ... while its reported accuracy (on half B) does read them
    assert honest.reported['top1'] > 90 and crossed.reported['top1'] < 60
    direct = evaluate_policy({k: v[half_b] for k, v in logits.items()}, labels[half_b], honest.fit.policy, macs)
    assert direct['top1'] == pytest.approx(honest.reported['top1'])
    assert sum(direct['exit_fractions'].values()) == pytest.approx(1.0)


def test_fit_front_spans_cheap_to_accurate():
    logits, labels = _synthetic(n=300, seed=4)
    fit = fit_policy(logits, labels, {1: 1.0, 2: 4.0}, create_goal('max-drop', 0.0), sweep_points=5)
    scored = [evaluate_policy(logits, labels, p, {1: 1, 2: 4}) for p in fit.front]
    costs = [s['gmacs'] for s in scored]
    assert costs == sorted(costs) and len(scored) >= 2
    accuracy = [s['top1'] for s in scored]
    assert accuracy == sorted(accuracy) and accuracy[-1] == pytest.approx(100.0)
    assert all(p.ks == fit.policy.ks for p in fit.front)


def test_goal_values_are_checked():
    with pytest.raises(ValueError, match='must be a finite number >= 0'):
        create_goal('max-drop', -1)
    with pytest.raises(ValueError, match='unknown calibration goal'):
        create_goal('max-accuracy', 1)
    with pytest.raises(ValueError, match='confidence must be in'):
        create_goal('max-drop', 0.1, confidence=1.0)


def test_replace_keeps_policy_valid():
    policy = CascadePolicy((1, 2), (0.5,))
    assert policy.scaled(0.5).thresholds == (0.25,)
    with pytest.raises(ValueError, match='needs 1 thresholds'):
        replace(policy, thresholds=())


# ------------------------------------------------------------------------------------------ command line, report
class _TensorSet(torch.utils.data.Dataset):
    def __init__(self, x, y, num_classes=10):
        self.x, self.y, self.num_classes = x, y, num_classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.fixture
def run_folder(tmp_path, model, monkeypatch):
    """A checkpoint in a run folder and a small labelled test set the commands read instead of a real one."""
    from hydravit.cli import cascade as cascade_cli, eval as eval_cli
    ckpt = save_model(tmp_path / 'run' / 'model_best.safetensors', model)
    x = _images(64, seed=11)
    with torch.inference_mode():
        labels = model(x, k=4).argmax(-1)  # k=4 is right everywhere: the cascade has something to lose
    data = _TensorSet(x, labels)
    monkeypatch.setattr(cascade_cli, 'load_dataset', lambda *a, **kw: data)
    monkeypatch.setattr(eval_cli, 'build_eval_dataset', lambda model, args, names: data)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ckpt, data
    torch.set_num_threads(previous)


def test_cascade_cli_writes_policy_and_results(run_folder, tmp_path, model):
    from hydravit.cli import main
    ckpt, data = run_folder
    out = tmp_path / 'cascade.json'
    assert main(['cascade', '--checkpoint', str(ckpt.parent), '--ks', '1', '2', '4', '--max-drop', '5',
                 '--results-file', str(out), '--timing-images', '32', '-b', '16', '--rounds', '1',
                 '--latency-images', '4', '--grid', '8']) == 0
    results = json.loads(out.read_text())
    assert set(results) >= {'policy', 'points', 'static', 'calibration', 'summary', 'measurement'}
    policy = load_policy(ckpt)  # saved next to the checkpoint
    assert list(policy.ks) == results['policy']['ks'] and set(policy.ks) <= {1, 2, 4}
    assert [r['k'] for r in results['static']] == [1, 2, 4]
    assert all(r['img_per_s'] > 0 and r['latency_ms'] > 0 for r in results['static'] + results['points'])
    fitted = results['points'][0]
    assert fitted['fitted'] and sum(fitted['exit_fractions'].values()) == pytest.approx(1.0)
    # reported on the half it was not fitted on: recompute from the model on those images
    from hydravit.cascade import split_halves
    half_b = split_halves(64, 0)[1]
    direct = Cascade.from_model(model, policy)(data.x[half_b])
    assert fitted['top1'] == pytest.approx(100.0 * float(direct.logits.argmax(-1).eq(data.y[half_b]).double().mean()))
    assert fitted['gmacs'] == pytest.approx(direct.mean_gmacs)
    assert results['static'][-1]['top1'] == 100.0 and results['calibration']['reported_images'] == 32
    assert fitted['top1'] >= 100.0 - 5 - 25  # loose: 32 calibration images


def test_cascade_cli_rejects_bad_input(run_folder, capsys):
    from hydravit.cli import main
    ckpt, _ = run_folder
    assert main(['cascade', '--checkpoint', str(ckpt), '--target-gmacs', '0', '--no-timing']) == 2
    assert 'no cascade of k [1, 2, 3, 4] meets target-gmacs 0' in capsys.readouterr().err
    assert main(['cascade', '--checkpoint', str(ckpt), '--max-drop', '1', '--ks', '2', '7']) == 2
    assert 'outside 1..4' in capsys.readouterr().err
    assert main(['cascade', '--checkpoint', str(ckpt), '--max-drop', '1', '--rounds', '0']) == 2
    assert '--rounds must be >= 1' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one goal at a time (argparse)
        main(['cascade', '--checkpoint', str(ckpt), '--max-drop', '1', '--target-gmacs', '1'])


@pytest.mark.slow
def test_eval_report_and_report_command_draw_the_cascade(run_folder, tmp_path):
    from hydravit.cli import main
    from hydravit.storage.results import read_results
    ckpt, data = run_folder
    policy = CascadePolicy((1, 4), (0.6,), info={'sweep': [[0.0], [0.9]]})
    save_policy(policy, policy_path(ckpt))
    assert main(['eval', '--checkpoint', str(ckpt), '--workers', '0', '--report', str(tmp_path / 'rep')]) == 0
    text = (tmp_path / 'rep' / 'report.md').read_text()
    assert 'run cascade' in text and 'fitted' in text
    table = text.split('| curve |')[1]
    expected = evaluate_policy(_per_k_all(ckpt, data), data.y, policy, stage_macs(_load(ckpt), (1, 4)))
    assert f'{expected["top1"]:.2f}' in table
    assert (tmp_path / 'rep' / 'accuracy_vs_throughput.png').stat().st_size > 0
    # hydravit report on a cascade results file: its static k and its curve
    results = {'policy': policy.to_dict(),
               'points': [dict(fitted=True, ks=[1, 4], thresholds=[0.6], top1=90.0, gmacs=1e-4, img_per_s=900.0,
                               exit_fractions={'1': 0.5, '4': 0.5})],
               'static': [dict(k=1, top1=80.0, gmacs=5e-5, img_per_s=1000.0),
                          dict(k=4, top1=95.0, gmacs=2e-4, img_per_s=500.0)]}
    (tmp_path / 'cascade.json').write_text(json.dumps(results))
    assert main(['report', str(tmp_path / 'cascade.json'), '-o', str(tmp_path / 'rep2')]) == 0
    rows = read_results(tmp_path / 'rep2' / 'report.csv')
    assert [(r['k'], r['infer_samples_per_sec']) for r in rows] == [(1, 1000.0), (4, 500.0)]
    assert 'cascade cascade | fitted | 1-4 | 90.00' in (tmp_path / 'rep2' / 'report.md').read_text()


def _load(ckpt):
    from hydravit.storage.checkpoint import load_model
    return load_model(ckpt).eval()


def _per_k_all(ckpt, data):
    return _per_k(_load(ckpt), data.x, (1, 4))


def test_plot_accuracy_needs_points_and_draws_curves(tmp_path):
    from hydravit.evaluation.report import plot_accuracy
    static = {'m': [dict(k=1, top1=80.0, gmacs=1.0), dict(k=2, top1=90.0, gmacs=2.0)]}
    plain = plot_accuracy(static, 'gmacs', tmp_path / 'a.png').stat().st_size
    with_curve = plot_accuracy(static, 'gmacs', tmp_path / 'b.png',
                               curves={'cascade': [dict(top1=88.0, gmacs=1.3, label='fitted'),
                                                   dict(top1=89.0, gmacs=1.6)]}).stat().st_size
    assert with_curve != plain
    with pytest.raises(ValueError, match='nothing to plot'):
        plot_accuracy({}, 'gmacs', tmp_path / 'c.png', curves={'cascade': [dict(top1=1.0)]})


# ------------------------------------------------------------------------------------------ under load
@pytest.mark.slow
def test_adaptive_cascade_lowers_thresholds_before_k(model):
    from hydravit.deployment.adaptive import AdaptiveCascadePredictor, cascade_levels
    x = _images(16, seed=4)
    runs = _per_k(model, x, (2,))
    policy = CascadePolicy((2, 4), (float(create_score('max-softmax')(runs[2]).quantile(0.3)),))
    levels = cascade_levels(model, policy, factors=(1.0, 0.5, 0.0))
    assert [lvl.name for lvl in levels] == ['k=1', 'cascade x0', 'cascade x0.5', 'cascade x1']
    assert levels[-1].policy.thresholds == policy.thresholds and levels[1].policy.thresholds == (0.0,)
    # simulated time: each forward costs (load x images x MACs of its k), so a cascade costs what its stages run
    now, load = [0.0], [1.0]
    macs = stage_macs(model, (1, 2, 3, 4))

    def charge(module, args, kwargs, output):
        now[0] += load[0] * args[0].shape[0] * macs[kwargs['k']] * 1e-9

    handle = model.register_forward_hook(charge, with_kwargs=True)
    try:
        predictor = AdaptiveCascadePredictor(model, policy, target_ms=1.0, factors=(1.0, 0.5, 0.0),
                                             clock=lambda: now[0], up_patience=2, probe_every=0)
        base = predictor.calibrate(x, repeats=1)
        assert base[1] < base[2] < base[4]  # k=1 < k=2 alone < ... < the full cascade
        predictor.target_ms = base[4] / 0.7 * 1.05
        predictor.calibrate(x, repeats=1)
        served = [predictor(x).level.name for _ in range(3)]
        assert served == ['cascade x1'] * 3
        load[0] = 1.6  # the full cascade no longer fits; thresholds go down, k stays
        served = [predictor(x).level for _ in range(4)]
        assert served[-1].policy is not None and served[-1].threshold_factor < 1
        assert all(lvl.k is None for lvl in served)
        load[0] = 50.0  # nothing but the smallest k fits
        served = [predictor(x).level for _ in range(3)]
        assert served[-1].name == 'k=1'
        out = predictor(x)
        assert out.exit_k.tolist() == [1] * 16 and torch.allclose(out.logits, model(x, k=1), atol=1e-6)
        load[0] = 1.0
        served = [predictor(x).level.name for _ in range(20)]
        assert served[-1] == 'cascade x1'
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_exported_cascade_runs_in_onnxruntime_like_pytorch(tmp_path, model):
    pytest.importorskip('onnxruntime')
    from hydravit.deployment.cascade_runtime import OnnxCascade
    from hydravit.deployment.export import ExportError, export_cascade
    ckpt = save_model(tmp_path / 'm.safetensors', model)
    x = _images(20, seed=6)
    runs = _per_k(model, x, (2,))
    scores = create_score('margin')(runs[2]).sort().values  # threshold between two images' scores, so
    policy = CascadePolicy((2, 4), (float(scores[9:11].mean()),), 'margin')  # float noise cannot flip one
    from hydravit.cli import main
    save_policy(policy, policy_path(ckpt))
    assert main(['export', '--checkpoint', str(ckpt), '--k', '2', '--format', 'safetensors', '--output',
                 str(tmp_path / 'exp'), '--cascade', 'auto']) == 0
    manifest = json.loads((tmp_path / 'exp' / 'cascade' / 'cascade.json').read_text())
    assert [s['onnx'] for s in manifest['stages']] == ['k2.onnx', 'k4.onnx']
    assert CascadePolicy.from_dict(manifest['policy']) == policy
    runtime = OnnxCascade(tmp_path / 'exp' / 'cascade')
    got, expected = runtime(x.numpy()), Cascade.from_model(model, policy)(x)
    assert torch.equal(got.exit_k, expected.exit_k) and len(set(got.exit_k.tolist())) == 2
    assert torch.allclose(got.logits, expected.logits, atol=1e-4)
    assert got.macs.tolist() == expected.macs.tolist()
    (tmp_path / 'exp' / 'cascade' / 'k4.onnx').write_bytes(b'changed')
    with pytest.raises(ExportError, match='checksum differs'):
        OnnxCascade(tmp_path / 'exp' / 'cascade')
    with pytest.raises(ExportError, match='already exists'):
        export_cascade(ckpt, policy, tmp_path / 'exp' / 'cascade')
