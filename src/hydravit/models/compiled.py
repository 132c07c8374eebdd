"""``torch.compile`` for a universal model: one static graph per k, each compiled the first time its k runs.

Compiling ``model`` and calling it as ``compiled(x, k=k)`` goes wrong twice: at the second k, dynamo's
automatic dynamic shapes turn ``k`` into a symbolic int that the k check cannot read (a compile error), and
with more than ``torch._dynamo.config.recompile_limit`` (8) k the remaining ones silently run eager. Here k
reaches the graph as the model's active k (:meth:`KChoices.use_k`), an int module attribute that dynamo
specialises on, so every k gets its own static graph (the widths are constants and each slice is a plain view),
compiled once and reused on every later switch. The recompile limit is raised for the duration of each call
only, to room for every k of ``1..num_heads`` in train and eval mode at a few input shapes. With
``pad_batches`` (evaluation), inference calls with a smaller batch than the largest seen so far (a data set's
last batch) are zero-padded to it, so they reuse that graph instead of compiling another (samples do not
interact in a ViT at inference).

A k-dynamic graph (one graph for all k) is not used: the k rule reads k as a Python int (it cannot be
symbolic), and one graph per k costs at most ``len(k_choices)`` compiles in a whole run, each paid once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .factory import UniversalModel

__all__ = ['COMPILE_MODES', 'CompileOptions', 'PerKCompiled', 'compile_universal', 'compile_module']

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
GRAPHS_PER_K = 8  # train and eval mode, a few batch shapes, a second module instance (EMA) sharing the code


@dataclass(frozen=True)
class CompileOptions:
    """timm ``train.py``'s ``--torchcompile [BACKEND]`` and ``--torchcompile-mode``."""
    backend: Union[str, Callable[..., Any]] = 'inductor'  # a name, or a backend callable (tests count compiles)
    mode: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise ValueError(f'--torchcompile-mode must be one of {", ".join(COMPILE_MODES)}, got {self.mode!r}')
        if isinstance(self.backend, str):
            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.backend not in backends:
                raise ValueError(f'--torchcompile backend {self.backend!r} is not a torch.compile backend: '
                                 f'choose one of {", ".join(sorted(backends))}')


def _limit_for(num_heads: int) -> int:
    return max(int(torch._dynamo.config.recompile_limit), GRAPHS_PER_K * num_heads)


class PerKCompiled:
    """``model(x, k=k)`` through ``torch.compile``, one graph per k (see the module docstring).

    ``module`` is what gets compiled: the model itself or a wrapper that calls it (DistributedDataParallel).
    """

    def __init__(self, model: UniversalModel, options: CompileOptions = CompileOptions(),
                 module: Optional[nn.Module] = None, pad_batches: bool = False) -> None:
        self.model = model
        self.pad_batches = pad_batches
        self.options = options
        self.module = module if module is not None else model
        self.recompile_limit = _limit_for(model.config.num_heads)
        self._compiled = torch.compile(self.module, backend=options.backend, mode=options.mode, dynamic=False)
        self._largest_inference_batch = 0

    def __call__(self, x: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        k = self.model.resolve_k(k)
        batch = x.shape[0]
        pad = 0
        if torch.is_inference_mode_enabled() and not x.is_inference():
            x = x.clone()  # dynamo guards on the tensor kind: one kind per k, whatever the loader yields
        if self.pad_batches and not torch.is_grad_enabled():
            self._largest_inference_batch = max(self._largest_inference_batch, batch)
            pad = self._largest_inference_batch - batch
            if pad:
                x = F.pad(x, (0, 0) * (x.ndim - 1) + (0, pad))
        with self.model.use_k(k), torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
            out = self._compiled(x)
        return out[:batch] if pad else out

    def bind(self, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A one-argument runner at subnetwork ``k`` (benchmarks)."""
        k = self.model.resolve_k(k)
        return lambda x: self(x, k=k)


def compile_universal(model: UniversalModel, options: Optional[CompileOptions] = None,
                      module: Optional[nn.Module] = None, pad_batches: bool = False) -> PerKCompiled:
    return PerKCompiled(model, options or CompileOptions(), module, pad_batches)


def compile_module(module: nn.Module, options: Optional[CompileOptions] = None) -> Any:
    """A standalone network (an extracted subnet, a timm ViT) compiled with the same settings, static shapes."""
    options = options or CompileOptions()
    return torch.compile(module, backend=options.backend, mode=options.mode, dynamic=False)
