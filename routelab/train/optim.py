"""AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on matrices only.

Decay applies to parameters with ``dim >= 2`` that are not embeddings (token or position tables)
or norm weights; biases, norms and embeddings are not decayed. Frozen parameters
(``requires_grad=False``, e.g. ``model.freeze_embeddings``) are left out of the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.config import TrainConfig
from routelab.train.schedule import lr_at

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, ``[decayed, not decayed]``, in ``named_parameters`` order (tied weights once)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, *NORM_TYPES)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in no_decay_ids:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, betas from the config, the lr of the first update."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(1, cfg),
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )
