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

The parts, in the order a run meets them (as litgpt separates setup, fit and validate):
``routelab.train.setup`` builds the run, ``routelab.data.batches`` draws its batches,
``routelab.train.step`` is one update, this module the loop (evaluation, checkpoints, logging, the
summary) and ``routelab.train.export`` the final ``model/``. The names other modules import from here
(``train_step``, ``micro_batch``, ...) are re-exported.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from routelab.config import Config
from routelab.data.batches import batch_seed, micro_batch, seed_everything, task_batches, task_seed, token_counts
from routelab.io import atomic_write_json, check_folder_target
from routelab.lock import FolderLock, held_by_launcher
from routelab.moe.comm import add_step, run_summary
from routelab.precision import grad_scaler
from routelab.train.checkpoint import latest_checkpoint, save_checkpoint
from routelab.train.distill import preflight_teacher
from routelab.train.distributed import DistContext, init_distributed, rank_device, shutdown
from routelab.train.evaluation import evaluate
from routelab.train.export import export_model
from routelab.train.fsdp import full_model, full_model_state, full_optimizer_tensors, is_sharded
from routelab.train.metrics import format_duration, peak_rss_mb
from routelab.train.optim import build_optimizer
from routelab.train.run import MODEL_DIR, SUMMARY_FILE, config_sha256, preflight, resolve_device
from routelab.train.setup import Run, build_run
from routelab.train.step import NonFiniteError, mean_over_ranks, train_step

__all__ = [  # the loop's own names, and those other modules and tests import from here
    "EVAL_KEYS", "MAX_CONSECUTIVE_SKIPS", "NonFiniteError", "batch_seed", "build_optimizer", "capacity_scope",
    "export_model", "grad_scaler", "mean_over_ranks", "micro_batch", "progress_line", "seed_everything",
    "task_batches", "task_seed", "token_counts", "train", "train_step",
]

log = logging.getLogger("routelab.train")

EVAL_KEYS = ("loss", "bpb", "accuracy")  # what an eval line of metrics.jsonl holds
MAX_CONSECUTIVE_SKIPS = 20  # with train.skip_nonfinite: more non-finite steps in a row than this stop the run


@dataclass
class Loop:
    """This invocation's clocks and counters, beside the checkpointed ``Run.book``. ``window_*``
    count since the last metrics line, the others since the loop started (for throughput)."""

    last: int  # the step this invocation stops after
    start_step: int  # the step it started from (0, or the checkpoint's)
    elapsed_before: float  # training seconds of earlier invocations (from the checkpoint)
    start_time: float  # when ``train`` was called, for the summary's wall time
    loop_start: float = field(default_factory=time.perf_counter)
    train_time: float = 0.0
    run_tokens: int = 0
    run_teacher: float = 0.0
    window_time: float = 0.0
    window_tokens: int = 0
    window_teacher: float = 0.0
    consecutive_skips: int = 0
    out_of_time: bool = False

    def elapsed(self) -> float:
        """Training seconds so far, earlier invocations included (what ``train.max_seconds`` limits)."""
        return self.elapsed_before + time.perf_counter() - self.loop_start

    def add(self, seconds: float, result: dict[str, Any]) -> None:
        """Count one step's time, tokens and teacher time."""
        teacher = result.get("teacher_s", 0.0)
        self.train_time, self.window_time = self.train_time + seconds, self.window_time + seconds
        self.run_tokens, self.window_tokens = self.run_tokens + result["tokens"], self.window_tokens + result["tokens"]
        self.run_teacher, self.window_teacher = self.run_teacher + teacher, self.window_teacher + teacher


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
    run = build_run(cfg, out, resume, device, ctx, build_optimizer, grad_scaler)  # as named here (replaceable here)
    steps = run.cfg.train.steps
    loop = Loop(steps if stop_after is None else min(steps, stop_after), run.step, run.book["elapsed_s"], start_time)
    fit(run, loop)
    trained_now = run.step > loop.start_step or run.ckpt is None  # a no-op resume logs and saves nothing twice
    final = run_eval(run, write=trained_now)
    run.metrics.close()
    if trained_now:
        checkpoint(run, loop)
    if run.step >= steps or loop.out_of_time:  # completed
        final_model = run.experts.full_model(run.cfg.model) if run.experts else run.model
        if is_sharded(run.model):  # gathered whole on rank 0
            final_model = full_model(run.model, run.cfg.model)
        ctx.on_main(lambda: export_model(final_model, run.data.tokenizer, out / MODEL_DIR))
    summary = summarize(run, loop, final)
    ctx.on_main(lambda: atomic_write_json(out / SUMMARY_FILE, summary))  # after model/: the export is complete
    return summary


