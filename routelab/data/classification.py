"""Sequence classification data: ListOps (generated) or labelled text files, and their batches.

An example is ``(ids, label)`` with ids *without* the ``<cls>`` token; ``collate_classification``
prepends it, since the classification head reads position 0. Batch order is a pure function of
``(seed, step)`` so a resumed run sees exactly the batches it would have seen.

Shape legend: B = batch size, T = longest sequence in the batch (including ``<cls>``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routelab.config import DataConfig
from routelab.data.corpus import holdout_indices, run_tokenizer, table_rows, text_tokenizer
from routelab.data.errors import DataError
from routelab.data.listops import ListOpsTokenizer, is_lra_tsv, listops_splits, read_lra_tsv
from routelab.data.tokenizers import Tokenizer

Example = tuple[list[int], int]  # (token ids without <cls>, label)
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


# ----------------------------------------------------------------------------------------------
# files


def find_splits(path: Path) -> dict[str, Path]:
    """Map split name -> file: a folder's ``train.*``, ``val.*`` (or ``dev.*``), ``test.*``; a
    ``NAME_train.EXT`` file's ``NAME_val``/``NAME_dev``/``NAME_test`` siblings; else just ``train``."""
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
    if "train" not in splits:
        raise DataError(
            f"folder {str(folder)!r} has no train split; expected train.jsonl/.csv/.tsv (and val.* or dev.*, test.*)"
        )
    return splits


def _read_split(path: Path, cfg: DataConfig) -> tuple[str, list[tuple[str, Any]]]:
    """Return ``(kind, rows)``: kind 'lra' for an LRA ListOps TSV, else 'text'; rows ``(text, raw_label)``."""
    if path.suffix == ".tsv" and is_lra_tsv(path):
        return "lra", list(read_lra_tsv(path))
    rows = []
    for name, row in table_rows(path, cfg.text_column, cfg):
        if row.get(cfg.label_column) in (None, ""):
            raise DataError(
                f"{name} in {str(path)!r} has no value in label column {cfg.label_column!r}; its columns are"
                f" {sorted(k for k in row if k is not None)}"
            )
        rows.append((str(row[cfg.text_column] or ""), row[cfg.label_column]))
    return "text", rows


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


def load_classification_data(cfg: DataConfig, run_dir: Path | None = None) -> ClassificationData:
    """Build train/val/test examples from ``cfg.source``: ``'listops'``, an LRA ListOps TSV, or a
    ``.jsonl``/``.csv``/``.tsv`` file or folder with ``cfg.text_column`` and ``cfg.label_column``.

    Without a validation split, ``cfg.val_fraction`` of the training rows is held out; without a
    test split, ``test`` is empty. ListOps uses ``ListOpsTokenizer``; text uses ``cfg.tokenizer``
    (a BPE is trained on the train split). The tokenizer is saved in / reloaded from ``run_dir``.
    """
    if cfg.source == "listops":
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
        train, val, test = ([(tok.encode(t), y) for t, y in s] for s in splits)
        return ClassificationData(train, val, test, tok, num_classes=10)
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
    order = ("train", "val", "test")
    ids, num_classes, names = label_ids([y for s in order for _, y in rows[s]])
    if kinds == {"lra"}:
        tok: Tokenizer = run_tokenizer("listops", run_dir, ListOpsTokenizer)
        num_classes = max(num_classes, 10)
    else:
        tok = text_tokenizer(cfg, [t for t, _ in rows["train"]], run_dir)
    out: dict[str, list[Example]] = {}
    start = 0
    for s in order:
        texts = [t for t, _ in rows[s]]
        out[s] = list(zip(tok.encode_batch(texts), ids[start : start + len(texts)]))
        start += len(texts)
    return ClassificationData(out["train"], out["val"], out["test"], tok, num_classes, names)


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
