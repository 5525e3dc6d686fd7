"""Routing statistics per task: how many tokens of each task each expert processes, and how much
two tasks share experts (the analysis of Kudugunta et al. 2021, sec. 5, and of task-conditioned
token routers). Pure functions over routing outputs and task ids.

Shape legend: T tokens, K choice slots, E experts, N tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def routed_matrix(expert_idx: Tensor, num_experts: int, active: Tensor | None = None) -> Tensor:
    """(T, E) float: 1 where token t was processed by expert e (a ``Routing``'s expert_idx (T, K) and
    active (T, K), None = all slots used)."""
    w = torch.ones(expert_idx.shape, device=expert_idx.device) if active is None else active.float()
    m = torch.zeros(expert_idx.shape[0], num_experts, device=expert_idx.device)
    return m.scatter_add_(1, expert_idx, w).clamp_(max=1.0)  # a repeated expert counts once


def task_expert_load(routed: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor:
    """(N, E) float64: tokens of task n that expert e processed, load[n, e] = sum_{t: task_t = n} routed[t, e].

    routed: (T, E), 1/0 per (token, expert) (``routed_matrix``, or a gate matrix > 0), or weights
    (soft MoE's combine mass); task_ids: (T,) long in 0..N-1."""
    if routed.dim() != 2 or task_ids.shape != routed.shape[:1]:
        raise ValueError(f"routed must be (T, E) and task_ids (T,); got {tuple(routed.shape)} and {tuple(task_ids.shape)}")
    one_hot = torch.nn.functional.one_hot(task_ids.long(), num_tasks).double()  # (T, N)
    return one_hot.t() @ routed.double()  # (N, E)


def task_overlap(load: Tensor, metric: str = "jaccard") -> Tensor:
    """(N, N) similarity of the tasks' expert use, from ``task_expert_load`` (N, E):

    - ``jaccard``: |S_a & S_b| / |S_a | S_b| over the sets S_n = {e : load[n, e] > 0} (1 when both empty);
    - ``cosine``: cos(load[a], load[b]) of the load vectors (0 when one is all zero).
    """
    if metric == "jaccard":
        used = (load > 0).double()  # (N, E)
        inter = used @ used.t()  # (N, N)
        union = used.sum(1, keepdim=True) + used.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    if metric == "cosine":
        norm = load.double().norm(dim=1, keepdim=True)  # (N, 1)
        unit = load.double() / norm.clamp(min=1e-12)
        return unit @ unit.t()
    raise ValueError(f"metric={metric!r} is invalid; allowed: 'jaccard' or 'cosine'")
