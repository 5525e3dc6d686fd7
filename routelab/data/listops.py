"""ListOps (Nangia & Bowman 2018) as generated for Long Range Arena (Tay et al. 2020).

A sequence is a prefix expression over digits 0-9 with the operators MIN, MAX, MED (median,
``int(numpy.median)``) and SM (sum mod 10), e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9. Trees grow
as in LRA's ``generate_tree``: a node below ``max_depth`` is a value with probability 0.75,
else an operator with 2..``max_args`` arguments; at ``max_depth`` it must be a value. Unlike LRA
the root is always an operator (LRA drew value roots and then rejected them by length), and the
closing bracket ``]`` is kept as a token (LRA's tokenizer dropped it by accident).

Sampling conditions on ``min_len <= tokens <= max_len`` by rejection, exactly as LRA does, but a
tree is abandoned as soon as it passes ``max_len`` tokens instead of being grown in full.
"""

from __future__ import annotations

import csv
import random
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from routelab.data.decoding import BINARY_PROBE, open_text
from routelab.data.errors import DataError
from routelab.data.tokenizers import SPECIAL_TOKENS, as_id_list, check_ids, write_json

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.75  # probability that a node below max_depth is a value (LRA: r > VALUE_P=0.25)
LRA_NOISE = ("(", ")")  # LRA's released files wrap every pair in parentheses; its pipeline drops them


def _median(args: list[int]) -> int:
    """``int(numpy.median(args))``: the mean of the two middle values, truncated, for even counts."""
    return int(statistics.median(args))


APPLY = {
    "[MIN": min,
    "[MAX": max,
    "[MED": _median,
    "[SM": lambda args: sum(args) % 10,
}


# ----------------------------------------------------------------------------------------------
# tokenizer


