"""Pieces shared by attention kinds: the builder, ``QKVAttention`` (the base module of the
projection-based kinds), rotary embeddings, the KV cache, the causal mask, and the block's combine.

Rotary position embedding: Su et al. 2021, "RoFormer", eq. (34): each pair of query/key channels
(2i, 2i+1) at position m is rotated by angle m * theta_i, theta_i = base^(-2i/d).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from routelab.errors import ConfigError
from routelab.registry import ATTENTION


def build_attention(cfg, layer_idx: int = 0) -> nn.Module:
    """Build the attention module that ``cfg.attention.kind`` names.

    Args:
        cfg: the ``ModelConfig`` (sizes, heads, causality and positions come from it; kind-specific
            options from ``cfg.attention``). The whole model config is passed, not only the section,
            because every kind needs d_model, n_heads, causal and the position scheme.
        layer_idx: index of the block, so kinds with per-layer randomness (BigBird) can seed by it.
    """
    entry = ATTENTION.get(cfg.attention.kind)
    if getattr(cfg.attention, "task_conditioned", False):
        check_task_conditioned(cfg, entry.module_class)
    return entry.module_class(cfg, layer_idx=layer_idx)


def check_task_conditioned(cfg, module_class) -> None:
    """``model.attention.task_conditioned`` needs a multi-task model and a kind with a learned router
    input (``module_class.task_conditionable``); otherwise one ``ConfigError`` line."""
    kind = cfg.attention.kind
    if cfg.task_names is None:
        raise ConfigError(
            "model.attention.task_conditioned=True needs a multi-task model (model.task_names / data.tasks);"
            " allowed for one task: false"
        )
    if not getattr(module_class, "task_conditionable", False):
        allowed = ATTENTION.names_where("task_conditionable")
        raise ConfigError(
            f"model.attention.task_conditioned=True is invalid for attention kind {kind!r}, which has no learned"
            f" router input to condition (moba, block_topp and kmeans route by hard choices from q and k, which would"
            f" give a routing-only task vector no gradient); allowed with: {', '.join(allowed)}"
        )


def task_vectors(table: Tensor, task_ids: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """The rows of a per-task table (N, ...) for each token's task: task_ids (B, T) -> (B, T, ...);
    None = task 0 (broadcast to ``shape`` = (B, T)), as the MoE routers' task conditioning."""
    if task_ids is None:
        return table[0].expand(*shape, *table.shape[1:])
    if task_ids.shape != tuple(shape):
        raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, expected one per token {tuple(shape)}")
    if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= table.shape[0]):
        raise ValueError(f"task ids must lie in 0..{table.shape[0] - 1} (the model's tasks)")
    return table[task_ids]


