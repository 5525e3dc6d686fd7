"""``routelab compare``: train several routing variants on one task under one budget, then report.

A comparison config (YAML)::

    base: lm-tiny                    # a preset name, or a run config path (relative to this file)
    budget: {steps: 300}             # exactly one of steps, tokens, seconds, flops, shared by every variant
    set: [train.eval_every=100]      # overrides applied to every variant
    reference: dense                 # the variant whose final validation loss is the target
    nproc: 1                         # processes per variant (>1: each trains with routelab train --nproc)
    prepare:                         # runs the variants start from or learn from, trained first
      - {name: teacher, config: lm-moe-topk-tiny, steps: 400}
    variants:
      - {name: dense}
      - {name: switch, set: [model.ffn.kind=moe, model.ffn.router=switch]}
      - {name: distilled, set: [train.distill.teacher=@teacher]}

Variants train one after another into ``OUT/<name>/`` (each in its own process, so peak memory
is the variant's own); a finished variant is not rerun, an interrupted one resumes, and one trained
with a different config is refused unless ``force`` (``--force``) retrains it. The budget belongs to
the comparison: ``--set train.steps=...`` is refused in favour of ``--steps/--tokens/--seconds``.

``prepare`` runs (a trained model to continue or upcycle, a teacher to distil from) train first, each
with its own config and steps, into ``OUT/prepare/<name>/``, under the same done/resume/refuse rules;
a value ``@name`` in any ``set`` (of a variant, or of a later prepared run) stands for that folder.
They are not contenders: the report lists them apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routelab.config import Config, from_dict, read_yaml_mapping, resolve_base
from routelab.data import DataError
from routelab.errors import ERROR_FILE_ENV, ConfigError, check
from routelab.io import atomic_write, check_folder_target, replace_dir
from routelab.lock import locked
from routelab.outputs import check_only, check_run_target, is_run_entry
from routelab.presets import resolve_config_path
from routelab.report.summary import seed_folder
from routelab.train.distributed import die_with_parent
from routelab.train.metrics import format_duration

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
class Prepared:
    """A run trained before the variants, which they refer to as ``@name`` (e.g. ``train.init_from=@base``)."""

    _section = "prepare[]"
    name: str = ""
    config: str | None = None  # a preset name or a run config path (relative to the comparison); None = base
    steps: int = 100  # its own budget, not the comparison's
    set: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(bool(NAME_RE.match(self.name)), "prepare.name", self.name, "letters, digits, and _ . + - (a folder name)")
        check(self.steps >= 1, "prepare.steps", self.steps, "an integer >= 1")


BUDGETS = ("steps", "tokens", "seconds", "flops")
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ~ 3x the forward pass (Kaplan et al. 2020, sec. 2.1: C ~ 6N)


@dataclass
class Budget:
    """The same budget for every variant; exactly one field is set."""

    _section = "budget"
    steps: int | None = None  # optimizer steps
    tokens: int | None = None  # training tokens (steps = tokens / (batch_size * grad_accum * seq_len))
    seconds: float | None = None  # wall-clock seconds of training (train.max_seconds)
    flops: float | None = None  # training FLOPs: steps = flops / (3 x forward FLOPs per token x tokens per step)

    def __post_init__(self) -> None:
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        check(len(given) == 1, "budget", {k: getattr(self, k) for k in given}, f"exactly one of {', '.join(BUDGETS)}")
        check(getattr(self, given[0]) > 0, f"budget.{given[0]}", getattr(self, given[0]), "a number > 0")

    def overrides(self, cfg: Config) -> list[str]:
        if self.steps is not None:
            return [f"train.steps={self.steps}"]
        per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len  # tokens per optimizer step
        if self.tokens is not None:
            return [f"train.steps={max(1, round(self.tokens / per_step))}"]
        if self.flops is not None:  # equal compute: a variant with more active FLOPs per token gets fewer steps
            per_token = TRAIN_FLOPS_PER_FORWARD * forward_flops_per_token(cfg)
            return [f"train.steps={max(1, round(self.flops / (per_token * per_step)))}"]
        return [f"train.max_seconds={self.seconds}"]


def forward_flops_per_token(cfg: Config) -> float:
    """Forward FLOPs per token of ``cfg``'s model at its ``data.seq_len`` (``routelab.report.flops``:
    only the work each attention kind and router does; the active experts). A vocabulary left to
    the tokenizer counts as the tokenizer's size (``with_placeholder_sizes``)."""
    from routelab.model import RoutedTransformer
    from routelab.report.flops import model_cost
    from routelab.train.run import with_placeholder_sizes

    model = RoutedTransformer(with_placeholder_sizes(cfg))  # on the CPU: sparse kinds' masks are counted
    return model_cost(model, cfg.data.seq_len).flops_per_token


