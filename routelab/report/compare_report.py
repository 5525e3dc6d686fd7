"""The comparison report: ``report.md`` and ``report.html`` with plots beside them in ``plots/``."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from routelab.io import atomic_write_text
from routelab.report import plots
from routelab.report.summary import Row, collect_rows, eval_curve, router_curves, seed_folder, time_curve
from routelab.train.metrics import read_metrics

COLUMNS = [  # (header, Row attribute, format); a value with a ``<attribute>_ci`` shows "mean ± half-width"
    ("variant", "variant", "{}"),
    ("seeds", "seeds", "{}"),
    ("precision", "precision", "{}"),
    ("params", "total_params", "{:,}"),
    ("active", "active_params", "{:,}"),
    ("attn MFLOP/tok", "attention_flops", "{:.2f}", 1e-6),
    ("ffn MFLOP/tok", "ffn_flops", "{:.2f}", 1e-6),
    ("attn density", "attention_density", "{:.2f}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_rss_mb", "{:.0f}"),
    ("steps", "steps", "{}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("val bpb", "val_bpb", "{:.4f}"),
    ("val acc", "val_accuracy", "{:.3f}"),
    ("steps to ref", "steps_to_target", "{:.0f}"),
    ("s to ref", "seconds_to_target", "{:.0f}"),
    ("expert CV", "expert_load_cv", "{:.2f}"),
    ("dead experts", "dead_experts", "{:.3g}"),
    ("router H", "router_entropy", "{:.2f}"),
    ("router/expert grad", "router_grad_ratio", "{:.2f}"),
    ("vs ref", "vs_ref", "{:+.4f}"),
    ("verdict", "verdict", "{}"),
    ("a2a MB/step", "a2a_mb_per_step", "{:.2f}"),
    ("local pairs", "local_fraction", "{:.0%}"),
    ("ranks/token", "ranks_per_token", "{:.2f}"),
    ("a2a share", "comm_share", "{:.0%}"),
    ("teacher loss", "teacher_val_loss", "{:.4f}"),
    ("teacher time", "teacher_share", "{:.0%}"),
    ("gain kept", "gain_kept", "{:.0%}"),
]


LEGEND = {  # header -> what it means, for the report's readers
    "seeds": "runs per variant (train.seed 0..N-1, the same batches for every variant at a seed); numbers are means ± the half-width of their 95% t-interval",
    "vs ref": "paired difference to the reference of the judged metric (bpb for an LM, else accuracy, else loss), mean over seeds ± 95% interval",
    "verdict": "better / worse when the paired difference's 95% interval excludes 0; otherwise no detectable difference at this budget",
    "precision": "train.precision: the forward pass's autocast dtype (weights, optimizer state and routing stay float32)",
    "active": "parameters a token uses (the chosen experts only)",
    "attn MFLOP/tok": "forward attention FLOPs per token, all layers, counting only the pairs the kind computes",
    "ffn MFLOP/tok": "forward FFN FLOPs per token (router + the active experts)",
    "attn density": "attention pairs computed / dense pairs",
    "tok/s": "training tokens per second (forward + backward + optimizer)",
    "peak MB": "peak resident memory of the training process",
    "steps to ref": "first evaluated step whose validation loss reached the reference's final one (- = never)",
    "s to ref": "training seconds to that step",
    "expert CV": "coefficient of variation of tokens per expert over the last 5 logged steps, mean over MoE layers (0 = balanced)",
    "dead experts": "experts (summed over MoE layers) that received no token in the last 5 logged steps",
    "router H": "router entropy over ln E (1 = uniform routing, 0 = each token certain of its expert), last 5 logged steps, mean over MoE layers (and seeds)",
    "router/expert grad": "norm of the routers' gradient over the norm of the experts' gradient, mean over the logged steps (and seeds)",
    "a2a MB/step": "expert parallelism: megabytes each process sent to the others per training step, all MoE layers, forward and backward",
    "local pairs": "(token, expert) pairs whose expert sat on the token's own process (moved no data)",
    "ranks/token": "processes a token's chosen experts sat on, mean over tokens and MoE layers",
    "a2a share": "share of the training step spent inside the all-to-all exchanges (including waiting for the slowest process)",
    "teacher loss": "distillation: the teacher's final validation loss",
    "teacher time": "share of training time spent in the teacher's forward passes (counted in tok/s)",
    "gain kept": "(twin - student) / (twin - teacher) validation loss, the twin being the variant with the same config but no teacher",
}


def legend(rows: list[Row]) -> list[tuple[str, str]]:
    """(header, meaning) for the columns of this table that need one."""
    headers, _ = table(rows)
    tasks = [c[0] for c in task_columns(rows) if c[0] in headers]
    extra = [(", ".join(tasks), "multi-task runs: each task's final validation loss and bits per byte or accuracy")] if tasks else []
    return [(h, LEGEND[h]) for h in headers if h in LEGEND] + extra


TASK_COLUMNS = [("loss", "val_loss", "{:.4f}"), ("bpb", "val_bpb", "{:.4f}"), ("acc", "val_accuracy", "{:.3f}")]


def _value(row: Row, attr: str | tuple[str, str]) -> Any:
    """A Row attribute, or ``(task, key)``: a multi-task run's number for one task."""
    if isinstance(attr, tuple):
        return ((row.tasks or {}).get(attr[0]) or {}).get(attr[1])
    return getattr(row, attr)


