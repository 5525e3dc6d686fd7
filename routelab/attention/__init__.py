"""Attention routing (token -> token): a registry of attention kinds keyed by ``attention.kind``.

Every kind is a module with ``forward(x, padding_mask=None, cache=None) -> Tensor``
(``return_routes=True`` also returns what a learned kind chose). Kinds: ``dense`` (the baseline and
reference); fixed sparse patterns ``local``, ``strided``, ``fixed``, ``longformer``, ``bigbird``;
learned routing ``synthesizer``, ``kmeans``, ``moba``, ``block_topp``. All sparse kinds run on the
block-sparse engine in ``engine.py``; fixed patterns share the helpers in ``patterns.py``; kinds
with q/k/v projections derive from ``base.QKVAttention``. Every module of this package is imported
here, so a new kind is one new file that registers itself in ``ATTENTION``.
"""

import importlib
import pkgutil

from routelab.attention.base import KVCache, RotaryEmbedding, build_attention
from routelab.attention.bigbird import BigBirdAttention, BigBirdAttentionConfig
from routelab.attention.block_topp import BlockTopPAttention, BlockTopPAttentionConfig
from routelab.attention.dense import DenseAttention, DenseAttentionConfig
from routelab.attention.kmeans import KMeansAttention, KMeansAttentionConfig
from routelab.attention.local import LocalAttention, LocalAttentionConfig
from routelab.attention.longformer import LongformerAttention, LongformerAttentionConfig
from routelab.attention.moba import MoBAAttention, MoBAAttentionConfig
from routelab.attention.routes import BlockRoutes, ClusterRoutes, WeightRoutes
from routelab.attention.sparse_transformer import (
    FixedAttention,
    FixedAttentionConfig,
    StridedAttention,
    StridedAttentionConfig,
)
from routelab.attention.synthesizer import SynthesizerAttention, SynthesizerAttentionConfig

for _module in pkgutil.iter_modules(__path__):  # registers kinds added as files without an import here
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BigBirdAttention",
    "BigBirdAttentionConfig",
    "BlockRoutes",
    "BlockTopPAttention",
    "BlockTopPAttentionConfig",
    "ClusterRoutes",
    "DenseAttention",
    "DenseAttentionConfig",
    "FixedAttention",
    "FixedAttentionConfig",
    "KMeansAttention",
    "KMeansAttentionConfig",
    "KVCache",
    "LocalAttention",
    "LocalAttentionConfig",
    "LongformerAttention",
    "LongformerAttentionConfig",
    "MoBAAttention",
    "MoBAAttentionConfig",
    "RotaryEmbedding",
    "StridedAttention",
    "StridedAttentionConfig",
    "SynthesizerAttention",
    "SynthesizerAttentionConfig",
    "WeightRoutes",
    "build_attention",
]
