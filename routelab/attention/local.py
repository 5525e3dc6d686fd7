"""Local (sliding-window) attention: each token sees the tokens within w positions.

Token-exact window (as in Beltagy et al. 2020, "Longformer", sec. 3.1, and the local heads of
Child et al. 2019): bidirectional |i - j| <= w; causal 0 <= i - j <= w. Work and memory are
O(n (w + b)) for block size b: query block [s, s + b) reads the key window [s - w, s + b (+ w)),
a strided view of K/V (no copy), under an exact token mask.

Decoding keeps only the last w keys: memory is constant in the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.attention.base import KVCache, QKVAttention
from routelab.attention.engine import Part, reference_attention
from routelab.attention.flex import SparseAttentionConfig
from routelab.attention.patterns import SparsePatternAttention, band, band_parts
from routelab.errors import check_positive
from routelab.registry import ATTENTION


@dataclass
class LocalAttentionConfig(SparseAttentionConfig):
    """A token-exact sliding window."""

    window: int = 128  # w: bidirectional |i-j| <= w, causal 0 <= i-j <= w
    block_size: int = 64  # query block of the block-sparse engine (speed only; results are exact)
    flex_inference: bool = False  # also on CPU: compiled FlexAttention without autograd (a slow compile per shape)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "window", "block_size")


@ATTENTION.register("local", LocalAttentionConfig)
class LocalAttention(SparsePatternAttention, QKVAttention):
    """Sliding-window attention through the block-sparse engine; the decoding cache keeps w keys."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.window = cfg.attention.window
        self.block_size = cfg.attention.block_size

    def allow(self, i: Tensor, j: Tensor) -> Tensor:
        return band(i, j, self.window, self.causal)

    def build_parts(self, T: int, device) -> list[Part]:
        return band_parts(T, self.window, self.block_size, self.causal, device)

    def attend_routes(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache | None):
        if cache is None:
            return self.attend(q, k, v, padding_mask, 0), None
        offset, T = cache.offset, q.shape[2]
        k_all, v_all = cache.append(k, v)  # (B, Hkv, S, hd): at most w kept + T new
        S = k_all.shape[2]
        if offset == 0 and S == T:
            out = self.attend(q, k_all, v_all, padding_mask, 0)
        else:
            qpos = torch.arange(offset, offset + T, device=q.device)
            kpos = torch.arange(offset + T - S, offset + T, device=q.device)
            pad = padding_mask[:, -S:] if padding_mask is not None else None
            allowed = self.allow(qpos[:, None], kpos[None, :])
            out = reference_attention(q, self.repeat_kv(k_all), self.repeat_kv(v_all), allowed, pad)
        if S > self.window:  # the next query needs only the last w keys
            cache.k, cache.v = k_all[:, :, -self.window :].clone(), v_all[:, :, -self.window :].clone()
        return out, None
