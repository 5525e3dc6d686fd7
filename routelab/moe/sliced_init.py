"""Initialising a slice of a stacked expert tensor exactly as the whole tensor would be.

Expert parallelism builds each process's model with only its experts (``Experts(expert_slice=...)``),
yet expert e must start as in the one-process model built with the same seed, and every tensor
drawn after the experts too. So a slice's draw consumes the random stream exactly as the whole
tensor's ``normal_`` does and keeps only its rows, holding one small scratch block at a time.

Torch's CPU ``normal_`` on a contiguous tensor of n >= 16 values draws n uniforms and transforms
them 16 at a time (Box-Muller on pairs i, i + 8 of each chunk); when 16 does not divide n it draws
16 more uniforms for the last 16 values. Blocks whose sizes are multiples of 16, the last one being
everything left (at least one block long), therefore give the same values and leave the generator
in the same state as one call on the whole tensor, for any shape (checked in the tests against
``normal_`` itself). Under 16 values in all, the whole tensor is drawn and sliced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 1 << 16  # values per draw: a multiple of 16 (256 KiB of float32 scratch)


def normal_rows(
    total: int, row_shape: tuple[int, ...], lo: int, hi: int, std: float, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rows ``lo:hi`` of ``torch.empty(total, *row_shape, dtype=dtype).normal_(0, std, generator=generator)``
    (on the CPU), drawing the whole stream but holding only those rows and one block."""
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"rows {lo}:{hi} are out of range; allowed: 0 <= lo <= hi <= {total}")
    m = math.prod(row_shape)
    n, a, b = total * m, lo * m, hi * m
    if n < 16:
        return torch.empty(n, dtype=dtype).normal_(0.0, std, generator=generator)[a:b].clone().view(hi - lo, *row_shape)
    out = torch.empty(b - a, dtype=dtype)
    scratch = torch.empty(BLOCK, dtype=dtype)
    start = 0
    while start < n:
        size = BLOCK if n - start >= 2 * BLOCK else n - start  # the last block takes the rest (>= 16 values)
        buf = scratch[:size] if size <= BLOCK else torch.empty(size, dtype=dtype)
        buf.normal_(0.0, std, generator=generator)
        s, e = max(start, a), min(start + size, b)
        if s < e:
            out[s - a : e - a] = buf[s - start : e - start]
        start += size
    return out.view(hi - lo, *row_shape)
