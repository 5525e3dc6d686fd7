"""A run folder: what it holds, starting or resuming in it, and reading a finished run back.

    <run>/config.yaml          the resolved config (vocab_size and num_labels filled from the data)
    <run>/tokenizer.json       the tokenizer, so a resumed run and ``load_run`` use the same ids
    <run>/metrics.jsonl        one JSON object per logged step or evaluation
    <run>/checkpoints/step_NNNNNNN/   see ``routelab.train.checkpoint``
    <run>/model/               ``save_pretrained`` output of the finished run
    <run>/summary.json         final metrics, throughput and memory
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from routelab.config import Config, DataConfig, ModelConfig
from routelab.data import (
    BUILTIN_SOURCES,
    ClassificationData,
    DataError,
    LMData,
    MultiTaskData,
    check_source_task,
    load_labelled_data,
    load_lm_data,
    load_tokenizer,
)
from routelab.errors import ConfigError
from routelab.io import DamagedFileError, atomic_write, check_folder_target, load_state_dict, read_json
from routelab.model import RoutedTransformer, state_shapes
from routelab.moe.parallel import check_expert_parallel
from routelab.outputs import check_run_target
from routelab.train.checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_FILE,
    latest_checkpoint,
    newest_intact_checkpoint,
    prune_checkpoints,
    read_checkpoint_state,
    set_aside,
    verify_checkpoint,
)
from routelab.train.memory import check_training_memory
from routelab.train.metrics import METRICS_FILE, tensorboard_writer_class

log = logging.getLogger("routelab.train")

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
# keys that may change between a run and its resumption: its length and budget, display, logging,
# evaluation and checkpoint cadence, whether non-finite steps are skipped, where it runs, and where its
# distillation teacher lies (its weights' checksum must match: routelab.train.distill). The CPU
# thread count and the device may change float summation order, so such a resume is not bitwise exact.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.max_seconds",
    "train.progress",
    "train.tensorboard",
    "train.threads",
    "train.device",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.skip_nonfinite",
    "train.dist_backend",
    "train.dist_timeout",
    "train.expert_parallel",
    "train.data_parallel",
    "train.init_from",  # read at step 0 only
    "train.init_noise",
    "train.distill.teacher",
)
# how a run is laid out, not what it computes (up to float summation order)
DISPLAY_ONLY = ("train.progress", "train.tensorboard", "train.threads", "train.dist_backend", "train.dist_timeout",
                "train.expert_parallel", "train.data_parallel")  # never change what a run computes
# nor do these change its results (metrics, model): a comparison reuses a variant that differs only here
NO_EFFECT_ON_RESULTS = (*DISPLAY_ONLY, "train.checkpoint_every", "train.keep_checkpoints")


# keys added after runs existed (multi-task, precision), at the values that compute what those runs did,
# are left out of the fingerprint, so older finished runs keep their config_sha256 (a comparison does
# not retrain them)
SINGLE_TASK = {"data.tasks": None, "data.task_temperature": 1.0, "data.task_mixing": "step", "model.task_names": None,
               "model.task_heads": None, "model.task_num_labels": None, "model.attention.task_conditioned": False,
               "train.precision": "fp32"}


class RunError(ValueError):
    """A run folder cannot be used as asked (fresh run over an old one, resume without a checkpoint...)."""


# ----------------------------------------------------------------------------------------------
# starting and resuming


def load_run_config(path: Path) -> Config:
    """A run's ``config.yaml``; any problem with it raises an error that names the file."""
    try:
        return Config.load(path)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if str(path) in msg else f"{str(path)!r}: {msg}") from None


