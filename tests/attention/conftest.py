"""Attention tests run on one intra-op thread: tiny shapes gain nothing from two, and on a shared
machine the thread pool's barriers can cost far more than the work."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
