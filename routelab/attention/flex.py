"""Optional inference fast path: compiled FlexAttention (Dong et al. 2024, "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels") for the sliding window.

A compiled forward can beat the block-sparse engine at long lengths (``benchmarks/attention.py``
compares them), but every new shape pays a cold compile and FlexAttention has no CPU backward in
torch 2.13. So it is opt-in (``local.flex_inference: true``), used only without autograd, and any
failure falls back to the engine. The block mask is built from the window's block layout in O(n)
(``from_kv_blocks``), not by evaluating the mask over n^2 pairs (O(n^2) time and memory).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def local_block_mask(T: int, window: int, causal: bool, device: str, block: int = 128):
    """FlexAttention BlockMask of the band |i - j| <= w (0 <= i - j <= w if causal), O(n) to build."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-T // block)
    qb = torch.arange(nb, device=device)
    lo = (qb * block - window).clamp(min=0) // block
    hi = qb if causal else (((qb + 1) * block - 1 + window) // block).clamp(max=nb - 1)
    count = hi - lo + 1  # (nb,) key blocks per query block
    idx = (lo[:, None] + torch.arange(nb, device=device)).clamp(max=nb - 1)  # (nb, nb): width = kv blocks

    def band(b, h, i, j):
        d = i - j
        return (d >= 0) & (d <= window) if causal else (d <= window) & (d >= -window)

    return BlockMask.from_kv_blocks(
        count[None, None].int(), idx[None, None].int(), BLOCK_SIZE=block, mask_mod=band, seq_lengths=(T, T)
    )


def flex_local(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool) -> Tensor:
    """(B, H, T, hd) -> (B, H, T, hd) through compiled FlexAttention (inference only)."""
    mask = local_block_mask(q.shape[2], window, causal, str(q.device))
    return _compiled_flex()(q.detach(), k.detach(), v.detach(), block_mask=mask)  # no CPU backward
