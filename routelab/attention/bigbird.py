"""BigBird attention, ITC variant (Zaheer et al. 2020, "Big Bird: Transformers for Longer
Sequences", sec. 2 and app. D): per query block, a window of neighbouring blocks, g global blocks
(existing tokens: the first blocks), and r random blocks. Global blocks attend to everything.

Random blocks are drawn from a generator seeded by (seed, layer), fixed per layer and head, so two
constructions with the same seed agree and runs are reproducible. A block's draw depends only on its
own index (the scores are a fixed table), so with a causal model (random blocks from the past) a
prefix keeps its pattern as the sequence grows, and cached decoding equals recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import routelab.attention.flex as flex
from routelab.attention.base import QKVAttention
from routelab.attention.engine import Part, Windows
from routelab.attention.flex import SparseAttentionConfig
from routelab.attention.patterns import SparsePatternAttention, pair_mask, sliding_parts
from routelab.errors import check, check_positive
from routelab.registry import ATTENTION


@dataclass
class BigBirdAttentionConfig(SparseAttentionConfig):
    """Block window + global blocks + random blocks."""

    block_size: int = 64  # b: the unit of the pattern
    window_blocks: int = 3  # odd: the own block and (window_blocks - 1) / 2 on each side (past only if causal)
    num_global_blocks: int = 1  # the first g blocks are global (ITC)
    num_random_blocks: int = 2  # r random key blocks per query block and head
    seed: int = 0  # seeds the random blocks (with the layer index)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "block_size", "window_blocks")
        check(self.window_blocks % 2 == 1, "model.attention.window_blocks", self.window_blocks, "an odd number >= 1")
        for n in ("num_global_blocks", "num_random_blocks"):
            check(getattr(self, n) >= 0, f"model.attention.{n}", getattr(self, n), "an integer >= 0")


@ATTENTION.register("bigbird", BigBirdAttentionConfig)
class BigBirdAttention(SparsePatternAttention, QKVAttention):
    """BigBird-ITC through the block-sparse engine: per-head block layouts plus dense global rows."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.block_size, self.half = a.block_size, (a.window_blocks - 1) // 2
        self.num_global, self.num_random = a.num_global_blocks, a.num_random_blocks
        nb_max = -(-cfg.max_seq_len // a.block_size)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + layer_idx)
        # fixed random scores per (head, query block, key block); a block's r random keys are its top r
        self.register_buffer("random_scores", torch.rand(self.n_heads, nb_max, nb_max, generator=gen), persistent=False)

    def block_layout(self, nb: int, device) -> Tensor:
        """Bool (H, nb, nb): query block -> key block allowed (global rows are all True)."""
        qb = torch.arange(nb, device=device)[:, None]
        kb = torch.arange(nb, device=device)[None, :]
        near = (qb - kb).abs() <= self.half
        glob = (kb < self.num_global) | (qb < self.num_global)
        if self.causal:
            near, glob = near & (kb <= qb), glob & (kb <= qb)
        fixed = near | glob  # (nb, nb)
        scores = self._scores(nb, device).masked_fill(fixed | ((kb > qb) if self.causal else False), -1.0)
        k = min(self.num_random, nb)
        layout = fixed.expand(self.n_heads, nb, nb).clone()
        if k > 0:
            top = scores.topk(k, dim=-1)  # (H, nb, k)
            layout.scatter_(-1, top.indices, top.values >= 0)  # ineligible picks (score -1) stay False
            layout |= fixed
        return layout

    def _scores(self, nb: int, device) -> Tensor:
        if nb > self.random_scores.shape[1]:
            raise ValueError(f"{nb} blocks exceed model.max_seq_len / block_size = {self.random_scores.shape[1]}")
        return self.random_scores[:, :nb, :nb].to(device)

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        """Per head: (H, ...) bool."""
        nb = int(max(i.max(), j.max())) // self.block_size + 1
        layout = self.block_layout(nb, i.device)
        qb, kb = (i // self.block_size).expand_as(j + i), (j // self.block_size).expand_as(j + i)
        ok = layout[:, qb, kb]
        return ok & (j <= i) if self.causal else ok

    def flex_mask_mod(self, T: int, device):
        """``allow`` as a lookup in the (H, nb, nb) block layout, padded for FlexAttention's tail."""
        b, nb = self.block_size, -(-T // self.block_size)
        pad = -(-(-(-T // flex.FLEX_BLOCK) * flex.FLEX_BLOCK) // b) - nb  # blocks up to the padded length
        layout = torch.nn.functional.pad(self.block_layout(nb, device), (0, pad, 0, pad))  # (H, nb+pad, nb+pad)
        causal = self.causal

        def mask_mod(b_, h, q, kv):
            ok = layout[h, q // b, kv // b]
            return ok & (kv <= q) if causal else ok

        return mask_mod

    def build_parts(self, T: int, device) -> list[Part]:
        """Four parts, merged by log-sum-exp: for the non-global query blocks, the sliding block window
        (strided views), the global key blocks outside the window (one shared key range), and the
        random blocks (gathered, per head); then the global query blocks against every key."""
        b, h = self.block_size, self.half
        nb = -(-T // b)
        g = min(self.num_global, nb)
        causal = self.causal

        def same_window(i: Tensor, j: Tensor) -> Tensor:
            near = (i // b - j // b).abs() <= h
            return near & (j <= i) if causal else near

        length = min(b, T) * (h + 1 if causal else 2 * h + 1)
        parts = sliding_parts(T, b, -h * b, length, same_window, device, first=g)
        if g and nb > g:  # global key blocks, for query blocks they are not already near
            queries, keys = Windows(g * b, b, b, nb - g), Windows(0, 0, g * b, nb - g)
            far = lambda i, j: (i // b - j // b).abs() > h  # noqa: E731  (global keys precede every query)
            mask = pair_mask(far, Windows(g * b, b, 1, nb - g), keys, device)  # (1, G, 1, g * b): key-only
            if bool(mask.any()):
                parts.append(Part(queries, keys, mask))
        layout = self.block_layout(nb, device)[:, g:]  # (H, nq, nb) incl. window and global blocks
        qb = torch.arange(g, nb, device=device)[:, None]
        kb = torch.arange(nb, device=device)[None, :]
        rand = layout & ((qb - kb).abs() > h) & (kb >= g)  # the random blocks alone
        r = int(rand.sum(-1).max()) if rand.numel() else 0
        if r:
            order = torch.sort(rand.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :r]
            blocks = torch.where(torch.gather(rand, -1, order), order, -1)  # (H, nq, r)
            pos = blocks[..., None] * b + torch.arange(b, device=device)
            keys = torch.where(blocks[..., None] >= 0, pos, -1).flatten(-2)  # (H, nq, r * b), all in the past if causal
            parts.append(Part(Windows(g * b, b, b, nb - g), keys))
        if g:  # global query blocks see everything (the past, if causal)
            glob, everyone = Windows(0, g * b, g * b, 1), Windows(0, T, T, 1)
            mask = None
            if causal:
                q, k = torch.arange(g * b, device=device), torch.arange(T, device=device)  # g*b may exceed T
                mask = (k[None, :] <= q[:, None])[None, None]  # (1, 1, g*b, T); query slots past T are dropped
            parts.append(Part(glob, everyone, mask))
        return parts
