"""Training batches as pure functions of ``(seed, step, micro)``: the micro-batches of an update, the
tasks of a multi-task micro-batch, the seeding of a run, and the token counts some routers fit to.

Resumption is exact because nothing here keeps state between calls except caches (``perms``: epoch
permutations and the multi-task draw counter), which are themselves pure functions of the seed.
The trainer (``routelab.train``) calls these; they know nothing of it: a distributed run hands in
anything with ``share(global_rows) -> slice`` (``routelab.train.distributed.DistContext``).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch

from routelab.config import Config
from routelab.data.classification import ClassificationData, classification_batch
from routelab.data.corpus import LMData, sample_lm_batch
from routelab.data.multitask import MultiTaskData, TaskCounter, task_probabilities


class RowShare(Protocol):
    """This process's rows of a global batch (``routelab.train.distributed.DistContext.share``)."""

    def share(self, global_rows: int, what: str = ...) -> slice: ...


def token_counts(data: LMData | ClassificationData | MultiTaskData, vocab_size: int) -> torch.Tensor:
    """(V,) occurrences of each token id in the training split (LM stream or classification examples;
    summed over the tasks of a multi-task run)."""
    if isinstance(data, MultiTaskData):
        return sum(token_counts(d, vocab_size) for d in data.tasks)
    train = data.train
    ids = train if isinstance(train, torch.Tensor) else torch.tensor([t for ids, _ in train for t in ids], dtype=torch.long)
    return torch.bincount(ids.reshape(-1).cpu(), minlength=vocab_size)[:vocab_size]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_seed(seed: int, index: int) -> int:
    """A 64-bit seed for micro-batch ``index`` of run seed ``seed`` (NumPy ``SeedSequence`` mixing,
    so nearby (seed, index) pairs give unrelated streams)."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0])


def micro_batch(
    cfg: Config, data: LMData | ClassificationData, step: int, micro: int, perms: dict, ctx: RowShare | None = None
) -> dict[str, torch.Tensor]:
    """This rank's rows of micro-batch ``micro`` of update ``step`` (1-based): a pure function of
    (seed, step, micro, rank, world size); the global micro-batch is the same whatever the world size.

    Returns:
        ``input_ids`` (b, T) and ``labels`` ((b, T) for LM and token classification, (b,) for
        classification), plus ``attention_mask`` (b, T) for classification; b = batch_size / world size. ``perms`` caches
        epoch permutations.
    """
    t = cfg.train
    rows = ctx.share(t.batch_size) if ctx is not None else slice(0, t.batch_size)  # one process: every row
    index = (step - 1) * t.grad_accum + micro  # global micro-batch number, from 0
    if isinstance(data, MultiTaskData):
        parts = task_batches(cfg, data, index, perms, rows)
        if len(parts) != 1:
            raise ValueError("micro_batch: data.task_mixing=batch gives one batch per task; use task_batches")
        return parts[0][2]
    if isinstance(data, LMData):
        gen = torch.Generator().manual_seed(batch_seed(t.seed, index))
        x = sample_lm_batch(data.train, t.batch_size, cfg.data.seq_len, gen)[rows]  # (b, T) of the global (B, T)
        return {"input_ids": x, "labels": x}  # the model shifts labels inside
    examples = classification_batch(data.train, t.batch_size, t.seed, index, perms)[rows]
    return data.collate(examples, cfg.data.seq_len, cfg.data.truncate)  # per-token labels for TokenClassificationData


def task_seed(seed: int, task: int) -> int:
    """The seed of task ``task``'s own batch stream (unrelated streams for different tasks)."""
    return batch_seed(seed, 2**40 + task) % 2**31  # small: epoch_permutation multiplies it by 1_000_003


def task_batches(
    cfg: Config, data: MultiTaskData, index: int, perms: dict, rows: Any = slice(None)
) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
    """Micro-batch ``index`` (global, from 0) of a multi-task run: ``(task, share of the rows, batch)``
    for each task in it, the batch holding ``task_ids`` (b,) beside the usual tensors.

    ``step`` mixing: one task per micro-batch, its ``k``-th own batch where ``k`` counts the earlier
    micro-batches that drew it. ``batch`` mixing: each of the ``batch_size`` rows draws its task; a
    task's rows continue its own sequence of examples (``k`` counts its earlier rows). Both are pure
    functions of ``(seed, index)`` (``routelab.data.multitask``)."""
    t, d = cfg.train, cfg.data
    step_mixing = d.task_mixing == "step"
    drawn, counts = _task_counter(cfg, data, perms).before(index)
    parts = []
    for task in sorted(set(drawn.tolist())):
        n = t.batch_size if step_mixing else int((drawn == task).sum())
        batch = _task_batch(cfg, data, task, n, index, int(counts[task]), perms, rows)
        batch["task_ids"] = torch.full((batch["input_ids"].shape[0],), task, dtype=torch.long)
        parts.append((task, n / t.batch_size, batch))
    return parts


def _task_counter(cfg: Config, data: MultiTaskData, perms: dict) -> TaskCounter:
    """The run's task draws (built once, then cached in ``perms``)."""
    counter = perms.get("task_counter")
    if counter is None:
        d, t = cfg.data, cfg.train
        weights = [task.sampling_weight for task in d.tasks] if d.tasks[0].sampling_weight is not None else None
        probs = task_probabilities(data.sizes(), d.task_temperature, weights)
        counter = perms["task_counter"] = TaskCounter(probs, t.seed, 1 if d.task_mixing == "step" else t.batch_size)
    return counter


def _task_batch(
    cfg: Config, data: MultiTaskData, task: int, n: int, index: int, count: int, perms: dict, rows: Any
) -> dict[str, torch.Tensor]:
    """``n`` rows of task ``task`` (this rank's ``rows`` of them); ``count`` is how many micro-batches
    (``step`` mixing) or rows (``batch`` mixing) drew the task before micro-batch ``index``."""
    step_mixing = cfg.data.task_mixing == "step"
    task_cfg, task_data, seed = cfg.data.task_config(task), data.tasks[task], task_seed(cfg.train.seed, task)
    cache = perms.setdefault(("task", task), {})
    if isinstance(task_data, LMData):
        gen = torch.Generator().manual_seed(batch_seed(seed, count if step_mixing else index))
        x = sample_lm_batch(task_data.train, n, task_cfg.seq_len, gen)[rows]  # (b, T)
        return {"input_ids": x, "labels": x}
    if step_mixing:
        examples = classification_batch(task_data.train, n, seed, count, cache)[rows]
    else:  # positions count .. count + n - 1 of the task's endless epoch order
        examples = [classification_batch(task_data.train, 1, seed, count + r, cache)[0] for r in range(n)]
    return task_data.collate(examples, task_cfg.seq_len, task_cfg.truncate)

