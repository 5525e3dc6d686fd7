"""Switch Transformers (Fedus et al. 2021, eq. 1-2): each token goes to the top-1 expert of
softmax(x W^T), its output scaled by that expert's probability p_i(x)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class SwitchRouterConfig(RouterConfig):
    """Switch has no options of its own: top-1 by definition."""

    kind: str = "switch"


@ROUTERS.register("switch", SwitchRouterConfig)
class SwitchRouter(Router):
    supports_selection_bias = True

    def experts_per_token(self, seq_len: int) -> float:
        return 1.0

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = self.selection_scores(logits, selection_bias).argmax(-1, keepdim=True)  # (T, 1)
        return Routing(idx, probs.gather(1, idx), None, logits, probs, balance=True)