def prepare_run_dir(out: Path, cfg: Config, resume: bool) -> Path | None:
    """Check that ``out`` can be used and return the checkpoint to resume from (None for a fresh run).

    A fresh run refuses a folder holding anything but a run's files (``routelab.outputs``: a Hugging
    Face checkpoint, a user's own ``config.yaml``), a folder holding a checkpoint or a finished model,
    and a folder overlapping ``train.init_from`` or the distillation teacher; leftovers of a run that
    died before its first checkpoint (metrics, tokenizer, config, partial checkpoints) are removed.
    A resumed run needs the same config (except ``RESUMABLE_CHANGES``) and an intact checkpoint: the
    newest one whose files pass their checksums. Newer damaged ones are set aside
    (``step_N.damaged``) with a warning. Nothing finished is removed: the previous final export
    (``model/``, ``summary.json``) stays until training writes its replacement.
    """
    check_folder_target(out)
    if not resume:
        sources = [("train.init_from", cfg.train.init_from), ("train.distill.teacher", cfg.train.distill.teacher or None)]
        check_run_target(out, sources)  # nothing but a run's own files: a leftover run's are removed below
        ckpt = latest_checkpoint(out)
        if ckpt is not None or (out / MODEL_DIR).exists() or (out / SUMMARY_FILE).exists():
            what = f"checkpoint {ckpt.name}" if ckpt is not None else "a finished run"
            raise RunError(
                f"output folder {str(out)!r} already holds {what}; pass --resume (resume=True) to continue it,"
                " or choose another --out"
            )
        for name in (METRICS_FILE, TOKENIZER_FILE, CONFIG_FILE):
            (out / name).unlink(missing_ok=True)
        if (out / CHECKPOINTS_DIR).is_dir():
            prune_checkpoints(out, keep=1)  # no complete checkpoint: removes partial writes only
        out.mkdir(parents=True, exist_ok=True)
        return None
    if latest_checkpoint(out) is None:
        raise RunError(
            f"cannot resume: {str(out)!r} holds no complete checkpoint (checkpoints/step_*/state.json);"
            " run without --resume to start fresh"
        )
    saved_path = out / CONFIG_FILE
    if not saved_path.is_file():
        raise RunError(f"cannot resume: {str(saved_path)!r} is missing, so the run's config is unknown")
    saved = load_run_config(saved_path)
    differing = config_differences(saved, cfg)
    if differing:
        raise RunError(
            f"cannot resume {str(out)!r}: the requested config differs from the run's config.yaml in "
            f"{', '.join(differing)} (only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
        )
    ckpt, damaged = newest_intact_checkpoint(out, run_shapes(saved, saved_path))
    if ckpt is None:
        raise RunError(f"cannot resume {str(out)!r}: no intact checkpoint; {damaged[0][1]}")
    for path, err in damaged:
        aside = set_aside(path)
        log.warning("%s; resuming from the older %s instead (the damaged one is kept as %s)", err, ckpt.name, aside.name)
    ckpt_step = read_checkpoint_state(ckpt)["step"]
    if ckpt_step > cfg.train.steps:
        raise RunError(f"cannot resume: train.steps={cfg.train.steps} is below the step of {str(ckpt)!r} ({ckpt_step})")
    return ckpt