def fit(run: Run, loop: Loop) -> None:
    """Train from ``run.step`` to ``loop.last`` (or until ``train.max_seconds``), logging, evaluating
    and checkpointing on the way. A ``NonFiniteError`` names the checkpoint to resume from."""
    t = run.cfg.train
    show_bar = t.progress and sys.stderr.isatty() and run.ctx.is_main
    log_lines = t.progress and not show_bar  # logs, nohup, CI: a line per log_every steps instead
    bar = tqdm(total=loop.last, initial=run.step, disable=not show_bar, desc="train", dynamic_ncols=True)
    perms: dict = {}
    loop.out_of_time = bool(t.max_seconds) and loop.elapsed_before >= t.max_seconds
    run.model.train()
    try:
        while run.step < loop.last and not loop.out_of_time:
            run.step += 1
            result = one_step(run, loop, perms)
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == loop.last:
                log_step(run, loop, result, bar, log_lines)
            if t.eval_every and run.step % t.eval_every == 0 and run.step != loop.last:
                run_eval(run)
            if t.checkpoint_every and run.step % t.checkpoint_every == 0 and run.step != loop.last:
                checkpoint(run, loop)
            if t.max_seconds and run.ctx.any(loop.elapsed() >= t.max_seconds, run.device):  # every rank stops at the same step
                loop.out_of_time = True
                break
    except NonFiniteError as e:
        run.metrics.close()
        ckpt = latest_checkpoint(run.out)
        where = f"continue from checkpoint {ckpt.name} with --resume" if ckpt else "no checkpoint was written yet: start again"
        raise NonFiniteError(f"{e}; {where}") from None
    except BaseException:
        run.metrics.close()
        raise
    finally:
        bar.close()


def one_step(run: Run, loop: Loop, perms: dict) -> dict[str, Any]:
    """Update ``run.step`` (``train_step``), timed, and its bookkeeping; returns the step's result."""
    t0 = time.perf_counter()
    if run.ctx.enabled:  # each rank's own stream (dropout, random routing) as a function of (seed, step, rank)
        torch.manual_seed(batch_seed(run.cfg.train.seed + 1 + run.ctx.rank, run.step))
    result = train_step(run.trained, run.optimizer, run.cfg, run.data, run.step, perms, run.device, run.ctx,
                        run.experts, run.scaler, sample=micro_batch)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    loop.add(dt, result)
    run.book["tokens_seen"] += result["tokens"]
    if "communication" in result:
        add_step(run.book.setdefault("communication", {}), result["communication"], dt)
    count_skip(run, loop, result)
    return result


def count_skip(run: Run, loop: Loop, result: dict[str, Any]) -> None:
    """Keep the latest train loss, or count a skipped update (and stop after too many in a row)."""
    if not result["skipped"]:
        loop.consecutive_skips = 0
        run.book["train_loss"] = result["loss"]
        return
    run.book["skipped_steps"] += 1
    loop.consecutive_skips += 1
    if result["overflow"]:  # expected now and then in fp16 (most at the start, while the scale settles)
        log.info("step %d: fp16 gradients overflowed; update skipped, loss scale now %g", run.step, result["loss_scale"])
    else:
        log.warning("step %d: loss %s, gradient norm %s; update skipped (train.skip_nonfinite)", run.step, result["loss"], result["grad_norm"])
    if loop.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteError(
            f"the loss or gradient was non-finite for {loop.consecutive_skips} steps in a row (up to step {run.step});"
            " skipping does not help here: lower train.lr or check the data and model settings"
            + (" (or use train.precision=bf16: fp16 kept overflowing)" if run.cfg.train.precision == "fp16" else "")
        )


def log_step(run: Run, loop: Loop, result: dict[str, Any], bar: tqdm, log_lines: bool) -> None:
    """Write the step's line of ``metrics.jsonl`` (and the progress line or bar), then start a new window."""
    tokens_per_s = loop.window_tokens / loop.window_time if loop.window_time > 0 else 0.0
    record = {"step": run.step, **{k: v for k, v in result.items() if k not in ("tokens", "skipped", "overflow", "communication")}}
    record["skipped_steps"] = run.book["skipped_steps"]
    record["tokens_per_s"] = tokens_per_s
    if run.distiller is not None:  # the teacher's forward passes are inside the step time (and tokens/s)
        record["teacher_share"] = loop.window_teacher / loop.window_time if loop.window_time > 0 else 0.0
    record["elapsed_s"] = loop.elapsed()
    run.metrics.write(record)
    bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
    if log_lines:
        s_per_step = loop.train_time / (run.step - loop.start_step)
        line = progress_line(run.step, loop.last, result["loss"], tokens_per_s, s_per_step, run.cfg, record["elapsed_s"])
        log.info(line + (f"  (teacher {record['teacher_share']:.0%})" if run.distiller is not None else ""))
    loop.window_time, loop.window_tokens, loop.window_teacher = 0.0, 0, 0.0


def run_eval(run: Run, write: bool = True) -> dict[str, Any]:
    """Evaluate on the validation split; log it and (``write``) add its line to ``metrics.jsonl``."""
    # under expert parallelism every rank runs every batch in step (its experts serve all ranks)
    result = evaluate(run.model, run.data, run.cfg, "val", ctx=run.ctx if run.experts is None else None)
    flat = {k: v for k, v in result.items() if k in EVAL_KEYS}
    for name, r in result.get("tasks", {}).items():  # multi-task: val/<task>/loss, val/<task>/accuracy, ...
        flat.update({f"val/{name}/{k}": v for k, v in r.items() if k in EVAL_KEYS})
    if write:
        run.metrics.write({"step": run.step, "split": "val", **flat})
    log.info("step %d validation: %s", run.step, "  ".join(f"{k} {v:.4f}" for k, v in flat.items()))
    return result


