"""One optimizer update: ``train_step`` runs ``grad_accum`` forward/backward passes, measures and
clips the gradient, applies AdamW (or skips a non-finite update) and reports what happened.

One update (``step``, 1-based) = ``grad_accum`` micro-batches of ``batch_size`` sequences; each
micro-batch loss is divided by ``grad_accum`` so the gradient is that of their mean. Multi-task runs
weight each task's loss by its ``loss_weight`` and, with ``data.task_mixing: batch``, by its share of
the rows (one forward per task present).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from routelab.config import Config
from routelab.data import ClassificationData, LMData, MultiTaskData
from routelab.data.batches import micro_batch, task_batches
from routelab.moe.comm import STATS, over_layers
from routelab.precision import autocast, grad_scaler
from routelab.train.device import to_device
from routelab.train.distill import DistillOutput
from routelab.train.distributed import DistContext
from routelab.train.fsdp import full_norm, is_sharded
from routelab.train.metrics import flatten_routing, mean_records, moe_grad_norms
from routelab.train.run import RunError
from routelab.train.schedule import lr_at
from routelab.train.sharded import ShardedExperts


class NonFiniteError(RunError):
    """The loss or gradient became NaN or infinite (and ``train.skip_nonfinite`` is off, or it kept happening)."""


@dataclass
class Accumulated:
    """What the micro-batches of one update add up to (on this rank), before any averaging."""

    totals: torch.Tensor  # (3,): loss, task_loss, aux_loss summed over micro-batches
    tokens: int = 0  # non-padding input tokens
    routing: list[dict[str, Any]] = field(default_factory=list)  # flattened routing stats, one per forward
    distill: dict[str, Any] = field(default_factory=dict)  # kd_loss, hidden_loss, teacher_s summed
    per_task: dict[str, list[float]] = field(default_factory=dict)  # multi-task: each task's task loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    data: LMData | ClassificationData,
    step: int,
    perms: dict,
    device: torch.device,
    ctx: DistContext | None = None,
    experts: ShardedExperts | None = None,
    scaler: torch.amp.GradScaler | None = None,
    sample: Callable[..., dict[str, torch.Tensor]] = micro_batch,
) -> dict[str, Any]:
    """Run update ``step``: ``grad_accum`` forward/backward passes, clip, AdamW step, zero grads.

    Forward passes run under ``train.precision``'s autocast (``routelab.precision``); backward runs
    outside it, on the float32 weights. ``scaler`` (fp16): the loss is scaled before backward and
    the gradients unscaled before clipping; a step whose gradients overflowed is skipped (``skipped``
    and ``overflow`` True, no error) while the scale backs off.

    In a distributed run ``model`` is the ``DistributedDataParallel`` wrapper: gradients are
    averaged once per update (not per micro-batch), and the reported losses, tokens and routing
    statistics are over all ranks, so every rank takes the same decisions.

    A non-finite loss or gradient norm raises ``NonFiniteError`` before the update is applied, or
    with ``train.skip_nonfinite`` the update is dropped and ``skipped`` is True.

    ``sample`` draws a single-task micro-batch (``routelab.data.batches.micro_batch``'s signature);
    the loop in ``routelab.train.trainer`` passes the one named there.

    Returns:
        ``skipped``, ``loss``, ``task_loss``, ``aux_loss`` (means over micro-batches), ``lr``,
        ``grad_norm`` (before clipping), ``router_grad_norm`` and ``expert_grad_norm`` (MoE models
        outside expert parallelism: the norms of all routers' and all experts' gradients), ``tokens`` (non-padding input tokens), ``overflow`` (fp16: the
        step's scaled gradients overflowed), ``loss_scale`` (fp16 only) and flattened routing stats;
        with distillation (``model`` a ``Distiller``) also ``kd_loss``, ``hidden_loss`` (means) and
        ``teacher_s`` (seconds in the teacher this update, mean over ranks);
        under expert parallelism the routing stats include each MoE layer's communication
        (``routelab.moe.comm.STATS``) and ``communication`` holds them over all layers.
    """
    t = cfg.train
    ctx = ctx or DistContext()
    scaler = scaler or grad_scaler(device, "fp32")  # disabled: scale/unscale_/step/update pass through
    lr = set_lr(optimizer, step, cfg)
    if experts is not None:
        experts.communication()  # count this update only (not an evaluation since the last one)
    acc = accumulate(model, cfg, data, step, perms, device, ctx, scaler, sample)
    grad_norm = clip_gradients(optimizer, scaler, experts, t.grad_clip)
    moe_norms = moe_grad_norms(model) if experts is None else {}  # before the update, after clipping
    loss, task_loss, aux_loss = ctx.mean((acc.totals / t.grad_accum).tolist(), device)
    tokens = int(ctx.sum([acc.tokens], device)[0])
    distill = distill_means(acc.distill, t.grad_accum, ctx, device)
    skipped, overflow = apply_update(optimizer, scaler, cfg, step, loss, grad_norm)
    return {
        "skipped": skipped,
        "overflow": overflow,
        **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
        "loss": loss,
        "task_loss": task_loss,
        "aux_loss": aux_loss,
        "lr": lr,
        "grad_norm": float(grad_norm),
        **moe_norms,
        "tokens": tokens,
        **{f"train/{name}/loss": sum(v) / len(v) for name, v in acc.per_task.items()},
        **distill,
        **routing_stats(acc.routing, experts, ctx, device),
    }


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    """Set every parameter group's learning rate for ``step`` (times the group's ``lr_scale``); returns the base."""
    lr = lr_at(step, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def accumulate(
    model: nn.Module,
    cfg: Config,
    data: LMData | ClassificationData | MultiTaskData,
    step: int,
    perms: dict,
    device: torch.device,
    ctx: DistContext,
    scaler: torch.amp.GradScaler,
    sample: Callable[..., dict[str, torch.Tensor]],
) -> Accumulated:
    """The micro-batch loop of update ``step``: forward and backward of each micro-batch (and each
    task in it), gradients summed in ``.grad``; returns what the losses and batches add up to."""
    t = cfg.train
    acc = Accumulated(torch.zeros(3, device=device))
    for micro in range(t.grad_accum):
        if isinstance(data, MultiTaskData):
            index = (step - 1) * t.grad_accum + micro
            parts = task_batches(cfg, data, index, perms, ctx.share(t.batch_size))
        else:
            parts = [(None, 1.0, sample(cfg, data, step, micro, perms, ctx))]
        for j, (task, share, cpu_batch) in enumerate(parts):
            last = micro == t.grad_accum - 1 and j == len(parts) - 1
            batch = to_device(cpu_batch, device)  # pinned, non-blocking copies on CUDA
            forward_backward(model, cfg, data, batch, (task, share, last), device, ctx, scaler, acc)
    return acc


def forward_backward(
    model: nn.Module,
    cfg: Config,
    data: Any,
    batch: dict[str, torch.Tensor],
    part: tuple[int | None, float, bool],
    device: torch.device,
    ctx: DistContext,
    scaler: torch.amp.GradScaler,
    acc: Accumulated,
) -> None:
    """One forward (under autocast) and backward of ``batch``, added into ``acc``. ``part`` is
    ``(task, share, last)``: a multi-task ``task`` weights its loss by the task's ``loss_weight`` and
    its ``share`` of the rows; DDP all-reduces the gradients only after the update's ``last`` backward.
    FSDP reduce-scatters every backward's gradients and keeps only its shards (memory over traffic)."""
    t = cfg.train
    task, share, last = part
    once = last or not ctx.enabled or is_sharded(model)
    with contextlib.nullcontext() if once else model.no_sync():  # DDP: all-reduce once per update
        with autocast(device, t.precision):
            out = model(**batch)
        loss = out.loss
        if task is not None:  # this task's weight, and its share of the batch's rows
            loss = share * (cfg.data.tasks[task].loss_weight * out.task_loss + out.aux_loss)
        scaler.scale(loss / t.grad_accum).backward()
    task_loss = out.task_loss.detach() * share
    acc.totals += torch.stack([loss.detach(), task_loss, out.aux_loss.detach().float() * share])
    if task is not None:
        acc.per_task.setdefault(data.names[task], []).append(out.task_loss.item())
    if isinstance(out, DistillOutput):
        acc.distill = {k: acc.distill.get(k, 0.0) + v for k, v in out.terms().items()}
    mask = batch.get("attention_mask")
    acc.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    if out.routing:
        acc.routing.append(flatten_routing(out.routing))


def clip_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, experts: ShardedExperts | None, grad_clip: float
) -> torch.Tensor:
    """Unscale (fp16), then clip to ``grad_clip`` (0: no clipping); returns the norm before clipping.
    Under expert parallelism the expert gradients are first reduced over their replicas and the norm
    is the global one (``routelab.train.sharded``). Under FSDP the norm is over every rank's shards
    (``clip_grad_norm_`` reduces over the mesh), returned whole on every rank."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)  # fp16: true gradients before clipping and the norm (a no-op otherwise)
    if experts is not None:  # expert parallelism: expert gradients over their replicas, the global norm
        experts.gradients.sync()
        return experts.gradients.clip(params, grad_clip)
    if grad_clip > 0:
        return full_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    return full_norm(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def distill_means(distill: dict[str, Any], grad_accum: int, ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Distillation: ``kd_loss`` and ``hidden_loss`` (means over micro-batches) and ``teacher_s``, each
    averaged over the ranks; empty without distillation."""
    if not distill:
        return {}
    kd, hidden, teacher_s = ctx.mean(
        [float(distill["kd_loss"]) / grad_accum, float(distill["hidden_loss"]) / grad_accum, distill["teacher_s"]], device
    )
    return {"kd_loss": kd, "hidden_loss": hidden, "teacher_s": teacher_s}


