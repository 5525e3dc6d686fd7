"""``routelab compare``: train several routing variants on one task under one budget, then report.

A comparison config (YAML)::

    base: lm-tiny                    # a preset name, or a run config path (relative to this file)
    budget: {steps: 300}             # exactly one of steps, tokens, seconds, shared by every variant
    set: [train.eval_every=100]      # overrides applied to every variant
    reference: dense                 # the variant whose final validation loss is the target
    variants:
      - {name: dense}
      - {name: switch, set: [model.ffn.kind=moe, model.ffn.router=switch]}

Variants train one after another into ``OUT/<name>/`` (each in its own process, so peak memory
is the variant's own); a finished variant is not rerun, an interrupted one resumes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from routelab.config import Config, ConfigError, check, from_dict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Variant:
    """One contender: a name (its folder) and ``section.key=value`` overrides of the base config."""

    _section = "variants[]"
    name: str = ""
    set: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(bool(NAME_RE.match(self.name)), "variant.name", self.name, "letters, digits, and _ . + - (a folder name)")


@dataclass
class Budget:
    """The same budget for every variant; exactly one field is set."""

    _section = "budget"
    steps: int | None = None  # optimizer steps
    tokens: int | None = None  # training tokens (steps = tokens / (batch_size * grad_accum * seq_len))
    seconds: float | None = None  # wall-clock seconds of training (train.max_seconds)

    def __post_init__(self) -> None:
        given = [k for k in ("steps", "tokens", "seconds") if getattr(self, k) is not None]
        check(len(given) == 1, "budget", {k: getattr(self, k) for k in given}, "exactly one of steps, tokens, seconds")
        check(getattr(self, given[0]) > 0, f"budget.{given[0]}", getattr(self, given[0]), "a number > 0")

    def overrides(self, cfg: Config) -> list[str]:
        if self.steps is not None:
            return [f"train.steps={self.steps}"]
        if self.tokens is not None:
            per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
            return [f"train.steps={max(1, round(self.tokens / per_step))}"]
        return [f"train.max_seconds={self.seconds}"]


@dataclass
class CompareConfig:
    """A whole comparison: base config, budget, shared overrides and the variants."""

    _section = "compare"
    base: str = ""
    budget: Budget = field(default_factory=lambda: Budget(steps=100))
    variants: list[Variant] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    reference: str | None = None  # None = the first variant
    eval_example: int = 0  # validation example whose attention routes the report shows

    def __post_init__(self) -> None:
        check(bool(self.base), "compare.base", self.base, "a preset name or a run config path")
        check(len(self.variants) > 0, "compare.variants", self.variants, "a non-empty list of {name, set}")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, "compare.variants", dupes, "unique variant names")
        if self.reference is not None:
            check(self.reference in names, "compare.reference", self.reference, f"one of the variant names {names}")

    @property
    def reference_name(self) -> str:
        return self.reference or self.variants[0].name


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> tuple[CompareConfig, dict[str, Config]]:
    """Read a comparison config and build every variant's run config, so any error (unknown key,
    bad value, missing base) surfaces before anything trains."""
    from routelab.cli import resolve_config_path

    path = resolve_config_path(str(path))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"comparison config {str(path)!r} must hold a mapping")
    cmp = from_dict(CompareConfig, data, "")
    base = Path(cmp.base)
    base_path = base if base.is_file() else (path.parent / base if (path.parent / base).is_file() else None)
    base_path = base_path or resolve_config_path(cmp.base)
    configs = {}
    for v in cmp.variants:
        sets = [*cmp.set, *(overrides or []), *v.set]
        try:
            cfg = Config.load(base_path, sets)
            configs[v.name] = Config.load(base_path, [*sets, *cmp.budget.overrides(cfg)])
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
    return cmp, configs


def run_variant(cfg: Config, out: Path, isolate: bool = True) -> dict[str, Any]:
    """Train one variant into ``out`` unless it already finished; resume it if interrupted."""
    import json

    from routelab.train.checkpoint import latest_checkpoint

    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("completed"):
            return summary
    resume = latest_checkpoint(out) is not None
    if not isolate:
        from routelab.train import train

        return train(cfg, out, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out.parent / f".{out.name}.config.yaml"
    cfg.save(cfg_path)
    cmd = [sys.executable, "-m", "routelab.cli", "train", str(cfg_path), "--out", str(out), "--no-sample"]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {out.name!r} failed (exit {proc.returncode}); see the error above")
    return json.loads(summary_path.read_text())


def compare(config_path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None, isolate: bool = True) -> Path:
    """Run every variant of a comparison, then write the report. Returns the report folder."""
    from tqdm import tqdm

    from routelab.report.compare_report import write_report

    cmp, configs = load_compare_config(config_path, overrides)
    out = Path(out) if out else Path("runs") / Path(str(config_path)).stem
    out.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()
    for i, name in enumerate(tqdm(configs, desc="variants", disable=not tty), 1):
        if not tty:  # logs and CI get one line per variant instead of bars
            print(f"[{i}/{len(configs)}] {name} -> {out / name}", file=sys.stderr, flush=True)
        run_variant(configs[name], out / name, isolate=isolate)  # a child shows its own step bar
    return write_report(cmp, out)
