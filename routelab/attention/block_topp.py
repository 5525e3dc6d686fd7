"""Adaptive block budget (top-p over key blocks): like ``moba`` (Lu et al. 2025), but each query
block takes the fewest key blocks whose routing mass reaches p, at most ``max_blocks``, so a block
whose queries need more context gets more (the budget rule of nucleus sampling, Holtzman et al.
2020, eq. 2, applied to p_j = softmax_j(q . mean(K_j) / sqrt(d)) over the allowed key blocks).

Not the MoE router ``topp`` (Huang et al. 2024), which applies the same budget rule to experts.
``BlockRoutes.stats`` reports the mean number of blocks attended (own block included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from routelab.attention.block_select import BlockSelectAttention
from routelab.attention.flex import SparseAttentionConfig
from routelab.errors import check, check_positive
from routelab.registry import ATTENTION


@dataclass
class BlockTopPAttentionConfig(SparseAttentionConfig):
    """Fewest key blocks reaching routing mass top_p, capped at max_blocks."""

    block_size: int = 64  # b: tokens per block
    top_p: float = 0.9  # routing mass to cover
    max_blocks: int = 8  # cap on chosen key blocks per query block (besides its own)
    router_query: Literal["auto", "mean", "first"] = "auto"  # auto: mean (encoder) / first (causal)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "block_size", "max_blocks")
        check(0.0 < self.top_p <= 1.0, "model.attention.top_p", self.top_p, "0 < top_p <= 1")


@ATTENTION.register("block_topp", BlockTopPAttentionConfig)
class BlockTopPAttention(BlockSelectAttention):
    """Each query block attends to its own block and the smallest key-block set of mass >= p."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.top_p, self.max_blocks = cfg.attention.top_p, cfg.attention.max_blocks
        self.budget = self.max_blocks  # reports count the cap: an upper bound of the adaptive budget

    def select(self, scores: Tensor) -> Tensor:
        k = min(self.max_blocks, scores.shape[-1])
        if k == 0:
            return scores.new_full((*scores.shape[:-1], 0), -1, dtype=torch.long)
        probs = scores.softmax(-1).nan_to_num(0.0)  # rows with no eligible block: all 0
        top = probs.topk(k, dim=-1)  # sorted, descending
        before = top.values.cumsum(-1) - top.values  # mass of the better blocks
        take = (before < self.top_p) & (top.values > 0)
        chosen = torch.where(take, top.indices, -1)
        # trim slots no block uses: K is a shape, so this host sync stays (fewer gathered blocks is the point)
        used = int(take.sum(-1).max()) if take.numel() else 0
        return chosen[..., : max(used, 1)] if used < k else chosen
