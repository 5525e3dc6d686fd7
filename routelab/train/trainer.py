"""The training loop: ``train(cfg, out_dir)`` runs AdamW with warmup + cosine, gradient
accumulation and clipping, logs to ``metrics.jsonl``, evaluates, checkpoints and resumes.

Resumption is exact: every micro-batch is a pure function of ``(seed, step, micro)``, the learning
rate a pure function of ``step``, and checkpoints hold the optimizer and RNG states, so N steps in
one go and N/2 + resume to N end with bitwise identical parameters (same device, same threads).

One optimizer update (``step``, 1-based) = ``grad_accum`` micro-batches of ``batch_size`` sequences;
each micro-batch loss is divided by ``grad_accum`` so the gradient is that of their mean.

Multi-task runs (``data.tasks``): each micro-batch is one task drawn by ``routelab.data.multitask``
(``data.task_mixing: step``), or its rows are split between tasks (``batch``: one forward per task
present, each weighted by its share of the rows). A task's loss is scaled by its ``loss_weight``; the
model gets ``task_ids`` and uses that task's head. Draws and batches stay pure functions of
``(seed, step, micro)``, so resumption stays exact.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from routelab.config import Config
from routelab.data import (
    ClassificationData,
    LMData,
    MultiTaskData,
    TaskCounter,
    classification_batch,
    sample_lm_batch,
    task_probabilities,
)
from routelab.io import atomic_write_json, check_folder_target, make_temp_dir, replace_dir
from routelab.lock import FolderLock, held_by_launcher
from routelab.model import RoutedTransformer
from routelab.moe.comm import STATS, add_step, over_layers, run_summary
from routelab.moe.layer import MoE
from routelab.moe.parallel import check_expert_parallel, expert_groups
from routelab.moe.routers import Router
from routelab.precision import autocast, grad_scaler, slow_precision_warning
from routelab.train.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint
from routelab.train.device import to_device
from routelab.train.distill import DistillOutput, build_distiller, preflight_teacher, resume_distillation
from routelab.train.distributed import DistContext, init_distributed, rank_device, shutdown
from routelab.train.evaluation import evaluate
from routelab.train.init_from import copy_tokenizer, init_model, resumed_sizes, start_from
from routelab.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    flatten_routing,
    format_duration,
    mean_records,
    moe_grad_norms,
    open_tensorboard,
    peak_rss_mb,
)
from routelab.train.optim import build_optimizer
from routelab.train.run import (
    CONFIG_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    TOKENIZER_FILE,
    RunError,
    config_sha256,
    load_task_data,
    preflight,
    prepare_run_dir,
    resolve_config,
    resolve_device,
    save_config,
)
from routelab.train.schedule import lr_at
from routelab.train.sharded import ShardedExperts

log = logging.getLogger("routelab.train")

EVAL_KEYS = ("loss", "bpb", "accuracy")  # what an eval line of metrics.jsonl holds


# ----------------------------------------------------------------------------------------------
# setup helpers


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
    cfg: Config, data: LMData | ClassificationData, step: int, micro: int, perms: dict, ctx: DistContext | None = None
) -> dict[str, torch.Tensor]:
    """This rank's rows of micro-batch ``micro`` of update ``step`` (1-based): a pure function of
    (seed, step, micro, rank, world size); the global micro-batch is the same whatever the world size.

    Returns:
        ``input_ids`` (b, T) and ``labels`` ((b, T) for LM and token classification, (b,) for
        classification), plus ``attention_mask`` (b, T) for classification; b = batch_size / world size. ``perms`` caches
        epoch permutations.
    """
    t = cfg.train
    rows = (ctx or DistContext()).share(t.batch_size)
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
    counter = perms.get("task_counter")
    if counter is None:
        weights = [task.sampling_weight for task in d.tasks] if d.tasks[0].sampling_weight is not None else None
        probs = task_probabilities(data.sizes(), d.task_temperature, weights)
        counter = perms["task_counter"] = TaskCounter(probs, t.seed, 1 if step_mixing else t.batch_size)
    drawn, counts = counter.before(index)
    parts = []
    for task in sorted(set(drawn.tolist())):
        n = t.batch_size if step_mixing else int((drawn == task).sum())
        task_cfg, task_data, seed = d.task_config(task), data.tasks[task], task_seed(t.seed, task)
        cache = perms.setdefault(("task", task), {})
        if isinstance(task_data, LMData):
            gen = torch.Generator().manual_seed(batch_seed(seed, int(counts[task]) if step_mixing else index))
            x = sample_lm_batch(task_data.train, n, task_cfg.seq_len, gen)[rows]  # (b, T)
            batch = {"input_ids": x, "labels": x}
        else:
            if step_mixing:
                examples = classification_batch(task_data.train, n, seed, int(counts[task]), cache)[rows]
            else:  # positions counts[task] .. + n - 1 of the task's endless epoch order
                examples = [classification_batch(task_data.train, 1, seed, int(counts[task]) + r, cache)[0] for r in range(n)]
            batch = task_data.collate(examples, task_cfg.seq_len, task_cfg.truncate)
        batch["task_ids"] = torch.full((batch["input_ids"].shape[0],), task, dtype=torch.long)
        parts.append((task, n / t.batch_size, batch))
    return parts


# ----------------------------------------------------------------------------------------------
# one update

MAX_CONSECUTIVE_SKIPS = 20  # with train.skip_nonfinite: more non-finite steps in a row than this stop the run


class NonFiniteError(RunError):
    """The loss or gradient became NaN or infinite (and ``train.skip_nonfinite`` is off, or it kept happening)."""


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
    lr = lr_at(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    totals = torch.zeros(3, device=device)  # loss, task_loss, aux_loss summed over micro-batches
    routing, tokens = [], 0
    distill: dict[str, Any] = {}  # kd_loss, hidden_loss, teacher_s summed over micro-batches
    if experts is not None:
        experts.communication()  # count this update only (not an evaluation since the last one)
    multi = isinstance(data, MultiTaskData)
    per_task: dict[str, list[float]] = {}  # multi-task: each task's task loss in this update
    for micro in range(t.grad_accum):
        if multi:
            index = (step - 1) * t.grad_accum + micro
            parts = task_batches(cfg, data, index, perms, ctx.share(t.batch_size))
        else:
            parts = [(None, 1.0, micro_batch(cfg, data, step, micro, perms, ctx))]
        for j, (task, share, cpu_batch) in enumerate(parts):
            batch = to_device(cpu_batch, device)  # pinned, non-blocking copies on CUDA
            last = micro == t.grad_accum - 1 and j == len(parts) - 1
            with contextlib.nullcontext() if last or not ctx.enabled else model.no_sync():  # all-reduce once per update
                with autocast(device, t.precision):
                    out = model(**batch)
                loss = out.loss
                if task is not None:  # this task's weight, and its share of the batch's rows
                    loss = share * (cfg.data.tasks[task].loss_weight * out.task_loss + out.aux_loss)
                scaler.scale(loss / t.grad_accum).backward()
            task_loss = out.task_loss.detach() * share
            totals += torch.stack([loss.detach(), task_loss, out.aux_loss.detach().float() * share])
            if task is not None:
                per_task.setdefault(data.names[task], []).append(out.task_loss.item())
            if isinstance(out, DistillOutput):
                distill = {k: distill.get(k, 0.0) + v for k, v in out.terms().items()}
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if out.routing:
                routing.append(flatten_routing(out.routing))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)  # fp16: true gradients before clipping and the norm (a no-op otherwise)
    if experts is not None:  # expert parallelism: expert gradients over their replicas, the global norm
        experts.gradients.sync()
        grad_norm = experts.gradients.clip(params, t.grad_clip)
    elif t.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    moe_norms = moe_grad_norms(model) if experts is None else {}  # before the update, after clipping
    loss, task_loss, aux_loss = ctx.mean((totals / t.grad_accum).tolist(), device)
    tokens = int(ctx.sum([tokens], device)[0])
    if distill:
        kd, hidden, teacher_s = ctx.mean([float(distill["kd_loss"]) / t.grad_accum, float(distill["hidden_loss"]) / t.grad_accum, distill["teacher_s"]], device)
        distill = {"kd_loss": kd, "hidden_loss": hidden, "teacher_s": teacher_s}
    skipped = not (math.isfinite(loss) and math.isfinite(float(grad_norm)))  # grads are all-reduced: same on all ranks
    overflow = skipped and scaler.is_enabled() and math.isfinite(loss)  # fp16 range exceeded: back off and go on
    if skipped and not t.skip_nonfinite and not overflow:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"the training loss is {loss} (gradient norm {float(grad_norm)}) at step {step}. Try a lower train.lr,"
            " more train.warmup_steps or train.grad_clip > 0, or set train.skip_nonfinite=true to skip such steps"
        )
    if not skipped:  # a skipped step applies no update (AdamW's moments and step count stay as they were)
        scaler.step(optimizer)
    scaler.update()  # fp16: halve the scale after an overflow, double it after growth_interval clean steps
    optimizer.zero_grad(set_to_none=True)
    stats = mean_records(routing) if routing else {}
    comm = experts.communication() if experts is not None else {}
    stats.update(flatten_routing(comm))
    stats = mean_over_ranks(stats, ctx, device) if stats else {}
    if comm:
        stats["communication"] = over_layers([{k: stats[f"routing/{n}/{k}"] for k in STATS} for n in comm])
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
        **{f"train/{name}/loss": sum(v) / len(v) for name, v in per_task.items()},
        **distill,
        **stats,
    }


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


# ----------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, out_dir: str | Path, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into run folder ``out_dir`` (see ``routelab.train.run`` for its layout).

    Args:
        cfg: the run's config; ``model.vocab_size`` / ``model.num_labels`` may be None (from the data).
        out_dir: run folder. A fresh run refuses a folder holding a checkpoint or finished model, or
            files that are not a run's. While the run lasts, rank 0 holds the folder's lock
            (``routelab.lock``): another run or resume there is refused, naming this process.
        resume: continue from the newest intact checkpoint in ``out_dir``; the config must match
            the saved one except ``routelab.train.run.RESUMABLE_CHANGES``.
        stop_after: stop once global step ``stop_after`` is done (checkpointing there) although the
            schedule still runs to ``train.steps``; None = run to ``train.steps``.

    Progress goes to the ``routelab.train`` logger: a line every ``log_every`` steps (step, loss,
    tokens/s, ETA) when no progress bar is shown (no terminal), and every evaluation.

    Started by ``torchrun`` (see ``routelab.train.distributed``), the processes train one model with
    ``DistributedDataParallel`` on shares of the same global batches; rank 0 alone writes the run
    folder and logs.

    Returns:
        the summary, also written to ``summary.json``.
    """
    start_time = time.perf_counter()
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after={stop_after} is invalid; allowed: None or a step >= 1")
    preflight(cfg)
    if cfg.train.distill.teacher:
        preflight_teacher(cfg)  # the folder and the heads, before any data is read
    out = Path(out_dir)
    device = resolve_device(cfg.train.device)
    ctx = init_distributed(cfg.train.dist_backend, cfg.train.dist_timeout, device)
    lock = FolderLock(out, "routelab train")  # one writer per run folder; rank 0 writes (and holds it)
    ctx.on_main(lambda: None if held_by_launcher(out) else (check_folder_target(out), lock.acquire()))
    try:
        summary = _train(cfg, out, resume, stop_after, rank_device(device, ctx), ctx, start_time)
    finally:
        lock.release()
    shutdown(ctx)  # not after an error: this rank exits at once, and the launcher stops the others
    return summary


