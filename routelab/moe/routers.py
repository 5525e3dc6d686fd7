"""Token -> expert routers: each maps tokens (T, D) to a ``Routing`` (which experts, which gates).

One class per paper; ``ROUTERS`` maps the config name to the class. Learned routers hold
``weight`` (E, D) (the parameter ``router.weight`` of the layer) and compute their probabilities in
float32 from ``logits = x @ weight.T``. The layer applies capacity, dispatch, losses and statistics,
so a router only decides.

Shape legend: T tokens, D model dim, E experts, K choice slots per token.
"""

from __future__ import annotations

import difflib
import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from routelab.errors import ConfigError, check


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


class Router(nn.Module):
    """Base class. Class attributes say what a router needs and what it may be combined with."""

    learned = True  # has ``weight`` (E, D) and a gradient
    needs_token_ids = False  # hash routing looks at token ids, not at x
    whole_batch = False  # decisions depend on other tokens' positions -> refused in a causal model
    supports_selection_bias = False  # aux-loss-free balancing (DeepSeek-V3) adds a bias to selection
    own_capacity = False  # the router itself bounds tokens per expert (expert choice)
    soft = False  # returns a SoftRouting

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        if self.learned:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))
            self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        if self.learned:
            nn.init.normal_(self.weight, std=std if std is not None else 1.0 / math.sqrt(self.d_model))

    def logits(self, x: Tensor) -> Tensor:
        """x (T, D) -> (T, E) float32 logits = x @ weight.T."""
        return x.float() @ self.weight.float().t()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


def _select(logits: Tensor, bias: Tensor | None) -> Tensor:
    """Scores used only for *choosing* experts: logits + per-expert balancing bias (DeepSeek-V3)."""
    return logits if bias is None else logits + bias.to(logits.dtype)


class SwitchRouter(Router):
    """Switch Transformers (Fedus et al. 2021, eq. 1-2): top-1 of softmax(x W^T); gate = p_i(x)."""

    supports_selection_bias = True

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = _select(logits, selection_bias).argmax(-1, keepdim=True)  # (T, 1)
        return Routing(idx, probs.gather(1, idx), None, logits, probs, balance=True)


class TopKRouter(Router):
    """Top-k of softmax (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): gates renormalised over
    the k chosen experts (``renormalize=False`` keeps the raw probabilities)."""

    supports_selection_bias = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, renormalize: bool = True) -> None:
        check(1 <= top_k <= num_experts, "top_k", top_k, f"1 <= top_k <= num_experts={num_experts}")
        super().__init__(d_model, num_experts)
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = _select(logits, selection_bias).topk(self.top_k, dim=-1).indices  # (T, K)
        gates = probs.gather(1, idx)  # (T, K)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(idx, gates, None, logits, probs, balance=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, renormalize={self.renormalize}"


class GShardRouter(Router):
    """GShard (Lepikhin et al. 2020, Algorithm 1): top-2 with gates g1, g2 renormalised to sum to
    1; in training the second expert is used only with probability min(1, 2 * g2) (random
    routing); in eval both are used."""

    supports_selection_bias = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        check(top_k == 2, "top_k", top_k, "2 for the gshard router (it is top-2 by definition)")
        check(num_experts >= 2, "num_experts", num_experts, ">= 2 for the gshard router (top-2)")
        super().__init__(d_model, num_experts)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        idx = _select(logits, selection_bias).topk(2, dim=-1).indices  # (T, 2)
        p = probs.gather(1, idx)
        gates = p / p.sum(-1, keepdim=True)  # (T, 2): g1 + g2 = 1
        active = None
        if self.training:
            second = torch.rand(x.shape[0], device=x.device) < 2 * gates[:, 1].detach()  # (T,)
            active = torch.stack([torch.ones_like(second), second], dim=1)  # (T, 2)
        return Routing(idx, gates, active, logits, probs, balance=True)


