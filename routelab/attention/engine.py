"""Block-sparse attention engine: group the queries, gather the keys each group may see, batch SDPA.

Child et al. 2019 ("Generating Long Sequences with Sparse Transformers", eq. 2-3) write sparse
attention as a_i = sum_{j in S_i} softmax_j(q_i . k_j / sqrt(d)) v_j: every kind in this package is
a connectivity pattern S_i. We never build the n x n score matrix. A kind describes its pattern as
one or more *parts*; a part splits the queries into G groups (blocks) of Lq slots and gives each
group Lk key slots, plus a token-level boolean mask (causality inside the diagonal block, exact
window edges, padding, global tokens). All groups of a part run in one batched SDPA call. When a
pattern needs several parts (e.g. a local band plus keys grouped by residue), their results are
merged exactly with log-sum-exp weights (Milakov & Gimelshein 2018, "Online normalizer calculation
for softmax"): out_i = sum_p exp(lse_p,i - LSE_i) out_p,i, LSE_i = log sum_p exp(lse_p,i).

Three implementations of the same math, picked by ``attend_parts``:

- ``flash`` (CPU, no dropout): ATen's fused CPU flash-attention kernels, called per part, with our
  own backward: each part's gradient is the flash backward evaluated with the *merged* output and
  log-sum-exp (the ring-attention identity dS = P (dP - rowsum(dO * O)) with the global P), so
  the merge costs no extra kernel. Contiguous windows are strided views, never copies.
- ``sdpa`` (one part, or parts owning disjoint query blocks; any device; dropout): gather +
  ``F.scaled_dot_product_attention``; autograd.
- ``math`` (several parts; any device; dropout): explicit per-group scores, autograd.

The hand-written backward exists so the merge of several parts costs no extra kernel; it is hard
to read, so ``reference_attention`` (dense SDPA under the full boolean mask) stays beside it as the
slow, obviously correct path every kind is tested against. Fixed patterns built on this engine
(bands, sliding windows, the ``SparsePatternAttention`` base) are in ``patterns.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Windows:
    """G groups of consecutive positions: group g holds ``start + g * stride + t``, t in [0, length).

    With ``stride == length`` the groups tile a range (query blocks); with ``stride < length`` they
    overlap (a sliding key window per query block) and are taken as strided views, not copies;
    ``stride == 0`` shares one key range with every group (global keys).
    """

    start: int
    stride: int
    length: int
    groups: int

    def positions(self, device=None) -> Tensor:
        g = torch.arange(self.groups, device=device)[:, None]
        return self.start + g * self.stride + torch.arange(self.length, device=device)  # (G, L)

    @property
    def lo(self) -> int:
        return self.start

    @property
    def hi(self) -> int:  # one past the last position
        return self.start + (self.groups - 1) * self.stride + self.length


# A group spec: Windows, or a LongTensor of positions (G, L) shared by all batch rows and heads,
# (H, G, L) per head, or (BH, G, L) per batch-head (learned routes). -1 means "no token" (masked).
Spec = Union[Windows, Tensor]


@dataclass
class Part:
    """One batched SDPA call: group g of ``queries`` attends to group g of ``keys``.

    ``mask``: bool, broadcastable to (BH, G, Lq, Lk), True = may attend; leading dim 1, H or BH, Lq
    dim 1 for key-only masks; None = every key slot. ``causal``: additionally, query slot r sees key
    slots <= r (top-left, as the fused kernels do). Key slots outside [0, T) are masked by the
    engine unless ``trusted`` (the kind guarantees no query can see them, e.g. trailing slots under
    ``causal``). Across the parts of a pattern every allowed (query, key) pair must occur once; parts
    whose query blocks tile disjoint ranges, or that are all ``exclusive``, skip the merge.
    """

    queries: Spec
    keys: Spec
    mask: Tensor | None = None
    causal: bool = False
    trusted: bool = False
    exclusive: bool = False  # no query of this part is a query of another part: no merge needed
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # masks derived per dtype


def spec_positions(spec: Spec, device=None) -> Tensor:
    """Token positions of a spec: (G, L) or (BH, G, L); -1 or out-of-range = no token."""
    return spec.positions(device) if isinstance(spec, Windows) else spec


def _spec_range(spec: Spec, T: int) -> tuple[int, int]:
    if isinstance(spec, Windows):
        return spec.lo, spec.hi
    return 0, T


# ----------------------------------------------------------------------------------------------
# the padded flat layout shared by all parts of one call


class _Layout:
    """Rows of a padded (BH, Tp, hd) tensor: [front zeros | T tokens | back zeros].

    Built from the specs that index it (all query specs, or all key specs). With ``sentinel``,
    position -1 in a tensor spec maps to a zero row after the tokens (query layouts: results of empty
    slots are dropped there); without it, to row 0 (key layouts: the mask excludes such slots, so
    no copy is needed to pad). Without padding, ``pad`` is a view.
    """

    def __init__(self, specs: list[Spec], T: int, BH: int, sentinel: bool) -> None:
        lo, hi = 0, T
        for spec in specs:
            a, b = _spec_range(spec, T)
            lo, hi = min(lo, a), max(hi, b + (1 if sentinel and not isinstance(spec, Windows) else 0))
        self.T, self.BH = T, BH
        self.front, self.back = -lo, hi - T
        self.Tp = self.front + T + self.back
        self.sentinel = self.front + T if sentinel else self.front

    def pad(self, x: Tensor) -> Tensor:
        """(BH, T, ...) -> (BH, Tp, ...) with zero rows; differentiable."""
        if self.front == 0 and self.back == 0:
            return x
        pad = [0, 0] * (x.dim() - 2) + [self.front, self.back]
        return F.pad(x, pad)

    def tiling(self, spec: Spec) -> tuple[int, int] | None:
        """Row range [a, b) if the spec tiles consecutive rows (query blocks), else None."""
        if isinstance(spec, Windows) and spec.stride == spec.length:
            a = self.front + spec.start
            return a, a + spec.groups * spec.length
        return None

    def rows(self, spec: Tensor) -> Tensor:
        """Positions -> padded row numbers (sentinel for -1 / out of range)."""
        ok = (spec >= 0) & (spec < self.T)
        return torch.where(ok, spec + self.front, torch.full_like(spec, self.sentinel))

    def flat_rows(self, spec: Tensor) -> Tensor:
        """(BH, G, L) positions -> rows of the (BH * Tp, ...) flattened tensor."""
        bh = torch.arange(self.BH, device=spec.device)[:, None, None] * self.Tp
        return self.rows(spec) + bh

    def take(self, x: Tensor, spec: Spec, grad_ok: bool = False) -> Tensor:
        """x: padded (BH, Tp, hd) -> (BH, G, L, hd). Windows are views (as_strided, no copy)."""
        BH, Tp, hd = x.shape
        if isinstance(spec, Windows):
            G, L, s = spec.groups, spec.length, spec.stride
            a = self.front + spec.start
            if s == L:  # a tiling: a plain view
                return x[:, a : a + G * L].reshape(BH, G, L, hd)
            if not grad_ok:  # overlapping windows: strided view for the fused path
                x = x.contiguous()
                return x.as_strided((BH, G, L, hd), (Tp * hd, s * hd, hd, 1), x.storage_offset() + a * hd)
            rows = spec.positions(x.device) + self.front  # autograd paths: gather (as_strided backward is slow)
            return x.index_select(1, rows.reshape(-1)).view(BH, G, L, hd)
        if spec.dim() == 2:
            G, L = spec.shape
            return x.index_select(1, self.rows(spec).reshape(-1)).view(BH, G, L, hd)
        G, L = spec.shape[-2:]
        flat = self.flat_rows(spec).reshape(-1)
        return x.reshape(BH * Tp, hd).index_select(0, flat).view(BH, G, L, hd)

    def take_rows(self, x: Tensor, spec: Spec) -> Tensor:
        """x: padded (BH, Tp) -> (BH, G, L)."""
        return self.take(x[..., None], spec)[..., 0]

    def put_add(self, out: Tensor, spec: Spec, g: Tensor) -> None:
        """Adjoint of ``take``: out (BH, Tp, hd) += scatter of g (BH, G, L, hd)."""
        BH, Tp, hd = out.shape
        if isinstance(spec, Windows):
            G, L, s = spec.groups, spec.length, spec.stride
            a = self.front + spec.start
            if s == 0:  # one key range shared by every group
                out[:, a : a + L].add_(g.sum(1))
                return
            if L % s == 0:  # overlapping windows made of L/s stride-sized sub-blocks
                for j in range(L // s):  # L/s is small (window / block size), not the block count
                    b = a + j * s
                    out[:, b : b + G * s].view(BH, G, s, hd).add_(g[:, :, j * s : (j + 1) * s])
            else:
                out.index_add_(1, (spec.positions(out.device) + self.front).reshape(-1), g.reshape(BH, -1, hd))
            return
        if spec.dim() == 2:
            out.index_add_(1, self.rows(spec).reshape(-1), g.reshape(BH, -1, hd))
        else:
            out.view(BH * Tp, hd).index_add_(0, self.flat_rows(spec).reshape(-1), g.reshape(-1, hd))

    def to_tokens(self, x: Tensor, spec: Spec, fill: float = 0.0) -> Tensor:
        """Differentiable scatter of per-slot values x (BH, G, L, *) to padded rows (BH, Tp, *)."""
        BH = x.shape[0]
        tail = x.shape[3:]
        if isinstance(spec, Windows) and spec.stride == spec.length:
            a = self.front + spec.start
            flat = x.reshape(BH, spec.groups * spec.length, *tail)
            pad = [0, 0] * len(tail) + [a, self.Tp - a - flat.shape[1]]
            return F.pad(flat, pad, value=fill)
        pos = spec_positions(spec, x.device)
        base = x.new_full((BH * self.Tp, *tail), fill)
        if pos.dim() == 2:
            pos = pos.expand(BH, *pos.shape)
        if isinstance(spec, Windows):  # overlapping query windows are not used; positions are in range
            rows = pos + self.front + torch.arange(BH, device=x.device)[:, None, None] * self.Tp
        else:
            rows = self.flat_rows(pos)
        return base.index_copy(0, rows.reshape(-1), x.reshape(-1, *tail)).view(BH, self.Tp, *tail)


# ----------------------------------------------------------------------------------------------
# masks


def _key_valid(layout: _Layout, spec: Spec, device) -> Tensor | None:
    """(1, G, 1, Lk) or (BH, G, 1, Lk) bool, or None when every key slot is a real token."""
    lo, hi = _spec_range(spec, layout.T)
    if isinstance(spec, Windows) and lo >= 0 and hi <= layout.T:
        return None
    pos = spec_positions(spec, device)
    ok = (pos >= 0) & (pos < layout.T)
    if isinstance(spec, Tensor) and bool(ok.all()):
        return None
    return ok[None, :, None] if ok.dim() == 2 else ok[:, :, None]


def _key_padding(layout: _Layout, spec: Spec, padding_mask: Tensor, H: int) -> Tensor:
    """padding_mask (B, T) True = pad -> keep mask (BH, G, 1, Lk) for the spec's key slots."""
    B = padding_mask.shape[0]
    pos = spec_positions(spec, padding_mask.device)
    rows = pos.clamp(0, layout.T - 1)
    if pos.dim() == 2:  # shared positions: (B, G, Lk)
        keep = ~padding_mask[:, rows]
        keep = keep[:, None].expand(B, H, *rows.shape).reshape(B * H, *rows.shape)
    else:  # per batch-head positions (BH, G, Lk)
        pm = padding_mask[:, None].expand(B, H, layout.T).reshape(B * H, layout.T)
        keep = ~torch.gather(pm, 1, rows.reshape(B * H, -1)).view(rows.shape)
    return keep[:, :, None]


