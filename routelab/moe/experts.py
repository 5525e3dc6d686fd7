"""Stacked expert FFNs: E position-wise FFNs (Vaswani et al. 2017, eq. 2) held as tensors with a
leading expert dimension, so expert parallelism can shard dim 0 and the math never indexes one
expert's weights under autograd. SwiGLU experts follow Shazeer 2020, eq. 6.

E_i(x) = act(x W_in[i] + b_in[i]) W_out[i] + b_out[i],   or for swiglu
E_i(x) = (silu(x W_gate[i] + b_gate[i]) * (x W_in[i] + b_in[i])) W_out[i] + b_out[i]:

expert i computes exactly ``routelab.ffn.FeedForward`` with its slices of the stacked weights.

Shape legend: T tokens, E experts, D model dim, H hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routelab.errors import check
from routelab.ffn.dense import ACTIVATIONS, activate
from routelab.moe.sliced_init import normal_rows

EXPERT_PARAMS = ("w_in", "b_in", "w_gate", "b_gate", "w_out", "b_out")  # stacked (E, ...) tensors of ``Experts`` (None if absent)


class Experts(nn.Module):
    """E expert FFNs as stacked parameters ``w_in`` (E, D, H), ``b_in`` (E, H), ``w_gate`` (E, D, H)
    and ``b_gate`` (E, H) (swiglu only), ``w_out`` (E, H, D), ``b_out`` (E, D).

    ``expert_slice=(index, size)``: hold only slice ``index`` of ``size`` equal slices of the experts
    (experts index*L .. index*L + L - 1, L = E / size; expert parallelism), so the tensors are (L, ...)
    and ``num_experts`` is L; initialised as those rows of the whole tensors (``sliced_init``)."""

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True,
        expert_slice: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        check(activation in ACTIVATIONS, "activation", activation, ", ".join(ACTIVATIONS))
        if expert_slice is not None:
            index, size = expert_slice
            check(size >= 1 and num_experts % size == 0, "expert_slice", expert_slice, f"(index, size) with size dividing num_experts={num_experts}")
            check(0 <= index < size, "expert_slice", expert_slice, "(index, size) with 0 <= index < size")
        self.total_experts, self.expert_slice = num_experts, expert_slice
        E, D, H = num_experts // (expert_slice[1] if expert_slice else 1), d_model, hidden
        self.num_experts, self.d_model, self.hidden, self.activation = E, D, H, activation
        self.w_in = nn.Parameter(torch.empty(E, D, H))
        self.w_gate = nn.Parameter(torch.empty(E, D, H)) if activation == "swiglu" else None
        self.w_out = nn.Parameter(torch.empty(E, H, D))
        self.b_in = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, H)) if bias and activation == "swiglu" else None
        self.b_out = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, std) weights, zero biases; std None = nn.Linear's fan-in scale per matrix."""
        for w, fan_in in ((self.w_in, self.d_model), (self.w_gate, self.d_model), (self.w_out, self.hidden)):
            if w is not None:
                self.normal_(w, std if std is not None else 1.0 / math.sqrt(fan_in))
        for b in (self.b_in, self.b_gate, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    @torch.no_grad()
    def normal_(self, w: Tensor, std: float) -> None:
        """N(0, std) into stacked tensor ``w``: ``nn.init.normal_``, or for a slice its rows of the
        whole tensor's draw (the random stream is consumed as for all the experts)."""
        if self.expert_slice is None or w.is_meta:
            nn.init.normal_(w, std=std)
            return
        lo = self.expert_slice[0] * self.num_experts
        w.copy_(normal_rows(self.total_experts, tuple(w.shape[1:]), lo, lo + self.num_experts, std, dtype=w.dtype))

    def extra_repr(self) -> str:
        part = f" (slice {self.expert_slice[0]} of {self.expert_slice[1]})" if self.expert_slice else ""
        return (
            f"num_experts={self.num_experts}{part}, d_model={self.d_model}, hidden={self.hidden}, "
            f"activation={self.activation}, bias={self.b_in is not None}"
        )

    @property
    def first_expert(self) -> int:
        """The global index of this module's expert 0 (0 unless sliced)."""
        return self.expert_slice[0] * self.num_experts if self.expert_slice else 0

    # -- the slow, obviously correct path and the batched path --------------------------------
    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every row: x (E, N, D) or (N, D) -> (E, N, D). One bmm per matrix."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.num_experts, -1, -1)  # (E, N, D)
        h = torch.bmm(x, self.w_in)  # (E, N, H)
        if self.b_in is not None:
            h = h + self.b_in.unsqueeze(1)
        gate = None
        if self.activation == "swiglu":
            gate = torch.bmm(x, self.w_gate)  # (E, N, H)
            if self.b_gate is not None:
                gate = gate + self.b_gate.unsqueeze(1)
        y = torch.bmm(activate(h, gate, self.activation), self.w_out)  # (E, N, D)
        if self.b_out is not None:
            y = y + self.b_out.unsqueeze(1)
        return y


def reference_combine(experts: Experts, x: Tensor, expert_idx: Tensor, gates: Tensor, active: Tensor | None) -> Tensor:
    """Reference MoE output: all experts on all tokens, masked by the routing. Slow (E times the
    active FLOPs) and obviously correct; the fast paths are tested against it.

    y_t = sum_k gates[t, k] * active[t, k] * E_{expert_idx[t, k]}(x_t).

    Shapes: x (T, D), expert_idx / gates / active (T, K) -> (T, D).
    """
    T, E = x.shape[0], experts.num_experts
    w = gates if active is None else gates * active
    combine = torch.zeros(T, E, dtype=w.dtype, device=x.device).scatter_add(1, expert_idx, w)  # (T, E)
    out = experts.forward_all(x)  # (E, T, D)
    return torch.einsum("te,etd->td", combine.to(out.dtype), out)
