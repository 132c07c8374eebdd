"""AdamW restricted to the active slice: an optional, faster optimizer step for small k (``--opt-active-slice``).

In the paper's training (the default) AdamW walks every parameter at every step: at k=3 of ViT-B it updates
86.6 M weights although 5.7 M took part, and its moments and decoupled weight decay keep moving the inactive
tail (decay shrinks it, the moments keep pushing it with their history). This optimizer updates only the
prefix of every tensor that the step's largest k used (its subnetwork contains every smaller k's), through
views: entries outside it, and their moments, stay exactly as they were, like torch's SparseAdam treats rows
without gradient. Bias correction uses the step count of the whole run. A step that trains only small k thus
costs what the standalone small ViT's step costs; the price is a different treatment of the tail, whose
accuracy effect is measured in ``benchmarks/README.md``.

The state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) is AdamW's, so checkpoints resume with either
optimizer.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch.optim.adamw import adamw

from ..models.factory import UniversalModel
from ..models.subnet import parameter_axes, qkv_blocks

__all__ = ['ActiveSliceAdamW', 'active_slice_view']

View = Callable[[torch.Tensor], torch.Tensor]


def active_slice_view(name: str, sizes: Dict[str, int]) -> Optional[View]:
    """A function giving the active prefix (a view) of parameter ``name``'s tensors, or None for a tensor
    that is not sliced (updated whole, when it has a gradient)."""
    axes = parameter_axes(name)
    if not axes:
        return None

    def view(tensor: torch.Tensor) -> torch.Tensor:
        blocks = qkv_blocks(name, tensor)  # q/k/v as (3, D, ...): a view, never flattened back (that copies)
        index = [slice(None)] * blocks.ndim
        for dim, unit in axes.items():
            index[dim] = slice(0, sizes[unit])
        return blocks[tuple(index)]
    return view


class ActiveSliceAdamW(torch.optim.AdamW):
    """AdamW that updates only the slice of subnetwork :attr:`active_k` (see the module docstring).

    Give the trainer's param groups and the universal model whose parameters they hold; set ``active_k`` to
    the largest k trained since the last step before each :meth:`step`. With ``active_k = None`` it is plain
    AdamW (every tensor, whole).
    """

    def __init__(self, params: Iterable[Any], model: UniversalModel, **kwargs: Any) -> None:
        kwargs.pop('fused', None)  # views are strided: the foreach path handles them, the fused kernel does not
        super().__init__(params, foreach=True, **kwargs)
        self.model = model
        self.names = {p: n for n, p in model.named_parameters()}
        self.active_k: Optional[int] = None
        self._views: Dict[int, Dict[torch.Tensor, Optional[View]]] = {}

    def _views_for(self, k: int) -> Dict[torch.Tensor, Optional[View]]:
        if k not in self._views:
            cfg = self.model.config
            shape = cfg.subnet_shape(self.model.resolve_k(k))
            sizes = {'channels': shape.embed_dim, 'heads': shape.num_heads * cfg.head_dim,
                     'neurons': shape.mlp_hidden}
            self._views[k] = {p: active_slice_view(n, sizes) for p, n in self.names.items()}
        return self._views[k]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        if self.active_k is None:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        views = self._views_for(self.active_k)
        for group in self.param_groups:
            params: List[torch.Tensor] = []
            grads: List[torch.Tensor] = []
            exp_avgs: List[torch.Tensor] = []
            exp_avg_sqs: List[torch.Tensor] = []
            steps: List[torch.Tensor] = []
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state['step'] = torch.tensor(0.0, dtype=torch.float32)
                    state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                view = views.get(p)
                pick = view if view is not None else (lambda t: t)
                params.append(pick(p))
                grads.append(pick(p.grad))
                exp_avgs.append(pick(state['exp_avg']))
                exp_avg_sqs.append(pick(state['exp_avg_sq']))
                steps.append(state['step'])
            if not params:
                continue
            beta1, beta2 = group['betas']
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=group['lr'], weight_decay=group['weight_decay'], eps=group['eps'],
                  maximize=group['maximize'])
        return loss
