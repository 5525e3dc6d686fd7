"""Position-wise feed-forward network (Vaswani et al. 2017, eq. 2) and its GLU variants (Shazeer
2020, "GLU Variants Improve Transformer", eq. 6: (Swish(x W) * x V) W2):

    FFN(x) = act(x W_in + b_in) W_out + b_out
    FFN_SwiGLU(x) = (silu(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out

The one implementation of this math: the dense FFN kind, MoE's shared experts (``FeedForward``)
and the stacked experts' reference path (``activate``) use it. ``bias`` puts a bias on every
projection, as ``nn.Linear`` (and Hugging Face's ``mlp_bias``) do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from routelab.ffn.base import FFNOutput
from routelab.options import FFNConfig
from routelab.registry import FFN

ACTIVATIONS = ("relu", "gelu", "swiglu")


def activate(h: Tensor, gate: Tensor | None, activation: str) -> Tensor:
    """The hidden activation: ``silu(gate) * h`` for swiglu, else gelu(h) or relu(h). Shapes alike."""
    if activation == "swiglu":
        return F.silu(gate) * h
    return F.gelu(h) if activation == "gelu" else F.relu(h)


class FeedForward(nn.Module):
    """``w_in``, ``w_gate`` (swiglu only) and ``w_out`` as ``nn.Linear``: x (..., D) -> (..., D)."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, hidden, bias=bias)
        self.w_gate = nn.Linear(d_model, hidden, bias=bias) if activation == "swiglu" else None
        self.w_out = nn.Linear(hidden, d_model, bias=bias)

    def ffn(self, x: Tensor) -> Tensor:
        gate = self.w_gate(x) if self.w_gate is not None else None  # (..., H)
        return self.w_out(activate(self.w_in(x), gate, self.activation))

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(x)


@dataclass
class DenseFFNConfig(FFNConfig):
    """Dense FFN options are the base ones: hidden, activation, bias."""


@FFN.register("dense", DenseFFNConfig)
class DenseFFN(FeedForward):
    """The dense feed-forward block of a ``ModelConfig``."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__(cfg.d_model, cfg.ffn_hidden, cfg.ffn.activation, cfg.ffn.bias)

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None, task_ids: Tensor | None = None
    ) -> FFNOutput:
        """x: (..., D) -> FFNOutput(hidden (..., D)); token_ids, padding_mask and task_ids are unused here."""
        return FFNOutput(self.ffn(x))
