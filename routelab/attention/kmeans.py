"""Routing attention with online k-means (Roy et al. 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers", Algorithm 1 and eq. 8-10).

Queries and keys share one projection, normalised by a LayerNorm without scale or bias (Alg. 1:
K <- Q; Q <- LayerNorm(Q)). Per head, c unit centroids mu route the unit vectors r_i = Q_i / |Q_i|;
a token attends only to tokens routed to its group (and only to the past when causal). Centroids
are buffers updated by an exponential moving average in training mode (eq. 10, not by gradient):
mu_c <- normalize(lambda mu_c + (1 - lambda) mean{r_i : argmax_c' r_i . mu_c' = c}).

Balanced work (Alg. 1 takes the top n/c tokens per centroid):
- encoders ("balanced"): each centroid takes its nearest m = ceil(n / c) tokens; a token a full
  centroid rejects goes to its next-nearest centroid with room (rounds of deferred acceptance,
  at most c), so every token is in exactly one group of <= m tokens;
- causal models ("nearest"): a token joins its nearest centroid, which depends only on itself;
  a centroid's tokens form groups of m = ceil(max_seq_len / c) in arrival order, so group sizes stay
  bounded and a token's group never depends on later tokens (decoding keeps assignments and counts).
Groups are gathered into slots, position-ordered (so causal = slot order): one batched SDPA per size
bucket (m, m/2, m/4, ... slots), so a partly filled group does not pay for a full m x m block.
Option: the first ``local_heads`` heads attend to a local window instead (as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import routelab.attention.flex as flex
from routelab.attention.base import KVCache, QKVAttention
from routelab.attention.engine import Part, attend_parts, reference_attention
from routelab.attention.flex import SparseAttentionConfig
from routelab.attention.patterns import band, band_parts
from routelab.attention.routes import ClusterRoutes
from routelab.errors import ConfigError, check, check_fraction, check_positive
from routelab.precision import in_fp32
from routelab.registry import ATTENTION


@dataclass
class KMeansAttentionConfig(SparseAttentionConfig):
    """Content-based routing by online k-means."""

    num_clusters: int = 4  # c: centroids per head
    ema_decay: float = 0.999  # lambda of the centroid moving average
    local_heads: int = 0  # the first heads use a local window instead of routing (Roy et al.: half)
    window: int = 64  # w of the local heads
    block_size: int = 64  # query block of the local heads (speed only)
    assignment: Literal["auto", "balanced", "nearest"] = "auto"  # auto: balanced (encoder) / nearest (causal)
    backend: Literal["auto", "engine", "flex"] = "auto"  # routed heads (no dense path); auto: FlexAttention on CUDA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_clusters", "window", "block_size")
        check_fraction(self, "ema_decay")
        check(self.local_heads >= 0, "model.attention.local_heads", self.local_heads, "an integer >= 0")


def balanced_clusters(aff: Tensor, real: Tensor, capacity: Tensor) -> Tensor:
    """Each centroid takes its nearest tokens up to ``capacity``; rejected tokens try their next.

    aff: (B, H, T, c) affinities; real: (B, T) bool (padding gets -1); capacity: (B,) tokens per
    centroid. Returns (B, H, T) cluster ids. Rounds of proposals: in round r every unassigned token
    proposes to its r-th nearest centroid, which accepts the best proposals that fit.
    """
    B, H, T, c = aff.shape
    pref = aff.argsort(-1, descending=True)  # (B, H, T, c)
    assigned = torch.full((B, H, T), -1, dtype=torch.long, device=aff.device)
    room = capacity[:, None, None].expand(B, H, c).clone()
    live = real[:, None, :].expand(B, H, T)
    pos = torch.arange(T, device=aff.device)
    for rnd in range(c):  # at most c rounds: a token proposes to each centroid once
        un = live & (assigned < 0)
        if not bool(un.any()):  # a host sync per round, but usually ends in 1-2 of the c rounds
            break
        cand = pref[..., rnd]  # (B, H, T)
        a = aff.gather(-1, cand[..., None])[..., 0]
        key = torch.where(un, cand * 4.0 + (1.0 - a.clamp(-1, 1)), torch.full_like(a, float("inf")))
        order = key.argsort(-1)  # proposals grouped by centroid, best first
        s_cand, s_un = cand.gather(-1, order), un.gather(-1, order)
        counts = F.one_hot(cand, c).mul_(un[..., None]).sum(-2)  # (B, H, c) proposals per centroid
        start = counts.cumsum(-1) - counts
        rank = pos - start.gather(-1, s_cand)
        ok = s_un & (rank < room.gather(-1, s_cand))
        accept = torch.zeros_like(ok).scatter_(-1, order, ok)
        assigned = torch.where(accept, cand, assigned)
        room = room - F.one_hot(cand, c).mul_(accept[..., None]).sum(-2)
    return assigned


def arrival_groups(cluster: Tensor, size: int, start_counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Split each cluster into groups of ``size`` tokens in arrival order.

    cluster: (B, H, T) ids (-1 = none); start_counts: (B, H, c) tokens already in each cluster.
    Returns group ids (B, H, T) (cluster * 2^20 + index of its group; -1 = none) and new counts.
    """
    c = start_counts.shape[-1] if start_counts is not None else int(cluster.max()) + 1
    c = max(c, 1)
    onehot = F.one_hot(cluster.clamp(min=0), c) * (cluster >= 0)[..., None]  # (B, H, T, c)
    seen = onehot.cumsum(-2)
    if start_counts is not None:
        seen = seen + start_counts[..., None, :]
    rank = seen.gather(-1, cluster.clamp(min=0)[..., None])[..., 0] - 1  # tokens before it in its cluster
    groups = torch.where(cluster >= 0, cluster * (1 << 20) + rank // size, -1)
    return groups, seen[..., -1, :] if seen.shape[-2] else start_counts


def group_slots(groups: Tensor, size: int, min_size: int = 16) -> tuple[list[Tensor], Tensor]:
    """Tokens -> slot positions per size bucket, grouped and position-ordered (-1 = empty slot).

    groups: (BH, T) group ids (-1 = none), every group of at most ``size`` tokens. A group of n
    tokens goes to the smallest bucket of size / 2^k slots that holds it (>= ``min_size``), so a
    partly filled group does not cost a full (size x size) attention. Returns the buckets'
    (BH, G_k, size_k) slot tensors, largest first, and dense group indices (BH, T) (-1 = none).
    """
    BH, T = groups.shape
    device = groups.device
    key = torch.where(groups >= 0, groups, torch.iinfo(torch.long).max)
    order = torch.sort(key, dim=-1, stable=True).indices  # by group, then by position
    g_sorted = groups.gather(-1, order)
    real = g_sorted >= 0
    new = torch.ones_like(real)
    new[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
    dense_sorted = new.long().cumsum(-1) - 1  # dense group index in sorted order
    pos = torch.arange(T, device=device).expand(BH, T)
    slot_sorted = pos - torch.where(new, pos, 0).cummax(-1).values  # rank inside the group
    # n and count below size tensors (host syncs that cannot go): the buckets hold exactly the groups there are
    n = int(torch.where(real, dense_sorted + 1, 0).max()) if T else 0
    dense = torch.full_like(groups, -1).scatter_(1, order, torch.where(real, dense_sorted, -1))
    if n == 0:
        return [torch.full((BH, 1, size), -1, dtype=torch.long, device=device)], dense
    sizes = torch.zeros(BH, n + 1, dtype=torch.long, device=device)
    sizes.scatter_add_(1, torch.where(real, dense_sorted, n), real.long())
    sizes = sizes[:, :n]  # (BH, n) tokens per group
    caps = [size]
    while caps[-1] // 2 >= min_size:
        caps.append(caps[-1] // 2)
    bucket = torch.zeros_like(sizes)
    for cap in caps[1:]:  # a few halvings of the group size, not a loop over groups
        bucket += (sizes <= cap).long()
    slots = []
    for k, cap in enumerate(caps):
        mine = (bucket == k) & (sizes > 0)
        rank = mine.long().cumsum(-1) - 1  # index of the group inside its bucket
        count = int(mine.sum(-1).max())
        if count == 0:
            continue
        tok_rank = rank.gather(1, dense_sorted.clamp(max=n - 1))
        tok_in = real & mine.gather(1, dense_sorted.clamp(max=n - 1))
        flat = torch.where(tok_in, tok_rank * cap + slot_sorted, count * cap)  # others -> dropped column
        out = torch.full((BH, count * cap + 1), -1, dtype=torch.long, device=device)
        out.scatter_(1, flat, torch.where(tok_in, order, -1))
        slots.append(out[:, :-1].view(BH, count, cap))
    return slots, dense


@ATTENTION.register("kmeans", KMeansAttentionConfig)
class KMeansAttention(QKVAttention):
    """Routing Transformer attention: shared normalised QK, EMA k-means centroids, grouped SDPA."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.k_proj = None  # keys are the (shared) queries
        self.num_clusters, self.ema_decay = a.num_clusters, a.ema_decay
        self.local_heads, self.window, self.block_size = a.local_heads, a.window, a.block_size
        check(
            a.local_heads <= cfg.n_heads,
            "model.attention.local_heads",
            a.local_heads,
            f"<= model.n_heads={cfg.n_heads}",
        )
        if a.assignment == "balanced" and cfg.causal:
            raise ConfigError(
                "model.attention.assignment='balanced' is invalid for a causal model (model.causal=true): "
                "the nearest-n/c choice reads the whole sequence, so a token's group would depend on later "
                "tokens; allowed: 'nearest' or 'auto'"
            )
        self.assignment = a.assignment if a.assignment != "auto" else ("nearest" if cfg.causal else "balanced")
        self.group_size = -(-cfg.max_seq_len // a.num_clusters)  # m for arrival-order groups
        mu = F.normalize(torch.randn(cfg.n_heads - a.local_heads, a.num_clusters, self.head_dim), dim=-1)
        self.register_buffer("centroids", mu)  # (H_routed, c, hd), unit rows; moved only by the EMA

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_routes: bool = False,
        task_ids: Tensor | None = None,
    ):
        """x: (B, T, D) -> (B, T, D) [, ClusterRoutes]. Shapes: H heads, hd head dim, c clusters.
        task_ids is accepted and ignored: kmeans is not task-conditionable (queries and keys share
        one clustering, so a query-only task vector would move the keys too)."""
        B, T, D = x.shape
        r = F.layer_norm(self._heads(self.q_proj(x)), (self.head_dim,))  # (B, H, T, hd), shared Q = K
        v = self._kv_heads(self.v_proj(x))  # (B, Hkv, T, hd)
        offset = cache.offset if cache is not None else 0
        q = self.rope.rotate(r, offset) if self.rope is not None else r
        if cache is None:
            out, routes = self._full(r, q, self.repeat_kv(v), padding_mask)
        else:
            out, routes = self._decode(r, q, v, padding_mask, cache)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, D))
        return (out, routes) if return_routes else out

    @torch.no_grad()
    @in_fp32
    def assign(self, r: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """Routed heads' vectors r (B, Hr, T, hd), real (B, T) -> (nearest, routed) cluster ids (B, Hr, T)."""
        aff = F.normalize(r.float(), dim=-1) @ self.centroids.float().transpose(-1, -2)  # (B, Hr, T, c)
        nearest = torch.where(real[:, None, :], aff.argmax(-1), -1)
        if self.assignment == "nearest":
            return nearest, nearest
        capacity = (real.sum(-1) + self.num_clusters - 1) // self.num_clusters  # m = ceil(n / c) per row
        return nearest, balanced_clusters(aff, real, capacity)

    @torch.no_grad()
    @in_fp32
    def update_centroids(self, r: Tensor, nearest: Tensor) -> None:
        """EMA step (training only): mu <- normalize(lambda mu + (1 - lambda) mean of assigned r)."""
        c = self.num_clusters
        onehot = F.one_hot(nearest.clamp(min=0), c).to(r.dtype) * (nearest >= 0)[..., None]  # (B, Hr, T, c)
        sums = torch.einsum("bhtc,bhtd->hcd", onehot, F.normalize(r, dim=-1))
        counts = onehot.sum((0, 2))[..., None]  # (Hr, c, 1)
        mean = sums / counts.clamp(min=1)
        moved = F.normalize(self.ema_decay * self.centroids + (1 - self.ema_decay) * mean, dim=-1)
        self.centroids.copy_(torch.where(counts > 0, moved, self.centroids))

    def _groups(self, cluster: Tensor) -> Tensor:
        if self.assignment == "nearest":
            return arrival_groups(
                cluster,
                self.group_size,
                torch.zeros(*cluster.shape[:2], self.num_clusters, dtype=torch.long, device=cluster.device),
            )[0]
        return cluster

    def _full(self, r: Tensor, q: Tensor, v: Tensor, padding_mask: Tensor | None):
        B, H, T, hd = q.shape
        lh = self.local_heads
        real = ~padding_mask if padding_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        nearest, cluster = self.assign(r[:, lh:], real)
        if self.training:
            self.update_centroids(r[:, lh:].detach(), nearest)
        groups = self._groups(cluster)  # (B, Hr, T)
        outs = []
        if lh:
            parts = band_parts(T, self.window, self.block_size, self.causal, q.device)
            outs.append(
                attend_parts(
                    q[:, :lh], q[:, :lh], v[:, :lh], parts, padding_mask=padding_mask, dropout_p=self.dropout_p
                )
            )
        if lh < H:
            Hr = H - lh
            m = (
                self.group_size
                if self.assignment == "nearest"
                else int((real.sum(-1).max() + self.num_clusters - 1) // self.num_clusters)  # a shape: host sync
            )
            buckets, dense = group_slots(groups.reshape(B * Hr, T), max(m, 1))
            qr, vr = q[:, lh:], v[:, lh:]

            def run_flex() -> Tensor:
                return flex.flex_grouped(qr, qr, vr, groups, self.causal)

            def run_engine() -> Tensor:  # a token is in one group: exclusive parts; empty slots trail each group
                parts = [Part(sl, sl, None, causal=self.causal, trusted=self.causal, exclusive=True) for sl in buckets]
                return attend_parts(qr, qr, vr, parts, dropout_p=self.dropout_p)

            # padding is in the groups (padded tokens have none), so it does not force the engine
            on_flex = flex.choose_backend(self.cfg, q, None, self.dropout_p) == "flex"
            outs.append(flex.with_flex_fallback(self, run_flex, run_engine) if on_flex else run_engine())
            groups = dense.view(B, Hr, T)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        full_groups = torch.cat([torch.full((B, lh, T), -1, dtype=torch.long, device=q.device), groups], 1)
        full_clusters = torch.cat([torch.full((B, lh, T), -1, dtype=torch.long, device=q.device), cluster], 1)
        stats = {}
        if lh < H:
            sizes = torch.zeros(B * (H - lh), T + 1, dtype=torch.long, device=q.device)
            sizes.scatter_add_(1, torch.where(dense >= 0, dense, T), torch.ones_like(dense))
            sizes = sizes[:, :T]
            stats = {"max_group": sizes.max(), "mean_groups": (sizes > 0).sum(-1).float().mean()}  # 0-d: no sync
        return out, ClusterRoutes(full_groups, full_clusters, self.causal, lh, self.window, stats)

    # ------------------------------------------------------------------------------------------
    def attended_pairs(self, seq_len: int) -> float:
        """Pairs per head with full groups (m = n / c tokens; local heads: their window), averaged."""
        m = self.group_size if self.assignment == "nearest" else -(-seq_len // self.num_clusters)
        m = min(m, seq_len)
        routed = seq_len * ((m + 1) / 2 if self.causal else m)
        w = min(self.window, seq_len - 1)
        local = (w + 1) * seq_len - w * (w + 1) / 2 if self.causal else (2 * w + 1) * seq_len - w * (w + 1)
        H = self.n_heads
        return (self.local_heads * local + (H - self.local_heads) * routed) / H

    def flops_per_token(self, seq_len: int) -> float:
        d = self.n_heads * self.head_dim
        routing = 2.0 * (self.n_heads - self.local_heads) * self.head_dim * self.num_clusters
        return 6.0 * d * d + 4.0 * d * self.attended_pairs(seq_len) / seq_len + routing  # no k_proj

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """softmax(q q^T / sqrt(d)) within the groups chosen for x (B, T, D): (B, H, T, T)."""
        T = x.shape[1]
        r = F.layer_norm(self._heads(self.q_proj(x)), (self.head_dim,))
        q = self.rope.rotate(r) if self.rope is not None else r
        training, self.training = self.training, False  # inspecting never moves the centroids
        try:
            _, routes = self._full(r, q, self.repeat_kv(self._kv_heads(self.v_proj(x))), None)
        finally:
            self.training = training
        scores = (q @ q.transpose(-1, -2)) / self.head_dim**0.5
        return scores.masked_fill(~routes.mask(T), float("-inf")).softmax(-1)

    def _decode(self, r: Tensor, q: Tensor, v: Tensor, padding_mask: Tensor | None, cache: KVCache):
        """Cached steps: cluster ids, group ids and per-cluster counts live in ``cache.extra``.

        The keys are the shared queries, one per query head, so ``cache.k`` holds all H heads; only
        the values (``cache.v``) shrink to the Hkv key/value heads under grouped-query attention, and
        are repeated here for the attention of these T tokens."""
        B, H, T, hd = q.shape
        lh, offset = self.local_heads, cache.offset
        k_all, v_all = cache.append(q, v)  # (B, H, S, hd) keys = the shared queries; (B, Hkv, S, hd) values
        S = k_all.shape[2]
        pad = padding_mask[:, -S:] if padding_mask is not None else torch.zeros(B, S, dtype=torch.bool, device=q.device)
        real = ~pad[:, -T:]
        _, cluster = self.assign(r[:, lh:], real)  # nearest: depends on each token alone
        counts = cache.extra.get("counts")
        if counts is None:
            counts = torch.zeros(B, H - lh, self.num_clusters, dtype=torch.long, device=q.device)
        groups, counts = arrival_groups(cluster, self.group_size, counts)
        cache.extra["counts"] = counts
        all_groups = torch.cat([cache.extra["groups"], groups], 2) if "groups" in cache.extra else groups
        cache.extra["groups"] = all_groups
        all_clusters = torch.cat([cache.extra["clusters"], cluster], 2) if "clusters" in cache.extra else cluster
        cache.extra["clusters"] = all_clusters
        qpos = torch.arange(offset, offset + T, device=q.device)
        kpos = torch.arange(S, device=q.device)
        same = (groups[..., :, None] == all_groups[..., None, :]) & (groups[..., :, None] >= 0)  # (B, Hr, T, S)
        mask = torch.cat([band(qpos[:, None], kpos[None, :], self.window, True).expand(B, lh, T, S), same], 1)
        mask = mask & (kpos[None, :] <= qpos[:, None])
        out = reference_attention(q, k_all, self.repeat_kv(v_all), mask, pad)
        lead = torch.full((B, lh, S), -1, dtype=torch.long, device=q.device)
        routes = ClusterRoutes(
            torch.cat([lead, all_groups], 1), torch.cat([lead, all_clusters], 1), True, lh, self.window
        )
        return out, routes
