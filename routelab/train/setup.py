"""Building a run before its first step: the folder and the checkpoint to resume, the data, the
expert-parallel groups, the model (fresh, from ``train.init_from``, or restored; under expert
parallelism holding only this process's experts), the distillation teacher, the expert shards,
the optimizer and loss scaler, the metrics log, and the parallel wrappers.

``build_run`` does it all in the order the RNG streams depend on (the model's initialisation, then
the distiller's projection), so a run built here draws exactly what it always drew; the loop
(``routelab.train.trainer``) then only trains, evaluates, checkpoints and logs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from routelab.config import Config
from routelab.data import MultiTaskData
from routelab.data.batches import seed_everything, token_counts
from routelab.model import RoutedTransformer
from routelab.moe.layer import MoE
from routelab.moe.parallel import ExpertGroups, check_expert_parallel, expert_groups
from routelab.moe.routers import Router
from routelab.precision import grad_scaler, slow_precision_warning
from routelab.train.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state
from routelab.train.distill import Distiller, build_distiller, resume_distillation
from routelab.train.distributed import DistContext
from routelab.train.fsdp import is_sharded, load_sharded_checkpoint, shard_model
from routelab.train.init_from import copy_tokenizer, init_model, resumed_sizes, start_from
from routelab.train.metrics import METRICS_FILE, MetricsLog, open_tensorboard
from routelab.train.optim import build_optimizer
from routelab.train.run import CONFIG_FILE, TOKENIZER_FILE, load_task_data, prepare_run_dir, resolve_config, save_config
from routelab.train.sharded import ShardedExperts

log = logging.getLogger("routelab.train")


@dataclass
class Run:
    """Everything the loop works on. ``trained`` is what a step runs (the model, or the ``Distiller``
    around it, wrapped in ``DistributedDataParallel`` when distributed); ``book`` is the bookkeeping a
    checkpoint keeps; ``step`` the last update done (0, or the checkpoint's); ``ckpt`` the checkpoint
    resumed from (None for a fresh run)."""

    cfg: Config
    out: Path
    device: torch.device
    ctx: DistContext
    data: Any
    model: RoutedTransformer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    metrics: MetricsLog
    ckpt: Path | None = None
    distiller: Distiller | None = None
    experts: ShardedExperts | None = None
    trained: nn.Module | None = None
    step: int = 0
    book: dict[str, Any] | None = None


def build_run(
    cfg: Config,
    out: Path,
    resume: bool,
    device: torch.device,
    ctx: DistContext,
    make_optimizer: Callable[..., torch.optim.Optimizer] = build_optimizer,
    make_scaler: Callable[..., torch.amp.GradScaler] = grad_scaler,
) -> Run:
    """Set up run folder ``out`` on this rank and return the ``Run`` to train, restored from the newest
    checkpoint when ``resume``. ``make_optimizer(model, cfg.train)`` and ``make_scaler(device, precision)``
    build the optimizer and the fp16 loss scaler (the trainer passes the ones it names)."""
    cfg, ckpt, source = open_run(cfg, out, resume, ctx)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    cfg, data = load_data(cfg, out, ctx)
    groups = make_expert_groups(cfg, ctx)  # before the model: each process builds only its experts
    model = build_model(cfg, data, source, ckpt, device, groups)
    del source  # the starting weights are in the model now
    # knowledge distillation: the student with a frozen teacher (routelab.train.distill)
    distiller = build_distiller(cfg, model, out / TOKENIZER_FILE, device) if cfg.train.distill.teacher else None
    experts, state = shard_experts(cfg, model, ckpt, ctx, groups)
    if cfg.train.data_parallel == "fsdp" and ctx.enabled:  # before the optimizer: it steps on the shards
        shard_model(model, device, ctx.world_size)
    optimizer = make_optimizer(model, cfg.train)
    scaler = make_scaler(device, cfg.train.precision)  # fp16 only; its state is checkpointed with the bookkeeping
    slow = slow_precision_warning(device, cfg.train.precision)  # fp16 on a CPU, bf16 on one without bf16 instructions
    if slow:
        log.warning(slow)
    if distiller is not None and distiller.projection is not None:  # the hidden-state projection trains too
        optimizer.add_param_group(distiller.optimizer_group(cfg.train.weight_decay))
    tensorboard = open_tensorboard(out / "tensorboard") if cfg.train.tensorboard and ctx.is_main else None
    metrics = MetricsLog(out / METRICS_FILE, tensorboard, enabled=ctx.is_main)
    run = Run(cfg, out, device, ctx, data, model, optimizer, scaler, metrics, ckpt, distiller, experts)
    restore(run, state)
    run.trained = wrap_parallel(run)
    return run


def open_run(cfg: Config, out: Path, resume: bool, ctx: DistContext) -> tuple[Config, Path | None, Any]:
    """Prepare the folder (rank 0) and find the checkpoint to resume; returns ``(cfg, ckpt, source)``
    with ``source`` the weights ``train.init_from`` starts from (a fresh run only; None otherwise)."""
    ckpt = ctx.on_main(lambda: prepare_run_dir(out, cfg, resume))
    if not ctx.is_main and resume:
        ckpt = latest_checkpoint(out)  # rank 0 verified it and set damaged ones aside
    source = None  # train.init_from: every rank reads the same weights; a resumed run reads its checkpoint
    if cfg.train.init_from and ckpt is None:
        started = ctx.on_main(lambda: copy_tokenizer(*start_from(cfg), out))  # rank 0 checks first: one error line
        cfg, source = started if ctx.is_main else start_from(cfg)
    elif ckpt is not None:
        cfg = resumed_sizes(cfg, out)
    return cfg, ckpt, source


def load_data(cfg: Config, out: Path, ctx: DistContext) -> tuple[Config, Any]:
    """The run's data, and ``cfg`` with the sizes it gives (vocabulary, labels). Rank 0 reads it first,
    builds the tokenizer (e.g. trains a BPE) and saves it and the config for the others."""

    def first_load() -> Any:
        data = load_task_data(cfg, out)
        if not (out / TOKENIZER_FILE).is_file():
            data.tokenizer.save(out)
        save_config(resolve_config(cfg, data), out / CONFIG_FILE)
        return data

    data = ctx.on_main(first_load)
    if not ctx.is_main:
        data = load_task_data(cfg, out)
    return resolve_config(cfg, data), data


def make_expert_groups(cfg: Config, ctx: DistContext) -> ExpertGroups | None:
    """The expert-parallel process groups (``train.expert_parallel`` > 1), else None."""
    if cfg.train.expert_parallel <= 1:
        return None
    return expert_groups(cfg.train.expert_parallel, ctx.rank, ctx.world_size, timeout_s=cfg.train.dist_timeout)


def build_model(
    cfg: Config, data: Any, source: Any, ckpt: Path | None, device: torch.device, groups: ExpertGroups | None = None
) -> RoutedTransformer:
    """The model on ``device``: initialised from ``source`` (``train.init_from``) if given; a fresh run
    also fits data-dependent routers and loads ``model.embeddings_path`` (a resume loads them instead).
    With expert ``groups`` every MoE layer holds only this rank's slice of its experts from the start
    (initialised as those experts of the whole model, ``RoutedTransformer``'s ``expert_slice``)."""
    if groups is not None:  # the layers' own refusals first, on a model that allocates nothing
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # (the run's RNG stream left alone)
            check_expert_parallel(RoutedTransformer(cfg.model), groups.size, groups.world_size)
    model = RoutedTransformer(cfg.model, expert_slice=(groups.index, groups.size) if groups else None).to(device)
    if source is not None:
        init_model(model, source, cfg)
    if ckpt is None:  # data-dependent router state (a frequency-balanced hash table); a resume loads it
        counts = functools.cache(lambda: token_counts(data, cfg.model.vocab_size))
        prepared = [m.kind for m in model.modules() if isinstance(m, Router) and m.prepare(counts)]
        if prepared:
            log.info("fitted %d %s router(s) to the training-token frequencies", len(prepared), "/".join(sorted(set(prepared))))
    if cfg.model.embeddings_path and ckpt is None:
        vocab = [data.tokenizer.id_to_token(i) for i in range(data.tokenizer.vocab_size)]
        filled = model.load_word_vectors(cfg.model.embeddings_path, vocab)
        log.info("word vectors from %s filled %d of %d embedding rows", cfg.model.embeddings_path, filled, len(vocab))
    return model


def shard_experts(
    cfg: Config, model: RoutedTransformer, ckpt: Path | None, ctx: DistContext, groups: ExpertGroups | None
) -> tuple[ShardedExperts | None, dict[str, Any] | None]:
    """Expert parallelism (``train.expert_parallel`` > 1): the model, holding this rank's slice of
    every MoE layer's experts, runs them through ``ExpertParallel``. A checkpoint holds every expert:
    only this rank's rows of each expert tensor are read, with the RNG states (the checkpoint's
    state is returned for ``restore``). ``(None, None)`` otherwise."""
    if groups is None:
        return None, None
    check_expert_parallel(model, cfg.train.expert_parallel, ctx.world_size)
    experts = ShardedExperts(model, groups)
    state = load_checkpoint(ckpt, model, None, rng=True, rows=experts.rows()) if ckpt is not None else None
    return experts, state


def restore(run: Run, state: dict[str, Any] | None) -> None:
    """Fill ``run.book`` and, when resuming, load the optimizer, RNG states, bookkeeping, the loss
    scale and the distiller's projection from ``run.ckpt``, and drop metrics lines past its step."""
    run.book = {"tokens_seen": 0, "elapsed_s": 0.0, "train_loss": None, "skipped_steps": 0}
    if run.distiller is not None:
        run.book["distill"] = run.distiller.record()  # the teacher's folder and weights checksum
    if run.ckpt is None:
        return
    if is_sharded(run.model):  # every rank reads the whole checkpoint and keeps its shards
        state = load_sharded_checkpoint(run.ckpt, run.model, run.optimizer)
    elif run.experts is None:
        state = load_checkpoint(run.ckpt, run.model, run.optimizer)  # also restores the RNG states
    else:
        load_optimizer_state(run.ckpt, run.optimizer, state, rows=run.experts.moment_rows(run.optimizer))
    run.step = state["step"]
    resume_distillation(run.distiller, state["bookkeeping"].get("distill"), run.ckpt)  # same teacher? the projection
    run.book.update({k: v for k, v in state["bookkeeping"].items() if k != "distill"})  # the teacher as found now
    if run.scaler.is_enabled() and "grad_scaler" in run.book:
        run.scaler.load_state_dict(run.book["grad_scaler"])
    dropped = run.metrics.truncate_after(run.step)
    log.info("resuming from %s (step %d); dropped %d metrics lines past it", run.ckpt, run.step, dropped)


def wrap_parallel(run: Run) -> nn.Module:
    """What a step runs: the distiller (if any) or the model, in ``DistributedDataParallel`` when
    distributed (the teacher is in neither: each rank holds its own copy); a model sharded by
    ``train.data_parallel: fsdp`` (``routelab.train.fsdp``) runs as it is."""
    trained = run.distiller if run.distiller is not None else run.model
    ctx, cfg, experts = run.ctx, run.cfg, run.experts
    if not ctx.enabled:
        return trained
    for m in run.model.modules():  # balance_scope "global": the balance loss over the batches of every rank
        if isinstance(m, MoE):
            m.balance_group = dist.group.WORLD
    log.info("%d processes (%s), global batch %d = %d per process%s", ctx.world_size, dist.get_backend(),
             cfg.train.batch_size, cfg.train.batch_size // ctx.world_size,
             f"; experts spread over groups of {experts.groups.size}" if experts else
             "; dense weights, gradients and optimizer state sharded (fsdp)" if is_sharded(run.model) else "")
    if is_sharded(run.model):
        return trained
    if experts is not None:  # expert gradients are reduced over their replicas only (ExpertGradients)
        prefix = "student." if run.distiller is not None else ""
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trained, [prefix + n for n in experts.names])
    return DistributedDataParallel(trained, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                   find_unused_parameters=isinstance(run.data, MultiTaskData))  # other tasks' heads
