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
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from routelab.config import Config, ConfigError
from routelab.data import ClassificationData, LMData, load_classification_data, load_lm_data, load_tokenizer
from routelab.io import atomic_write, load_state_dict
from routelab.model import RoutedTransformer
from routelab.train.checkpoint import CHECKPOINTS_DIR, MODEL_FILE, latest_checkpoint, read_checkpoint_state
from routelab.train.metrics import METRICS_FILE

log = logging.getLogger("routelab.train")

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
# keys that may change between a run and its resumption: the run's length, its display and logging, and the
# CPU thread count (which may change float summation order, so a resume with other threads is not bitwise exact)
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.tensorboard", "train.threads")


class RunError(ValueError):
    """A run folder cannot be used as asked (fresh run over an old one, resume without a checkpoint...)."""


# ----------------------------------------------------------------------------------------------
# starting and resuming


def prepare_run_dir(out: Path, cfg: Config, resume: bool) -> Path | None:
    """Check that ``out`` can be used and return the checkpoint to resume from (None for a fresh run).

    A fresh run refuses a folder holding a checkpoint or a finished model; leftovers of a run that
    died before its first checkpoint (metrics, tokenizer, config, partial checkpoints) are removed.
    A resumed run needs a valid checkpoint and the same config (except ``RESUMABLE_CHANGES``); the
    previous final export (``model/``, ``summary.json``) is removed since it is about to be outdated.
    """
    ckpt = latest_checkpoint(out)
    if not resume:
        if ckpt is not None or (out / MODEL_DIR).exists() or (out / SUMMARY_FILE).exists():
            what = f"checkpoint {ckpt.name}" if ckpt is not None else "a finished run"
            raise RunError(
                f"output folder {str(out)!r} already holds {what}; pass --resume (resume=True) to continue it,"
                " or choose another --out"
            )
        for name in (METRICS_FILE, TOKENIZER_FILE, CONFIG_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        return None
    if ckpt is None:
        raise RunError(
            f"cannot resume: {str(out)!r} holds no complete checkpoint (checkpoints/step_*/state.json);"
            " run without --resume to start fresh"
        )
    saved_path = out / CONFIG_FILE
    if not saved_path.is_file():
        raise RunError(f"cannot resume: {str(saved_path)!r} is missing, so the run's config is unknown")
    differing = config_differences(Config.load(saved_path), cfg)
    if differing:
        raise RunError(
            f"cannot resume {str(out)!r}: the requested config differs from the run's config.yaml in "
            f"{', '.join(differing)} (only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
        )
    ckpt_step = read_checkpoint_state(ckpt)["step"]
    if ckpt_step > cfg.train.steps:
        raise RunError(f"cannot resume: train.steps={cfg.train.steps} is below the step of {str(ckpt)!r} ({ckpt_step})")
    shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    return ckpt


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def config_differences(saved: Config, requested: Config) -> list[str]:
    """Dotted keys whose values differ, ignoring ``RESUMABLE_CHANGES`` and the data-derived
    ``model.vocab_size`` / ``model.num_labels`` when the request leaves them unset (None)."""
    a, b = _flatten(saved.to_dict()), _flatten(requested.to_dict())
    differing = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        if key in ("model.vocab_size", "model.num_labels") and b.get(key) is None:
            continue
        if a.get(key) != b.get(key):
            differing.append(f"{key} ({a.get(key)!r} -> {b.get(key)!r})")
    return differing


def save_config(cfg: Config, path: Path) -> None:
    """``Config.save`` made atomic."""
    atomic_write(path, lambda tmp: cfg.save(tmp))


# ----------------------------------------------------------------------------------------------
# data and the resolved config


def load_task_data(cfg: Config, run_dir: Path | None) -> LMData | ClassificationData:
    """The data of ``cfg.data.task``; the tokenizer is read from / saved to ``run_dir``."""
    task = cfg.data.task
    if task == "lm":
        return load_lm_data(cfg.data, run_dir)
    if task == "classification":
        return load_classification_data(cfg.data, run_dir)
    raise ConfigError(
        f"data.task={task!r} is not supported by the built-in data yet (routelab.data has loaders for"
        " 'lm' and 'classification' only); allowed: 'lm', 'classification'"
    )


def resolve_config(cfg: Config, data: LMData | ClassificationData) -> Config:
    """Fill ``model.vocab_size`` (from the tokenizer) and ``model.num_labels`` (from the data) when
    None; raise ``ConfigError`` when a set value cannot hold the data."""
    model = cfg.model
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


def load_run(run_dir: str | Path, with_data: bool = False, map_location: str = "cpu") -> LoadedRun:
    """Read a run: its config, tokenizer, and model from ``model/`` (a finished run) or else from
    the newest checkpoint; the data too if ``with_data``. The model is returned in eval mode."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"{str(run_dir)!r} is not a routelab run folder: {CONFIG_FILE} is missing")
    cfg = Config.load(cfg_path)
    tokenizer = load_tokenizer(run_dir)
    if (run_dir / MODEL_DIR / "config.json").is_file():
        model = RoutedTransformer.from_pretrained(run_dir / MODEL_DIR, map_location=map_location)
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunError(f"{str(run_dir)!r} has neither a final model ({MODEL_DIR}/) nor a complete checkpoint")
        model = RoutedTransformer(cfg.model)
        model.load_state_dict(load_state_dict(ckpt / MODEL_FILE))
        model.to(map_location)
    model.eval()
    data = load_task_data(cfg, run_dir) if with_data else None
    return LoadedRun(cfg, model, tokenizer, data)
