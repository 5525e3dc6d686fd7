"""``MoEOutput``, what every MoE layer's forward returns, in a module of its own so that the layer
(``layer.py``) and the routers that combine expert outputs their own way (``routers/soft.py``) can
both build it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from routelab.ffn.base import FFNOutput


@dataclass
class MoEOutput(FFNOutput):
    """``hidden`` (same shape as x), ``aux_loss`` (scalar, already weighted), ``stats``:

    - ``tokens_per_expert`` (E,): pairs each expert computed (after capacity drops);
      for soft MoE the combine weight each expert's slots received, summed over tokens.
    - ``dropped_fraction``: fraction of chosen (token, expert) pairs dropped by capacity.
    - ``unrouted_fraction``: fraction of tokens that no expert processed (dropped, or expert choice).
    - ``router_entropy``: mean entropy (nats) of the router distribution, where there is one.
    - ``max_load``, ``mean_load``: max and mean of tokens_per_expert (max/mean = imbalance).
    - ``unused_experts``: experts that received no token.
    - ``balance_loss``, ``z_loss``: the unweighted losses, where computed.
    """
