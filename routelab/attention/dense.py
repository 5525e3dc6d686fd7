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


_SDPA_GQA = torch.__version__ >= (2, 5)  # SDPA's enable_gqa argument


def sdpa_broadcasts_kv(q: Tensor, mask: Tensor | None) -> bool:
    """Whether SDPA gets the key/value heads as they are (``enable_gqa``: nothing repeated in memory)
    rather than repeated to the query heads. On the CPU every SDPA kernel takes grouped heads; on CUDA
    only flash attention does (half precision, no explicit mask): the memory-efficient kernel (fp32,
    masks) does not, and SDPA would fall back to its math kernel, which holds the (T, S) scores."""
    if not _SDPA_GQA:
        return False
    if q.device.type == "cpu":
        return True
    return mask is None and q.dtype in (torch.float16, torch.bfloat16)


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
    """Full attention through SDPA: causal, bidirectional, with padding and a KV cache.

    With grouped-query attention, k/v arrive with n_kv_heads heads (what the cache holds); SDPA
    broadcasts them where it can (``sdpa_broadcasts_kv``), else they are repeated for this call only.
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        mask, is_causal = None, False
        if padding_mask is None and (not self.causal or T == 1):
            pass  # one new token sees every cached key; encoders see everything
        elif padding_mask is None and T == S:
            is_causal = True
        else:
            mask = dense_mask(T, S, offset, self.causal, padding_mask, q.device)
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if sdpa_broadcasts_kv(q, mask):
                gqa = {"enable_gqa": True}
            else:
                k, v = self.repeat_kv(k), self.repeat_kv(v)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout_p, **gqa
        )

    def mask(self, seq_len: int) -> Tensor:
        """Bool (seq_len, seq_len), True = may attend."""
        if self.causal:
            return causal_mask(seq_len, seq_len, 0, self.q_proj.weight.device)
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.q_proj.weight.device)
