"""MoE layers under autocast (bf16, fp16): routing stays float32 (the same decisions, gates and
auxiliary losses as fp32 for the same input: Switch Transformers' selective precision), the experts
compute in the autocast dtype, and parameter gradients come back float32."""

import pytest
import torch

from routelab.moe import MoE
from routelab.moe.routers import ROUTERS

D, E, H, V = 16, 4, 24, 37
OPTIONS = {"topk": {"top_k": 2}, "topp": {"top_p": 0.5}, "soft": {"slots_per_expert": 2}}
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
