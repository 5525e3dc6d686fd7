"""GShard (Lepikhin et al. 2020, Algorithm 1): top-2 with gates g1, g2 renormalised to sum to 1; in
training the second expert is used only with probability min(1, 2 * g2) (random routing); in eval
both are used."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.errors import check
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class GShardRouterConfig(RouterConfig):
    """GShard has no options of its own: top-2 by definition."""

    kind: str = "gshard"


@ROUTERS.register("gshard", GShardRouterConfig)
class GShardRouter(Router):
    supports_selection_bias = True

    def check(self) -> None:
        check(self.num_experts >= 2, "num_experts", self.num_experts, ">= 2 for the gshard router (top-2)")

    def experts_per_token(self, seq_len: int) -> float:
        return 2.0  # an upper bound: in training the second expert is sometimes skipped

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = self.selection_scores(logits, selection_bias).topk(2, dim=-1).indices  # (T, 2)
        p = probs.gather(1, idx)
        gates = p / p.sum(-1, keepdim=True)  # (T, 2): g1 + g2 = 1
        active = None
        if self.training:
            second = torch.rand(x.shape[0], device=x.device) < 2 * gates[:, 1].detach()  # (T,)
            active = torch.stack([torch.ones_like(second), second], dim=1)  # (T, 2)
        return Routing(idx, gates, active, logits, probs, balance=True)
