"""Token -> expert routers, one file per router (its options dataclass and its class, registered in
``ROUTERS`` under its name). Every module of this package is imported here, so a new router is one
new file: nothing else names it.

    switch  Fedus et al. 2021          gshard  Lepikhin et al. 2020       topk  Shazeer et al. 2017
    topp    Huang et al. 2024          hash    Roller et al. 2021         random  Zuo et al. 2022 (THOR)
    expert_choice  Zhou et al. 2022    base    Lewis et al. 2021 (BASE)   soft  Puigcerver et al. 2023
    task    Kudugunta et al. 2021 (task-level MoE)
"""

import importlib
import pkgutil

from routelab.moe.routers.router import Router, Routing, SoftRouting, build_router, router_options
from routelab.registry import ROUTERS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ROUTERS", "Router", "Routing", "SoftRouting", "build_router", "router_options"]
