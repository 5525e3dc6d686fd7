"""Shared helpers for the attention tests: tiny modules, random q/k/v with padding, comparisons."""

import torch

from routelab import ModelConfig
from routelab.attention import build_attention
from routelab.attention.engine import spec_positions

H, HD = 3, 8  # heads, head dim


def model_config(attention: dict, causal: bool, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=11,
        d_model=H * HD,
        n_heads=H,
        max_seq_len=64,
        causal=causal,
        head="lm" if causal else "classification",
        num_labels=None if causal else 2,
        attention=attention,
    )
    base.update(overrides)
    return ModelConfig(**base)


def build(attention: dict, causal: bool, **overrides):
    return build_attention(model_config(attention, causal, **overrides), layer_idx=1)


def qkv_with_padding(T: int, B: int = 2, pad: int = 5, seed: int = 0):
    """Random leaf q, k, v (B, H, T, HD) and a padding mask with the last ``pad`` tokens of row 1."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, HD, generator=g).requires_grad_() for _ in range(3))
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, T - pad :] = True
    return q, k, v, padding


def assert_same_outputs_and_grads(out, ref, inputs, padding, atol=1e-5):
    """Outputs at real tokens and the gradients of a loss over real tokens agree (fp32, atol)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g = g.masked_fill(padding[:, None, :, None], 0.0)  # padded rows' outputs are unspecified
    real = ~padding[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=atol, rtol=0)
    ga = torch.autograd.grad(out, inputs, g, retain_graph=True)
    gb = torch.autograd.grad(ref, inputs, g, retain_graph=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def coverage(parts, T: int, BH: int = 1) -> torch.Tensor:
    """How many times each (query, key) pair is attended across ``parts``: (BH, T, T) int.

    Evaluates each part's own mask and causality on its slots, independently of the engine's mask
    code; slots outside [0, T) are dropped. Builds dense tensors: for small T only.
    """
    count = torch.zeros(BH, T + 1, T + 1, dtype=torch.long)
    for part in parts:
        qpos, kpos = spec_positions(part.queries), spec_positions(part.keys)
        Lq, Lk = qpos.shape[-1], kpos.shape[-1]
        m = part.mask if part.mask is not None else torch.ones(1, 1, 1, 1, dtype=torch.bool)
        if part.causal:
            m = m & torch.ones(Lq, Lk, dtype=torch.bool).tril()
        qpos = qpos.expand(BH, *qpos.shape[-2:]) if qpos.dim() == 2 else qpos
        kpos = kpos.expand(BH, *kpos.shape[-2:]) if kpos.dim() == 2 else kpos
        m = m.expand(BH, qpos.shape[1], Lq, Lk)
        qi = torch.where((qpos >= 0) & (qpos < T), qpos, T)[:, :, :, None].expand_as(m)
        ki = torch.where((kpos >= 0) & (kpos < T), kpos, T)[:, :, None, :].expand_as(m)
        b = torch.arange(BH)[:, None, None, None].expand_as(m)
        count.index_put_((b[m], qi[m], ki[m]), torch.ones(int(m.sum()), dtype=torch.long), accumulate=True)
    return count[:, :T, :T]
