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
    dead_experts: float | None  # experts that got no token over the last logged steps (all layers; over seeds, the mean)
    router_entropy: float | None = None  # router entropy / ln E over the last logged steps, mean over MoE layers (1 = uniform)
    router_grad_ratio: float | None = None  # router gradient norm / experts' gradient norm, mean over the run's logged steps
    a2a_mb_per_step: float | None = None  # expert parallelism: MB each rank sent to others per step (all MoE layers)
    local_fraction: float | None = None  # (token, expert) pairs served on the token's own rank
    ranks_per_token: float | None = None  # ranks a token's experts sit on, mean
    comm_share: float | None = None  # share of the step inside all-to-all exchanges
    teacher_val_loss: float | None = None  # distillation: the teacher's final validation loss
    teacher_share: float | None = None  # share of training time inside the teacher's forward passes
    gain_kept: float | None = None  # share of the teacher's gain over the undistilled twin that the student kept
    tasks: dict[str, dict[str, float]] | None = None  # multi-task: {task: {val_loss, val_bpb or val_accuracy}}
    precision: str | None = None  # train.precision, when the variants do not all train in fp32
    # over seeds (``seeds`` > 1): the numbers above are means; ``*_ci`` the half-widths of their 95% intervals
    seeds: int | None = None  # None: one seed
    val_loss_ci: float | None = None
    val_bpb_ci: float | None = None
    val_accuracy_ci: float | None = None
    steps_to_target_ci: float | None = None
    tokens_per_s_min: float | None = None
    tokens_per_s_max: float | None = None
    vs_ref: float | None = None  # paired difference of ``metric`` to the reference (same seed, same batches)
    vs_ref_ci: float | None = None
    verdict: str | None = None  # better / worse / no detectable difference / one seed: not judged / reference
    metric: str | None = None  # the metric judged: val_bpb (LM), val_accuracy (classification) or val_loss
    per_seed: dict[int, float] | None = None  # seed -> that metric

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


