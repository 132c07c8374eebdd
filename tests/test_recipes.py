"""Recipes: the built-in one only for the built-in run, timm train.py's defaults for every other, the paper's by name,
the official HydraViT args_hydravit.yaml mapped; no prefix matching; the official flags name ours."""
import re

import pytest
import yaml

from hydravit.cli import build_parser, main as cli_main
from hydravit.cli.train import config_from_args
from hydravit.training import load_train_config
from hydravit.training.config import effective_lr

# the official HydraViT repository's args_hydravit.yaml (timm train.py keys plus its own), as published
OFFICIAL_YAML = {
    'aa': 'rand-m9-mstd0.5-inc1', 'amp': False, 'amp_dtype': 'float16', 'amp_impl': 'native', 'aug_repeats': 0,
    'aug_splits': 0, 'batch_size': 512, 'bce_loss': False, 'bce_pos_weight': None, 'bce_sum': False,
    'bce_target_thresh': None, 'bn_eps': None, 'bn_momentum': None, 'channels_last': False, 'checkpoint_hist': 10,
    'class_map': '', 'clip_grad': None, 'clip_mode': 'norm', 'color_jitter': 0.3, 'color_jitter_prob': None,
    'cooldown_epochs': 10, 'crop_pct': None, 'cutmix': 1.0, 'cutmix_minmax': None, 'data_dir': None, 'dataset': '',
    'dataset_download': False, 'decay_epochs': 30, 'decay_milestones': [90, 180, 270], 'decay_rate': 0.1,
    'dist_bn': 'reduce', 'drop': 0.0, 'drop_block': None, 'drop_connect': None, 'drop_path': 0.1,
    'epoch_repeats': 0.0, 'eval_metric': 'top1', 'experiment': '', 'fast_norm': False, 'fuser': '',
    'gaussian_blur_prob': None, 'gp': None, 'grad_accum_steps': 1, 'grad_checkpointing': False,
    'grayscale_prob': None, 'head_init_bias': None, 'head_init_scale': None, 'hflip': 0.5, 'img_size': None,
    'in_chans': None, 'initial_checkpoint': '', 'input_img_mode': None, 'input_key': None, 'input_size': None,
    'interpolation': '', 'jsd_loss': False, 'layer_decay': None, 'local_rank': 0, 'log_interval': 50,
    'log_wandb': False, 'lr': None, 'lr_base': 0.0005, 'lr_base_scale': 'linear', 'lr_base_size': 512,
    'lr_cycle_decay': 0.5, 'lr_cycle_limit': 1, 'lr_cycle_mul': 1.0, 'lr_k_decay': 1.0, 'lr_noise': None,
    'lr_noise_pct': 0.67, 'lr_noise_std': 1.0, 'mean': None, 'min_lr': 1.0e-05, 'mixup': 0.8, 'mixup_mode': 'batch',
    'mixup_off_epoch': 0, 'mixup_prob': 1.0, 'mixup_switch_prob': 0.5, 'model_ema': True, 'model_ema_decay': 0.99996,
    'model_ema_force_cpu': False, 'model_kwargs': {}, 'momentum': 0.9, 'no_aug': False, 'no_ddp_bb': False,
    'no_prefetcher': False, 'no_resume_opt': False, 'num_classes': None, 'opt': 'adamw', 'opt_betas': None,
    'opt_eps': 1.0e-08, 'opt_kwargs': {}, 'patience_epochs': 10, 'pin_mem': False, 'pretrained_path': None,
    'ratio': [0.75, 1.3333333333333333], 'recount': 1, 'recovery_interval': 0, 'remode': 'pixel', 'reprob': 0.25,
    'resplit': False, 'resume': '', 'save_images': False, 'scale': [0.08, 1.0], 'sched': 'cosine',
    'sched_on_updates': False, 'seed': 42, 'smoothing': 0.1, 'split_bn': False, 'start_epoch': None, 'std': None,
    'sync_bn': False, 'synchronize_step': False, 'target_key': None, 'torchcompile': None, 'torchscript': False,
    'train_interpolation': 'bicubic', 'train_num_samples': None, 'train_split': 'train', 'tta': 0,
    'use_multi_epochs_loader': False, 'val_num_samples': None, 'val_split': 'validation',
    'validation_batch_size': None, 'vflip': 0.0, 'warmup_epochs': 5, 'warmup_lr': 1.0e-06, 'warmup_prefix': False,
    'weight_decay': 0.05, 'worker_seeding': 'all', 'workers': 32,
}


def parse(*argv):
    return config_from_args(build_parser().parse_args(['train', *argv]))


def test_only_the_builtin_run_gets_the_builtin_recipe():
    builtin = parse()
    assert (builtin.sampler, builtin.lr, builtin.no_aug) == ('sandwich', 0.003, True)
    assert parse('--dataset', 'fashion-mnist', '--epochs', '1').sampler == 'sandwich'  # still the built-in run
    other = parse('--model', 'hydravit_base_patch16_224', '--dataset', 'imagefolder', '--data-dir', '/data')
    # timm train.py's defaults: SGD, lr 0.1 per 256 images, weight decay 2e-5, colour jitter 0.4, smoothing 0.1
    assert (other.opt, other.lr, other.lr_base, other.lr_base_size, other.weight_decay) == ('sgd', None, 0.1, 256, 2e-5)
    assert (other.color_jitter, other.smoothing, other.no_aug, other.sampler) == (0.4, 0.1, False, 'uniform')
    assert effective_lr(other) == pytest.approx(0.1 * 128 / 256)
    assert parse('--config', 'fmnist', '--model', 'hydravit_test_patch4_16').sampler == 'sandwich'


