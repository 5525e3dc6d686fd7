"""MoE layers under autocast (bf16, fp16): routing stays float32 (the same decisions, gates and
auxiliary losses as fp32 for the same input: Switch Transformers' selective precision), the experts
compute in the autocast dtype, and parameter gradients come back float32."""

import pytest
import torch

from routelab.moe import MoE
from routelab.moe.routers import ROUTERS
from tests.moe.router_options import OPTIONS

D, E, H, V = 16, 4, 24, 37
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _run(moe, x, ids, dtype):
    torch.manual_seed(1)  # the same random decisions (gshard, random) with and without autocast
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = moe(x, token_ids=ids)
        gates = moe.gate_matrix(x, token_ids=ids)
    gy = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(5))
    ((out.hidden.float() * gy).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    moe.zero_grad(set_to_none=True)
    return out, gates, grads


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("router", ROUTERS.names())
def test_routing_stays_float32_and_experts_run_in_the_autocast_dtype(router, precision):
    torch.manual_seed(0)
    moe = MoE(d_model=D, num_experts=E, hidden=H, router=router, vocab_size=V, activation="swiglu", **OPTIONS.get(router, {}))
    x, ids = torch.randn(2, 9, D), torch.randint(0, V, (2, 9))
    ref, ref_gates, ref_grads = _run(moe, x, ids, None)
    out, gates, grads = _run(moe, x, ids, LOW[precision])
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates, ref_gates, rtol=0, atol=0)  # same experts, same gate values
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=0, atol=0)
    assert out.hidden.dtype == LOW[precision]  # the experts' matmuls ran in it
    torch.testing.assert_close(out.hidden.float(), ref.hidden, rtol=0, atol=0.05)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g.dtype == torch.float32 and g.isfinite().all(), n
        scale = ref_grads[n].abs().max().clamp(min=1e-3)
        assert (g - ref_grads[n]).abs().max() / scale < 0.1, n


def test_expert_gradients_match_a_float32_pass_on_the_rounded_weights():
    """Under bf16 the expert pass equals fp32 math on bf16-rounded operands (the cast is exact and
    differentiable): compare with the reference combine computed that way."""
    torch.manual_seed(0)
    moe = MoE(d_model=D, num_experts=E, hidden=H, router="topk", top_k=2, activation="relu", bias=False)
    x = torch.randn(20, D).bfloat16().float()
    for p in moe.experts.parameters():
        p.data = p.data.bfloat16().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x).hidden
    moe.impl = "reference"
    y_ref = moe(x).hidden
    torch.testing.assert_close(y.float(), y_ref, rtol=0.02, atol=0.02)


def test_row_pieces_cover_each_run_in_bucketed_sizes():
    from routelab.moe.threads import ROW_BUCKET, _pieces

    low, full = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    for s, t in [(0, 0), (3, 3 + ROW_BUCKET), (5, 5 + 3 * ROW_BUCKET + 7), (10, 10 + 2 * ROW_BUCKET), (0, 1000)]:
        pieces = _pieces(s, t, low)
        assert pieces[0][0] == s and pieces[-1][1] == t and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert all((b - a) % ROW_BUCKET == 0 for a, b in pieces[:-1]) and len(pieces) <= 2
        assert pieces[-1][1] - pieces[-1][0] < ROW_BUCKET or len(pieces) == 1
        assert _pieces(s, t, full) == [(s, t)]  # fp32: one call, as before


def test_bucketed_expert_matmuls_equal_one_call_per_expert(monkeypatch):
    """Hundreds of rows per expert (so every run is cut in pieces): outputs and every gradient equal
    the same bf16 pass with one matmul per run of rows, to bf16 rounding of the pieces' sums."""
    import routelab.moe.threads as threads

    torch.manual_seed(0)
    moe = MoE(d_model=32, num_experts=4, hidden=48, router="topk", top_k=2, activation="swiglu")
    moe._workspace.min_macs = 0  # also run the helper threads
    x = torch.randn(2, 301, 32)

    def run():
        torch.manual_seed(1)
        out, _, grads = _run(moe, x.clone().requires_grad_(True), None, torch.bfloat16)
        return out.hidden.float(), grads

    cut, cut_grads = run()
    monkeypatch.setattr(threads, "ROW_BUCKET", 10**9)
    whole, whole_grads = run()
    torch.testing.assert_close(cut, whole, rtol=0, atol=1e-2)
    for n, g in whole_grads.items():
        assert (cut_grads[n] - g).abs().max() <= 1e-2 * g.abs().max(), n