def _part_mask(part: Part, layout: _Layout, padding_mask: Tensor | None, H: int, device) -> Tensor | None:
    """The part's final bool mask (M, G, Lq|1, Lk), M in {1, BH}, or None (nothing masked)."""
    mask = part.mask
    if not part.trusted:
        valid = _key_valid(layout, part.keys, device)
        if valid is not None:
            mask = valid if mask is None else mask & valid
    if padding_mask is not None:
        keep = _key_padding(layout, part.keys, padding_mask, H)
        mask = keep if mask is None else mask & keep
    return mask


def _per_batch(part: Part, B: int, H: int) -> Part:
    """Tile per-head (H, ...) positions and masks over the batch: (B * H, ...), b-major."""

    def tile(x):
        if isinstance(x, Tensor) and x.dim() >= 3 and x.shape[0] == H:
            return x.repeat(B, *([1] * (x.dim() - 1)))
        return x

    mask = part.mask
    if mask is not None and mask.shape[0] == H and H > 1:
        mask = tile(mask)
    if tile(part.queries) is part.queries and tile(part.keys) is part.keys and mask is part.mask:
        return part
    return Part(tile(part.queries), tile(part.keys), mask, part.causal, part.trusted, part.exclusive)


def _cached(part: Part, padding_mask, key, make):
    """Per-part cache of masks derived from the pattern alone (not from a padding mask)."""
    if padding_mask is not None:
        return make()
    if key not in part.cache:
        part.cache[key] = make()
    return part.cache[key]


