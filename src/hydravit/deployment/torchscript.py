"""The universal model traced with TorchScript once per k, for a server's inference thread.

Called eagerly, every PyTorch operator releases the GIL for its kernel and takes it back afterwards. A
server's event loop (HTTP, multipart, image decoding) holds the GIL most of the time under load, and each
take-back can then wait for a whole interpreter switch interval: beside a busy Python thread a forward of a
few milliseconds took seconds, whatever k it ran at. A traced graph runs its operators in C++ and takes the
GIL once on the way in and once on the way out. The trace records the sliced forward at one k with the
model's parameters (not copies of them), so the traced modules cost no memory beyond their graphs, and it
is checked against the eager forward at start-up: the same kernels, the same logits, bit for bit.

PyTorch marks ``torch.jit.trace`` deprecated in favour of ``torch.compile`` and ``torch.export``. On CPU the first
compiles with a C++ toolchain on the serving machine, and an exported program runs operator by operator from
Python (the GIL per operator again) unless AOTInductor compiles it, with a toolchain too; so the trace stays,
and its deprecation warning is silenced here only, around the trace.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch

from ..models.factory import UniversalModel

__all__ = ['TracedSubnetworks']


class _AtK(torch.nn.Module):
    def __init__(self, model: UniversalModel, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, k=self.k)


class TracedSubnetworks:
    """``traced(x, k=k)`` gives what ``model(x, k=k)`` gives, from a TorchScript trace per k in ``ks``
    (default: every trained k). Traced on a batch of ``example_batch`` (not 1, so that no operator is
    specialised to a single image) and checked on a batch of another size."""

    def __init__(self, model: UniversalModel, ks: Optional[Sequence[int]] = None, example_batch: int = 2) -> None:
        self.model = model.eval()
        self.ks = model.resolve_ks(ks)
        self.example_batch = example_batch
        self._trace()

    def __getstate__(self) -> Dict[str, object]:
        """Pickled as the model and the k (a Ray replica, a spawned worker): traced again where it is loaded."""
        return {'model': self.model, 'ks': self.ks, 'example_batch': self.example_batch}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__dict__.update(state)
        self._trace()

    def _trace(self) -> None:
        model, example_batch = self.model, self.example_batch
        c = model.config
        example = torch.randn(example_batch, c.in_chans, c.img_size, c.img_size)
        check = torch.randn(example_batch + 1, c.in_chans, c.img_size, c.img_size)
        self._traced: Dict[int, torch.jit.ScriptModule] = {}
        with torch.inference_mode(), warnings.catch_warnings():
            # the input-shape check in the forward becomes a constant: the server validates shapes before
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message=r'`torch\.jit\.trace', category=FutureWarning)
            for k in self.ks:
                traced = torch.jit.trace(_AtK(model, k).eval(), example, check_trace=False)
                traced(example)  # the executor profiles the first calls and optimises: not on a request
                if not torch.equal(traced(check), model(check, k=k)):
                    raise RuntimeError(f'the TorchScript trace at k={k} does not reproduce the eager forward; '
                                       'serve without it (--no-torchscript)')
                self._traced[k] = traced

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        traced = self._traced.get(k)
        if traced is None:
            raise ValueError(f'k={k} was not traced; traced k: {self.ks}')
        return traced(x)
