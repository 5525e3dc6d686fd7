"""Dense multi-head attention (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d)) V.

The baseline every routed kind is compared with, and the reference the sparse kinds must equal
under their own masks. Runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.attention.base import KVCache, RotaryEmbedding, causal_mask
from routelab.options import AttentionConfig
from routelab.registry import ATTENTION


@dataclass
class DenseAttentionConfig(AttentionConfig):
    """Dense attention has no options beyond the base (kind, dropout)."""


class QKVAttention(nn.Module):
    """Projections, RoPE and the cache shared by attention kinds; subclasses implement ``attend``.

    Parameter names follow common checkpoints: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
    """

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg.attention
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.layer_idx = layer_idx
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_base, cfg.max_seq_len) if cfg.positions == "rope" else None

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_routes: bool = False,
    ):
        """Shapes: B batch, T new tokens, S keys (T, or cached + T), H heads, hd head dim, D model dim.

        Args:
            x: (B, T, D).
            padding_mask: bool (B, S), True = padding (never attended to). With a cache it covers
                all S keys.
            cache: a ``KVCache`` to read and extend (incremental decoding), or None.
            return_routes: also return what a learned kind chose (None for fixed patterns).
        Returns:
            (B, T, D), or ((B, T, D), routes) with ``return_routes``.
        """
        B, T, D = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope.rotate(q, offset), self.rope.rotate(k, offset)
        out, routes = self.attend_routes(q, k, v, padding_mask, cache)  # (B, H, T, hd)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, D))
        return (out, routes) if return_routes else out

    def attend_routes(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache | None):
        """Extend the cache, then ``attend``; kinds with their own cache policy or routes override this."""
        offset = cache.offset if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, hd)
        return self.attend(q, k, v, padding_mask, offset), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        """q: (B, H, T, hd), k/v: (B, H, S, hd), queries at absolute positions offset.. -> (B, H, T, hd).

        Kinds implement this, or override ``attend_routes`` (own cache policy, learned routes).
        """
        raise NotImplementedError(f"{type(self).__name__} must define attend or attend_routes (abstract hook)")

    @property
    def dropout_p(self) -> float:
        return self.cfg.dropout if self.training else 0.0


def dense_mask(q_len: int, k_len: int, offset: int, causal: bool, padding_mask: Tensor | None, device) -> Tensor | None:
    """Bool mask broadcastable to (B, H, T, S), True = may attend; None when nothing is masked."""
    mask = None
    if causal:
        mask = causal_mask(q_len, k_len, offset, device)[None, None]  # (1, 1, T, S)
    if padding_mask is not None:
        keep = ~padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
    return mask


@ATTENTION.register("dense", DenseAttentionConfig)
class DenseAttention(QKVAttention):
    """Full attention through SDPA: causal, bidirectional, with padding and a KV cache."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        if padding_mask is None and (not self.causal or T == 1):
            mask = None  # one new token sees every cached key; encoders see everything
        elif padding_mask is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout_p)
        else:
            mask = dense_mask(T, S, offset, self.causal, padding_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p)

    def mask(self, seq_len: int) -> Tensor:
        """Bool (seq_len, seq_len), True = may attend."""
        if self.causal:
            return causal_mask(seq_len, seq_len, 0, self.q_proj.weight.device)
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.q_proj.weight.device)
