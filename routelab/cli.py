"""Command line: a thin map of subcommand -> function.

    routelab train CONFIG [--set k=v ...] [--out DIR] [--resume] [--init-from DIR] [--nproc N [--max-restarts K]]
    routelab upcycle RUN_OR_MODEL_DIR --out DIR [--set model.ffn.kind=moe ...] [--noise STD] [--seed N]
    routelab eval RUN_DIR [--split val|test] [--device DEV]
    routelab generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--device DEV]
    routelab data listops --out DIR [--set data.listops_train=...]
    routelab compare CONFIG [--out DIR] [--set k=v ...] [--steps N | --tokens N | --seconds S | --flops F] [--seeds N] [--force]
    routelab inspect RUN_DIR [--text TEXT | --example N] [--out DIR] [--task NAME] [--device DEV]
    routelab import hf PATH --out DIR [--force] [--check [--device DEV]]
    routelab extract RUN_DIR --task NAME --out DIR

Errors a user can cause (bad config, missing file, bad data, a --device this machine lacks) print
one clear line and exit 2. Commands that run a saved model take ``--device`` (default: the run's own
``train.device``, resolved as training does).

``main(argv)`` runs a command and changes nothing process-wide; ``run()``, the ``routelab`` command
and ``python -m routelab``, first picks CPU-thread defaults a command line may choose and a library
import must not (see ``openmp_wait_defaults``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from routelab import __version__
from routelab.config import Config, DataConfig, apply_overrides, from_dict
from routelab.errors import ERROR_FILE_ENV, ConfigError
from routelab.io import check_folder_target
from routelab.lock import HELD_ENV, locked
from routelab.outputs import check_run_target
from routelab.presets import resolve_config_path
from routelab.train.distributed import (
    LAUNCHER_VAR,
    LOST_PEER_STATUS,
    CollectiveFailure,
    RankZeroError,
    collective_failure,
    launched,
    restart_count,
)

log = logging.getLogger("routelab.cli")


def cmd_train(args: argparse.Namespace) -> int:
    from routelab.train import train
    from routelab.train.run import preflight

    cfg_path = resolve_config_path(args.config)
    cfg = Config.load(cfg_path, args.set, {"train.init_from": args.init_from} if args.init_from is not None else None)
    out = Path(args.out) if args.out else Path("runs") / cfg_path.stem
    check_nproc(args.nproc)
    nproc = args.nproc if args.nproc is not None and args.nproc > 1 and not launched() else None
    if args.max_restarts and not nproc:
        raise ConfigError(
            f"--max-restarts {args.max_restarts} needs --nproc N with N > 1 (it restarts the processes torch's launcher"
            " started); under torchrun, pass --max-restarts to torchrun"
        )
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} is invalid; allowed: 0 or more")
    if not args.resume:  # (train() checks again) before anything is written: a user's folder, or the config itself
        check_run_target(out, [("the config file", cfg_path)])
    preflight(cfg, nproc)  # (train() checks again) a config that cannot train fails with its error line alone
    if nproc:  # the launcher holds the run folder's lock for its processes, across restarts
        with locked(out, "routelab train --nproc"), launcher_holds(out):
            return launch_local(args.nproc, cfg.train.batch_size, without_launch_options(args.argv), args.max_restarts)
    log.info(describe_threads(cfg.train.threads))
    resume = args.resume
    if restart_count():  # torchrun --max-restarts started this process again after a failure: continue the run
        from routelab.train.checkpoint import latest_checkpoint

        resume = latest_checkpoint(out) is not None
        log.info("restart %d after a failure: %s", restart_count(),
                 f"resuming from the newest intact checkpoint in {out}" if resume else "no checkpoint yet, starting again")
    summary = train(cfg, out, resume=resume)
    print(json.dumps(summary, indent=2))
    headline = {"val_bpb": "validation bits per byte", "val_accuracy": "validation accuracy"}
    for key, label in headline.items():
        if key in summary:
            print(f"{label}: {summary[key]:.4f}  (run directory: {out})")
    for name, scores in summary.get("tasks", {}).items():  # a multi-task run: a line per task
        print(f"task {name}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if (cfg.model.task_heads or [cfg.model.head])[0] == "lm" and not args.no_sample:  # generation uses task 0's head
        text = sample_text(out, args.prompt, max_new_tokens=200, temperature=0.8, top_k=0, top_p=0.95, seed=0)
        print(f"\n--- sample (prompt {args.prompt!r}) ---\n{text}")
    return 0


@contextlib.contextmanager
def launcher_holds(folder: Path):
    """Tell the processes started in this block that this process holds ``folder``'s lock."""
    os.environ[HELD_ENV] = str(folder.resolve())
    try:
        yield
    finally:
        os.environ.pop(HELD_ENV, None)