def _cached_mask(part: Part, layout, padding_mask, H, device):
    return _cached(part, padding_mask, ("mask", layout.T), lambda: _part_mask(part, layout, padding_mask, H, device))


def _float_mask(mask: Tensor | None, dtype) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _causal_slots(Lq: int, Lk: int, device) -> Tensor:
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------------------------
# the fused CPU path


class _Plan:
    """Everything the fused forward/backward share: layouts, parts, final float masks, scale."""

    def __init__(self, parts, lq, lk, fmasks, row_has, scale):
        self.parts, self.lq, self.lk, self.fmasks, self.row_has, self.scale = parts, lq, lk, fmasks, row_has, scale
        self.ranges = [lq.tiling(p.queries) for p in parts]
        self.disjoint = _disjoint(self.ranges) or all(p.exclusive for p in parts)
        # the query blocks of all parts tile every row of the query layout: outputs and dq are one cat
        self.order = None
        if self.disjoint and all(r is not None for r in self.ranges):
            order = sorted(range(len(parts)), key=lambda i: self.ranges[i][0])
            ends = [self.ranges[i] for i in order]
            if ends[0][0] == 0 and ends[-1][1] == lq.Tp and all(x[1] == y[0] for x, y in zip(ends, ends[1:])):
                self.order = order


