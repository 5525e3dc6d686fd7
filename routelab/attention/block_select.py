"""Block-selection attention: each query block attends to its own key block and to key blocks chosen
by a parameter-free score (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
eq. 3-5; NSA's selection branch, Yuan et al. 2025, sec. 3.3.2). The rule that picks the blocks is a
subclass's ``select``: top-k (``moba``) or top-p (``block_topp``).

The keys are cut into blocks of b tokens; a query block scores every allowed key block by
s = q . mean(K_block) / sqrt(d) (past blocks only when causal, with a causal mask inside its own
block). The choice is hard and not differentiated; gradients flow through attention over the chosen
blocks.

The router query of a block is the mean of its queries (encoders), or its *first* query (causal:
the route is fixed when the block's first token arrives, so no token's keys depend on later tokens
and cached decoding equals recomputation). Decoding keeps per-block key means and each block's route.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import routelab.attention.flex as flex
from routelab.attention.base import KVCache, QKVAttention
from routelab.attention.engine import Part, Windows, attend_parts, reference_attention
from routelab.attention.routes import BlockRoutes
from routelab.errors import ConfigError
from routelab.precision import in_fp32


def block_means(k: Tensor, block_size: int, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Masked mean of each key block. k: (B, H, S, hd), keep: (B, S) bool or None.

    Returns means (B, H, nb, hd) and a (B, nb) bool "block has a real key".
    """
    B, H, S, hd = k.shape
    nb = -(-S // block_size)
    pad = nb * block_size - S
    w = torch.ones(B, S, dtype=k.dtype, device=k.device) if keep is None else keep.to(k.dtype)
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.view(B, 1, nb, block_size, 1)
    total = (k.view(B, H, nb, block_size, hd) * w).sum(3)  # (B, H, nb, hd)
    count = w.sum(3)  # (B, 1, nb, 1)
    return total / count.clamp(min=1), count[:, 0, :, 0] > 0


class BlockSelectAttention(QKVAttention):
    """Each query block attends to its own block and the key blocks ``select`` picks (moba, block_topp)."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.block_size = a.block_size
        if a.router_query == "mean" and cfg.causal:
            raise ConfigError(
                "model.attention.router_query='mean' is invalid for a causal model (model.causal=true): "
                "the mean reads later queries of the block; allowed: 'first' or 'auto'"
            )
        self.router_query = a.router_query if a.router_query != "auto" else ("first" if cfg.causal else "mean")

    # -- routing -----------------------------------------------------------------------------
    def select(self, scores: Tensor) -> Tensor:
        """scores (B, H, n, nb) with -inf for ineligible blocks -> chosen blocks (B, H, n, K), -1 = none."""
        raise NotImplementedError(f"{type(self).__name__} must define select (abstract hook: moba/block_topp)")

    @in_fp32
    def route(self, rq: Tensor, kmean: Tensor, kvalid: Tensor, qblocks: Tensor) -> Tensor:
        """Router queries rq (B, H, n, hd) of query blocks ``qblocks`` (n,) over key-block means
        (B, H, nb, hd) -> chosen blocks (B, H, n, K), -1 = unused. Scored in float32 under autocast:
        near-ties in bfloat16 would flip block choices (``routelab.precision``)."""
        nb = kmean.shape[2]
        kb = torch.arange(nb, device=rq.device)
        eligible = kvalid[:, None, None, :] & (kb[None, :] != qblocks[:, None])[None, None]
        if self.causal:
            eligible = eligible & (kb[None, :] < qblocks[:, None])[None, None]
        scores = (rq @ kmean.transpose(-1, -2)) / math.sqrt(rq.shape[-1])  # (B, H, n, nb)
        return self.select(scores.masked_fill(~eligible, float("-inf")))

    def router_queries(self, q: Tensor, keep: Tensor | None) -> Tensor:
        """(B, H, T, hd) -> one router query per block (B, H, nb, hd)."""
        b = self.block_size
        if self.router_query == "first":
            return q[:, :, ::b]
        return block_means(q, b, keep)[0]

    # -- attention -----------------------------------------------------------------------------
    def routed_parts(self, blocks: Tensor, T: int) -> list[Part]:
        """Two parts merged by log-sum-exp: each query block with its own block (a view, causal inside
        when causal), and with its chosen blocks (gathered; unused slots masked key-wise)."""
        B, H, nqb, K = blocks.shape
        b = self.block_size
        queries = Windows(0, b, b, nqb)
        parts = [Part(queries, queries, None, causal=self.causal)]
        if K:
            pos = blocks[..., None] * b + torch.arange(b, device=blocks.device)
            keys = torch.where(blocks[..., None] >= 0, pos, -1).flatten(-2).reshape(B * H, nqb, K * b)
            parts.append(Part(queries, keys))  # chosen blocks are all in the past when causal
        return parts

    def attend_routes(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache | None):
        if cache is not None:
            return self._decode(q, k, v, padding_mask, cache)
        T = q.shape[2]
        k, v = self.repeat_kv(k), self.repeat_kv(v)  # (B, Hkv, T, hd) -> (B, H, T, hd): routes are per query head
        keep = ~padding_mask if padding_mask is not None else None
        blocks = self._route_all(q, k, keep)
        return self._attend_blocks(q, k, v, blocks, padding_mask), self._routes(blocks, keep, T)

    def _attend_blocks(self, q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Attention under the chosen blocks (B, H, nqb, K) on the configured backend (``flex.py``)."""
        T = q.shape[2]
        backend = flex.choose_backend(self.cfg, q, padding_mask, self.dropout_p)
        if backend == "dense":  # the reference: O(T^2) mask
            return reference_attention(q, k, v, BlockRoutes(blocks, self.block_size, self.causal).mask(T), padding_mask)

        def run_flex() -> Tensor:
            return flex.flex_attend(q, k, v, flex.routes_block_mask(blocks, self.block_size, self.causal, T))

        def run_engine() -> Tensor:
            return attend_parts(q, k, v, self.routed_parts(blocks, T), padding_mask=padding_mask, dropout_p=self.dropout_p)

        return flex.with_flex_fallback(self, run_flex, run_engine) if backend == "flex" else run_engine()

    def _route_all(self, q: Tensor, k: Tensor, keep: Tensor | None) -> Tensor:
        kmean, kvalid = block_means(k, self.block_size, keep)
        rq = self.router_queries(q, keep)
        return self.route(rq, kmean, kvalid, torch.arange(rq.shape[2], device=q.device))

    def _routes(self, blocks: Tensor, keep: Tensor | None, T: int) -> BlockRoutes:
        used = (blocks >= 0).sum(-1).float() + 1  # (B, H, nqb), own block included
        if keep is not None:  # average over query blocks holding a real token
            real = block_means(keep[:, None, :, None].float(), self.block_size, None)[0][:, 0, :, 0] > 0
            mean = (used * real[:, None]).sum() / (real.sum() * used.shape[1]).clamp(min=1)
        else:
            mean = used.mean()
        return BlockRoutes(blocks, self.block_size, self.causal, {"mean_blocks": mean.detach()})  # 0-d: no host sync

    # -- inspection and reports --------------------------------------------------------------
    budget: int = 0  # key blocks a query block may choose besides its own (top_k, or max_blocks)

    def attended_pairs(self, seq_len: int) -> float:
        """Pairs per head when every query block uses its whole budget (an upper bound for block_topp)."""
        b = self.block_size
        nb = -(-seq_len // b)
        qb = torch.arange(nb, dtype=torch.float64)
        eligible = qb if self.causal else torch.full_like(qb, nb - 1)
        own = b * (b + 1) / 2 if self.causal else b * b
        return float((eligible.clamp(max=self.budget) * b * b + own).sum())

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) under the routes chosen for x (B, T, D): (B, H, T, T)."""
        T = x.shape[1]
        q, k = self._heads(self.q_proj(x)), self.repeat_kv(self._kv_heads(self.k_proj(x)))
        if self.rope is not None:
            q, k = self.rope.rotate(q), self.rope.rotate(k)
        mask = BlockRoutes(self._route_all(q, k, None), self.block_size, self.causal).mask(T)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)

    # -- decoding --------------------------------------------------------------------------------
    def _decode(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache):
        """Cached steps: complete blocks' key means and each block's route live in ``cache.extra``.
        Keys, values and key means are kept with the key/value heads (Hkv) and repeated when used."""
        b = self.block_size
        offset, T = cache.offset, q.shape[2]
        k_all, v_all = cache.append(k, v)  # (B, Hkv, S, hd), S = offset + T
        S = k_all.shape[2]
        keep = ~padding_mask[:, -S:] if padding_mask is not None else None
        if offset == 0:  # the prompt: the full block-sparse forward
            out, routes = self.attend_routes(q, k_all, v_all, padding_mask, None)
            cache.extra["blocks"] = routes.blocks
            cache.extra["kmean"], cache.extra["kvalid"] = block_means(
                k_all[:, :, : S // b * b], b, None if keep is None else keep[:, : S // b * b]
            )
            return out, routes
        means, valid = cache.extra["kmean"], cache.extra["kvalid"]
        done = means.shape[2]
        if S // b > done:  # blocks completed by these tokens: add their key means
            lo, hi = done * b, S // b * b
            m, ok = block_means(k_all[:, :, lo:hi], b, None if keep is None else keep[:, lo:hi])
            means, valid = torch.cat([means, m], 2), torch.cat([valid, ok], 1)
            cache.extra["kmean"], cache.extra["kvalid"] = means, valid
        blocks = cache.extra["blocks"]
        have, need = blocks.shape[2], -(-S // b)
        if need > have:  # new blocks start inside these tokens: route them from their first query
            starts = torch.arange(have, need, device=q.device)
            rq = q[:, :, starts * b - offset] if self.router_query == "first" else None
            new = self.route(rq, self.repeat_kv(means[:, :, : need - 1]), valid[:, : need - 1], starts)
            K = max(blocks.shape[-1], new.shape[-1])
            pad = lambda x: torch.nn.functional.pad(x, (0, K - x.shape[-1]), value=-1)  # noqa: E731
            blocks = torch.cat([pad(blocks), pad(new)], dim=2)
            cache.extra["blocks"] = blocks
        routes = BlockRoutes(blocks, b, self.causal)
        mask = routes.rows(torch.arange(offset, offset + T, device=q.device), S)  # (B, H, T, S): the new rows
        k_all, v_all = self.repeat_kv(k_all), self.repeat_kv(v_all)
        return reference_attention(q, k_all, v_all, mask, None if keep is None else ~keep), routes
