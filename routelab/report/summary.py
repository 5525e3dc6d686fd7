"""Numbers of a comparison, read from its run folders: one ``Row`` per variant.

Everything comes from the run folders alone (``summary.json``, ``metrics.jsonl``, ``model/``), so a
report can be rebuilt at any time without retraining.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routelab.io import read_json
from routelab.report.flops import model_cost
from routelab.train.metrics import read_metrics


@dataclass
class Row:
    """One variant's line of the comparison table."""

    variant: str
    total_params: int
    active_params: int
    attention_flops: float  # forward FLOPs per token
    ffn_flops: float
    flops_per_token: float
    attention_density: float
    tokens_per_s: float | None
    peak_rss_mb: float | None
    steps: int
    seconds: float | None
    val_loss: float
    val_bpb: float | None
    val_accuracy: float | None
    steps_to_target: int | None  # first evaluation reaching the reference's final val loss
    seconds_to_target: float | None
    expert_load_cv: float | None  # coefficient of variation of tokens per expert (mean over MoE layers)
    dead_experts: int | None  # experts that got no token over the last logged steps (all layers)
    a2a_mb_per_step: float | None = None  # expert parallelism: MB each rank sent to others per step (all MoE layers)
    local_fraction: float | None = None  # (token, expert) pairs served on the token's own rank
    ranks_per_token: float | None = None  # ranks a token's experts sit on, mean
    comm_share: float | None = None  # share of the step inside all-to-all exchanges
    teacher_val_loss: float | None = None  # distillation: the teacher's final validation loss
    teacher_share: float | None = None  # share of training time inside the teacher's forward passes
    gain_kept: float | None = None  # share of the teacher's gain over the undistilled twin that the student kept
    tasks: dict[str, dict[str, float]] | None = None  # multi-task: {task: {val_loss, val_bpb or val_accuracy}}
    precision: str | None = None  # train.precision, when the variants do not all train in fp32

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, validation losses) of the evaluation lines of a metrics log."""
    evals = [r for r in records if r.get("split") == "val" and "loss" in r]
    return [int(r["step"]) for r in evals], [float(r["loss"]) for r in evals]


def time_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, elapsed seconds) of the training lines of a metrics log."""
    train = [r for r in records if "elapsed_s" in r and "split" not in r]
    return [int(r["step"]) for r in train], [float(r["elapsed_s"]) for r in train]


def steps_to_target(steps: list[int], losses: list[float], target: float) -> int | None:
    """First step whose validation loss is <= ``target`` (None if never)."""
    for s, loss in zip(steps, losses):
        if loss <= target:
            return s
    return None


def seconds_at(step: int, steps: list[int], elapsed: list[float]) -> float | None:
    """Training seconds at ``step``, linearly interpolated between logged steps (0 s at step 0)."""
    if not steps:
        return None
    return float(np.interp(step, [0, *steps], [0.0, *elapsed]))


def expert_load(records: list[dict], last: int = 5) -> tuple[float | None, int | None]:
    """(mean coefficient of variation of tokens per expert over MoE layers, dead experts), from the
    sum of the last ``last`` logged training lines; (None, None) for a model without experts."""
    train = [r for r in records if "split" not in r]
    keys = sorted({k for r in train for k in r if k.endswith("/tokens_per_expert")})
    if not keys:
        return None, None
    cvs, dead = [], 0
    for key in keys:
        loads = [r[key] for r in train if isinstance(r.get(key), list)][-last:]
        if not loads:
            continue
        total = np.sum(np.asarray(loads, dtype=np.float64), axis=0)  # (E,)
        mean = total.mean()
        cvs.append(float(total.std() / mean) if mean > 0 else math.nan)
        dead += int((total == 0).sum())
    return (float(np.nanmean(cvs)) if cvs else None), dead


