"""Fully sharded data parallelism (``train.data_parallel: fsdp``): every process keeps 1/N of the dense
parameters, of their gradients and of AdamW's moments, instead of all of them as under DDP.

FSDP2's ``fully_shard`` (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
Parallel"; ZeRO stage 3, Rajbhandari et al. 2020) is applied to each Transformer block, then to the
root model, on a one-dimensional device mesh over all processes. Each parameter becomes a ``DTensor``
sharded along dimension 0; a block's parameters are all-gathered just before its forward (and again
for its backward) and freed after, and its gradients are reduce-scattered (averaged, as DDP averages
them) so each process keeps its shard. Parameters outside the blocks (embeddings, final norm, heads,
the tied LM head) form the root's group, so a weight tied between the embedding and the head is one
parameter, sharded once. The optimizer is built after sharding and steps on the shards.

Precision stays with autocast (``routelab.precision``), as in every other mode: one code path for one
process, DDP and FSDP. FSDP2's ``MixedPrecisionPolicy`` (parameters all-gathered in bf16) could
replace it later and halve the all-gather traffic.

Checkpoints keep the one-process format: the full model state dict and the optimizer's tensors as
``state.{idx}.{name}`` (``routelab.train.checkpoint``), gathered from the shards with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict``, CPU offload: rank 0 gets the full
tensors, the others nothing), so a checkpoint resumes under DDP, in one process or at another world
size, and back. Loading gives every rank the full tensors and each keeps its shard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from routelab.config import ModelConfig
from routelab.device import device_of
from routelab.io import load_state_dict
from routelab.model import Block, RoutedTransformer
from routelab.train.checkpoint import MODEL_FILE, load_optimizer_state, verify_checkpoint

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on the CPU, on rank 0 only


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``fully_shard`` (``shard_model``)."""
    return isinstance(model, FSDPModule)


def shard_model(model: RoutedTransformer, device: torch.device, world_size: int) -> None:
    """``fully_shard`` each ``Block`` of ``model``, then the model itself (the rest: embeddings,
    final norm, heads), over all ``world_size`` processes. In place; before the optimizer is built."""
    if device.type == "cpu" and "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        logging.getLogger("routelab.train").warning(
            "fsdp on CPU with glibc's mmap off (GLIBC_TUNABLES, routelab's default): the per-block all-gather"
            " buffers stay in the heap and each process peaks above ddp's; for fsdp's memory saving start the"
            " run with MALLOC_MMAP_THRESHOLD_=65536 (routelab then leaves the allocator alone)"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.modules():
        if isinstance(block, Block):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_numel(model: nn.Module) -> int:
    """Elements of the parameters this process stores (its shards; tied parameters once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm computed over shards (a ``DTensor``) as a plain tensor, the same on every rank."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU tensors), {} on the others (every rank calls it)."""
    return get_model_state_dict(model, options=FULL)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``optimizer``'s parameters, in the order that numbers them in its state dict."""
    names = {}
    for name, p in model.named_parameters():  # tied parameters: the first name, as the optimizer state dict keeps
        names.setdefault(id(p), name)
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's tensors gathered whole as ``state.{idx}.{name}`` (``optimizer_to_flat``'s keys,
    numbered as a one-process optimizer numbers them) on rank 0, {} on the others (every rank calls it)."""
    full = get_optimizer_state_dict(model, optimizer, options=FULL)
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {f"state.{index[fqn]}.{k}": v for fqn, s in full.get("state", {}).items() for k, v in s.items()
            if isinstance(v, torch.Tensor)}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the full state dict ``state`` (every rank passes it whole); each rank keeps its shards."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_loader(model: nn.Module, optimizer: torch.optim.Optimizer):
    """A loader for a one-process optimizer state dict (parameters numbered, as ``optimizer_from_flat``
    returns it): each rank keeps its shards of the moments."""

    def load(state_dict: dict[str, Any]) -> None:
        names = _param_names(model, optimizer)
        groups, i = [], 0
        for saved, live in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
            groups.append({**saved, "params": names[i : i + len(live["params"])]})
            i += len(live["params"])
        state = {names[idx]: s for idx, s in state_dict["state"].items()}
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    return load


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``load_checkpoint`` for a sharded ``model``: the checkpoint verified (checksums, and its weights'
    shapes against the model's whole ones), then the weights, optimizer and RNG states loaded, each rank
    keeping its shards. Returns the checkpoint's ``state.json``."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # a DTensor's shape is the whole one
    state = verify_checkpoint(path, shapes)
    load_model_state(model, load_state_dict(path / MODEL_FILE))
    load_optimizer_state(path, optimizer, state, device=device_of(model), apply=optimizer_loader(model, optimizer))
    return state


def full_model(model: nn.Module, cfg: ModelConfig) -> RoutedTransformer | None:
    """A one-process copy of the sharded ``model`` on rank 0 (for the final export), None on the
    others (every rank calls it)."""
    state = full_model_state(model)
    if not state:
        return None
    full = RoutedTransformer(cfg)
    full.load_state_dict(state)
    return full.eval()
