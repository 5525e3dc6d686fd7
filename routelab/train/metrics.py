"""``metrics.jsonl``: one JSON object per line, appended as training goes.

Train lines hold ``step, loss, task_loss, aux_loss, lr, grad_norm, tokens_per_s, elapsed_s`` (MoE
models also ``router_grad_norm, expert_grad_norm``) and the
model's routing statistics flattened to ``routing/<layer>/<stat>``; eval lines hold
``step, split`` and the evaluation metrics (``loss`` and ``bpb`` or ``accuracy``). A line is written
with one ``write`` and flushed, so a killed run leaves at most one partial last line, which
``truncate_after`` drops on resume along with every line past the checkpoint.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from routelab.errors import ConfigError
from routelab.io import DamagedFileError, atomic_write_text

METRICS_FILE = "metrics.jsonl"


def to_jsonable(value: Any) -> Any:
    """A 0-d tensor becomes a float, any other tensor a (nested) list; numbers stay numbers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return str(value)


def flatten_routing(routing: dict) -> dict[str, Any]:
    """``{"layers.0.ffn": {"entropy": t}}`` -> ``{"routing/layers.0.ffn/entropy": float or list}``."""
    flat = {}
    for layer, stats in routing.items():
        for name, value in stats.items():
            flat[f"routing/{layer}/{name}"] = to_jsonable(value)
    return flat


def moe_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """``router_grad_norm`` and ``expert_grad_norm``: the L2 norms of the gradients of every MoE
    router weight and of every routed expert's weights, as the step applies them; {} without MoE.
    Their ratio says how hard the task loss pushes the router against the experts (the experts'
    share of a top-1 Switch gradient is scaled by the gate, about 1/E at the start)."""
    from routelab.moe.layer import MoE

    routers, experts = [], []
    for module in model.modules():
        if isinstance(module, MoE):
            routers += [p.grad for p in module.router.parameters() if p.grad is not None]
            experts += [p.grad for p in module.experts.parameters() if p.grad is not None]
    if not routers and not experts:
        return {}
    def norm(grads):  # a norm over FSDP shards is a DTensor: whole, the same on every rank
        total = torch.nn.utils.get_total_norm(grads)
        return total.full_tensor() if hasattr(total, "full_tensor") else total

    return {
        "router_grad_norm": float(norm(routers)) if routers else 0.0,
        "expert_grad_norm": float(norm(experts)) if experts else 0.0,
    }


def mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of flattened stats over micro-batches (numbers and equal-length lists);
    a key whose values cannot be averaged keeps its last value."""
    out: dict[str, Any] = {}
    for key in records[-1]:
        values = [r[key] for r in records if key in r]
        try:
            out[key] = torch.tensor(values, dtype=torch.float64).mean(0).tolist()
        except (TypeError, ValueError, RuntimeError):
            out[key] = values[-1]
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def open_tensorboard(log_dir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``; a clear error without the package."""
    return tensorboard_writer_class()(log_dir=str(log_dir))


def tensorboard_writer_class() -> Any:
    """``SummaryWriter``, or a ``ConfigError`` saying how to get it (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package (pip install tensorboard), which is not"
            " installed; install it or set train.tensorboard=false (metrics.jsonl is written either way)"
        ) from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record as TensorBoard tags: ``train/loss``, ``val/bpb``, and one tag per
    element of a list stat (``train/routing/layers.0.ffn/tokens_per_expert/3``)."""
    prefix = record.get("split", "train")
    out = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{prefix}/{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and, if given a writer, to TensorBoard."""

    def __init__(self, path: str | Path, tensorboard: Any = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.tensorboard = tensorboard  # a SummaryWriter (see ``open_tensorboard``) or None
        self.enabled = enabled  # False on the ranks of a distributed run other than 0: they write nothing

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _finite(v) for k, v in record.items()})
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
        if self.tensorboard is not None:
            for tag, value in scalars(record).items():
                self.tensorboard.add_scalar(tag, value, int(record["step"]))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step > step`` and unreadable lines (a partial write); return how many."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and record.get("step", 0) <= step
            except json.JSONDecodeError:
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (or of the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DamagedFileError(path, f"line {lineno} is not valid JSON ({e})") from None
    return records


def format_duration(seconds: float) -> str:
    """``45s``, ``1m32s``, ``1h05m``: how progress lines and reports show durations."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