def apply_update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: Config, step: int, loss: float, grad_norm: torch.Tensor
) -> tuple[bool, bool]:
    """Step the optimizer unless the loss or gradient norm is non-finite; zero the gradients.

    Returns ``(skipped, overflow)``: ``overflow`` is fp16's scaled gradients leaving its range (the
    scale backs off and the run goes on). Any other non-finite step raises ``NonFiniteError`` unless
    ``train.skip_nonfinite``."""
    skipped = not (math.isfinite(loss) and math.isfinite(float(grad_norm)))  # grads are all-reduced: same on all ranks
    overflow = skipped and scaler.is_enabled() and math.isfinite(loss)  # fp16 range exceeded: back off and go on
    if skipped and not cfg.train.skip_nonfinite and not overflow:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"the training loss is {loss} (gradient norm {float(grad_norm)}) at step {step}. Try a lower train.lr,"
            " more train.warmup_steps or train.grad_clip > 0, or set train.skip_nonfinite=true to skip such steps"
        )
    if not skipped:  # a skipped step applies no update (AdamW's moments and step count stay as they were)
        scaler.step(optimizer)
    scaler.update()  # fp16: halve the scale after an overflow, double it after growth_interval clean steps
    optimizer.zero_grad(set_to_none=True)
    return skipped, overflow


