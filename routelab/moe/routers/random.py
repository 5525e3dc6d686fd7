"""THOR (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts"): in
training each token goes to one uniformly random expert (gate 1); in eval the output is the mean of
all experts (``eval_mode: mean``) or one seeded random expert per token (``eval_mode: seeded``, the
same choices for every call with the same number of tokens). THOR's consistency regulariser
between two sampled experts is not included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class RandomRouterConfig(RouterConfig):
    kind: str = "random"
    eval_mode: Literal["mean", "seeded"] = "mean"  # in eval: mean of all experts, or a seeded random one
    seed: int = 0  # seeds the eval choices of eval_mode: seeded


@ROUTERS.register("random", RandomRouterConfig)
class RandomRouter(Router):
    learned = False

    def experts_per_token(self, seq_len: int) -> float:
        return 1.0  # in training (eval_mode: mean runs every expert in eval)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if self.training:
            idx = torch.randint(E, (T, 1), device=x.device)
        elif self.options.eval_mode == "seeded":
            g = torch.Generator(device=x.device).manual_seed(self.options.seed)
            idx = torch.randint(E, (T, 1), device=x.device, generator=g)
        else:  # mean of all experts
            idx = torch.arange(E, device=x.device).expand(T, E)
            return Routing(idx, torch.full((T, E), 1.0 / E, device=x.device))
        return Routing(idx, torch.ones(T, 1, device=x.device))
