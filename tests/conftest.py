"""Fixtures shared by the test modules; plain helpers live in helpers.py (``from helpers import ...``)."""
import os
import sys
from pathlib import Path

import pytest
import torch

# test modules import ``helpers`` from this folder whatever pytest's import mode
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import randomize_  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def randomize():
    return randomize_


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads can run 10-40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
