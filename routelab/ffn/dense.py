"""Position-wise feed-forward network (Vaswani et al. 2017, eq. 2) and its SwiGLU variant
(Shazeer 2020, "GLU Variants Improve Transformer", eq. 6: (Swish(x W) * x V) W2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from routelab.ffn.base import FFNOutput
from routelab.options import FFNConfig
from routelab.registry import FFN


@dataclass
class DenseFFNConfig(FFNConfig):
    """Dense FFN options are the base ones: hidden, activation, bias."""


@FFN.register("dense", DenseFFNConfig)
class DenseFFN(nn.Module):
    """y = w_out(act(w_in x)), or w_out(silu(w_gate x) * w_in x) for swiglu."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__()
        d, h, bias = cfg.d_model, cfg.ffn_hidden, cfg.ffn.bias
        self.activation = cfg.ffn.activation
        self.w_in = nn.Linear(d, h, bias=bias)
        self.w_gate = nn.Linear(d, h, bias=bias) if self.activation == "swiglu" else None
        self.w_out = nn.Linear(h, d, bias=bias)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None) -> FFNOutput:
        """x: (..., D) -> FFNOutput(hidden (..., D)); token_ids and padding_mask are unused here."""
        h = self.w_in(x)  # (..., H)
        if self.activation == "swiglu":
            h = F.silu(self.w_gate(x)) * h
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return FFNOutput(self.w_out(h))
