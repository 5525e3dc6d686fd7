"""``ffn.kind: moe``: the MoE layer as a model feed-forward block, with its typed config.

Every ``moe_every``-th block is sparse (layers moe_every-1, 2*moe_every-1, ...: "every other
layer" in Switch and GShard for moe_every=2); the others get a dense FFN the size of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from routelab.errors import ConfigError, check
from routelab.moe.layer import MoE
from routelab.moe.routers import ROUTERS, HashRouter, router_class
from routelab.options import FFNConfig
from routelab.registry import FFN

TOP_K_DEFAULT = {"switch": 1, "gshard": 2, "topk": 2}  # routers with a fixed number of experts per token


@dataclass
class MoEFFNConfig(FFNConfig):
    """Options of ``ffn.kind: moe``. ``hidden`` is each expert's width (None = the dense FFN's)."""

    kind: str = "moe"
    num_experts: int = 8  # E experts per MoE layer
    router: str = "switch"  # switch, gshard, topk, topp, hash, random, expert_choice, base, soft
    top_k: int | None = None  # experts per token: switch 1, gshard 2, topk (None = 2); others choose their own
    capacity_factor: float | None = (
        None  # None = dropless; else capacity ceil(cf*T*k/E) (expert_choice: C = cf*T/E, None = 1)
    )
    drop_policy: Literal["position", "probability"] = "position"  # which overflow is dropped first
    balance_loss_weight: float = 0.01  # alpha of the Switch load-balancing loss (Fedus et al. eq. 4)
    z_loss_weight: float = 0.001  # ST-MoE router z-loss weight (Zoph et al. 2022)
    entropy_loss_weight: float = 0.0  # router-entropy loss weight (Huang et al. 2024 use 1e-4 with topp)
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing (switch, gshard, topk)
    bias_update_rate: float = 0.001  # its per-step bias update u
    jitter: float = 0.0  # multiplicative router-input noise in training (Switch used 0.01)
    num_shared_experts: int = 0  # always-on experts of width hidden (DeepSeekMoE, Qwen-MoE)
    moe_every: int = 1  # every k-th block is MoE, the others dense (Switch/GShard: 2)
    renormalize: bool | None = None  # topk/topp: rescale the chosen gates to sum 1 (None: topk yes, topp no)
    top_p: float = 0.4  # topp: probability mass to cover (Huang et al. 2024 use 0.4)
    max_k: int | None = None  # topp: most experts per token (None = num_experts)
    random_eval: Literal["mean", "seeded"] = "mean"  # random (THOR) in eval: mean of all experts or a seeded choice
    slots_per_expert: int = 1  # soft: slots per expert
    seed: int = 0  # hash table and seeded random-eval choices
    hash_table: Literal["random", "balanced"] = "random"  # hash: seeded random, or balanced by train-token frequency
    impl: Literal["sorted", "reference"] = "sorted"  # sorted = fast sparse path; reference = all experts, masked

    def __post_init__(self) -> None:
        super().__post_init__()
        sec = self._section
        if self.router not in ROUTERS:
            try:
                router_class(self.router)
            except ConfigError as e:
                raise ConfigError(f"{sec}.router: {e}") from None
        check(self.num_experts >= 1, f"{sec}.num_experts", self.num_experts, "an integer >= 1")
        if self.top_k is not None:
            check(
                self.router in TOP_K_DEFAULT,
                f"{sec}.top_k",
                self.top_k,
                f"null for router {self.router!r} (only switch, gshard and topk take top_k)",
            )
            check(
                1 <= self.top_k <= self.num_experts,
                f"{sec}.top_k",
                self.top_k,
                f"1 <= top_k <= num_experts={self.num_experts}",
            )
            if self.router in ("switch", "gshard"):
                k = TOP_K_DEFAULT[self.router]
                check(
                    self.top_k == k, f"{sec}.top_k", self.top_k, f"{k} for router {self.router!r} (or use router: topk)"
                )
        elif self.router in TOP_K_DEFAULT:
            check(
                TOP_K_DEFAULT[self.router] <= self.num_experts,
                f"{sec}.num_experts",
                self.num_experts,
                f">= {TOP_K_DEFAULT[self.router]} for router {self.router!r}",
            )
        if self.capacity_factor is not None:
            check(
                self.capacity_factor > 0,
                f"{sec}.capacity_factor",
                self.capacity_factor,
                "null (dropless) or a number > 0",
            )
        for n in (
            "balance_loss_weight",
            "z_loss_weight",
            "entropy_loss_weight",
            "bias_update_rate",
            "num_shared_experts",
        ):
            check(getattr(self, n) >= 0, f"{sec}.{n}", getattr(self, n), "a number >= 0")
        check(0.0 <= self.jitter < 1.0, f"{sec}.jitter", self.jitter, "0 <= jitter < 1")
        check(self.moe_every >= 1, f"{sec}.moe_every", self.moe_every, "an integer >= 1 (1 = every block)")
        check(0.0 < self.top_p <= 1.0, f"{sec}.top_p", self.top_p, "0 < top_p <= 1")
        if self.max_k is not None:
            check(
                1 <= self.max_k <= self.num_experts,
                f"{sec}.max_k",
                self.max_k,
                f"1 <= max_k <= num_experts={self.num_experts}",
            )
        check(
            self.hash_table == "random" or self.router == "hash",
            f"{sec}.hash_table",
            self.hash_table,
            f"'random' for router {self.router!r} (a hash table is used by router: hash only)",
        )
        check(self.slots_per_expert >= 1, f"{sec}.slots_per_expert", self.slots_per_expert, "an integer >= 1")
        if self.bias_balancing:
            ok = [n for n, c in ROUTERS.items() if c.supports_selection_bias]
            check(
                self.router in ok,
                f"{sec}.bias_balancing",
                self.bias_balancing,
                f"false for router {self.router!r} (supported by {', '.join(ok)})",
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` gets the MoE (else a dense FFN of width ``hidden``)."""
        return (layer_idx + 1) % self.moe_every == 0

    def router_options(self, vocab_size: int | None) -> dict:
        """The options of ``self.router``'s constructor, taken from the fields above."""
        r = self.router
        if r == "topk":
            return {"top_k": self.top_k or 2, "renormalize": True if self.renormalize is None else self.renormalize}
        if r == "topp":
            return {"top_p": self.top_p, "max_k": self.max_k, "renormalize": bool(self.renormalize)}
        if r == "hash":
            return {"vocab_size": vocab_size, "seed": self.seed}
        if r == "random":
            return {"eval_mode": self.random_eval, "seed": self.seed}
        if r == "soft":
            return {"slots_per_expert": self.slots_per_expert}
        return {}