@dataclass
class CompareConfig:
    """A whole comparison: base config, budget, shared overrides and the variants."""

    _section = "compare"
    base: str = ""
    budget: Budget = field(default_factory=lambda: Budget(steps=100))
    variants: list[Variant] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    prepare: list[Prepared] = field(default_factory=list)  # runs trained first, referred to as @name
    reference: str | None = None  # None = the first variant
    eval_example: int = 0  # validation example whose attention routes the report shows
    nproc: int = 1  # processes each variant trains with (torch.distributed.run on this machine)
    seeds: int = 1  # runs per variant, train.seed = 0..seeds-1, in OUT/<variant>/seed-<s>/ (1: OUT/<variant>/)

    def __post_init__(self) -> None:
        check(self.nproc >= 1, "compare.nproc", self.nproc, "an integer >= 1")
        check(self.seeds >= 1, "compare.seeds", self.seeds, "an integer >= 1 (3 or more for intervals)")
        check(bool(self.base), "compare.base", self.base, "a preset name or a run config path")
        check(len(self.variants) > 0, "compare.variants", self.variants, "a non-empty list of {name, set}")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, "compare.variants", dupes, "unique variant names")
        if self.reference is not None:
            check(self.reference in names, "compare.reference", self.reference, f"one of the variant names {names}")
        prepared = [p.name for p in self.prepare]
        dupes = sorted({n for n in prepared if prepared.count(n) > 1})
        check(not dupes, "compare.prepare", dupes, "unique names")

    @property
    def reference_name(self) -> str:
        return self.reference or self.variants[0].name


BUDGET_KEYS = ("train.steps", "train.max_seconds")  # set only by the budget, so every variant gets the same


class VariantError(ValueError):
    """One variant of a comparison failed to train; the message is its one-line error."""


def _budget_overrides(sets: list[str], where: str, prepared: bool = False) -> None:
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key in BUDGET_KEYS:
            raise ConfigError(
                f"{where} sets {key!r}, but a prepared run's budget is its steps: field" if prepared else
                f"{where} sets {key!r}, but a comparison gives every variant the same budget; set it with"
                " budget: in the comparison config or --steps/--tokens/--seconds on the command line"
            )


PREPARE_DIR = "prepare"  # OUT/prepare/<name>/: the prepared runs


def default_out(config_path: str | Path) -> Path:
    return Path("runs") / Path(str(config_path)).stem


def resolve_refs(sets: list[str], known: list[str], out: Path, where: str) -> tuple[list[str], list[str]]:
    """Replace every value ``@name`` in ``sets`` by the folder of prepared run ``name``; returns (the
    resolved sets, the items that held a reference). A name not in ``known`` is an error."""
    resolved, refs = [], []
    for item in sets:
        key, sep, value = item.partition("=")
        if sep and value.strip().startswith("@"):
            name = value.strip()[1:]
            if name not in known:
                allowed = ", ".join(f"@{n}" for n in known) or "none: the comparison has no prepare: runs (before this one)"
                raise ConfigError(f"{where}: {item!r} refers to no prepared run; allowed: {allowed}")
            item = f"{key}={out / PREPARE_DIR / name}"
            refs.append(item)
        resolved.append(item)
    return resolved, refs


def _checked(base_path: Path, sets: list[str], refs: list[str], nproc: int) -> Config:
    """The config of ``sets``, after ``preflight`` of the same config without the items in ``refs``
    (their folders are trained by the comparison itself, so they need not exist yet)."""
    from routelab.train.run import preflight

    preflight(Config.load(base_path, [s for s in sets if s not in refs]), nproc)
    return Config.load(base_path, sets)


