"""The trainer's side of expert parallelism: a model whose MoE layers keep only this rank's experts
(``routelab.moe.parallel``; the trainer builds it so, ``RoutedTransformer(cfg, expert_slice=...)``),
and the full model and optimizer state gathered back from all ranks, so checkpoints and the
exported model are the same whatever the number of processes.

Optimizer state follows its parameter: an expert parameter's moments (AdamW's ``exp_avg`` and
``exp_avg_sq``, shaped like it) are read as this rank's rows on load (``moment_rows``, as the
weights: ``rows``) and gathered on save along dimension 0.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.config import ModelConfig
from routelab.model import RoutedTransformer
from routelab.moe.parallel import ExpertGradients, ExpertGroups, apply_expert_parallel, gather_experts
from routelab.train.checkpoint import optimizer_to_flat


class ShardedExperts:
    """Applies expert parallelism to ``model`` (a transform of the built model) and keeps what the
    trainer needs: the sliced parameters' names, their gradient steps, and the way back to full state."""

    def __init__(self, model: nn.Module, groups: ExpertGroups) -> None:
        self.model, self.groups = model, groups
        self.names = apply_expert_parallel(model, groups)
        self.gradients = ExpertGradients(model, self.names, groups)

    def communication(self) -> dict[str, dict[str, float]]:
        """Per MoE layer (by module name), what it sent and how long it took since the last call
        (``routelab.moe.comm.CommCounters.take``); starts the next count."""
        return {n: m.expert_parallel.counters.take() for n, m in self.model.named_modules() if getattr(m, "expert_parallel", None)}

    def _expert_moment(self, optimizer: torch.optim.Optimizer):
        """Whether a ``state.{idx}.{name}`` optimizer tensor belongs to an expert parameter and is
        shaped like it (AdamW's moments; not its 0-d step count)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        experts = {i for i, p in enumerate(params) if id(p) in self.gradients.expert_ids}
        return lambda key, t: int(key.split(".")[1]) in experts and t.dim() > 0

    def rows(self) -> dict[str, tuple[int, int, int]]:
        """``rows`` for ``load_checkpoint``: each expert parameter's (lo, hi, total) rows of its full tensor."""
        out = {}
        for n in self.names:
            experts = self.model.get_submodule(n.rpartition(".")[0])
            lo = experts.first_expert
            out[n] = (lo, lo + experts.num_experts, experts.total_experts)
        return out

    def moment_rows(self, optimizer: torch.optim.Optimizer):
        """``rows`` for ``load_optimizer_state``: this rank's rows of the experts' stored moments."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        experts = {i for i, p in enumerate(params) if id(p) in self.gradients.expert_ids}
        P, index = self.groups.size, self.groups.index

        def rows(key: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
            if not (key.startswith("state.") and int(key.split(".")[1]) in experts and shape):
                return None
            L = shape[0] // P
            return index * L, (index + 1) * L

        return rows

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict, experts gathered from the group (every rank calls it)."""
        state = self.model.state_dict()
        for n in self.names:
            state[n] = gather_experts(state[n], self.groups)
        return state

    def full_states(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``full_state_dict`` and the optimizer's tensors, experts' moments gathered (every rank calls it)."""
        is_expert = self._expert_moment(optimizer)
        tensors, _ = optimizer_to_flat(optimizer)
        tensors = {k: gather_experts(t, self.groups) if is_expert(k, t) else t for k, t in tensors.items()}
        return self.full_state_dict(), tensors

    def full_model(self, cfg: ModelConfig) -> RoutedTransformer:
        """A one-process model holding every expert (every rank calls it; rank 0 exports it)."""
        full = RoutedTransformer(cfg)
        full.load_state_dict(self.full_state_dict())
        return full.eval()

    def num_parameters(self, cfg: ModelConfig) -> int:
        with torch.device("meta"):
            return RoutedTransformer(cfg).num_parameters()
