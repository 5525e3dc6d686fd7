"""Sparse dispatch: compute only the chosen (token, expert) pairs, then combine by gate weight.

    y_t = sum_k g_tk * E_{e_tk}(x_t)          (Shazeer et al. 2017, eq. 1; Fedus et al. 2021, eq. 2)

The fast path (``grouped_experts``) is one autograd Function with a hand-written backward:

1. ``plan_dispatch`` stable-sorts the active (token, slot) pairs by expert, so each expert's
   tokens are one contiguous block of a sorted (N, D) buffer (N = active pairs).
2. Forward: gather x into that buffer; per expert one ``addmm`` per weight matrix writing into
   slices of preallocated buffers; the activation once over the whole (N, H) buffer.
3. Combine: ``embedding_bag`` over the inverse permutation with the gates as per-sample weights:
   gather + gate multiply + sum over the K slots in one parallel pass (``index_add_`` was ~10x
   slower here).
4. Backward mirrors it: one gather of dL/dy, per-expert matmuls writing the weight gradients
   straight into the stacked (E, D, H) gradient tensors, bias gradients as ``embedding_bag``
   segment sums (``segment_reduce`` was ~50x slower), the gate gradient as a row dot product,
   and ``embedding_bag`` again to sum each token's K slot gradients.

Why a Python loop over experts: measured on the 2-core CPU this library targets (see
benchmarks/moe_layer.py --compare), one matmul per contiguous expert block beats a padded batched
matmul, ``torch._grouped_mm`` (on CPU a per-group loop itself) and the same loop under autograd
(whose slices and ``w[e]`` each materialise a full-size zero gradient in backward). The loop
body launches matmuls only, never per-token work, and its task lists run on all of torch's
threads at once with single-threaded BLAS (``Workspace``), so the many small matmuls pay no
OpenMP fork/join each. Capacity drops are applied before the plan.

Shape legend: T tokens, K slots per token, N active pairs, E experts, D model dim, H hidden.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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

    Attributes:
        order: (T*K,) slot index of each sorted position; the first N are the active pairs.
        inv: (T, K) sorted position of each slot (the inverse of ``order``).
        token: (N,) token of each sorted pair.
        counts: E Python ints, pairs per expert (the slice lengths).
        weight: (T, K) float, 1 for active slots and 0 for dropped ones, or None if all active.
    """

    order: Tensor
    inv: Tensor
    token: Tensor
    counts: list[int]
    weight: Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.token.shape[0]


def plan_dispatch(expert_idx: Tensor, active: Tensor | None, num_experts: int) -> DispatchPlan:
    """Sort the active pairs by expert (stable, so tokens keep their order within an expert).

    Shapes: expert_idx, active (T, K).
    """
    T, K = expert_idx.shape
    key = expert_idx.reshape(-1)
    if active is not None:
        key = torch.where(active.reshape(-1), key, num_experts)  # inactive pairs sort last
    order = torch.argsort(key, stable=True)  # (T*K,)
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    n = sum(counts[:num_experts])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T * K, device=order.device)
    weight = None
    if active is not None:  # dropped slots read row 0 with weight 0 (embedding_bag needs a valid row)
        inv = torch.where(active.reshape(-1), inv, 0)
        weight = active.to(torch.float32)
    return DispatchPlan(
        order, inv.view(T, K), torch.div(order[:n], K, rounding_mode="floor"), counts[:num_experts], weight
    )


# ----------------------------------------------------------------------------------------------
# the fused grouped expert computation


# (expert, first row, end row) of a run of rows in the expert-sorted buffer
Task = tuple[int, int, int]