def cmd_eval(args: argparse.Namespace) -> int:
    from routelab.train import evaluate, load_run

    run = load_run(args.run_dir, with_data=True, map_location=command_device(args))
    result = evaluate(run.model, run.data, run.cfg, split=args.split, max_batches=0, precision=args.dtype)
    print(json.dumps(result, indent=2))
    return 0


def sample_text(run_dir, prompt: str, device: str | None = None, precision: str | None = None, **sampling) -> str:
    """Generate from a run folder's model on ``device`` (None: the run's train.device) in ``precision``
    (None: the run's train.precision)."""
    import torch

    from routelab.device import device_of
    from routelab.generate import SamplingConfig, generate
    from routelab.train import load_run

    run = load_run(run_dir, map_location=device)  # None: the run's own train.device
    model, tokenizer = run.model, run.tokenizer
    encode = getattr(tokenizer, "encode_with_specials", tokenizer.encode)  # an imported model's own template (<s> ...)
    ids = encode(prompt) if prompt else [tokenizer.eos_id]
    device = device_of(model)
    cfg = SamplingConfig(stop_tokens=(tokenizer.eos_id,), **sampling)
    out = generate(model, torch.tensor([ids], device=device), cfg, precision=precision or run.cfg.train.precision)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


def cmd_generate(args: argparse.Namespace) -> int:
    print(
        sample_text(
            args.run_dir,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            device=command_device(args),
            precision=args.dtype,
        )
    )
    return 0


