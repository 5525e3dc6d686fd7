"""``routelab inspect RUN_DIR``: pages and heatmaps of one input's routing decisions.

Writes into ``OUT`` (default ``RUN_DIR/inspect``):
- ``experts.html``: the tokens coloured by the expert with the largest gate, per MoE layer (hover a
  token for all its experts and gates);
- ``experts_<layer>.png``: tokens x experts heatmap of gate weights, per MoE layer;
- ``attention_layer<i>.png``: per attention layer, one tokens x tokens map per head (and, for a
  fixed pattern, the pairs it allows);
- ``task_experts.png`` (multi-task models): tasks x experts heatmap per MoE layer, the input routed
  as each task in turn, with the tasks' expert overlap (Jaccard) in the page;
- ``routes.json``: the numbers behind the pictures.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from routelab.report import plots
from routelab.report.inspect import (
    allowed_pairs,
    attention_routes,
    expert_routes,
    task_expert_loads,
    text_example,
    validation_example,
)

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"]


def token_html(tokens: list[str], gates: np.ndarray) -> str:
    """Tokens as spans coloured by their top expert; ``gates`` (T, E)."""
    spans = []
    for tok, g in zip(tokens, gates):
        chosen = np.flatnonzero(g > 0)
        title = ", ".join(f"expert {e}: {g[e]:.3f}" for e in chosen) or "no expert (dropped)"
        color = PALETTE[int(g.argmax()) % len(PALETTE)] if chosen.size else "#ffffff"
        text = html.escape(tok).replace("\n", "&#9166;<br>") or "&nbsp;"
        spans.append(f'<span style="background:{color}55" title="{html.escape(title)}">{text}</span>')
    return "".join(spans)


def inspect_run(
    run_dir: str | Path, text: str | None = None, example: int | None = None, out: str | Path | None = None, task: str | None = None,
    device: str | None = None,
) -> Path:
    """Write the inspection pages and images of one input; returns the output folder. ``task``: the
    task the per-token views route the input as (multi-task models; default the first task).
    ``device``: where the model runs (None: the run's own ``train.device``)."""
    from routelab.outputs import check_inspect_target
    from routelab.train import load_run

    out = check_inspect_target(Path(out) if out else Path(run_dir) / "inspect")  # never among a user's files
    if text is not None and not text:
        raise ValueError("--text is empty (no tokens to route); give at least one character")
    run = load_run(run_dir, with_data=text is None, map_location=device)
    ids, tokens = text_example(run, text) if text is not None else validation_example(run, example or 0)
    out.mkdir(parents=True, exist_ok=True)
    names = run.cfg.model.task_names or []
    task_idx = None
    if names:
        from routelab.pretrained.extract import task_index

        task_idx = task_index(run.cfg.model, task if task is not None else names[0])
    elif task is not None:
        raise ValueError(f"--task {task!r} given, but this run has one task (model.task_names is not set)")
    experts = expert_routes(run.model, ids, task_idx)
    attn = attention_routes(run.model, ids, task_idx)
    sections = []
    by_task = _task_section(run.model, ids, names, out) if len(names) > 1 and experts else None
    if by_task is not None:
        sections.append(by_task[0])
    for layer, gates in experts.items():
        png = plots.route_maps({layer: gates}, tokens, f"{layer}: gate of each expert per token", out / f"experts_{layer}.png")
        sections.append(f"<h2>{layer}</h2><p>{token_html(tokens, gates)}</p><img src='{png.name}'>")
    masks = allowed_pairs(run.model, len(tokens))
    for i, (weights, mask) in enumerate(zip(attn, masks)):
        heads = {f"head {h}": w for h, w in enumerate(weights)}
        if mask is not None:  # a fixed pattern: show what it allows beside what the heads use
            allowed = {"allowed pairs" if len(mask) == 1 else f"allowed, head {h}": m.astype(np.float32) for h, m in enumerate(mask)}
            heads = {**allowed, **heads}
        kind = run.cfg.model.attention.kind
        plots.route_maps(heads, tokens, f"layer {i} ({kind}): attention weights", out / f"attention_layer{i}.png")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>routelab inspect</title>"
        "<style>body{font-family:monospace;max-width:1000px;margin:2em auto}span{white-space:pre-wrap}</style></head>"
        f"<body><h1>Expert routing of {len(tokens)} tokens</h1>"
        + ("".join(sections) or "<p>This model has no MoE layers.</p>")
        + "".join(f"<h2>attention layer {i}</h2><img src='attention_layer{i}.png' style='max-width:100%'>" for i in range(len(attn)))
        + "</body></html>"
    )
    (out / "experts.html").write_text(page)
    record = {
        "tokens": tokens,
        "experts": {k: v.tolist() for k, v in experts.items()},
        "attention_mean_over_heads": [w.mean(0).tolist() for w in attn],
        "allowed_pairs": [None if m is None else m.astype(int).tolist() for m in masks],  # (1 or H, T, T)
    }
    if by_task is not None:
        record["task_names"], record["task_expert_load"], record["task_overlap_jaccard"] = names, *by_task[1:]
    (out / "routes.json").write_text(json.dumps(record))
    return out


def _task_section(model, ids, names: list[str], out: Path) -> tuple[str, dict, dict]:
    """The input routed as each task: (HTML section, per-layer (N, E) loads, per-layer (N, N) Jaccard overlaps)."""
    import torch

    from routelab.moe.task_stats import task_overlap

    n = len(names)
    loads = task_expert_loads(model, ids.expand(n, -1), torch.arange(n))
    png = plots.task_expert_map(loads, names, "expert share of each task's tokens (this input routed as each task)", out / "task_experts.png")
    overlap = {layer: task_overlap(torch.from_numpy(load)).numpy() for layer, load in loads.items()}
    rows = []
    for layer, m in overlap.items():
        head = "".join(f"<th>{html.escape(t)}</th>" for t in names)
        body = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(f"<td>{v:.2f}</td>" for v in row) + "</tr>" for a, row in zip(names, m))
        rows.append(f"<h3>{layer}: expert overlap between tasks (Jaccard)</h3><table><tr><th></th>{head}</tr>{body}</table>")
    section = f"<h2>Experts per task</h2><img src='{png.name}'>" + "".join(rows)
    return section, {k: v.tolist() for k, v in loads.items()}, {k: v.tolist() for k, v in overlap.items()}
