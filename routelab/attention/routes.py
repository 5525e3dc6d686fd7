"""Routes: what a learned attention kind chose, returned by ``forward(..., return_routes=True)``.

Each type holds the compact choice and builds the equivalent dense boolean mask (True = may attend)
on demand, so tests can check a learned kind against dense attention under the mask of its own
routes. The dense mask is O(T^2): for inspection and tests, not for the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class BlockRoutes:
    """Key blocks each query block chose (``moba``, ``block_topp``); its own block is always attended.

    Attributes:
        blocks: (B, H, nqb, K) long, chosen key blocks, -1 = unused slot.
        block_size: tokens per block.
        causal: whether j <= i was also required.
        stats: e.g. ``{"mean_blocks": tensor(2.4)}`` (blocks attended per query block, own block
            included), 0-d tensors on the routes' device, so the forward pass does not wait for them.
    """

    blocks: Tensor
    block_size: int
    causal: bool
    stats: dict = field(default_factory=dict)

    def mask(self, seq_len: int) -> Tensor:
        """(B, H, T, T) bool."""
        return self.rows(torch.arange(seq_len, device=self.blocks.device), seq_len)

    def rows(self, qpos: Tensor, seq_len: int) -> Tensor:
        """The mask rows of queries at positions ``qpos`` (T,) over keys 0..seq_len-1: (B, H, T, S)."""
        B, H, nqb, K = self.blocks.shape
        b = self.block_size
        kpos = torch.arange(seq_len, device=self.blocks.device)
        chosen = self.blocks[:, :, qpos // b]  # (B, H, T, K)
        m = (chosen[..., None] == (kpos // b)).any(-2) | ((qpos // b)[:, None] == kpos // b)  # (B, H, T, S)
        return m & (kpos[None, :] <= qpos[:, None]) if self.causal else m


@dataclass
class ClusterRoutes:
    """Groups chosen by k-means routing (``kmeans``): a token attends within its group.

    Attributes:
        groups: (B, H, T) long group id per token (-1: padding, in no group).
        clusters: (B, H, T) long centroid each token was assigned to.
        causal: whether j <= i was also required.
        local_heads: the first heads use a local window of ``window`` instead of groups.
        stats: ``max_group``, ``mean_groups``: 0-d tensors on the routes' device (no host sync).
    """

    groups: Tensor
    clusters: Tensor
    causal: bool
    local_heads: int = 0
    window: int = 0
    stats: dict = field(default_factory=dict)

    def mask(self, seq_len: int) -> Tensor:
        """(B, H, T, T) bool."""
        g = self.groups
        m = (g[..., :, None] == g[..., None, :]) & (g[..., :, None] >= 0)
        pos = torch.arange(seq_len, device=g.device)
        if self.local_heads:
            d = pos[:, None] - pos[None, :]
            band = (d >= 0) & (d <= self.window) if self.causal else d.abs() <= self.window
            m[:, : self.local_heads] = band
        return m & (pos[None, :] <= pos[:, None]) if self.causal else m


@dataclass
class WeightRoutes:
    """Attention weights of a dense learned router (``synthesizer``): (B, H, T, S), rows sum to 1."""

    weights: Tensor
    stats: dict = field(default_factory=dict)

    def mask(self, seq_len: int) -> Tensor:
        return self.weights > 0
