"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", eq. 3-4): per token,
the fewest experts (most probable first) whose probabilities sum to >= p, at most ``max_k``. Gates
are the raw probabilities, as in the paper (``renormalize: true`` rescales them to sum to 1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class TopPRouterConfig(RouterConfig):
    kind: str = "topp"
    top_p: float = 0.4  # probability mass to cover (Huang et al. 2024 use 0.4)
    max_k: int | None = None  # most experts per token (None = num_experts)
    renormalize: bool = False  # rescale the chosen gates to sum to 1

    def __post_init__(self) -> None:
        check(0.0 < self.top_p <= 1.0, qualified(self, "top_p"), self.top_p, "0 < top_p <= 1")


@ROUTERS.register("topp", TopPRouterConfig)
class TopPRouter(Router):
    def check(self) -> None:
        k, e = self.max_k, self.num_experts
        check(1 <= k <= e, qualified(self.options, "max_k"), k, f"1 <= max_k <= num_experts={e}")

    @property
    def max_k(self) -> int:
        return self.num_experts if self.options.max_k is None else self.options.max_k

    def experts_per_token(self, seq_len: int) -> float:
        return float(self.max_k)  # an upper bound; the run's statistics give the mean

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        p_sorted, idx = probs.topk(self.max_k, dim=-1)  # (T, K) most probable first
        before = p_sorted.cumsum(-1) - p_sorted  # (T, K) mass of the experts ranked above
        active = before < self.options.top_p  # the first is always taken; stop once the mass reaches p
        gates = p_sorted * active
        if self.options.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(idx, gates, active, logits, probs, balance=True)
