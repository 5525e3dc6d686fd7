"""The FlexAttention backend: block masks equal each kind's own mask (cheap, no compile), backend
selection, a few compiled CPU forwards (``slow``), and forward + backward on CUDA (``cuda``)."""

from types import SimpleNamespace

import pytest
import torch

import routelab.attention.flex as flex
from routelab.attention.engine import reference_attention
from routelab.attention.routes import BlockRoutes
from tests.attention.helpers import H, build, qkv_with_padding

FIXED = {
    "local": dict(kind="local", window=5, block_size=8),
    "strided": dict(kind="strided", stride=6, block_size=8),
    "fixed": dict(kind="fixed", stride=8, summary=2),
    "longformer": dict(kind="longformer", window=4, global_tokens=[0, 17], block_size=8),
    "bigbird": dict(kind="bigbird", block_size=8, window_blocks=3, num_global_blocks=1, num_random_blocks=2),
}
LEARNED = {
    "moba": dict(kind="moba", block_size=4, top_k=2),
    "block_topp": dict(kind="block_topp", block_size=4, top_p=0.6, max_blocks=3),
}


def implied_mask(bm, T: int, tight: bool = True) -> torch.Tensor:
    """The (B, H, T, T) token mask a BlockMask implies: full blocks all True, partial blocks
    ``mask_mod`` evaluated on their own F x F tile (never over all T^2 pairs at once)."""
    Fq, Fk = bm.BLOCK_SIZE
    B, H, nq = bm.kv_num_blocks.shape
    out = torch.zeros(B, H, T, T, dtype=torch.bool)
    seen = torch.zeros(B, H, nq, -(-T // Fk), dtype=torch.long)  # each listed block once
    for b in range(B):
        for h in range(H):
            for qb in range(nq):
                q = torch.arange(qb * Fq, min((qb + 1) * Fq, T))
                for num, idx, full in (
                    (bm.kv_num_blocks, bm.kv_indices, False),
                    (bm.full_kv_num_blocks, bm.full_kv_indices, True),
                ):
                    if num is None:
                        continue
                    for kb in idx[b, h, qb, : num[b, h, qb]].tolist():
                        seen[b, h, qb, kb] += 1
                        kv = torch.arange(kb * Fk, min((kb + 1) * Fk, T))
                        tile = (
                            torch.ones(len(q), len(kv), dtype=torch.bool)
                            if full
                            else bm.mask_mod(torch.tensor(b), torch.tensor(h), q[:, None], kv[None, :])
                        )
                        if tight and not full:  # tight: a partial block holds an allowed and a forbidden pair
                            assert tile.any() and not tile.all(), (b, h, qb, kb)
                        out[b, h, q[:, None], kv[None, :]] = tile
    assert seen.max() <= 1
    return out


@pytest.mark.parametrize("F", [8, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", list(FIXED))
def test_pattern_block_mask_implies_the_kinds_mask(kind, causal, F):
    T = 50  # not a multiple of F: a short tail block
    attn = build(FIXED[kind], causal=causal)
    bm = flex.pattern_block_mask(attn.parts(T, "cpu"), T, attn.flex_mask_mod(T, "cpu"), F=F)
    want = attn.mask(T)  # (T, T), or (H, T, T) for bigbird
    got = implied_mask(bm, T)
    assert torch.equal(got[0], want.expand_as(got[0])) if want.dim() == 3 else torch.equal(got[0, 0], want)
    if kind == "local":  # O(n) blocks: the band touches at most 2 + w / F key blocks per query block
        assert int((bm.kv_num_blocks + bm.full_kv_num_blocks).max()) <= 2 + -(-5 // F) + (0 if causal else 1)


@pytest.mark.parametrize("kind", ["fixed", "bigbird"])
def test_pair_counts_do_not_depend_on_the_chunk_size(kind, monkeypatch):
    attn = build(FIXED[kind], causal=True)
    parts = attn.parts(50, "cpu")
    whole = flex.pair_counts(parts, 50, 8, "cpu")
    monkeypatch.setattr(flex, "_CHUNK", 7)  # fewer pairs than one query row: chunks of groups and rows
    torch.testing.assert_close(flex.pair_counts(parts, 50, 8, "cpu"), whole, atol=0, rtol=0)
    assert int(whole.sum()) == int(attn.mask(50).sum())  # every allowed pair counted once (per head)


def test_flex_block_mask_is_cached_per_length_and_device():
    attn = build(FIXED["bigbird"], causal=True)
    a, b = attn.flex_block_mask(40, torch.device("cpu")), attn.flex_block_mask(40, torch.device("cpu"))
    assert a is b and attn.flex_block_mask(48, "cpu") is not a
    assert a.kv_num_blocks.shape[:2] == (1, attn.n_heads)  # per-head random blocks: a per-head mask


@pytest.mark.parametrize("F", [4, 8, None])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", list(LEARNED))
def test_routes_block_mask_implies_the_routes_mask(kind, causal, F):
    T = 50
    attn = build(LEARNED[kind], causal=causal)
    q, k, _, _ = qkv_with_padding(T, pad=0)
    with torch.no_grad():
        blocks = attn._route_all(q, k, None)  # (B, H, nqb, K)
    bm = flex.routes_block_mask(blocks, attn.block_size, causal, T, F=F)
    assert torch.equal(implied_mask(bm, T), BlockRoutes(blocks, attn.block_size, causal).mask(T))


@pytest.mark.parametrize("causal", [True, False])
def test_group_block_mask_implies_same_group_attention_in_sorted_order(causal):
    B, Hh, T = 2, 2, 50
    groups = torch.randint(0, 5, (B, Hh, T), generator=torch.Generator().manual_seed(2))
    groups[1, :, -7:] = -1  # padded tokens: no group
    order, bm = flex.group_block_mask(groups, causal, F=8)
    sorted_mask = implied_mask(bm, T, tight=False)  # (B, H, T, T) over sorted positions
    got = torch.zeros_like(sorted_mask)
    bi, hi = torch.arange(B)[:, None, None, None], torch.arange(Hh)[None, :, None, None]
    got[bi, hi, order[..., :, None], order[..., None, :]] = sorted_mask
    pos = torch.arange(T)
    want = (groups[..., :, None] == groups[..., None, :]) & (groups >= 0)[..., :, None]
    want = want & (pos[None, :] <= pos[:, None]) if causal else want
    assert torch.equal(got, want)
    listed = int(bm.kv_num_blocks.sum())
    assert listed < B * Hh * 7 * (8 if causal else 7)  # sorted groups skip blocks (not all n^2)


def test_routes_block_mask_rejects_a_flex_block_that_splits_route_blocks():
    with pytest.raises(ValueError, match="multiple of the route block"):
        flex.routes_block_mask(torch.zeros(1, 1, 4, 1, dtype=torch.long), 4, True, 16, F=6)


# ---------------------------------------------------------------------------------------------
# backend selection (no compile: flex_attend is replaced by the reference)


@pytest.fixture
def spy(monkeypatch):
    calls = []

    def fake(q, k, v, block_mask):
        calls.append(block_mask)
        return torch.zeros_like(q)

    monkeypatch.setattr(flex, "flex_attend", fake)
    return calls


def test_choose_backend_rules():
    cpu, cuda = torch.zeros(1), SimpleNamespace(device=torch.device("cuda"))
    cfg = lambda **kw: SimpleNamespace(**kw)  # noqa: E731
    assert flex.choose_backend(cfg(backend="auto"), cuda, None, 0.0) == "flex"
    assert flex.choose_backend(cfg(backend="auto"), cuda, torch.zeros(1, 1, dtype=torch.bool), 0.0) == "engine"
    assert flex.choose_backend(cfg(backend="auto"), cuda, None, 0.1) == "engine"  # FlexAttention: no dropout
    assert flex.choose_backend(cfg(backend="engine"), cuda, None, 0.0) == "engine"
    assert flex.choose_backend(cfg(backend="auto"), cpu, None, 0.0) == "engine"
    assert flex.choose_backend(cfg(backend="flex"), cpu, None, 0.0) == "engine"  # grad on: no CPU backward
    with torch.no_grad():
        assert flex.choose_backend(cfg(backend="flex"), cpu, None, 0.0) == "flex"
        assert flex.choose_backend(cfg(backend="auto", flex_inference=True), cpu, None, 0.0) == "flex"
        assert flex.choose_backend(cfg(backend="auto"), cpu, None, 0.0) == "engine"
    assert flex.choose_backend(cfg(backend="dense"), cpu, None, 0.0) == "dense"


@pytest.mark.parametrize("kind", ["local", "bigbird", "moba"])
def test_backends_on_cpu(kind, spy):
    spec = {**FIXED, **LEARNED}[kind]
    T = 40
    q, k, v, padding = qkv_with_padding(T)
    ref_attn = build(dict(spec, backend="dense"), causal=True)
    for backend in ("auto", "engine"):  # CPU with autograd: the engine, equal to the dense reference
        attn = build(dict(spec, backend=backend), causal=True)
        out, _ = attn.attend_routes(q, k, v, None, None)
        torch.testing.assert_close(out, ref_attn.attend_routes(q, k, v, None, None)[0], atol=1e-5, rtol=0)
    assert not spy
    attn = build(dict(spec, backend="flex"), causal=True)
    attn.attend_routes(q, k, v, None, None)  # grad enabled on CPU: the engine
    with torch.no_grad():
        attn.attend_routes(q, k, v, padding, None)  # padding: the engine
        assert not spy
        attn.attend_routes(q, k, v, None, None)
    assert len(spy) == 1 and spy[0].seq_lengths == (T, T)


def test_dense_backend_is_the_masked_reference():
    attn = build(dict(FIXED["longformer"], backend="dense"), causal=False)
    q, k, v, padding = qkv_with_padding(30)
    out = attn.attend(q, k, v, padding, 0)
    torch.testing.assert_close(out, reference_attention(q, k, v, attn.mask(30), padding), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# compiled FlexAttention on CPU (forward only; each compile takes seconds)


@pytest.mark.slow
def test_compiled_flex_forward_equals_dense_for_bigbird_per_head_blocks():
    T = 200  # F = 128: one full-length block and a short tail
    attn = build(dict(FIXED["bigbird"], backend="flex", block_size=32), causal=False, max_seq_len=256)
    q, k, v, _ = qkv_with_padding(T, pad=0)
    with torch.no_grad():
        out = attn.attend(q, k, v, None, 0)
    assert not attn.__dict__.get("_flex_failed", False)
    torch.testing.assert_close(out, reference_attention(q, k, v, attn.mask(T)), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_flex_forward_equals_dense_for_moba_routes_without_recompiling():
    T = 200
    attn = build(dict(LEARNED["moba"], backend="flex", block_size=32), causal=True, max_seq_len=256)
    with torch.no_grad():
        for seed in (0, 1):  # new routes at the same shape reuse the compiled kernel
            q, k, v, _ = qkv_with_padding(T, pad=0, seed=seed)
            with torch._dynamo.config.patch(error_on_recompile=seed == 1):
                out, routes = attn.attend_routes(q, k, v, None, None)
            assert not attn.__dict__.get("_flex_failed", False)
            torch.testing.assert_close(out, reference_attention(q, k, v, routes.mask(T)), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_flex_forward_equals_the_engine_for_kmeans_with_padding():
    spec = dict(kind="kmeans", num_clusters=3, local_heads=1, window=8, block_size=16)
    attn = build(dict(spec, backend="flex"), causal=True, max_seq_len=256)
    engine = build(dict(spec, backend="engine"), causal=True, max_seq_len=256)
    engine.load_state_dict(attn.state_dict())
    x = torch.randn(2, 150, H * 8, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, 150, dtype=torch.bool)
    padding[1, -20:] = True
    with torch.no_grad():
        out, routes = attn.eval()(x, padding_mask=padding, return_routes=True)
        want, want_routes = engine.eval()(x, padding_mask=padding, return_routes=True)
    assert not attn.__dict__.get("_flex_failed", False)
    torch.testing.assert_close(routes.groups, want_routes.groups)
    real = ~padding[:, :, None].expand_as(out)
    torch.testing.assert_close(out[real], want[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# CUDA only: forward and backward of every kind against the dense reference (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", list(FIXED) + list(LEARNED))
def test_cuda_flex_forward_and_backward_equal_dense(kind, causal, monkeypatch):
    spec = dict({**FIXED, **LEARNED}[kind])
    spec["block_size" if "block_size" in spec else "stride"] = 32
    T = 300  # not a multiple of 128
    hd = 32  # FlexAttention's CUDA kernels want head dims of 16 or more
    attn = build(spec, causal=causal, max_seq_len=512, d_model=H * hd).cuda()
    ref = build(dict(spec, backend="dense"), causal=causal, max_seq_len=512, d_model=H * hd).cuda()
    used = []
    real = flex.flex_attend
    monkeypatch.setattr(flex, "flex_attend", lambda *a, **kw: used.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, hd, generator=g).cuda().requires_grad_() for _ in range(3))
    out, routes = attn.attend_routes(q, k, v, None, None)
    assert used and not attn.__dict__.get("_flex_failed", False)  # auto = flex on CUDA
    if routes is not None:  # the reference under the same routes
        want = reference_attention(q, k, v, routes.mask(T))
    else:
        want = ref.attend_routes(q, k, v, None, None)[0]
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=1e-3)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_model_trains_a_step_on_flex_in_bf16():
    from routelab import ModelConfig, RoutedTransformer

    cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        causal=True,
        attention=dict(kind="moba", block_size=64, top_k=2),
    )
    model = RoutedTransformer(cfg).cuda()
    ids = torch.randint(0, 64, (2, 384), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kmeans_flex_forward_and_backward_equal_the_engine(causal):
    spec = dict(kind="kmeans", num_clusters=3, local_heads=1, window=16, block_size=32)
    attn = build(spec, causal=causal, max_seq_len=512, d_model=H * 32).cuda().eval()
    engine = build(dict(spec, backend="engine"), causal=causal, max_seq_len=512, d_model=H * 32).cuda().eval()
    engine.load_state_dict(attn.state_dict())
    x = torch.randn(2, 300, H * 32, generator=torch.Generator().manual_seed(4)).cuda()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = attn(xa), engine(xb)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert not attn.__dict__.get("_flex_failed", False)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-4, rtol=1e-3)