def routing_stats(
    routing: list[dict[str, Any]], experts: ShardedExperts | None, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    """The update's routing statistics (means over its forwards and over the ranks); under expert
    parallelism also each MoE layer's communication, and ``communication`` over all layers."""
    stats = mean_records(routing) if routing else {}
    comm = experts.communication() if experts is not None else {}
    stats.update(flatten_routing(comm))
    stats = mean_over_ranks(stats, ctx, device) if stats else {}
    if comm:
        stats["communication"] = over_layers([{k: stats[f"routing/{n}/{k}"] for k in STATS} for n in comm])
    return stats


def mean_over_ranks(stats: dict[str, Any], ctx: DistContext, device: torch.device) -> dict[str, Any]:
    """Numeric statistics (numbers and lists of numbers) averaged over the ranks, others as they are."""
    if not ctx.enabled:
        return stats
    keys = [k for k, v in stats.items() if isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))]
    flat = [float(x) for k in keys for x in (stats[k] if isinstance(stats[k], list) else [stats[k]])]
    means, out, i = ctx.mean(flat, device), dict(stats), 0
    for k in keys:
        n = len(stats[k]) if isinstance(stats[k], list) else 1
        out[k] = means[i : i + n] if isinstance(stats[k], list) else means[i]
        i += n
    return out