def _train(
    cfg: Config, out: Path, resume: bool, stop_after: int | None, device: torch.device, ctx: DistContext, start_time: float
) -> dict[str, Any]:
    """``train`` on one rank (of one or more); rank 0 prepares the folder and data files first."""
    ctx.share(cfg.train.batch_size)  # the global batch must split evenly between the ranks
    ckpt = ctx.on_main(lambda: prepare_run_dir(out, cfg, resume))
    if not ctx.is_main and resume:
        ckpt = latest_checkpoint(out)  # rank 0 verified it and set damaged ones aside
    source = None  # train.init_from: every rank reads the same weights; a resumed run reads its checkpoint
    if cfg.train.init_from and ckpt is None:
        started = ctx.on_main(lambda: copy_tokenizer(*start_from(cfg), out))  # rank 0 checks first: one error line
        cfg, source = started if ctx.is_main else start_from(cfg)
    elif ckpt is not None:
        cfg = resumed_sizes(cfg, out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)

    def first_load() -> Any:  # rank 0 builds the tokenizer (e.g. trains a BPE) and saves it for the others
        data = load_task_data(cfg, out)
        if not (out / TOKENIZER_FILE).is_file():
            data.tokenizer.save(out)
        save_config(resolve_config(cfg, data), out / CONFIG_FILE)
        return data

    data = ctx.on_main(first_load)
    if not ctx.is_main:
        data = load_task_data(cfg, out)
    cfg = resolve_config(cfg, data)
    model = RoutedTransformer(cfg.model).to(device)
    if source is not None:
        init_model(model, source, cfg)
        source = None
    if ckpt is None:  # data-dependent router state (a frequency-balanced hash table); a resume loads it
        counts = functools.cache(lambda: token_counts(data, cfg.model.vocab_size))
        prepared = [m.kind for m in model.modules() if isinstance(m, Router) and m.prepare(counts)]
        if prepared:
            log.info("fitted %d %s router(s) to the training-token frequencies", len(prepared), "/".join(sorted(set(prepared))))
    if cfg.model.embeddings_path and ckpt is None:
        vocab = [data.tokenizer.id_to_token(i) for i in range(data.tokenizer.vocab_size)]
        filled = model.load_word_vectors(cfg.model.embeddings_path, vocab)
        log.info("word vectors from %s filled %d of %d embedding rows", cfg.model.embeddings_path, filled, len(vocab))
    distiller = None  # knowledge distillation: the student with a frozen teacher (routelab.train.distill)
    if cfg.train.distill.teacher:
        distiller = build_distiller(cfg, model, out / TOKENIZER_FILE, device)
    experts = None  # expert parallelism: this rank keeps its slice of every MoE layer's experts
    state = None
    if cfg.train.expert_parallel > 1:
        check_expert_parallel(model, cfg.train.expert_parallel, ctx.world_size)
        if ckpt is not None:  # the checkpoint holds every expert: load it whole, then slice
            state = load_checkpoint(ckpt, model, None, rng=True)
        groups = expert_groups(cfg.train.expert_parallel, ctx.rank, ctx.world_size, timeout_s=cfg.train.dist_timeout)
        experts = ShardedExperts(model, groups)
    optimizer = build_optimizer(model, cfg.train)
    scaler = grad_scaler(device, cfg.train.precision)  # fp16 only; its state is checkpointed with the bookkeeping
    slow = slow_precision_warning(device, cfg.train.precision)  # fp16 on a CPU, bf16 on one without bf16 instructions
    if slow:
        log.warning(slow)
    if distiller is not None and distiller.projection is not None:  # the hidden-state projection trains too
        optimizer.add_param_group(distiller.optimizer_group(cfg.train.weight_decay))
    tensorboard = open_tensorboard(out / "tensorboard") if cfg.train.tensorboard and ctx.is_main else None
    metrics = MetricsLog(out / METRICS_FILE, tensorboard, enabled=ctx.is_main)

    book: dict[str, Any] = {"tokens_seen": 0, "elapsed_s": 0.0, "train_loss": None, "skipped_steps": 0}
    if distiller is not None:
        book["distill"] = distiller.record()  # the teacher's folder and weights checksum
    step = 0
    if ckpt is not None:
        if experts is None:
            state = load_checkpoint(ckpt, model, optimizer)  # also restores the RNG states
        else:
            load_optimizer_state(ckpt, optimizer, state, tensor_map=experts.slicer(optimizer))
        step = state["step"]
        resume_distillation(distiller, state["bookkeeping"].get("distill"), ckpt)  # same teacher? the projection
        book.update({k: v for k, v in state["bookkeeping"].items() if k != "distill"})  # the teacher as found now
        if scaler.is_enabled() and "grad_scaler" in book:
            scaler.load_state_dict(book["grad_scaler"])
        dropped = metrics.truncate_after(step)
        log.info("resuming from %s (step %d); dropped %d metrics lines past it", ckpt, step, dropped)
    trained = distiller if distiller is not None else model  # the teacher is in neither: each rank holds its own copy
    if ctx.enabled:
        for m in model.modules():  # balance_scope "global": the balance loss over the batches of every rank
            if isinstance(m, MoE):
                m.balance_group = dist.group.WORLD
        log.info("%d processes (%s), global batch %d = %d per process%s", ctx.world_size, dist.get_backend(),
                 cfg.train.batch_size, cfg.train.batch_size // ctx.world_size,
                 f"; experts spread over groups of {experts.groups.size}" if experts else "")
        if experts is not None:  # expert gradients are reduced over their replicas only (ExpertGradients)
            prefix = "student." if distiller is not None else ""
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trained, [prefix + n for n in experts.names])
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=isinstance(data, MultiTaskData))  # other tasks' heads
    last = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    start_step, elapsed_before = step, book["elapsed_s"]
    loop_start = time.perf_counter()

    def checkpoint() -> None:  # rank 0's model and optimizer state are every rank's (gradients are averaged)
        book["elapsed_s"] = elapsed_before + time.perf_counter() - loop_start
        if scaler.is_enabled():
            book["grad_scaler"] = scaler.state_dict()
        full = experts.full_states(optimizer) if experts else (None, None)  # every expert, from all ranks
        extra = distiller.extra_tensors() if distiller is not None else None  # the projection: not part of the model
        ctx.on_main(lambda: save_checkpoint(out, step, model, optimizer, {"bookkeeping": dict(book)}, cfg.train.keep_checkpoints, *full, extra))

    def run_eval(write: bool = True) -> dict[str, Any]:
        # under expert parallelism every rank runs every batch in step (its experts serve all ranks)
        result = evaluate(model, data, cfg, "val", ctx=ctx if experts is None else None)
        flat = {k: v for k, v in result.items() if k in EVAL_KEYS}
        for name, r in result.get("tasks", {}).items():  # multi-task: val/<task>/loss, val/<task>/accuracy, ...
            flat.update({f"val/{name}/{k}": v for k, v in r.items() if k in EVAL_KEYS})
        if write:
            metrics.write({"step": step, "split": "val", **flat})
        log.info("step %d validation: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in flat.items()))
        return result

    train_time, run_tokens, run_teacher = 0.0, 0, 0.0  # this invocation, for throughput
    window_time, window_tokens, window_teacher = 0.0, 0, 0.0  # since the last metrics line
    show_bar = cfg.train.progress and sys.stderr.isatty() and ctx.is_main
    log_lines = cfg.train.progress and not show_bar  # logs, nohup, CI: a line per log_every steps instead
    bar = tqdm(total=last, initial=step, disable=not show_bar, desc="train", dynamic_ncols=True)
    perms: dict = {}
    out_of_time = bool(cfg.train.max_seconds) and elapsed_before >= cfg.train.max_seconds
    consecutive_skips = 0
    model.train()
    try:
        while step < last and not out_of_time:
            step += 1
            t0 = time.perf_counter()
            if ctx.enabled:  # each rank's own stream (dropout, random routing) as a function of (seed, step, rank)
                torch.manual_seed(batch_seed(cfg.train.seed + 1 + ctx.rank, step))
            result = train_step(trained, optimizer, cfg, data, step, perms, device, ctx, experts, scaler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time, window_time = train_time + dt, window_time + dt
            run_tokens, window_tokens = run_tokens + result["tokens"], window_tokens + result["tokens"]
            run_teacher, window_teacher = run_teacher + result.get("teacher_s", 0.0), window_teacher + result.get("teacher_s", 0.0)
            book["tokens_seen"] += result["tokens"]
            if "communication" in result:
                add_step(book.setdefault("communication", {}), result["communication"], dt)
            if result["skipped"]:
                book["skipped_steps"] += 1
                consecutive_skips += 1
                if result["overflow"]:  # expected now and then in fp16 (most at the start, while the scale settles)
                    log.info("step %d: fp16 gradients overflowed; update skipped, loss scale now %g", step, result["loss_scale"])
                else:
                    log.warning("step %d: loss %s, gradient norm %s; update skipped (train.skip_nonfinite)", step, result["loss"], result["grad_norm"])
                if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteError(
                        f"the loss or gradient was non-finite for {consecutive_skips} steps in a row (up to step {step});"
                        " skipping does not help here: lower train.lr or check the data and model settings"
                        + (" (or use train.precision=bf16: fp16 kept overflowing)" if cfg.train.precision == "fp16" else "")
                    )
            else:
                consecutive_skips = 0
                book["train_loss"] = result["loss"]
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == last:
                tokens_per_s = window_tokens / window_time if window_time > 0 else 0.0
                record = {"step": step, **{k: v for k, v in result.items() if k not in ("tokens", "skipped", "overflow", "communication")}}
                record["skipped_steps"] = book["skipped_steps"]
                record["tokens_per_s"] = tokens_per_s
                if distiller is not None:  # the teacher's forward passes are inside the step time (and tokens/s)
                    record["teacher_share"] = window_teacher / window_time if window_time > 0 else 0.0
                record["elapsed_s"] = elapsed_before + time.perf_counter() - loop_start
                metrics.write(record)
                bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                if log_lines:
                    line = progress_line(step, last, result["loss"], tokens_per_s, train_time / (step - start_step), cfg, record["elapsed_s"])
                    log.info(line + (f"  (teacher {record['teacher_share']:.0%})" if distiller is not None else ""))
                window_time, window_tokens, window_teacher = 0.0, 0, 0.0
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != last:
                run_eval()
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != last:
                checkpoint()
            if cfg.train.max_seconds:  # every rank stops at the same step
                over = elapsed_before + time.perf_counter() - loop_start >= cfg.train.max_seconds
                if ctx.any(over, device):
                    out_of_time = True
                    break
    except NonFiniteError as e:
        metrics.close()
        ckpt = latest_checkpoint(out)
        where = f"continue from checkpoint {ckpt.name} with --resume" if ckpt else "no checkpoint was written yet: start again"
        raise NonFiniteError(f"{e}; {where}") from None
    except BaseException:
        metrics.close()
        raise
    finally:
        bar.close()

    final = run_eval(write=step > start_step or ckpt is None)  # a no-op resume logs nothing twice
    metrics.close()
    if step > start_step or ckpt is None:
        checkpoint()
    completed = step >= cfg.train.steps or out_of_time
    if completed:
        final_model = experts.full_model(cfg.model) if experts else model
        ctx.on_main(lambda: export_model(final_model, data.tokenizer, out / MODEL_DIR))
    summary = {
        "steps": step,
        "target_steps": cfg.train.steps,
        "completed": completed,
        "stopped_by": "max_seconds" if out_of_time else ("steps" if completed else "stop_after"),
        "final_train_loss": book["train_loss"],
        "val_loss": final["loss"],
        **({"val_bpb": final["bpb"]} if "bpb" in final else {}),
        **({"val_accuracy": final["accuracy"]} if "accuracy" in final else {}),
        **({"tasks": {name: {f"val_{k}": v for k, v in r.items() if k in EVAL_KEYS} for name, r in final["tasks"].items()}}
           if "tasks" in final else {}),
        "skipped_steps": book["skipped_steps"],
        "tokens_per_s": run_tokens / train_time if train_time > 0 else None,
        "train_tokens": book["tokens_seen"],
        "wall_time_s": time.perf_counter() - start_time,
        "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
        "num_parameters": experts.num_parameters(cfg.model) if experts else model.num_parameters(),
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device),
        "precision": cfg.train.precision,
        "world_size": ctx.world_size,
        **({"communication": {**run_summary(book["communication"]), "capacity": capacity_scope(cfg)}} if book.get("communication") else {}),
        **({"distill": {**book["distill"], "teacher_s_per_step": run_teacher / (step - start_step) if step > start_step else None,
                        "teacher_share": run_teacher / train_time if train_time > 0 else None}} if distiller is not None else {}),
        "config_sha256": config_sha256(cfg),
    }
    ctx.on_main(lambda: atomic_write_json(out / SUMMARY_FILE, summary))  # after model/: the export is complete
    return summary


def capacity_scope(cfg: Config) -> str:
    """How expert capacity is counted under expert parallelism (for ``summary.json``)."""
    factor = getattr(cfg.model.ffn, "capacity_factor", None)
    return "dropless" if factor is None else f"capacity factor {factor} over each process's own tokens (GShard's groups)"


def export_model(model: RoutedTransformer, tokenizer: Any, folder: Path) -> None:
    """Write the final ``model/`` (weights, config, tokenizer) into a staging folder and swap it in,
    so the previous export stays whole until the new one is."""
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress_line(step: int, last: int, loss: float, tokens_per_s: float, s_per_step: float, cfg: Config, elapsed: float) -> str:
    """``step 120/300  loss 1.8421  20,518 tok/s  ETA 1m05s`` (the ETA also respects ``max_seconds``)."""
    eta = (last - step) * s_per_step
    if cfg.train.max_seconds:
        eta = min(eta, max(cfg.train.max_seconds - elapsed, 0.0))
    return f"step {step}/{last}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  ETA {format_duration(eta)}"