def test_paper_recipe_by_name():
    cfg = parse('--config', 'hydravit-paper', '--data-dir', '/data/imagenet')
    assert (cfg.model, cfg.opt, cfg.weight_decay, cfg.drop_path, cfg.mixup, cfg.cutmix) == (
        'hydravit_base_patch16_224', 'adamw', 0.05, 0.1, 0.8, 1.0)
    assert (cfg.aa, cfg.reprob, cfg.color_jitter, cfg.smoothing) == ('rand-m9-mstd0.5-inc1', 0.25, 0.3, 0.1)
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr) == (
        True, 0.99996, 300, 5, 1e-6)
    assert (cfg.min_lr, cfg.cooldown_epochs, cfg.sampler, cfg.heads) == (1e-5, 10, 'uniform', list(range(3, 13)))
    assert effective_lr(cfg, world_size=2) == pytest.approx(5e-4 * 1024 / 512)  # the paper's 2 x 512
    with pytest.raises(FileNotFoundError, match=r'--config: hydravit-papr does not exist .*named recipes fmnist, '
                                                r'timm, hydravit-paper'):
        parse('--config', 'hydravit-papr')


def test_official_args_yaml_is_mapped_and_inert_keys_are_listed(tmp_path, caplog):
    path = tmp_path / 'args_hydravit.yaml'
    path.write_text(yaml.safe_dump(OFFICIAL_YAML))
    with caplog.at_level('INFO', logger='hydravit'):
        cfg = parse('--config', str(path), '--model', 'hydravit_dyn_patch16_224', '--heads', '3', '6', '12')
    assert (cfg.model, cfg.dataset, cfg.batch_size, cfg.opt_eps, cfg.lr_base_size) == (
        'hydravit_base_patch16_224', 'folder', 512, 1e-8, 512)
    assert (cfg.train_interpolation, cfg.eval_metric, cfg.experiment, cfg.initial_checkpoint) == (
        'bicubic', 'top1_mean', None, None)
    assert (cfg.mixup, cfg.model_ema_decay, cfg.workers, cfg.heads) == (0.8, 0.99996, 32, [3, 6, 12])
    assert re.search(r'args_hydravit\.yaml: \d+ timm train\.py setting\(s\) have no effect here: .*amp_impl',
                     caplog.text)
    official = {**OFFICIAL_YAML, 'weights': [10, 20, 70], 'heads': [3, 6, 12], 'drop_p': 1}
    path.write_text(yaml.safe_dump(official))
    cfg = load_train_config(path)
    assert (cfg.sampler, cfg.head_weights, cfg.heads) == ('weighted', [10, 20, 70], [3, 6, 12])


@pytest.mark.parametrize('key, value, message', [
    ('layer_decay', 0.65, r'layer_decay=0\.65 \(layer-wise lr decay is not implemented\)'),
    ('aug_repeats', 3, r'aug_repeats=3'),
    ('sched', 'step', r"sched='step' with decay_epochs, decay_milestones, decay_rate"),
])
def test_official_yaml_settings_that_would_change_the_run_are_refused(tmp_path, key, value, message):
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump({**OFFICIAL_YAML, key: value}))
    with pytest.raises(ValueError, match=r'would change the run but have no effect here: .*' + message):
        load_train_config(path)


@pytest.mark.parametrize('argv, message', [
    (['--drop-p', '1'], r'--drop-p is parsed but never used by the official HydraViT code: leave it out'),
    (['--weights', '10', '90'], r'--weights is the official HydraViT flag; here it is --head-weights'),
    (['--drop-pa', '0.1'], r'unrecognized arguments: --drop-pa 0\.1'),  # no prefix matching to --drop-path
    (['--epoch', '3'], r'unrecognized arguments: --epoch 3'),
])
def test_official_and_abbreviated_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(['train', *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_subcommand_refuses_abbreviations(capsys):
    for argv in (['eval', '--checkp', 'x'], ['export', '--check', 'x'], ['info', '--mod', 'x']):
        with pytest.raises(SystemExit):
            cli_main(argv)
        err = capsys.readouterr().err  # the abbreviation is not taken for the flag it starts
        assert re.search(r'unrecognized arguments: ' + argv[1] + '|arguments are required: --checkpoint', err), argv


def test_official_drop_is_timm_dropout_not_drop_path():
    cfg = parse('--model', 'hydravit_test_patch4_16', '--drop', '0.1')
    assert (cfg.drop, cfg.drop_path) == (0.1, 0.0)


def test_a_recipes_full_width_phase_keeps_its_share_of_other_epochs_and_leaves_methods_without_one(tmp_path):
    recipe = tmp_path / 'phased.yaml'
    recipe.write_text('epochs: 10\nfull_width_epochs: 5\nsampler: sandwich\n')
    assert load_train_config(recipe).full_width_epochs == 5
    assert load_train_config(recipe, epochs=4).full_width_epochs == 2
    assert load_train_config(recipe, epochs=3).full_width_epochs == 1  # rounded down: never the whole run
    assert load_train_config(recipe, epochs=1).full_width_epochs == 0
    assert load_train_config(recipe, epochs=4, full_width_epochs=3).full_width_epochs == 3  # as given
    dynabert = load_train_config(recipe, method='dynabert', epochs=8)
    assert (dynabert.full_width_epochs, dynabert.teacher_epochs) == (0, 4)  # its teacher phase is the recipe's
    assert load_train_config(recipe, method='dynabert', teacher_epochs=1).teacher_epochs == 1
    assert load_train_config(recipe, method='separate').full_width_epochs == 0
    assert load_train_config(recipe, method='sortednet').full_width_epochs == 5
    with pytest.raises(ValueError, match=r'full_width_epochs must be in 0\.\.3'):
        load_train_config(recipe, epochs=4, full_width_epochs=4)
