"""Attention under autocast (bf16, fp16) on CPU: every kind trains (forward and backward, float32
gradients) and stays close to its fp32 output; learned routers score and choose in float32, so
their choices equal fp32's for the same inputs; the fused engine's multi-part merge and backward
accept low-precision q/k/v with a float32 upstream gradient."""

import pytest
import torch

from routelab.attention.engine import Part, Windows, attend_parts, reference_attention
from tests.attention.helpers import HD, H, build
from tests.attention.test_lengths import KINDS

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
T = 24


def _forward_backward(attn, x, padding, dtype):
    torch.manual_seed(2)  # bigbird's random blocks, dropout: the same in both passes
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = attn(x, padding_mask=padding)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).masked_fill(padding[..., None], 0)
    gx, *gw = torch.autograd.grad(out.float(), [x, *attn.parameters()], g)
    return out, gx, gw


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_trains_under_autocast_close_to_fp32(name, causal, precision):
    torch.manual_seed(0)
    attn = build(KINDS[name], causal).train()
    x = torch.randn(2, T, H * HD, generator=torch.Generator().manual_seed(3)).requires_grad_()
    padding = torch.zeros(2, T, dtype=torch.bool)
    padding[1, -5:] = True
    ref, ref_gx, ref_gw = _forward_backward(attn, x, padding, None)
    out, gx, gw = _forward_backward(attn, x, padding, LOW[precision])
    real = ~padding
    assert out.dtype == LOW[precision]  # the output projection ran in it
    torch.testing.assert_close(out.float()[real], ref[real], rtol=0, atol=0.03)
    assert gx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gw)
    torch.testing.assert_close(gx[real], ref_gx[real], rtol=0, atol=0.03)
    for g, r in zip(gw, ref_gw):
        assert (g - r).abs().max() <= 0.05 * r.abs().max().clamp(min=1e-3)


@pytest.mark.parametrize("name", ["moba", "block_topp"])
def test_block_routers_score_in_float32_and_choose_as_fp32_does(name, monkeypatch):
    attn = build(KINDS[name], causal=True)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, H, 64, HD, generator=g), torch.randn(2, H, 64, HD, generator=g)
    seen = []
    select = attn.select
    monkeypatch.setattr(attn, "select", lambda scores: seen.append(scores.dtype) or select(scores))
    ref = attn._route_all(q, k, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn._route_all(q.bfloat16(), k.bfloat16(), None)
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(low, attn._route_all(q.bfloat16().float(), k.bfloat16().float(), None))  # fp32 math on the same values
    assert low.shape == ref.shape


def test_kmeans_assigns_and_updates_centroids_in_float32():
    attn = build(KINDS["kmeans"], causal=False)
    r = torch.nn.functional.normalize(torch.randn(2, 2, T, HD), dim=-1).bfloat16()
    real = torch.ones(2, T, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nearest, routed = attn.assign(r, real)
        attn.update_centroids(r, nearest)
    assert attn.centroids.dtype == torch.float32
    assert torch.equal(routed, attn.assign(r.float(), real)[1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_engine_merges_parts_and_backpropagates_in_low_precision(precision):
    """Two overlapping parts (a window and a stride pattern) merged by log-sum-exp: the merged
    output has q's dtype and the backward takes a float32 upstream gradient (as autocast gives)."""
    dtype, B, n = LOW[precision], 2, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, HD, generator=g).to(dtype).requires_grad_() for _ in range(3))
    parts = [Part(Windows(0, 8, 8, 4), Windows(0, 8, 8, 4), None, causal=True),
             Part(Windows(8, 8, 8, 3), Windows(0, 8, 8, 3))]
    out = attend_parts(q, k, v, parts, impl="flash")
    assert out.dtype == dtype
    mask = torch.zeros(n, n, dtype=torch.bool)  # block b: itself causally (part 1) and block b - 1 (part 2)
    for b in range(4):
        mask[b * 8 : b * 8 + 8, b * 8 : b * 8 + 8] = torch.ones(8, 8, dtype=torch.bool).tril()
        mask[b * 8 : b * 8 + 8, b * 8 - 8 : b * 8] = b > 0
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qf, kf, vf, mask)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.03)
    gy = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, [q, k, v], gy)  # float32 upstream gradient
    ref_grads = torch.autograd.grad(ref, [qf, kf, vf], gy)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.1)


@pytest.mark.slow
def test_flex_attention_gets_one_dtype_under_autocast(monkeypatch):
    """FlexAttention is outside autocast's op lists: flex_attend casts q/k/v to the autocast dtype
    itself (on CUDA k-means' layer-normed queries come back float32 beside bf16 values).
    Compiles FlexAttention (several seconds): deselect with -m 'not slow'."""
    import routelab.attention.flex as flex
    from routelab.attention.patterns import band

    compiled, seen = flex._compiled_flex(), []
    monkeypatch.setattr(flex, "_compiled_flex", lambda: lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or compiled(q, k, v, **kw))
    T, w = 128, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, 16, generator=g) for _ in range(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = flex.flex_local(q, k, v.bfloat16(), w, True)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    pos = torch.arange(T)
    ref = reference_attention(*(t.bfloat16().float() for t in (q, k, v)), band(pos[:, None], pos[None], w, True))
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.03)
