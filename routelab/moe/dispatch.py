"""Sparse dispatch: compute only the chosen (token, expert) pairs, then combine by gate weight.

    y_t = sum_k g_tk * E_{e_tk}(x_t)          (Shazeer et al. 2017, eq. 1; Fedus et al. 2021, eq. 2)

The fast path (``grouped_experts``) is one autograd Function with a hand-written backward:

1. ``plan_dispatch`` stable-sorts the active (token, slot) pairs by expert, so each expert's
   tokens are one contiguous block of a sorted (N, D) buffer (N = active pairs).
2. Forward: gather x into that buffer; per expert one ``addmm`` per weight matrix writing into
   slices of preallocated buffers; the activation once over the whole (N, H) buffer.
3. Combine: ``embedding_bag`` over the inverse permutation with the gates as per-sample weights:
   gather + gate multiply + sum over the K slots in one parallel pass (rather than ``index_add_``).
4. Backward mirrors it: one gather of dL/dy, per-expert matmuls writing the weight gradients
   straight into the stacked (E, D, H) gradient tensors, bias gradients as per-expert row sums,
   the gate gradient as a row dot product,
   and ``embedding_bag`` again to sum each token's K slot gradients.

Why a Python loop over experts: on CPU one matmul per contiguous expert block beats a padded
batched matmul, ``torch._grouped_mm`` (on CPU a per-group loop itself) and the same loop under
autograd (whose slices and ``w[e]`` each materialise a full-size zero gradient in backward);
``benchmarks/moe_layer.py --compare`` times all four. The loop body launches matmuls only, never
per-token work, and its task lists run on all of torch's threads at once with single-threaded BLAS
(``routelab.moe.threads``), so the many small matmuls pay no OpenMP fork/join each. Capacity drops
are applied before the plan. ``routelab.moe.experts.reference_combine`` is the slow, obviously
correct path it is tested against.

Shape legend: T tokens, K slots per token, N active pairs, E experts, D model dim, H hidden.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from routelab.ffn.dense import activate
from routelab.moe.experts import EXPERT_PARAMS
from routelab.moe.threads import Workspace, WorkSplit
from routelab.precision import autocast_dtype

# ----------------------------------------------------------------------------------------------
# capacity


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Per-expert capacity ceil(cf * T * K / E) (Fedus et al. 2021, eq. 3, times K for top-k)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    expert_idx: Tensor, active: Tensor | None, cap: int, num_experts: int, priority: Tensor | None = None
) -> Tensor:
    """Keep at most ``cap`` pairs per expert; returns the new (T, K) active mask.

    Priority ``None``: first choices before second choices, then earlier tokens first (GShard,
    Switch). Otherwise a (T, K) score, higher kept first (e.g. the router probability: the
    batch-prioritised routing of Riquelme et al. 2021); ties fall back to the default order.

    Shapes: expert_idx, active, priority (T, K).
    """
    T, K = expert_idx.shape
    key = expert_idx if active is None else torch.where(active, expert_idx, num_experts)  # E = not routed
    key = key.t().reshape(-1)  # (K*T,) slot-major: position order
    order = torch.arange(K * T, device=key.device)
    if priority is not None:  # float scores: a stable descending sort keeps ties in default order
        order = torch.argsort(priority.t().reshape(-1), descending=True, stable=True)
    order = order[torch.argsort(key[order], stable=True)]  # by expert, then by priority
    e_sorted = key[order]
    counts = torch.bincount(e_sorted, minlength=num_experts + 1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(K * T, device=key.device) - start[e_sorted]  # place in its expert's queue
    keep = torch.empty(K * T, dtype=torch.bool, device=key.device)
    keep[order] = (rank < cap) & (e_sorted < num_experts)
    return keep.view(K, T).t()


# ----------------------------------------------------------------------------------------------
# the dispatch plan


@dataclass
class DispatchPlan:
    """Where every active (token, slot) pair lives in the expert-sorted buffer.

    Built without a host sync: ``expert_counts`` stays on the tokens' device, and the Python-side
    views (``counts``, ``token``, ``num_pairs``) are computed on first use, by the per-expert loop
    path only (the ``torch._grouped_mm`` path reads the device tensor).

    Attributes:
        order: (T*K,) slot index of each sorted position; the first N are the active pairs.
        inv: (T, K) sorted position of each slot (the inverse of ``order``).
        expert_counts: (E,) int64 on the device, pairs per expert.
        weight: (T, K) float, 1 for active slots and 0 for dropped ones, or None if all active.
    """

    order: Tensor
    inv: Tensor
    expert_counts: Tensor
    weight: Tensor | None

    @functools.cached_property
    def counts(self) -> list[int]:
        """E Python ints, pairs per expert (the slice lengths; a host sync on an accelerator)."""
        return self.expert_counts.tolist()

    @functools.cached_property
    def token(self) -> Tensor:
        """(N,) token of each sorted active pair."""
        return torch.div(self.order[: self.num_pairs], self.inv.shape[1], rounding_mode="floor")

    @property
    def num_pairs(self) -> int:
        return sum(self.counts)


def plan_dispatch(expert_idx: Tensor, active: Tensor | None, num_experts: int) -> DispatchPlan:
    """Sort the active pairs by expert (stable, so tokens keep their order within an expert).

    Shapes: expert_idx, active (T, K). No host sync (see ``DispatchPlan``).
    """
    T, K = expert_idx.shape
    key = expert_idx.reshape(-1)
    if active is not None:
        key = torch.where(active.reshape(-1), key, num_experts)  # inactive pairs sort last
    order = torch.argsort(key, stable=True)  # (T*K,)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # (E,) on the device
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T * K, device=order.device)
    weight = None
    if active is not None:  # dropped slots read row 0 with weight 0 (embedding_bag needs a valid row)
        inv = torch.where(active.reshape(-1), inv, 0)
        weight = active.to(torch.float32)
    return DispatchPlan(order, inv.view(T, K), counts, weight)


# ----------------------------------------------------------------------------------------------
# the fused grouped expert computation


def _unbind(t: Tensor | None, transpose: bool = False):
    if t is None:
        return None
    return (t.transpose(1, 2) if transpose else t).unbind(0)


def _silu_mul(a: Tensor, hg: Tensor, h: Tensor) -> None:  # a = silu(hg) * h
    torch.ops.aten.silu.out(hg, out=a).mul_(h)


class _GroupedExperts(torch.autograd.Function):
    """y = sum_k g_tk E_{e_tk}(x_t) over the plan's sorted pairs (see the module docstring).

    Per expert only matmuls run (``_rows_mm`` / ``_weights_mm``: ``addmm``/``mm`` into slices
    of preallocated buffers, weight gradients straight into the stacked gradient tensors);
    elementwise steps (activation and its backward, gate scaling) run on the whole sorted buffer
    in a few row blocks; ``WorkSplit`` spreads both over threads.

    Memory: one (N, D) buffer holds the gathered tokens, then the expert outputs; backward
    regathers x instead of saving it and reuses the buffer for dL/dy per pair, the regathered
    tokens and dL/dx per pair. Only the (N, H) pre-activations are saved: as many bytes as a
    dense FFN of the same active width.
    """

    @staticmethod
    def forward(ctx, x, gates, w_in, b_in, w_gate, b_gate, w_out, b_out, plan: DispatchPlan, activation: str, ws, reuse):
        # x (T, D); gates (T, K); w_in, w_gate (E, D, H); w_out (E, H, D); b_in, b_gate (E, H); b_out (E, D)
        N, H, D = plan.num_pairs, w_in.shape[2], x.shape[1]
        buf = ws.buffer(max(N, 1), D, x) if reuse and ws is not None else x.new_empty(max(N, 1), D)
        macs = N * D * H * (3 if activation == "swiglu" else 2)  # the pass's matmul work
        with WorkSplit(ws, plan.counts, macs) as par:
            if N:  # (N, D): the tokens sorted by expert, then their outputs
                par.apply(lambda tok, out: torch.index_select(x, 0, tok, out=out), plan.token, buf)
            else:
                buf.zero_()
            h = x.new_empty(N, H)  # x W_in + b_in
            par.mm_rows(h, buf, _unbind(w_in), _unbind(b_in))
            hg = a = None
            if activation == "swiglu":
                hg = x.new_empty(N, H)  # x W_gate + b_gate
                par.mm_rows(hg, buf, _unbind(w_gate), _unbind(b_gate))
                a = x.new_empty(N, H)
                par.apply(_silu_mul, a, hg, h)
            elif activation == "gelu":
                a = x.new_empty(N, H)
                par.apply(lambda h, a: torch.ops.aten.gelu.out(h, out=a), h, a)
            else:
                par.apply(torch.Tensor.relu_, h)
                a = h  # relu in place
            par.mm_rows(buf, a, _unbind(w_out), _unbind(b_out))  # the outputs overwrite the tokens
            del a
        w = gates.to(x.dtype) if plan.weight is None else gates.to(x.dtype) * plan.weight.to(x.dtype)
        y = F.embedding_bag(plan.inv, buf, mode="sum", per_sample_weights=w)  # (T, D): gather, gate, sum over K
        ctx.plan, ctx.activation, ctx.ws, ctx.reuse = plan, activation, ws, reuse
        ctx.save_for_backward(x, h, hg, gates, w_in, b_in, w_gate, b_gate, w_out, b_out)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, h, hg, gates, w_in, b_in, w_gate, b_gate, w_out, b_out = ctx.saved_tensors
        plan, activation, ws = ctx.plan, ctx.activation, ctx.ws
        T, K = plan.inv.shape
        N, H, D = plan.num_pairs, h.shape[1], x.shape[1]
        need_x, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = any(ctx.needs_input_grad[2:8])
        grad_x = grad_gates = gw_in = gb_in = gw_gate = gb_gate = gw_out = gb_out = None
        if N == 0:
            grad_x = torch.zeros_like(x) if need_x else None
            grad_gates = torch.zeros_like(gates) if need_g else None
            if need_w:
                gw_in, gw_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
                gw_gate = torch.zeros_like(w_gate) if w_gate is not None else None
                gb_gate = torch.zeros_like(b_gate) if b_gate is not None else None
                gb_in = torch.zeros_like(b_in) if b_in is not None else None
                gb_out = torch.zeros_like(b_out) if b_out is not None else None
            return grad_x, grad_gates, gw_in, gb_in, gw_gate, gb_gate, gw_out, gb_out, None, None, None, None
        gate = gates.reshape(-1)[plan.order[:N]].to(x.dtype).unsqueeze(1)  # (N, 1) gate of each sorted pair
        buf = ws.buffer(N, D, x) if ctx.reuse and ws is not None else x.new_empty(N, D)
        macs = N * D * H * (6 if activation == "swiglu" else 4)  # the pass's matmul work
        with WorkSplit(ws, plan.counts, macs) as par:
            par.apply(lambda tok, out: torch.index_select(grad_y, 0, tok, out=out), plan.token, buf)  # dL/dy per pair
            a = sg = None  # act(h) and, for swiglu, silu(hg), recomputed
            if activation == "relu":
                a = h
            elif activation == "gelu":
                a = x.new_empty(N, H)
                par.apply(lambda h, a: torch.ops.aten.gelu.out(h, out=a), h, a)
            else:
                a, sg = x.new_empty(N, H), x.new_empty(N, H)
                par.apply(lambda hg, h, sg, a: torch.mul(torch.ops.aten.silu.out(hg, out=sg), h, out=a), hg, h, sg, a)
            ga = x.new_empty(N, H)  # dL/da, ungated, then gated, then dL/dh
            par.mm_rows(ga, buf, _unbind(w_out, transpose=True))
            if need_g:  # dL/dg = <dL/dy, E(x)> = <dL/dy W_out^T, a> + <dL/dy, b_out>
                grad_gate = x.new_empty(N, 1)
                if b_out is not None:
                    par.mm_rows(grad_gate, buf, b_out.unsqueeze(2).unbind(0))
                    par.apply(lambda ga, a, g: g.add_(torch.linalg.vecdot(ga, a).unsqueeze(1)), ga, a, grad_gate)
                else:
                    par.apply(lambda ga, a, g: torch.linalg.vecdot(ga, a, out=g.squeeze(1)), ga, a, grad_gate)
                grad_gates = torch.zeros(T * K, dtype=gates.dtype, device=gates.device)
                grad_gates[plan.order[:N]] = grad_gate.squeeze(1).to(gates.dtype)
                grad_gates = grad_gates.view(T, K)
            # dL/da = g * dL/dy W_out^T;  dL/dW_out = a^T (g dL/dy) = (g a)^T dL/dy: gate the narrower
            if need_w:
                gw_out = torch.empty_like(w_out)
                gb_out = torch.empty_like(b_out) if b_out is not None else None
                if H < D:
                    a_g = x.new_empty(N, H)
                    par.apply(lambda ga, a, a_g, g: (ga.mul_(g), torch.mul(a, g, out=a_g)), ga, a, a_g, gate)
                    par.mm_weights(_unbind(gw_out), a_g, buf, _unbind(gb_out), gate.squeeze(1))
                    del a_g
                else:
                    par.apply(lambda ga, buf, g: (ga.mul_(g), buf.mul_(g)), ga, buf, gate)
                    par.mm_weights(_unbind(gw_out), a, buf, _unbind(gb_out))
            else:
                par.apply(lambda ga, g: ga.mul_(g), ga, gate)
            d_hg = None  # swiglu: dL/d(x W_gate)
            if activation == "relu":
                par.apply(lambda ga, a: torch.ops.aten.threshold_backward.grad_input(ga, a, 0.0, grad_input=ga), ga, a)
            elif activation == "gelu":
                par.apply(lambda ga, h: torch.ops.aten.gelu_backward.grad_input(ga, h, grad_input=ga), ga, h)
            else:
                d_hg = a  # a's buffer is free now: dL/d(x W_gate) = silu'(hg) * (dL/da * h)
                par.apply(_swiglu_backward, ga, h, hg, sg, d_hg)
            del a, sg
            if need_w:
                par.apply(lambda tok, out: torch.index_select(x, 0, tok, out=out), plan.token, buf)  # regather
                gw_in = torch.empty_like(w_in)
                gb_in = torch.empty_like(b_in) if b_in is not None else None
                par.mm_weights(_unbind(gw_in), buf, ga, _unbind(gb_in))
                if d_hg is not None:
                    gw_gate = torch.empty_like(w_gate)
                    gb_gate = torch.empty_like(b_gate) if b_gate is not None else None
                    par.mm_weights(_unbind(gw_gate), buf, d_hg, _unbind(gb_gate))
                for e, n in enumerate(plan.counts):  # experts without tokens get exact zeros
                    if n == 0:
                        for g in (gw_in, gw_gate, gw_out, gb_in, gb_gate, gb_out):
                            if g is not None:
                                g[e].zero_()
            if need_x:  # dL/dx per pair, into the same buffer
                par.mm_rows(buf, ga, _unbind(w_in, transpose=True))
                if d_hg is not None:
                    par.mm_rows(buf, d_hg, _unbind(w_gate, transpose=True), None, True)
        if need_x:
            w = None if plan.weight is None else plan.weight.to(buf.dtype)  # dropped slots add nothing
            grad_x = F.embedding_bag(plan.inv, buf, mode="sum", per_sample_weights=w)  # (T, D)
        return grad_x, grad_gates, gw_in, gb_in, gw_gate, gb_gate, gw_out, gb_out, None, None, None, None


def _swiglu_backward(ga: Tensor, h: Tensor, hg: Tensor, sg: Tensor, d_hg: Tensor) -> None:
    """In place: d_hg = silu'(hg) * ga * h (dL/d(x W_gate)), then ga = ga * silu(hg) (dL/dh)."""
    torch.mul(ga, h, out=d_hg)
    torch.ops.aten.silu_backward.grad_input(d_hg, hg, grad_input=d_hg)
    ga.mul_(sg)


