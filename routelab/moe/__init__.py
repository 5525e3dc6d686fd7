"""Token -> expert routing: the MoE layer, its routers, dispatch, losses, and ``ffn.kind: moe``."""

from routelab.moe import losses
from routelab.moe.experts import Experts
from routelab.moe.ffn import MoEFFN, MoEFFNConfig
from routelab.moe.layer import MoE, MoEOutput
from routelab.moe.routers import ROUTERS, Router, Routing, SoftRouting, build_router

__all__ = [
    "ROUTERS",
    "Experts",
    "MoE",
    "MoEFFN",
    "MoEFFNConfig",
    "MoEOutput",
    "Router",
    "Routing",
    "SoftRouting",
    "build_router",
    "losses",
]
