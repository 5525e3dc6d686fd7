"""The Mixture-of-Experts layer: a router sends each token to a few experts, only those compute,
and their outputs are combined by gate weight (Shazeer et al. 2017, eq. 1):

    y = sum_i g_i(x) E_i(x)    (+ sum_j S_j(x) for always-on shared experts, DeepSeekMoE 2024)

Balancing: the Switch load-balancing loss and the ST-MoE router z-loss (``losses.py``), or the
auxiliary-loss-free bias of DeepSeek-V3 (Liu et al. 2024, sec. 2.1.2): a per-expert bias b added
to the logits for *selection only*, after each training step moved by ``bias_update_rate`` toward
equal load (b_i += u * sign(mean load - load_i)).

Task conditioning (``task_conditioned``): a learned vector per task, zero-initialised, added to the
router input of learned routers (router(x + e_task)), so a multi-task model can route a token by its
task as well as its content, and starts as the unconditioned model. The ``task`` router (task-level
MoE, Kudugunta et al. 2021) instead routes by the task id alone.

A router whose combine rule is not this sum (soft MoE mixes slots, ``routers/soft.py``) runs the
forward itself: the layer asks ``router.forward_layer`` first and never branches on the router's kind.

Shape legend: T tokens, D model dim, E experts, K choice slots per token, H expert hidden width.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

import routelab.moe.losses as losses
from routelab.errors import ConfigError, check
from routelab.ffn.dense import FeedForward
from routelab.moe.dispatch import apply_capacity, capacity, grouped_experts, plan_dispatch
from routelab.moe.experts import Experts, reference_combine
from routelab.moe.output import MoEOutput  # re-exported: routelab.moe.layer.MoEOutput
from routelab.moe.routers.router import Router, Routing, build_router, require_capability
from routelab.moe.threads import Workspace
from routelab.options import RouterConfig


class MoE(nn.Module):
    """A sparse MoE feed-forward layer; see the module docstring.

    Args:
        d_model: D. num_experts: E. hidden: H, each expert's hidden width.
        router: a name in ``ROUTERS`` (its options as keywords, ``router="topk", top_k=2``), a mapping
            ``{"kind": ..., ...}``, a ``RouterConfig``, or a built ``Router``.
        activation: relu, gelu or swiglu (swiglu adds ``experts.w_gate``).
        bias: expert biases ``experts.b_in`` / ``experts.b_out`` (y = sum_i r_i(x)(W_i x + b_i)).
        capacity_factor: None = dropless; a number = capacity ceil(cf * T * K / E) per expert.
        drop_policy: "position" (first choices, then earlier tokens, are kept) or "probability"
            (higher router probability kept first).
        balance_loss_weight: alpha of the Switch load-balancing loss.
        z_loss_weight: weight of the ST-MoE router z-loss.
        entropy_loss_weight: weight of the router-entropy ("dynamic") loss of top-p routing.
        bias_balancing: DeepSeek-V3 auxiliary-loss-free balancing (switch, gshard, topk).
        bias_update_rate: its step u.
        jitter: multiplicative uniform noise [1 - eps, 1 + eps] on the router input in training.
        num_shared_experts: always-on experts of width H added to every token's output.
        causal: the layer sits in a causal model; routers that rank the whole batch are refused.
        balance_scope: "local" (the balance loss over this process's batch) or "global" (over the
            batches of all processes training together, when ``balance_group`` is set by the trainer;
            Qiu et al. 2025); DeepSeek-V3's selection-bias updates then use the global loads too.
            The same in one process.
        expert_groups, max_ranks_per_token: device-limited routing (DeepSeek-V2, sec. 2.1.3): each
            token chooses among the experts of its ``max_ranks_per_token`` best of ``expert_groups``
            groups of consecutive experts (``Router.limit_groups``); None = unlimited.
        impl: "sorted" (fast sparse path) or "reference" (every expert on every token, masked).
        vocab_size: the model's vocabulary size, for routers that map token ids (hash).
        num_tasks: the model's tasks, for the task router and task conditioning (``task_ids`` < it).
        task_conditioned: add a learned, zero-initialised per-task vector ``task_embedding``
            (num_tasks, D) to the router input (learned routers only).
        routed_scale: s in y = s * sum_i g_i(x) E_i(x) (DeepSeek-V3's routed scaling factor; 1 =
            the papers' combine). A top-1 softmax gate starts near 1/E, so a Switch layer's output
            starts about E times smaller than a dense FFN's; s = E undoes that (the balance, z and
            entropy losses read the router's probabilities, not the scaled gates).
        expert_slice: (index, size): hold only slice ``index`` of the experts split in ``size``
            (``Experts``); the layer then runs only under expert parallelism
            (``routelab.moe.parallel.apply_expert_parallel``).
        **router_options: the router's own options (see its ``RouterConfig`` subclass in
            ``routelab.moe.routers``); unknown ones are refused with the known ones listed.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        hidden: int,
        router: str | dict | RouterConfig | Router = "switch",
        activation: str = "gelu",
        bias: bool = True,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        entropy_loss_weight: float = 0.0,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        jitter: float = 0.0,
        num_shared_experts: int = 0,
        causal: bool = False,
        balance_scope: str = "local",
        expert_groups: int | None = None,
        max_ranks_per_token: int | None = None,
        impl: str = "sorted",
        vocab_size: int | None = None,
        num_tasks: int = 1,
        task_conditioned: bool = False,
        routed_scale: float = 1.0,
        expert_slice: tuple[int, int] | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        check(num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
        check(
            capacity_factor is None or capacity_factor > 0,
            "capacity_factor",
            capacity_factor,
            "None (dropless) or a number > 0",
        )
        check(drop_policy in ("position", "probability"), "drop_policy", drop_policy, "'position' or 'probability'")
        check(0.0 <= jitter < 1.0, "jitter", jitter, "0 <= jitter < 1")
        check(num_shared_experts >= 0, "num_shared_experts", num_shared_experts, "an integer >= 0")
        check(impl in ("sorted", "reference"), "impl", impl, "'sorted' or 'reference'")
        check(balance_scope in ("local", "global"), "balance_scope", balance_scope, "'local' or 'global'")
        check(num_tasks >= 1, "num_tasks", num_tasks, "an integer >= 1")
        check(routed_scale > 0, "routed_scale", routed_scale, "a number > 0")
        self.router = build_router(router, d_model, num_experts, vocab_size, num_tasks, **router_options)
        name = self.router.kind
        if task_conditioned:
            refusal = f"task_conditioned=True is invalid for router {name!r}, which has no learned input to condition"
            require_capability(self.router, "learned", refusal)
        if max_ranks_per_token is not None:
            if expert_groups is None:
                raise ConfigError("max_ranks_per_token needs expert_groups: the number of groups (ranks) it counts in")
            self.router.limit_groups(expert_groups, max_ranks_per_token)
        if capacity_factor is not None and self.router.own_capacity:
            raise ConfigError(
                f"capacity_factor={capacity_factor!r} is invalid for router {name!r}, which bounds each expert's"
                " tokens itself; allowed: None (set the router's own capacity_factor option instead)"
            )
        if causal:
            refusal = (
                f"router {name!r} ranks all tokens of the batch together, so a token's expert would depend on"
                " later tokens: it is refused in a causal model (use it in an encoder)"
            )
            require_capability(self.router, "whole_batch", refusal, value=False)
        if bias_balancing:
            refusal = f"bias_balancing={bias_balancing!r} is not supported by router {name!r}"
            require_capability(self.router, "supports_selection_bias", refusal)
        self.d_model, self.num_experts, self.hidden = d_model, num_experts, hidden
        self.capacity_factor = capacity_factor
        self.drop_policy, self.jitter, self.impl, self.causal = drop_policy, jitter, impl, causal
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.entropy_loss_weight = entropy_loss_weight
        self.bias_update_rate = bias_update_rate
        self.routed_scale = routed_scale
        self.experts = Experts(num_experts, d_model, hidden, activation, bias, expert_slice)
        # num_shared always-on experts (DeepSeekMoE, Qwen-MoE) as one FFN of width num_shared * H: the
        # sum of n FFNs equals one FFN with their hidden units side by side (and summed output biases)
        self.shared = FeedForward(d_model, num_shared_experts * hidden, activation, bias) if num_shared_experts else None
        # DeepSeek-V3 selection bias: state of the balancing controller, saved with the model
        self.register_buffer("selection_bias", torch.zeros(num_experts) if bias_balancing else None)
        # task conditioning: e_t added to the router input; zero, so training starts from the unconditioned router
        self.num_tasks = num_tasks
        self.task_embedding = nn.Parameter(torch.zeros(num_tasks, d_model)) if task_conditioned else None  # (N, D)
        self._workspace = Workspace()  # the fast path's helper threads and reusable buffer (not state)
        self.expert_parallel = None  # set by routelab.moe.parallel.apply_expert_parallel: experts on several ranks
        self.balance_scope = balance_scope
        self.balance_group = None  # the process group balanced together (balance_scope "global"); set by the trainer

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}, impl={self.impl!r}"

    # ------------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None, task_ids: Tensor | None = None
    ) -> MoEOutput:
        """x (..., D); token_ids (...) (hash routing); padding_mask (...) bool, True = padding;
        task_ids (...) long, each token's task (task router, task conditioning; None = task 0 for
        conditioning, refused by the task router of a model with several tasks).

        Padding tokens are not routed, count in no loss or statistic, and get output 0.

        Returns:
            ``MoEOutput``, not a tensor: ``hidden`` (..., D) is the layer's output, and ``aux_loss``
            (scalar, already weighted: balance, z and entropy losses) must be added to the training
            loss, or the router gets no balancing signal (``RoutedTransformer`` adds it to its
            ``loss`` itself). ``stats`` holds the routing statistics listed on ``MoEOutput``.

        Example::

            moe = MoE(d_model=64, num_experts=8, hidden=128, router="topk", top_k=2)
            out = moe(x)
            loss = task_loss(out.hidden) + out.aux_loss
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected d_model={self.d_model}")
        if self.router.needs_token_ids and token_ids is None:
            raise ValueError(f"router {self.router.kind!r} needs token_ids: call moe(x, token_ids=...) with the input ids")
        if task_ids is not None and task_ids.shape != x.shape[:-1]:
            raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, expected one per token {tuple(x.shape[:-1])}")
        own = self.router.forward_layer(self, x, padding_mask, task_ids)  # a router with its own combine rule (soft MoE)
        if own is not None:
            return own
        shape = x.shape
        xf = x.reshape(-1, self.d_model)  # (T, D)
        ids = token_ids.reshape(-1) if token_ids is not None else None
        tasks = task_ids.reshape(-1) if task_ids is not None else None  # (T,)
        seq_len = shape[-2] if x.dim() >= 3 else xf.shape[0]
        pos = torch.arange(xf.shape[0], device=x.device) % seq_len  # (T,) position in its sequence
        keep = None
        if padding_mask is not None:
            if padding_mask.shape != shape[:-1]:
                raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {tuple(shape[:-1])}")
            if padding_mask.any():
                keep = (~padding_mask.reshape(-1)).nonzero().squeeze(1)  # (T',) real tokens
                xf, pos = xf.index_select(0, keep), pos[keep]
                ids = ids[keep] if ids is not None else None
                tasks = tasks[keep] if tasks is not None else None
        y, aux, stats = self._route_and_compute(xf, ids, pos, tasks)
        if keep is not None:
            y = torch.zeros(shape[:-1].numel(), self.d_model, dtype=y.dtype, device=y.device).index_copy(0, keep, y)
        return MoEOutput(y.reshape(shape), aux, stats)

    def router_input(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (..., D) plus the task embedding of each token's task (task ids (...); None = task 0)."""
        if self.task_embedding is None:
            return x
        if task_ids is None:
            return x + self.task_embedding[0].to(x.dtype)
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(f"task ids must lie in 0..{self.num_tasks - 1} (the model's tasks)")
        return x + self.task_embedding[task_ids].to(x.dtype)  # (..., D)

    def _decide(
        self, x: Tensor, token_ids: Tensor | None, pos: Tensor, task_ids: Tensor | None = None
    ) -> tuple[Routing, Tensor | None, Tensor | None]:
        """Route x (T, D): (routing, chosen (T, K) before capacity, active (T, K) after; None = all)."""
        T, E = x.shape[0], self.num_experts
        x_router = self.router_input(x, task_ids)
        if self.training and self.jitter > 0:  # Switch: jitter the router input only
            x_router = x_router * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        by_task = {"task_ids": task_ids} if self.router.needs_task_ids else {}
        r: Routing = self.router(x_router, token_ids=token_ids, selection_bias=self.selection_bias, **by_task)
        if self.routed_scale != 1.0:  # DeepSeek-V3's routed scaling factor: gates times s (losses read probs)
            r = dataclasses.replace(r, gates=r.gates * self.routed_scale)
        chosen = r.active  # before capacity: for the balance loss and the drop count
        active = chosen
        if self.capacity_factor is not None and T > 0:
            cap = capacity(self.capacity_factor, T, r.expert_idx.shape[1], E)  # K of this routing
            active = apply_capacity(r.expert_idx, chosen, cap, E, self._priority(r, pos))
        return r, chosen, active

    @torch.no_grad()
    def gate_matrix(self, x: Tensor, token_ids: Tensor | None = None, task_ids: Tensor | None = None) -> Tensor:
        """For inspection: x (..., D) -> (..., E), the weight each expert's output gets for each
        token in this mode's forward pass (0 = not routed or dropped; soft MoE: combine weight
        summed over the expert's slots). Shared experts are not included."""
        own = self.router.gate_matrix(self, x, task_ids)  # a router with its own combine rule (soft MoE)
        if own is not None:
            return own
        E = self.num_experts
        xf = x.reshape(-1, self.d_model)
        seq_len = x.shape[-2] if x.dim() >= 3 else xf.shape[0]
        pos = torch.arange(xf.shape[0], device=x.device) % seq_len
        ids = token_ids.reshape(-1) if token_ids is not None else None
        tasks = task_ids.reshape(-1) if task_ids is not None else None
        r, _, active = self._decide(xf, ids, pos, tasks)
        w = r.gates if active is None else r.gates * active
        m = torch.zeros(xf.shape[0], E, dtype=w.dtype, device=x.device).scatter_add_(1, r.expert_idx, w)
        return m.reshape(*x.shape[:-1], E)

    def _route_and_compute(
        self, x: Tensor, token_ids: Tensor | None, pos: Tensor, task_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict]:
        """x (T, D) real tokens, pos (T,) their positions in their sequences, task_ids (T,) their
        tasks -> (y (T, D), aux_loss, stats)."""
        T, E = x.shape[0], self.num_experts
        r, chosen, active = self._decide(x, token_ids, pos, task_ids)
        if self.selection_bias is not None and self.training and (T > 0 or self._global_group() is not None):
            self._update_selection_bias(r.expert_idx, chosen)
        if self.experts.expert_slice is not None and self.expert_parallel is None:
            raise RuntimeError("this MoE layer holds a slice of its experts: it runs under expert parallelism only"
                               " (routelab.moe.parallel.apply_expert_parallel)")
        if self.impl == "reference":
            y = reference_combine(self.experts, x, r.expert_idx, r.gates, active)
        elif self.expert_parallel is not None:  # experts spread over ranks (routelab.moe.parallel)
            y = self.expert_parallel(self.experts, x, r.expert_idx, r.gates, active, self._workspace)
        else:
            plan = plan_dispatch(r.expert_idx, active, E)
            y = grouped_experts(self.experts, x, r.gates, plan, self._workspace)
        if self.shared is not None:
            y = y + self.shared(x)
        aux, stats = self._losses_and_stats(r, chosen, active)
        return y, aux, stats

    def _priority(self, r: Routing, pos: Tensor) -> Tensor | None:
        """(T, K) keep-first score for capacity drops, or None for the default order (first
        choices of all tokens, then second choices, ...; earlier tokens first).

        In a causal model "position" orders by (position in sequence, choice, batch row), so a
        token is only ever displaced by tokens at earlier or equal positions: dropping stays causal.
        """
        if self.drop_policy == "probability":
            return r.gates.detach()  # Riquelme et al. 2021: most confident first
        if not self.causal:
            return None
        K = r.expert_idx.shape[1]
        return -(pos.unsqueeze(1) * K + torch.arange(K, device=pos.device)).float()  # (T, K)

    def _global_group(self):
        """The process group whose batches balance together (``balance_scope`` global, training), or None."""
        return self.balance_group if self.balance_scope == "global" and self.training else None

    @torch.no_grad()
    def _update_selection_bias(self, expert_idx: Tensor, chosen: Tensor | None) -> None:
        """DeepSeek-V3: b_i += u * sign(mean load - load_i), from this batch's selections (with
        ``balance_scope`` global, the loads of every process's batch)."""
        w = None if chosen is None else chosen.reshape(-1).float()
        load = torch.bincount(expert_idx.reshape(-1), weights=w, minlength=self.num_experts).float()
        if self._global_group() is not None:
            torch.distributed.all_reduce(load, group=self._global_group())
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _losses_and_stats(self, r: Routing, chosen: Tensor | None, active: Tensor | None) -> tuple[Tensor, dict]:
        T, E = r.expert_idx.shape[0], self.num_experts
        dev = r.gates.device
        aux = torch.zeros((), device=dev)
        stats: dict = {}
        with torch.no_grad():
            flat = r.expert_idx.reshape(-1)
            w_active = None if active is None else active.reshape(-1).float()
            per_expert = torch.bincount(flat, weights=w_active, minlength=E).float()  # (E,)
            # pair counts stay 0-d device tensors: no host sync per forward
            every = torch.full((), flat.numel(), dtype=torch.long, device=dev)
            n_chosen = every if chosen is None else chosen.sum()
            n_active = every if active is None else active.sum()
            routed = torch.ones(T, dtype=torch.bool, device=dev) if active is None else active.any(1)
            stats["tokens_per_expert"] = per_expert
            stats["dropped_fraction"] = (n_chosen - n_active).float() / n_chosen.clamp(min=1).float()
            stats["unrouted_fraction"] = (1.0 - routed.float().mean()) if T else torch.zeros((), device=dev)
            if r.probs is not None and T:
                stats["router_entropy"] = losses.router_entropy(r.probs.detach())
            stats["max_load"] = per_expert.max()
            stats["mean_load"] = per_expert.mean()
            stats["unused_experts"] = (per_expert == 0).sum()
        group = self._global_group()
        if r.balance and r.probs is not None and self.balance_loss_weight > 0 and self.router.learned and (T > 0 or group is not None):
            lb = losses.load_balancing_loss(r.probs, r.expert_idx, chosen, group)  # with a group: on every rank, even T = 0
            aux = aux + self.balance_loss_weight * lb
            stats["balance_loss"] = lb.detach()
        if T == 0 or not self.router.learned:
            return aux, stats
        if r.logits is not None and self.z_loss_weight > 0:
            z = losses.router_z_loss(r.logits)
            aux = aux + self.z_loss_weight * z
            stats["z_loss"] = z.detach()
        if r.probs is not None and self.entropy_loss_weight > 0:
            aux = aux + self.entropy_loss_weight * losses.router_entropy(r.probs)
        return aux, stats
