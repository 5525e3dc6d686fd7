"""Sparse Transformer patterns (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", sec. 4.2-4.3): ``strided`` and ``fixed``, each one head attending to the union of
the paper's two factorised sets.

- strided: A(1)_i = {j : |i - j| <= w} (the previous l positions when causal, w = l by default),
  A(2)_i = {j : (i - j) mod l = 0}: local plus every l-th position.
- fixed: A(1)_i = {j : floor(j / l) = floor(i / l)} (the same block), A(2)_i = {j : j mod l in
  {l - c, ..., l - 1}} (the c "summary" positions closing every block).
Causal variants keep j <= i. Work is O(n (w + n / l)) and O(n (l + n c / l)): the union is not
block-local, so each set is its own part (band blocks; groups of equal residue; block diagonal;
summary keys) and the parts are merged exactly by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.attention.base import QKVAttention
from routelab.attention.engine import Part, Windows
from routelab.attention.flex import SparseAttentionConfig
from routelab.attention.patterns import SparsePatternAttention, band, band_parts, pair_mask
from routelab.errors import check, check_positive
from routelab.registry import ATTENTION


@dataclass
class StridedAttentionConfig(SparseAttentionConfig):
    """Local window plus every stride-th position (relative), Child et al. 2019 'strided'."""

    stride: int = 64  # l: query i also sees j with (i - j) mod l == 0
    window: int | None = None  # w of the local part; None = stride (the paper's A(1))
    block_size: int = 64  # query block of the local part (speed only)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "stride", "block_size")
        if self.window is not None:
            check_positive(self, "window")


@dataclass
class FixedAttentionConfig(SparseAttentionConfig):
    """Own block plus the last `summary` positions of every block, Child et al. 2019 'fixed'."""

    stride: int = 64  # l: block length
    summary: int = 4  # c: summary positions at the end of each block (the paper used 8-32 for l=128)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "stride", "summary")
        check(self.summary <= self.stride, "model.attention.summary", self.summary, f"<= stride={self.stride}")


def _causal_ok(i: Tensor, j: Tensor, causal: bool) -> Tensor:
    return j <= i if causal else torch.ones_like(i == j)


def residue_groups(T: int, stride: int, device) -> Tensor:
    """(G, L) positions grouped by residue mod stride: row r = r, r + l, r + 2l, ... (-1 past T)."""
    G = min(stride, T)
    L = -(-T // stride)
    pos = torch.arange(G, device=device)[:, None] + stride * torch.arange(L, device=device)
    return torch.where(pos < T, pos, -1)


@ATTENTION.register("strided", StridedAttentionConfig)
class StridedAttention(SparsePatternAttention, QKVAttention):
    """Child et al. 2019 strided pattern: a local band part plus a residue-group part."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.stride, self.window, self.block_size = a.stride, a.window or a.stride, a.block_size

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        strided = ((i - j) % self.stride == 0) & _causal_ok(i, j, self.causal)
        return band(i, j, self.window, self.causal) | strided

    def build_parts(self, T: int, device) -> list[Part]:
        parts = band_parts(T, self.window, self.block_size, self.causal, device)
        groups = residue_groups(T, self.stride, device)  # (G, L)
        # the pattern is translation invariant, so one group's slot mask serves every group
        far = lambda i, j: self.allow(i, j) & ~band(i, j, self.window, self.causal)  # noqa: E731
        mask = pair_mask(far, groups[:1].clamp(min=0), groups[:1].clamp(min=0), device)  # (1, 1, L, L)
        if bool(mask.any()):
            parts.append(Part(groups, groups, mask))
        return parts


@ATTENTION.register("fixed", FixedAttentionConfig)
class FixedAttention(SparsePatternAttention, QKVAttention):
    """Child et al. 2019 fixed pattern: a block-diagonal part plus a summary-keys part."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.stride, self.summary = cfg.attention.stride, cfg.attention.summary

    def _summary(self, j: Tensor) -> Tensor:
        return j % self.stride >= self.stride - self.summary

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        same = i // self.stride == j // self.stride
        return (same | self._summary(j)) & _causal_ok(i, j, self.causal)

    def build_parts(self, T: int, device) -> list[Part]:
        nb = -(-T // self.stride)
        blocks = Windows(0, self.stride, self.stride, nb)
        parts = [Part(blocks, blocks, None, causal=self.causal)]  # block diagonal; validity by the engine
        pos = torch.arange(T, device=device)
        summary = pos[self._summary(pos)][None]  # (1, S)
        if summary.shape[1] and nb > 1:
            queries = Windows(0, T, T, 1)
            other = lambda i, j: self.allow(i, j) & (i // self.stride != j // self.stride)  # noqa: E731
            mask = pair_mask(other, queries, summary, device)  # (1, 1, T, S)
            parts.append(Part(queries, summary, mask))
        return parts
