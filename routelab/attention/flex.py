"""The FlexAttention backend (Dong et al. 2024, "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels"): compiled ``flex_attention`` under a ``BlockMask`` for the fixed
patterns (from their engine plans) and the learned block routers (from their routes).

A ``BlockMask`` lists, per query block of F tokens, the key blocks to visit: *full* blocks (every
pair allowed: no mask evaluated) and *partial* ones, where ``mask_mod(b, h, q, kv)`` decides per
pair. Nothing here evaluates a mask over n^2 pairs: fixed patterns count the allowed pairs per
(query block, key block) from the engine's parts (O(sparse work), each allowed pair occurs in
exactly one part), learned routers OR-pool their route-block choices (O(B H (n/b)^2) bools), and
``mask_mod`` is the kind's own token predicate (or a table lookup at block granularity).

Backends (``attention.backend``): ``engine`` (the block-gather engine, any device, autograd),
``flex`` (this file; on CPU forward-only, so with autograd the engine runs instead), ``dense``
(SDPA under the full mask: the reference, O(n^2) memory), ``auto`` (flex on CUDA, else the
engine; ``local.flex_inference`` also picks flex on CPU without autograd). Padding masks and
attention dropout always take the engine. The option is declared once, in ``SparseAttentionConfig``;
a failed FlexAttention call falls back to the engine through ``with_flex_fallback``.
``tests/attention/test_flex_backend.py`` holds every block mask to the kind's ``mask(seq_len)``.
"""

from __future__ import annotations

import functools
import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from routelab.attention.engine import Part, spec_positions
from routelab.errors import check, qualified
from routelab.options import AttentionConfig
from routelab.precision import autocast_dtype

log = logging.getLogger(__name__)

Backend = Literal["auto", "engine", "flex", "dense"]  # the ``attention.backend`` values
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
FLEX_BLOCK = 128  # F: FlexAttention's sparse block (its kernels tile by 128 / 64)
_CHUNK = 1 << 22  # slot pairs per step when counting a part's pairs (bounds the temporary memory)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """(B, H, T, hd) -> (B, H, T, hd) through compiled FlexAttention (differentiable on CUDA)."""
    if q.device.type == "cpu":  # forward only there (``choose_backend`` sends autograd to the engine)
        q, k, v = q.detach(), k.detach(), v.detach()
    # one dtype for all three, as SDPA gets under autocast (which does not see FlexAttention): on CUDA
    # autocast returns layer_norm in float32, so k-means' normed q/k would meet bf16 values
    dtype = autocast_dtype(q.device.type) or v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _compiled_flex()(q, k, v, block_mask=block_mask)


@dataclass
class SparseAttentionConfig(AttentionConfig):
    """Base of the options of the kinds that run on a choice of backend (see the module docstring):
    the fixed patterns, moba, block_topp and kmeans. A kind without some backend redeclares the field
    with a narrower ``Literal`` (kmeans: no dense path); the config loader and ``__post_init__`` both
    refuse the rest with the same line."""

    backend: Backend = "auto"  # auto: FlexAttention on CUDA, the engine on CPU

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = allowed_backends(type(self))
        check(self.backend in allowed, qualified(self, "backend"), self.backend, ", ".join(map(repr, allowed)))


@functools.cache
def allowed_backends(config_class: type) -> tuple[str, ...]:
    """The ``backend`` values a kind's options accept: the ``Literal`` of its ``backend`` field."""
    return typing.get_args(typing.get_type_hints(config_class)["backend"])


def choose_backend(cfg, q: Tensor, padding_mask: Tensor | None, dropout_p: float) -> str:
    """The backend a full forward uses: "flex", "engine" or "dense" (see the module docstring).

    ``cfg``: the kind's attention config (``backend``, and ``flex_inference`` for ``local``).
    """
    backend = getattr(cfg, "backend", "auto")
    if backend in ("engine", "dense"):
        return backend
    if padding_mask is not None or dropout_p > 0 or not flex_available():
        return "engine"
    on_cpu = q.device.type == "cpu"
    no_grad = not torch.is_grad_enabled()
    if backend == "flex":
        return "flex" if (no_grad or not on_cpu) else "engine"  # FlexAttention has no CPU backward
    if not on_cpu and q.device.type == "cuda":
        return "flex"
    return "flex" if getattr(cfg, "flex_inference", False) and no_grad else "engine"


def with_flex_fallback(module, run_flex: Callable[[], Tensor], run_engine: Callable[[], Tensor]) -> Tensor:
    """``run_flex()``, or ``run_engine()`` once FlexAttention has failed in ``module``.

    The first failure (no compiler, old torch, unsupported device) logs one warning and sets
    ``module._flex_failed`` (declared ``False`` by ``QKVAttention``), so each module warns once and
    takes the engine from then on, a visible decision rather than a silent one.
    """
    if not module._flex_failed:
        try:
            return run_flex()
        except Exception as e:  # no compiler, old torch, unsupported device: the engine it is
            module._flex_failed = True
            log.warning("FlexAttention unavailable (%s); using the block-sparse engine", e)
    return run_engine()


# ----------------------------------------------------------------------------------------------
# block masks


