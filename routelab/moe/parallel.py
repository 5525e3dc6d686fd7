"""Expert parallelism (GShard, Lepikhin et al. 2020, sec. 3; Switch, Fedus et al. 2021, sec. 2.2):
the experts of each MoE layer are spread over the P ranks of an expert-parallel group, and tokens
travel to their experts and back with all-to-all exchanges.

Per layer and step, on every rank of a group (its experts are the slice e0 .. e0 + E/P - 1 of
dimension 0 of the stacked expert weights):

1. route the rank's own tokens as in one process (the router is replicated);
2. group the chosen (token, expert) pairs by destination rank. A token whose experts share a rank
   travels there once (one row per (token, rank), as DeepSeek-V3 sends a token once per node), so
   a token costs as many rows as the ranks it reaches: device-limited routing
   (``Router.limit_groups``) bounds exactly that;
3. exchange the counts (rows and pairs per destination), then the rows, the pairs' (row, local
   expert) and their gates (``all_to_all_single`` with variable split sizes);
4. run the local experts on what arrived (the fused grouped path of ``routelab.moe.dispatch``),
   each row through its experts on this rank, summed by gate weight;
5. send one row back per row received (the reverse exchange) and add it to its token.

Backward mirrors it: the gradient of an exchange is the exchange with the split sizes swapped
(``AllToAll``); the gates' gradients travel back to their router. Capacity, when set, is computed
from each rank's own tokens (GShard's groups).

Gradients: an expert's gradient on its owner sums the contributions of every rank of its group; the
replicas of the same slice in other groups (data parallelism across groups) hold the same experts,
so the expert gradients are summed over those replicas only and divided by the world size (the
global loss is the mean of the ranks' losses), never averaged over the expert-parallel group (whose
ranks hold different experts). Dense and router parameters stay with ``DistributedDataParallel``.

Shape legend: T tokens of this rank, K slots per token, N chosen pairs sent, U rows sent (distinct
(token, rank)), R rows and M pairs received, E experts, L = E / P local experts, D model dim.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routelab.errors import ConfigError
from routelab.moe.comm import CommCounters, now
from routelab.moe.dispatch import grouped_experts, plan_dispatch
from routelab.moe.experts import EXPERT_PARAMS
from routelab.moe.routers.router import require_capability
from routelab.precision import autocast_dtype


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable split sizes; backward sends the gradients back
    along the same routes (the split sizes swapped). Each call, forward and backward, is counted in
    ``counters`` (rows to other ranks than ``me``, seconds); ``role`` "combine" (the exchange that
    brings results back) marks when its backward ended, and the next exchange's backward to run
    ("dispatch" or "gates") adds the time since then (the local experts' backward) to ``expert_s``."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: Any, counters: CommCounters, me: int, role: str) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.counters, ctx.me, ctx.role = send, recv, group, counters, me, role
        return exchange(x, send, recv, group, counters, me)

    @staticmethod
    def backward(ctx, grad: Tensor):
        c = ctx.counters
        if ctx.role != "combine" and c.backward_mark is not None:
            c.expert_s += now(grad.device) - c.backward_mark
            c.backward_mark = None
        out = exchange(grad, ctx.recv, ctx.send, ctx.group, c, ctx.me)
        if ctx.role == "combine":
            c.backward_mark = now(grad.device)
        return out, None, None, None, None, None, None


def exchange(x: Tensor, send: list[int], recv: list[int], group: Any, counters: CommCounters, me: int) -> Tensor:
    """Rows x (sum(send), ...) -> (sum(recv), ...), ``send[i]`` rows to rank i of ``group``; counted."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    t0 = now(x.device)
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    counters.exchange(sum(send), send[me], math.prod(x.shape[1:]) * x.element_size(), now(x.device) - t0)
    return out


def block_starts(counts: Tensor) -> Tensor:
    """(P,) counts -> (P,) offset of each block in their concatenation."""
    return torch.cumsum(counts, 0) - counts


@dataclass
class ExpertGroups:
    """This rank's place in expert parallelism of size P over ``world_size`` ranks: the P consecutive
    ranks of its expert-parallel group hold different experts; the ``world_size / P`` ranks at the
    same position of every group hold the same experts (their data-parallel replicas)."""

    size: int  # P
    index: int  # this rank's position in its group: it owns expert slice ``index``
    group: Any  # the expert-parallel process group
    replicas: Any  # the process group of this slice's replicas (None when there is one group)
    world_size: int