def load_compare_config(
    path: str | Path,
    overrides: list[str] | None = None,
    budget: dict[str, Any] | None = None,
    nproc: int | None = None,
    out: str | Path | None = None,
    seeds: int | None = None,
    reference: str | None = None,
) -> tuple[CompareConfig, dict[str, Config]]:
    """Read a comparison config and build and check every variant's run config (``preflight``: the
    model is built on the meta device, the data source must exist, optional packages be present),
    so any error surfaces before anything trains. ``budget`` (e.g. ``{"steps": 600}``, from the
    command line) replaces the config's budget, and ``nproc`` its processes per variant. The
    prepared runs' configs come back too, under ``prepare/<name>``; ``@name`` references resolve to
    folders under ``out`` (default ``runs/<config stem>``). ``seeds`` replaces the config's seeds;
    over several seeds, each variant's configs come back under ``<name>/seed-<s>`` (``train.seed=s``).
    ``reference`` replaces the config's reference (it changes the report only, never a run)."""
    path = resolve_config_path(str(path))
    out = Path(out) if out is not None else default_out(path)
    data = read_yaml_mapping(path, "comparison config")
    if budget:
        data = {**data, "budget": budget}
    if nproc is not None:
        data = {**data, "nproc": nproc}
    if seeds is not None:
        data = {**data, "seeds": seeds}
    if reference is not None:
        data = {**data, "reference": reference}
    cmp = from_dict(CompareConfig, data, "")
    _budget_overrides(cmp.set, f"{str(path)!r} (set:)")
    _budget_overrides(overrides or [], "--set")
    base = Path(cmp.base)
    base_path = base if base.is_file() else (path.parent / base if (path.parent / base).is_file() else None)
    base_path = base_path or resolve_config_path(cmp.base)
    resolve_base(read_yaml_mapping(base_path), base_path)  # a broken base file: one error, not one per variant
    configs, prepared = {}, [p.name for p in cmp.prepare]
    for i, p in enumerate(cmp.prepare):
        where = f"prepared run {p.name!r}"
        _budget_overrides(p.set, where, prepared=True)
        p_path = base_path
        if p.config is not None:
            local = path.parent / p.config
            p_path = local if local.is_file() else resolve_config_path(p.config)
        sets, refs = resolve_refs([*p.set, f"train.steps={p.steps}"], prepared[:i], out, where)
        try:
            configs[f"{PREPARE_DIR}/{p.name}"] = _checked(p_path, sets, refs, cmp.nproc)
        except (ConfigError, DataError) as e:
            raise ConfigError(f"{where}: {e}") from None
    for v in cmp.variants:
        where = f"variant {v.name!r}"
        _budget_overrides(v.set, where)
        sets, refs = resolve_refs([*cmp.set, *(overrides or []), *v.set], prepared, out, where)
        try:
            steps = cmp.budget.overrides(Config.load(base_path, [s for s in sets if s not in refs]))
            checked = _checked(base_path, [*sets, *steps], refs, cmp.nproc)
        except (ConfigError, DataError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if cmp.seeds == 1 and seed_folder(out / v.name, 0, 1) == out / v.name:
            configs[v.name] = checked
            continue
        for seed in range(cmp.seeds):  # the same data split (data.seed) for all; init, dropout, batches differ
            folder = seed_folder(out / v.name, seed, cmp.seeds)
            configs[str(folder.relative_to(out))] = Config.load(base_path, [*sets, *steps, f"train.seed={seed}"])
    return cmp, configs


def plan_variant(name: str, cfg: Config, run_dir: Path, force: bool) -> str:
    """What to do with variant ``name`` in ``run_dir``: ``done`` (finished with this config), ``resume``
    (interrupted, same config), ``fresh``, or ``rerun`` (train into a staging folder, then replace
    ``run_dir``). A folder trained with another config is refused unless ``force``."""
    from routelab.train.checkpoint import latest_checkpoint
    from routelab.train.run import (
        CONFIG_FILE,
        NO_EFFECT_ON_RESULTS,
        config_differences,
        finished_summary,
        load_run_config,
    )

    check_run_target(run_dir, what=f"variant {name!r} folder")  # never a folder of the user's own files
    if not (run_dir / CONFIG_FILE).is_file():
        return "fresh"
    differing = config_differences(load_run_config(run_dir / CONFIG_FILE), cfg, ignore=NO_EFFECT_ON_RESULTS)
    if differing:
        if force:
            return "rerun"
        shown = ", ".join(differing[:4]) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
        raise ConfigError(
            f"variant {name!r}: {str(run_dir)!r} was trained with another config ({shown}); pass --force to"
            " retrain it (the old run is replaced only once the new one finishes) or choose another --out"
        )
    if finished_summary(run_dir) is not None:
        return "done"
    if latest_checkpoint(run_dir) is not None:
        return "resume"
    return "rerun" if any((run_dir / n).exists() for n in ("model", "summary.json")) else "fresh"


def run_variant(cfg: Config, out: Path, plan: str = "fresh", isolate: bool = True, nproc: int = 1) -> dict[str, Any]:
    """Carry out ``plan`` (see ``plan_variant``) for one variant; returns its summary.

    A ``rerun`` trains into ``OUT/.<name>.rerun`` (resuming it if an earlier rerun was interrupted)
    and swaps it in only when finished, so the old run stays whole until then. A failure raises
    ``VariantError`` with the variant's own one-line error."""
    from routelab.train.run import (
        CONFIG_FILE,
        NO_EFFECT_ON_RESULTS,
        config_differences,
        finished_summary,
        load_run_config,
    )

    if plan == "done":
        return finished_summary(out) or {}
    target, resume = out, plan == "resume"
    if plan == "rerun":
        target = out.with_name(f".{out.name}.rerun")
        same = (target / CONFIG_FILE).is_file() and not config_differences(
            load_run_config(target / CONFIG_FILE), cfg, ignore=NO_EFFECT_ON_RESULTS
        )
        from routelab.train.checkpoint import latest_checkpoint

        resume = same and latest_checkpoint(target) is not None
        if not resume:
            shutil.rmtree(target, ignore_errors=True)  # an unfinished rerun of another config
    _train(cfg, target, resume, isolate, nproc)
    if target != out:
        with locked(out, "routelab compare"):  # not while another process trains in the old run
            replace_dir(target, out)
    return finished_summary(out) or {}


def _train(cfg: Config, out: Path, resume: bool, isolate: bool, nproc: int = 1) -> None:
    """Train in this process, or (``isolate``) in a child ``routelab train`` (with ``--nproc`` when
    ``nproc`` > 1) so peak memory is the variant's own; the child's one-line error comes back through
    ``ROUTELAB_ERROR_FILE``. The child ends with this process however it ends (``die_with_parent``);
    its own processes (``--nproc``) end with it in turn."""
    if not isolate:
        from routelab.train import train

        try:
            train(cfg, out, resume=resume)
        except (ValueError, OSError) as e:
            raise VariantError(str(e)) from None
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out.parent / f".{out.name}.config.yaml"
    error_path = out.parent / f".{out.name}.error"
    error_path.unlink(missing_ok=True)
    atomic_write(cfg_path, lambda tmp: cfg.save(tmp))
    cmd = [sys.executable, "-m", "routelab.cli", "train", str(cfg_path), "--out", str(out), "--no-sample"]
    if resume:
        cmd.append("--resume")
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    me = os.getpid()  # the child ends with this process, even when it is killed (SIGKILL): no orphan trains on
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env={**os.environ, ERROR_FILE_ENV: str(error_path)},
                          preexec_fn=lambda: die_with_parent(me))
    if proc.returncode != 0:
        reason = error_path.read_text().strip() if error_path.is_file() else ""
        error_path.unlink(missing_ok=True)
        raise VariantError(reason or f"its training process exited with status {proc.returncode} (see the output above)")


