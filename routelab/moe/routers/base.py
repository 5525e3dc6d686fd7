"""BASE layers (Lewis et al. 2021): in training a balanced assignment, each expert taking exactly
T/E tokens (floor or ceil when E does not divide T), maximising the total affinity
sum_t x_t . w_{a(t)} (eq. 2); in eval greedy top-1. The expert output is scaled by
sigmoid(x_t . w_a) (eq. 3). The affinities are the logits; no auxiliary loss is needed.

Solver (``auction_assignment``): the auction algorithm for assignment with identical slots
(Bertsekas & Castanon 1989), run as a Jacobi auction (all unassigned tokens bid at once, one
vectorised step per round) with epsilon scaling. A finished auction is within T * eps_final of the
optimum; if ``max_rounds`` runs out, remaining tokens are dealt to the free slots greedily, so loads
are always exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.errors import check, qualified
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class BaseRouterConfig(RouterConfig):
    kind: str = "base"
    max_rounds: int = 200  # auction rounds before the leftovers are dealt greedily
    eps_final: float = 1e-4  # the auction's final bid increment: within T * eps_final of the optimum

    def __post_init__(self) -> None:
        check(self.max_rounds >= 1, qualified(self, "max_rounds"), self.max_rounds, "an integer >= 1")
        check(self.eps_final > 0, qualified(self, "eps_final"), self.eps_final, "a number > 0")


@ROUTERS.register("base", BaseRouterConfig)
class BaseRouter(Router):
    whole_batch = False  # balancing mixes tokens only in training; eval is per-token greedy

    def experts_per_token(self, seq_len: int) -> float:
        return 1.0

    def forward(self, x: Tensor, token_ids: Tensor | None = None, selection_bias: Tensor | None = None) -> Routing:
        logits = self.logits(x)  # (T, E)
        if self.training and x.shape[0] > 0:
            o = self.options
            idx = auction_assignment(logits.detach(), o.max_rounds, o.eps_final).unsqueeze(1)  # (T, 1)
        else:
            idx = logits.argmax(-1, keepdim=True)
        gates = torch.sigmoid(logits.gather(1, idx))  # (T, 1) eq. 3
        return Routing(idx, gates, None, None, logits.softmax(-1), balance=False)  # no z-loss: sigmoid gates


@torch.no_grad()
def auction_assignment(scores: Tensor, max_rounds: int = 200, eps_final: float = 1e-4) -> Tensor:
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
