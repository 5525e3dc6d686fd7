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
    routelab export RUN_DIR --out DIR [--checkpoint STEP|latest] [--force]

Errors a user can cause (bad config, missing file, bad data, a --device this machine lacks) print
one clear line and exit 2. Commands that run a saved model take ``--device`` (default: the run's own
``train.device``, resolved as training does).

``main(argv)`` runs a command and changes nothing process-wide; ``run()``, the ``routelab`` command
and ``python -m routelab``, first picks CPU-thread defaults a command line may choose and a library
import must not (see ``routelab.threads``). ``train --nproc N`` starts its processes through
``routelab.launch``.
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
from pathlib import Path

from routelab import __version__
from routelab.config import Config, DataConfig, apply_overrides, from_dict
from routelab.errors import ERROR_FILE_ENV, ConfigError
from routelab.io import check_folder_target
from routelab.launch import (  # noqa: F401  (re-exported: tests import them from here)
    describe_exit,
    first_failure,
    interrupted,
    launch_local,
    launcher_holds,
    process_rank,
    without_launch_options,
)
from routelab.lock import locked
from routelab.outputs import check_run_target
from routelab.presets import resolve_config_path
from routelab.threads import (  # noqa: F401  (re-exported: tests import them from here)
    OPENMP_WAIT_VARS,
    describe_threads,
    describe_wait_defaults,
    openmp_runtime,
    openmp_wait_defaults,
    reexec,
    wait_defaults_for,
)
from routelab.train.distributed import (
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
            seeds=args.seeds, reference=args.reference)
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


def cmd_export(args: argparse.Namespace) -> int:
    from routelab.train.export import export_checkpoint

    out, step = export_checkpoint(args.run_dir, args.out, args.checkpoint, force=args.force)
    print(f"exported step {step} of {args.run_dir} -> {out}")
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
    """The ``routelab`` parser. Commands are added in the order ``routelab --help`` lists them."""
    p = argparse.ArgumentParser(prog="routelab", description="Routing in Transformer language models.")
    p.add_argument("--version", action="version", version=f"routelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(sub)
    add_data_commands(sub)
    add_compare_command(sub)
    add_model_commands(sub)
    add_inspect_command(sub)
    add_import_commands(sub)
    return p


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """``train`` a model from a config; ``eval`` and ``generate`` from the run folder it wrote."""
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


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``data listops``: write a data set to files."""
    d = sub.add_parser("data", help="generate or convert data sets", description="Data utilities.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    lo = dsub.add_parser("listops", help="write ListOps train/val/test in LRA's TSV format", description="Generate ListOps (Long Range Arena spec) as basic_{train,val,test}.tsv.")
    lo.add_argument("--out", required=True, help="output folder")
    lo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data option, e.g. --set listops_train=96000 --set listops_min_len=500")
    lo.set_defaults(func=cmd_data_listops)


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    """``compare``: train routing variants under one budget and report."""
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
    c.add_argument("--reference", metavar="NAME", help="the variant the others are measured against (replaces the "
                   "config's reference; finished runs are kept, so this rewrites only the report)")
    c.add_argument("--force", action="store_true", help="retrain variants whose folder holds a run of another config "
                   "(each old run is replaced only once its new one finishes)")
    c.set_defaults(func=cmd_compare)


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """``upcycle`` and ``extract``: a run folder's model made into another one; ``export``: a checkpoint as a model folder."""
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

    ex = sub.add_parser("export", help="write a checkpoint of a run as a saved model folder",
                        description="Write a run's checkpoint as a model folder (model.safetensors, config.json, "
                        "tokenizer.json) that RoutedTransformer.from_pretrained reads. The weights are copied one tensor "
                        "at a time, so the memory it needs is about one tensor, not the model.")
    ex.add_argument("run_dir", help="run folder (config.yaml, checkpoints/)")
    ex.add_argument("--out", required=True, help="model folder to write")
    ex.add_argument("--checkpoint", default="latest", metavar="STEP", help="the checkpoint's step, or latest (default)")
    ex.add_argument("--force", action="store_true", help="replace a model folder in --out (only once the new one is complete)")
    ex.set_defaults(func=cmd_export)


def add_inspect_command(sub: argparse._SubParsersAction) -> None:
    """``inspect``: one input's routing decisions as heatmaps."""
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


def add_import_commands(sub: argparse._SubParsersAction) -> None:
    """``import hf``: pretrained weights as a run folder."""
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


def run() -> None:
    """The ``routelab`` command (and ``python -m routelab``): ``main()`` on ``sys.argv``, after setting
    ``wait_defaults_for`` (OpenMP's wait, glibc's allocator) for the commands that train. ``compare``'s
    variants train in child processes, which inherit the variables. ``train`` runs in this process,
    whose OpenMP runtime and C library have already read the environment, so it re-executes itself
    once (same interpreter and arguments)."""
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)  # --help, --version and usage errors exit here, as they are
    extra = wait_defaults_for(args.command)
    if extra:
        os.environ.update(extra)
        configure_logging(process_rank())
        for line in describe_wait_defaults(extra):
            log.info("%s", line)
        if args.command == "train":
            reexec()  # returns where it cannot re-execute: train on, with the runtimes' own defaults
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