class CompareProgress:
    """One stderr line as each variant starts (``[3/6] hash -> runs/cmp/hash (fresh)``) and one as it
    ends, with its time and the time left: the mean of the variants trained so far times the number
    still to train (``done`` ones take none). Plain lines, with or without a terminal, so they read
    the same in a log; each variant's own process draws its step bar or progress lines between them."""

    def __init__(self, plans: dict[str, str]) -> None:
        self.plans = plans
        self.order = list(plans)
        self.took: list[float] = []  # seconds of each variant that trained here and finished
        self.t0 = 0.0

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def start(self, name: str, folder: Path) -> None:
        i = self.order.index(name) + 1
        self._say(f"[{i}/{len(self.order)}] {name} -> {folder} ({self.plans[name]})")
        self.t0 = time.perf_counter()

    def finish(self, name: str, ok: bool) -> None:
        if self.plans[name] == "done":
            return
        i = self.order.index(name) + 1
        took = time.perf_counter() - self.t0
        line = f"[{i}/{len(self.order)}] {name} {'done in' if ok else 'failed after'} {format_duration(took)}"
        if ok:
            self.took.append(took)
        left = sum(self.plans[n] != "done" for n in self.order[i:])
        if left and self.took:
            line += f"; about {format_duration(sum(self.took) / len(self.took) * left)} left"
        self._say(line)


