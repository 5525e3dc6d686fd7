"""Soft MoE (Puigcerver et al. 2023, eq. 1-2): ``slots_per_expert`` slots per expert, each a
softmax-over-tokens mix of the sequence (dispatch), each output token a softmax-over-slots mix of
the slot outputs (combine). ``weight`` is (E * S, D), the slot parameters Phi. Every slot sees the
whole sequence, so it is encoder only (refused in a causal model). Its combine rule is its own, so
it runs the MoE layer's forward itself (``forward_layer``): slots in, every expert on its slots,
slots out, with no capacity, no dropped token and no auxiliary loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import routelab.moe.losses as losses
from routelab.errors import check, qualified
from routelab.moe.output import MoEOutput
from routelab.moe.routers.router import MoELayerParts, Router, SoftRouting
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

    def forward_layer(
        self, layer: MoELayerParts, x: Tensor, padding_mask: Tensor | None, task_ids: Tensor | None
    ) -> MoEOutput:
        """Soft MoE (Puigcerver et al. 2023): x (B, T, D) or (T, D); every expert on its slots.

        Shapes: B sequences, T tokens, S slots per expert, E*S slots in all.
        """
        shape = x.shape
        xb = x.reshape(-1, shape[-2], shape[-1]) if x.dim() >= 2 else x.view(1, 1, -1)  # (B, T, D)
        pad = padding_mask.reshape(xb.shape[:2]) if padding_mask is not None else None
        tb = task_ids.reshape(xb.shape[:2]) if task_ids is not None else None
        r: SoftRouting = self(layer.router_input(xb, tb), padding_mask=pad)  # slots still mix x itself
        B, T, _ = xb.shape
        E, S = layer.num_experts, self.slots_per_expert
        slots = torch.einsum("bts,btd->bsd", r.dispatch.to(x.dtype), xb)  # (B, E*S, D) eq. 1
        slots = slots.view(B, E, S, -1).transpose(0, 1).reshape(E, B * S, -1)  # (E, B*S, D)
        if layer.impl == "reference":  # every expert on every slot, then each expert's own slots: E times the work
            every = layer.experts.forward_all(slots.reshape(E * B * S, -1))  # (E, E*B*S, D)
            out = torch.stack([every[e, e * B * S : (e + 1) * B * S] for e in range(E)])  # (E, B*S, D)
        else:
            out = layer.experts.forward_all(slots)  # (E, B*S, D): one bmm per matrix, each expert on its slots
        out = out.view(E, B, S, -1).transpose(0, 1).reshape(B, E * S, -1)  # (B, E*S, D)
        y = torch.einsum("bts,bsd->btd", r.combine.to(x.dtype), out)  # (B, T, D) eq. 2
        if layer.shared is not None:
            y = y + layer.shared(xb)
        if pad is not None:
            y = y.masked_fill(pad.unsqueeze(-1), 0.0)
        stats = soft_stats(r.combine, pad, E, S)
        return MoEOutput(y.reshape(shape), torch.zeros((), device=x.device), stats)

    def gate_matrix(self, layer: MoELayerParts, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (..., T, D) -> (..., T, E): each expert's combine weight, summed over its slots."""
        E = layer.num_experts
        xb = x.reshape(-1, x.shape[-2], x.shape[-1])  # (B, T, D)
        tb = task_ids.reshape(xb.shape[:2]) if task_ids is not None else None
        combine = self(layer.router_input(xb, tb)).combine  # (B, T, E*S)
        return combine.view(*xb.shape[:2], E, -1).sum(-1).reshape(*x.shape[:-1], E)


@torch.no_grad()
def soft_stats(combine: Tensor, pad: Tensor | None, E: int, S: int) -> dict:
    """``MoEOutput.stats`` of soft MoE from combine (B, T, E*S) and padding (B, T) True = padding:
    an expert's load is the combine mass its slots receive; nothing is dropped or unrouted."""
    B, T = combine.shape[:2]
    dev = combine.device
    real = combine if pad is None else combine * (~pad).unsqueeze(-1)
    per_expert = real.view(B, T, E, S).sum((0, 1, 3)).float()  # (E,) combine mass per expert
    probs = combine.reshape(-1, E * S)  # (B*T, E*S)
    weights = None if pad is None else (~pad).reshape(-1).to(probs.dtype)  # (B*T,) weights, not an index: no sync
    return {
        "tokens_per_expert": per_expert,
        "dropped_fraction": torch.zeros((), device=dev),
        "unrouted_fraction": torch.zeros((), device=dev),
        "router_entropy": losses.router_entropy(probs, weights) if probs.shape[0] else torch.zeros((), device=dev),
        "max_load": per_expert.max(),
        "mean_load": per_expert.mean(),
        "unused_experts": (per_expert == 0).sum(),
    }
