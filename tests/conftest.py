"""Shared fixtures: tiny configs and fixed seeds."""

import dataclasses
import re

import pytest
import torch

from routelab import ModelConfig, RoutedTransformer


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    base.update(overrides)
    return ModelConfig(**base)


def repeated_kv_twin(model: RoutedTransformer) -> RoutedTransformer:
    """The multi-head model (n_kv_heads = n_heads) computing what the grouped-query ``model`` computes:
    each key/value head's projection rows repeated n_heads / n_kv_heads times. Its KV cache holds the
    repeated heads, as grouped-query models' caches did before they kept only the key/value heads."""
    cfg = model.cfg
    r, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    twin = RoutedTransformer(dataclasses.replace(cfg, n_kv_heads=None))
    state = {}
    for key, t in model.state_dict().items():
        if re.search(r"\.attn\.[kv]_proj\.(weight|bias)$", key):
            t = t.reshape(cfg.kv_heads, hd, *t.shape[1:]).repeat_interleave(r, dim=0).reshape(-1, *t.shape[1:])
        state[key] = t
    twin.load_state_dict(state)
    return twin.eval()
