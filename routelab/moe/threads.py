"""Running the fast MoE path's many small matmuls on CPU threads without OpenMP overhead.

The grouped expert computation (``routelab.moe.dispatch``) is one BLAS call per expert block.
Under torch's intra-op OpenMP threads each call is a fork/join, and libgomp's threads spin after
each join, so on a small shared CPU the joins, not the math, dominate. Instead the caller runs
single-threaded and hands *task lists* (runs of rows of the expert-sorted buffer) to a small pool
of helper threads, each with single-threaded BLAS: one hand-off per operation instead of one
OpenMP join per matmul. ``benchmarks/moe_layer.py`` measures the effect.

Shape legend: N active (token, expert) pairs in the expert-sorted buffer, E experts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

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


# bf16/fp16 matmuls on CPU run on oneDNN, which compiles a kernel per shape (and keeps 1024): an
# expert's row count changes with every routing decision, so exact-size calls compile nearly every
# time (measured: 840 us for a 128x172 bf16 matmul with varying rows, 230 us with a repeated shape).
# Cutting each run of rows into a multiple of ROW_BUCKET rows plus a remainder leaves ~N/ROW_BUCKET +
# ROW_BUCKET shapes, which stay cached. fp32 (MKL/OpenBLAS, no per-shape compile) runs as one call.
ROW_BUCKET = 32
_COMPILED_PER_SHAPE = (torch.bfloat16, torch.float16)


def _pieces(s: int, t: int, x: Tensor) -> list[tuple[int, int]]:
    """Rows [s, t) as one piece, or on CPU in bf16/fp16 as [s, s + k*ROW_BUCKET) and the rest."""
    if x.dtype not in _COMPILED_PER_SHAPE or x.device.type != "cpu" or t - s <= ROW_BUCKET:
        return [(s, t)]
    cut = s + (t - s) // ROW_BUCKET * ROW_BUCKET
    return [(s, cut), (cut, t)] if cut < t else [(s, t)]


def _rows_mm(tasks: list[Task], out: Tensor, a: Tensor, b, bias=None, accumulate: bool = False) -> None:
    """out[s:t] = bias[e] + a[s:t] @ b[e] (or out[s:t] += a[s:t] @ b[e]) for each task."""
    for e, s0, t0 in tasks:
        for s, t in _pieces(s0, t0, a):  # rows are independent: any split gives the same rows
            if accumulate:
                out[s:t].addmm_(a[s:t], b[e])
            elif bias is not None:
                torch.addmm(bias[e], a[s:t], b[e], out=out[s:t])
            else:
                torch.mm(a[s:t], b[e], out=out[s:t])


def _weights_mm(tasks: list[Task], out, a: Tensor, b: Tensor, bias_out=None, bias_weight: Tensor | None = None) -> None:
    """out[e] = a[s:t]^T @ b[s:t] for each task (one whole expert each), and the bias gradient
    bias_out[e] = sum of b[s:t] (weighted by bias_weight[s:t] if given)."""
    for e, s0, t0 in tasks:
        for i, (s, t) in enumerate(_pieces(s0, t0, a)):  # a sum over rows: the pieces add up
            if i == 0:
                torch.mm(a[s:t].t(), b[s:t], out=out[e])
            else:
                out[e].addmm_(a[s:t].t(), b[s:t])
        if bias_out is not None:
            if bias_weight is None:
                torch.sum(b[s0:t0], 0, out=bias_out[e])
            else:
                torch.mv(b[s0:t0].t(), bias_weight[s0:t0], out=bias_out[e])


def _rows_apply(tasks: list[Task], fn, *tensors) -> None:
    """fn(*(x[s:t] for x in tensors)) for each task: a row-wise op on a share of the rows."""
    for _, s, t in tasks:
        fn(*(x[s:t] for x in tensors))


def _in_worker(inference: bool, kernel, tasks, args) -> None:
    with torch.inference_mode() if inference else torch.no_grad():
        kernel(tasks, *args)


class Workspace:
    """One MoE layer's helper threads and reusable working memory (like a cuDNN workspace).

    Threads (see the module docstring): ``grouped_experts`` runs single-threaded itself and spreads
    its work (matmul task lists and row-wise ops) over ``torch.get_num_threads()`` threads: the
    caller and helper threads, each with single-threaded BLAS.

    Memory: the (N, D) sorted buffer is dead once forward returns and the per-pair gradient
    buffer once backward returns, so one buffer serves both, step after step (training only;
    inference allocates per call): large allocations are fresh ``mmap``s under glibc, whose pages
    are zeroed again on first touch every step otherwise.

    Not state: never saved, rebuilt empty when the module is copied or unpickled.
    """

    def __init__(self, min_macs: float = 2e9) -> None:
        # helper threads only for passes of at least this many multiply-adds: a short pass (the
        # tiny presets: 0.5-1.1 G) mostly overlaps the spin of libgomp's threads after torch's last
        # parallel op, and a spinning thread slows a helper down more than the helper saves
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


class WorkSplit:
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

    def __enter__(self) -> WorkSplit:
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