def run_shapes(cfg: Config, config_path: Path) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the model ``cfg`` describes (a saved, resolved config)."""
    labels_unset = (cfg.model.head != "lm" and cfg.model.num_labels is None) if cfg.model.task_names is None else (
        any(h != "lm" and n is None for h, n in zip(cfg.model.task_heads, cfg.model.task_num_labels))
    )
    if cfg.model.vocab_size is None or labels_unset:
        raise DamagedFileError(config_path, "model.vocab_size / model.num_labels are unset in a run's resolved config")
    return state_shapes(cfg.model)


def config_sha256(cfg: Config) -> str:
    """A fingerprint of everything a run computes: the config without ``DISPLAY_ONLY`` keys."""
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in DISPLAY_ONLY and SINGLE_TASK.get(k, ...) != v}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def finished_summary(run_dir: Path) -> dict | None:
    """The run's ``summary.json`` if it reports a completed run of the config in ``config.yaml``
    (a resumption to more steps that has not finished yet leaves the older summary: not finished)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file() or not (run_dir / CONFIG_FILE).is_file():
        return None
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise DamagedFileError(path, "it is not a mapping")
    if not summary.get("completed"):
        return None
    recorded = summary.get("config_sha256")
    if recorded is not None and recorded != config_sha256(load_run_config(run_dir / CONFIG_FILE)):
        return None
    return summary


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def config_differences(saved: Config, requested: Config, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ, ignoring ``ignore`` and the data-derived
    ``model.vocab_size`` / ``model.num_labels`` when the request leaves them unset (None)."""
    a, b = _flatten(saved.to_dict()), _flatten(requested.to_dict())
    differing = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        unset = b.get(key) is None or (isinstance(b.get(key), list) and all(v is None for v in b[key]))  # filled from the data
        if key in ("model.vocab_size", "model.num_labels", "model.task_num_labels") and unset:
            continue
        if a.get(key) != b.get(key):
            differing.append(f"{key} ({a.get(key)!r} -> {b.get(key)!r})")
    return differing


def save_config(cfg: Config, path: Path) -> None:
    """``Config.save`` made atomic."""
    atomic_write(path, lambda tmp: cfg.save(tmp))


def write_run_folder(out: Path, cfg: Config, tokenizer: Any, model: RoutedTransformer) -> None:
    """A model that was not trained here (imported, upcycled, extracted) written as a run folder that
    ``eval``, ``generate`` and ``train --init-from`` read: ``config.yaml``, ``tokenizer.json`` and
    ``model/`` (its own tokenizer copy too). It is built in a staging folder beside ``out`` and moved
    into place whole, replacing ``out`` (which the caller has checked may be replaced)."""
    import shutil

    from routelab.io import make_temp_dir, replace_dir

    staging = make_temp_dir(out.parent, out.name)
    try:
        save_config(cfg, staging / CONFIG_FILE)
        tokenizer.save(staging)
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save(staging / MODEL_DIR)
        replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# checks before anything is read or allocated

SUPPORTED_TASKS = ("lm", "classification", "token_classification")


def resolve_device(name: str | torch.device, what: str = "train.device") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is passed to ``torch.device``. A name torch
    does not know, or CUDA where there is none, raises a ``ConfigError`` naming ``what`` (the config
    key, or a command's ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{what}={name!r} is invalid ({e}); allowed: 'auto', 'cpu', 'cuda', 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}={name!r} but CUDA is not available; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def run_device(cfg: Config) -> torch.device:
    """The device a loaded run opens on when no ``--device`` is given: the run's own ``train.device``
    resolved as training does. A run trained on a device this machine lacks (its ``cuda`` opened on a
    CPU-only machine) falls back to the CPU with a warning, so a run folder stays readable anywhere;
    an explicit ``--device`` that is not there is an error (``resolve_device``)."""
    try:
        return resolve_device(cfg.train.device)
    except ConfigError as e:
        log.warning("%s; running on the CPU (pass --device to choose)", e)
        return torch.device("cpu")


BYTE_VOCAB = 260  # routelab.data.tokenizers.ByteTokenizer: 256 bytes and 4 specials


def with_placeholder_sizes(cfg: Config) -> ModelConfig:
    """``cfg.model`` with the sizes the data decides filled in where unset: the vocabulary the
    tokenizer will have (bytes: 260; BPE: ``data.bpe_vocab_size``; an imported one: 256) and 2 labels
    per classification head, so the model can be built (and costed) before any data is read."""
    tokenizer_vocab = {"byte": BYTE_VOCAB, "bpe": cfg.data.bpe_vocab_size}.get(cfg.data.tokenizer, 256)
    sizes: dict[str, Any] = dict(vocab_size=cfg.model.vocab_size or tokenizer_vocab)
    if cfg.model.task_names is not None:
        sizes["task_num_labels"] = [n or (None if h == "lm" else 2) for h, n in zip(cfg.model.task_heads, cfg.model.task_num_labels)]
    elif cfg.model.head != "lm":
        sizes["num_labels"] = cfg.model.num_labels or 2
    return dataclasses.replace(cfg.model, **sizes)


def preflight(cfg: Config, world_size: int | None = None) -> None:
    """Check what can be checked without reading data or allocating weights, so a bad config fails
    in a second rather than after data loading (or, in a comparison, after other variants trained):
    the device, optional packages the config asks for, the data source's existence, and the model
    itself, built on the meta device (every layer's own checks, e.g. a batch-ranking router in a
    causal model), with placeholder sizes where the data decides them. ``world_size``: the number of
    processes the run will have (default: this launch's)."""
    resolve_device(cfg.train.device)
    P, world = cfg.train.expert_parallel, world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if P > 1 and world == 1:
        raise ConfigError(
            f"train.expert_parallel={P} spreads experts over processes, but this is one process;"
            f" start it with --nproc N or torchrun (N a multiple of {P})"
        )
    if world % P:  # (check_expert_parallel below says the same; this comes before any data is looked at)
        raise ConfigError(f"train.expert_parallel={P} is invalid with {world} processes; allowed: a divisor of {world}")
    if cfg.train.tensorboard:
        tensorboard_writer_class()
    tasks = cfg.data.tasks
    if tasks is not None and world > 1 and cfg.data.task_mixing == "batch":
        raise ConfigError("data.task_mixing='batch' runs in one process; use data.task_mixing=step with several processes")
    for i, data_cfg in enumerate([cfg.data] if tasks is None else [cfg.data.task_config(i) for i in range(len(tasks))]):
        source, where = data_cfg.source, "data.source" if tasks is None else f"data.tasks[{tasks[i].name}].source"
        check_source_task(source, data_cfg.task)
        if source not in BUILTIN_SOURCES and not source.startswith("hf:") and not Path(source).expanduser().exists():
            builtin = ", ".join(repr(s) for s, task in BUILTIN_SOURCES.items() if task == data_cfg.task)
            raise DataError(f"{where} {source!r} does not exist; allowed: {builtin}, 'hf:NAME', or a file/folder path")
    model_cfg = with_placeholder_sizes(cfg)
    with torch.device("meta"):  # every layer's own checks, no memory
        model = RoutedTransformer(model_cfg)
    if P > 1:  # before any process starts: the check the trainer runs on the real model
        check_expert_parallel(model, P, world)
    check_training_memory(cfg, model_cfg, resolve_device(cfg.train.device), world_size)  # sizes that cannot fit


# ----------------------------------------------------------------------------------------------
# data and the resolved config


def load_task_data(cfg: Config, run_dir: Path | None) -> LMData | ClassificationData | MultiTaskData:
    """The data of ``cfg.data.task`` (or of every task of ``cfg.data.tasks``, in one ``MultiTaskData``
    sharing one tokenizer); the tokenizer is read from / saved to ``run_dir``."""
    if cfg.data.tasks is None:
        return load_data(cfg.data, run_dir)
    tasks, first = [], None
    for i, task in enumerate(cfg.data.tasks):
        data = load_data(cfg.data.task_config(i), run_dir, f"data.tasks[{task.name}]")
        if first is None:
            first = data.tokenizer
            if run_dir is not None and not (Path(run_dir) / TOKENIZER_FILE).is_file():
                first.save(run_dir)  # the tasks after it read the same tokenizer (a BPE is trained once)
        elif data.tokenizer.kind != first.kind or data.tokenizer.vocab_size != first.vocab_size:
            raise DataError(
                f"task {task.name!r} uses a {data.tokenizer.kind!r} tokenizer ({data.tokenizer.vocab_size} ids) but task"
                f" {cfg.data.tasks[0].name!r} a {first.kind!r} one ({first.vocab_size} ids); tasks share one tokenizer"
            )
        tasks.append(data)
    return MultiTaskData([t.name for t in cfg.data.tasks], tasks, [cfg.data.task_config(i).seq_len for i in range(len(tasks))])


def load_data(data_cfg: DataConfig, run_dir: Path | None, where: str = "data") -> LMData | ClassificationData:
    """The data of one task's data section (``where`` names it in errors)."""
    task = data_cfg.task
    check_source_task(data_cfg.source, task)
    if task == "lm":
        data = load_lm_data(data_cfg, run_dir)
        for split, ids in (("training", data.train), ("validation", data.val)):  # found now, not at the first batch
            if ids.numel() < data_cfg.seq_len + 1:
                raise DataError(
                    f"the {split} split of {where}.source={data_cfg.source!r} has {ids.numel()} tokens, fewer than"
                    f" {where}.seq_len + 1 = {data_cfg.seq_len + 1}; lower data.seq_len, use more text, or change"
                    f" data.val_fraction={data_cfg.val_fraction}"
                )
        return data
    if task in ("classification", "token_classification"):  # TokenClassificationData for the latter
        return load_labelled_data(data_cfg, run_dir)
    raise ConfigError(f"{where}.task={task!r} is not supported; allowed: {', '.join(SUPPORTED_TASKS)}")


def resolve_config(cfg: Config, data: LMData | ClassificationData | MultiTaskData) -> Config:
    """Fill ``model.vocab_size`` (from the tokenizer) and ``model.num_labels`` (from the data) when
    None (a multi-task run: ``model.task_num_labels``); raise ``ConfigError`` when a set value cannot
    hold the data."""
    model = cfg.model
    if isinstance(data, MultiTaskData):
        labels = list(model.task_num_labels)
        for i, (name, d) in enumerate(zip(data.names, data.tasks)):
            if isinstance(d, ClassificationData):
                if labels[i] is None:
                    labels[i] = d.num_classes
                elif labels[i] < d.num_classes:
                    raise ConfigError(
                        f"model.task_num_labels[{i}]={labels[i]} is smaller than the classes of task {name!r} ({d.num_classes});"
                        " leave it unset (null)"
                    )
        model = dataclasses.replace(model, task_num_labels=labels)
    vocab = data.tokenizer.vocab_size
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=vocab)
    elif model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary ({vocab});"
            f" set it to >= {vocab} or leave it unset (null) to take it from the tokenizer"
        )
    if isinstance(data, ClassificationData):
        if model.num_labels is None:
            model = dataclasses.replace(model, num_labels=data.num_classes)
        elif model.num_labels < data.num_classes:
            raise ConfigError(
                f"model.num_labels={model.num_labels} is smaller than the number of classes in the data"
                f" ({data.num_classes}); set it to {data.num_classes} or leave it unset (null)"
            )
        elif model.num_labels > data.num_classes:
            log.warning("model.num_labels=%d but the data has %d classes", model.num_labels, data.num_classes)
    return dataclasses.replace(cfg, model=model)