class RotaryEmbedding(nn.Module):
    """RoPE tables, extended on demand; ``rotate(x, offset)`` rotates ``x: (B, H, T, hd)``."""

    def __init__(self, head_dim: int, base: float = 10000.0, max_seq_len: int = 2048) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (n, hd/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """x: (B, H, T, hd) -> same shape, rotated for positions offset .. offset+T-1."""
        T = x.shape[-2]
        if offset + T > self.cos.shape[0]:
            self._build(max(offset + T, 2 * self.cos.shape[0]))
        cos = self.cos[offset : offset + T].to(x.dtype)  # (T, hd/2)
        sin = self.sin[offset : offset + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, hd/2) each: channel pairs (2i, 2i+1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
        return out.flatten(-2)


@dataclass
class KVCache:
    """Keys and values seen so far by one attention layer, for incremental decoding.

    ``k``/``v`` are (B, Hk, S, hd) or None before the first step: the cache stores what it is given,
    which for ``QKVAttention`` kinds is the key/value heads (Hk = n_kv_heads; kmeans keeps its
    shared-QK keys at n_heads). ``offset`` is the absolute position of the next token (equal to S
    for kinds that keep everything; kinds that evict keys keep ``offset`` counting while S stays
    bounded).
    """

    k: Tensor | None = None
    v: Tensor | None = None
    offset: int = 0
    extra: dict = field(default_factory=dict)  # kind-specific state (e.g. cluster assignments)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new k, v (B, Hk, T, hd); return all keys/values (B, Hk, S+T, hd)."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.offset += k.shape[2]
        return self.k, self.v


class QKVAttention(nn.Module):
    """Projections, RoPE and the cache shared by attention kinds; subclasses implement ``attend``.

    Parameter names follow common checkpoints: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
    Grouped-query attention (``model.n_kv_heads`` < ``n_heads``; Ainslie et al. 2023): ``k_proj`` and
    ``v_proj`` map to ``n_kv_heads * head_dim`` and each key/value head serves ``n_heads / n_kv_heads``
    query heads. ``attend_routes`` and ``attend`` receive keys/values with their ``n_kv_heads`` heads,
    and the ``KVCache`` stores exactly those: a decoding cache is ``n_heads / n_kv_heads`` times
    smaller than one of repeated heads. Heads are repeated (``repeat_kv``) only where attention is
    computed, by the kinds that need ``n_heads`` of them; dense SDPA broadcasts them instead
    (``enable_gqa``) where its kernel takes grouped heads (``dense.sdpa_broadcasts_kv``).

    No kind built on it is task-conditionable: their routes (moba, block_topp blocks, kmeans
    clusters) are hard choices from q and k, so a routing-only task vector would get no gradient.
    ``forward`` accepts ``task_ids`` and ignores it.
    """

    task_conditionable = False  # kinds with a learned router input (synthesizer) set True

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg.attention
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.layer_idx = layer_idx
        d, d_kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
        qkv_bias, o_bias = cfg.attn_bias != "none", cfg.attn_bias == "all"
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, d_kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, d_kv, bias=qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=o_bias)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_base, cfg.max_seq_len) if cfg.positions == "rope" else None
        self._flex_failed = False  # FlexAttention failed here once: the engine from then on (flex.with_flex_fallback)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def _kv_heads(self, x: Tensor) -> Tensor:
        """(B, T, Hkv * hd) -> (B, Hkv, T, hd), without repeating (see ``repeat_kv``)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)

    def repeat_kv(self, x: Tensor) -> Tensor:
        """(B, Hkv, T, hd) -> (B, H, T, hd): key/value head g serves query heads g*r .. g*r+r-1.
        A copy when r > 1: call it where attention is computed, never on what the cache keeps."""
        r = self.n_heads // self.n_kv_heads
        return x if r == 1 else x.repeat_interleave(r, dim=1)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_routes: bool = False,
        task_ids: Tensor | None = None,
    ):
        """Shapes: B batch, T new tokens, S keys (T, or cached + T), H heads, hd head dim, D model dim.

        Args:
            x: (B, T, D).
            padding_mask: bool (B, S), True = padding (never attended to). With a cache it covers
                all S keys.
            cache: a ``KVCache`` to read and extend (incremental decoding), or None.
            return_routes: also return what a learned kind chose (None for fixed patterns).
            task_ids: (B, T) each token's task; ignored (no kind built on this class is task-conditioned).
        Returns:
            (B, T, D), or ((B, T, D), routes) with ``return_routes``.
        """
        B, T, D = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._kv_heads(self.k_proj(x)), self._kv_heads(self.v_proj(x))
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope.rotate(q, offset), self.rope.rotate(k, offset)
        out, routes = self.attend_routes(q, k, v, padding_mask, cache)  # k, v: (B, Hkv, T, hd) -> (B, H, T, hd)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, D))
        return (out, routes) if return_routes else out

    def attend_routes(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache | None):
        """q: (B, H, T, hd), k/v: (B, Hkv, T, hd). Extend the cache with the key/value heads as they
        are, then ``attend``; kinds with their own cache policy or routes override this."""
        offset = cache.offset if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, S, hd)
        return self.attend(q, k, v, padding_mask, offset), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        """q: (B, H, T, hd), k/v: (B, Hkv, S, hd), queries at absolute positions offset.. -> (B, H, T, hd).

        Kinds implement this (repeating k/v with ``repeat_kv`` where they need H heads), or override
        ``attend_routes`` (own cache policy, learned routes).
        """
        raise NotImplementedError(f"{type(self).__name__} must define attend or attend_routes (abstract hook)")

    @property
    def dropout_p(self) -> float:
        return self.cfg.dropout if self.training else 0.0


class Combine(nn.Module):
    """How a block merges the attention output a into the stream x (``attention.combine``).

    ``add``: x + a (the residual). ``concat``: a linear map of [x; a], parameterised as
    x + a + W [x; a] + b, so it starts near the residual and weight decay pulls it back there.
    """

    def __init__(self, d_model: int, mode: str = "add") -> None:
        super().__init__()
        self.mode = mode
        self.proj = nn.Linear(2 * d_model, d_model) if mode == "concat" else None

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        if self.proj is None:
            return x + a
        return x + a + self.proj(torch.cat([x, a], dim=-1))


def causal_mask(q_len: int, k_len: int, offset: int, device: torch.device) -> Tensor:
    """Bool (q_len, k_len), True = may attend: query i (absolute offset+i) sees keys j <= offset+i.

    Keys are assumed to start at absolute position ``offset + q_len - k_len``.
    """
    q_pos = torch.arange(q_len, device=device) + offset
    k_pos = torch.arange(k_len, device=device) + (offset + q_len - k_len)
    return k_pos[None, :] <= q_pos[:, None]
