"""Hash Layers (Roller et al. 2021): the expert of a token is a fixed function of its id,
expert = table[token_id], with gate 1 and no learned router.

``table: random`` is a seeded random assignment of the vocabulary: a random permutation of the ids
dealt round-robin to the experts, so every expert owns floor or ceil(V / E) ids (but not equal
*load*: frequent tokens may share an expert). ``table: balanced`` is the paper's frequency-balanced
table, built from the training tokens when a run starts (``prepare``, ``balanced_hash_table``). The table is a
buffer, saved with the model, so a checkpoint keeps its routing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from routelab.errors import check
from routelab.moe.routers.router import Router, Routing
from routelab.options import RouterConfig
from routelab.registry import ROUTERS


@dataclass
class HashRouterConfig(RouterConfig):
    kind: str = "hash"
    seed: int = 0  # seeds the random table
    table: Literal["random", "balanced"] = "random"  # balanced: by training-token frequency, built at the start of a run


@ROUTERS.register("hash", HashRouterConfig)
class HashRouter(Router):
    learned = False
    needs_token_ids = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        V = self.vocab_size
        g = torch.Generator().manual_seed(self.options.seed)
        perm = torch.randperm(V, generator=g)
        table = torch.empty(V, dtype=torch.long)
        table[perm] = torch.arange(V) % self.num_experts
        self.register_buffer("table", table)  # (V,) expert of each token id

    def check(self) -> None:
        V = self.vocab_size
        check(V is not None and V > 0, "vocab_size", V, "the vocabulary size (hash routing maps token ids)")

    def experts_per_token(self, seq_len: int) -> float:
        return 1.0

    def prepare(self, token_counts: Callable[[], Tensor]) -> bool:
        """``table: balanced``: build the frequency-balanced table from the training tokens."""
        if self.options.table != "balanced":
            return False
        self.balance(token_counts().to(self.table.device))
        return True

    @torch.no_grad()
    def balance(self, token_counts: Tensor) -> None:
        """Replace the table by the frequency-balanced one (``balanced_hash_table``)."""
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


def balanced_hash_table(token_counts: Tensor, num_experts: int) -> Tensor:
    """The balanced-assignment hash of Roller et al. 2021 (Hash Layers): a table built from training
    token frequencies, taking tokens from most to least frequent and giving each to the expert with
    the smallest load (summed counts) so far (greedy longest-processing-time). Ties: lower token id
    first, then the expert with fewer ids, then the lower expert index, so the table is deterministic.

    token_counts (V,) -> table (V,) int64 of expert indices. Unseen tokens (count 0) are dealt
    round-robin over the experts with the fewest ids, so every expert keeps ~V/E ids.

    A greedy heap over Python numbers, so the counts are read on the host once (when a run starts);
    the table comes back on the counts' device, where the router's buffer and its lookups live.
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
    return torch.tensor(table, dtype=torch.long, device=token_counts.device)
