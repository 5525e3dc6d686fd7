"""Where a command may write: never over what it reads, never over files routelab did not write.

Every command with ``--out`` (``train``, ``compare``, ``import hf``, ``upcycle``, ``extract``,
``export``, ``inspect``, ``data listops``) checks its target here before it writes anything:

- **no overlap with its inputs**: ``--out`` may not be a source folder (or file), contain one, or lie
  inside one (``import hf models/llama --out models --force`` would replace the folder holding the
  checkpoint it reads);
- **only its own kind of folder**: a non-empty ``--out`` must hold nothing but what that command
  writes (``RUN_ENTRIES`` for a run folder, ``MODEL_ENTRIES`` for a model folder; the command's own
  outputs otherwise). A folder holding
  anything else (a Hugging Face checkpoint, a user's ``config.yaml`` or notes) is refused, ``--force``
  or not, naming the first entries routelab did not write.

Replacing a folder (``--force``) goes through ``routelab.io.replace_dir``, which removes the old folder
only once the new one is complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from routelab.io import check_folder_target
from routelab.lock import LOCK_FILE

# what a run folder holds (routelab.train.run's layout, plus inspect's default output and the lock)
RUN_ENTRIES = frozenset({
    "config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints", "model", "summary.json", "tensorboard", "inspect",
    LOCK_FILE,
})
# what a saved model folder holds (``RoutedTransformer.save_pretrained`` plus the tokenizer; ``routelab export``)
MODEL_ENTRIES = frozenset({"config.json", "model.safetensors", "tokenizer.json", LOCK_FILE})
# what ``routelab inspect`` writes (experts.html, routes.json, experts_<layer>.png, attention_layer<i>.png, ...)
INSPECT_SUFFIXES = (".html", ".png", ".json")


class OutputFolderError(ValueError):
    """An output folder cannot be written as asked; the message names it and what to do instead."""


def is_staging(name: str) -> bool:
    """A hidden file or folder routelab stages or sets aside (``.model.x1y2.tmp``, ``.model.old``, ``.a.rerun``)."""
    return name.startswith(".") and name.endswith((".tmp", ".old", ".rerun"))


def is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or is_staging(name)


def foreign_entries(folder: Path, known: Callable[[Path], bool]) -> list[str]:
    """The names in ``folder`` that ``known`` does not accept (sorted; [] for a missing folder)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not known(p))


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_only(folder: Path, known: Callable[[Path], bool], kind: str, what: str = "--out") -> None:
    """Raise ``OutputFolderError`` if ``folder`` holds entries ``known`` does not accept (``kind``
    names what the folder should be, e.g. ``a routelab run folder``)."""
    foreign = foreign_entries(folder, known)
    if foreign:
        raise OutputFolderError(
            f"{what} {str(folder)!r} holds files routelab did not write ({_shown(foreign)}); it writes only into a new"
            f" or empty folder or {kind}: choose another {what}"
        )


def overlap(out: Path, source: Path) -> str | None:
    """How ``out`` overlaps ``source``: ``is``, ``contains``, ``is inside``, or None (symlinks resolved)."""
    a, b = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "is inside"
    return None


def check_no_overlap(out: Path, sources: Iterable[tuple[str, str | Path | None]], what: str = "--out") -> None:
    """Raise ``OutputFolderError`` if ``out`` is, contains, or lies inside any source, given as
    (label, path) pairs (a None path is skipped)."""
    for label, source in sources:
        if source is None:
            continue
        how = overlap(out, Path(source))
        if how is not None:
            raise OutputFolderError(
                f"{what} {str(out)!r} {how} {label} {str(source)!r}; writing there would overwrite what is being read:"
                f" choose an {what} outside it"
            )


def check_run_target(out: str | Path, sources: Iterable[tuple[str, str | Path | None]] = (), what: str = "--out") -> Path:
    """The checks before a run folder is written to ``out`` (``train``, ``import hf``, ``upcycle``,
    ``extract``, a comparison's variants): not a file, no overlap with ``sources``, and nothing in it
    but what run folders hold. Whether an existing run may be continued or replaced is the caller's."""
    out = Path(out)
    check_folder_target(out, f"{what} folder")
    check_no_overlap(out, sources, what)
    check_only(out, lambda p: is_run_entry(p.name), "a routelab run folder", what)
    if not is_empty(out) and not (out / "config.yaml").is_file():  # a lone tokenizer.json may be a user's own
        stray = [n for n in foreign_entries(out, lambda p: p.name == LOCK_FILE or is_staging(p.name))]
        if stray:
            raise OutputFolderError(
                f"{what} {str(out)!r} holds {_shown(stray)} but no config.yaml, so it is not a routelab run folder;"
                f" choose another {what} (or remove them if a run of yours left them)"
            )
    return out


def check_model_target(out: str | Path, sources: Iterable[tuple[str, str | Path | None]] = (), what: str = "--out") -> Path:
    """The checks before a model folder is written to ``out`` (``export``): not a file, no overlap with
    ``sources``, and nothing in it but what a model folder holds, with its ``config.json`` (a lone
    ``tokenizer.json`` may be a user's own). Whether an existing model may be replaced is the caller's."""
    out = Path(out)
    check_folder_target(out, f"{what} folder")
    check_no_overlap(out, sources, what)
    check_only(out, lambda p: p.name in MODEL_ENTRIES or is_staging(p.name), "a routelab model folder", what)
    if not is_empty(out) and not (out / "config.json").is_file():
        stray = foreign_entries(out, lambda p: p.name == LOCK_FILE or is_staging(p.name))
        if stray:
            raise OutputFolderError(
                f"{what} {str(out)!r} holds {_shown(stray)} but no config.json, so it is not a routelab model folder;"
                f" choose another {what} (or remove them if an export of yours left them)"
            )
    return out


def is_empty(folder: Path) -> bool:
    """Missing, or an empty folder (a lock file alone counts as empty)."""
    return not folder.is_dir() or all(p.name == LOCK_FILE for p in folder.iterdir())


def check_inspect_target(out: str | Path, what: str = "--out") -> Path:
    """``routelab inspect --out``: new, empty, or holding only what inspect writes (it overwrites those)."""
    out = Path(out)
    check_folder_target(out, f"{what} folder")
    check_only(out, lambda p: p.is_file() and p.name.endswith(INSPECT_SUFFIXES), "an earlier inspect output", what)
    return out
