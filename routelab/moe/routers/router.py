"""What every token -> expert router shares: the ``Routing`` it returns, the ``Router`` base class,
and ``build_router``.

A router only decides; the MoE layer applies capacity, dispatch, losses and statistics, unless the
router combines expert outputs its own way (soft MoE mixes slots): then the layer asks it to
(``Router.forward_layer``, ``Router.gate_matrix``) and never branches on the router's kind. Learned
routers hold ``weight`` (E, D) (the layer's parameter ``router.weight``) and compute their
probabilities in float32 from ``logits = x @ weight.T``. Each router is one file in this package:
its options dataclass (a ``RouterConfig`` subclass) and its class, registered together in
``ROUTERS`` under its name, with class attributes saying what it needs and what it can be combined
with (``ROUTERS.names_where(flag)`` lists the routers with one; ``require_capability`` refuses an
option that needs one), and ``experts_per_token`` saying how many experts process a token (FLOP accounting).

Shape legend: T tokens, D model dim, E experts, K choice slots per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from routelab.config import from_dict, section_from_dict
from routelab.errors import ConfigError
from routelab.options import RouterConfig
from routelab.precision import run_fp32
from routelab.registry import ROUTERS

if TYPE_CHECKING:
    from routelab.moe.experts import Experts
    from routelab.moe.output import MoEOutput


@dataclass
class Routing:
    """A token-choice routing decision for T tokens with K choice slots each.

    Attributes:
        expert_idx: (T, K) long, the expert of each slot.
        gates: (T, K) float32 combine weights (differentiable for learned routers).
        active: (T, K) bool, slots really used (top-p's unused slots, GShard's skipped second
            expert, expert choice's unchosen pairs, capacity drops); None = all used.
        logits: (T, E) float32 softmax logits (z-loss applies), or None (no softmax router).
        probs: (T, E) float32 router probabilities (balance loss, entropy), or None.
        balance: whether the load-balancing loss applies (token-choice routers with a softmax).
    """

    expert_idx: Tensor
    gates: Tensor
    active: Tensor | None = None
    logits: Tensor | None = None
    probs: Tensor | None = None
    balance: bool = False


@dataclass
class SoftRouting:
    """Soft MoE's dense decision for B sequences of T tokens and E*S slots (Puigcerver et al. 2023).

    Attributes:
        dispatch: (B, T, E*S) softmax over tokens (eq. 1, D): slot inputs are sum_t D_ts x_t.
        combine: (B, T, E*S) softmax over slots (eq. 2, C): outputs are sum_s C_ts y_s.
        logits: (B, T, E*S) float32.
    """

    dispatch: Tensor
    combine: Tensor
    logits: Tensor


class MoELayerParts(Protocol):
    """What a router that combines expert outputs itself reads from its MoE layer
    (``routelab.moe.layer.MoE`` is one; the routers never import it)."""

    num_experts: int  # E
    impl: str  # "sorted" (fast path) or "reference" (the slow, obviously correct one)
    experts: Experts  # stacked expert weights, (E, ...)
    shared: nn.Module | None  # always-on shared experts, or None

    def router_input(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (..., D) plus each token's task embedding: what the router sees."""
        ...


class Router(nn.Module):
    """Base class. ``Router(d_model, num_experts, options)`` or, for code, the options as keywords
    (``TopKRouter(64, 8, top_k=2)``); ``vocab_size`` is the model's, for routers that map token ids;
    ``num_tasks`` the model's, for routers that map task ids (``needs_task_ids``: the layer then
    passes ``task_ids=`` (T,) to ``forward``; other routers never receive it).

    Class attributes say what a router needs and what it may be combined with; ``kind`` and
    ``config_class`` are set when it is registered.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[RouterConfig]]
    learned: ClassVar[bool] = True  # has ``weight`` (E, D) and a gradient
    needs_token_ids: ClassVar[bool] = False  # routes by token id (hash), not by x
    needs_task_ids: ClassVar[bool] = False  # routes by task id (task): forward takes ``task_ids=`` (T,)
    whole_batch: ClassVar[bool] = False  # decisions depend on other tokens -> refused in a causal model
    supports_selection_bias: ClassVar[bool] = False  # aux-loss-free balancing (DeepSeek-V3) adds a bias to selection
    own_capacity: ClassVar[bool] = False  # the router itself bounds tokens per expert (expert choice)
    soft: ClassVar[bool] = False  # returns a SoftRouting (every expert sees a mix of all tokens)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        options: RouterConfig | None = None,
        *,
        vocab_size: int | None = None,
        num_tasks: int = 1,
        **kw: Any,
    ) -> None:
        super().__init__()
        if options is None:
            options = from_dict(self.config_class, {"kind": self.kind, **kw}, "router")
        elif kw:
            raise TypeError(f"give {type(self).__name__} its options or keyword options, not both ({sorted(kw)})")
        if not isinstance(options, self.config_class):
            raise TypeError(f"{type(self).__name__} takes {self.config_class.__name__} options, got {type(options).__name__}")
        self.options = options
        self.d_model, self.num_experts, self.vocab_size, self.num_tasks = d_model, num_experts, vocab_size, num_tasks
        self.group_limit: tuple[int, int] | None = None  # (G groups, M of them per token): ``limit_groups``
        self.check()
        if self.learned:
            self.weight = nn.Parameter(torch.empty(self.num_weight_rows(), d_model))
            self.reset_parameters()

    def __call__(self, *args: Any, **kwargs: Any) -> Routing | SoftRouting:
        """Routing runs in float32 under autocast (``routelab.precision.run_fp32``): logits, softmax,
        gates and everything the balance and z losses read (Switch Transformers' selective precision)."""
        return run_fp32(super().__call__, *args, **kwargs)

    def check(self) -> None:
        """Validate options against the layer (e.g. top_k <= num_experts); raise ``ConfigError``."""

    def limit_groups(self, groups: int, per_token: int) -> None:
        """Device-limited routing (DeepSeek-V2, sec. 2.1.3): the E experts form ``groups`` groups of
        E/G consecutive experts (under expert parallelism, those of one rank), and each token chooses
        its experts only among its ``per_token`` best groups, a group's score being its best expert's
        selection score. A token then reaches at most M groups, so at most M ranks. Routers that choose
        by score (``supports_selection_bias``) apply it in ``selection_scores``."""
        E, name = self.num_experts, self.kind
        require_capability(self, "supports_selection_bias", f"max_ranks_per_token is not supported by router {name!r}")
        if groups < 1 or E % groups:
            raise ConfigError(f"expert_groups={groups} is invalid; allowed: a divisor of num_experts={E}")
        k = int(self.experts_per_token(1))
        if not 1 <= per_token <= groups or per_token * (E // groups) < k:
            raise ConfigError(
                f"max_ranks_per_token={per_token} is invalid for {groups} groups of {E // groups} experts and router"
                f" {name!r} choosing {k}; allowed: {-(-k // (E // groups))} <= max_ranks_per_token <= {groups}"
            )
        self.group_limit = (groups, per_token)

    def selection_scores(self, logits: Tensor, bias: Tensor | None) -> Tensor:
        """(T, E) scores for *choosing* experts: ``select_scores``, then -inf outside each token's
        M best groups when ``limit_groups`` is set."""
        s = select_scores(logits, bias)
        if self.group_limit is None:
            return s
        G, M = self.group_limit
        T, E = s.shape
        best = s.view(T, G, E // G).amax(-1)  # (T, G): a group's score is its best expert's
        keep = torch.zeros(T, G, dtype=torch.bool, device=s.device).scatter_(1, best.topk(M, dim=-1).indices, True)
        return s.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))

    def prepare(self, token_counts: Callable[[], Tensor]) -> bool:
        """Set data-dependent state before a fresh run's first step; ``token_counts()`` gives the (V,)
        occurrences of each token id in the training data. Returns whether anything changed."""
        return False

    # The combine rule. Token-choice routers keep these defaults (None): the layer dispatches each
    # token to its chosen experts and sums their outputs by gate. A router that combines another way
    # (soft MoE: every expert on mixes of all tokens) overrides both, and the layer returns its answer.
    def forward_layer(
        self, layer: MoELayerParts, x: Tensor, padding_mask: Tensor | None, task_ids: Tensor | None
    ) -> MoEOutput | None:
        """The MoE layer's whole forward, x (..., D) -> ``MoEOutput``, by this router's combine rule;
        None = token choice (the layer's own dispatch and combine)."""
        return None

    def gate_matrix(self, layer: MoELayerParts, x: Tensor, task_ids: Tensor | None) -> Tensor | None:
        """For inspection, x (..., D) -> (..., E): the weight each expert's output gets for each token
        under this router's combine rule; None = token choice (the layer computes it from ``Routing``)."""
        return None

    def num_weight_rows(self) -> int:
        """Rows of ``weight``: one per expert (soft MoE: one per slot)."""
        return self.num_experts

    # Every router defines ``experts_per_token(seq_len) -> float``: how many experts process a token
    # on average by its definition (an upper bound where the number varies per token), so the FFN
    # FLOPs of a token are that many experts' (``routelab.report.flops``). Checked at class creation.
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not callable(getattr(cls, "experts_per_token", None)):
            raise TypeError(f"router class {cls.__name__} must define experts_per_token(seq_len) -> float")

    def reset_parameters(self, std: float | None = None) -> None:
        if self.learned:
            nn.init.normal_(self.weight, std=std if std is not None else 1.0 / math.sqrt(self.d_model))

    def logits(self, x: Tensor) -> Tensor:
        """x (T, D) -> (T, E) float32 logits = x @ weight.T."""
        return x.float() @ self.weight.float().t()

    def extra_repr(self) -> str:
        fields = {k: v for k, v in vars(self.options).items() if k != "kind"}
        return ", ".join([f"d_model={self.d_model}", f"num_experts={self.num_experts}", *(f"{k}={v}" for k, v in fields.items())])


def require_capability(router: Router | type[Router] | str, flag: str, refusal: str, value: bool = True) -> None:
    """Refuse an option that needs a capability its router lacks: unless ``router`` (a router, its
    class or its name) has the class flag ``flag`` truthy (``value=False``: falsy, for a property
    the option cannot live with, such as ``whole_batch``), raise ``ConfigError("<refusal>; allowed
    with: <every router that qualifies>")``, one line naming the option, the router and the way out."""
    cls = ROUTERS.get(router).module_class if isinstance(router, str) else router
    if bool(getattr(cls, flag)) != value:
        raise ConfigError(f"{refusal}; allowed with: {', '.join(ROUTERS.names_where(flag, value))}")


def select_scores(logits: Tensor, bias: Tensor | None) -> Tensor:
    """Scores used only for *choosing* experts: logits + per-expert balancing bias (DeepSeek-V3)."""
    return logits if bias is None else logits + bias.to(logits.dtype)


def router_options(router: str | dict | RouterConfig, **kw: Any) -> RouterConfig:
    """A router's validated options from a name plus keywords, a mapping, or options themselves."""
    if isinstance(router, RouterConfig):
        if kw:
            raise ConfigError(f"router options given twice: {type(router).__name__} and {sorted(kw)}")
        return router
    if isinstance(router, str):
        router = {"kind": router, **kw}
    elif kw:
        router = {**router, **kw}
    return section_from_dict(RouterConfig, router, "router")


def build_router(
    router: str | dict | RouterConfig | Router,
    d_model: int,
    num_experts: int,
    vocab_size: int | None = None,
    num_tasks: int = 1,
    **kw: Any,
) -> Router:
    """The router ``router`` names (with keyword options), or describes, or is."""
    if isinstance(router, Router):
        if kw:
            raise ConfigError(f"options {sorted(kw)} given with a built router {type(router).__name__}")
        return router
    options = router_options(router, **kw)
    return ROUTERS.get(options.kind).module_class(d_model, num_experts, options, vocab_size=vocab_size, num_tasks=num_tasks)
