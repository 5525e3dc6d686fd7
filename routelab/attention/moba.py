"""MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", eq. 3-5): each
query block attends to its own block and its top-k scoring key blocks, s = q . mean(K_block) / sqrt(d).
The block-selection machinery shared with ``block_topp`` is in ``block_select.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from routelab.attention.block_select import BlockSelectAttention
from routelab.attention.flex import SparseAttentionConfig
from routelab.errors import check_positive
from routelab.registry import ATTENTION


@dataclass
class MoBAAttentionConfig(SparseAttentionConfig):
    """Top-k key blocks per query block."""

    block_size: int = 64  # b: tokens per block (routing unit)
    top_k: int = 3  # key blocks chosen per query block, besides its own
    router_query: Literal["auto", "mean", "first"] = "auto"  # auto: mean (encoder) / first (causal)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "block_size", "top_k")


@ATTENTION.register("moba", MoBAAttentionConfig)
class MoBAAttention(BlockSelectAttention):
    """Each query block attends to its own block and its top-k scoring key blocks."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.top_k = self.budget = cfg.attention.top_k

    def select(self, scores: Tensor) -> Tensor:
        k = min(self.top_k, scores.shape[-1])
        if k == 0:
            return scores.new_full((*scores.shape[:-1], 0), -1, dtype=torch.long)
        top = scores.topk(k, dim=-1)
        return torch.where(torch.isfinite(top.values), top.indices, -1)
