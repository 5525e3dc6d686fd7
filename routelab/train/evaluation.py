"""Evaluation of a model on a data split: LM loss and bits per byte, or classification accuracy
(per example, or per scored token for token classification).

Bits per byte (as in Gao et al. 2020, The Pile) makes LMs with different tokenizers comparable:

    bpb = (mean nats per token / ln 2) * (tokens in the split / UTF-8 bytes in the split)

Evaluation runs in ``eval()`` mode under ``no_grad`` and inside ``torch.random.fork_rng``, so it
never moves the training RNG: a run evaluated at different steps trains identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from routelab.config import Config
from routelab.data import (
    IGNORE_INDEX,
    ClassificationData,
    LMData,
    MultiTaskData,
    TokenClassificationData,
    classification_eval_batches,
    lm_eval_batches,
)
from routelab.device import device_of, to_device
from routelab.precision import autocast
from routelab.train.distributed import DistContext
from routelab.train.fsdp import is_sharded


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: LMData | ClassificationData,
    cfg: Config,
    split: str = "val",
    max_batches: int | None = None,
    ctx: DistContext | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``split`` of ``data``.

    Args:
        split: 'val' or 'train' (LM); 'val', 'test' or 'train' (classification).
        max_batches: batches of ``cfg.train.batch_size`` to score; None = ``cfg.train.eval_batches``,
            0 = the whole split.
        ctx: in a distributed run, each rank scores every world_size-th batch and the sums are
            all-reduced: every rank gets the result of the whole evaluation.
        precision: the forward pass's autocast dtype ('fp32', 'bf16', 'fp16'; ``routelab.precision``);
            None = ``cfg.train.precision``, the one the model trained in.

    Returns:
        LM: ``{"loss", "bpb" (val only), "tokens"}``; classification: ``{"loss", "accuracy", "examples"}``;
        token classification: ``{"loss", "accuracy", "examples", "tokens"}`` with loss and accuracy
        over the scored tokens (``tokens``; padding and -100 labels skipped). Multi-task:
        ``{"loss": mean of the tasks' losses, "tasks": {name: that task's result}}``; a task without
        ``split`` (an LM has no test split) is left out.
        ``loss`` is the task loss in nats (auxiliary routing losses excluded).
    """
    if max_batches is None:
        max_batches = cfg.train.eval_batches
    device = device_of(model)
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), autocast(device, precision or cfg.train.precision):
            ctx = ctx or DistContext()
            if isinstance(data, MultiTaskData):
                return _evaluate_tasks(model, data, cfg, split, max_batches, device, ctx)
            if isinstance(data, LMData):
                return _evaluate_lm(model, data, cfg, split, max_batches, device, ctx)
            if isinstance(data, ClassificationData):
                return _evaluate_classification(model, data, cfg, split, max_batches, device, ctx)
            raise TypeError(f"cannot evaluate on {type(data).__name__}; expected LMData or ClassificationData")
    finally:
        model.train(was_training)


def _evaluate_lm(model, data: LMData, cfg: Config, split: str, max_batches: int, device, ctx: DistContext) -> dict[str, Any]:
    splits = {"train": data.train, "val": data.val}
    if split not in splits:
        raise ValueError(f"LM data has no split {split!r}; allowed: {', '.join(splits)}")
    total_nats, total_tokens = 0.0, 0
    batches = lm_eval_batches(splits[split], cfg.train.batch_size, cfg.data.seq_len, max_batches)
    i, x = -1, None
    for i, x in enumerate(batches):  # (b, T)
        if i % ctx.world_size != ctx.rank:  # this rank's share of the batches
            continue
        x = x.to(device)
        out = model(x, labels=x)
        n = x.shape[0] * (x.shape[1] - 1)  # predicted positions: t predicts t + 1
        total_nats += out.task_loss.item() * n
        total_tokens += n
    if _short_of_a_batch(model, i + 1, ctx):
        model(x.to(device), labels=x.to(device))
    total_nats, total_tokens = ctx.sum([total_nats, total_tokens], device)
    total_tokens = int(total_tokens)
    loss = total_nats / total_tokens
    result: dict[str, Any] = {"loss": loss}
    if split == "val":
        result["bpb"] = bits_per_byte(loss, data.val_tokens, data.val_bytes)
    result["tokens"] = total_tokens
    return result


