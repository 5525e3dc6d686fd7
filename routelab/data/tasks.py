"""The labelled data of a config: which loader serves ``data.task`` and ``data.source``.

Built-in sources serve one task each (``BUILTIN_SOURCES``); any other source is a path (or
``hf:NAME`` for LM text) read by the task's file loader.
"""

from __future__ import annotations

from pathlib import Path

from routelab.config import DataConfig
from routelab.data.classification import ClassificationData, load_classification_data
from routelab.data.errors import DataError
from routelab.data.sources import BUILTIN_SOURCES
from routelab.data.stdlib_tasks import load_stdlib_packages, load_stdlib_tokens
from routelab.data.token_labels import load_token_label_files

__all__ = ["BUILTIN_SOURCES", "check_source_task", "load_labelled_data"]  # BUILTIN_SOURCES: routelab.data.sources


def check_source_task(source: str, task: str) -> None:
    """Refuse a built-in source used for another task than its own, naming the task to set."""
    own = BUILTIN_SOURCES.get(source)
    if own is not None and own != task:
        raise DataError(
            f"data.source={source!r} is a {own!r} task, not {task!r}; set data.task={own} and model.head={own}"
        )


def load_labelled_data(cfg: DataConfig, run_dir: Path | None = None) -> ClassificationData:
    """Classification or token-classification data (``TokenClassificationData``) for ``cfg``; the
    tokenizer is saved in / read from ``run_dir``."""
    if cfg.task not in ("classification", "token_classification"):
        raise DataError(f"data.task={cfg.task!r} has no labelled data; allowed: 'classification', 'token_classification'")
    check_source_task(cfg.source, cfg.task)
    if cfg.source == "stdlib-tokens":
        return load_stdlib_tokens(cfg, run_dir)
    if cfg.source == "stdlib-packages":
        return load_stdlib_packages(cfg, run_dir)
    if cfg.task == "token_classification":
        return load_token_label_files(cfg, run_dir)
    return load_classification_data(cfg, run_dir)
