"""Token classification data: a label per token, from word-labelled JSONL files, and its batches.

File format: JSONL, one example a line, a list of words and one label per word (strings or integers)::

    {"tokens": ["def", "f", "(", ")", ":"], "labels": ["keyword", "name", "op", "op", "op"]}

Splits are found as for classification (``train.jsonl``, ``val.jsonl``/``dev.jsonl``, ``test.jsonl``
in a folder, or ``NAME_train.jsonl`` and its siblings; else ``data.val_fraction`` of the rows is held
out). The words are joined with single spaces and tokenised piece by piece (``word`` for the first,
``" " + word`` after it, so a BPE sees words as in running text). **Alignment**: the label goes on the
first token of the word (the first token after a separating space that is a token of its own, as with
the byte tokenizer); the word's other tokens and the separators get ``IGNORE_INDEX`` (-100), which
the loss and the accuracy skip (the convention of BERT's CoNLL-2003 NER: a word is scored once).

An example is ``(ids, labels)``: two lists of the same length, no ``<cls>`` (every position has its
own output). ``collate_token_labels`` right-pads ids with ``<pad>`` and labels with -100. Batch order
is ``classification_batch``'s, a pure function of ``(seed, step)``, so resumption is exact.

Shape legend: B = batch size, T = longest sequence in the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routelab.config import DataConfig
from routelab.data.classification import SPLIT_TITLES, ClassificationData, check_lengths, find_splits, label_ids
from routelab.data.corpus import holdout_indices, table_rows, text_tokenizer
from routelab.data.errors import DataError
from routelab.data.tokenizers import Tokenizer

IGNORE_INDEX = -100  # a label that is not scored (equals routelab.model.IGNORE_INDEX)
WORDS_KEY, LABELS_KEY = "tokens", "labels"  # the JSONL keys

TokenExample = tuple[list[int], list[int]]  # (token ids, a label id or IGNORE_INDEX per token)
WordRow = tuple[str, list[str], list[Any]]  # (row name 'FILE:LINE', words, raw labels)


@dataclass
class TokenClassificationData(ClassificationData):
    """Train/val/test ``TokenExample``s (``train`` etc. hold ``(ids, labels)`` with a label per token);
    ``num_classes`` and ``label_names`` as for ``ClassificationData``."""

    def collate(self, examples: Sequence[TokenExample], max_len: int, truncate: bool = False) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """A batch of ``examples`` as model inputs (``collate_token_labels``: labels (B, T))."""
        return collate_token_labels(examples, self.tokenizer, max_len, truncate, self.num_classes)


# ----------------------------------------------------------------------------------------------
# alignment


def align_words(words: Sequence[str], labels: Sequence[int], tokenizer: Tokenizer) -> TokenExample:
    """Tokenise ``words`` joined by spaces and put each word's label on its first token.

    Args:
        words: W non-empty strings.
        labels: W label ids.
        tokenizer: encodes ``words[0]`` and ``" " + words[i]`` (i > 0) one piece at a time.

    Returns:
        ``(ids, token_labels)`` of equal length: ``token_labels`` holds ``labels[i]`` at the first
        token of word i that is not the separating space alone, ``IGNORE_INDEX`` elsewhere.
    """
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    ids: list[int] = []
    out: list[int] = []
    for i, (piece, label) in enumerate(zip(tokenizer.encode_batch(pieces), labels)):
        skip = 1 if i > 0 and len(piece) > 1 and tokenizer.decode(piece[:1]) == " " else 0  # a lone separator
        ids += piece
        out += [IGNORE_INDEX] * skip + [label] + [IGNORE_INDEX] * (len(piece) - skip - 1)
    return ids, out


# ----------------------------------------------------------------------------------------------
# files


def _check_jsonl(path: Path) -> None:
    if path.suffix != ".jsonl":
        raise DataError(
            f"token classification reads .jsonl files ({{{WORDS_KEY!r}: [words], {LABELS_KEY!r}: [labels]}}"
            f" a line); {str(path)!r} is not one"
        )


def _read_word_rows(path: Path, cfg: DataConfig) -> list[WordRow]:
    """The rows of one JSONL split, each checked: a non-empty list of non-empty words and as many labels."""
    _check_jsonl(path)
    rows = []
    for name, row in table_rows(path, WORDS_KEY, cfg):
        words, labels = row[WORDS_KEY], row.get(LABELS_KEY)
        where = f"{name} in {str(path)!r}"
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{where}: {WORDS_KEY!r} must be a list of strings, got {type(words).__name__}")
        if not isinstance(labels, list):
            raise DataError(f"{where}: {LABELS_KEY!r} must be a list with a label per word, got {labels!r}")
        if not words:
            raise DataError(f"{where} has no words (empty {WORDS_KEY!r}); remove the row or fill it in")
        if len(words) != len(labels):
            raise DataError(f"{where} has {len(words)} words but {len(labels)} labels; give one label per word")
        empty = [i for i, w in enumerate(words) if not w]
        if empty:
            raise DataError(f"{where}: word {empty[0]} is an empty string; every word needs at least one character")
        bad = [y for y in labels if y is None or y == "" or isinstance(y, (list, dict, bool))]
        if bad:
            raise DataError(f"{where} has the label {bad[0]!r}; labels are non-empty strings or integers")
        rows.append((name, words, labels))
    if not rows:
        raise DataError(f"no examples found in {str(path)!r}")
    return rows


def _check_unseen(split_ids: dict[str, list[int]], names: list[str] | None) -> None:
    """Refuse validation/test labels that never occur in training (the model could never predict them)."""
    train = set(split_ids["train"])
    for split in ("val", "test"):
        unseen = sorted({i for i in split_ids[split] if i not in train})
        if unseen:
            shown = ", ".join(repr(names[i]) if names else str(i) for i in unseen[:10])
            raise DataError(
                f"{SPLIT_TITLES[split]} labels never seen in training: {shown}; the model cannot learn them"
                " (fix the label, or move examples with it into the training split)"
            )


def load_token_label_files(cfg: DataConfig, run_dir: Path | None = None) -> TokenClassificationData:
    """Train/val/test token examples from the JSONL file or folder ``cfg.source`` (see the module
    docstring). Labels are numbered as in ``label_ids`` (names sorted). The tokenizer is
    ``cfg.tokenizer`` (a BPE is trained on the training words joined by spaces), saved in / read from
    ``run_dir``. Refused with ``DataError`` naming the row: a row without words, an empty word,
    word and label counts that differ, a validation/test label never seen in training, an example
    longer than ``cfg.seq_len`` (unless ``cfg.truncate``, which cuts it)."""
    order = ("train", "val", "test")
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {cfg.source!r} does not exist; allowed: 'stdlib-tokens' or a .jsonl file or folder")
    if path.is_file():
        _check_jsonl(path)
    rows = {split: _read_word_rows(p, cfg) for split, p in find_splits(path).items()}
    if "val" not in rows:
        if len(rows["train"]) < 2:
            raise DataError(f"{cfg.source!r} has 1 example; a validation split needs at least 2")
        held = holdout_indices(len(rows["train"]), cfg.val_fraction, cfg.seed)
        rows["val"] = [r for i, r in enumerate(rows["train"]) if i in held]
        rows["train"] = [r for i, r in enumerate(rows["train"]) if i not in held]
    rows.setdefault("test", [])
    flat = [y for s in order for _, _, labels in rows[s] for y in labels]
    ids, num_classes, names = label_ids(flat)
    ends = dict(zip(order, itertools.accumulate(sum(len(r[2]) for r in rows[s]) for s in order)))
    split_ids = {s: ids[ends[s] - sum(len(r[2]) for r in rows[s]) : ends[s]] for s in order}
    _check_unseen(split_ids, names)
    tok = text_tokenizer(cfg, [" ".join(words) for _, words, _ in rows["train"]], run_dir)
    out: dict[str, list[TokenExample]] = {}
    for s in order:
        flat_ids, examples = iter(split_ids[s]), []
        for _, words, labels in rows[s]:
            examples.append(align_words(words, [next(flat_ids) for _ in labels], tok))
        out[s] = examples
    check_lengths({s: [n for n, _, _ in rows[s]] for s in order}, out, cfg, "", cls=False)  # type: ignore[arg-type]
    return TokenClassificationData(out["train"], out["val"], out["test"], tok, num_classes, names)


# ----------------------------------------------------------------------------------------------
# batches


def collate_token_labels(
    examples: Sequence[TokenExample],
    tokenizer: Tokenizer,
    max_len: int,
    truncate: bool = False,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ids with ``<pad>`` and labels with ``IGNORE_INDEX`` to the longest example, stack.

    Args:
        examples: B pairs ``(ids, labels)`` of equal lengths.
        tokenizer: gives ``pad_id``.
        max_len: longest allowed sequence (``data.seq_len``).
        truncate: cut longer sequences (and their labels) to ``max_len`` instead of raising.
        num_classes: if given, labels must lie in ``[0, num_classes)`` or be ``IGNORE_INDEX``.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) with 1 = real token, ``labels`` (B, T) with
        ``IGNORE_INDEX`` at padding and unscored tokens; all int64.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    if max_len < 1:
        raise DataError(f"max_len={max_len} is invalid; allowed: >= 1")
    for n, (ids, labels) in enumerate(examples):
        if len(ids) != len(labels):
            raise DataError(f"example {n} of the batch has {len(ids)} tokens but {len(labels)} labels")
        if not ids:
            raise DataError(f"example {n} of the batch has no tokens")
        if len(ids) > max_len and not truncate:
            raise DataError(
                f"example {n} of the batch has {len(ids)} tokens, more than max_len={max_len};"
                " set data.truncate=true or raise data.seq_len"
            )
    T = min(max(len(ids) for ids, _ in examples), max_len)
    input_ids = torch.full((len(examples), T), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (ids, ys) in enumerate(examples):
        n = min(len(ids), T)
        input_ids[b, :n] = torch.as_tensor(ids[:n], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.as_tensor(ys[:n], dtype=torch.long)
    if num_classes is not None:
        scored = labels[labels != IGNORE_INDEX]
        bad = scored[(scored < 0) | (scored >= num_classes)]
        if bad.numel():
            raise DataError(f"a label of the batch is {int(bad[0])}; allowed: 0..{num_classes - 1} or {IGNORE_INDEX}")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