def _row_tasks(counts: list[int], parts: int) -> list[list[Task]]:
    """The N sorted rows cut into ``parts`` equal runs (an expert's block may be cut in two):
    for work whose output rows are independent (matmuls into (N, .) buffers, elementwise ops)."""
    N = sum(counts)
    bounds = [N * i // parts for i in range(parts + 1)]
    tasks: list[list[Task]] = [[] for _ in range(parts)]
    start = 0
    for e, n in enumerate(counts):
        end = start + n
        for p in range(parts):
            s, t = max(start, bounds[p]), min(end, bounds[p + 1])
            if s < t:
                tasks[p].append((e, s, t))
        start = end
    return tasks


def _expert_tasks(counts: list[int], parts: int) -> list[list[Task]]:
    """Whole experts in ``parts`` contiguous groups of about N / parts rows: for the weight
    gradients, each a sum over all of one expert's rows."""
    N = max(sum(counts), 1)
    tasks: list[list[Task]] = [[] for _ in range(parts)]
    start = 0
    for e, n in enumerate(counts):
        if n:
            tasks[min(parts - 1, (start + n // 2) * parts // N)].append((e, start, start + n))
        start += n
    return tasks


def _rows_mm(tasks: list[Task], out: Tensor, a: Tensor, b, bias=None, accumulate: bool = False) -> None:
    """out[s:t] = bias[e] + a[s:t] @ b[e] (or out[s:t] += a[s:t] @ b[e]) for each task."""
    for e, s, t in tasks:
        if accumulate:
            out[s:t].addmm_(a[s:t], b[e])
        elif bias is not None:
            torch.addmm(bias[e], a[s:t], b[e], out=out[s:t])
        else:
            torch.mm(a[s:t], b[e], out=out[s:t])


def _weights_mm(tasks: list[Task], out, a: Tensor, b: Tensor, bias_out=None, bias_weight: Tensor | None = None) -> None:
    """out[e] = a[s:t]^T @ b[s:t] for each task (one whole expert each), and the bias gradient
    bias_out[e] = sum of b[s:t] (weighted by bias_weight[s:t] if given)."""
    for e, s, t in tasks:
        torch.mm(a[s:t].t(), b[s:t], out=out[e])
        if bias_out is not None:
            if bias_weight is None:
                torch.sum(b[s:t], 0, out=bias_out[e])
            else:
                torch.mv(b[s:t].t(), bias_weight[s:t], out=bias_out[e])


def _rows_apply(tasks: list[Task], fn, *tensors) -> None:
    """fn(*(x[s:t] for x in tensors)) for each task: a row-wise op on a share of the rows."""
    for _, s, t in tasks:
        fn(*(x[s:t] for x in tensors))


def _in_worker(inference: bool, kernel, tasks, args) -> None:
    with torch.inference_mode() if inference else torch.no_grad():
        kernel(tasks, *args)


class Workspace:
    """One MoE layer's helper threads and reusable working memory (like a cuDNN workspace).

    Threads: the fast path is many small BLAS calls. With torch's intra-op OpenMP threads each
    call is a fork/join, and libgomp's threads spin for milliseconds after each join: on this
    2-core machine shared with other jobs that turned 64 experts' matmuls from 45 ms into 400-570
    ms, and a whole MoE step into 15x a dense FFN's. So ``grouped_experts`` runs single-threaded
    itself and spreads its work (matmul task lists and row-wise ops) over
    ``torch.get_num_threads()`` threads: the caller and helper threads, each with single-threaded
    BLAS, with one hand-off per op instead of an OpenMP join per matmul.

    Memory: the (N, D) sorted buffer is dead once forward returns and the per-pair gradient
    buffer once backward returns, so one buffer serves both, step after step (training only;
    inference allocates per call). Allocations of 32 MB and more are fresh ``mmap``s under
    glibc, and first-touching them costs ~0.25 ms per MB here, about a tenth of the layer's step
    at 64 experts.

    Not state: never saved, rebuilt empty when the module is copied or unpickled.
    """

    def __init__(self, min_macs: float = 2e9) -> None:
        # helper threads only for passes of at least this many multiply-adds (~50 ms here): a
        # shorter pass (the tiny presets: 0.5-1.1 G) mostly overlaps libgomp's ~7 ms spin after
        # torch's last parallel op, whose spinning thread then halves a helper's speed
        self.min_macs = min_macs
        self._buffer: Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def __getstate__(self) -> dict:
        return {"min_macs": self.min_macs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def buffer(self, n: int, d: int, like: Tensor) -> Tensor:
        t = self._buffer
        if t is None or t.numel() < n * d or t.dtype != like.dtype or t.device != like.device:
            t = self._buffer = like.new_empty(n * d)
        return t[: n * d].view(n, d)

    def run(self, kernel, tasks: list[list[Task]], *args) -> None:
        """kernel(tasks[0], *args) on this thread, the other task lists on helper threads."""
        parts = [t for t in tasks if t]
        if len(parts) <= 1:
            kernel(parts[0] if parts else [], *args)
            return
        if self._pool is None or self._pool_size < len(parts) - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(
                len(parts) - 1, "routelab-moe", initializer=torch.set_num_threads, initargs=(1,)
            )
            self._pool_size = len(parts) - 1
        inference = torch.is_inference_mode_enabled()
        futures = [self._pool.submit(_in_worker, inference, kernel, p, args) for p in parts[1:]]
        try:
            kernel(parts[0], *args)
        finally:
            for f in futures:
                f.result()


class _Parallel:
    """How one forward or backward call spreads its work (see ``Workspace``).

    Inside ``with``, this thread runs single-threaded; ``mm_rows`` / ``mm_weights`` / ``apply``
    hand task lists to the workspace's threads. Without a workspace (or with one torch thread)
    everything runs here, with torch's own threading.
    """

    def __init__(self, ws: Workspace | None, counts: list[int], macs: int) -> None:
        self.threads = torch.get_num_threads()
        self.ws = ws if ws is not None and self.threads > 1 and macs >= ws.min_macs else None
        P = self.threads if self.ws is not None else 1
        N = sum(counts)
        self.rows = _row_tasks(counts, P)  # matmuls into (N, .) buffers: rows split evenly
        self.whole = _expert_tasks(counts, P)  # weight gradients: whole experts
        self.even = [[(-1, N * i // P, N * (i + 1) // P)] for i in range(P)]  # elementwise ops

    def __enter__(self) -> _Parallel:
        if self.ws is not None:
            torch.set_num_threads(1)  # this thread only (torch's setting is per thread)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)

    def _run(self, kernel, tasks, *args) -> None:
        if self.ws is None:
            kernel([t for part in tasks for t in part], *args)
        else:
            self.ws.run(kernel, tasks, *args)

    def mm_rows(self, out, a, b, bias=None, accumulate=False) -> None:
        self._run(_rows_mm, self.rows, out, a, b, bias, accumulate)

    def mm_weights(self, out, a, b, bias_out=None, bias_weight=None) -> None:
        self._run(_weights_mm, self.whole, out, a, b, bias_out, bias_weight)

    def apply(self, fn, *tensors) -> None:
        """fn on row slices of ``tensors`` (all with N rows), in parallel."""
        self._run(_rows_apply, self.even, fn, *tensors)


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
    in a few row blocks; ``_Parallel`` spreads both over threads.

    Memory: one (N, D) buffer holds the gathered tokens, then the expert outputs; backward
    regathers x instead of saving it and reuses the buffer for dL/dy per pair, the regathered
    tokens and dL/dx per pair. Only the (N, H) pre-activations are saved: as many bytes as a
    dense FFN of the same active width.
    """

    @staticmethod
    def forward(ctx, x, gates, w_in, b_in, w_gate, w_out, b_out, plan: DispatchPlan, activation: str, ws, reuse):
        # x (T, D); gates (T, K); w_in, w_gate (E, D, H); w_out (E, H, D); b_in (E, H); b_out (E, D)
        N, H, D = plan.num_pairs, w_in.shape[2], x.shape[1]
        buf = ws.buffer(max(N, 1), D, x) if reuse and ws is not None else x.new_empty(max(N, 1), D)
        macs = N * D * H * (3 if activation == "swiglu" else 2)  # the pass's matmul work
        with _Parallel(ws, plan.counts, macs) as par:
            if N:  # (N, D): the tokens sorted by expert, then their outputs
                par.apply(lambda tok, out: torch.index_select(x, 0, tok, out=out), plan.token, buf)
            else:
                buf.zero_()
            h = x.new_empty(N, H)  # x W_in + b_in
            par.mm_rows(h, buf, _unbind(w_in), _unbind(b_in))
            hg = a = None
            if activation == "swiglu":
                hg = x.new_empty(N, H)  # x W_gate
                par.mm_rows(hg, buf, _unbind(w_gate))
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
        ctx.save_for_backward(x, h, hg, gates, w_in, b_in, w_gate, w_out, b_out)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, h, hg, gates, w_in, b_in, w_gate, w_out, b_out = ctx.saved_tensors
        plan, activation, ws = ctx.plan, ctx.activation, ctx.ws
        T, K = plan.inv.shape
        N, H, D = plan.num_pairs, h.shape[1], x.shape[1]
        need_x, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = any(ctx.needs_input_grad[2:7])
        grad_x = grad_gates = gw_in = gb_in = gw_gate = gw_out = gb_out = None
        if N == 0:
            grad_x = torch.zeros_like(x) if need_x else None
            grad_gates = torch.zeros_like(gates) if need_g else None
            if need_w:
                gw_in, gw_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
                gw_gate = torch.zeros_like(w_gate) if w_gate is not None else None
                gb_in = torch.zeros_like(b_in) if b_in is not None else None
                gb_out = torch.zeros_like(b_out) if b_out is not None else None
            return grad_x, grad_gates, gw_in, gb_in, gw_gate, gw_out, gb_out, None, None, None, None
        gate = gates.reshape(-1)[plan.order[:N]].to(x.dtype).unsqueeze(1)  # (N, 1) gate of each sorted pair
        buf = ws.buffer(N, D, x) if ctx.reuse and ws is not None else x.new_empty(N, D)
        macs = N * D * H * (6 if activation == "swiglu" else 4)  # the pass's matmul work
        with _Parallel(ws, plan.counts, macs) as par:
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
                    par.mm_weights(_unbind(gw_gate), buf, d_hg)
                for e, n in enumerate(plan.counts):  # experts without tokens get exact zeros
                    if n == 0:
                        for g in (gw_in, gw_gate, gw_out, gb_in, gb_out):
                            if g is not None:
                                g[e].zero_()
            if need_x:  # dL/dx per pair, into the same buffer
                par.mm_rows(buf, ga, _unbind(w_in, transpose=True))
                if d_hg is not None:
                    par.mm_rows(buf, d_hg, _unbind(w_gate, transpose=True), None, True)
        if need_x:
            w = None if plan.weight is None else plan.weight.to(buf.dtype)  # dropped slots add nothing
            grad_x = F.embedding_bag(plan.inv, buf, mode="sum", per_sample_weights=w)  # (T, D)
        return grad_x, grad_gates, gw_in, gb_in, gw_gate, gw_out, gb_out, None, None, None, None


def _swiglu_backward(ga: Tensor, h: Tensor, hg: Tensor, sg: Tensor, d_hg: Tensor) -> None:
    """In place: d_hg = silu'(hg) * ga * h (dL/d(x W_gate)), then ga = ga * silu(hg) (dL/dh)."""
    torch.mul(ga, h, out=d_hg)
    torch.ops.aten.silu_backward.grad_input(d_hg, hg, grad_input=d_hg)
    ga.mul_(sg)


def grouped_experts(
    experts, x: Tensor, gates: Tensor, plan: DispatchPlan, workspace: Workspace | None = None
) -> Tensor:
    """The fast sparse path: x (T, D), gates (T, K) -> y (T, D) = sum_k gates * expert(x).

    ``workspace``: the calling layer's ``Workspace`` (helper threads; buffer reuse while
    training), or None to run everything on the calling thread with fresh buffers.
    """
    return _GroupedExperts.apply(
        x,
        gates,
        experts.w_in,
        experts.b_in,
        experts.w_gate,
        experts.w_out,
        experts.b_out,
        plan,
        experts.activation,
        workspace,
        torch.is_grad_enabled(),
    )