def expert_groups(size: int, rank: int, world_size: int, *, timeout_s: float) -> ExpertGroups:
    """Create the process groups (every rank calls this with the same arguments, in the same order).

    ``timeout_s`` (the trainer passes ``train.dist_timeout``) bounds each collective of these groups,
    as ``init_process_group``'s bounds the default group's: a group made without one waits torch's
    default of 30 minutes, so a rank that hangs (stopped, deadlocked) would hang its peers in an
    all-to-all that long instead of ending the run."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [dist.new_group(list(range(g * size, (g + 1) * size)), timeout=timeout) for g in range(world_size // size)]
    replica_groups = (
        [dist.new_group(list(range(i, world_size, size)), timeout=timeout) for i in range(size)] if world_size > size else None
    )
    index = rank % size
    return ExpertGroups(size, index, groups[rank // size], replica_groups[index] if replica_groups else None, world_size)


class ExpertParallel:
    """Dispatch and combine of one MoE layer whose ``experts`` hold only this rank's slice."""

    def __init__(self, groups: ExpertGroups, num_experts: int) -> None:
        self.groups, self.num_experts = groups, num_experts
        self.local = num_experts // groups.size  # L
        self.counters = CommCounters()  # what this layer sent and how long it took, since the trainer last read it

    def __call__(self, experts: nn.Module, x: Tensor, expert_idx: Tensor, gates: Tensor, active: Tensor | None, workspace) -> Tensor:
        """x (T, D), expert_idx / gates / active (T, K) -> y (T, D) = sum_k gates * expert(x).

        Under autocast the rows travel and the experts compute in its dtype (bf16: half the bytes of
        every exchange), and y comes back in it."""
        T, K = expert_idx.shape
        P, L, group, me, c = self.groups.size, self.local, self.groups.group, self.groups.index, self.counters
        dev = x.device
        x = x.to(autocast_dtype(dev.type) or x.dtype)
        chosen = torch.arange(T * K, device=dev) if active is None else active.reshape(-1).nonzero().squeeze(1)  # (N,)
        token = torch.div(chosen, K, rounding_mode="floor")  # (N,)
        expert = expert_idx.reshape(-1)[chosen]  # (N,)
        dest = torch.div(expert, L, rounding_mode="floor")  # (N,) the rank holding the pair's expert
        # one row per (token, destination): sorted by destination, then token
        rows, pair_row = torch.unique(dest * T + token, sorted=True, return_inverse=True)  # (U,), (N,)
        row_token, row_dest = rows % T, torch.div(rows, T, rounding_mode="floor")  # (U,)
        order = torch.argsort(pair_row * L + expert % L)  # pairs by row (so by destination), then local expert
        send_rows = torch.bincount(row_dest, minlength=P)  # (P,)
        send_pairs = torch.bincount(dest, minlength=P)  # (P,)
        meta = torch.stack([pair_row[order] - block_starts(send_rows)[dest[order]], expert[order] % L], 1).to(torch.int32)  # (N, 2)
        counts = torch.stack([send_rows, send_pairs], 1)  # (P, 2)
        recv_counts = torch.empty_like(counts)
        t0 = now(dev)
        dist.all_to_all_single(recv_counts, counts, group=group)  # (P, 2): rows and pairs from each source
        c.exchange(P, 1, 2 * counts.element_size(), now(dev) - t0)
        sr, sp, rr, rp = (t.tolist() for t in (send_rows, send_pairs, recv_counts[:, 0], recv_counts[:, 1]))
        c.route(torch.div(expert_idx, L, rounding_mode="floor"), active)
        c.pairs, c.local_pairs, c.sent_tokens = c.pairs + len(chosen), c.local_pairs + sp[me], c.sent_tokens + len(rows) - sr[me]
        x_in = AllToAll.apply(x[row_token], sr, rr, group, c, me, "dispatch")  # (R, D): by source, then destination order
        meta_in = exchange(meta, sp, rp, group, c, me).long()  # (M, 2): (row within its source's block, local expert)
        g_in = AllToAll.apply(gates.reshape(-1)[chosen][order].to(x.dtype), sp, rp, group, c, me, "gates")  # (M,)
        t0 = now(dev)
        source = torch.repeat_interleave(torch.arange(P, device=dev), recv_counts[:, 1])  # (M,) the source of each pair
        in_row = block_starts(recv_counts[:, 0])[source] + meta_in[:, 0]  # (M,) its row in x_in
        R = x_in.shape[0]
        has = torch.zeros(R, L, dtype=torch.bool, device=dev).index_put_((in_row, meta_in[:, 1]), torch.ones_like(in_row, dtype=torch.bool))
        g_rows = x_in.new_zeros(R, L).index_put((in_row, meta_in[:, 1]), g_in)  # (R, L) each row's gate per local expert
        local = torch.arange(L, device=dev).expand(R, L)  # (R, L) slot j = local expert j
        y_in = grouped_experts(experts, x_in, g_rows, plan_dispatch(local, has, L), workspace)  # (R, D)
        c.expert_s += now(dev) - t0
        y_out = AllToAll.apply(y_in, rr, sr, group, c, me, "combine")  # (U, D): back in the order sent
        return torch.zeros_like(x).index_add(0, row_token, y_out)  # (T, D)


def check_divides_experts(size: int, num_experts: int) -> None:
    """Each rank of an expert-parallel group holds ``num_experts / size`` experts of every MoE layer."""
    if num_experts % size:
        raise ConfigError(f"train.expert_parallel={size} is invalid: it must divide model.ffn.num_experts={num_experts}")


