"""Feed-forward layers: a registry keyed by ``ffn.kind`` (``dense`` here; MoE kinds plug in)."""

from routelab.ffn.base import FFNOutput, build_ffn
from routelab.ffn.dense import DenseFFN, DenseFFNConfig

__all__ = ["DenseFFN", "DenseFFNConfig", "FFNOutput", "build_ffn"]
