"""The feed-forward contract: every FFN kind returns an ``FFNOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from routelab.errors import ConfigError
from routelab.registry import FFN


@dataclass
class FFNOutput:
    """What a feed-forward layer returns.

    Attributes:
        hidden: same shape as the input, (..., D).
        aux_loss: scalar tensor already weighted (MoE balancing losses), or None.
        stats: routing statistics (tokens per expert, drop fraction, ...); empty for dense.
    """

    hidden: Tensor
    aux_loss: Tensor | None = None
    stats: dict = field(default_factory=dict)


def build_ffn(cfg, layer_idx: int = 0, expert_slice: tuple[int, int] | None = None) -> nn.Module:
    """Build the FFN module that ``cfg.ffn.kind`` names from the whole ``ModelConfig``.

    A kind whose config has ``is_moe_layer(layer_idx)`` (MoE with ``moe_every``) gets a dense FFN
    of the same width on the layers where it returns False. ``expert_slice`` (index, size): an MoE
    layer holds only that slice of its experts (expert parallelism); a dense layer ignores it.
    """
    kind = cfg.ffn.kind
    is_moe_layer = getattr(cfg.ffn, "is_moe_layer", None)
    if expert_slice is not None and is_moe_layer is None:
        raise ConfigError(f"expert_slice={expert_slice!r} is invalid for model.ffn.kind={kind!r}; allowed: None (only MoE layers hold experts)")
    if is_moe_layer is not None and not is_moe_layer(layer_idx):
        kind = "dense"
    sliced = {"expert_slice": expert_slice} if expert_slice is not None and kind != "dense" else {}
    return FFN.get(kind).module_class(cfg, layer_idx=layer_idx, **sliced)
