"""Dense multi-head attention (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d)) V.

The baseline every routed kind is compared with, and the reference the sparse kinds must equal
under their own masks. Runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab.attention.base import QKVAttention, causal_mask
from routelab.options import AttentionConfig
from routelab.registry import ATTENTION


@dataclass
class DenseAttentionConfig(AttentionConfig):
    """Dense attention has no options beyond the base (kind, dropout)."""


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
