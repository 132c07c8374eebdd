"""Accuracy of every subnetwork k of one universal model: top-1, top-5 and loss per k.

The same rows serve the trainer (validation each epoch), ``hydravit eval`` and the report, so their
keys follow timm's ``validate.py`` (``top1``, ``top1_err``, ``top5``, ``top5_err``; percentages).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data.datasets import LoadedDataset, load_dataset
from ..data.transforms import build_transform
from ..models.compiled import CompileOptions, compile_module, compile_universal
from ..models.costs import add_costs
from ..models.factory import UniversalModel
from ..models.kchoices import check_k_choices
from ..models.subnet import extract_subnet
from ..storage.checkpoint import load_model
from ..storage.run_folder import preprocessing_config

__all__ = ['evaluate_subnets', 'label_map', 'load_for_eval', 'eval_dataset', 'evaluate_dataset', 'scored_classes',
           'EVAL_MODES']

EVAL_MODES = ('sliced', 'extracted')
Mode = Literal['sliced', 'extracted']
# wraps an iterable of batches to show progress: progress(batches, total=..., desc=...) yields them unchanged
Progress = Callable[..., Iterable[Any]]


@dataclass
class _Tally:
    """Running sums for one k; percentages only at the end so batches of any size weigh correctly."""
    correct1: int = 0
    correct5: int = 0
    loss_sum: float = 0.0
    count: int = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(target[:, None])
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(dim=1).sum())
        self.loss_sum += float(F.cross_entropy(logits, target, reduction='sum'))
        self.count += target.shape[0]

    def row(self, k: int) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError('the evaluation loader yielded no samples')
        top1, top5 = 100.0 * self.correct1 / self.count, 100.0 * self.correct5 / self.count
        return dict(k=k, top1=top1, top1_err=100.0 - top1, top5=top5, top5_err=100.0 - top5,
                    loss=self.loss_sum / self.count, num_samples=self.count)


def label_map(class_indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """Full-class label -> position in ``class_indices`` (-1 where absent), for logits restricted to them."""
    indices = [int(i) for i in class_indices]
    bad = [i for i in indices if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f'class_indices {bad[:5]} outside 0..{num_classes - 1} (the model has {num_classes} classes)')
    if len(set(indices)) != len(indices):
        raise ValueError('class_indices contains duplicates')
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.tensor(indices, dtype=torch.long)] = torch.arange(len(indices))
    return mapping


def _subnet_fns(model: UniversalModel, ks: Sequence[int], mode: Mode) -> Iterable[tuple]:
    """(k, forward function) pairs; extracted subnets are built one at a time to bound memory."""
    for k in ks:
        if mode == 'extracted':
            yield k, extract_subnet(model, k)
        else:
            yield k, (lambda x, k=k: model(x, k=k))


def _batches(loader: Iterable, device: torch.device, mapping: Optional[torch.Tensor],
             num_classes: int) -> Iterable[tuple]:
    for batch in loader:
        images, target = batch[0], batch[1]
        images, target = images.to(device, non_blocking=True), torch.as_tensor(target).to(device)
        if bool((target < 0).any() or (target >= num_classes).any()):
            raise ValueError(f'labels must be class indices in 0..{num_classes - 1} (the model has {num_classes} '
                             f'classes), got {int(target.min())}..{int(target.max())}')
        if mapping is not None:
            target = mapping[target]
            if bool((target < 0).any()):
                raise ValueError('a label is not among class_indices: the dataset holds classes the '
                                 'restricted evaluation does not score')
        yield images, target


def evaluate_subnets(
        model: UniversalModel,
        loader: Iterable,
        ks: Optional[Sequence[int]] = None,
        *,
        device: str | torch.device = 'cpu',
        amp_dtype: Optional[torch.dtype] = None,
        class_indices: Optional[Sequence[int]] = None,
        mode: Mode = 'sliced',
        progress: Optional[Progress] = None,
        forward: Optional[Callable[..., torch.Tensor]] = None,
        compile_options: Optional[CompileOptions] = None,
) -> List[Dict[str, float]]:
    """One row per k: ``k, top1, top1_err, top5, top5_err, loss, num_samples`` (percentages).

    ``mode='extracted'`` scores the standalone timm ViT of each k instead of the sliced model (they
    agree; this is the check). ``class_indices`` restricts the logits to those classes (ImageNet-R/-A
    style test sets); labels stay indices into the full class list. With fewer than 5 classes "top5"
    is top-C. Sliced mode reads the loader once for all k. ``progress`` wraps each pass over the loader
    (e.g. a tqdm bar). ``forward(images, k=k)`` replaces
    ``model(images, k=k)`` in sliced mode (a :class:`hydravit.models.compiled.PerKCompiled` of ``model``);
    ``compile_options`` compiles the sliced model (one graph per k) or each extracted subnet.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f'mode must be one of {EVAL_MODES}, got {mode!r}')
    ks = model.resolve_ks(ks)
    if not ks:
        raise ValueError('no k to evaluate')
    device = torch.device(device)
    mapping = columns = None
    if class_indices is not None:
        mapping = label_map(class_indices, model.num_classes).to(device)
        columns = torch.as_tensor(list(class_indices), dtype=torch.long, device=device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    total = len(loader) if hasattr(loader, '__len__') else None  # type: ignore[arg-type]

    def passes(desc: str) -> Iterable[tuple]:
        batches = _batches(loader, device, mapping, model.num_classes)
        return progress(batches, total=total, desc=desc) if progress is not None else batches

    try:
        with torch.inference_mode(), autocast:
            if mode == 'sliced':
                tallies = {k: _Tally() for k in ks}
                run = forward or model
                if forward is None and compile_options is not None:
                    run = compile_universal(model, compile_options, pad_batches=True)
                for images, target in passes(f'eval k={ks}'):
                    for k in ks:
                        tallies[k].update(_restrict(run(images, k=k), columns), target)
                return [tallies[k].row(k) for k in ks]
            rows = []
            for k, net in _subnet_fns(model, ks, mode):
                net = compile_module(net, compile_options) if compile_options else net
                tally = _Tally()
                for images, target in passes(f'eval k={k} (extracted)'):
                    tally.update(_restrict(net(images), columns), target)
                rows.append(tally.row(k))
                del net
            return rows
    finally:
        model.train(was_training)


def _restrict(logits: torch.Tensor, columns: Optional[torch.Tensor]) -> torch.Tensor:
    return logits if columns is None else logits.index_select(1, columns)


def load_for_eval(path: str | os.PathLike, ks: Optional[Sequence[int]] = None, model_name: Optional[str] = None,
                  use_ema: Optional[bool] = None) -> Tuple[UniversalModel, List[int]]:
    """Model of a checkpoint, with its training preprocessing as ``pretrained_cfg``, and the k to evaluate.

    ks default to the trained ones. A k outside the trained set but within 1..H is evaluated with a
    warning (the model is rebuilt with every k allowed); beyond H it is an error. The preprocessing
    comes from :func:`hydravit.storage.run_folder.preprocessing_config` (``model_name`` settles ambiguous cases).
    """
    model, ks = _load_with_ks(path, ks, model_name, use_ema)
    # a plain dict attribute, as timm's builder sets it; torch's stubs type Module attributes as Tensor | Module
    model.pretrained_cfg = preprocessing_config(path, model, model_name)  # type: ignore[assignment]
    return model, ks


def _load_with_ks(path: str | os.PathLike, ks: Optional[Sequence[int]], model_name: Optional[str],
                  use_ema: Optional[bool]) -> Tuple[UniversalModel, List[int]]:
    model = load_model(path, model_name=model_name, use_ema=use_ema)
    h = model.config.num_heads
    ks = list(model.k_choices) if not ks else list(check_k_choices(ks, h, what=f'k (trained: {list(model.k_choices)})'))
    untrained = [k for k in ks if k not in model.k_choices]
    if untrained:
        if model.config.trained_k_only:
            raise ValueError(f'k {untrained} has no weights of its own: this model has a classifier (or a whole '
                             f'ViT) per trained k {list(model.k_choices)}')
        warnings.warn(f'k {untrained} not in the trained set {list(model.k_choices)}: evaluating anyway', stacklevel=3)
        model = load_model(path, model_name=model_name, use_ema=use_ema, k_choices=tuple(range(1, h + 1)))
    return model, ks


def eval_dataset(model: UniversalModel, name: str, data_dir: Optional[str] = None, split: str = 'val', *,
                 max_samples: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 class_map: Optional[str] = None) -> LoadedDataset:
    """One split of a data set through the model's eval transform (its ``pretrained_cfg``, via timm's
    ``resolve_data_config``): what ``hydravit eval`` scores, and the trainer's validation too."""
    from timm.data import resolve_data_config

    transform = build_transform(resolve_data_config({}, model=model), is_training=False)
    return load_dataset(name, data_dir, split=split, transform=transform, max_samples=max_samples,
                        num_classes=model.num_classes, class_names=class_names, class_map=class_map)


def scored_classes(dataset: object, num_classes: int) -> List[int]:
    """The classes a data set is scored on: its ``class_indices`` (labels present), else all ``num_classes``.

    The trainer's validation and ``hydravit eval`` both score through this, so a validation set holding a
    subset of the training classes gets the same numbers from both. A data set whose ``num_classes``
    differs from the model's is an error.
    """
    own = getattr(dataset, 'num_classes', None)
    if own is not None and own != num_classes:
        raise ValueError(f'the data set has {own} classes but the model was trained on '
                         f'{num_classes}: use the matching data set or a class map')
    return sorted(int(i) for i in (getattr(dataset, 'class_indices', None) or range(num_classes)))


def evaluate_dataset(model: UniversalModel, dataset, ks: Optional[Sequence[int]] = None, *, batch_size: int = 256,
                     workers: int = 0, device: str | torch.device = 'cpu', amp_dtype: Optional[torch.dtype] = None,
                     mode: Mode = 'sliced', progress: Optional[Progress] = None,
                     compile_options: Optional[CompileOptions] = None) -> List[Dict]:
    """:func:`evaluate_subnets` on a data set, with timm's validate.py columns and per-k costs.

    A data set whose ``class_indices`` (labels present) are a strict subset of the model's classes
    (ImageNet-R/-A style) is scored with logits restricted to them; one whose ``num_classes`` differs
    from the model's is an error.
    """
    from timm.data import resolve_data_config

    present = scored_classes(dataset, model.num_classes)
    class_indices = present if len(present) < model.num_classes else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    rows = evaluate_subnets(model.to(device), loader, ks, device=device, amp_dtype=amp_dtype,
                            class_indices=class_indices, mode=mode, progress=progress,
                            compile_options=compile_options)
    data_config = resolve_data_config({}, model=model)
    return add_costs(rows, model.config, img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                     interpolation=data_config['interpolation'], mode=mode, num_classes_scored=len(present))
