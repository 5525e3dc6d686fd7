"""Attention routing (token -> token): a registry of attention kinds keyed by ``attention.kind``.

Every kind is a module with ``forward(x, padding_mask=None, cache=None) -> Tensor``; this package
ships ``dense`` (the baseline and reference); sparse and learned kinds register here too.
"""

from routelab.attention.base import KVCache, RotaryEmbedding, build_attention
from routelab.attention.dense import DenseAttention, DenseAttentionConfig

__all__ = ["DenseAttention", "DenseAttentionConfig", "KVCache", "RotaryEmbedding", "build_attention"]
