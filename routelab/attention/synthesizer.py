"""Synthesizer attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention in Transformer
Models", eq. 1-6): the routing weights are synthesised, not computed from query-key dot products.

- dense (eq. 1-2): for each token, p_i = softmax(W2 ReLU(W1 x_i + b1) + b2) over max_seq_len
  positions, truncated to the actual length, masked for padding and causality, and renormalised;
  a_i = sum_j p_ij v_j with v_j = x_j (the value map G of eq. 2 taken as the identity) or a learned
  value projection (``values: linear``, which also adds an output projection).
- random (eq. 4): p_i = softmax(R_i), R a learned (or fixed) position-by-position matrix.
- factorized (sec. 3.1): W2's output is the product of two short vectors, tiled: C_ij = A_i[j mod a]
  * B_i[j div a] with a * b >= max_seq_len.
- ``mix_dot`` (sec. 3.2, mixture of synthesizers): logits alpha * synthesised + (1 - alpha) *
  q . k / sqrt(d), alpha = sigmoid(learned scalar).
Dense over max_seq_len by definition: this kind builds (T x T) weights.

Task conditioning (``task_conditioned``, dense and factorized variants): a learned, zero-initialised
vector per task ``task_embedding`` (num_tasks, D) is added to x before the router MLP (W1), so the
synthesised weights depend on the task; the values (and mix_dot's q, k) read x unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.attention.base import KVCache, RotaryEmbedding, task_vectors
from routelab.attention.routes import WeightRoutes
from routelab.errors import ConfigError, check, check_positive
from routelab.options import AttentionConfig
from routelab.precision import in_fp32
from routelab.registry import ATTENTION


@dataclass
class SynthesizerAttentionConfig(AttentionConfig):
    """Synthesised routing weights."""

    variant: Literal["dense", "random", "factorized"] = "dense"
    hidden: int | None = None  # width of W1 (dense, factorized); None = d_model
    values: Literal["input", "linear"] = "input"  # v_j = x_j, or v_proj + o_proj
    random_trainable: bool = True  # random variant: R is learned (True) or fixed at init (False)
    mix_dot: bool = False  # mix the synthesised logits with dot-product logits (learned weight)
    max_seq_len: int | None = None  # positions the router scores; None = model.max_seq_len

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden is not None:
            check_positive(self, "hidden")
        if self.max_seq_len is not None:
            check_positive(self, "max_seq_len")


@ATTENTION.register("synthesizer", SynthesizerAttentionConfig)
class SynthesizerAttention(nn.Module):
    """Synthesised attention weights; heads split the value channels as in multi-head attention."""

    task_conditionable = True  # the dense / factorized router MLP reads x (the random variant refuses)

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__()
        a = cfg.attention
        check(cfg.kv_heads == cfg.n_heads, "model.n_kv_heads", cfg.n_kv_heads,
              "null (= n_heads) with attention kind 'synthesizer', whose projections are its own")
        check(cfg.attn_bias == "all", "model.attn_bias", cfg.attn_bias,
              "'all' with attention kind 'synthesizer', whose projections are its own")
        self.cfg, self.causal, self.layer_idx = a, cfg.causal, layer_idx
        self.n_heads, self.head_dim, D = cfg.n_heads, cfg.head_dim, cfg.d_model
        self.max_len = a.max_seq_len or cfg.max_seq_len
        H, L = self.n_heads, self.max_len
        hidden = a.hidden or D
        if a.variant == "dense":
            self.w1, self.w2 = nn.Linear(D, hidden), nn.Linear(hidden, H * L)
        elif a.variant == "factorized":
            self.fa = math.ceil(math.sqrt(L))
            self.fb = math.ceil(L / self.fa)
            self.w1 = nn.Linear(D, hidden)
            self.w2a, self.w2b = nn.Linear(hidden, H * self.fa), nn.Linear(hidden, H * self.fb)
        else:  # random
            R = torch.randn(H, L, L) * 0.02
            if a.random_trainable:
                self.random = nn.Parameter(R)
            else:
                self.register_buffer("random", R)
        self.task_embedding = None
        if getattr(a, "task_conditioned", False):
            if a.variant == "random":
                raise ConfigError(
                    "model.attention.task_conditioned=True is invalid for synthesizer variant 'random', whose"
                    " weights read no input; allowed with variant: 'dense' or 'factorized'"
                )
            self.task_embedding = nn.Parameter(torch.zeros(cfg.num_tasks, D))  # (N, D), zero-init
        if a.values == "linear":
            self.v_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)
        if a.mix_dot:
            self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
            self.mix = nn.Parameter(torch.zeros(()))  # alpha = sigmoid(0) = 1/2
            self.rope = (
                RotaryEmbedding(self.head_dim, cfg.rope_base, cfg.max_seq_len) if cfg.positions == "rope" else None
            )

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def router_input(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (B, T, D) plus each token's task vector (task_ids (B, T); None = task 0); x itself when
        the module is not task-conditioned."""
        if self.task_embedding is None:
            return x
        return x + task_vectors(self.task_embedding, task_ids, tuple(x.shape[:2])).to(x.dtype)

    def logits(self, x: Tensor, offset: int, S: int, task_ids: Tensor | None = None) -> Tensor:
        """Synthesised logits of queries x (B, T, D) at positions offset.. over keys 0..S-1 (as tasks
        task_ids (B, T), when task-conditioned): (B, H, T, S)."""
        B, T, _ = x.shape
        H, L = self.n_heads, self.max_len
        v = self.cfg.variant
        x = self.router_input(x, task_ids)
        if v == "dense":
            out = self.w2(F.relu(self.w1(x))).view(B, T, H, L)[..., :S]
        elif v == "factorized":
            h = F.relu(self.w1(x))
            A = self.w2a(h).view(B, T, H, self.fa)
            Bv = self.w2b(h).view(B, T, H, self.fb)
            out = (Bv[..., :, None] * A[..., None, :]).flatten(-2)[..., :S]  # C_j = A[j mod a] B[j div a]
        else:
            return self.random[None, :, offset : offset + T, :S].expand(B, H, T, S)
        return out.transpose(1, 2)  # (B, H, T, S)

    def attended_pairs(self, seq_len: int) -> float:
        """Dense by definition: every allowed pair gets a synthesised weight."""
        return seq_len * (seq_len + 1) / 2 if self.causal else float(seq_len * seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        a, D, H, L = self.cfg, self.n_heads * self.head_dim, self.n_heads, self.max_len
        hidden = a.hidden or D
        flops = 2.0 * D * self.attended_pairs(seq_len) / seq_len  # sum_j p_ij v_j
        if a.variant == "dense":
            flops += 2.0 * D * hidden + 2.0 * hidden * H * L
        elif a.variant == "factorized":
            flops += 2.0 * D * hidden + 2.0 * hidden * H * (self.fa + self.fb) + H * L
        if a.values == "linear":
            flops += 4.0 * D * D
        if a.mix_dot:
            flops += 4.0 * D * D + 2.0 * D * self.attended_pairs(seq_len) / seq_len
        return flops

    @torch.no_grad()
    def attention_weights(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """The synthesised weights for x (B, T, D) (as tasks task_ids (B, T); None = task 0): (B, H, T, T)."""
        return self.forward(x, return_routes=True, task_ids=task_ids)[1].weights

    @in_fp32
    def probabilities(
        self, x: Tensor, q: Tensor | None, k: Tensor, offset: int, S: int, task_ids: Tensor | None, padding_mask: Tensor | None
    ) -> Tensor:
        """The router's distribution over keys 0..S-1 for queries x (B, T, D) at positions offset..:
        (B, H, T, S), softmax over the allowed keys (eq. 2; with mix_dot, alpha R + (1 - alpha) q k^T /
        sqrt(d)). Computed in float32 under autocast (``routelab.precision``)."""
        T = x.shape[1]
        logits = self.logits(x, offset, S, task_ids)  # (B, H, T, S)
        if q is not None:
            alpha = torch.sigmoid(self.mix)
            logits = alpha * logits + (1 - alpha) * (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = (
                torch.arange(S, device=x.device)[None, :] <= torch.arange(offset, offset + T, device=x.device)[:, None]
            )
        allowed = allowed[None, None]
        if padding_mask is not None:
            allowed = allowed & ~padding_mask[:, None, None, -S:]
        p = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # renormalised over allowed
        return p

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_routes: bool = False,
        task_ids: Tensor | None = None,
    ):
        """x: (B, T, D) -> (B, T, D) [, WeightRoutes]. Shapes: S keys (cached + T), H heads, hd head dim.
        task_ids (B, T): each new token's task, read by the router only when task-conditioned."""
        B, T, D = x.shape
        offset = cache.offset if cache is not None else 0
        if offset + T > self.max_len:
            raise ValueError(
                f"sequence length {offset + T} exceeds the synthesizer's max_seq_len={self.max_len} "
                "(model.attention.max_seq_len): its router scores a fixed number of positions"
            )
        v = self._heads(self.v_proj(x) if self.cfg.values == "linear" else x)  # (B, H, T, hd)
        k = v.new_zeros(B, self.n_heads, T, 0)
        q = None
        if self.cfg.mix_dot:
            q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
            if self.rope is not None:
                q, k = self.rope.rotate(q, offset), self.rope.rotate(k, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        p = self.probabilities(x, q, k, offset, v.shape[2], task_ids, padding_mask)  # (B, H, T, S), fp32
        routes = WeightRoutes(p) if return_routes else None
        p = p.to(v.dtype)
        if self.training and self.cfg.dropout > 0:
            p = F.dropout(p, self.cfg.dropout)
        out = (p @ v).transpose(1, 2).reshape(B, T, D)
        if self.cfg.values == "linear":
            out = self.o_proj(out)
        return (out, routes) if return_routes else out