def router_curves(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Per logged training step of a learned-router MoE: (steps, router entropy / ln E mean over MoE
    layers (1 = uniform routing, 0 = every token certain of its expert), router gradient norm over
    the experts' gradient norm); empty lists for models without a learned softmax router."""
    steps, entropy, ratio = [], [], []
    for r in records:
        if "split" in r or "router_grad_norm" not in r:
            continue
        hs = []
        for key, h in r.items():
            layer = key[: -len("router_entropy")]
            if key.endswith("/router_entropy") and isinstance(r.get(layer + "tokens_per_expert"), list):
                experts = len(r[layer + "tokens_per_expert"])
                if experts > 1:
                    hs.append(h / math.log(experts))
        if hs:
            steps.append(int(r["step"]))
            entropy.append(float(np.mean(hs)))
            ratio.append(float(r["router_grad_norm"]) / float(r["expert_grad_norm"]) if r.get("expert_grad_norm") else math.nan)
    return steps, entropy, ratio


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
    _, entropy, ratio = router_curves(records)
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
        router_entropy=float(np.mean(entropy[-5:])) if entropy else None,
        router_grad_ratio=float(np.nanmean(ratio)) if ratio else None,
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


def fill_gain_kept(rows: dict[str, Row], folders: dict[str, Path]) -> None:
    """Set ``gain_kept`` on every distilled row of one seed whose undistilled twin is among ``rows``
    (twins found from the run configs in ``folders``)."""
    from routelab.train.run import CONFIG_FILE, load_run_config

    if all(r.teacher_val_loss is None for r in rows.values()):
        return
    configs = {name: load_run_config(folder / CONFIG_FILE) for name, folder in folders.items() if name in rows}
    for name, row in rows.items():
        twin = undistilled_twin(name, configs) if row.teacher_val_loss is not None else None
        if twin is not None:
            row.gain_kept = gain_kept(row.val_loss, rows[twin].val_loss, row.teacher_val_loss)


SEED_DIR = "seed-{}"  # OUT/<variant>/seed-<s>/: one run folder per seed of a multi-seed comparison


def seed_folder(variant_dir: Path, seed: int, seeds: int) -> Path:
    """The run folder of ``seed`` of a variant: ``variant_dir`` itself in a one-seed comparison
    (unless an earlier multi-seed one left ``seed-0/`` there), else ``variant_dir/seed-<seed>``."""
    if seeds == 1 and not (variant_dir / SEED_DIR.format(0)).is_dir():
        return variant_dir
    return variant_dir / SEED_DIR.format(seed)


def judged_metric(row: Row) -> tuple[str, bool]:
    """(the metric a verdict judges, whether lower is better): bpb for an LM, else accuracy, else loss."""
    if row.val_bpb is not None:
        return "val_bpb", True
    if row.val_accuracy is not None:
        return "val_accuracy", False
    return "val_loss", True


def over_seeds(name: str, rows: dict[int, Row], reference: dict[int, Row] | None, seeds: int) -> Row:
    """One variant's row from its rows per seed: means with 95% intervals, the tokens/s range, and
    the paired difference of the judged metric to the reference's row of the same seed, with its verdict."""
    import dataclasses

    from routelab.report import stats

    first = rows[min(rows)]
    metric, lower_is_better = judged_metric(first)
    fields: dict[str, Any] = {"variant": name, "seeds": seeds}
    for key in ("val_loss", "val_bpb", "val_accuracy", "steps_to_target"):
        values = [getattr(r, key) for r in rows.values()]
        if any(v is None for v in values):  # steps to ref: reached in every seed, or shown as never
            fields[key], fields[f"{key}_ci"] = None, None
            continue
        e = stats.mean_interval(values)
        fields[key], fields[f"{key}_ci"] = e.mean, e.half_width
    speeds = [r.tokens_per_s for r in rows.values() if r.tokens_per_s is not None]
    if speeds:
        fields.update(tokens_per_s=sum(speeds) / len(speeds), tokens_per_s_min=min(speeds), tokens_per_s_max=max(speeds))
    for key in ("gain_kept", "router_entropy", "router_grad_ratio", "expert_load_cv", "dead_experts"):  # means, where every seed has one
        values = [getattr(r, key) for r in rows.values()]
        fields[key] = None if None in values else sum(values) / len(values)
    seconds = [r.seconds_to_target for r in rows.values()]
    fields["seconds_to_target"] = None if None in seconds else sum(seconds) / len(seconds)
    fields["metric"], fields["per_seed"] = metric, {s: getattr(r, metric) for s, r in sorted(rows.items())}
    if reference is not None and reference is not rows:
        diff = stats.paired_difference(fields["per_seed"], {s: getattr(r, metric) for s, r in reference.items()})
        if diff is not None:
            fields["vs_ref"], fields["vs_ref_ci"] = diff.mean, diff.half_width
        fields["verdict"] = stats.verdict(diff, lower_is_better)
    elif reference is not None:
        fields["verdict"] = "reference"
    return dataclasses.replace(first, **fields)


def collect_seed_rows(variant_names: list[str], out: Path, reference: str | None, seeds: int) -> list[Row]:
    """Rows of a multi-seed comparison (``seed_folder`` layout); each seed's 'steps to ref' targets
    the reference's final validation loss of the same seed."""
    per_seed: dict[str, dict[int, Row]] = {}
    for name in ([reference] if reference else []) + [n for n in variant_names if n != reference]:
        rows = {}
        for s in range(seeds):
            folder = seed_folder(out / name, s, seeds)
            if not (folder / "summary.json").is_file():
                continue
            target = per_seed[reference][s].val_loss if reference and name != reference and s in per_seed[reference] else None
            rows[s] = collect_row(name, folder, target)
            if name == reference:
                rows[s].steps_to_target = rows[s].steps
        per_seed[name] = rows
    for s in range(seeds):  # distillation: each seed's student against its twin of the same seed
        fill_gain_kept({n: rows[s] for n, rows in per_seed.items() if s in rows}, {n: seed_folder(out / n, s, seeds) for n in per_seed})
    ref = per_seed.get(reference) if reference else None
    result = [over_seeds(n, per_seed[n], ref if n != reference else per_seed[n], seeds) for n in variant_names if per_seed.get(n)]
    if all(r.precision == "fp32" for r in result):
        for row in result:
            row.precision = None
    return result


def collect_rows(variant_names: list[str], out: Path, reference: str | None, seeds: int = 1) -> list[Row]:
    """Rows for every variant, the reference's final validation loss as the shared target (none
    when ``reference`` is None); over ``seeds`` seeds: see ``collect_seed_rows``."""
    if seeds > 1:
        return collect_seed_rows(variant_names, out, reference, seeds)
    out_of = {name: seed_folder(out / name, 0, 1) for name in variant_names}
    target = float(read_json(out_of[reference] / "summary.json")["val_loss"]) if reference else None
    rows = {name: collect_row(name, out_of[name], target) for name in variant_names}
    fill_gain_kept(rows, {name: out_of[name] for name in variant_names})
    if all(r.precision == "fp32" for r in rows.values()):  # the column appears only when precision varies
        for row in rows.values():
            row.precision = None
    return list(rows.values())
