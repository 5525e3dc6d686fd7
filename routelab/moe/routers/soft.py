"""Soft MoE (Puigcerver et al. 2023, eq. 1-2): ``slots_per_expert`` slots per expert, each a
softmax-over-tokens mix of the sequence (dispatch), each output token a softmax-over-slots mix of
the slot outputs (combine). ``weight`` is (E * S, D), the slot parameters Phi. Every slot sees the
whole sequence, so it is encoder only (refused in a causal model)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, SoftRouting
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class SoftRouterConfig(RouterConfig):
    kind: str = "soft"
    slots_per_expert: int = 1  # S: slots per expert

    def __post_init__(self) -> None:
        check(self.slots_per_expert >= 1, qualified(self, "slots_per_expert"), self.slots_per_expert, "an integer >= 1")


@ROUTERS.register("soft", SoftRouterConfig)
class SoftRouter(Router):
    whole_batch = True
    soft = True

    @property
    def slots_per_expert(self) -> int:
        return self.options.slots_per_expert

    def num_weight_rows(self) -> int:
        return self.num_experts * self.slots_per_expert

    def experts_per_token(self, seq_len: int) -> float:
        return self.num_experts * self.slots_per_expert / seq_len  # E*S slot computations shared by T tokens

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> SoftRouting:
        """x (B, T, D), padding_mask (B, T) True = padding -> SoftRouting."""
        logits = x.float() @ self.weight.float().t()  # (B, T, E*S)
        to_slots = logits
        if padding_mask is not None:
            to_slots = logits.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        dispatch = to_slots.softmax(dim=1).nan_to_num(0.0)  # (B, T, E*S) over tokens (an all-padding row -> 0)
        combine = logits.softmax(dim=-1)  # (B, T, E*S) over slots
        return SoftRouting(dispatch, combine, logits)
