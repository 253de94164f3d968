import os
import sys

import pytest
import torch

# tests import the top-level modules (taxonomy, unet, model, train, sample) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `pytest -n 2` (pytest-xdist): the workers share the cores, so each takes its share of torch threads
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def one_thread():
    """One torch thread: tiny shapes gain nothing from a second, which only spins and waits when the cores are
    shared (10x slower here). Test files of tiny training runs use it for every test (pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
