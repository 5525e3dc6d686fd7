"""Auxiliary routing losses, as pure functions of the router's outputs.

- Load balancing (Fedus et al. 2021, Switch Transformers, eq. 4-6): ``E * sum_i f_i * P_i``.
- Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): ``mean_t logsumexp(logits_t)^2``.
- Router entropy (Huang et al. 2024, "Harder Tasks Need More Experts", the "dynamic loss"):
  ``mean_t H(p_t)``, pushing top-p routing to be confident so it does not spread over all experts.

The layer multiplies each by its configured weight (alpha, beta, ...) and adds them into
``aux_loss``. Padding tokens never reach these functions: the layer routes real tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_idx: Tensor, selected: Tensor | None = None) -> Tensor:
    """Switch Transformers' auxiliary loss without its weight alpha: ``E * sum_i f_i * P_i``.

    Shapes: T tokens, E experts, K choices per token.

    f_i (eq. 5) is the fraction of the router's (token, choice) assignments that went to expert i
    (for top-k, over all T*K choices, so sum_i f_i = 1), P_i (eq. 6) the mean router probability
    of expert i. f is counted before capacity drops, as in the Switch implementation. With uniform
    routing f_i = P_i = 1/E and the loss is 1, its minimum for balanced assignments.

    Args:
        probs: (T, E) router probabilities (float32).
        expert_idx: (T, K) chosen experts.
        selected: (T, K) bool, which choices count (None = all).
    """
    T, E = probs.shape
    one_hot = torch.zeros(T, E, dtype=probs.dtype, device=probs.device)
    weight = torch.ones_like(expert_idx, dtype=probs.dtype) if selected is None else selected.to(probs.dtype)
    one_hot.scatter_add_(1, expert_idx, weight)  # (T, E) assignments per token and expert
    f = one_hot.sum(0) / weight.sum().clamp_min(1.0)  # (E,) eq. 5, detached by construction
    P = probs.mean(0)  # (E,) eq. 6
    return E * torch.dot(f, P)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. 5 without its weight: ``mean_t (log sum_j exp(logits_tj))^2``; logits (T, E)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def router_entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the routing distributions; probs (T, E). Minimised as Huang et al.'s
    dynamic loss for top-p routing and reported as a statistic."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()