def task_columns(rows: list[Row]) -> list[tuple]:
    """A column group per task of the multi-task rows (``<task> loss``, ``<task> bpb`` / ``<task> acc``),
    tasks in the order they first appear."""
    names = list(dict.fromkeys(name for r in rows for name in (r.tasks or {})))
    return [(f"{name} {short}", (name, key), fmt) for name in names for short, key, fmt in TASK_COLUMNS]


def _cell(row: Row, col: tuple) -> str:
    value = _value(row, col[1])
    if value is None:
        return "-"
    scale = col[3] if len(col) > 3 else 1
    text = col[2].format(value * scale)
    if isinstance(col[1], str):
        ci = getattr(row, f"{col[1]}_ci", None)
        if ci is not None:  # over seeds: mean ± half-width of the 95% interval
            text += " ± " + col[2].format(ci * scale).lstrip("+")
        if col[1] == "tokens_per_s" and row.tokens_per_s_min is not None:  # the spread over seeds
            text += f" ({row.tokens_per_s_min:,.0f}-{row.tokens_per_s_max:,.0f})"
    return text


ONE_SEED_NOTE = ("One seed per variant: differences between variants cannot be judged (seed noise is unknown);"
                 " run with --seeds 3 or more for intervals and verdicts.")


def seed_note(rows: list[Row]) -> str | None:
    """The one line a one-seed comparison carries (None over seeds)."""
    return ONE_SEED_NOTE if rows and all(r.seeds is None for r in rows) else None


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells, leaving out columns that are empty for every row."""
    cols = [c for c in [*COLUMNS, *task_columns(rows)] if any(_value(r, c[1]) is not None for r in rows)]
    return [c[0] for c in cols], [[_cell(r, c) for c in cols] for r in rows]


def plain_table(rows: list[Row]) -> str:
    headers, cells = table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def markdown_table(rows: list[Row]) -> str:
    headers, cells = table(rows)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(out)


def html_table(rows: list[Row]) -> str:
    headers, cells = table(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in c) + "</tr>" for c in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def expert_loads(records: list[dict]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Per MoE layer, tokens per expert at each logged step: ({layer: (S, E)}, steps)."""
    train = [r for r in records if "split" not in r]
    keys = sorted({k for r in train for k in r if k.endswith("/tokens_per_expert")})
    loads, steps = {}, [int(r["step"]) for r in train if keys and isinstance(r.get(keys[0]), list)]
    for key in keys:
        layer = key.split("/")[1]
        loads[layer] = np.asarray([r[key] for r in train if isinstance(r.get(key), list)], dtype=np.float64)
    return loads, steps