def _disjoint(ranges: list) -> bool:
    """Parts whose query blocks tile disjoint row ranges need no merge: each row has one owner."""
    return all(r is not None for r in ranges) and all(
        a[1] <= b[0] or b[1] <= a[0] for i, a in enumerate(ranges) for b in ranges[i + 1 :]
    )


def _flash_fwd(q, k, v, causal, fmask, scale):
    return _FLASH_FWD(q, k, v, 0.0, causal, attn_mask=fmask, scale=scale)


def _fold(acc: Tensor | None, layout: _Layout, spec: Spec, g: Tensor, shape) -> Tensor:
    """acc (BH, Tp, hd) += the scatter of g (BH, G, L, hd); a fresh tensor when acc is None.

    Overlapping windows of L = m * stride are summed as m shifted block views, starting from a copy
    of the first (no zero fill when they cover every row).
    """
    if acc is None and isinstance(spec, Windows) and spec.stride > 0 and spec.length % spec.stride == 0:
        BH, Tp, hd = shape
        G, s, m = spec.groups, spec.stride, spec.length // spec.stride
        a = layout.front + spec.start
        blocks = g.new_empty(BH, G + m - 1, s, hd)
        blocks[:, :G] = g[:, :, :s]
        blocks[:, G:] = 0
        for j in range(1, m):  # m = window / block + 1 sub-blocks, not the block count
            blocks[:, j : j + G] += g[:, :, j * s : (j + 1) * s]
        rows = blocks.reshape(BH, (G + m - 1) * s, hd)
        return rows if a == 0 and rows.shape[1] == Tp else F.pad(rows, (0, 0, a, Tp - a - rows.shape[1]))
    if acc is None:
        acc = g.new_zeros(shape)
    layout.put_add(acc, spec, g)
    return acc


