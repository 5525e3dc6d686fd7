"""Several tasks in one run: their data side by side, and which task each batch (or row) serves.

Tasks are drawn with temperature-scaled sampling over their training sizes (as in multilingual
pre-training, Arivazhagan et al. 2019; Conneau et al. 2020):

    p_i = n_i^(1/T) / sum_j n_j^(1/T)

T = 1 samples in proportion to size, T -> inf uniformly. Given sampling weights w_i replace it:
p_i = w_i / sum_j w_j. A task's size n_i is its number of training examples (classification) or of
non-overlapping ``seq_len`` windows in its token stream (LM).

Every draw is a pure function of ``(seed, index)`` (the global micro-batch number), so a resumed run
sees the same tasks; a task's own batches are numbered by how often it was drawn before (``TaskCounter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from routelab.data.classification import ClassificationData
from routelab.data.corpus import LMData

TASK_STREAM = 0x7A5C  # a third SeedSequence word: task draws never share a stream with batch contents


@dataclass
class MultiTaskData:
    """The data of every task of a run, in ``data.tasks`` order, sharing one tokenizer."""

    names: list[str]
    tasks: list[LMData | ClassificationData]
    seq_lens: list[int]  # each task's data.seq_len (LM windows, classification input bound)

    @property
    def tokenizer(self) -> Any:
        return self.tasks[0].tokenizer

    def sizes(self) -> list[int]:
        """Training size of each task: examples, or ``seq_len`` windows of an LM stream."""
        return [
            max(1, d.train.numel() // s) if isinstance(d, LMData) else len(d.train) for d, s in zip(self.tasks, self.seq_lens)
        ]


def task_probabilities(sizes: Sequence[int], temperature: float = 1.0, weights: Sequence[float] | None = None) -> np.ndarray:
    """(K,) sampling probability of each task: ``weights`` normalised, or sizes^(1/T) normalised."""
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
    else:
        w = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    if not (w > 0).all() or not np.isfinite(w).all():
        raise ValueError(f"task weights must be finite and > 0, got {w.tolist()}")
    return w / w.sum()


def draw_tasks(probs: np.ndarray, seed: int, index: int, rows: int) -> np.ndarray:
    """(rows,) task ids for micro-batch ``index``: ``rows`` = 1 for step mixing, the batch size for
    batch mixing. A pure function of ``(seed, index)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, index, TASK_STREAM]))
    return rng.choice(len(probs), size=rows, p=probs)


class TaskCounter:
    """How many micro-batches before ``index`` drew each task: the number of a task's own next batch.

    Counted from 0 on first use (a resumed run recounts the same draws) and then incrementally, so
    consecutive indices cost one draw each."""

    def __init__(self, probs: np.ndarray, seed: int, rows: int) -> None:
        self.probs, self.seed, self.rows = probs, seed, rows
        self.next_index = 0
        self.counts = np.zeros(len(probs), dtype=np.int64)

    def before(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(draws of ``index`` (rows,), per-task count of earlier micro-batches that drew each task (K,))."""
        if index < self.next_index:  # an earlier index: recount from the start
            self.next_index, self.counts = 0, np.zeros_like(self.counts)
        while self.next_index < index:
            drawn = draw_tasks(self.probs, self.seed, self.next_index, self.rows)
            self.counts[np.unique(drawn)] += 1
            self.next_index += 1
        return draw_tasks(self.probs, self.seed, index, self.rows), self.counts.copy()
