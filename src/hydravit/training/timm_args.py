"""timm ``train.py`` argument files (its ``args.yaml``, the official HydraViT ``args_hydravit.yaml``) as recipes.

Keys that name a :class:`TrainConfig` setting are used as they are (timm's empty strings read as "not set").
The official HydraViT code's own keys are renamed (``weights`` -> ``head_weights``) or dropped (``drop_p`` is
parsed there but never used). Every other timm key is either inert here at the value given (listed once in
the log: it would not change a run) or refused: a value we would otherwise ignore silently is an error
that names the key.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Tuple

from ..storage.checkpoint import OFFICIAL_MODELS

__all__ = ['OFFICIAL_FLAGS', 'official_model_name', 'translate_timm_args']

logger = logging.getLogger(__name__)

# the official HydraViT code's names -> ours (None: no counterpart needed; the reason is the message)
OFFICIAL_FLAGS: Dict[str, Tuple[str | None, str]] = {
    'weights': ('head_weights', 'one sampling weight per k of --heads (integer percentages work: weights are '
                'normalised)'),
    'drop_p': (None, 'parsed but never used by the official HydraViT code'),
}
EMPTY_MEANS_UNSET = ('experiment', 'initial_checkpoint', 'resume', 'data_dir', 'train_interpolation')


def _is(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v in neutral


def _falsy(v: Any) -> bool:
    return v in (None, False, 0, 0.0, '', {}, [])


# timm keys without a setting here: (is the value inert?, why it does not change a run / what is missing)
INERT: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    'amp_impl': (_is('native'), 'torch.autocast is the only AMP implementation'),
    'aug_repeats': (_falsy, 'repeated augmentation is not implemented'),
    'aug_splits': (_falsy, 'augmentation splits (AugMix/JSD) are not implemented'),
    'bce_loss': (_falsy, 'BCE loss is not implemented'),
    'bce_pos_weight': (_falsy, 'only with bce_loss'),
    'bce_sum': (_falsy, 'only with bce_loss'),
    'bce_target_thresh': (_falsy, 'only with bce_loss'),
    'bn_eps': (_falsy, 'a ViT has no BatchNorm'),
    'bn_momentum': (_falsy, 'a ViT has no BatchNorm'),
    'channels_last': (_falsy, 'channels_last memory format is not implemented'),
    'checkpoint_hist': (lambda v: True, 'no checkpoint-N files are kept: last and model_best only'),
    'class_map': (_falsy, 'give class names through the data set'),
    'color_jitter_prob': (_falsy, 'colour jitter applies to every image'),
    'crop_pct': (_falsy, "the model's pretrained_cfg sets the evaluation crop"),
    'cutmix_minmax': (_falsy, 'cutmix boxes follow the cutmix alpha only'),
    'dataset_download': (_falsy, 'nothing is downloaded at run time'),
    'dist_bn': (lambda v: True, 'a ViT has no BatchNorm statistics to distribute'),
    'drop_block': (_falsy, 'a ViT has no DropBlock'),
    'drop_connect': (_falsy, 'deprecated timm alias of drop_path'),
    'epoch_repeats': (_falsy, 'epoch repeats are not implemented'),
    'fast_norm': (_falsy, 'timm fast-norm is not used'),
    'fuser': (_falsy, 'TorchScript fusers are not used'),
    'gaussian_blur_prob': (_falsy, 'gaussian blur is not implemented'),
    'gp': (_falsy, "the model's global_pool is used"),
    'grayscale_prob': (_falsy, 'random grayscale is not implemented'),
    'head_init_bias': (_falsy, 'the classifier keeps timm ViT init'),
    'head_init_scale': (_falsy, 'the classifier keeps timm ViT init'),
    'in_chans': (_falsy, "the model's in_chans is used"),
    'input_img_mode': (_falsy, "images are converted to the model's channel count"),
    'input_key': (_falsy, 'only for hfds/wds data sets with other column names'),
    'input_size': (_falsy, 'use img_size'),
    'interpolation': (_falsy, "the model's pretrained_cfg sets the evaluation interpolation"),
    'jsd_loss': (_falsy, 'JSD loss is not implemented'),
    'layer_decay': (_falsy, 'layer-wise lr decay is not implemented'),
    'local_rank': (lambda v: True, 'torchrun sets LOCAL_RANK'),
    'log_wandb': (_falsy, 'no wandb logging'),
    'lr_cycle_decay': (lambda v: True, 'only with lr_cycle_limit > 1'),
    'lr_cycle_limit': (_is(1), 'restarts of the schedule are not implemented'),
    'lr_cycle_mul': (_is(1.0, 1), 'only with lr_cycle_limit > 1'),
    'lr_k_decay': (_is(1.0, 1), 'k-decay of the schedule is not implemented'),
    'lr_noise': (_falsy, 'lr noise is not implemented'),
    'lr_noise_pct': (lambda v: True, 'only with lr_noise'),
    'lr_noise_std': (lambda v: True, 'only with lr_noise'),
    'mean': (_falsy, "the model's pretrained_cfg sets the normalisation"),
    'std': (_falsy, "the model's pretrained_cfg sets the normalisation"),
    'mixup_off_epoch': (_falsy, 'mixup stays on for the whole run'),
    'model_ema_force_cpu': (_falsy, 'the EMA lives on the training device'),
    'model_kwargs': (_falsy, 'give model settings through the recipe keys'),
    'no_ddp_bb': (lambda v: True, 'a ViT has no buffers to broadcast'),
    'no_prefetcher': (lambda v: True, 'no CUDA prefetcher: the loader feeds the model directly'),
    'no_resume_opt': (_falsy, 'a resume always restores the optimizer'),
    'opt_kwargs': (_falsy, 'use opt_eps / opt_betas'),
    'patience_epochs': (lambda v: True, 'only for the plateau schedule'),
    'pin_mem': (lambda v: True, 'pinned memory changes speed only'),
    'pretrained': (_falsy, 'use initial_checkpoint (a timm model name with a pretrained tag works)'),
    'pretrained_path': (_falsy, 'use initial_checkpoint'),
    'recount': (_is(1), 'one random-erasing region per image'),
    'recovery_interval': (_falsy, 'use checkpoint_interval_steps'),
    'resplit': (_falsy, 'only with aug_splits'),
    'save_images': (_falsy, 'images are not saved'),
    'sched_on_updates': (lambda v: True, 'the schedule is always stepped per optimizer update (timm '
                         'step_update), the smooth form of the per-epoch curve'),
    'split_bn': (_falsy, 'a ViT has no BatchNorm'),
    'start_epoch': (_falsy, 'use resume'),
    'sync_bn': (_falsy, 'a ViT has no BatchNorm'),
    'synchronize_step': (lambda v: True, 'changes timing only'),
    'target_key': (_falsy, 'only for hfds/wds data sets with other column names'),
    'torchcompile': (_falsy, 'torch.compile is not a recipe setting here'),
    'torchscript': (_falsy, 'TorchScript training is not implemented'),
    'train_num_samples': (_falsy, 'only for iterable data sets; use max_train_samples for a subset'),
    'val_num_samples': (_falsy, 'only for iterable data sets; use max_val_samples for a subset'),
    'train_split': (_is('train'), 'the split folder is found as train/ under data_dir'),
    'val_split': (_is('validation', 'val'), 'the split folder is found as val/ or validation/ under data_dir'),
    'tta': (_falsy, 'test-time augmentation is not implemented'),
    'use_multi_epochs_loader': (lambda v: True, 'changes loader start-up time only'),
    'warmup_prefix': (_falsy, 'the warm-up is part of the cosine schedule (timm default)'),
    'worker_seeding': (lambda v: True, 'augmentation is seeded per sample from (seed, epoch, index), so it does '
                       'not depend on the workers'),
    'decay_epochs': (lambda v: True, 'only for the step schedule, which is refused below'),
    'decay_milestones': (lambda v: True, 'only for the multistep schedule, which is refused below'),
    'decay_rate': (lambda v: True, 'only for step, multistep and plateau schedules, which are refused below'),
}
SCHEDULES_WITHOUT_DECAY_SETTINGS = ('cosine', 'tanh', 'poly')


def translate_timm_args(recipe: Mapping[str, Any], known: set, source: str) -> Dict[str, Any]:
    """The recipe's settings with timm train.py / official HydraViT keys mapped onto ``known`` setting names.

    Raises ``ValueError`` naming every key whose value would change a run but has no setting here.
    """
    out: Dict[str, Any] = {}
    inert: List[str] = []
    refused: List[str] = []
    for key, value in recipe.items():
        if key in OFFICIAL_FLAGS:
            target, why = OFFICIAL_FLAGS[key]
            if target is None:
                inert.append(f'{key} ({why})')
            else:
                out[target] = value
        elif key in known:
            out[key] = None if key in EMPTY_MEANS_UNSET and value == '' else value
        elif key in INERT:
            is_inert, why = INERT[key]
            (inert if is_inert(value) else refused).append(f'{key}={value!r} ({why})')
        else:
            out[key] = value  # the caller names unknown keys together with the valid ones
    if out.get('head_weights') is not None and 'weights' in recipe and 'sampler' not in recipe:
        out['sampler'] = 'weighted'  # the official code samples by weight whenever weights are given
    if out.get('dataset') == '':
        out['dataset'] = 'folder'  # timm's default reader
    if out.get('eval_metric') in ('top1', 'top5'):
        out['eval_metric'] = f'{out["eval_metric"]}_mean'  # one model there, every k here: the mean over k
    sched = out.get('sched')
    if sched is not None and sched not in SCHEDULES_WITHOUT_DECAY_SETTINGS:
        decay = [k for k in ('decay_epochs', 'decay_milestones', 'decay_rate') if k in recipe]
        if decay:
            refused.append(f'sched={sched!r} with {", ".join(decay)} (the decay settings are not passed on)')
    if refused:
        raise ValueError(f'{source}: these timm train.py settings would change the run but have no effect here: '
                         + '; '.join(refused))
    if inert:
        logger.info('%s: %d timm train.py setting(s) have no effect here: %s', source, len(inert), '; '.join(inert))
    return out


def official_model_name(name: str) -> str:
    """Our name for a model name of the official HydraViT code (``hydravit_dyn_patch16_224``), else ``name``."""
    if name in OFFICIAL_MODELS:
        logger.info("model %s (the official code's name) is %s here", name, OFFICIAL_MODELS[name])
        return OFFICIAL_MODELS[name]
    return name