def make_plots(names: list[str], out: Path, rows: list[Row], cmp: Any) -> list[tuple[str, Path]]:
    """Write every plot of the report; returns (caption, path) pairs. Over seeds, the curves and maps
    are seed 0's (``dirs``)."""
    pdir = out / "plots"
    dirs = {n: seed_folder(out / n, 0, getattr(cmp, "seeds", 1)) for n in names}
    records = {n: read_metrics(dirs[n]) for n in names}
    by_step = {n: eval_curve(records[n]) for n in names}
    by_time = {}
    for n in names:
        steps, losses = by_step[n]
        t_steps, t_elapsed = time_curve(records[n])
        by_time[n] = ([float(np.interp(s, [0, *t_steps], [0.0, *t_elapsed])) for s in steps], losses)
    seeds = getattr(cmp, "seeds", 1)
    bands = seed_bands(names, out, seeds) if seeds > 1 else {}
    by_step.update({n: (x, mean) for n, (x, mean, _, _) in bands.items()})
    over = f" (mean over {seeds} seeds; band: min to max)" if bands else ""
    figs = [
        (f"Validation loss by step{over}", plots.loss_curves(by_step, "step", pdir / "val_loss_by_step.png",
                                                             {n: (x, lo, hi) for n, (x, _, lo, hi) in bands.items()})),
        ("Validation loss by wall-clock training time", plots.loss_curves(by_time, "training seconds", pdir / "val_loss_by_time.png")),
        ("Quality against cost", plots.quality_vs_cost(rows, pdir / "quality_vs_cost.png")),
    ]
    routers = mean_router_curves(names, out, seeds)
    if routers:
        figs.append((f"Learned routers over training: entropy and gradient share{' (mean over seeds)' if seeds > 1 else ''}",
                     plots.router_curves(routers, pdir / "routers.png")))
    for n in names:
        loads, steps = expert_loads(records[n])
        if loads and len(steps) > 1:
            path = plots.expert_load_heatmap(loads, steps, f"{n}: share of tokens per expert", pdir / f"expert_load_{n}.png")
            figs.append((f"Expert load over training: {n}", path))
    for n, (loads, task_names) in task_expert_maps(names, dirs).items():
        path = plots.task_expert_map(loads, task_names, f"{n}: experts per task (validation)", pdir / f"task_experts_{n}.png")
        figs.append((f"Experts per task: {n}", path))
    routes = attention_route_maps(names, dirs, cmp.eval_example)
    if routes:
        maps, tokens = routes
        figs.append(("Attention routes of one validation example (layer 0, mean over heads)",
                     plots.route_maps(maps, tokens, "who attends where", pdir / "attention_routes.png")))
    return figs


def over_seeds_curve(out: Path, name: str, seeds: int, curve: Any) -> tuple[list[int], np.ndarray] | None:
    """``curve(records) -> {step: value or tuple}`` of each seed's metrics log of variant ``name``, at
    the steps every seed has: (steps, array (seeds, steps, ...)); None when no step is common."""
    curves = []
    for s in range(seeds):
        folder = seed_folder(out / name, s, seeds)
        if (folder / "metrics.jsonl").is_file():
            curves.append(curve(read_metrics(folder)))
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return (steps, np.array([[c[st] for st in steps] for c in curves], dtype=np.float64)) if steps else None


def seed_bands(names: list[str], out: Path, seeds: int) -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """Per variant, its validation-loss curve over seeds at the steps every seed evaluated:
    (steps, mean, min, max)."""
    bands = {}
    for n in names:
        found = over_seeds_curve(out, n, seeds, lambda records: dict(zip(*eval_curve(records))))
        if found:
            steps, ys = found  # (seeds, steps)
            bands[n] = (steps, ys.mean(0).tolist(), ys.min(0).tolist(), ys.max(0).tolist())
    return bands