class ListOpsTokenizer:
    """Whitespace tokens: specials ``<pad> <s> </s> <cls>`` = 0..3, digits 0..9 = 4..13,
    ``[MIN [MAX [MED [SM`` = 14..17, ``]`` = 18."""

    kind = "listops"
    pad_id = 0
    bos_id = 1
    eos_id = 2
    cls_id = 3

    def __init__(self) -> None:
        self.vocab: list[str] = [*SPECIAL_TOKENS, *map(str, range(10)), *OPERATORS, END]
        self.vocab_size = len(self.vocab)
        self._ids = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict) -> ListOpsTokenizer:
        tok = cls()
        if data.get("vocab") != tok.vocab:
            raise DataError(f"saved ListOps vocabulary {data.get('vocab')!r} differs from this version's {tok.vocab!r}")
        return tok

    def encode(self, text: str) -> list[int]:
        """Split ``text`` on whitespace and map each token; an unknown token raises ``DataError``."""
        ids = []
        for tok in text.split():
            i = self._ids.get(tok)
            if i is None:
                raise DataError(f"unknown ListOps token {tok!r}; allowed: {' '.join(self.vocab[4:])}")
            ids.append(i)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces, specials skipped."""
        ids = as_id_list(ids)
        check_ids(ids, self.vocab_size, self.kind)
        return " ".join(self.vocab[i] for i in ids if i >= 4)

    def id_to_token(self, i: int) -> str:
        check_ids([int(i)], self.vocab_size, self.kind)
        return self.vocab[int(i)]

    def save(self, directory: str | Path) -> Path:
        return write_json(directory, {"routelab_tokenizer": "listops", "vocab": self.vocab})

    def __repr__(self) -> str:
        return f"ListOpsTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# generation


class _TooLong(Exception):
    """Raised inside ``_grow`` once the tree has more than ``max_len`` tokens."""


def _grow(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[str], max_len: int) -> int:
    """Append one subtree's tokens to ``out`` (depth first, LRA's order) and return its value."""
    if depth > 1 and (depth >= max_depth or rng.random() < VALUE_P):
        value = rng.randrange(10)
        out.append(str(value))
        if len(out) > max_len:
            raise _TooLong
        return value
    op = rng.choice(OPERATORS)
    out.append(op)
    args = [_grow(rng, depth + 1, max_depth, max_args, out, max_len) for _ in range(rng.randint(2, max_args))]
    out.append(END)
    if len(out) > max_len:
        raise _TooLong
    return APPLY[op](args)


def max_listops_len(max_depth: int, max_args: int) -> int:
    """The most tokens a tree can have: every operator full, every leaf at ``max_depth``."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def generate_listops(
    n: int,
    min_len: int,
    max_len: int,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[str, int]]:
    """Draw ``n`` distinct ListOps examples with ``min_len <= tokens <= max_len``.

    Args:
        n: number of examples.
        min_len, max_len: inclusive bounds on the token count (operators, digits and ``]``).
        max_depth: deepest level (the root is depth 1); needs >= 2 since the root is an operator.
        max_args: most arguments of one operator (>= 2).
        seed: seeds ``random.Random``; the same arguments give the same list.
        exclude: texts not to produce (e.g. the other splits), so splits never share an example.

    Returns:
        ``n`` pairs ``(text, label)``: ``text`` is space-separated tokens, ``label`` in 0..9.
    """
    if n < 0:
        raise DataError(f"n={n} examples is invalid; allowed: an integer >= 0")
    if max_depth < 2:
        raise DataError(f"listops max_depth={max_depth} is invalid; allowed: >= 2 (the root is an operator)")
    if max_args < 2:
        raise DataError(f"listops max_args={max_args} is invalid; allowed: >= 2")
    longest = max_listops_len(max_depth, max_args)
    if not (1 <= min_len <= max_len) or max_len < 4 or min_len > longest:
        raise DataError(
            f"listops lengths min_len={min_len}, max_len={max_len} are impossible: trees with max_depth={max_depth}"
            f" and max_args={max_args} have 4..{longest} tokens; allowed: min_len <= max_len, max_len >= 4,"
            f" min_len <= {longest}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    patience = 200_000  # draws without a new example before giving up
    misses = 0
    while len(examples) < n:
        out: list[str] = []
        try:
            label = _grow(rng, 1, max_depth, max_args, out, max_len)
        except _TooLong:
            label = -1
        text = " ".join(out)
        if label >= 0 and len(out) >= min_len and text not in seen and text not in exclude:
            seen.add(text)
            examples.append((text, label))
            misses = 0
            continue
        misses += 1
        if misses > patience:
            raise DataError(
                f"could only generate {len(examples)} of {n} distinct ListOps examples with"
                f" {min_len} <= tokens <= {max_len} (max_depth={max_depth}, max_args={max_args}) after"
                f" {patience} draws without a new one; widen listops_min_len..listops_max_len or ask for fewer"
            )
    return examples


# ----------------------------------------------------------------------------------------------
# evaluation and files


def evaluate_listops(text: str) -> int:
    """Evaluate a ListOps expression (``(`` and ``)`` ignored); malformed input raises ``DataError``."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for tok in text.split():
        if tok in LRA_NOISE:
            continue
        if result is not None:
            raise DataError(f"ListOps expression {text!r} continues after its end at {tok!r}")
        if tok in APPLY:
            stack.append((tok, []))
        elif tok == END:
            if not stack or not stack[-1][1]:
                raise DataError(f"ListOps expression {text!r} has a ']' without an operator and arguments")
            op, args = stack.pop()
            value = APPLY[op](args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif tok.isdigit() and len(tok) == 1:
            if not stack:
                raise DataError(f"ListOps expression {text!r} must start with an operator, got {tok!r}")
            stack[-1][1].append(int(tok))
        else:
            raise DataError(f"unknown ListOps token {tok!r} in {text!r}; allowed: digits, {' '.join(OPERATORS)}, ]")
    if result is None:
        raise DataError(f"ListOps expression {text!r} is incomplete (unclosed operator)")
    return result


def write_lra_tsv(path: str | Path, examples: Iterable[tuple[str, int]]) -> None:
    """Write LRA's format: header ``Source<TAB>Target``, then one ``text<TAB>label`` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["Source", "Target"])
        w.writerows((text, int(label)) for text, label in examples)


def is_lra_tsv(path: str | Path) -> bool:
    """True if ``path`` starts with LRA's ``Source<TAB>Target`` header."""
    with Path(path).open("rb") as f:
        first = f.readline(BINARY_PROBE)
    return first.rstrip(b"\r\n").split(b"\t") == [b"Source", b"Target"]


def lra_rows(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> list[tuple[str, str, int]]:
    """Read an LRA ListOps TSV (ours or LRA's released files, whose ``(`` ``)`` noise is dropped).

    Returns:
        triples ``(row_name, text, label)``: ``row_name`` is ``FILE:LINE``, ``text`` is normalised
        to single-space-separated tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ListOps TSV {str(path)!r} does not exist")
    examples = []
    with open_text(path, encoding, errors, newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header != ["Source", "Target"]:
            raise DataError(
                f"{str(path)!r} starts with {header!r}; an LRA TSV starts with the header Source<TAB>Target"
            )
        for row in rows:
            lineno = rows.line_num
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{str(path)!r} line {lineno} has {len(row)} fields; expected 2 (Source, Target)")
            text = " ".join(t for t in row[0].split() if t not in LRA_NOISE)
            try:
                label = int(row[1])
            except ValueError:
                raise DataError(f"{str(path)!r} line {lineno}: Target {row[1]!r} is not an integer") from None
            examples.append((f"{path.name}:{lineno}", text, label))
    return examples


def read_lra_tsv(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> list[tuple[str, int]]:
    """Read an LRA ListOps TSV (see ``lra_rows``).

    Returns:
        pairs ``(text, label)`` with ``text`` normalised to single-space-separated tokens.
    """
    return [(text, label) for _, text, label in lra_rows(path, encoding, errors)]


def listops_splits(
    n_train: int, n_val: int, n_test: int, min_len: int, max_len: int, max_depth: int, max_args: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """Generate disjoint train/val/test splits; test and val do not depend on ``n_train``."""
    kw: dict[str, Any] = dict(min_len=min_len, max_len=max_len, max_depth=max_depth, max_args=max_args)
    test = generate_listops(n_test, seed=3 * seed + 2, **kw)
    val = generate_listops(n_val, seed=3 * seed + 1, exclude={t for t, _ in test}, **kw)
    train = generate_listops(n_train, seed=3 * seed, exclude={t for t, _ in test + val}, **kw)
    return train, val, test
