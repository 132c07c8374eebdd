import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norms, cls/pos, head included) a random value, so no slice hides behind init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def randomize():
    return randomize_