def compare(
    config_path: str | Path,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    isolate: bool = True,
    budget: dict[str, Any] | None = None,
    force: bool = False,
    nproc: int | None = None,
    seeds: int | None = None,
    reference: str | None = None,
) -> Path:
    """Run every variant of a comparison (each seed of it), then write the report. Returns the report folder.

    Every variant's config is checked, and every existing variant folder compared with its config,
    before the first one trains. A variant that fails does not stop the others: the report covers
    those that finished, then ``VariantError`` names the ones that failed and why."""
    out = Path(out) if out else default_out(config_path)
    cmp, configs = load_compare_config(config_path, overrides, budget, nproc, out, seeds, reference)
    if not isolate and cmp.nproc > 1:
        raise ConfigError(f"compare.nproc={cmp.nproc} needs each variant in its own processes; allowed in-process: 1")
    check_compare_target(out, configs)
    with locked(out, "routelab compare"):  # one comparison at a time in OUT (each variant also locks its own run)
        if cmp.seeds > 1:
            for v in cmp.variants:
                adopt_as_seed_zero(out / v.name)
        return _compare(cmp, configs, out, force, isolate)


def adopt_as_seed_zero(variant_dir: Path) -> None:
    """A one-seed comparison's run ``OUT/<variant>/`` becomes seed 0 of a multi-seed one,
    ``OUT/<variant>/seed-0/`` (a finished run is not trained again): moved aside under a hidden name,
    then into place, so at every moment the run is whole in one place (an interrupted move is
    completed by the next call)."""
    aside = variant_dir.with_name(f".{variant_dir.name}.seed-0.tmp")
    if (variant_dir / "config.yaml").is_file() and not aside.exists():
        os.replace(variant_dir, aside)
    if aside.is_dir():
        variant_dir.mkdir(exist_ok=True)
        os.replace(aside, seed_folder(variant_dir, 0, 2))


COMPARE_ENTRIES = frozenset({"report.md", "report.html", "results.json", "plots", PREPARE_DIR})


def check_compare_target(out: Path, configs: dict[str, Config]) -> None:
    """``OUT`` holds nothing but a comparison's own files: its report, plots and results, run folders
    (its variants, or another comparison's), inspection output, and routelab's staging and lock."""
    variants = {name.split("/")[0] for name in configs}

    def known(p: Path) -> bool:
        return (p.name in COMPARE_ENTRIES or p.name in variants or is_run_entry(p.name) or p.name.startswith("inspect")
                or (p.is_dir() and (p / "config.yaml").is_file()))

    check_folder_target(out)
    check_only(out, known, "a comparison folder")
    for variant in sorted({name.split("/")[0] for name in configs if "/" in name and not name.startswith(f"{PREPARE_DIR}/")}):
        check_only(out / variant, seed_entry, "a variant's seed runs (seed-<s>/) or a one-seed run", f"variant {variant!r} folder")


def seed_entry(p: Path) -> bool:
    """What a multi-seed variant folder holds: its seeds' run folders and their staged configs
    (``seed-<s>``, ``.seed-<s>.config.yaml``), or the files of a one-seed run it will adopt as seed 0."""
    return re.fullmatch(r"\.?seed-\d+(\.config\.yaml)?", p.name) is not None or is_run_entry(p.name)


def _compare(cmp: CompareConfig, configs: dict[str, Config], out: Path, force: bool, isolate: bool) -> Path:
    from routelab.report.compare_report import write_report

    plans = {name: plan_variant(name, cfg, out / name, force) for name, cfg in configs.items()}
    failed: dict[str, str] = {}
    progress = CompareProgress(plans)
    for name in configs:
        progress.start(name, out / name)
        try:
            run_variant(configs[name], out / name, plans[name], isolate=isolate, nproc=cmp.nproc)  # a child shows its own step bar
        except VariantError as e:
            if name.startswith(f"{PREPARE_DIR}/"):  # the variants need it: nothing to compare without it
                progress.finish(name, ok=False)
                raise VariantError(f"prepared run {name.removeprefix(PREPARE_DIR + '/')!r} failed, so no variant trained: {e}") from None
            failed[name] = str(e)
            print(f"routelab: variant {name!r} failed: {e}", file=sys.stderr, flush=True)
        progress.finish(name, ok=name not in failed)
    variants = [v.name for v in cmp.variants]
    failed = {n.split("/")[0] if not n.startswith(f"{PREPARE_DIR}/") else n: why for n, why in failed.items()}  # a seed's failure is its variant's
    if all(n in failed for n in variants):
        raise VariantError(f"every variant failed, so there is no report; {name!r}: {failed[name.split('/')[0]]}")
    report = write_report(cmp, out, failed=failed)
    if failed:
        names = ", ".join(f"{n!r} ({why})" for n, why in failed.items())
        raise VariantError(f"{len(failed)} of {len(variants)} variants failed: {names}; the report in {str(out)!r} covers the others")
    return report
