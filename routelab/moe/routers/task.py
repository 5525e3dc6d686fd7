"""Task-level MoE (Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for
Efficient Inference", sec. 3): every token of task t goes to the same k experts, chosen by t alone,
y = sum_j g_tj E_{table[t, j]}(x). So one task's model needs only its k experts (``extract_task``).

The table is fixed and deterministic: task t gets experts (t*k + j) mod E for j = 0..k-1 (sorted),
which deals the tasks round-robin over the experts: disjoint while num_tasks * k <= E, then wrapping
around so that every expert serves about num_tasks * k / E tasks; or the ``table`` given (row t: task
t's k distinct experts, e.g. to let related tasks share experts). Gates: ``equal`` (1/k each) or
``learned`` (softmax of a per-task row of k logits, zero-initialised, so it starts equal). Task ids
are required when the model has several tasks; a model of one task routes everything as task 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class TaskRouterConfig(RouterConfig):
    kind: str = "task"
    top_k: int = 1  # experts per task (k)
    gates: Literal["equal", "learned"] = "equal"  # equal: 1/k each; learned: a softmax over each task's k experts
    table: list[list[int]] | None = None  # row t = task t's top_k experts; null = round-robin (task_table)


def task_table(num_tasks: int, num_experts: int, top_k: int) -> Tensor:
    """(num_tasks, k) long: task t's experts, (t*k + j) mod E for j < k, sorted ascending."""
    t = torch.arange(num_tasks).unsqueeze(1)  # (N, 1)
    return ((t * top_k + torch.arange(top_k)) % num_experts).sort(dim=1).values  # (N, k)


@ROUTERS.register("task", TaskRouterConfig)
class TaskRouter(Router):
    learned = False  # no (E, D) weight: the decision does not depend on x
    needs_task_ids = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        given = self.options.table
        table = torch.tensor(given, dtype=torch.long) if given is not None else task_table(self.num_tasks, self.num_experts, self.options.top_k)
        self.register_buffer("table", table)  # (N, k) expert of each task's slot
        learned_gates = self.options.gates == "learned"
        self.gate_logits = nn.Parameter(torch.zeros(self.num_tasks, self.options.top_k)) if learned_gates else None  # (N, k)

    def check(self) -> None:
        k, e = self.options.top_k, self.num_experts
        check(1 <= k <= e, qualified(self.options, "top_k"), k, f"1 <= top_k <= num_experts={e}")
        table, n = self.options.table, self.num_tasks
        if table is not None:
            ok = len(table) == n and all(len(row) == k and len(set(row)) == k and all(0 <= x < e for x in row) for row in table)
            check(ok, qualified(self.options, "table"), table, f"{n} rows (one per task) of top_k={k} distinct experts in 0..{e - 1}")

    def experts_per_token(self, seq_len: int) -> float:
        return float(self.options.top_k)

    def task_gates(self) -> Tensor:
        """(N, k) float32 combine weights of each task's experts."""
        if self.gate_logits is None:
            return torch.full(tuple(self.table.shape), 1.0 / self.options.top_k, device=self.table.device)
        return self.gate_logits.float().softmax(-1)

    def experts_of(self, task: int) -> Tensor:
        """(k,) long: task ``task``'s experts, in table (slot) order: the only ones its tokens reach."""
        return self.table[task]

    def restricted_to(self, task: int) -> dict[str, Tensor]:
        """The state (``state_dict`` names) of the task router of a one-task model that routes as task
        ``task`` does here, its experts ``experts_of(task)`` renumbered 0..k-1 in slot order: table
        [[0 .. k-1]] and, with learned gates, the task's row of gate logits."""
        k = self.table.shape[1]
        state = {"table": torch.arange(k).unsqueeze(0)}  # (1, k): the kept experts, in slot order
        if self.gate_logits is not None:
            state["gate_logits"] = self.gate_logits.detach()[task : task + 1]  # (1, k)
        return state

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None, task_ids: Tensor | None = None
    ) -> Routing:
        """x (T, D) (only its length is used); task_ids (T,) long, or None for a one-task model."""
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(
                    f"the task router needs task ids: this model has {self.num_tasks} tasks; call model(..., task_ids=...)"
                )
            task_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        ids = task_ids.reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"task_ids has {ids.shape[0]} tokens but x has {x.shape[0]}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_tasks):
            raise ValueError(f"task ids must lie in 0..{self.num_tasks - 1} (the model's tasks)")
        idx = self.table[ids]  # (T, k)
        gates = self.task_gates()[ids]  # (T, k)
        return Routing(idx, gates)
