"""Plots of a comparison (matplotlib, imported lazily; ``pip install 'routelab[viz]'``).

Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'routelab[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def loss_curves(curves: dict[str, tuple[list[float], list[float]]], xlabel: str, path: Path,
                bands: dict[str, tuple[list[float], list[float], list[float]]] | None = None) -> Path:
    """Validation loss against ``xlabel`` (step or seconds), one line per variant; ``bands``
    (name -> x, low, high), e.g. the min-max over seeds, are shaded behind their variant's line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (x, y) in curves.items():
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=name)
        if bands and name in bands:
            bx, low, high = bands[name]
            ax.fill_between(bx, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def router_curves(curves: dict[str, tuple[list[int], list[float], list[float]]], path: Path) -> Path:
    """Two panels over training steps, one line per variant: router entropy / ln E (1 = uniform)
    and the router's gradient norm over the experts' (log scale)."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for name, (steps, entropy, ratio) in curves.items():
        left.plot(steps, entropy, label=name)
        right.plot(steps, ratio, label=name)
    left.set_ylabel("router entropy / ln E")
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_ylabel("router grad norm / experts' grad norm")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return _save(fig, path)


def quality_vs_cost(rows: list[Any], path: Path) -> Path:
    """Validation loss against active FLOPs per token and against training tokens/s."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for ax, key, label in (
        (axes[0], "flops_per_token", "forward FLOPs per token (active)"),
        (axes[1], "tokens_per_s", "training tokens / s"),
    ):
        for r in rows:
            x = getattr(r, key)
            if x is None:
                continue
            ax.scatter([x], [r.val_loss], s=30)
            ax.annotate(r.variant, (x, r.val_loss), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def expert_load_heatmap(loads: dict[str, np.ndarray], steps: list[int], title: str, path: Path) -> Path:
    """Per MoE layer, the fraction of routed tokens each expert got at each logged step.

    ``loads[layer]`` is (n_logged_steps, E).
    """
    plt = _plt()
    n = len(loads)
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.2 + 1.6 * n), squeeze=False)
    for ax, (layer, load) in zip(axes[:, 0], loads.items()):
        frac = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-9)  # (S, E)
        im = ax.imshow(frac.T, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0], steps[-1], frac.shape[1] - 0.5, -0.5))
        ax.set_ylabel(f"{layer}\nexpert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title, fontsize=10)
    return _save(fig, path)


def route_maps(maps: dict[str, np.ndarray], tokens: list[str] | None, title: str, path: Path) -> Path:
    """One heatmap per entry: rows = queries, columns = keys (or experts); values in [0, 1]."""
    plt = _plt()
    n = len(maps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, maps.items()):
        ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key" if m.shape[0] == m.shape[1] else "expert", fontsize=8)
        ax.set_ylabel("query token", fontsize=8)
        if tokens is not None and len(tokens) == m.shape[0] and len(tokens) <= 48:
            ax.set_yticks(range(len(tokens)), [t[:6] for t in tokens], fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def task_expert_map(loads: dict[str, np.ndarray], task_names: list[str], title: str, path: Path) -> Path:
    """Per MoE layer, a tasks x experts heatmap: each expert's share of a task's (token, expert)
    assignments (``loads[layer]`` is (N, E), from ``task_expert_loads``; each row sums to 1)."""
    plt = _plt()
    n = len(loads)
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.0 + (0.35 * len(task_names) + 0.8) * n), squeeze=False)
    for ax, (layer, load) in zip(axes[:, 0], loads.items()):
        share = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-9)  # (N, E)
        im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(task_names)), task_names, fontsize=8)
        ax.set_ylabel(layer, fontsize=8)
        ax.set_xticks(range(load.shape[1]))
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].set_title(title, fontsize=10)
    return _save(fig, path)