# ----------------------------------------------------------------------------------------------
# reading a run back


class LoadedRun(NamedTuple):
    cfg: Config
    model: RoutedTransformer
    tokenizer: Any
    data: LMData | ClassificationData | None


def load_run(
    run_dir: str | Path, with_data: bool = False, map_location: str | torch.device | None = "cpu"
) -> LoadedRun:
    """Read a run: its config, tokenizer, and model from ``model/`` (a finished run) or else from
    the newest checkpoint; the data too if ``with_data``. The model is returned in eval mode, on
    ``map_location`` (None: the run's own ``train.device``, see ``run_device``).
    A damaged file (checksum, truncation, sizes that do not match the config) raises an error naming it."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"{str(run_dir)!r} is not a routelab run folder: {CONFIG_FILE} is missing")
    cfg = load_run_config(cfg_path)
    if map_location is None:
        map_location = run_device(cfg)
    tokenizer = load_tokenizer(run_dir)
    if (run_dir / MODEL_DIR / "config.json").is_file():
        model = RoutedTransformer.from_pretrained(run_dir / MODEL_DIR, map_location=map_location)
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunError(f"{str(run_dir)!r} has neither a final model ({MODEL_DIR}/) nor a complete checkpoint")
        verify_checkpoint(ckpt, run_shapes(cfg, cfg_path), files=(MODEL_FILE,))  # eval needs no optimizer
        model = RoutedTransformer(cfg.model)
        model.load_state_dict(load_state_dict(ckpt / MODEL_FILE))
        model.to(map_location)
    model.eval()
    data = load_task_data(cfg, run_dir) if with_data else None
    return LoadedRun(cfg, model, tokenizer, data)
