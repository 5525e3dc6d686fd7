"""``ffn.kind: moe``: the MoE layer as a model feed-forward block, with its typed config.

Every ``moe_every``-th block is sparse (layers moe_every-1, 2*moe_every-1, ...: "every other
layer" in Switch and GShard for moe_every=2); the others get a dense FFN the size of one expert.
The router is its own section, ``model.ffn.router: {kind: topk, top_k: 2}`` (or just
``router: topk``), validated by the options dataclass of the router it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from routelab.config import section_from_dict
from routelab.errors import ConfigError, check
from routelab.moe.layer import MoE
from routelab.options import FFNConfig, RouterConfig
from routelab.registry import FFN, ROUTERS

# Before routers had their own section, their options sat in model.ffn; configs saved then (run
# folders, user YAML) are read by moving the keys that applied to their router into model.ffn.router.
LEGACY_ROUTER_KEYS = {  # router -> {old model.ffn key: new model.ffn.router key}
    "topk": {"top_k": "top_k", "renormalize": "renormalize"},
    "topp": {"top_p": "top_p", "max_k": "max_k", "renormalize": "renormalize"},
    "hash": {"seed": "seed", "hash_table": "table"},
    "random": {"seed": "seed", "random_eval": "eval_mode"},
    "soft": {"slots_per_expert": "slots_per_expert"},
}
LEGACY_DEFAULTS = {  # old key -> its old default (what a saved config holds for routers it did not apply to)
    "top_k": None, "renormalize": None, "top_p": 0.4, "max_k": None, "seed": 0, "hash_table": "random",
    "random_eval": "mean", "slots_per_expert": 1,
}


def _default_router() -> RouterConfig:
    return section_from_dict(RouterConfig, {"kind": "switch"}, "model.ffn.router")


@dataclass
class MoEFFNConfig(FFNConfig):
    """Options of ``ffn.kind: moe``. ``hidden`` is each expert's width (None = the dense FFN's)."""

    kind: str = "moe"
    num_experts: int = 8  # E experts per MoE layer
    router: RouterConfig = field(default_factory=_default_router)  # {kind: switch|gshard|topk|..., its options}
    capacity_factor: float | None = None  # None = dropless; else each expert takes at most ceil(cf*T*k/E) tokens
    drop_policy: Literal["position", "probability"] = "position"  # which overflow is dropped first
    balance_loss_weight: float = 0.01  # alpha of the Switch load-balancing loss (Fedus et al. eq. 4)
    z_loss_weight: float = 0.001  # ST-MoE router z-loss weight (Zoph et al. 2022)
    entropy_loss_weight: float = 0.0  # router-entropy loss weight (Huang et al. 2024 use 1e-4 with topp)
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing (routers that support it)
    bias_update_rate: float = 0.001  # its per-step bias update u
    jitter: float = 0.0  # multiplicative router-input noise in training (Switch used 0.01)
    num_shared_experts: int = 0  # always-on experts of width hidden (DeepSeekMoE, Qwen-MoE)
    moe_every: int = 1  # every k-th block is MoE, the others dense (Switch/GShard: 2)
    balance_scope: Literal["local", "global"] = "local"  # balance loss over each process's batch, or all processes' (Qiu et al. 2025)
    max_ranks_per_token: int | None = None  # device-limited routing (DeepSeek-V2): a token's experts on at most M groups/ranks
    expert_groups: int | None = None  # the groups max_ranks_per_token counts in; null = train.expert_parallel
    impl: Literal["sorted", "reference"] = "sorted"  # sorted = fast sparse path; reference = all experts, masked
    task_conditioned: bool = False  # a learned per-task vector (zero-init) added to the router input (multi-task models)
    routed_scale: float = 1.0  # gates times s (DeepSeek-V3's routed scaling factor); s = E offsets a top-1 gate's 1/E start
    router_init_std: float | None = None  # std of the router's normal init; null = model.init_std (Switch sec. 2.4 scales init down)

    def __post_init__(self) -> None:
        super().__post_init__()
        sec = self._section
        if isinstance(self.router, (str, dict)):
            self.router = section_from_dict(RouterConfig, self.router, f"{sec}.router")
        router = ROUTERS.get(self.router.kind).module_class
        check(self.num_experts >= 1, f"{sec}.num_experts", self.num_experts, "an integer >= 1")
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, f"{sec}.capacity_factor", self.capacity_factor, "null (dropless) or a number > 0")
            check(
                not router.own_capacity,
                f"{sec}.capacity_factor",
                self.capacity_factor,
                f"null for router {self.router.kind!r}, which bounds each expert's tokens itself"
                f" (set {sec}.router.capacity_factor)",
            )
        for n in ("balance_loss_weight", "z_loss_weight", "entropy_loss_weight", "bias_update_rate", "num_shared_experts"):
            check(getattr(self, n) >= 0, f"{sec}.{n}", getattr(self, n), "a number >= 0")
        check(0.0 <= self.jitter < 1.0, f"{sec}.jitter", self.jitter, "0 <= jitter < 1")
        check(self.routed_scale > 0, f"{sec}.routed_scale", self.routed_scale, "a number > 0 (1 = the papers' combine)")
        if self.router_init_std is not None:
            check(self.router_init_std >= 0, f"{sec}.router_init_std", self.router_init_std, "null (model.init_std) or a number >= 0")
        check(self.moe_every >= 1, f"{sec}.moe_every", self.moe_every, "an integer >= 1 (1 = every block)")
        if self.expert_groups is not None:
            check(
                self.expert_groups >= 1 and self.num_experts % self.expert_groups == 0,
                f"{sec}.expert_groups",
                self.expert_groups,
                f"a divisor of {sec}.num_experts={self.num_experts}",
            )
        by_score = ROUTERS.names_where("supports_selection_bias")  # routers that choose experts by score
        if self.max_ranks_per_token is not None:
            check(
                self.max_ranks_per_token >= 1 and router.supports_selection_bias,
                f"{sec}.max_ranks_per_token",
                self.max_ranks_per_token,
                f"null, or an integer >= 1 with a router that chooses by score ({', '.join(by_score)})",
            )
        if self.bias_balancing:
            check(
                router.supports_selection_bias,
                f"{sec}.bias_balancing",
                self.bias_balancing,
                f"false for router {self.router.kind!r} (supported by {', '.join(by_score)})",
            )

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A ``model.ffn`` mapping written before routers had their own section, rewritten: the
        old keys that applied to its router move into ``router``; the others had no effect and go."""
        if not any(k in data for k in LEGACY_DEFAULTS) or isinstance(data.get("router"), dict):
            return data
        data = dict(data)
        name = data.get("router", "switch")
        router: dict[str, Any] = {"kind": name}
        moved = LEGACY_ROUTER_KEYS.get(name, {})
        for key in LEGACY_DEFAULTS:
            if key not in data:
                continue
            value = data.pop(key)
            if key in moved:
                if value is not None:
                    router[moved[key]] = value
            elif value != LEGACY_DEFAULTS[key] and (key, name, value) not in (("top_k", "switch", 1), ("top_k", "gshard", 2)):
                raise ConfigError(
                    f"model.ffn.{key}={value!r} does not apply to router {name!r}; a router's options are set in"
                    f" model.ffn.router (e.g. router: {{kind: {name}, ...}}), see its options class in routelab.moe.routers"
                )
        if name == "expert_choice" and data.get("capacity_factor") is not None:
            router["capacity_factor"] = data.pop("capacity_factor")
        data["router"] = router
        return data

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` gets the MoE (else a dense FFN of width ``hidden``)."""
        return (layer_idx + 1) % self.moe_every == 0


@FFN.register("moe", MoEFFNConfig)
class MoEFFN(MoE):
    """The ``MoE`` layer built from a ``ModelConfig`` (parameter names as in ``MoE``)."""

    def __init__(self, cfg, layer_idx: int = 0, expert_slice: tuple[int, int] | None = None) -> None:
        f: MoEFFNConfig = cfg.ffn
        if ROUTERS.get(f.router.kind).module_class.needs_task_ids and not cfg.task_names:
            raise ConfigError(
                f"model.ffn.router={f.router.kind!r} routes by task id and needs model.task_names (the tasks of a"
                " multi-task model, e.g. [qa, code]); got none"
            )
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
                balance_scope=f.balance_scope,
                expert_groups=f.expert_groups,
                max_ranks_per_token=f.max_ranks_per_token,
                impl=f.impl,
                vocab_size=cfg.vocab_size,
                num_tasks=cfg.num_tasks,
                task_conditioned=f.task_conditioned,
                routed_scale=f.routed_scale,
                expert_slice=expert_slice,
            )
        except ConfigError as e:
            raise ConfigError(f"model.ffn (layer {layer_idx}): {e}") from None
        self.layer_idx = layer_idx
        self.experts.reset_parameters(cfg.init_std)  # the model rescales experts.w_out (GPT-2 init)
        self.router.reset_parameters(cfg.init_std if f.router_init_std is None else f.router_init_std)