def collect_row(name: str, run_dir: Path, target: float | None) -> Row:
    """Build ``name``'s row from its run folder; ``target`` is the reference's final val loss."""
    from routelab.train import load_run

    summary = read_json(run_dir / "summary.json")
    run = load_run(run_dir)
    cost = model_cost(run.model, run.cfg.data.seq_len)
    records = read_metrics(run_dir)
    e_steps, e_losses = eval_curve(records)
    t_steps, t_elapsed = time_curve(records)
    to_target = steps_to_target(e_steps, e_losses, target) if target is not None else None
    cv, dead = expert_load(records)
    comm = summary.get("communication") or {}
    distill = summary.get("distill") or {}
    teacher_summary = Path(distill["teacher"]) / "summary.json" if distill.get("teacher") else None
    teacher_loss = read_json(teacher_summary).get("val_loss") if teacher_summary and teacher_summary.is_file() else None
    return Row(
        variant=name,
        total_params=cost.total_params,
        active_params=cost.active_params,
        attention_flops=cost.attention_flops,
        ffn_flops=cost.ffn_flops,
        flops_per_token=cost.flops_per_token,
        attention_density=cost.attention_density,
        tokens_per_s=summary.get("tokens_per_s"),
        peak_rss_mb=summary.get("peak_rss_mb"),
        steps=int(summary["steps"]),
        seconds=summary.get("elapsed_s"),
        val_loss=float(summary["val_loss"]),
        val_bpb=summary.get("val_bpb"),
        val_accuracy=summary.get("val_accuracy"),
        steps_to_target=to_target,
        seconds_to_target=seconds_at(to_target, t_steps, t_elapsed) if to_target is not None else None,
        expert_load_cv=cv,
        dead_experts=dead,
        a2a_mb_per_step=comm["a2a_sent_bytes_per_step"] / 1e6 if comm else None,
        local_fraction=comm.get("local_fraction"),
        ranks_per_token=comm.get("ranks_per_token"),
        comm_share=comm.get("a2a_share"),
        teacher_val_loss=teacher_loss,
        teacher_share=distill.get("teacher_share"),
        tasks=summary.get("tasks"),
        precision=summary.get("precision", "fp32"),  # runs from before the key trained in fp32
    )


def gain_kept(student: float, twin: float, teacher: float) -> float | None:
    """Share of the teacher's validation-loss gain over the undistilled ``twin`` that the distilled
    ``student`` kept (Fedus et al. 2021, Switch Transformer sec. 4: about 30% for a sparse teacher
    distilled into a dense student): (twin - student) / (twin - teacher); None when the teacher is
    no better than the twin."""
    return (twin - student) / (twin - teacher) if twin > teacher else None


def undistilled_twin(name: str, configs: dict[str, Any]) -> str | None:
    """The variant whose config equals ``name``'s but for ``train.distill`` and without a teacher."""
    from routelab.train.run import NO_EFFECT_ON_RESULTS, config_differences

    for other, cfg in configs.items():
        if other == name or cfg.train.distill.teacher:
            continue
        differing = config_differences(cfg, configs[name], ignore=NO_EFFECT_ON_RESULTS)
        if all(d.startswith("train.distill.") for d in differing):
            return other
    return None


def collect_rows(variant_names: list[str], out: Path, reference: str | None) -> list[Row]:
    """Rows for every variant, the reference's final validation loss as the shared target (none
    when ``reference`` is None)."""
    from routelab.train.run import CONFIG_FILE, load_run_config

    target = float(read_json(out / reference / "summary.json")["val_loss"]) if reference else None
    rows = {name: collect_row(name, out / name, target) for name in variant_names}
    if any(r.teacher_val_loss is not None for r in rows.values()):
        configs = {name: load_run_config(out / name / CONFIG_FILE) for name in variant_names}
        for name, row in rows.items():
            twin = undistilled_twin(name, configs) if row.teacher_val_loss is not None else None
            if twin is not None:
                row.gain_kept = gain_kept(row.val_loss, rows[twin].val_loss, row.teacher_val_loss)
    if all(r.precision == "fp32" for r in rows.values()):  # the column appears only when precision varies
        for row in rows.values():
            row.precision = None
    return list(rows.values())
