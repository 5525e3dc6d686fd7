"""Expert choice (Zhou et al. 2022, eq. 1): S = softmax(x W^T) over experts, then each expert takes
its top-C tokens by score, C = ceil(capacity_factor * T / E); a token gets 0..E experts and its
gates are its scores. It ranks all tokens of the batch, so a token's route depends on later
tokens: refused in a causal model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    kind: str = "expert_choice"
    capacity_factor: float = 1.0  # c in C = ceil(c * T / E): tokens each expert takes (the paper's k = 1: c = 1)

    def __post_init__(self) -> None:
        check(self.capacity_factor > 0, qualified(self, "capacity_factor"), self.capacity_factor, "a number > 0")


@ROUTERS.register("expert_choice", ExpertChoiceRouterConfig)
class ExpertChoiceRouter(Router):
    whole_batch = True
    own_capacity = True

    def experts_per_token(self, seq_len: int) -> float:
        return float(self.options.capacity_factor)  # E * C / T experts per token on average

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        C = min(T, math.ceil(self.options.capacity_factor * T / E))
        top = probs.t().topk(C, dim=1).indices  # (E, C) tokens each expert takes
        active = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        active[top, torch.arange(E, device=x.device)[:, None]] = True  # (T, E)
        idx = torch.arange(E, device=x.device).expand(T, E)
        return Routing(idx, probs * active, active, logits, probs, balance=False)
