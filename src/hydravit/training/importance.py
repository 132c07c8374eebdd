"""DynaBERT's importance-based reordering (Hou et al. 2020, after Michel et al. 2019) for HydraViT.

Subnetwork k uses the *first* k heads, residual channels and MLP neurons, so before width-adaptive
training the most important units should come first. A unit's importance is |dL/dm| for a mask m = 1
multiplying its output, summed over batches (abs taken per batch). Every such mask derivative follows
from parameter gradients alone: for ``y = W x + b`` a mask on input channel c has gradient
``sum_i W[i, c] * dL/dW[i, c]``, and for a LayerNorm output channel c it is
``gamma_c * dL/dgamma_c + beta_c * dL/dbeta_c``. So no hooks and no change to the model are needed.

The reordering itself is a pure state-dict transform (:func:`permute_state_dict`, in the style of timm's
checkpoint filters) that leaves the full-width network's function exactly unchanged; only the
subnetworks (which see a different prefix of units) change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn

from ..models.hydravit import HydraViT
from ..models.layers import SlicedBlock
from ..models.subnet import parameter_axes, qkv_blocks

__all__ = [
    'Importance', 'Permutation', 'importance_from_gradients', 'measure_importance', 'permutation_from_importance',
    'head_rows', 'permute_tensor', 'permute_state_dict', 'reorder_model', 'permute_optimizer_state',
    'reorder_by_importance',
]

StateDict = Dict[str, torch.Tensor]
Batch = Tuple[torch.Tensor, torch.Tensor]

_SEPARATE_HEADS = ('importance reordering does not support separate per-k classifiers (heads.<k>.*): '
                   'each would need its own input permutation; build the model with separate_heads=False')
_BLOCK = re.compile(r'blocks\.(\d+)\.')


# ------------------------------------------------------------------------------------------- importance
@dataclass
class Importance:
    """Accumulated importance scores (float64, CPU); larger means removing the unit hurts the loss more."""
    heads: torch.Tensor     # (depth, num_heads)
    neurons: torch.Tensor   # (depth, mlp_hidden)
    channels: torch.Tensor  # (embed_dim,)

    def __add__(self, other: Importance) -> Importance:
        return Importance(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _check_model(model: nn.Module) -> HydraViT:
    if not isinstance(model, HydraViT):
        raise TypeError(f'importance reordering needs a HydraViT (one shared set of units); got {type(model).__name__}')
    if model.heads is not None:
        raise ValueError(_SEPARATE_HEADS)
    return model


def _grad(param: torch.Tensor, name: str) -> torch.Tensor:
    if param.grad is None:
        raise ValueError(f'{name} has no gradient: run a backward pass (with requires_grad=True) first')
    return param.grad.detach().double()


def _input_mask_grad(linear: nn.Linear, name: str) -> torch.Tensor:
    """dL/dm_c for a mask m on each input channel c of ``linear``: sum_i W[i, c] * dL/dW[i, c]."""
    return (linear.weight.detach().double() * _grad(linear.weight, name)).sum(0)


def _output_mask_grad(norm: nn.LayerNorm, name: str) -> torch.Tensor:
    """dL/dm_c for a mask m on each output channel c of ``norm``: gamma_c dL/dgamma_c + beta_c dL/dbeta_c."""
    # a sum of two tensors (sum() only types its start value 0 into the result)
    return cast(torch.Tensor, sum(p.detach().double() * _grad(p, name) for p in (norm.weight, norm.bias)))


def importance_from_gradients(model: nn.Module) -> Importance:
    """One batch's scores (abs taken) from the model's current ``.grad``, so callers control the loss."""
    model = _check_model(model)
    head_dim = model.config.head_dim
    heads, neurons = [], []
    for i, block in enumerate(cast(Iterable[SlicedBlock], model.blocks)):  # a HydraViT's blocks are SlicedBlocks
        heads.append(_input_mask_grad(block.attn.proj, f'blocks.{i}.attn.proj').view(-1, head_dim).sum(1))
        neurons.append(_input_mask_grad(block.mlp.fc2, f'blocks.{i}.mlp.fc2'))
    # one mask per residual channel, shared by every LayerNorm output (the final norm feeds the classifier)
    channels = cast(torch.Tensor,  # a tensor: every block has two LayerNorms
                    sum(_output_mask_grad(m, n) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)))
    return Importance(heads=torch.stack(heads).abs().cpu(), neurons=torch.stack(neurons).abs().cpu(),
                      channels=channels.abs().cpu())


def measure_importance(
        model: nn.Module,
        batches: Iterable[Batch],
        k: Optional[int] = None,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> Importance:
    """Importance summed over ``batches`` at subnetwork ``k`` (default: the widest trained one).

    Runs in eval mode (dropout and drop-path would make the scores noisy), then restores the training
    mode and leaves every ``.grad`` as None; no weight changes.
    """
    model = _check_model(model)
    k = max(model.k_choices) if k is None else model.resolve_k(k)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = model.pos_embed.device
    was_training, total = model.training, None
    model.eval()
    try:
        with torch.enable_grad():
            for images, target in batches:
                model.zero_grad(set_to_none=True)
                loss_fn(model(images.to(device), k=k), target.to(device)).backward()
                scores = importance_from_gradients(model)
                total = scores if total is None else total + scores
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if total is None:
        raise ValueError('batches is empty: importance needs at least one (images, target) batch')
    return total


# ------------------------------------------------------------------------------------------ permutation
def _check_is_permutation(order: torch.Tensor, what: str) -> None:
    if not isinstance(order, torch.Tensor) or order.ndim != 1 or order.dtype != torch.long:
        raise ValueError(f'{what} must be a 1-D torch.long tensor')
    if not torch.equal(order.sort().values, torch.arange(len(order), device=order.device)):
        raise ValueError(f'{what} is not a permutation of 0..{len(order) - 1}')


@dataclass
class Permutation:
    """A reordering of every nested unit: new position p holds old index ``order[p]``."""
    channels: torch.Tensor        # (embed_dim,)
    heads: List[torch.Tensor]     # per block, (num_heads,)
    neurons: List[torch.Tensor]   # per block, (mlp_hidden,)

    def __post_init__(self) -> None:
        if len(self.heads) != len(self.neurons):
            raise ValueError(f'heads has {len(self.heads)} blocks but neurons has {len(self.neurons)}')
        _check_is_permutation(self.channels, 'channels')
        for i, (heads, neurons) in enumerate(zip(self.heads, self.neurons, strict=True)):
            _check_is_permutation(heads, f'heads[{i}]')
            _check_is_permutation(neurons, f'neurons[{i}]')

    @property
    def depth(self) -> int:
        return len(self.heads)

    def inverse(self) -> Permutation:
        """The permutation that undoes this one."""
        return Permutation(channels=self.channels.argsort(), heads=[h.argsort() for h in self.heads],
                           neurons=[n.argsort() for n in self.neurons])


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


def permutation_from_importance(imp: Importance) -> Permutation:
    """Most important first; ties keep their original order, so equal scores move nothing."""
    return Permutation(channels=_descending(imp.channels), heads=[_descending(h) for h in imp.heads],
                       neurons=[_descending(n) for n in imp.neurons])


def head_rows(head_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The order of a head permutation on rows/columns: head j owns ``head_dim`` contiguous indices."""
    return (head_order[:, None] * head_dim + torch.arange(head_dim, device=head_order.device)).flatten()