class _TaskView:
    """A multi-task model called as task ``task`` alone (each call gets ``task_ids``)."""

    def __init__(self, model: nn.Module, task: int) -> None:
        self.model, self.task = model, task

    def __call__(self, input_ids, **kwargs):
        task_ids = torch.full((input_ids.shape[0],), self.task, dtype=torch.long, device=input_ids.device)
        return self.model(input_ids, task_ids=task_ids, **kwargs)


def _evaluate_tasks(model, data: MultiTaskData, cfg: Config, split: str, max_batches: int, device, ctx: DistContext) -> dict[str, Any]:
    """Each task on its own (its data section, its head), exactly as a single-task evaluation."""
    results = {}
    for i, (name, task_data) in enumerate(zip(data.names, data.tasks)):
        if split == "test" and isinstance(task_data, LMData):
            continue
        view = _TaskConfigView(cfg.data.task_config(i), cfg.train)
        run = _evaluate_lm if isinstance(task_data, LMData) else _evaluate_classification
        results[name] = run(_TaskView(model, i), task_data, view, split, max_batches, device, ctx)
    if not results:
        raise ValueError(f"no task has a {split!r} split")
    return {"loss": sum(r["loss"] for r in results.values()) / len(results), "tasks": results}


class _TaskConfigView:
    """What evaluation reads of a config (``data``, ``train``), with one task's data section."""

    def __init__(self, data, train) -> None:
        self.data, self.train = data, train


def _short_of_a_batch(model: nn.Module, batches: int, ctx: DistContext) -> bool:
    """Whether this rank must run one more forward, whose result it drops, so that every rank runs as
    many as the others: a sharded model (``train.data_parallel: fsdp``) all-gathers its weights in each
    forward, a collective every rank joins, and rank r scored every world_size-th of ``batches``."""
    return is_sharded(model) and batches % ctx.world_size != 0 and ctx.rank >= batches % ctx.world_size


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Mean nats per token -> bits per UTF-8 byte, for a split of ``tokens`` tokens and ``n_bytes`` bytes."""
    return loss_nats / math.log(2) * tokens / n_bytes


def _evaluate_classification(
    model, data: ClassificationData, cfg: Config, split: str, max_batches: int, device, ctx: DistContext
) -> dict[str, Any]:
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if split not in splits:
        raise ValueError(f"classification data has no split {split!r}; allowed: {', '.join(splits)}")
    examples = splits[split]
    if not examples:
        raise ValueError(f"the {split!r} split is empty")
    total_nats, correct, seen, n_examples = 0.0, 0, 0, 0
    count, last = 0, None
    for i, batch in enumerate(classification_eval_batches(examples, cfg.train.batch_size)):
        if max_batches and i >= max_batches:
            break
        count, last = i + 1, batch
        if i % ctx.world_size != ctx.rank:  # this rank's share of the batches
            continue
        b = to_device(data.collate(batch, cfg.data.seq_len, cfg.data.truncate), device)
        labels = b["labels"]  # (B,) or, per token, (B, T)
        out = model(b["input_ids"], labels=labels, attention_mask=b["attention_mask"])
        scored = labels != IGNORE_INDEX  # the positions the loss averages over
        n = int(scored.sum())
        if n:  # a batch without a scored token has a NaN mean loss and adds nothing
            total_nats += out.task_loss.item() * n
        correct += int(((out.logits.argmax(-1) == labels) & scored).sum())
        seen += n
        n_examples += len(batch)
    if _short_of_a_batch(model, count, ctx):
        b = to_device(data.collate(last, cfg.data.seq_len, cfg.data.truncate), device)
        model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
    total_nats, correct, seen, n_examples = ctx.sum([total_nats, correct, seen, n_examples], device)
    if not seen:
        raise ValueError(f"the {split!r} split has no scored labels (all are {IGNORE_INDEX})")
    result = {"loss": total_nats / seen, "accuracy": correct / seen, "examples": int(n_examples)}
    if isinstance(data, TokenClassificationData):
        result["tokens"] = int(seen)
    return result
