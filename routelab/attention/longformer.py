"""Longformer attention (Beltagy et al. 2020, "Longformer: The Long-Document Transformer", sec. 3.1):
a sliding window of w on each side plus global positions that attend to, and are attended by,
every position ("global in both directions"; with a causal model, only towards the past).

Parts (merged exactly by log-sum-exp): the band (every pair within w), the other queries against
the G global keys outside their window, and the G global queries against all keys outside their
window: O(n (w + G)) work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

import routelab.attention.flex as flex
from routelab.attention.base import QKVAttention
from routelab.attention.engine import Part, Windows
from routelab.attention.flex import SparseAttentionConfig
from routelab.attention.patterns import SparsePatternAttention, band, band_parts, pair_mask
from routelab.errors import check, check_positive
from routelab.registry import ATTENTION


@dataclass
class LongformerAttentionConfig(SparseAttentionConfig):
    """Sliding window + global positions."""

    window: int = 64  # w: |i - j| <= w (0 <= i - j <= w when causal)
    global_tokens: list[int] = field(default_factory=lambda: [0])  # positions with global attention (0 = CLS)
    block_size: int = 64  # query block of the band part (speed only)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "window", "block_size")
        for p in self.global_tokens:
            check(
                isinstance(p, int) and p >= 0,
                "model.attention.global_tokens",
                self.global_tokens,
                "a list of positions >= 0",
            )
        self.global_tokens = sorted(set(self.global_tokens))


@ATTENTION.register("longformer", LongformerAttentionConfig)
class LongformerAttention(SparsePatternAttention, QKVAttention):
    """Local band + global tokens; a causal model keeps j <= i for every pair."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.window, self.block_size = a.window, a.block_size
        self.register_buffer("global_positions", torch.tensor(a.global_tokens, dtype=torch.long), persistent=False)

    def _is_global(self, p: Tensor) -> Tensor:
        return torch.isin(p, self.global_positions.to(p.device))

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        glob = self._is_global(i) | self._is_global(j)
        if self.causal:
            glob = glob & (j <= i)
        return band(i, j, self.window, self.causal) | glob

    def flex_mask_mod(self, T: int, device):
        """``allow`` with a (padded length,) table of global positions instead of ``isin``."""
        n = -(-T // flex.FLEX_BLOCK) * flex.FLEX_BLOCK  # FlexAttention may ask about padded positions
        g = self.global_positions.to(device)
        is_global = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, g[g < n], True)
        window, causal = self.window, self.causal

        def mask_mod(b, h, q, kv):
            glob = is_global[q] | is_global[kv]
            return band(q, kv, window, causal) | (glob & (kv <= q) if causal else glob)

        return mask_mod

    def build_parts(self, T: int, device) -> list[Part]:
        g = self.global_positions.to(device)
        g = g[g < T][None]  # (1, G)
        parts = band_parts(T, self.window, self.block_size, self.causal, device)  # owns every band pair
        if g.shape[1]:
            outside = lambda i, j: self.allow(i, j) & ~band(i, j, self.window, self.causal)  # noqa: E731
            to_global = lambda i, j: outside(i, j) & ~self._is_global(i)  # noqa: E731
            everyone = Windows(0, T, T, 1)
            parts.append(Part(everyone, g, pair_mask(to_global, everyone, g, device)))  # others -> global keys
            parts.append(Part(g, everyone, pair_mask(outside, g, everyone, device)))  # global rows -> all keys
        return parts