def _block_orders(name: str, perm: Permutation, head_dim: int) -> Dict[str, torch.Tensor]:
    orders = {'channels': perm.channels}
    match = _BLOCK.match(name)
    if match:
        i = int(match.group(1))
        if i >= perm.depth:
            raise ValueError(f'{name} belongs to block {i} but the permutation has {perm.depth} blocks')
        orders.update(heads=head_rows(perm.heads[i], head_dim), neurons=perm.neurons[i])
    return orders


def permute_tensor(name: str, tensor: torch.Tensor, perm: Permutation, head_dim: int) -> torch.Tensor:
    """``tensor`` (parameter ``name``, or anything of its shape) reordered by ``perm``; a new tensor."""
    if name.startswith('heads.'):
        raise ValueError(_SEPARATE_HEADS)
    dims = parameter_axes(name)
    if dims is None:
        raise ValueError(f'no reordering rule for tensor {name!r}: not a HydraViT parameter')
    orders = _block_orders(name, perm, head_dim)
    out = qkv_blocks(name, tensor)
    for dim, which in dims.items():
        order = orders[which]
        if out.shape[dim] != len(order):
            size = f'{len(order) // head_dim} heads of {head_dim}' if which == 'heads' else f'{len(order)} entries'
            raise ValueError(f'{name}: the {which} permutation has {size} but the tensor has {out.shape[dim]} '
                             f'along dim {dim} (shape {tuple(tensor.shape)})')
        out = out.index_select(dim, order.to(out.device))
    return out.reshape(tensor.shape) if dims else tensor.clone()


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], perm: Permutation, head_dim: int) -> StateDict:
    """A reordered copy of a HydraViT state dict (the input is untouched); same function at full width."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, state_dict) if m}
    if blocks != set(range(perm.depth)):
        raise ValueError(f'the state dict has {len(blocks)} blocks but the permutation has {perm.depth} blocks')
    return {name: permute_tensor(name, t, perm, head_dim) for name, t in state_dict.items()}


def reorder_model(model: nn.Module, perm: Permutation) -> nn.Module:
    """Reorder ``model`` in place (parameters keep their identity, so optimizers still hold them)."""
    model = _check_model(model)
    model.load_state_dict(permute_state_dict(model.state_dict(), perm, model.config.head_dim), strict=True)
    return model


def permute_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, perm: Permutation) -> None:
    """Reorder every per-element optimizer state (Adam's moments, ...) with its parameter.

    Call it together with :func:`reorder_model` so the next step is the reordered version of the step
    the unreordered model would have taken. Parameters the model does not own are left alone.
    """
    model = _check_model(model)
    names = {id(param): name for name, param in model.named_parameters()}
    updates = [(value, permute_tensor(names[id(param)], value, perm, model.config.head_dim))
               for group in optimizer.param_groups for param in group['params'] if id(param) in names
               for value in optimizer.state.get(param, {}).values()
               if isinstance(value, torch.Tensor) and value.shape == param.shape]
    with torch.no_grad():  # validated in full above: copy only once every tensor could be permuted
        for value, permuted in updates:
            value.copy_(permuted)


def reorder_by_importance(
        model: nn.Module,
        batches: Iterable[Batch],
        k: Optional[int] = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
) -> Permutation:
    """Measure importance on ``batches`` and put the most important units first (model and optimizers)."""
    perm = permutation_from_importance(measure_importance(model, batches, k))
    reorder_model(model, perm)
    for optimizer in optimizers:
        permute_optimizer_state(optimizer, model, perm)
    return perm