def checkpoint(run: Run, loop: Loop) -> None:
    """Save a checkpoint of ``run.step`` (rank 0's model and optimizer state are every rank's: the
    gradients are averaged; under expert parallelism every expert is gathered from all ranks)."""
    book = run.book
    book["elapsed_s"] = loop.elapsed()
    if run.scaler.is_enabled():
        book["grad_scaler"] = run.scaler.state_dict()
    full = run.experts.full_states(run.optimizer) if run.experts else (None, None)  # every expert, from all ranks
    if is_sharded(run.model):  # fsdp: the shards gathered whole on rank 0, in the one-process format
        full = (full_model_state(run.model), full_optimizer_tensors(run.model, run.optimizer))
    extra = run.distiller.extra_tensors() if run.distiller is not None else None  # the projection: not part of the model
    keep = run.cfg.train.keep_checkpoints
    run.ctx.on_main(lambda: save_checkpoint(run.out, run.step, run.model, run.optimizer, {"bookkeeping": dict(book)}, keep, *full, extra))


# ----------------------------------------------------------------------------------------------
# the summary: each part adds its keys, in this order (optional features add nothing when off)


def _progress_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    completed = run.step >= run.cfg.train.steps or loop.out_of_time
    return {
        "steps": run.step,
        "target_steps": run.cfg.train.steps,
        "completed": completed,
        "stopped_by": "max_seconds" if loop.out_of_time else ("steps" if completed else "stop_after"),
        "final_train_loss": run.book["train_loss"],
    }


def _validation_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    part = {"val_loss": final["loss"]}
    part.update({f"val_{k}": final[k] for k in ("bpb", "accuracy") if k in final})
    if "tasks" in final:  # multi-task: each task's own validation numbers
        part["tasks"] = {name: {f"val_{k}": v for k, v in r.items() if k in EVAL_KEYS} for name, r in final["tasks"].items()}
    return part


def _resources_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    experts = run.experts
    return {
        "skipped_steps": run.book["skipped_steps"],
        "tokens_per_s": loop.run_tokens / loop.train_time if loop.train_time > 0 else None,
        "train_tokens": run.book["tokens_seen"],
        "wall_time_s": time.perf_counter() - loop.start_time,
        "elapsed_s": loop.elapsed(),
        "num_parameters": experts.num_parameters(run.cfg.model) if experts else run.model.num_parameters(),
        "peak_rss_mb": peak_rss_mb(),
        "device": str(run.device),
        "precision": run.cfg.train.precision,
        "world_size": run.ctx.world_size,
    }


def _communication_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    """Expert parallelism: the all-to-all traffic over the run."""
    if not run.book.get("communication"):
        return {}
    return {"communication": {**run_summary(run.book["communication"]), "capacity": capacity_scope(run.cfg)}}


def _distill_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    """Distillation: the teacher's record and the time spent in it."""
    if run.distiller is None:
        return {}
    steps = run.step - loop.start_step
    return {"distill": {**run.book["distill"], "teacher_s_per_step": loop.run_teacher / steps if steps > 0 else None,
                        "teacher_share": loop.run_teacher / loop.train_time if loop.train_time > 0 else None}}


def _fingerprint_part(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    return {"config_sha256": config_sha256(run.cfg)}


SUMMARY_PARTS: tuple[Callable[[Run, Loop, dict[str, Any]], dict[str, Any]], ...] = (
    _progress_part, _validation_part, _resources_part, _communication_part, _distill_part, _fingerprint_part,
)


def summarize(run: Run, loop: Loop, final: dict[str, Any]) -> dict[str, Any]:
    """The run's ``summary.json``: the ``SUMMARY_PARTS`` merged in order (``final`` is the last evaluation)."""
    summary: dict[str, Any] = {}
    for part in SUMMARY_PARTS:
        summary.update(part(run, loop, final))
    return summary


def capacity_scope(cfg: Config) -> str:
    """How expert capacity is counted under expert parallelism (for ``summary.json``)."""
    factor = getattr(cfg.model.ffn, "capacity_factor", None)
    return "dropless" if factor is None else f"capacity factor {factor} over each process's own tokens (GShard's groups)"


def progress_line(step: int, last: int, loss: float, tokens_per_s: float, s_per_step: float, cfg: Config, elapsed: float) -> str:
    """``step 120/300  loss 1.8421  20,518 tok/s  ETA 1m05s`` (the ETA also respects ``max_seconds``)."""
    eta = (last - step) * s_per_step
    if cfg.train.max_seconds:
        eta = min(eta, max(cfg.train.max_seconds - elapsed, 0.0))
    return f"step {step}/{last}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  ETA {format_duration(eta)}"
