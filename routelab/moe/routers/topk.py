"""Top-k of softmax (Shazeer et al. 2017, eq. 3-4; Mixtral, Jiang et al. 2024): each token goes to
its k most probable experts, gates renormalised over them (``renormalize: false`` keeps the raw
probabilities, as Shazeer et al. do)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class TopKRouterConfig(RouterConfig):
    kind: str = "topk"
    top_k: int = 2  # experts per token
    renormalize: bool = True  # rescale the k chosen probabilities to sum to 1 (Mixtral)


@ROUTERS.register("topk", TopKRouterConfig)
class TopKRouter(Router):
    supports_selection_bias = True

    def check(self) -> None:
        k, e = self.options.top_k, self.num_experts
        check(1 <= k <= e, qualified(self.options, "top_k"), k, f"1 <= top_k <= num_experts={e}")

    def experts_per_token(self, seq_len: int) -> float:
        return float(self.options.top_k)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = self.selection_scores(logits, selection_bias).topk(self.options.top_k, dim=-1).indices  # (T, K)
        gates = probs.gather(1, idx)  # (T, K)
        if self.options.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(idx, gates, None, logits, probs, balance=True)