GROUPED_IMPLS = ("auto", "loop", "grouped_mm")


class _CastExperts:
    """An experts module's stacked weights seen in another dtype (differentiable casts): what
    autocast would have done to them, for ``grouped_experts`` under mixed precision."""

    def __init__(self, experts, dtype: torch.dtype) -> None:
        self.activation = experts.activation
        for name in EXPERT_PARAMS:
            w = getattr(experts, name)
            setattr(self, name, None if w is None else w.to(dtype))


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_experts(experts, x: Tensor, gates: Tensor, plan: DispatchPlan) -> Tensor:
    """The accelerator path: one ``torch._grouped_mm`` per weight matrix over all T*K sorted slots.

    Same math as ``_GroupedExperts`` (and ``reference_combine``), differentiated by autograd. The
    group offsets are a device tensor and no shape depends on the routing, so the hot path has no
    host sync: every slot is laid out (dropped ones sort last, past the final offset), and rows past
    the final offset, which ``_grouped_mm`` leaves undefined, are zeroed on the way in and out.

    Shapes: x (T, D), gates (T, K) -> y (T, D); R = T*K sorted rows.
    """
    T, K = plan.inv.shape
    E = plan.expert_counts.shape[0]
    offs = torch.cumsum(plan.expert_counts, 0).to(torch.int32)  # (E,) end row of each expert's group
    row = torch.arange(T * K, device=x.device)
    valid = (row < offs[-1])[:, None]  # (R, 1): rows of an active pair
    expert = torch.searchsorted(offs, row.to(torch.int32), right=True).clamp(max=E - 1)  # (R,) expert of each row
    tok = torch.div(plan.order, K, rounding_mode="floor")  # (R,) token of each sorted slot
    xs = torch.where(valid, x.index_select(0, tok), 0)  # (R, D)

    def linear(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # rows past the last offset stay 0
        out = torch._grouped_mm(a, w.to(a.dtype), offs=offs)  # (R, w.shape[2])
        return torch.where(valid, out if b is None else out + b.to(out.dtype).index_select(0, expert), 0)

    h = linear(xs, experts.w_in, experts.b_in)  # (R, H)
    gate = linear(xs, experts.w_gate, experts.b_gate) if experts.activation == "swiglu" else None
    eo = linear(activate(h, gate, experts.activation), experts.w_out, experts.b_out)  # (R, D)
    w = gates.to(eo.dtype) if plan.weight is None else gates.to(eo.dtype) * plan.weight.to(eo.dtype)
    return F.embedding_bag(plan.inv, eo, mode="sum", per_sample_weights=w)  # (T, D): gather, gate, sum over K


def grouped_experts(
    experts,
    x: Tensor,
    gates: Tensor,
    plan: DispatchPlan,
    workspace: Workspace | None = None,
    impl: str = "auto",
) -> Tensor:
    """The fast sparse path: x (T, D), gates (T, K) -> y (T, D) = sum_k gates * expert(x).

    ``workspace``: the calling layer's ``Workspace`` (helper threads; buffer reuse while
    training), or None to run everything on the calling thread with fresh buffers. The thread pool
    is for CPU tensors only: on an accelerator it is never used.
    ``impl``: "loop" (the per-expert matmul Function above, any device), "grouped_mm"
    (``grouped_mm_experts``), or "auto": grouped_mm on an accelerator where torch has it, else loop.
    """
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"impl={impl!r} is invalid; allowed: {', '.join(map(repr, GROUPED_IMPLS))}")
    on_cpu = x.device.type == "cpu"
    low = autocast_dtype(x.device.type)  # autocast cannot see into the Function's out= kernels or helper threads
    if low is not None:  # so the experts compute in its dtype explicitly (weights cast on the way in; their
        with torch.autocast(x.device.type, enabled=False):  # gradients come back float32)
            return grouped_experts(_CastExperts(experts, low), x.to(low), gates, plan, workspace, impl)
    if impl == "auto":
        impl = "grouped_mm" if not on_cpu and grouped_mm_available() else "loop"
    if impl == "grouped_mm":
        try:
            return grouped_mm_experts(experts, x, gates, plan)
        except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype or alignment the kernel lacks
            if on_cpu:
                raise
            warnings.warn(f"torch._grouped_mm failed ({e}); using one matmul per expert", stacklevel=2)
    return _GroupedExperts.apply(
        x,
        gates,
        experts.w_in,
        experts.b_in,
        experts.w_gate,
        experts.b_gate,
        experts.w_out,
        experts.b_out,
        plan,
        experts.activation,
        workspace if on_cpu else None,
        torch.is_grad_enabled(),
    )