class _FlashParts(torch.autograd.Function):
    """Multi-part attention on the fused CPU kernels; q: (BH, Tq, hd), k/v: (BH, Tk, hd), padded."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        lq, lk = plan.lq, plan.lk
        BH, Tq, hd = q.shape
        outs, lses = [], []
        for part, fmask, row_has in zip(plan.parts, plan.fmasks, plan.row_has):
            qp, kp, vp = lq.take(q, part.queries), lk.take(k, part.keys), lk.take(v, part.keys)
            o, lse_p = _flash_fwd(qp, kp, vp, part.causal, fmask, plan.scale)  # (BH, G, Lq, hd), (BH, G, Lq)
            if row_has is not None:  # the kernel reports lse=0 for a row with no key; make it -inf
                lse_p = lse_p.masked_fill(~row_has, float("-inf"))
            outs.append(o)
            lses.append(lse_p)
        if plan.disjoint:  # each row has one owner: no merge; backward reads each part's own lse
            if plan.order is not None:
                out = (
                    torch.cat([outs[i].reshape(BH, -1, hd) for i in plan.order], 1)
                    if len(outs) > 1
                    else outs[0].view(BH, Tq, hd)
                )
            else:
                out = None
                for o, part in zip(outs, plan.parts):
                    out = _fold(out, lq, part.queries, o, (BH, Tq, hd))
        else:
            outs = [lq.to_tokens(o, p.queries) for o, p in zip(outs, plan.parts)]
            lse_tok = [
                lq.to_tokens(x[..., None], p.queries, fill=float("-inf"))[..., 0] for x, p in zip(lses, plan.parts)
            ]
            if len(outs) == 1:
                out, lse = outs[0], lse_tok[0]
            else:
                lse_all = torch.stack(lse_tok)  # (P, BH, Tq)
                lse = torch.logsumexp(lse_all, dim=0)
                w = torch.exp(lse_all - lse).nan_to_num_(0.0)  # rows with no key anywhere: weight 0
                out = sum(wp[..., None] * op for wp, op in zip(w, outs)).to(q.dtype)  # merged in fp32 (lse is)
            # a row that saw no key has out = 0 and no gradient: lse=+inf makes its P = exp(s - lse) = 0
            lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
            lses = [lq.take_rows(lse, p.queries) for p in plan.parts]  # the merged lse, per part
        ctx.plan, ctx.lses = plan, lses
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        plan, lq, lk = ctx.plan, ctx.plan.lq, ctx.plan.lk
        dout = dout.to(q.dtype).contiguous()  # under autocast the incoming gradient may be float32
        gqs, dq, dk, dv = [], None, None, None
        for part, fmask, lp in zip(plan.parts, plan.fmasks, ctx.lses):
            qp, kp, vp = lq.take(q, part.queries), lk.take(k, part.keys), lk.take(v, part.keys)
            dop, op = lq.take(dout, part.queries), lq.take(out, part.queries)
            gq, gk, gv = _FLASH_BWD(dop, qp, kp, vp, op, lp, 0.0, part.causal, attn_mask=fmask, scale=plan.scale)
            gqs.append(gq)
            dk = _fold(dk, lk, part.keys, gk, k.shape)
            dv = _fold(dv, lk, part.keys, gv, v.shape)
        if plan.order is not None:
            dq = torch.cat([gqs[i].reshape(q.shape[0], -1, q.shape[2]) for i in plan.order], 1)
        else:
            for part, gq in zip(plan.parts, gqs):
                dq = _fold(dq, lq, part.queries, gq, q.shape)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------
# autograd paths (any device, dropout)


def _sdpa_single(q, k, v, part, mask, lq, lk, dropout_p, scale):
    qp, kp, vp = lq.take(q, part.queries, True), lk.take(k, part.keys, True), lk.take(v, part.keys, True)
    if part.causal:
        tri = _causal_slots(qp.shape[2], kp.shape[2], q.device)
        mask = tri if mask is None else mask & tri
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return lq.to_tokens(o, part.queries)


def _math_parts(q, k, v, parts, masks, lq, lk, dropout_p, scale):
    scores, lses = [], []
    for part, mask in zip(parts, masks):
        qp, kp = lq.take(q, part.queries, True), lk.take(k, part.keys, True)
        s = (qp @ kp.transpose(-1, -2)).float() * scale  # (BH, G, Lq, Lk): the part's own (sparse) scores, fp32
        if part.causal:
            tri = _causal_slots(s.shape[-2], s.shape[-1], q.device)
            mask = tri if mask is None else mask & tri
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        scores.append(s)
        lses.append(lq.to_tokens(torch.logsumexp(s, -1)[..., None], part.queries, fill=float("-inf"))[..., 0])
    lse = torch.logsumexp(torch.stack(lses), 0)  # (BH, Tq)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no key -> weights 0
    out = 0
    for part, s in zip(parts, scores):
        p = torch.exp(s - lq.take_rows(lse, part.queries)[..., None])
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        vp = lk.take(v, part.keys, True)
        o = p.to(vp.dtype) @ vp
        out = out + lq.to_tokens(o, part.queries)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# entry points


def attend_parts(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    parts: list[Part],
    *,
    padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Sparse attention described by ``parts``.

    Shapes: B batch, H heads, T tokens, hd head dim, BH = B * H, G groups, Lq/Lk slots per group.

    Args:
        q, k, v: (B, H, T, hd).
        parts: the pattern (see ``Part``); group positions index the T tokens.
        padding_mask: bool (B, T), True = padding (never attended to).
        dropout_p: dropout on attention probabilities (selects an autograd path).
        impl: "auto", "flash" (CPU fused kernels), "sdpa" (one part), or "math".
    Returns:
        (B, H, T, hd); a query that may see no key gets 0 (as SDPA does).
    """
    B, H, T, hd = q.shape
    BH = B * H
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if B > 1:
        parts = [_per_batch(p, B, H) for p in parts]
    lq = _Layout([p.queries for p in parts], T, BH, sentinel=True)
    lk = _Layout([p.keys for p in parts], T, BH, sentinel=False)
    masks = [_cached_mask(p, lk, padding_mask, H, q.device) for p in parts]
    if impl == "auto":
        if _FLASH_FWD is not None and q.device.type == "cpu" and dropout_p == 0.0 and q.dtype in _FLASH_DTYPES:
            impl = "flash"
        else:
            single = (
                len(parts) == 1 or all(p.exclusive for p in parts) or _disjoint([lq.tiling(p.queries) for p in parts])
            )
            impl = "sdpa" if single else "math"
    qf = lq.pad(q.reshape(BH, T, hd))  # (BH, Tq, hd)
    kf, vf = lk.pad(k.reshape(BH, T, hd)), lk.pad(v.reshape(BH, T, hd))  # (BH, Tk, hd)
    if impl == "flash":
        merged = len(parts) > 1 and not _disjoint([lq.tiling(p.queries) for p in parts])
        merged = merged and not all(p.exclusive for p in parts)
        fmasks, row_has = [], []
        for p, m in zip(parts, masks):
            fmasks.append(_cached(p, padding_mask, ("float", q.dtype), lambda m=m: _float_mask(m, q.dtype)))
            has = None if (m is None or not merged) else _cached(p, padding_mask, "row_has", lambda m=m: m.any(-1))
            row_has.append(has)
        plan = _Plan(parts, lq, lk, fmasks, row_has, scale)
        out = _FlashParts.apply(qf.contiguous(), kf.contiguous(), vf.contiguous(), plan)
    elif impl == "sdpa":
        if len(parts) > 1 and not (_disjoint([lq.tiling(p.queries) for p in parts]) or all(p.exclusive for p in parts)):
            raise ValueError("impl='sdpa' needs one part or parts with disjoint query blocks; use 'math' or 'flash'")
        out = sum(_sdpa_single(qf, kf, vf, p, m, lq, lk, dropout_p, scale) for p, m in zip(parts, masks))
    elif impl == "math":
        out = _math_parts(qf, kf, vf, parts, masks, lq, lk, dropout_p, scale)
    else:
        raise ValueError(f"impl={impl!r} is invalid; allowed: 'auto', 'flash', 'sdpa', 'math'")
    return out[:, lq.front : lq.front + T].reshape(B, H, T, hd)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, padding_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """The slow, obviously correct path: dense SDPA under the full bool mask (True = may attend).

    q: (B, H, T, hd), k/v: (B, H, S, hd), mask broadcastable to (B, H, T, S), padding_mask (B, S).
    """
    if padding_mask is not None:
        mask = mask & ~padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