def _block_sizes(T: int, F: int, device) -> Tensor:
    """(n,) tokens in each block of F (the last one may be short)."""
    n = -(-T // F)
    return (T - torch.arange(n, device=device) * F).clamp(max=F)


def _to_block_mask(partial: Tensor, full: Tensor | None, F: int, T: int, mask_mod):
    """Bool layouts (B, H, nq, nk) of partial and full blocks -> ``BlockMask`` (indices sorted)."""
    from torch.nn.attention.flex_attention import BlockMask

    def listed(layout: Tensor):
        order = torch.argsort(layout.to(torch.int8), dim=-1, descending=True, stable=True)  # chosen first
        return layout.sum(-1, dtype=torch.int32), order.to(torch.int32)

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full) if full is not None else (None, None)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=F, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def pair_counts(parts: list[Part], T: int, F: int, device) -> Tensor:
    """Allowed (query, key) pairs per (query block, key block) of F tokens: (h, nq, nk) int64,
    h = 1 or the heads of per-head parts. Reads each part's own slots, mask and causality."""
    n = -(-T // F)
    total = torch.zeros(1, n * n, dtype=torch.long, device=device)
    for part in parts:
        qpos = spec_positions(part.queries, device)  # (G, Lq) or (h, G, Lq)
        kpos = spec_positions(part.keys, device)  # (G, Lk) or (h, G, Lk)
        qpos, kpos = qpos if qpos.dim() == 3 else qpos[None], kpos if kpos.dim() == 3 else kpos[None]
        mask = part.mask  # None or (1 | h, G, Lq | 1, Lk)
        heads = max(qpos.shape[0], kpos.shape[0], 1 if mask is None else mask.shape[0])
        G, Lq, Lk = qpos.shape[1], qpos.shape[2], kpos.shape[2]
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril() if part.causal else None
        rows = max(1, min(Lq, _CHUNK // max(1, heads * Lk)))  # query slots per step
        step = max(1, _CHUNK // max(1, heads * Lq * Lk)) if rows == Lq else 1  # groups per step
        counts = torch.zeros(heads, n * n, dtype=torch.long, device=device)
        for g0 in range(0, G, step):  # chunks of groups (and of query slots): bounded temporaries
            for r0 in range(0, Lq, rows):
                qp, kp = qpos[:, g0 : g0 + step, r0 : r0 + rows], kpos[:, g0 : g0 + step]
                ok = ((qp >= 0) & (qp < T))[..., :, None] & ((kp >= 0) & (kp < T))[..., None, :]  # (., g, r, Lk)
                if mask is not None:  # (1 | h, G | 1, Lq | 1, Lk): slice only the dims it has
                    m = mask[:, g0 : g0 + step] if mask.shape[1] > 1 else mask
                    ok = ok & (m[:, :, r0 : r0 + rows] if m.shape[2] > 1 else m)
                if tri is not None:
                    ok = ok & tri[r0 : r0 + rows]
                ok = ok.expand(heads, *ok.shape[1:])
                pair = (qp.clamp(0, T - 1) // F)[..., :, None] * n + (kp.clamp(0, T - 1) // F)[..., None, :]
                pair = pair.expand(heads, *pair.shape[1:])
                for h in range(heads):  # h is 1 or the head count
                    counts[h] += torch.bincount(pair[h][ok[h]], minlength=n * n)
        total = total + counts
    return total.view(-1, n, n)


def pattern_block_mask(parts: list[Part], T: int, mask_mod, F: int = FLEX_BLOCK, device=None):
    """``BlockMask`` of a fixed pattern from its engine plan: blocks whose every pair is allowed are
    full, blocks with some allowed pair partial (``mask_mod`` decides there), the rest skipped."""
    counts = pair_counts(parts, T, F, device)  # (h, nq, nk)
    size = _block_sizes(T, F, device)
    full = counts == size[:, None] * size[None, :]
    partial = (counts > 0) & ~full
    return _to_block_mask(partial[None], full[None], F, T, mask_mod)


def route_layout(blocks: Tensor) -> Tensor:
    """Chosen key blocks (B, H, nqb, K), -1 = unused -> bool (B, H, nqb, nqb) with the own block."""
    B, H, n, K = blocks.shape
    sel = torch.zeros(B, H, n, n + 1, dtype=torch.bool, device=blocks.device)
    sel.scatter_(-1, torch.where(blocks >= 0, blocks, n), True)  # unused slots land in column n
    sel = sel[..., :n]
    sel.diagonal(dim1=-2, dim2=-1).fill_(True)  # the own block
    return sel


def flex_block(block_size: int) -> int:
    """The flex block for a pattern defined on blocks of b: a multiple of b and of 128."""
    return math.lcm(block_size, FLEX_BLOCK)


def routes_block_mask(blocks: Tensor, block_size: int, causal: bool, T: int, F: int | None = None):
    """``BlockMask`` of block routes (moba, block_topp): query block r sees its own block (causally
    if ``causal``) and its chosen key blocks. Built per forward (routes change), on the device:
    OR-pooling of route blocks into flex blocks of F (a multiple of b; default lcm(b, 128)), no host
    sync. The mask_mod captures the layout tensor, so new routes at the same shape reuse the kernel."""
    b = block_size
    F = F or flex_block(b)
    if F % b:
        raise ValueError(f"flex block F={F} must be a multiple of the route block b={b}")
    m = F // b  # route blocks per flex block
    sel = route_layout(blocks)  # (B, H, nb, nb)
    B, H, nb, _ = sel.shape
    n = -(-T // F)
    pad = n * m - nb
    padded = torch.nn.functional.pad(sel, (0, pad, 0, pad))  # (B, H, n*m, n*m); padding never chosen
    tiles = padded.view(B, H, n, m, n, m)
    any_ = tiles.any(5).any(3)  # (B, H, n, n)
    exists = torch.arange(n * m, device=sel.device) < nb  # route blocks that hold tokens
    all_ = (tiles | ~(exists[:, None] & exists[None, :]).view(n, m, n, m)).all(5).all(3)
    full = all_ & any_
    if causal:  # the diagonal flex blocks hold the triangle of the own block: partial
        full = full & ~torch.eye(n, dtype=torch.bool, device=sel.device)
    partial = any_ & ~full

    def mask_mod(b_, h, q, kv):
        ok = padded[b_, h, q // b, kv // b]
        return ok & (kv <= q) if causal else ok

    return _to_block_mask(partial, full, F, T, mask_mod)


def group_block_mask(groups: Tensor, causal: bool, F: int = FLEX_BLOCK):
    """Content groups (kmeans) as a ``BlockMask`` over the tokens *sorted by group*.

    groups: (B, H, T) group id per token (-1 = none: attends to nothing, output 0). Sorted by
    (group, position), each group is one contiguous run, so a query block only meets the key blocks
    whose group range overlaps its own (a band, not n^2 blocks); positions ascend inside a group,
    so causality is sorted index kv <= q. Returns ``order`` (B, H, T), the sorted token positions
    (gather q, k, v by it; scatter the output back), and the mask. O(B H (n/F)^2) bools, no host sync.
    """
    B, H, T = groups.shape
    none = torch.iinfo(torch.long).max
    order = torch.sort(torch.where(groups >= 0, groups, none), dim=-1, stable=True).indices  # (B, H, T)
    n = -(-T // F)
    gs = torch.nn.functional.pad(groups.gather(-1, order), (0, n * F - T), value=-1)  # (B, H, n*F) sorted ids
    tiles = gs.view(B, H, n, F)
    lo = torch.where(tiles >= 0, tiles, none).amin(-1)  # (B, H, n) group range of each sorted block
    hi = tiles.amax(-1)  # -1 for a block without groups: overlaps nothing
    partial = (lo[..., :, None] <= hi[..., None, :]) & (lo[..., None, :] <= hi[..., :, None])  # (B, H, n, n)
    if causal:
        partial = partial & torch.ones(n, n, dtype=torch.bool, device=groups.device).tril()

    def mask_mod(b, h, q, kv):
        g = gs[b, h, q]
        ok = (g == gs[b, h, kv]) & (g >= 0)
        return ok & (kv <= q) if causal else ok

    return order, _to_block_mask(partial, None, F, T, mask_mod)


def flex_grouped(q: Tensor, k: Tensor, v: Tensor, groups: Tensor, causal: bool) -> Tensor:
    """(B, H, T, hd) attention within content groups (B, H, T) via ``group_block_mask``."""
    order, mask = group_block_mask(groups, causal)
    idx = order[..., None].expand(*order.shape, q.shape[-1])  # (B, H, T, hd)
    out = flex_attend(q.gather(2, idx), k.gather(2, idx), v.gather(2, idx), mask)  # sorted order
    return torch.zeros_like(out).scatter(2, idx, out)  # back to token order


# ----------------------------------------------------------------------------------------------
# the opt-in local path of earlier releases, kept for callers of ``flex_local``


@functools.lru_cache(maxsize=16)
def local_block_mask(T: int, window: int, causal: bool, device: str, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask of the band |i - j| <= w (0 <= i - j <= w if causal), O(n) to build."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-T // block)
    qb = torch.arange(nb, device=device)
    lo = (qb * block - window).clamp(min=0) // block
    hi = qb if causal else (((qb + 1) * block - 1 + window) // block).clamp(max=nb - 1)
    count = hi - lo + 1  # (nb,) key blocks per query block
    idx = (lo[:, None] + torch.arange(nb, device=device)).clamp(max=nb - 1)  # (nb, nb): width = kv blocks

    def band(b, h, i, j):
        d = i - j
        return (d >= 0) & (d <= window) if causal else (d <= window) & (d >= -window)

    return BlockMask.from_kv_blocks(
        count[None, None].int(), idx[None, None].int(), BLOCK_SIZE=block, mask_mod=band, seq_lengths=(T, T)
    )


def flex_local(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool) -> Tensor:
    """(B, H, T, hd) -> (B, H, T, hd): the sliding window through compiled FlexAttention."""
    return flex_attend(q, k, v, local_block_mask(q.shape[2], window, causal, str(q.device)))
