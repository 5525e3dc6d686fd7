"""Auxiliary routing losses, as pure functions of the router's outputs.

- Load balancing (Fedus et al. 2021, Switch Transformers, eq. 4-6): ``E * sum_i f_i * P_i``.
- Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): ``mean_t logsumexp(logits_t)^2``.
- Router entropy (Huang et al. 2024, "Harder Tasks Need More Experts", the "dynamic loss"):
  ``mean_t H(p_t)``, pushing top-p routing to be confident so it does not spread over all experts.

The layer multiplies each by its configured weight (alpha, beta, ...) and adds them into
``aux_loss``. Padding tokens never reach these functions: the layer routes real tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_idx: Tensor, selected: Tensor | None = None, group: Any = None) -> Tensor:
    """Switch Transformers' auxiliary loss without its weight alpha: ``E * sum_i f_i * P_i``.

    Shapes: T tokens, E experts, K choices per token.

    f_i (eq. 5) is the fraction of the router's (token, choice) assignments that went to expert i
    (for top-k, over all T*K choices, so sum_i f_i = 1), P_i (eq. 6) the mean router probability
    of expert i. f is counted before capacity drops, as in the Switch implementation. With uniform
    routing f_i = P_i = 1/E and the loss is 1, its minimum for balanced assignments.

    Global-batch balancing (Qiu et al. 2025, "Demons in the Detail"): with ``group`` (a
    process group of W ranks training together), f and P are taken over the tokens of all its ranks
    (their counts and probability sums all-reduced), so each rank's loss is the loss of the global
    batch. Its gradient is the rank's own tokens' share, times W: the data-parallel mean over the W
    ranks then gives exactly the gradient of one process holding the whole batch. Every rank of the
    group must call it (also with T = 0).

    Args:
        probs: (T, E) router probabilities (float32).
        expert_idx: (T, K) chosen experts.
        selected: (T, K) bool, which choices count (None = all).
        group: None (this batch alone) or the process group whose batches are balanced together.
    """
    T, E = probs.shape
    one_hot = torch.zeros(T, E, dtype=probs.dtype, device=probs.device)
    weight = torch.ones_like(expert_idx, dtype=probs.dtype) if selected is None else selected.to(probs.dtype)
    one_hot.scatter_add_(1, expert_idx, weight)  # (T, E) assignments per token and expert
    if group is None:
        f = one_hot.sum(0) / weight.sum().clamp_min(1.0)  # (E,) eq. 5, detached by construction
        P = probs.mean(0)  # (E,) eq. 6
        return E * torch.dot(f, P)
    p_sum = probs.sum(0)  # (E,)
    totals = torch.cat([one_hot.sum(0), p_sum.detach(), weight.sum().reshape(1), probs.new_tensor([T])])  # (2E + 2,)
    dist.all_reduce(totals, group=group)
    f = totals[:E] / totals[2 * E].clamp_min(1.0)  # (E,) over the global batch
    n = totals[2 * E + 1].clamp_min(1.0)  # tokens of the global batch
    share = p_sum * (dist.get_world_size(group) / n)  # (E,) this rank's tokens' part of P, times W
    P = totals[E : 2 * E] / n + (share - share.detach())  # value: the global P; gradient: the share's
    return E * torch.dot(f, P)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. 5 without its weight: ``mean_t (log sum_j exp(logits_tj))^2``; logits (T, E)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def router_entropy(probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the routing distributions; probs (T, E). Minimised as Huang et al.'s
    dynamic loss for top-p routing and reported as a statistic.

    ``weights`` (T,): a weighted mean instead (e.g. 0 for padding tokens; 0 if all weights are 0),
    which needs no boolean indexing and so no host sync."""
    h = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # (T,)
    if weights is None:
        return h.mean()
    return (h * weights).sum() / weights.sum().clamp(min=1e-20)
