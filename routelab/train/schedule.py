"""Learning-rate schedule: linear warmup from 0, then cosine decay (Loshchilov & Hutter 2017).

``lr_at`` is a pure function of the step, so a resumed run needs no scheduler state:

    lr(s) = lr * s / W                                             for s < W (warmup)
    lr(s) = lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W)   for W <= s <= S
    lr(s) = lr_min                                                 for s > S

with W = ``warmup_steps``, S = ``steps`` and lr_min = ``lr * min_lr_ratio``. Optimizer update number
``s`` (1-based) uses ``lr_at(s)``, so ``lr_at(0) = 0`` is the start, ``lr_at(W)`` the peak and the
last update (``s = S``) runs at ``lr_min``.
"""

from __future__ import annotations

import math

from routelab.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer update ``step`` (1-based; see the module docstring)."""
    lr_min = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    if decay_steps <= 0:  # warmup spans the whole run: hold the peak after it
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
