"""The base options dataclass of each registered family: attention kinds, FFN kinds, MoE routers.

A YAML section such as ``model.attention: {kind: local, window: 64}`` is built as the dataclass its
``kind`` names in the family's registry; each kind subclasses the base below and adds its fields
(with ranges checked in ``__post_init__``). Imports only the leaves ``errors`` and ``registry``, so
kinds can import it without importing ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from routelab.errors import check_fraction, check_positive
from routelab.registry import ATTENTION, FFN, ROUTERS, Registry


@dataclass
class AttentionConfig:
    """Base of every attention kind's options. Subclasses add fields; ``kind`` picks the entry."""

    _section = "model.attention"
    registry: ClassVar[Registry] = ATTENTION
    renamed: ClassVar[dict[str, str]] = {"topp": "block_topp"}  # old kind -> new name, so saved configs load
    kind: str = "dense"  # registry key: routelab.attention (dense; sparse/learned kinds plug in)
    dropout: float = 0.0  # dropout on attention probabilities (training only)
    combine: Literal["add", "concat"] = "add"  # block output: x + a (residual), or a linear map of [x; a]
    task_conditioned: bool = False  # a learned per-task vector (zero-init) added to the router input (multi-task models; synthesizer)

    def __post_init__(self) -> None:
        check_fraction(self, "dropout")


@dataclass
class FFNConfig:
    """Base of every feed-forward kind's options. Subclasses add fields; ``kind`` picks the entry."""

    _section = "model.ffn"
    registry: ClassVar[Registry] = FFN
    kind: str = "dense"  # registry key: routelab.ffn (dense; moe plugs in)
    hidden: int | None = None  # hidden width; None = 4 * d_model (8/3 * d_model for swiglu)
    activation: Literal["gelu", "relu", "swiglu"] = "gelu"  # swiglu adds a gate matrix (Shazeer 2020)
    bias: bool = True  # a bias on every projection (w_in, w_gate, w_out), as nn.Linear and HF mlp_bias

    def __post_init__(self) -> None:
        if self.hidden is not None:
            check_positive(self, "hidden")


@dataclass
class RouterConfig:
    """Base of every MoE router's options (``model.ffn.router``). ``kind`` picks the router; each
    router's own dataclass adds its fields. A bare name (``router: topk``) means ``{kind: topk}``."""

    _section = "model.ffn.router"
    registry: ClassVar[Registry] = ROUTERS
    kind: str = "switch"  # registry key: routelab.moe.routers


SECTIONS = (AttentionConfig, FFNConfig, RouterConfig)  # the registered families, for config.py
