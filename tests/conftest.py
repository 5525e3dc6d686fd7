"""Shared fixtures: tiny configs and fixed seeds."""

import pytest
import torch

from routelab import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    base.update(overrides)
    return ModelConfig(**base)
