"""Two labelled tasks built from the Python standard library's source (nothing to download):

- ``stdlib-tokens`` (token classification): every byte of the code tagged with its ``tokenize``
  class (``routelab.data.python_tags``: space, newline, comment, keyword, name, number, string,
  operator); each file cut into windows of ``data.seq_len`` bytes (the last one shorter).
- ``stdlib-packages`` (classification): which of ``PACKAGES`` a snippet of ``data.seq_len - 1``
  bytes (room for ``<cls>``) comes from. Snippets are windows from the start of each file (a shorter
  tail is dropped): non-overlapping in validation and test, overlapping by half in training (twice
  the snippets, each byte seen at two offsets). Every split is class-balanced: each package keeps as
  many snippets as the smallest one has in that split, spread evenly over its files, interleaved by class.

Both are byte-level (``data.tokenizer: byte``) and split **by file**: no file is in two splits.
``stdlib-tokens`` splits as the ``stdlib`` LM corpus does (``holdout_indices``: the same validation
files for the same file list): ``data.val_fraction`` of the files for validation, as many again for
test, the rest for training. ``stdlib-packages`` splits each package on its own, by bytes, so every
package has about ``data.val_fraction`` of its code in validation and in test (``split_by_bytes``).
``data.max_bytes`` caps ``stdlib-tokens`` (whole files, picked in an order shuffled by
``data.seed``; the last one cut); ``stdlib-packages`` reads its packages whole.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from routelab.config import DataConfig
from routelab.data.classification import ClassificationData
from routelab.data.corpus import holdout_indices, run_tokenizer, stdlib_files, stdlib_root
from routelab.data.decoding import read_python_source
from routelab.data.errors import DataError
from routelab.data.python_tags import TAG_NAMES, tag_bytes
from routelab.data.token_labels import TokenClassificationData
from routelab.data.tokenizers import ByteTokenizer

log = logging.getLogger("routelab.data")

# top-level packages with enough code (>= 3 files, >= 150 KB) in every CPython 3.8-3.14 and in the
# Debian/Ubuntu python3 packages (tkinter, idlelib and distutils are missing from some installs)
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "xml")
SPLITS = ("train", "val", "test")
T = TypeVar("T")


def split_files(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    """Split files three ways, keeping their order: ``holdout_indices(n, val_fraction, seed)`` for
    validation (as ``split_documents`` picks them), then as many for test from the rest (seed + 1).
    Needs at least 3 items."""
    n = len(items)
    if n < 3:
        raise DataError(f"a train/validation/test split by file needs at least 3 files; got {n}")
    val = holdout_indices(n, val_fraction, seed)
    rest = [i for i in range(n) if i not in val]
    test = {rest[j] for j in holdout_indices(len(rest), len(val) / len(rest), seed + 1)}
    return (
        [x for i, x in enumerate(items) if i not in val and i not in test],
        [x for i, x in enumerate(items) if i in val],
        [x for i, x in enumerate(items) if i in test],
    )


def split_by_bytes(files: Sequence[tuple[str, bytes]], val_fraction: float, seed: int) -> tuple[list, list, list]:
    """Split ``(name, data)`` files three ways by size. Going through the files in an order shuffled
    by ``seed``, validation takes each file that still fits in ``val_fraction`` of all bytes (the
    smallest file if none fits), then test the same from the rest; training keeps the others (at
    least one). Each split keeps the input order. Needs at least 3 files."""
    if len(files) < 3:
        raise DataError(f"a train/validation/test split by file needs at least 3 files; got {len(files)}")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(data) for _, data in files)
    held: list[set[int]] = []
    for _ in ("val", "test"):
        picked, size = set(), 0
        for i in order:
            if size + len(files[i][1]) <= target and len(order) - len(picked) > 2 - len(held):  # a file left for each later split
                picked.add(i)
                size += len(files[i][1])
        if not picked:
            picked = {min(order, key=lambda i: (len(files[i][1]), i))}
        order = [i for i in order if i not in picked]
        held.append(picked)
    val, test = held
    return (
        [f for i, f in enumerate(files) if i not in val and i not in test],
        [f for i, f in enumerate(files) if i in val],
        [f for i, f in enumerate(files) if i in test],
    )


def _byte_tokenizer(cfg: DataConfig, run_dir: Path | None) -> ByteTokenizer:
    if cfg.tokenizer != "byte":
        raise DataError(f"data.source={cfg.source!r} is byte-level; set data.tokenizer=byte (it is {cfg.tokenizer!r})")
    return run_tokenizer("byte", run_dir, ByteTokenizer)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# stdlib-tokens


def tagged_stdlib_files(max_bytes: int | None, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, byte ids, byte tags)`` of the standard library's non-empty files, sorted by name.
    With ``max_bytes``, files are taken in an order shuffled by ``seed`` until that many bytes (the
    last one cut to fit). A file ``tokenize`` refuses is skipped, with a warning."""
    root, files = stdlib_root(), stdlib_files()
    order = list(range(len(files)))
    if max_bytes is not None:
        random.Random(seed).shuffle(order)
    docs, total, refused = [], 0, []
    for i in order:
        if max_bytes is not None and total >= max_bytes:
            break
        name = files[i].relative_to(root).as_posix()
        try:
            ids, tags = tag_bytes(read_python_source(files[i]))
        except DataError:
            refused.append(name)
            continue
        if max_bytes is not None:
            ids, tags = ids[: max_bytes - total], tags[: max_bytes - total]
        if len(ids):
            docs.append((name, ids, tags))
            total += len(ids)
    if refused:
        log.warning("stdlib-tokens: tokenize refuses %d file(s), skipped: %s", len(refused), ", ".join(refused[:5]))
    return sorted(docs, key=lambda d: d[0])


def load_stdlib_tokens(cfg: DataConfig, run_dir: Path | None = None) -> TokenClassificationData:
    """The ``stdlib-tokens`` task (see the module docstring): windows of ``cfg.seq_len`` bytes, a
    ``TAG_NAMES`` label per byte."""
    tok = _byte_tokenizer(cfg, run_dir)
    docs = tagged_stdlib_files(cfg.max_bytes, cfg.seed)
    out = {}
    for split, part in zip(SPLITS, split_files(docs, cfg.val_fraction, cfg.seed)):
        out[split] = [
            (ids[s : s + cfg.seq_len].tolist(), tags[s : s + cfg.seq_len].tolist())
            for _, ids, tags in part
            for s in range(0, len(ids), cfg.seq_len)
        ]
        log.info("stdlib-tokens %s: %d files, %d windows, %d bytes", split, len(part), len(out[split]),
                 sum(len(d[1]) for d in part))
    return TokenClassificationData(out["train"], out["val"], out["test"], tok, len(TAG_NAMES), list(TAG_NAMES))


# ----------------------------------------------------------------------------------------------
# stdlib-packages


def package_files() -> dict[str, list[tuple[str, bytes]]]:
    """``PACKAGES`` present in this Python's standard library -> their non-empty files ``(name, UTF-8
    bytes)``, sorted by name; a missing package is left out with a warning."""
    root = stdlib_root()
    found: dict[str, list[tuple[str, bytes]]] = {p: [] for p in PACKAGES}
    for path in stdlib_files():
        rel = path.relative_to(root)
        if len(rel.parts) > 1 and rel.parts[0] in found:
            data = read_python_source(path).encode("utf-8")
            if data:
                found[rel.parts[0]].append((rel.as_posix(), data))
    missing = [p for p, files in found.items() if len(files) < 3]
    if missing:
        log.warning("stdlib-packages: %s missing or with fewer than 3 files in %s; left out", ", ".join(missing), root)
    return {p: files for p, files in found.items() if p not in missing}


def load_stdlib_packages(cfg: DataConfig, run_dir: Path | None = None) -> ClassificationData:
    """The ``stdlib-packages`` task (see the module docstring): balanced snippets of
    ``cfg.seq_len - 1`` bytes labelled with their package; ``label_names`` are the package names."""
    tok = _byte_tokenizer(cfg, run_dir)
    size = cfg.seq_len - 1  # bytes per snippet, <cls> first
    if size < 1:
        raise DataError(f"data.seq_len={cfg.seq_len} leaves no room for a snippet after <cls>; allowed: >= 2")
    packages = package_files()
    if len(packages) < 2:
        raise DataError(f"stdlib-packages needs at least 2 of {', '.join(PACKAGES)} in {stdlib_root()}; found {list(packages)}")
    names = sorted(packages)
    snippets: dict[str, list[list[bytes]]] = {s: [] for s in SPLITS}  # split -> class -> snippets
    for pkg in names:
        for split, part in zip(SPLITS, split_by_bytes(packages[pkg], cfg.val_fraction, cfg.seed)):
            stride = max(size // 2, 1) if split == "train" else size
            snippets[split].append([data[s : s + size] for _, data in part for s in range(0, len(data) - size + 1, stride)])
    out = {}
    for split in SPLITS:
        per_class = min(len(c) for c in snippets[split])
        if per_class == 0:
            empty = names[min(range(len(names)), key=lambda c: len(snippets[split][c]))]
            raise DataError(
                f"stdlib-packages: {empty!r} has no file of {size} bytes or more in the {split} split;"
                f" lower data.seq_len (it is {cfg.seq_len})"
            )
        kept = [[c[i * len(c) // per_class] for i in range(per_class)] for c in snippets[split]]  # evenly spaced
        out[split] = [(list(kept[c][i]), c) for i in range(per_class) for c in range(len(names))]  # interleaved
        counts = ", ".join(f"{n} {len(c)}" for n, c in zip(names, snippets[split]))
        log.info("stdlib-packages %s: %d snippets per package, %d in all (of %s)", split, per_class, len(out[split]), counts)
    return ClassificationData(out["train"], out["val"], out["test"], tok, len(names), names)
