"""Command line: a thin map of subcommand -> function.

    routelab train CONFIG [--set k=v ...] [--out DIR] [--resume]
    routelab eval RUN_DIR [--split val|test]
    routelab generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    routelab data listops --out DIR [--set data.listops_train=...]
    routelab compare CONFIG [--out DIR] [--set k=v ...] [--steps N | --tokens N | --seconds S] [--force]
    routelab inspect RUN_DIR [--text TEXT | --example N] [--out DIR]

Errors a user can cause (bad config, missing file, bad data) print one clear line and exit 2.

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
import sys
from collections.abc import Mapping
from pathlib import Path

from routelab import __version__
from routelab.config import Config, DataConfig, apply_overrides, from_dict
from routelab.errors import ERROR_FILE_ENV, ConfigError
from routelab.io import check_folder_target
from routelab.presets import resolve_config_path
from routelab.train.distributed import RankZeroError, launched

log = logging.getLogger("routelab.cli")


def cmd_train(args: argparse.Namespace) -> int:
    from routelab.train import train
    from routelab.train.run import preflight

    cfg_path = resolve_config_path(args.config)
    cfg = Config.load(cfg_path, args.set)
    out = Path(args.out) if args.out else Path("runs") / cfg_path.stem
    nproc = args.nproc if args.nproc is not None and args.nproc > 1 and not launched() else None
    preflight(cfg, nproc)  # (train() checks again) a config that cannot train fails with its error line alone
    if nproc:
        return launch_local(args.nproc, cfg.train.batch_size, without_nproc(args.argv))
    log.info(describe_threads(cfg.train.threads))
    summary = train(cfg, out, resume=args.resume)
    print(json.dumps(summary, indent=2))
    headline = {"val_bpb": "validation bits per byte", "val_accuracy": "validation accuracy"}
    for key, label in headline.items():
        if key in summary:
            print(f"{label}: {summary[key]:.4f}  (run directory: {out})")
    if cfg.model.head == "lm" and not args.no_sample:
        text = sample_text(out, args.prompt, max_new_tokens=200, temperature=0.8, top_k=0, top_p=0.95, seed=0)
        print(f"\n--- sample (prompt {args.prompt!r}) ---\n{text}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from routelab.train import evaluate, load_run

    run = load_run(args.run_dir, with_data=True)
    print(json.dumps(evaluate(run.model, run.data, run.cfg, split=args.split, max_batches=0), indent=2))
    return 0


def sample_text(run_dir, prompt: str, **sampling) -> str:
    import torch

    from routelab.generate import SamplingConfig, generate
    from routelab.train import load_run

    run = load_run(run_dir)
    model, tokenizer = run.model, run.tokenizer
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    device = next(model.parameters()).device
    cfg = SamplingConfig(stop_tokens=(tokenizer.eos_id,), **sampling)
    out = generate(model, torch.tensor([ids], device=device), cfg)
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
        )
    )
    return 0


def cmd_data_listops(args: argparse.Namespace) -> int:
    from routelab.data import write_lra_tsv
    from routelab.data.listops import listops_splits

    cfg = from_dict(DataConfig, apply_overrides({"source": "listops"}, [s.removeprefix("data.") for s in args.set]), "data")
    out = Path(args.out)
    check_folder_target(out)
    splits = listops_splits(
        cfg.listops_train, cfg.listops_val, cfg.listops_test, cfg.listops_min_len, cfg.listops_max_len,
        cfg.listops_max_depth, cfg.listops_max_args, cfg.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    for split, examples in zip(("train", "val", "test"), splits):
        path = out / f"basic_{split}.tsv"
        write_lra_tsv(path, examples)
        print(f"wrote {len(examples)} examples to {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from routelab.compare import compare

    budget = {k: getattr(args, k) for k in ("steps", "tokens", "seconds") if getattr(args, k) is not None}
    if len(budget) > 1:
        raise ConfigError(f"give at most one of --steps, --tokens, --seconds (got {', '.join('--' + k for k in budget)})")
    compare(args.config, out=args.out, overrides=args.set, budget=budget or None, force=args.force)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from routelab.report.inspect_report import inspect_run

    out = inspect_run(args.run_dir, text=args.text, example=args.example, out=args.out)
    print(f"wrote {out / 'experts.html'} and the heatmaps beside it")
    return 0


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
    t.add_argument("--prompt", default="def ", help="prompt for the sample printed after LM training")
    t.add_argument("--no-sample", action="store_true", help="do not print a generated sample after LM training")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run", description="Evaluate a run directory's model.")
    e.add_argument("run_dir", help="run directory written by `routelab train`")
    e.add_argument("--split", default="val", choices=["val", "test"], help="split to evaluate (test: classification only)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a trained LM", description="Sample a continuation with a KV cache.")
    g.add_argument("run_dir", help="run directory written by `routelab train` (lm head)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
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
    c.add_argument("--force", action="store_true", help="retrain variants whose folder holds a run of another config "
                   "(each old run is replaced only once its new one finishes)")
    c.set_defaults(func=cmd_compare)

    i = sub.add_parser("inspect", help="show where tokens attend and which experts they go to",
                       description="Write HTML and PNG heatmaps of one input's routing decisions.")
    i.add_argument("run_dir", help="run directory written by `routelab train`")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to inspect")
    src.add_argument("--example", type=int, help="index of a validation example (default 0)")
    i.add_argument("--out", help="output folder (default: RUN_DIR/inspect)")
    i.set_defaults(func=cmd_inspect)
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


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_local(nproc: int, batch_size: int, argv: list[str]) -> int:
    """``routelab train ... --nproc N``: the same command in N processes on this machine, started by
    torch's launcher (``torch.distributed.run``, i.e. torchrun --standalone); returns the exit status.
    A failed process is reported in one line after its own error line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if batch_size % nproc:
        raise ConfigError(f"train.batch_size={batch_size} is invalid with --nproc {nproc}; allowed: a multiple of {nproc}")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # we report failures ourselves; no launcher banners
    launcher = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "routelab", *argv])
    log.info("starting %d processes with torch.distributed.run (torchrun --standalone)", nproc)
    try:
        torchrun(launcher)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        print(f"routelab: error: process {rank} of {nproc} exited with status {failure.exitcode}; its error is above",
              file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    return 0


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


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Errors a user can cause end as one line on stderr and exit status 2: bad
    config or data (``ValueError``: ``ConfigError``, ``DataError``, ``RunError``, ``DamagedFileError``),
    missing or unwritable files (``OSError``). Ctrl-C exits 130. Anything else is a bug: traceback."""
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
        return user_error(str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.strerror}: {e.filename!r}")
    except KeyboardInterrupt:
        print("routelab: interrupted; a training run continues from its last checkpoint with --resume", file=sys.stderr)
        return 130


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
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