class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", eq. 3-4): per
    token, the fewest experts (most probable first) whose probabilities sum to >= p, at most
    ``max_k``. Gates are the raw probabilities, as in the paper (``renormalize=True`` rescales them
    to sum to 1 over the chosen set)."""

    def __init__(
        self, d_model: int, num_experts: int, top_p: float = 0.4, max_k: int | None = None, renormalize: bool = False
    ) -> None:
        check(0.0 < top_p <= 1.0, "top_p", top_p, "0 < top_p <= 1")
        max_k = num_experts if max_k is None else max_k
        check(1 <= max_k <= num_experts, "max_k", max_k, f"1 <= max_k <= num_experts={num_experts}")
        super().__init__(d_model, num_experts)
        self.top_p, self.max_k, self.renormalize = top_p, max_k, renormalize

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        p_sorted, idx = probs.topk(self.max_k, dim=-1)  # (T, K) most probable first
        before = p_sorted.cumsum(-1) - p_sorted  # (T, K) mass of the experts ranked above
        active = before < self.top_p  # the first is always taken; stop once the mass reaches p
        gates = p_sorted * active
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(idx, gates, active, logits, probs, balance=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}, max_k={self.max_k}"


def balanced_hash_table(token_counts: Tensor, num_experts: int) -> Tensor:
    """The balanced-assignment hash of Roller et al. 2021 (Hash Layers): a table built from training
    token frequencies, taking tokens from most to least frequent and giving each to the expert with
    the smallest load (summed counts) so far (greedy longest-processing-time). Ties: lower token id first, then the
    expert with fewer ids, then the lower expert index, so the table is deterministic.

    token_counts (V,) -> table (V,) int64 of expert indices. Unseen tokens (count 0) are dealt
    round-robin over the experts with the fewest ids, so every expert keeps ~V/E ids.
    """
    counts = token_counts.detach().to("cpu", torch.float64).tolist()
    seen = sorted((t for t, c in enumerate(counts) if c > 0), key=lambda t: (-counts[t], t))
    table = [0] * len(counts)
    owned = [0] * num_experts
    heap = [(0.0, 0, e) for e in range(num_experts)]  # (load, ids owned, expert)
    for t in seen:
        load, n, e = heapq.heappop(heap)
        table[t], owned[e] = e, n + 1
        heapq.heappush(heap, (load + counts[t], n + 1, e))
    by_ids = [(n, e) for e, n in enumerate(owned)]  # unseen ids: to the experts owning the fewest
    heapq.heapify(by_ids)
    for t in (t for t, c in enumerate(counts) if c <= 0):
        n, e = heapq.heappop(by_ids)
        table[t] = e
        heapq.heappush(by_ids, (n + 1, e))
    return torch.tensor(table, dtype=torch.long)


class HashRouter(Router):
    """Hash Layers (Roller et al. 2021): expert = table[token_id], no learned router, gate 1.

    The table is a seeded random assignment of the vocabulary: a random permutation of the ids dealt
    round-robin to the experts, so every expert owns floor or ceil(V / E) ids (but not equal *load*:
    frequent tokens may share an expert). ``balance(token_counts)`` replaces it by the paper's
    frequency-balanced table (``ffn.hash_table: balanced`` does so from the training data). It is a
    buffer (saved with the model) so a checkpoint keeps its routing.
    """

    learned = False
    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, vocab_size: int | None = None, seed: int = 0) -> None:
        check(
            vocab_size is not None and vocab_size > 0,
            "vocab_size",
            vocab_size,
            "the vocabulary size (hash routing maps token ids)",
        )
        super().__init__(d_model, num_experts)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab_size, generator=g)
        table = torch.empty(vocab_size, dtype=torch.long)
        table[perm] = torch.arange(vocab_size) % num_experts
        self.register_buffer("table", table)  # (V,) expert of each token id

    @torch.no_grad()
    def balance(self, token_counts: Tensor) -> None:
        """Replace the random table by the frequency-balanced one (``balanced_hash_table``)."""
        if token_counts.shape != self.table.shape:
            raise ValueError(f"token_counts has shape {tuple(token_counts.shape)}; the table needs ({self.table.shape[0]},)")
        self.table.copy_(balanced_hash_table(token_counts, self.num_experts))

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError(
                "the hash router needs token_ids: call moe(x, token_ids=...) (Roller et al. route by token id)"
            )
        ids = token_ids.reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"token_ids has {ids.shape[0]} tokens but x has {x.shape[0]}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.table.shape[0]):
            raise ValueError(f"token ids must lie in 0..{self.table.shape[0] - 1} (the hash table's vocab_size)")
        idx = self.table[ids].unsqueeze(1)  # (T, 1)
        return Routing(idx, torch.ones(idx.shape, dtype=torch.float32, device=x.device))


class RandomRouter(Router):
    """THOR (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts"): in
    training each token goes to one uniformly random expert (gate 1); in eval the output is the
    mean of all experts (``eval_mode="mean"``) or one seeded random expert per token
    (``eval_mode="seeded"``, the same choices for every call with the same number of tokens).
    THOR's consistency regulariser between two sampled experts is not included."""

    learned = False

    def __init__(self, d_model: int, num_experts: int, eval_mode: str = "mean", seed: int = 0) -> None:
        check(eval_mode in ("mean", "seeded"), "random_eval", eval_mode, "'mean' or 'seeded'")
        super().__init__(d_model, num_experts)
        self.eval_mode, self.seed = eval_mode, seed

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if self.training:
            idx = torch.randint(E, (T, 1), device=x.device)
        elif self.eval_mode == "seeded":
            g = torch.Generator(device=x.device).manual_seed(self.seed)
            idx = torch.randint(E, (T, 1), device=x.device, generator=g)
        else:  # mean of all experts
            idx = torch.arange(E, device=x.device).expand(T, E)
            return Routing(idx, torch.full((T, E), 1.0 / E, device=x.device))
        return Routing(idx, torch.ones(T, 1, device=x.device))


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022, eq. 1): S = softmax(x W^T) over experts, then each expert
    takes its top-C tokens by score, C = ceil(capacity_factor * T / E); a token gets 0..E experts
    and its gates are its scores. It ranks all tokens of the batch, so a token's route depends on
    later tokens: refused in a causal model."""

    whole_batch = True
    own_capacity = True

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float | None = None) -> None:
        capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        check(capacity_factor > 0, "capacity_factor", capacity_factor, "a number > 0")
        super().__init__(d_model, num_experts)
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(-1)
        C = min(T, math.ceil(self.capacity_factor * T / E))
        top = probs.t().topk(C, dim=1).indices  # (E, C) tokens each expert takes
        active = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        active[top, torch.arange(E, device=x.device)[:, None]] = True  # (T, E)
        idx = torch.arange(E, device=x.device).expand(T, E)
        return Routing(idx, probs * active, active, logits, probs, balance=False)


class BaseRouter(Router):
    """BASE layers (Lewis et al. 2021): in training a balanced assignment, each expert taking
    exactly T/E tokens (floor or ceil when E does not divide T), maximising the total affinity
    sum_t x_t . w_{a(t)} (eq. 2); in eval greedy top-1. The expert output is scaled by
    sigmoid(x_t . w_a) (eq. 3). The affinities are the logits; no auxiliary loss is needed.

    Solver: the auction algorithm for assignment with identical slots (Bertsekas & Castanon 1989),
    run as a Jacobi auction (all unassigned tokens bid at once, one vectorised step per round) with
    epsilon scaling. A finished auction is within T * eps_final of the optimum; if ``max_rounds``
    runs out, remaining tokens are dealt to the free slots greedily, so loads are always exact.
    """

    whole_batch = False  # balancing mixes tokens only in training; eval is per-token greedy

    def __init__(self, d_model: int, num_experts: int, max_rounds: int = 200, eps_final: float = 1e-4) -> None:
        super().__init__(d_model, num_experts)
        self.max_rounds, self.eps_final = max_rounds, eps_final

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        if self.training and x.shape[0] > 0:
            idx = balanced_assignment(logits.detach(), self.max_rounds, self.eps_final).unsqueeze(1)  # (T, 1)
        else:
            idx = logits.argmax(-1, keepdim=True)
        gates = torch.sigmoid(logits.gather(1, idx))  # (T, 1) eq. 3
        return Routing(idx, gates, None, None, logits.softmax(-1), balance=False)  # no z-loss: sigmoid gates


@torch.no_grad()
def balanced_assignment(scores: Tensor, max_rounds: int = 200, eps_final: float = 1e-4) -> Tensor:
    """Assign each of T tokens to one of E experts, expert e taking exactly cap[e] tokens
    (cap = T // E, plus one for the first T % E experts), maximising sum_t scores[t, a(t)].

    Jacobi auction with epsilon scaling: unassigned tokens bid for their best expert at
    price + (best - second best net value) + eps; each expert keeps its cap[e] highest bids and its
    price becomes its lowest kept bid once full. Returns a (T,) long tensor.

    Shapes: T tokens, E experts.
    """
    T, E = scores.shape
    dev = scores.device
    cap = torch.full((E,), T // E, dtype=torch.long, device=dev)
    cap[: T % E] += 1
    if T < E:  # only the first T experts have a slot: solve among them
        E = T
        scores, cap = scores[:, :T], cap[:T]
    if E == 1:
        return torch.zeros(T, dtype=torch.long, device=dev)
    s = scores.double()
    spread = float(s.max() - s.min()) or 1.0
    eps = spread / 4
    owner = torch.full((T,), -1, dtype=torch.long, device=dev)  # expert holding each token
    bid = torch.zeros(T, dtype=torch.float64, device=dev)  # the token's winning bid
    price = torch.zeros(E, dtype=torch.float64, device=dev)
    rounds = 0
    while True:
        free = (owner < 0).nonzero().squeeze(1)  # (U,) unassigned tokens
        if free.numel() == 0:
            if eps <= eps_final:
                break
            eps = max(eps / 8, eps_final)  # epsilon scaling: re-open the auction with finer bids
            owner.fill_(-1)
            continue
        if rounds >= max_rounds:
            break
        rounds += 1
        value = s[free] - price  # (U, E) net value of each expert
        top2 = value.topk(2, dim=1)
        best = top2.indices[:, 0]
        bid_free = price[best] + top2.values[:, 0] - top2.values[:, 1] + eps  # (U,)
        owner[free] = best
        bid[free] = bid_free
        # each expert keeps its cap[e] highest bids: sort holders by (expert, -bid)
        held = (owner >= 0).nonzero().squeeze(1)
        key = bid[held]
        order = torch.argsort(-key, stable=True)
        order = order[torch.argsort(owner[held][order], stable=True)]  # by expert, then bid descending
        tok = held[order]
        exp = owner[tok]
        counts = torch.bincount(exp, minlength=E)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(tok.numel(), device=dev) - start[exp]
        owner[tok[rank >= cap[exp]]] = -1  # outbid
        full = counts >= cap  # a full expert stays full: an outbid token is replaced one for one
        last = (start + cap - 1).clamp(max=tok.numel() - 1)
        price = torch.where(full, bid[tok[last]], price)  # its lowest kept bid (prices only rise)
    free = (owner < 0).nonzero().squeeze(1)
    if free.numel():  # out of rounds: deal leftovers to free slots (exact loads, not optimal)
        left = cap - torch.bincount(owner[owner >= 0], minlength=E)
        slots = torch.repeat_interleave(torch.arange(E, device=dev), left)
        owner[free] = slots[: free.numel()]
    return owner


class SoftRouter(Router):
    """Soft MoE (Puigcerver et al. 2023, eq. 1-2): ``slots_per_expert`` slots per expert, each a
    softmax-over-tokens mix of the sequence (dispatch), each output token a softmax-over-slots mix
    of the slot outputs (combine). ``weight`` is (E * S, D), the slot parameters Phi. Every slot
    sees the whole sequence, so it is encoder only (refused in a causal model)."""

    whole_batch = True
    soft = True

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1) -> None:
        check(slots_per_expert >= 1, "slots_per_expert", slots_per_expert, "an integer >= 1")
        self.slots_per_expert = slots_per_expert
        super().__init__(d_model, num_experts)
        if slots_per_expert != 1:
            self.weight = nn.Parameter(torch.empty(num_experts * slots_per_expert, d_model))
            self.reset_parameters()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> SoftRouting:
        """x (B, T, D), padding_mask (B, T) True = padding -> SoftRouting."""
        logits = x.float() @ self.weight.float().t()  # (B, T, E*S)
        to_slots = logits
        if padding_mask is not None:
            to_slots = logits.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        dispatch = to_slots.softmax(dim=1).nan_to_num(0.0)  # (B, T, E*S) over tokens (an all-padding row -> 0)
        combine = logits.softmax(dim=-1)  # (B, T, E*S) over slots
        return SoftRouting(dispatch, combine, logits)


ROUTERS: dict[str, type[Router]] = {
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "topk": TopKRouter,
    "topp": TopPRouter,
    "hash": HashRouter,
    "random": RandomRouter,
    "expert_choice": ExpertChoiceRouter,
    "base": BaseRouter,
    "soft": SoftRouter,
}


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; an unknown name lists the known ones."""
    if name not in ROUTERS:
        hint = difflib.get_close_matches(str(name), list(ROUTERS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"unknown router {name!r}{did_you_mean}; known routers: {', '.join(ROUTERS)}")
    return ROUTERS[name]
