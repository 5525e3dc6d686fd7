"""An independent ListOps evaluator for the tests (recursive descent, numpy's median), written
apart from ``routelab.data.listops`` so a bug there cannot hide in both."""

from __future__ import annotations

import numpy as np

OPS = {
    "[MIN": lambda a: int(np.min(a)),
    "[MAX": lambda a: int(np.max(a)),
    "[MED": lambda a: int(np.median(a)),
    "[SM": lambda a: int(np.sum(a)) % 10,
}


def parse(tokens: list[str], i: int = 0, depth: int = 1) -> tuple[int, int, int, list[int]]:
    """Parse the subtree starting at ``tokens[i]``.

    Returns (value, next index, deepest depth reached, argument counts of every operator seen).
    """
    tok = tokens[i]
    if tok in "0123456789" and len(tok) == 1:
        return int(tok), i + 1, depth, []
    assert tok in OPS, f"unexpected token {tok!r} at {i}"
    args, deepest, counts = [], depth, []
    i += 1
    while tokens[i] != "]":
        value, i, d, c = parse(tokens, i, depth + 1)
        args.append(value)
        deepest, counts = max(deepest, d), counts + c
    return OPS[tok](args), i + 1, deepest, [len(args), *counts]


def evaluate(text: str) -> int:
    tokens = text.split()
    value, end, _, _ = parse(tokens)
    assert end == len(tokens), f"trailing tokens in {text!r}"
    return value
