"""Fixed attention patterns on the block-sparse engine: the token band, sliding windows of key
blocks, and ``SparsePatternAttention``, the base of every kind defined by a predicate ``allow(i, j)``.

Child et al. 2019 ("Generating Long Sequences with Sparse Transformers", eq. 2-3): a fixed kind is a
connectivity pattern S_i = {j : allow(i, j)}. The band |i - j| <= w (0 <= i - j <= w if causal) is
the local window of Beltagy et al. 2020 ("Longformer", sec. 3.1) and of Child et al.'s local heads;
``band_parts`` lays it out as query blocks of b with their key windows [s - w, s + b (+ w)).
"""

from __future__ import annotations

import torch
from torch import Tensor

import routelab.attention.flex as flex
from routelab.attention.engine import Part, Spec, Windows, attend_parts, reference_attention, spec_positions


def band(i: Tensor, j: Tensor, window: int, causal: bool) -> Tensor:
    """True where key j is within ``window`` of query i: |i - j| <= w, or 0 <= i - j <= w if causal."""
    d = i - j
    return (d >= 0) & (d <= window) if causal else d.abs() <= window


def band_parts(T: int, window: int, block_size: int, causal: bool, device) -> list[Part]:
    """The band |i - j| <= w (0 <= i - j <= w if causal) as query blocks of b with their key windows
    [s - w, s + b (+ w)): exact token windows, strided views of K/V, one shared interior mask."""
    length = min(block_size, T) + window * (1 if causal else 2)
    return sliding_parts(T, block_size, -window, length, lambda i, j: band(i, j, window, causal), device)


def sliding_parts(T: int, block: int, offset: int, length: int, allow, device=None, first: int = 0) -> list[Part]:
    """Query blocks [first * b, T) of b tokens, block s seeing the keys [s + offset, s + offset + length).

    ``allow(i, j)`` must depend only on i - j inside a window (a band, a block window): interior
    blocks, whose key window lies inside [0, T), then share one (b, length) mask that stays in cache
    and their windows are strided views of K/V (no copy, no padding). The few edge blocks gather
    their windows, with slots outside [0, T) masked. The parts own disjoint query rows.
    """
    b = min(block, T)
    nb = -(-T // b)
    if first >= nb:
        return []
    lo = max(first, min(-(-max(-offset, 0) // b), nb))  # first block whose window starts at >= 0
    hi = max(min((T - offset - length) // b + 1, nb), lo)  # one past the last whose window ends <= T
    parts = []
    if hi > lo:
        queries, keys = Windows(lo * b, b, b, hi - lo), Windows(lo * b + offset, b, length, hi - lo)
        first_q, first_k = Windows(lo * b, b, b, 1), Windows(lo * b + offset, b, length, 1)
        parts.append(Part(queries, keys, pair_mask(allow, first_q, first_k, device)))  # (1, 1, b, length)
    for start, count in ((first, lo - first), (hi, nb - hi)):
        if count > 0:  # edge blocks gather their key windows; slots outside [0, T) are masked
            queries = Windows(start * b, b, b, count)
            keys = Windows(start * b + offset, b, length, count).positions(device)
            keys = torch.where((keys >= 0) & (keys < T), keys, -1)
            parts.append(Part(queries, keys, pair_mask(allow, queries, keys, device)))
    return parts


def pair_mask(allow, queries: Spec, keys: Spec, device=None) -> Tensor:
    """allow(i, j) evaluated on a part's slots: (1, G, Lq, Lk) bool (or per-head (H, G, Lq, Lk))."""
    qpos, kpos = spec_positions(queries, device), spec_positions(keys, device)
    m = allow(qpos[..., :, None], kpos[..., None, :])
    return m if m.dim() == 4 else m[None]


class SparsePatternAttention:
    """Mixin for fixed patterns: a token predicate ``allow(i, j)`` plus a plan of ``parts(T)``.

    Subclasses (with ``QKVAttention``) implement ``allow`` (True = query i may see key j; includes
    causality) and ``build_parts``. The full forward runs the block-sparse engine; incremental
    decoding (queries at an offset over cached keys) evaluates ``allow`` on the new rows only,
    which is O(T * S), like dense decoding.
    """

    max_cached_plans = 8

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define allow (abstract hook of the mixin)")

    def build_parts(self, T: int, device) -> list[Part]:
        raise NotImplementedError(f"{type(self).__name__} must define build_parts (abstract hook of the mixin)")

    def parts(self, T: int, device) -> list[Part]:
        cache = self.__dict__.setdefault("_plans", {})
        key = (T, str(device))
        if key not in cache:
            if len(cache) >= self.max_cached_plans:
                cache.clear()
            cache[key] = self.build_parts(T, device)
        return cache[key]

    def flex_mask_mod(self, T: int, device):
        """FlexAttention's token predicate ``(b, h, q, kv) -> bool`` in partial blocks: ``allow``, or a
        table lookup where ``allow`` is not elementwise (BigBird, Longformer override this)."""
        return lambda b, h, q, kv: self.allow(q, kv)

    def flex_block_mask(self, T: int, device):
        """The pattern's ``BlockMask`` (see ``flex.pattern_block_mask``), cached per length and device."""
        cache = self.__dict__.setdefault("_flex_masks", {})
        key = (T, str(device))
        if key not in cache:
            if len(cache) >= self.max_cached_plans:
                cache.clear()
            cache[key] = flex.pattern_block_mask(self.parts(T, device), T, self.flex_mask_mod(T, device), device=device)
        return cache[key]

    def mask(self, seq_len: int) -> Tensor:
        """Bool (seq_len, seq_len), True = may attend (per head (H, T, T) for BigBird)."""
        pos = torch.arange(seq_len, device=self.q_proj.weight.device)
        return self.allow(pos[:, None], pos[None, :])

    def attended_pairs(self, seq_len: int) -> float:
        """(query, key) pairs per head that the pattern allows (for FLOP reports)."""
        m = self.mask(seq_len)
        return float(m.sum()) / (m.shape[0] if m.dim() == 3 else 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        k, v = self.repeat_kv(k), self.repeat_kv(v)  # (B, Hkv, S, hd) -> (B, H, S, hd): per-head engine parts
        if offset == 0 and T == S:
            backend = flex.choose_backend(self.cfg, q, padding_mask, self.dropout_p)
            if backend == "dense":  # the reference: O(T^2) mask
                return reference_attention(q, k, v, self.mask(T).to(q.device), padding_mask)

            def run_flex() -> Tensor:
                return flex.flex_attend(q, k, v, self.flex_block_mask(T, q.device))

            def run_engine() -> Tensor:
                parts = self.parts(T, q.device)
                return attend_parts(q, k, v, parts, padding_mask=padding_mask, dropout_p=self.dropout_p)

            return flex.with_flex_fallback(self, run_flex, run_engine) if backend == "flex" else run_engine()
        # decoding: the new rows of the pattern over the cached keys (keys are the last S positions)
        qpos = torch.arange(offset, offset + T, device=q.device)
        kpos = torch.arange(offset + T - S, offset + T, device=q.device)
        mask = self.allow(qpos[:, None], kpos[None, :])
        pad = padding_mask[:, -S:] if padding_mask is not None else None
        return reference_attention(q, k, v, mask, pad)
