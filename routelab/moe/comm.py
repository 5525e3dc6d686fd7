"""What expert parallelism costs in communication, counted per MoE layer on each rank.

Every ``all_to_all_single`` of ``routelab.moe.parallel`` adds what it hands to *other* ranks (rows
kept on this rank move no data) and the time it took; the layer adds its routing (pairs, how many
stay local, how many ranks each token reaches) and its expert compute time. A token travels once to
each rank holding one of its experts (one row per (token, rank)). With N pairs and U rows sent by
this rank, M pairs and R rows received, n pairs and u rows its own, D model dim and b bytes per
element, one MoE layer's training step sends

    sent_bytes = 16 (P - 1)                      the counts (rows and pairs per destination, int64)
               + 2 ((U - u) + (R - u)) D b       rows out and results back, forward and backward
               + (N - n) (8 + b)                 the pairs' (row, local expert) as int32, and gates
               + (M - n) b                       the gates' gradients, backward

Times are wall-clock seconds on this rank: ``a2a_s`` inside the exchanges (forward and backward,
waiting for the slowest peer included), ``expert_s`` in the local experts (forward, and backward
measured between the two backward exchanges). On CUDA the clock is read after a synchronize, which
makes the counted steps slower than uncounted ones; on CPU (gloo) the exchanges are blocking anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def now(device: torch.device) -> float:
    """Wall-clock seconds, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class CommCounters:
    """Totals since the last ``take`` for one MoE layer on this rank."""

    tokens: int = 0  # tokens routed by this rank
    pairs: int = 0  # (token, expert) pairs they were sent as
    local_pairs: int = 0  # of them, pairs whose expert is on this rank
    ranks: int = 0  # sum over tokens of the distinct ranks its pairs went to
    max_ranks: int = 0  # the most ranks one token went to
    sent_tokens: int = 0  # token rows sent to other ranks by the forward dispatch (one per (token, rank))
    sent_bytes: int = 0  # bytes handed to other ranks by every exchange, forward and backward
    exchanges: int = 0  # all_to_all_single calls
    a2a_s: float = 0.0
    expert_s: float = 0.0
    backward_mark: float | None = None  # when the combine exchange's backward ended (the experts' backward starts)

    def route(self, dest: Tensor, active: Tensor | None) -> None:
        """Count the routing of T tokens: ``dest`` (T, K) the rank of each slot's expert, ``active``
        (T, K) which slots are used (None: all)."""
        T, K = dest.shape
        d = dest if active is None else torch.where(active, dest, -1)
        s = d.sort(dim=1).values  # (T, K): -1 (unused) first
        distinct = (s[:, :1] >= 0).sum(1) + ((s[:, 1:] != s[:, :-1]) & (s[:, 1:] >= 0)).sum(1)  # (T,)
        self.tokens += T
        self.ranks += int(distinct.sum())
        self.max_ranks = max(self.max_ranks, int(distinct.max()) if T else 0)

    def exchange(self, rows: int, own_rows: int, row_bytes: int, seconds: float) -> None:
        """One all-to-all: ``rows`` handed to it, ``own_rows`` of them to this rank itself."""
        self.sent_bytes += (rows - own_rows) * row_bytes
        self.exchanges += 1
        self.a2a_s += seconds

    def take(self) -> dict[str, float]:
        """The totals as statistics (see ``STATS``), and a fresh start."""
        out = {
            "a2a_sent_tokens": float(self.sent_tokens),
            "a2a_sent_bytes": float(self.sent_bytes),
            "local_fraction": self.local_pairs / self.pairs if self.pairs else 1.0,
            "ranks_per_token": self.ranks / self.tokens if self.tokens else 0.0,
            "max_ranks_per_token": float(self.max_ranks),
            "a2a_s": self.a2a_s,
            "expert_s": self.expert_s,
        }
        for f in fields(self):
            setattr(self, f.name, f.default)
        return out


STATS = {  # statistic -> what it means (per MoE layer, per training step, each rank, averaged over ranks)
    "a2a_sent_tokens": "tokens sent to other ranks by the forward dispatch (a token once per rank it reaches)",
    "a2a_sent_bytes": "bytes sent to other ranks by all exchanges of the step, forward and backward",
    "local_fraction": "fraction of (token, expert) pairs whose expert is on the token's own rank",
    "ranks_per_token": "mean number of ranks a token's chosen experts sit on",
    "max_ranks_per_token": "the most ranks one token was sent to",
    "a2a_s": "seconds inside all_to_all_single (forward and backward)",
    "expert_s": "seconds in the local experts (forward and backward)",
}

AVERAGED = ("local_fraction", "ranks_per_token")  # fractions and means: averaged over layers and steps


def over_layers(per_layer: list[dict[str, float]]) -> dict[str, float]:
    """One step's statistics of all MoE layers together: volumes and times summed, fractions
    averaged, the largest maximum."""
    out = {}
    for key in STATS:
        values = [s[key] for s in per_layer]
        out[key] = max(values) if key.startswith("max_") else sum(values) / (len(values) if key in AVERAGED else 1)
    return out


def run_summary(totals: dict[str, float]) -> dict[str, float]:
    """``summary.json``'s ``communication``, from the run's per-step sums (``over_layers`` of every
    step added up, with ``steps`` and ``step_s``, the training seconds of those steps)."""
    steps, step_s = totals["steps"], totals["step_s"]
    out = {f"{k}_per_step": totals[k] / steps for k in ("a2a_sent_bytes", "a2a_sent_tokens", "a2a_s", "expert_s")}
    out.update({k: totals[k] / steps for k in AVERAGED})
    out["max_ranks_per_token"] = totals["max_ranks_per_token"]
    out["a2a_share"] = totals["a2a_s"] / step_s if step_s else 0.0
    out["expert_share"] = totals["expert_s"] / step_s if step_s else 0.0
    return out


def add_step(totals: dict[str, float], step: dict[str, float], step_s: float) -> None:
    """Add one step's ``over_layers`` statistics to the run's sums (a JSON-able dict, kept in checkpoints)."""
    for key, value in step.items():
        totals[key] = max(totals.get(key, 0.0), value) if key.startswith("max_") else totals.get(key, 0.0) + value
    totals["steps"] = totals.get("steps", 0) + 1
    totals["step_s"] = totals.get("step_s", 0.0) + step_s