def mean_router_curves(names: list[str], out: Path, seeds: int) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per learned-router MoE variant, ``router_curves`` averaged over its seeds at the steps every
    seed logged: (steps, entropy / ln E, router/expert gradient norm)."""
    result = {}
    for n in names:
        found = over_seeds_curve(out, n, seeds, lambda records: {st: (h, q) for st, h, q in zip(*router_curves(records))})
        if found:
            steps, values = found  # (seeds, steps, 2)
            result[n] = (steps, values[..., 0].mean(0).tolist(), values[..., 1].mean(0).tolist())
    return result


def task_expert_maps(names: list[str], dirs: dict[str, Path], batches: int = 2) -> dict[str, tuple[dict[str, np.ndarray], list[str]]]:
    """For each multi-task variant with MoE layers: per layer, the (tasks, experts) load matrix over
    the first ``batches`` validation batches of every task (each task's own inputs, routed as that task)."""
    import torch

    from routelab.data import LMData, lm_eval_batches
    from routelab.data.classification import classification_eval_batches
    from routelab.report.inspect import task_expert_loads
    from routelab.train import load_run

    maps = {}
    for n in names:
        run = load_run(dirs[n], with_data=True, map_location=None)  # on the variant's own train.device
        cfg = run.cfg
        if not cfg.model.task_names or len(cfg.model.task_names) < 2 or cfg.model.ffn.kind != "moe":
            continue
        total: dict[str, np.ndarray] = {}
        for t, (task, seq_len) in enumerate(zip(run.data.tasks, run.data.seq_lens)):
            if isinstance(task, LMData):
                inputs = [(x, None) for x in lm_eval_batches(task.val, cfg.train.batch_size, seq_len, batches)]
            else:
                inputs = []
                for i, b in enumerate(classification_eval_batches(task.val, cfg.train.batch_size)):
                    if i >= batches:
                        break
                    c = task.collate(b, seq_len, True)
                    inputs.append((c["input_ids"], c["attention_mask"]))
            for ids, mask in inputs:
                with torch.no_grad():
                    loads = task_expert_loads(run.model, ids, torch.full((ids.shape[0],), t, dtype=torch.long), mask)
                for layer, load in loads.items():
                    total[layer] = total.get(layer, 0) + load
        if total:
            maps[n] = (total, list(cfg.model.task_names))
    return maps


def attention_route_maps(names: list[str], dirs: dict[str, Path], example: int) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """Layer-0 attention routes of each attention kind (its first variant) on one validation example."""
    from routelab.report.inspect import attention_routes, validation_example
    from routelab.train import load_run

    maps, tokens, kinds = {}, None, set()
    for n in names:
        run = load_run(dirs[n], with_data=True, map_location=None)  # on the variant's own train.device
        if run.cfg.model.attention.kind in kinds:
            continue  # one map per attention kind
        kinds.add(run.cfg.model.attention.kind)
        try:
            ids, toks = validation_example(run, example)
        except ValueError as e:  # eval_example beyond this data's validation split
            logging.getLogger("routelab.report").warning("no attention-route plot: %s", e)
            return None
        routes = attention_routes(run.model, ids, task=0 if run.cfg.model.task_names else None)  # a multi-task model: its first task
        if routes:
            maps[f"{n} ({run.cfg.model.attention.kind})"] = routes[0].mean(0)  # layer 0, mean over heads
            tokens = tokens or toks
    return (maps, tokens) if maps else None


def prepared_lines(cmp: Any, out: Path) -> list[str]:
    """One sentence per prepared run (``prepare:`` in the comparison): its steps and final validation."""
    from routelab.train.run import finished_summary

    lines = []
    for p in getattr(cmp, "prepare", []):
        summary = finished_summary(out / "prepare" / p.name) or {}
        scores = ", ".join(f"{k} {summary[k]:.4f}" for k in ("val_loss", "val_bpb", "val_accuracy") if k in summary)
        lines.append(f"Prepared run `{p.name}` (`{p.config or cmp.base}`, {p.steps} steps): {scores or 'not finished'}.")
    return lines


def write_report(cmp: Any, out: Path, failed: dict[str, str] | None = None) -> Path:
    """Collect rows, draw plots, write ``report.md``, ``report.html`` and ``results.json`` in ``out``.

    ``failed`` (variant name -> its error) are left out of the table and listed under it; without
    the reference, 'steps to ref' stays empty."""
    failed = failed or {}
    names = [v.name for v in cmp.variants if v.name not in failed]
    reference = cmp.reference_name if cmp.reference_name not in failed else None
    rows = collect_rows(names, out, reference, getattr(cmp, "seeds", 1))
    figs = make_plots(names, out, rows, cmp)
    note = seed_note(rows)
    atomic_write_text(out / "results.json", json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    intro = (
        f"Base config `{cmp.base}`, budget {json.dumps({k: v for k, v in vars(cmp.budget).items() if v is not None})}, "
        f"reference `{cmp.reference_name}` (its final validation loss is the target of 'steps to ref'). "
        "FLOPs are forward FLOPs per token counting only the work each kind does."
    )
    failures = [f"Variant `{n}` failed and is not in the table: {why}" for n, why in failed.items()]
    prepared = prepared_lines(cmp, out)
    md = ["# routelab comparison", "", intro, "", *[f"- {line}" for line in prepared], *([""] if prepared else [])]
    md += [markdown_table(rows), ""] + ([note, ""] if note else [])
    md += [f"- **{h}**: {m}" for h, m in legend(rows)] + [""]
    md += [f"**{f}**" for f in failures] + ([""] if failures else [])
    for caption, path in figs:
        md += [f"## {caption}", "", f"![{caption}]({path.relative_to(out)})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    body = "".join(
        f"<h2>{html.escape(c)}</h2><img src=\"{html.escape(str(p.relative_to(out)))}\" alt=\"{html.escape(c)}\">" for c, p in figs
    )
    notes = "<ul>" + "".join(f"<li><b>{html.escape(h)}</b>: {html.escape(m)}</li>" for h, m in legend(rows)) + "</ul>"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>routelab comparison</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}img{max-width:100%}"
        f"</style></head><body><h1>routelab comparison</h1><p>{html.escape(intro)}</p>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in prepared)
        + f"{html_table(rows)}" + (f"<p>{html.escape(note)}</p>" if note else "") + notes
        + "".join(f"<p><b>{html.escape(f)}</b></p>" for f in failures)
        + f"{body}</body></html>"
    )
    atomic_write_text(out / "report.html", page)
    print(plain_table(rows))
    if note:
        print(note)
    print(f"\nreport: {out / 'report.html'}")
    return out
