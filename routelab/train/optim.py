"""AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on matrices only.

With ``train.router_lr_scale`` != 1 the MoE routers' weights get a third group whose ``lr_scale``
multiplies the scheduled learning rate (the trainer sets ``lr = lr_at(step) * lr_scale`` per group):
the router's step size is the one knob Adam leaves, since it normalises the gradient's scale.

Decay applies to parameters with ``dim >= 2`` that are not embeddings (token or position tables)
or norm weights; biases, norms and embeddings are not decayed. Frozen parameters
(``requires_grad=False``, e.g. ``model.freeze_embeddings``) are left out of the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.config import TrainConfig
from routelab.moe.routers.router import Router
from routelab.train.schedule import lr_at

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)


def param_groups(model: nn.Module, weight_decay: float, router_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups ``[decayed, not decayed]`` in ``named_parameters`` order (tied weights once),
    and, when ``router_lr_scale`` != 1, ``[..., routers]``: every MoE router's (decayed) weight,
    with ``lr_scale`` set."""
    no_decay_ids, router_ids = set(), set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, *NORM_TYPES)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        if router_lr_scale != 1.0 and isinstance(module, Router):
            router_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, routers = [], [], []
    for _, p in model.named_parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        if id(p) in router_ids:
            routers.append(p)
        elif p.dim() >= 2 and id(p) not in no_decay_ids:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if routers:
        groups.append({"params": routers, "weight_decay": weight_decay, "lr_scale": router_lr_scale})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, betas from the config, the lr of the first update."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.router_lr_scale),
        lr=lr_at(1, cfg),
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )
