"""Sequence classification data: ListOps (generated) or labelled text files, and their batches.

An example is ``(ids, label)`` with ids *without* the ``<cls>`` token; ``collate_classification``
prepends it, since the classification head reads position 0. Batch order is a pure function of
``(seed, step)`` so a resumed run sees exactly the batches it would have seen.

Shape legend: B = batch size, T = longest sequence in the batch (including ``<cls>``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routelab.config import DataConfig
from routelab.data.corpus import holdout_indices, run_tokenizer, table_rows, text_tokenizer
from routelab.data.errors import DataError
from routelab.data.listops import is_lra_tsv, listops_splits, lra_rows
from routelab.data.tokenizers import ListOpsTokenizer, Tokenizer

log = logging.getLogger("routelab.data")

Example = tuple[list[int], int]  # (token ids without <cls>, label)
Row = tuple[str, str, Any]  # (row name 'FILE:LINE', text, raw label), kept so errors can name the row
SPLIT_TITLES = {"train": "training", "val": "validation", "test": "test"}
TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "dev", "valid", "validation"), "test": ("test",)}


@dataclass
class ClassificationData:
    """Tokenised train/val/test examples; ``label_names[i]`` is the name of class i for string labels."""

    train: list[Example]
    val: list[Example]
    test: list[Example]  # may be empty when the source has no test split
    tokenizer: Tokenizer
    num_classes: int
    label_names: list[str] | None = None

    def collate(self, examples: Sequence[Example], max_len: int, truncate: bool = False) -> dict[str, torch.Tensor]:
        """A batch of ``examples`` as model inputs (``collate_classification``: ``<cls>`` first, labels (B,))."""
        return collate_classification(examples, self.tokenizer, max_len, truncate, self.num_classes)


# ----------------------------------------------------------------------------------------------
# files


def find_splits(path: Path) -> dict[str, Path]:
    """Map split name -> file: a folder's ``train.*``, ``val.*`` (or ``dev.*``), ``test.*``, or, in
    a folder without ``train.*``, its one ``NAME_train.*`` file (the output of ``routelab data
    listops --out DIR``) with its siblings; a ``NAME_train.EXT`` file's ``NAME_val``/``NAME_dev``/
    ``NAME_test`` siblings; any other file is just ``train``."""
    if path.is_dir():
        folder, prefix, suffixes = path, "", TABLE_SUFFIXES
    else:
        if path.suffix not in TABLE_SUFFIXES:
            raise DataError(f"classification file {str(path)!r} must end in one of {', '.join(TABLE_SUFFIXES)}")
        if not path.stem.endswith("_train"):
            return {"train": path}
        folder, prefix, suffixes = path.parent, path.stem[: -len("train")], (path.suffix,)
    splits: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        hits = [folder / f"{prefix}{n}{s}" for n in names for s in suffixes if (folder / f"{prefix}{n}{s}").is_file()]
        if hits:
            splits[split] = hits[0]
    if "train" in splits:
        return splits
    if path.is_dir():
        prefixed = sorted(
            p.name for p in path.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES and p.stem.endswith("_train")
        )
        if len(prefixed) == 1:
            return find_splits(path / prefixed[0])
        if prefixed:
            raise DataError(
                f"folder {str(folder)!r} has no train.* but several NAME_train files: {', '.join(prefixed)};"
                " set data.source to one of them (its NAME_val/NAME_test siblings are found)"
            )
    raise DataError(
        f"folder {str(folder)!r} has no train split; expected train.jsonl/.csv/.tsv (and val.* or dev.*, test.*)"
        " or one NAME_train.jsonl/.csv/.tsv (and NAME_val.*, NAME_test.*)"
    )


def _read_split(path: Path, cfg: DataConfig) -> tuple[str, list[Row]]:
    """Return ``(kind, rows)``: kind 'lra' for an LRA ListOps TSV, else 'text'. Refuses rows whose
    text is empty or only whitespace, naming the first and counting them."""
    if path.suffix == ".tsv" and is_lra_tsv(path):
        kind, column = "lra", "Source"
        rows: list[Row] = lra_rows(path, cfg.encoding, cfg.encoding_errors)
    else:
        kind, column, rows = "text", cfg.text_column, []
        for name, row in table_rows(path, cfg.text_column, cfg):
            if row.get(cfg.label_column) in (None, ""):
                raise DataError(
                    f"{name} in {str(path)!r} has no value in label column {cfg.label_column!r}; its columns are"
                    f" {sorted(k for k in row if k is not None)}"
                )
            rows.append((name, str(row[cfg.text_column] or ""), row[cfg.label_column]))
    empty = [name for name, text, _ in rows if not text.strip()]
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DataError(
            f"{empty[0]} has an empty text (column {column!r}); {len(empty)} row(s) of {str(path)!r} are empty or"
            f" whitespace only ({shown}); remove them or fill them in"
        )
    return kind, rows


def _as_int(label: Any) -> int | None:
    """An integer label (int, integral float, or a string of digits), else None."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return None


def label_ids(labels: Sequence[Any]) -> tuple[list[int], int, list[str] | None]:
    """Map raw labels to class ids.

    Integer labels (or strings of digits) are kept, with ``num_classes = max + 1``; any other label
    makes every label a name, numbered in sorted order.

    Returns:
        ``(ids, num_classes, label_names or None)``.
    """
    as_ints = [_as_int(x) for x in labels]
    names: list[str] | None = None
    if all(i is not None for i in as_ints):
        ids = [int(i) for i in as_ints]  # type: ignore[arg-type]  # none is None here
        if ids and min(ids) < 0:
            raise DataError(f"label {min(ids)} is negative; integer labels must be 0..num_classes-1")
    else:
        names = sorted({str(x) for x in labels})
        index = {n: i for i, n in enumerate(names)}
        ids = [index[str(x)] for x in labels]
    num_classes = max(ids, default=-1) + 1
    if num_classes < 2:
        raise DataError(f"classification needs at least 2 classes; the labels are {sorted(set(map(str, labels)))}")
    return ids, num_classes, names


def _gaps(used: Sequence[int], stop: int) -> list[tuple[int, int]]:
    """Runs ``(first, last)`` of the ids in ``0..stop-1`` that are not in ``used``."""
    runs, start = [], 0
    for u in sorted(set(used)):
        if u > start:
            runs.append((start, u - 1))
        start = u + 1
    if start < stop:
        runs.append((start, stop - 1))
    return runs


def _runs_text(runs: Sequence[tuple[int, int]]) -> str:
    """``[(1, 3), (5, 5)]`` -> ``'1..3, 5'``; at most eight runs shown."""
    text = [f"{a}..{b}" if b > a + 1 else (f"{a}, {b}" if b > a else f"{a}") for a, b in runs[:8]]
    return ", ".join(text) + (", ..." if len(runs) > 8 else "")


def check_labels(split_ids: dict[str, list[int]], num_classes: int, names: list[str] | None, fixed: bool) -> None:
    """Warn (``log.warning``) about labels the model cannot learn: validation/test labels that never
    occur in training, and, for integer labels (``names`` None) unless the class set is ``fixed``
    (ListOps: 0..9), class ids below the largest label that no row uses."""
    shown = (lambda i: repr(names[i])) if names is not None else str
    train = set(split_ids["train"])
    for split in ("val", "test"):
        unseen = [i for i in split_ids.get(split, []) if i not in train]
        if unseen:
            labels = ", ".join(shown(i) for i in sorted(set(unseen))[:10]) + (", ..." if len(set(unseen)) > 10 else "")
            log.warning(
                f"{SPLIT_TITLES[split]} labels never seen in training: {labels} ({len(unseen)} row{'s' * (len(unseen) != 1)});"
                " the model cannot learn them"
            )
    if names is None and not fixed:
        unused = _gaps([i for ids in split_ids.values() for i in ids], num_classes)
        if unused:
            count = sum(b - a + 1 for a, b in unused)
            log.warning(
                f"integer labels make {num_classes} classes (0..{num_classes - 1}) but class ids {_runs_text(unused)}"
                f" ({count} of them) are never used; renumber the labels 0..{num_classes - count - 1}"
                " or make them non-numeric strings (classes are then numbered by name)"
            )


def check_lengths(
    split_names: dict[str, list[str]], out: dict[str, list[Example]], cfg: DataConfig, hint: str, cls: bool = True
) -> None:
    """Refuse examples longer than ``cfg.seq_len`` with ``<cls>`` (unless ``cfg.truncate``), at load
    time rather than when a batch holding one is collated; ``hint`` is one more way out. ``cls``:
    whether a ``<cls>`` token is prepended (not for token classification)."""
    with_cls = " with <cls>" if cls else ""
    too_long = [
        (name, len(ids) + cls)
        for s, examples in out.items()
        for name, (ids, _) in zip(split_names[s], examples)
        if len(ids) + cls > cfg.seq_len
    ]
    if not too_long:
        return
    longest = max(n for _, n in too_long)
    total = sum(len(e) for e in out.values())
    if cfg.truncate:
        log.info(f"data.truncate: {len(too_long)} of {total} examples are cut to data.seq_len={cfg.seq_len}")
        return
    name, n = too_long[0]
    raise DataError(
        f"{name} has {n} tokens{with_cls}, more than data.seq_len={cfg.seq_len}; {len(too_long)} of {total}"
        f" examples are longer (the longest {longest}); set data.truncate=true, raise data.seq_len to {longest}"
        f" (and model.max_seq_len with it){hint}"
    )


def load_classification_data(cfg: DataConfig, run_dir: Path | None = None) -> ClassificationData:
    """Build train/val/test examples from ``cfg.source``: ``'listops'``, an LRA ListOps TSV, or a
    ``.jsonl``/``.csv``/``.tsv`` file or folder with ``cfg.text_column`` and ``cfg.label_column``.

    Without a validation split, ``cfg.val_fraction`` of the training rows is held out; without a
    test split, ``test`` is empty. ListOps uses ``ListOpsTokenizer``; text uses ``cfg.tokenizer``
    (a BPE is trained on the train split). The tokenizer is saved in / reloaded from ``run_dir``.

    Checked here, before any training: empty texts and examples longer than ``cfg.seq_len`` (with
    ``<cls>``, unless ``cfg.truncate``) raise ``DataError`` naming the row; labels the model cannot
    learn are logged as warnings (see ``check_labels``).
    """
    order = ("train", "val", "test")
    if cfg.source == "listops":
        fit = cfg.seq_len - 1  # longest ListOps expression that fits with <cls>
        hint = f", or lower data.listops_max_len to {fit}" + (
            " (and data.listops_min_len with it)" if cfg.listops_min_len > fit else ""
        )
        if cfg.listops_min_len > fit and not cfg.truncate:  # every example would be too long: say so before generating
            raise DataError(
                f"every ListOps example has at least data.listops_min_len + 1 = {cfg.listops_min_len + 1} tokens"
                f" with <cls>, more than data.seq_len={cfg.seq_len}; set data.truncate=true, raise data.seq_len to"
                f" {cfg.listops_max_len + 1} (and model.max_seq_len with it){hint}"
            )
        splits = listops_splits(
            cfg.listops_train,
            cfg.listops_val,
            cfg.listops_test,
            cfg.listops_min_len,
            cfg.listops_max_len,
            cfg.listops_max_depth,
            cfg.listops_max_args,
            cfg.seed,
        )
        tok = run_tokenizer("listops", run_dir, ListOpsTokenizer)
        out = {s: [(tok.encode(t), y) for t, y in examples] for s, examples in zip(order, splits)}
        names = {s: [f"listops {s} example {i}" for i in range(len(out[s]))] for s in order}
        check_lengths(names, out, cfg, hint)
        return ClassificationData(out["train"], out["val"], out["test"], tok, num_classes=10)
    if cfg.source == "stdlib" or cfg.source.startswith("hf:"):
        raise DataError(
            f"data.source={cfg.source!r} is not a classification source; allowed: 'listops' or a"
            " .jsonl/.csv/.tsv file or folder with text and label columns"
        )
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source {cfg.source!r} does not exist; allowed: 'listops' or a .jsonl/.csv/.tsv file or folder"
        )
    read = {split: _read_split(p, cfg) for split, p in find_splits(path).items()}
    kinds = {kind for kind, _ in read.values()}
    if len(kinds) > 1:
        raise DataError(f"the splits of {cfg.source!r} mix LRA ListOps TSV and text tables; use one format")
    rows = {split: r for split, (_, r) in read.items()}
    if not rows["train"]:
        raise DataError(f"no examples found in {cfg.source!r} (train split)")
    if "val" not in rows:
        if len(rows["train"]) < 2:
            raise DataError(f"{cfg.source!r} has 1 example; a validation split needs at least 2")
        held = holdout_indices(len(rows["train"]), cfg.val_fraction, cfg.seed)
        rows["val"] = [r for i, r in enumerate(rows["train"]) if i in held]
        rows["train"] = [r for i, r in enumerate(rows["train"]) if i not in held]
    rows.setdefault("test", [])
    ids, num_classes, label_names = label_ids([y for s in order for _, _, y in rows[s]])
    ends = dict(zip(order, itertools.accumulate(len(rows[s]) for s in order)))
    split_ids = {s: ids[ends[s] - len(rows[s]) : ends[s]] for s in order}
    check_labels(split_ids, num_classes, label_names, fixed=kinds == {"lra"})
    if kinds == {"lra"}:
        tok: Tokenizer = run_tokenizer("listops", run_dir, ListOpsTokenizer)
        num_classes = max(num_classes, 10)
    else:
        tok = text_tokenizer(cfg, [t for _, t, _ in rows["train"]], run_dir)
    out = {s: list(zip(tok.encode_batch([t for _, t, _ in rows[s]]), split_ids[s])) for s in order}
    check_lengths({s: [n for n, _, _ in rows[s]] for s in order}, out, cfg, "")
    return ClassificationData(out["train"], out["val"], out["test"], tok, num_classes, label_names)


# ----------------------------------------------------------------------------------------------
# batches


def collate_classification(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    max_len: int,
    truncate: bool = False,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Prepend ``<cls>``, right-pad with ``<pad>`` to the longest sequence, stack.

    Args:
        examples: B pairs ``(ids, label)``.
        tokenizer: gives ``cls_id`` and ``pad_id``.
        max_len: longest allowed sequence including ``<cls>`` (``data.seq_len``).
        truncate: cut longer sequences to ``max_len`` instead of raising.
        num_classes: if given, labels must lie in ``[0, num_classes)``.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) with 1 = real token and 0 = padding,
        ``labels`` (B,); all int64.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    if max_len < 1:
        raise DataError(f"max_len={max_len} is invalid; allowed: >= 1 (room for <cls>)")
    rows = []
    for n, (ids, label) in enumerate(examples):
        seq = [tokenizer.cls_id, *ids]
        if len(seq) > max_len:
            if not truncate:
                raise DataError(
                    f"example {n} of the batch has {len(seq)} tokens (with <cls>), more than max_len={max_len};"
                    " set data.truncate=true or raise data.seq_len"
                )
            seq = seq[:max_len]
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"example {n} of the batch has label {label}; allowed: 0..{num_classes - 1}")
        rows.append(seq)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, seq in enumerate(rows):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
    labels = torch.tensor([int(y) for _, y in examples], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: ``randperm(n)`` seeded with ``seed * 1_000_003 + epoch``. Shape (n,)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def classification_batch(
    examples: Sequence[Example], batch_size: int, seed: int, step: int, cache: dict[int, list[int]] | None = None
) -> list[Example]:
    """The training batch of global step ``step``: positions ``step*B .. step*B + B - 1`` of the
    endless sequence of epoch permutations. A function of ``(seed, step)`` only; ``cache`` (epoch ->
    permutation) only saves recomputing the permutation between consecutive calls."""
    n = len(examples)
    if n == 0 or batch_size < 1 or step < 0:
        raise DataError(f"need examples (got {n}), batch_size >= 1 (got {batch_size}) and step >= 0 (got {step})")
    perms = {} if cache is None else cache
    batch = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            for old in [e for e in perms if e < epoch]:  # keep the cache small
                del perms[old]
            perms[epoch] = epoch_permutation(n, seed, epoch).tolist()
        batch.append(examples[perms[epoch][pos % n]])
    return batch


def classification_batches(
    examples: Sequence[Example], batch_size: int, seed: int, step: int = 0
) -> Iterator[list[Example]]:
    """Endless training batches for steps ``step, step + 1, ...`` (see ``classification_batch``);
    start at the resumed step to see the same batches as an uninterrupted run."""
    perms: dict[int, list[int]] = {}
    while True:
        yield classification_batch(examples, batch_size, seed, step, perms)
        step += 1


def classification_eval_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """The examples in order, ``batch_size`` at a time; the last batch may be smaller."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is invalid; allowed: >= 1")
    for i in range(math.ceil(len(examples) / batch_size)):
        yield list(examples[i * batch_size : (i + 1) * batch_size])