def check_expert_parallel(model: nn.Module, size: int, world_size: int) -> list[nn.Module]:
    """The model's MoE layers, after checking that expert parallelism of ``size`` can run them."""
    from routelab.moe.layer import MoE

    if world_size % size:
        raise ConfigError(f"train.expert_parallel={size} is invalid with {world_size} processes; allowed: a divisor of {world_size}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ConfigError(f"train.expert_parallel={size} is invalid: the model has no MoE layer (model.ffn.kind: moe)")
    for m in layers:
        check_divides_experts(size, m.num_experts)
        refusal = (
            f"router {m.router.kind!r} ranks the whole batch together, which expert parallelism splits between"
            " processes"
        )
        require_capability(m.router, "whole_batch", refusal, value=False)
        if m.impl != "sorted":
            raise ConfigError("expert parallelism runs the fast path only; set model.ffn.impl=sorted")
    return layers


def apply_expert_parallel(model: nn.Module, groups: ExpertGroups) -> list[str]:
    """Keep, in every MoE layer, only this rank's slice of the stacked expert weights and route its
    experts' work through ``ExpertParallel``; returns the names of the sliced parameters (for
    ``DistributedDataParallel`` to leave alone and ``sync_expert_grads`` to reduce). A model built
    with this rank's ``expert_slice`` (``RoutedTransformer(cfg, expert_slice=(groups.index, groups.size))``,
    what the trainer does: no process ever holds every expert) is used as it is; a model holding every
    expert is sliced here (its full tensors are freed once nothing else refers to them)."""
    layers = check_expert_parallel(model, groups.size, groups.world_size)
    names = []
    for m in layers:
        L = m.num_experts // groups.size
        lo = groups.index * L
        held = m.experts.expert_slice
        if held is not None and held != (groups.index, groups.size):
            raise ValueError(f"the model holds expert slice {held} but this rank's is {(groups.index, groups.size)}")
        if held is None:
            for p in EXPERT_PARAMS:
                t = getattr(m.experts, p)
                if t is not None:
                    setattr(m.experts, p, nn.Parameter(t.detach()[lo : lo + L].clone()))
            m.experts.num_experts, m.experts.expert_slice = L, (groups.index, groups.size)
        m.expert_parallel = ExpertParallel(groups, m.num_experts)
    prefix = {id(m): n for n, m in model.named_modules()}
    for m in layers:
        base = f"{prefix[id(m)]}.experts" if prefix[id(m)] else "experts"
        names += [f"{base}.{p}" for p in EXPERT_PARAMS if getattr(m.experts, p) is not None]
    return names


def sync_expert_grads(model: nn.Module, names: list[str], groups: ExpertGroups) -> None:
    """Expert gradients: summed over the replicas of this slice, divided by the world size (see the
    module docstring). Call once per update, after the last backward."""
    params = dict(model.named_parameters())
    grads = [params[n].grad for n in names if params[n].grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if groups.replicas is not None:
        dist.all_reduce(flat, group=groups.replicas)
    flat /= groups.world_size
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()


def gather_experts(t: Tensor, groups: ExpertGroups) -> Tensor:
    """The full (E, ...) tensor from the slices (L, ...) of the expert-parallel group."""
    parts = [torch.empty_like(t) for _ in range(groups.size)]
    dist.all_gather(parts, t.contiguous(), group=groups.group)
    return torch.cat(parts, dim=0)


def slice_experts(t: Tensor, groups: ExpertGroups) -> Tensor:
    """This rank's rows of a full (E, ...) tensor."""
    L = t.shape[0] // groups.size
    return t[groups.index * L : (groups.index + 1) * L].clone()


class ExpertGradients:
    """The gradient steps expert parallelism adds to an update: ``sync`` (expert gradients over the
    replicas of their slice, see ``sync_expert_grads``) and ``clip`` (the global gradient norm, whose
    expert part is spread over the expert-parallel group, so every rank clips by the same factor)."""

    def __init__(self, model: nn.Module, names: list[str], groups: ExpertGroups) -> None:
        self.model, self.names, self.groups = model, names, groups
        params = dict(model.named_parameters())
        self.expert_ids = {id(params[n]) for n in names}

    def sync(self) -> None:
        sync_expert_grads(self.model, self.names, self.groups)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """The global 2-norm of all gradients (before clipping); scales them to ``max_norm`` if larger
        (``max_norm`` 0: no clipping), as ``torch.nn.utils.clip_grad_norm_`` does in one process."""
        grads = [(p.grad, id(p) in self.expert_ids) for p in params if p.grad is not None]
        device = grads[0][0].device if grads else torch.device("cpu")
        sq = torch.zeros(2, dtype=torch.float32, device=device)  # dense (same on every rank), this rank's experts
        for g, is_expert in grads:
            sq[int(is_expert)] += g.float().pow(2).sum()
        expert_sq = sq[1:].clone()
        dist.all_reduce(expert_sq, group=self.groups.group)  # the slices of the group make all the experts
        norm = (sq[0] + expert_sq[0]).sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g, _ in grads:
                g.mul_(coef.to(g.dtype))
        return norm
