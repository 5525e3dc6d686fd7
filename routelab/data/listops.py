"""ListOps (Nangia & Bowman 2018) as generated for Long Range Arena (Tay et al. 2020).

A sequence is a prefix expression over digits 0-9 with the operators MIN, MAX, MED (median,
``int(numpy.median)``) and SM (sum mod 10), e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9. Trees grow
as in LRA's ``generate_tree``: a node below ``max_depth`` is a value with probability 0.75,
else an operator with 2..``max_args`` arguments; at ``max_depth`` it must be a value. Unlike LRA
the root is always an operator (LRA drew value roots and then rejected them by length), and the
closing bracket ``]`` is kept as a token (LRA's tokenizer dropped it by accident).

Sampling conditions on ``min_len <= tokens <= max_len`` by rejection, exactly as LRA does, but a
tree is abandoned as soon as it passes ``max_len`` tokens instead of being grown in full. Before
drawing, the exact length distribution of the trees (``length_distribution``, a generating-function
recursion over depth) gives the acceptance rate, so bounds that are impossible, or would need more
than ``WORK_LIMIT`` tokens of rejected trees, are refused at once with the lengths trees do reach.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from routelab.data.decoding import BINARY_PROBE, open_text
from routelab.data.errors import DataError
from routelab.data.tokenizers import END, OPERATORS

VALUE_P = 0.75  # probability that a node below max_depth is a value (LRA: r > VALUE_P=0.25)
LRA_NOISE = ("(", ")")  # LRA's released files wrap every pair in parentheses; its pipeline drops them
WORK_LIMIT = 1_000_000_000  # expected tokens grown (all draws) above which a request is refused: minutes in Python
LENGTH_GRID = 1 << 20  # max_args * lengths tracked exactly by length_distribution (bounds one FFT's size)
SLOW_WORK = 100_000_000  # expected tokens grown above which generation logs how long it will take

log = logging.getLogger("routelab.data")


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


def _power_sum(f: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(f + f^2 + ... + f^m, f^m)`` elementwise in O(log m) products: S(2k) = S(k) + f^k S(k)."""
    if m == 1:
        return f, f
    half, power = _power_sum(f, m // 2)
    total, power = half + power * half, power * power
    if m % 2:
        power = power * f
        total = total + power
    return total, power


def length_distribution(max_depth: int, max_args: int, size: int) -> np.ndarray:
    """Exact probabilities of the token counts of the trees ``_grow`` draws (no ``max_len`` cut).

    With L_d the length of a subtree rooted at depth d: L_max_depth = 1 (a value); L_d = 1 with
    probability VALUE_P, else 2 + the sum of K iid copies of L_(d+1), K uniform in 2..max_args; the
    root (d = 1) is always an operator. In generating functions, G_d(z) = VALUE_P z + (1 - VALUE_P)
    z^2 mean_K G_(d+1)(z)^K, evaluated on an FFT grid wide enough (max_args * size) that powers do
    not wrap around. Slow reference: an enumeration in ``tests/data/test_listops.py``.

    Returns:
        (size,) float64: entry t is P(L_1 = t) for t < size; ``1 - sum`` is P(L_1 >= size).
    """
    fft_size = 1 << math.ceil(math.log2(max_args * size))
    leaf = np.zeros(size)
    leaf[1] = 1.0
    dist = leaf  # depth max_depth: always a value
    for depth in range(max_depth - 1, 0, -1):
        f = np.fft.rfft(dist, fft_size)  # (fft_size // 2 + 1,)
        total = _power_sum(f, max_args)[0] - f  # f^2 + ... + f^max_args
        children = np.fft.irfft(total, fft_size)[: size - 2] / (max_args - 1)  # P(sum of K children = t)
        op = np.zeros(size)
        op[2:] = np.clip(children, 0.0, None)  # + the operator and its ']'; clip FFT rounding below 0
        value_p = 0.0 if depth == 1 else VALUE_P
        dist = value_p * leaf + (1.0 - value_p) * op
    return dist


def _reach(cdf: np.ndarray) -> str:
    """The lengths trees reach, in words, from their cumulative distribution over the tracked lengths."""
    median, p99, p6 = (int(np.searchsorted(cdf, q)) for q in (0.5, 0.99, 1 - 1e-6))
    last = len(cdf) - 1
    if median > last:
        return f"most of these trees have more than {last} tokens"
    text = f"these trees have a median of {median} tokens"
    text += f", 99% have <= {p99}" if p99 <= last else f", over 1% have more than {last}"
    return text + (
        f", 1 in a million has more than {p6}" if p6 <= last else f", over 1 in a million have more than {last}"
    )


def _tokens_per_second(max_depth: int, max_args: int, max_len: int, seconds: float = 0.2) -> float:
    """This machine's pace of ``_grow``, measured on a private generator (the caller's stream is untouched)."""
    rng, grown, start = random.Random(0), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out: list[str] = []
        try:
            _grow(rng, 1, max_depth, max_args, out, max_len)
        except _TooLong:
            pass
        grown += len(out)
    return grown / (time.perf_counter() - start)


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def check_listops_request(
    n: int, min_len: int, max_len: int, max_depth: int, max_args: int, max_work: int = WORK_LIMIT
) -> float:
    """Refuse (``DataError``) invalid arguments, and a request whose expected rejection-sampling
    work exceeds ``max_work`` tokens grown, from the exact length distribution, before any draw;
    else return the expected work.

    Work = ``n / p * c`` with p = P(min_len <= L <= max_len) and c = E[min(L, max_len + 1)], the
    tokens one draw grows before it is kept or abandoned. Lengths beyond the tracked grid make p an
    upper and c a lower bound, so a request is never refused for want of precision. The message
    gives the acceptance rate, the expected time at this machine's pace, the lengths these trees
    reach, and the largest ``min_len`` that would need at most a quarter of the limit.
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
    if n == 0:
        return 0.0
    size = min(max_len + 2, longest + 2, max(LENGTH_GRID // max_args, 64))
    dist = length_distribution(max_depth, max_args, size)  # (size,)
    tail = max(0.0, 1.0 - float(dist.sum()))  # P(L >= size)
    lengths = np.arange(size)
    cost = float(np.minimum(lengths, max_len + 1) @ dist) + tail * min(size, max_len + 1)  # E[min(L, max_len + 1)]
    upto = min(max_len, size - 1)
    window = np.cumsum(dist[: upto + 1][::-1])[::-1]  # window[m] = P(m <= L <= upto)
    extra = tail if max_len >= size else 0.0  # trees longer than the grid but within max_len
    p = (float(window[min_len]) if min_len <= upto else 0.0) + extra
    work = n * cost / p if p > 0 else math.inf
    if work <= max_work:
        return work
    target = max_work / 4
    ok = np.flatnonzero(n * cost <= target * window)  # min_len values that would do
    cdf = np.cumsum(dist)
    way_out = (
        f"lower listops_min_len to <= {max(ok)}, raise listops_max_depth/listops_max_args, or ask for fewer"
        if ok.size
        else "raise listops_max_len, listops_max_depth or listops_max_args, or ask for fewer"
    )
    if p >= 1e-12:
        seconds = work / _tokens_per_second(max_depth, max_args, max_len)
        odds = f"with probability {p:.2g}, so {n} example(s) would take {work:.2g} tokens grown ({_duration(seconds)} here)"
    else:
        odds = f"(almost) never, so {n} example(s) would never be found"
    raise DataError(
        f"listops lengths {min_len}..{max_len} are out of reach for trees with max_depth={max_depth} and"
        f" max_args={max_args}: a tree has that many tokens {odds}; {_reach(cdf)}; {way_out}"
    )


def generate_listops(
    n: int,
    min_len: int,
    max_len: int,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
    max_work: int = WORK_LIMIT,
) -> list[tuple[str, int]]:
    """Draw ``n`` distinct ListOps examples with ``min_len <= tokens <= max_len``.

    Args:
        n: number of examples.
        min_len, max_len: inclusive bounds on the token count (operators, digits and ``]``).
        max_depth: deepest level (the root is depth 1); needs >= 2 since the root is an operator.
        max_args: most arguments of one operator (>= 2).
        seed: seeds ``random.Random``; the same arguments give the same list.
        exclude: texts not to produce (e.g. the other splits), so splits never share an example.
        max_work: refuse, before drawing, requests expected to grow more tokens than this
            (``check_listops_request``); it does not change which examples are drawn.

    Returns:
        ``n`` pairs ``(text, label)``: ``text`` is space-separated tokens, ``label`` in 0..9.
    """
    work = check_listops_request(n, min_len, max_len, max_depth, max_args, max_work)
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    patience = 200_000  # draws without a new example before giving up
    misses = 0
    grown, started, told = 0, time.perf_counter(), work < SLOW_WORK
    while len(examples) < n:
        out: list[str] = []
        try:
            label = _grow(rng, 1, max_depth, max_args, out, max_len)
        except _TooLong:
            label = -1
        grown += len(out)
        if not told and grown >= SLOW_WORK // 100:  # about a second in: say how long the rest takes
            told = True
            seconds = (time.perf_counter() - started) * work / grown
            log.info(f"generating {n} ListOps examples of {min_len}..{max_len} tokens takes about {_duration(seconds)}")
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
    """Generate disjoint train/val/test splits; test and val do not depend on ``n_train``. The
    three together are checked first (``check_listops_request``), so a request out of reach fails
    before any split is generated."""
    kw: dict[str, Any] = dict(min_len=min_len, max_len=max_len, max_depth=max_depth, max_args=max_args)
    check_listops_request(n_train + n_val + n_test, **kw)
    test = generate_listops(n_test, seed=3 * seed + 2, **kw)
    val = generate_listops(n_val, seed=3 * seed + 1, exclude={t for t, _ in test}, **kw)
    train = generate_listops(n_train, seed=3 * seed, exclude={t for t, _ in test + val}, **kw)
    return train, val, test
