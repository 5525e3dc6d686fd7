"""Analytic cost of a model: total and active parameters, forward FLOPs per token.

FLOPs count a multiply-add as 2 (Kaplan et al. 2020, section 2.1, "C_forward ~ 2N"), forward pass
only (training is ~3x). Per token and layer:

- attention: 4 projections, 8 D^2; scores and weighted values, 4 D * (pairs / T), where ``pairs``
  counts only the (query, key) pairs the kind actually computes (T^2, causal T(T+1)/2, or fewer);
- dense FFN: 4 D H (GELU/ReLU) or 6 D H (SwiGLU);
- MoE FFN: the router, 2 D E, plus the *active* experts' FFN FLOPs.

A module may define ``flops_per_token(seq_len) -> float`` (and, for attention, ``attended_pairs``)
to report its own cost; otherwise the formulas above are applied from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Cost:
    """Parameters and forward FLOPs per token of a model at one sequence length."""

    total_params: int
    active_params: int
    attention_flops: float  # per token, all layers
    ffn_flops: float  # per token, all layers
    head_flops: float  # per token (LM head, or the classifier spread over the sequence)
    attention_density: float  # computed pairs / dense pairs (1.0 = dense)

    @property
    def flops_per_token(self) -> float:
        return self.attention_flops + self.ffn_flops + self.head_flops


def dense_pairs(seq_len: int, causal: bool) -> int:
    """Query-key pairs of full attention over ``seq_len`` tokens."""
    return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len


def attended_pairs(attn: nn.Module, seq_len: int, causal: bool) -> int:
    """Pairs an attention module computes: its own count, its static mask, or dense."""
    if hasattr(attn, "attended_pairs"):
        return int(attn.attended_pairs(seq_len))
    if hasattr(attn, "mask"):
        with torch.no_grad():
            return int(attn.mask(seq_len).sum())
    return dense_pairs(seq_len, causal)


def ffn_matmul_flops(d_model: int, hidden: int, activation: str) -> float:
    """One dense FFN (or one expert) per token: 2 matmuls, 3 for SwiGLU."""
    return (6.0 if activation == "swiglu" else 4.0) * d_model * hidden


def ffn_cost(ffn: nn.Module, cfg, seq_len: int) -> tuple[float, int, int]:
    """(FLOPs per token, total params, active params) of one FFN module."""
    total = sum(p.numel() for p in ffn.parameters())
    if hasattr(ffn, "flops_per_token"):
        flops = float(ffn.flops_per_token(seq_len))
        active = int(ffn.active_parameters(seq_len)) if hasattr(ffn, "active_parameters") else total
        return flops, total, active
    f = cfg.ffn
    hidden = f.hidden or cfg.ffn_hidden
    one = ffn_matmul_flops(cfg.d_model, hidden, f.activation)
    if getattr(f, "kind", "dense") != "moe" or not any("experts" in n for n, _ in ffn.named_parameters()):
        return one, total, total  # a dense FFN (also the dense layers of moe_every > 1)
    k = ffn.router.experts_per_token(seq_len)  # each router says how many experts a token costs
    shared = getattr(f, "num_shared_experts", 0)
    flops = 2.0 * cfg.d_model * f.num_experts + (k + shared) * one
    expert_params = sum(p.numel() for n, p in ffn.named_parameters() if ".experts." in f".{n}")
    active = total - expert_params + int(expert_params * min(k, f.num_experts) / f.num_experts)
    return flops, total, active


def model_cost(model: nn.Module, seq_len: int) -> Cost:
    """Parameters and forward FLOPs per token of a ``RoutedTransformer`` at ``seq_len``."""
    cfg = model.cfg
    d = cfg.d_model
    attn_flops = ffn_flops = 0.0
    pairs_sum = dense_sum = 0
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    inactive = 0
    for layer in model.layers:
        attn = layer.attn
        if hasattr(attn, "flops_per_token"):
            attn_flops += float(attn.flops_per_token(seq_len))
            pairs = attended_pairs(attn, seq_len, cfg.causal)
        else:
            pairs = attended_pairs(attn, seq_len, cfg.causal)
            d_kv = cfg.kv_heads * cfg.head_dim  # k/v projections are narrower under grouped-query attention
            attn_flops += 4.0 * d * (d + d_kv) + 4.0 * d * pairs / seq_len
        pairs_sum += pairs
        dense_sum += dense_pairs(seq_len, cfg.causal)
        f, t, a = ffn_cost(layer.ffn, cfg, seq_len)
        ffn_flops += f
        inactive += t - a
    kind, labels = (cfg.task_heads or [cfg.head])[0], (cfg.task_num_labels or [cfg.num_labels])[0]  # multi-task: task 0's head
    out_dim = cfg.vocab_size if kind == "lm" else labels
    head = 2.0 * d * out_dim if kind != "classification" else 2.0 * d * out_dim / seq_len
    return Cost(
        total_params=total,
        active_params=total - inactive,
        attention_flops=attn_flops,
        ffn_flops=ffn_flops,
        head_flops=head,
        attention_density=pairs_sum / max(dense_sum, 1),
    )
