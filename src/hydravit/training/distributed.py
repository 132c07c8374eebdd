"""The process group of a multi-process run (torchrun's environment) and the few collectives the trainer uses."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['DistEnv', 'init_distributed', 'all_reduce_sum', 'all_reduce_tensor', 'all_gather', 'weights_digest',
           'check_replicas_in_sync']

logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistEnv:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
    if world <= 1:
        return DistEnv(device=dev)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if dev.type == 'cuda':
        dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, owns_group=owns)


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> List[float]:
    """The element-wise sum of ``values`` over all processes (float64)."""
    return all_reduce_tensor(torch.tensor(list(values), dtype=torch.float64), env).tolist()


def all_reduce_tensor(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (itself in a single-process run), on the CPU."""
    if not env.distributed:
        return tensor
    summed = tensor.to(env.device)
    dist.all_reduce(summed)
    return summed.cpu()


def all_gather(obj: Any, env: DistEnv) -> List[Any]:
    """``obj`` of every process, by rank (``[obj]`` in a single-process run)."""
    if not env.distributed:
        return [obj]
    gathered: List[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state dict, names included."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_in_sync(model: nn.Module, env: DistEnv, epoch: int) -> str:
    """The weights' digest, after checking that every process holds the same one (DDP must keep them equal)."""
    digests = all_gather(weights_digest(model), env)
    if len(set(digests)) != 1:
        raise RuntimeError(f'epoch {epoch}: the processes hold different weights: {digests}')
    if env.is_main:
        logger.info('epoch %d: weights identical on all %d processes (sha256 %s)', epoch, env.world_size,
                    digests[0][:16])
    return digests[0]
