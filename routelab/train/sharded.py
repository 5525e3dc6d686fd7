"""The trainer's side of expert parallelism: a model whose MoE layers keep only this rank's experts
(``routelab.moe.parallel``), and the full model and optimizer state gathered back from all ranks,
so checkpoints and the exported model are the same whatever the number of processes.

Optimizer state follows its parameter: an expert parameter's moments (AdamW's ``exp_avg`` and
``exp_avg_sq``, shaped like it) are sliced on load and gathered on save along dimension 0.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.config import ModelConfig
from routelab.model import RoutedTransformer
from routelab.moe.parallel import ExpertGradients, ExpertGroups, apply_expert_parallel, gather_experts, slice_experts
from routelab.train.checkpoint import optimizer_to_flat


class ShardedExperts:
    """Applies expert parallelism to ``model`` (a transform of the built model) and keeps what the
    trainer needs: the sliced parameters' names, their gradient steps, and the way back to full state."""

    def __init__(self, model: nn.Module, groups: ExpertGroups) -> None:
        self.model, self.groups = model, groups
        self.names = apply_expert_parallel(model, groups)
        self.gradients = ExpertGradients(model, self.names, groups)

    def _expert_indices(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """Positions (as in ``optimizer.state_dict()``) of the expert parameters."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return {i for i, p in enumerate(params) if id(p) in self.gradients.expert_ids}

    def slicer(self, optimizer: torch.optim.Optimizer):
        """``tensor_map`` for ``load_optimizer_state``: this rank's rows of the experts' moments."""
        experts = self._expert_indices(optimizer)

        def keep_slice(key: str, t: torch.Tensor) -> torch.Tensor:
            idx = int(key.split(".")[1])
            return slice_experts(t, self.groups) if idx in experts and t.dim() > 0 else t

        return keep_slice

    def full_states(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The whole model's state dict and the optimizer's tensors, experts gathered (every rank calls it)."""
        state = self.model.state_dict()
        for n in self.names:
            state[n] = gather_experts(state[n], self.groups)
        tensors, _ = optimizer_to_flat(optimizer)
        experts = self._expert_indices(optimizer)
        for key, t in tensors.items():
            if int(key.split(".")[1]) in experts and t.dim() > 0:
                tensors[key] = gather_experts(t, self.groups)
        return state, tensors

    def full_model(self, cfg: ModelConfig) -> RoutedTransformer:
        """A one-process model holding every expert (every rank calls it; rank 0 exports it)."""
        state = self.model.state_dict()
        for n in self.names:
            state[n] = gather_experts(state[n], self.groups)
        full = RoutedTransformer(cfg)
        full.load_state_dict(state)
        return full.eval()

    def num_parameters(self, cfg: ModelConfig) -> int:
        with torch.device("meta"):
            return RoutedTransformer(cfg).num_parameters()