def cmd_data_listops(args: argparse.Namespace) -> int:
    from routelab.data import write_lra_tsv
    from routelab.data.listops import listops_splits

    cfg = from_dict(DataConfig, apply_overrides({"source": "listops"}, [s.removeprefix("data.") for s in args.set]), "data")
    out = Path(args.out)
    check_folder_target(out)
    targets = [out / f"basic_{split}.tsv" for split in ("train", "val", "test")]
    existing = [t.name for t in targets if t.exists()]
    if existing:  # e.g. Long Range Arena's own ListOps files, which have these names
        raise ConfigError(f"--out {str(out)!r} already holds {', '.join(existing)}; routelab never overwrites data files:"
                          " choose another --out, or move them away first")
    splits = listops_splits(
        cfg.listops_train, cfg.listops_val, cfg.listops_test, cfg.listops_min_len, cfg.listops_max_len,
        cfg.listops_max_depth, cfg.listops_max_args, cfg.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    for path, examples in zip(targets, splits):
        write_lra_tsv(path, examples)
        print(f"wrote {len(examples)} examples to {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from routelab.compare import compare

    budget = {k: getattr(args, k) for k in ("steps", "tokens", "seconds", "flops") if getattr(args, k) is not None}
    if len(budget) > 1:
        raise ConfigError(f"give at most one of --steps, --tokens, --seconds, --flops (got {', '.join('--' + k for k in budget)})")
    check_nproc(args.nproc)
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid; allowed: 1 or more (3 or more for intervals and verdicts)")
    compare(args.config, out=args.out, overrides=args.set, budget=budget or None, force=args.force, nproc=args.nproc,
            seeds=args.seeds)
    return 0


def check_nproc(nproc: int | None) -> None:
    """``--nproc N`` (train, compare) counts processes: 1 or more."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc {nproc} is invalid; allowed: 1 or more (the number of processes on this machine)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from routelab.report.inspect_report import inspect_run

    out = inspect_run(args.run_dir, text=args.text, example=args.example, out=args.out, task=args.task, device=command_device(args))
    print(f"wrote {out / 'experts.html'} and the heatmaps beside it")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from routelab.pretrained.run_folder import import_hf_run

    device = command_device(args) if args.check else None  # a bad --device fails before the import
    cfg = import_hf_run(args.path, args.out, force=args.force)
    m = cfg.model
    print(f"imported {args.path} into {args.out}: {m.n_layers} layers, d_model {m.d_model}, ffn {m.ffn.kind}, head {m.head}")
    if args.check:
        from routelab.pretrained.check import check_against_transformers, describe, require_agreement
        from routelab.train import load_run

        run = load_run(args.out, map_location=device)  # the folder as written, read back
        result = check_against_transformers(args.path, run.model, run.tokenizer)
        print(describe(result))
        require_agreement(result, args.out)  # past a tolerance: one line, exit 2
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from routelab.train.init_from import write_upcycled

    out, done = write_upcycled(args.source, args.out, args.set, noise=args.noise, seed=args.seed)
    print(f"upcycled {args.source} -> {out}: {done.describe()}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from routelab.pretrained.extract import write_extracted_run

    out, source, small = write_extracted_run(args.run_dir, args.task, args.out)
    print(f"extracted task {args.task!r} -> {out}: {small.num_parameters():,} parameters of {source.num_parameters():,}")
    return 0


def command_device(args: argparse.Namespace):
    """``--device`` checked (a name torch does not know, or one this machine lacks, is a ``ConfigError``:
    one line, exit 2), or None when not given: ``load_run`` then uses the run's own ``train.device``."""
    from routelab.train.run import resolve_device

    return resolve_device(args.device, "--device") if args.device is not None else None


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the forward passes' autocast dtype; weights and routing stay float32 (default: the run's train.precision)")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEV", help="where the model runs: auto, cpu, cuda, cuda:N "
                   "(default: the run's own train.device)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routelab", description="Routing in Transformer language models.")
    p.add_argument("--version", action="version", version=f"routelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config", description="Train a model; writes a run directory.")
    t.add_argument("config", help="YAML config file, or a preset name from routelab/configs/ (e.g. lm-tiny, listops-tiny)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set model.d_model=256 (repeatable)")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (torchrun --standalone; "
                   "train.batch_size is the global batch, split between them)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: when a process fails or is killed, stop the others and start all N again, up to K "
                   "times; each restart resumes from the newest checkpoint in --out (as torchrun --max-restarts does)")
    t.add_argument("--init-from", metavar="DIR", help="start from the weights of a run or saved model folder (upcycled "
                   "when the config's FFN or attention kind differs); fresh optimizer, step 0 (= --set train.init_from=DIR)")
    t.add_argument("--prompt", default="def ", help="prompt for the sample printed after LM training")
    t.add_argument("--no-sample", action="store_true", help="do not print a generated sample after LM training")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run", description="Evaluate a run directory's model.")
    e.add_argument("run_dir", help="run directory written by `routelab train`")
    e.add_argument("--split", default="val", choices=["val", "test"], help="split to evaluate (test: classification only)")
    add_device_argument(e)
    add_dtype_argument(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a trained LM", description="Sample a continuation with a KV cache.")
    g.add_argument("run_dir", help="run directory written by `routelab train` (lm head)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_device_argument(g)
    add_dtype_argument(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("data", help="generate or convert data sets", description="Data utilities.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    lo = dsub.add_parser("listops", help="write ListOps train/val/test in LRA's TSV format", description="Generate ListOps (Long Range Arena spec) as basic_{train,val,test}.tsv.")
    lo.add_argument("--out", required=True, help="output folder")
    lo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data option, e.g. --set listops_train=96000 --set listops_min_len=500")
    lo.set_defaults(func=cmd_data_listops)

    c = sub.add_parser("compare", help="train routing variants under one budget and write a report",
                       description="Run every variant of a comparison config into OUT/<variant>/ (finished ones are "
                       "kept, interrupted ones resume), then write OUT/report.md and OUT/report.html.")
    c.add_argument("config", help="comparison YAML, or a preset name from routelab/configs/ (e.g. compare-lm)")
    c.add_argument("--out", help="output folder (default: runs/<config name>)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every variant (repeatable; not train.steps: use --steps)")
    c.add_argument("--steps", type=int, help="budget: optimizer steps per variant (replaces the config's budget)")
    c.add_argument("--tokens", type=int, help="budget: training tokens per variant")
    c.add_argument("--seconds", type=float, help="budget: wall-clock training seconds per variant")
    c.add_argument("--flops", type=float, help="budget: training FLOPs per variant (3 x forward FLOPs per token x tokens):"
                   " equal compute, so a variant with more active FLOPs per token trains fewer steps")
    c.add_argument("--nproc", type=int, metavar="N", help="train each variant with N processes (replaces the config's nproc)")
    c.add_argument("--seeds", type=int, metavar="N", help="train each variant N times (train.seed 0..N-1, into "
                   "OUT/<variant>/seed-<s>/) and report means, 95%% intervals, paired differences and verdicts "
                   "(replaces the config's seeds)")
    c.add_argument("--force", action="store_true", help="retrain variants whose folder holds a run of another config "
                   "(each old run is replaced only once its new one finishes)")
    c.set_defaults(func=cmd_compare)

    u = sub.add_parser("upcycle", help="turn a trained model into another routing config (dense FFN -> MoE, sparse attention)",
                       description="Map a run's (or saved model's) weights onto the model the --set options describe: "
                       "dense FFNs become MoE layers whose experts start as copies (Komatsuzaki et al. 2023), dense "
                       "attention a sparse kind keeping q/k/v/o, learned positions tiled to a longer max_seq_len "
                       "(Beltagy et al. 2020). Writes a run folder that generate, eval and train --init-from read.")
    u.add_argument("source", help="run folder (config.yaml) or saved model folder (config.json)")
    u.add_argument("--out", required=True, help="new run folder to write")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="what changes, e.g. --set model.ffn.kind=moe --set model.ffn.router=topk (repeatable)")
    u.add_argument("--noise", type=float, default=0.0, metavar="STD", help="std of Gaussian noise added to each expert copy")
    u.add_argument("--seed", type=int, default=0, help="seeds the fresh parameters (routers) and the noise")
    u.set_defaults(func=cmd_upcycle)

    x = sub.add_parser("extract", help="write one task's model from a task-level MoE (router: task)",
                       description="From a run whose MoE layers route by task id (model.ffn.router.kind=task; Kudugunta "
                       "et al. 2021), write a run folder holding only that task's experts, computing what the multi-task "
                       "model computes on that task. eval and generate read it (without task ids).")
    x.add_argument("run_dir", help="run folder (config.yaml) of the multi-task model")
    x.add_argument("--task", required=True, help="task name, one of the run's model.task_names")
    x.add_argument("--out", required=True, help="new run folder to write")
    x.set_defaults(func=cmd_extract)

    i = sub.add_parser("inspect", help="show where tokens attend and which experts they go to",
                       description="Write HTML and PNG heatmaps of one input's routing decisions.")
    i.add_argument("run_dir", help="run directory written by `routelab train`")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to inspect")
    src.add_argument("--example", type=int, help="index of a validation example (default 0)")
    i.add_argument("--out", help="output folder (default: RUN_DIR/inspect)")
    i.add_argument("--task", help="multi-task runs: the task the input is routed as (default: the first of model.task_names)")
    add_device_argument(i)
    i.set_defaults(func=cmd_inspect)

    im = sub.add_parser("import", help="import pretrained weights as a run folder", description="Convert pretrained checkpoints into routelab run folders.")
    isub = im.add_subparsers(dest="import_source", required=True, metavar="SOURCE")
    hf = isub.add_parser("hf", help="a local Hugging Face model folder (safetensors)",
                         description="Import a Hugging Face model folder (config.json + model.safetensors; BERT, Llama, Mistral, "
                         "Qwen2, Mixtral) with its tokenizer into a run folder that generate, eval and train read.")
    hf.add_argument("path", help="model folder (save_pretrained output or a hub cache snapshot)")
    hf.add_argument("--out", required=True, help="run folder to write")
    hf.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the new folder is complete)")
    hf.add_argument("--check", action="store_true", help="then compare the written model with transformers' own on a few texts"
                    " (hidden states, logits, pooled embeddings; needs transformers); a difference past its"
                    " tolerance fails the command (exit 2)")
    add_device_argument(hf)  # for --check
    hf.set_defaults(func=cmd_import_hf)
    return p


class _StderrHandler(logging.Handler):
    """Log records as ``routelab: [warning: ]message`` lines on stderr, written through tqdm so that
    a progress bar on the terminal is redrawn below them rather than broken."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        try:
            tqdm.write(f"routelab: {level}{record.getMessage()}", file=sys.stderr)
        except Exception:  # never let logging take a run down
            self.handleError(record)


def configure_logging(rank: int = 0) -> None:
    """Show routelab's INFO messages (resuming, evaluations, progress lines) and warnings on stderr;
    in a distributed run only rank 0 does (the others log errors alone)."""
    logger = logging.getLogger("routelab")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    logger.propagate = False


def process_rank() -> int:
    """This process's rank in a ``torchrun`` launch (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


LAUNCH_OPTIONS = ("--nproc", "--max-restarts")  # the launcher's; its processes get the rest of the command line


def without_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` and ``--max-restarts K`` / ``--max-restarts=K``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def describe_exit(rank: int, nproc: int, exitcode: int) -> str:
    """``process 1 of 2 was killed by signal SIGKILL (9), ...`` (exit codes below 0 are signals, as in
    ``subprocess``) or ``process 1 of 2 exited with status 2; its error is above``."""
    if exitcode >= 0:
        return f"process {rank} of {nproc} exited with status {exitcode}; its error is above"
    try:
        name = f"{signal.Signals(-exitcode).name} ({-exitcode})"
    except ValueError:
        name = str(-exitcode)
    why = ", e.g. by the out-of-memory killer" if -exitcode == signal.SIGKILL else ""
    return f"process {rank} of {nproc} was killed by signal {name}{why}"


def first_failure(exitcodes: Mapping[int, int]) -> int:
    """The rank whose failure ended a run, given each failed rank's exit code: not one that stopped
    because another ended (``LOST_PEER_STATUS``) or that the launcher stopped (SIGTERM) unless no other
    failed; the lowest such rank (rank 0 reports a step it does alone, the others follow it)."""
    def consequence(code: int) -> int:
        return {LOST_PEER_STATUS: 2, -signal.SIGTERM: 1}.get(code, 0)

    return min(exitcodes, key=lambda rank: (consequence(exitcodes[rank]), rank))


class _LauncherLog(logging.Filter):
    """Sits on two of torch's launcher loggers while ``launch_local`` runs: drops the line it logs for
    each failed attempt (the final report names the failed process in routelab's words), turns a
    restart (``--max-restarts``) into one warning naming what failed, and continues (SIGCONT) each
    process the launcher says it is stopping: one that was stopped (SIGSTOP) would otherwise act on the
    launcher's SIGTERM only when it kills it, 30 seconds later."""

    def __init__(self, nproc: int) -> None:
        super().__init__()
        self.nproc, self.failure = nproc, None

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Sending process") and record.args:  # its SIGTERM (or the interrupting signal) follows
            with contextlib.suppress(OSError, TypeError):  # it ended meanwhile
                os.killpg(record.args[0], signal.SIGCONT)  # each process leads a session and group of its own
            return False
        if msg.startswith("failed (exitcode") and len(record.args or ()) >= 2:
            self.failure = describe_exit(record.args[1], self.nproc, record.args[0])  # local rank = rank on one machine
            return False
        if "will restart worker group" in msg and len(record.args or ()) >= 4:
            remaining, total = record.args[2], record.args[3]
            what = (self.failure or "a process failed").removesuffix("; its error is above")
            print(f"routelab: warning: {what}; restarting the {self.nproc} processes (restart {total - remaining + 1} of"
                  f" {total}), from the newest checkpoint", file=sys.stderr)
            return False
        return record.levelno >= logging.ERROR


# the signals torch's launcher handles (TORCHELASTIC_SIGNALS_TO_HANDLE): it stops the processes and raises SignalException
LAUNCHER_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def launch_local(nproc: int, batch_size: int, argv: list[str], max_restarts: int = 0) -> int:
    """``routelab train ... --nproc N``: the same command in N processes on this machine, started by
    torch's launcher (``torch.distributed.run``, i.e. torchrun --standalone); returns the exit status.
    A failed process is reported in one line (after its own error line, if it printed one); the
    others, whose collectives fail when it ends, stop without a line of their own (``lost_peer``). With
    ``max_restarts`` K > 0 the launcher starts all N again after a failure, up to K times (each
    resumes from the newest checkpoint: see ``cmd_train``). Unless ``OMP_NUM_THREADS`` is set, each
    process gets an equal share of this machine's cores (``train.threads`` still overrides it).

    Interrupted (Ctrl-C, SIGINT) or stopped (SIGTERM, SIGHUP, SIGQUIT), torch's launcher passes the
    signal on to the processes, which end at once (``end_with_launcher``), and this returns
    ``interrupted``'s status after one line."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if batch_size % nproc:
        raise ConfigError(f"train.batch_size={batch_size} is invalid with --nproc {nproc}; allowed: a multiple of {nproc}")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # we report failures ourselves; no launcher banners
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 (with a banner); share the cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    launcher = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "-m", "routelab", *argv]
    )
    log.info("starting %d processes with torch.distributed.run (torchrun --standalone)", nproc)
    report = _LauncherLog(nproc)
    watched = [logging.getLogger(f"torch.distributed.elastic.{m}.api") for m in ("multiprocessing", "agent.server")]
    levels = [logger.level for logger in watched]
    watched[0].setLevel(logging.WARNING)  # its line before it stops a process is a WARNING
    watched[1].setLevel(logging.INFO)  # its restart line is INFO
    for logger in watched:
        logger.addFilter(report)
    handlers = {s: signal.getsignal(s) for s in LAUNCHER_SIGNALS}  # torch's launcher sets its own and leaves them
    os.environ[LAUNCHER_VAR] = str(os.getpid())  # the processes end with this one (end_with_launcher)
    try:
        torchrun(launcher)
    except SignalException as e:  # the launcher has stopped the processes with the same signal
        return interrupted(e.sigval)
    except ChildFailedError as e:
        exitcodes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        rank = first_failure(exitcodes)
        line = describe_exit(rank, nproc, exitcodes[rank])
        if exitcodes[rank] < 0:
            line += "; the other processes were stopped"
        if max_restarts:
            line += f"; no restarts left (--max-restarts {max_restarts})"
        print(f"routelab: error: {line}", file=sys.stderr)
        return 2 if exitcodes[rank] == 2 else 1
    finally:
        os.environ.pop(LAUNCHER_VAR, None)
        for sig, handler in handlers.items():
            if handler is not None:  # None: not set from Python
                signal.signal(sig, handler)
        for logger, level in zip(watched, levels):
            logger.removeFilter(report)
            logger.setLevel(level)
    return 0


def interrupted(sig: int = signal.SIGINT) -> int:
    """A run interrupted or stopped from outside: one line, and the status a shell gives a process
    that the signal ended, 128 + its number (Ctrl-C's SIGINT 130, SIGTERM 143)."""
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    print(f"routelab: {how}; a training run continues from its last checkpoint with --resume", file=sys.stderr)
    return 128 + int(sig)


def out_of_resources(error: BaseException) -> str | None:
    """One line for memory or disk space that ran out where no check foresaw it (an allocation that
    failed, a write that found the disk full), else None. A ``DiskFullError`` already says it all."""
    from routelab.io import DiskFullError, is_disk_full
    from routelab.train.memory import out_of_memory_message

    if isinstance(error, DiskFullError):
        return None
    if is_disk_full(error):
        what = f" writing {error.filename!r}" if getattr(error, "filename", None) else ""
        return (f"no space left on the disk{what}; free some space (checkpoints already written stay intact), then"
                " continue a training run with --resume")
    return out_of_memory_message(error)


def user_error(message: str) -> int:
    """Print one error line (and, for a parent ``routelab compare``, leave it in ``ROUTELAB_ERROR_FILE``);
    in a distributed run it names the rank."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    if launched():
        line = f"rank {process_rank()}: {line}"
    print(f"routelab: error: {line}", file=sys.stderr)
    if os.environ.get(ERROR_FILE_ENV):
        with contextlib.suppress(OSError):
            Path(os.environ[ERROR_FILE_ENV]).write_text(line + "\n")
    return 2


LOST_PEER_WAIT_S = 10.0  # the launcher polls its processes every 0.1 s (torchrun --monitor-interval) and stops the rest


def lost_peer(failure: CollectiveFailure) -> int:
    """This rank's collective failed because of another process. Timed out (it hangs): say so and exit 1.
    Connection closed (it ended: killed, or with its own error line): say nothing, and wait for the
    launcher, which stops this process once it sees the other one's exit, so that its report (torchrun's,
    or ``launch_local``'s one line) names the process that failed first, not this one; then, if no
    launcher came, exit ``LOST_PEER_STATUS``."""
    if failure.timed_out:
        user_error(f"another process did not answer within train.dist_timeout ({failure.detail}); it hung or fell behind")
        return 1
    time.sleep(LOST_PEER_WAIT_S)
    return LOST_PEER_STATUS


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Errors a user can cause end as one line on stderr and exit status 2: bad
    config or data (``ValueError``: ``ConfigError``, ``DataError``, ``RunError``, ``DamagedFileError``),
    missing or unwritable files (``OSError``), memory or disk space that ran out (``out_of_resources``).
    Ctrl-C exits 130 (in a process of a distributed run without a line: its launcher reports it). In a
    distributed run, a collective that failed because another process ended or hung: see ``lost_peer``.
    Anything else is a bug: traceback."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rank = process_rank()
    configure_logging(rank)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext():  # rank 0 prints
            return args.func(args)
    except RankZeroError:
        return 2  # rank 0 failed first and reports it
    except (ValueError, OSError) as e:
        return user_error(out_of_resources(e) or (
            str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.strerror}: {e.filename!r}"))
    except Exception as e:
        exhausted = out_of_resources(e)  # memory or disk ran out where no check foresaw it
        if exhausted is not None:
            return user_error(exhausted)
        failure = collective_failure(e) if launched() else None
        if failure is None:
            raise
        return lost_peer(failure)
    except KeyboardInterrupt:  # (a process of a distributed run: its launcher reports it, once)
        return 128 + signal.SIGINT if launched() else interrupted()


# -- CPU threads ---------------------------------------------------------------------------------
# When another busy process shares the cores, OpenMP threads that spin while they wait for work slow
# training several-fold. A short spin (libgomp) or none (other runtimes) avoids it; the README's "CPU
# threads" section has the measurements. OpenMP reads these variables once, when it loads with
# torch, that is when the routelab package is imported: before any code of this module runs.
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # libgomp; Intel and LLVM OpenMP
OPENMP_COMMANDS = ("train", "compare")  # the commands that train (compare: in child processes)


def openmp_runtime() -> str:
    """``libgomp`` when this process has GNU OpenMP loaded (torch's Linux wheels), else ``other``."""
    try:
        return "libgomp" if "libgomp" in Path("/proc/self/maps").read_text() else "other"
    except OSError:  # no /proc (macOS, Windows)
        return "other"


def openmp_wait_defaults(environ: Mapping[str, str], runtime: str) -> dict[str, str]:
    """The variables ``run()`` adds to the environment: ``GOMP_SPINCOUNT=1000`` for libgomp, the
    portable ``OMP_WAIT_POLICY=PASSIVE`` for any other runtime; nothing when the user already chose
    how idle OpenMP threads wait (any of ``OPENMP_WAIT_VARS`` set, to any value)."""
    if any(v in environ for v in OPENMP_WAIT_VARS):
        return {}
    return {"GOMP_SPINCOUNT": "1000"} if runtime == "libgomp" else {"OMP_WAIT_POLICY": "PASSIVE"}


def describe_threads(config_threads: int | None) -> str:
    """``CPU threads: 2 (torch's default; train.threads sets it), GOMP_SPINCOUNT=1000``."""
    import torch

    if config_threads:
        n, why = config_threads, "train.threads"
    elif "OMP_NUM_THREADS" in os.environ:
        n, why = torch.get_num_threads(), "from OMP_NUM_THREADS"
    else:
        n, why = torch.get_num_threads(), "torch's default; train.threads sets it"
    waits = ", ".join(f"{v}={os.environ[v]}" for v in OPENMP_WAIT_VARS if v in os.environ) or "OpenMP's default wait"
    return f"CPU threads: {n} ({why}), {waits}"


def run() -> None:
    """The ``routelab`` command (and ``python -m routelab``): ``main()`` on ``sys.argv``, after setting
    ``openmp_wait_defaults`` for the commands that train. ``compare``'s variants train in child
    processes, which inherit the variables. ``train`` runs in this process, whose OpenMP runtime has
    already read the environment, so it re-executes itself once (same interpreter and arguments)."""
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)  # --help, --version and usage errors exit here, as they are
    extra = openmp_wait_defaults(os.environ, openmp_runtime()) if args.command in OPENMP_COMMANDS else {}
    if extra:
        os.environ.update(extra)
        configure_logging(process_rank())
        log.info(
            "%s: idle OpenMP threads soon sleep instead of spinning, so another busy process does not slow"
            " training several-fold (set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to choose)",
            ", ".join(f"{k}={v}" for k, v in extra.items()),
        )
        if args.command == "train" and "torch" in sys.modules and os.name == "posix" and sys.executable:
            sys.stdout.flush()
            sys.stderr.flush()
            with contextlib.suppress(OSError):  # cannot re-execute: train on, with OpenMP's own default
                os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    code = main(argv)
    if code and launched():
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """End a failed process of a distributed run at once, its output flushed. A normal interpreter
    exit would tear down the process group's C++ threads (gloo, the TCP store) while a peer may still
    be connected, which now and then aborts (``terminate called without an active exception``,
    SIGABRT) and turns the run's exit status 2 (bad input) into a crash report."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
