"""Where a model computes, and moving a batch there: a leaf (imports nothing of routelab), so every
layer that needs "the device of a model" uses this one helper.

On CUDA a batch is first copied into page-locked (pinned) host memory, from which the copy to the GPU
can run asynchronously (``non_blocking=True``): the host goes on preparing the next batch while the
copy runs, and kernels queued after it on the same stream still see the finished copy. Elsewhere it
is a plain ``.to(device)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["device_of", "to_device"]


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (its first parameter's device): inputs built on the host go there."""
    return next(model.parameters()).device


def to_device(batch: dict[str, Tensor], device: str | torch.device) -> dict[str, Tensor]:
    """A new dict of ``batch``'s tensors on ``device`` (values that are not tensors are kept as they are).

    CUDA: CPU tensors are pinned, then copied with ``non_blocking=True``; tensors already on a
    GPU are moved with ``.to`` (which is free when they are there already)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            if v.device.type == "cpu":
                v = v.pin_memory() if not v.is_pinned() else v
                v = v.to(device, non_blocking=True)
            else:
                v = v.to(device)
        out[k] = v
    return out