@FFN.register("moe", MoEFFNConfig)
class MoEFFN(MoE):
    """The ``MoE`` layer built from a ``ModelConfig`` (parameter names as in ``MoE``)."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        f: MoEFFNConfig = cfg.ffn
        try:
            super().__init__(
                d_model=cfg.d_model,
                num_experts=f.num_experts,
                hidden=cfg.ffn_hidden,
                router=f.router,
                activation=f.activation,
                bias=f.bias,
                capacity_factor=f.capacity_factor,
                drop_policy=f.drop_policy,
                balance_loss_weight=f.balance_loss_weight,
                z_loss_weight=f.z_loss_weight,
                entropy_loss_weight=f.entropy_loss_weight,
                bias_balancing=f.bias_balancing,
                bias_update_rate=f.bias_update_rate,
                jitter=f.jitter,
                num_shared_experts=f.num_shared_experts,
                causal=bool(cfg.causal),
                impl=f.impl,
                **f.router_options(cfg.vocab_size),
            )
        except ConfigError as e:
            raise ConfigError(f"model.ffn (layer {layer_idx}): {e}") from None
        self.layer_idx = layer_idx
        self.experts.reset_parameters(cfg.init_std)  # the model rescales experts.w_out (GPT-2 init)
        self.router.reset_parameters(cfg.init_std)


def token_counts(data, vocab_size: int) -> Tensor:
    """(V,) occurrences of each token id in the training split (LM stream or classification examples)."""
    train = data.train
    ids = train if isinstance(train, Tensor) else torch.tensor([t for ids, _ in train for t in ids], dtype=torch.long)
    return torch.bincount(ids.reshape(-1).cpu(), minlength=vocab_size)[:vocab_size]


def balance_hash_tables(model: nn.Module, counts: Tensor) -> int:
    """Give every hash router of ``model`` the frequency-balanced table of ``counts`` (Roller et al.
    2021, "Balanced assignment"); returns how many routers changed."""
    routers = [m for m in model.modules() if isinstance(m, HashRouter)]
    for r in routers:
        r.balance(counts.to(r.table.device))
    return len(routers)
