"""The ``torch._grouped_mm`` dispatch path (the accelerator default) against the per-expert loop,
forced on CPU; the device checks at the end run only with CUDA (``-m cuda``)."""

import pytest
import torch

from routelab.moe.dispatch import grouped_experts, grouped_mm_available, plan_dispatch
from routelab.moe.experts import Experts, reference_combine
from routelab.moe.threads import Workspace

needs_grouped_mm = pytest.mark.skipif(not grouped_mm_available(), reason="this torch has no torch._grouped_mm")


def _run(fn, experts, x, gates):
    x = x.detach().clone().requires_grad_(True)
    gates = gates.detach().clone().requires_grad_(True)
    y = fn(x, gates)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    (y * gy).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    for p in experts.parameters():
        p.grad = None
    return y.detach(), x.grad, gates.grad, grads


def _case(activation, bias, E=6, T=11, K=2, D=8, H=16, device="cpu"):
    g = torch.Generator().manual_seed(3)
    experts = Experts(E, D, H, activation, bias).to(device)
    if bias:
        with torch.no_grad():
            for b in (experts.b_in, experts.b_gate, experts.b_out):
                if b is not None:
                    b.normal_(generator=g) if device == "cpu" else b.copy_(torch.randn(b.shape, generator=g))
    x, gates = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    idx = torch.randint(0, E - 2, (T, K), generator=g)  # experts E-2 and E-1 get no token
    active = torch.rand(T, K, generator=g) > 0.3
    active[0] = False  # a token routed nowhere
    return experts, x.to(device), gates.to(device), idx.to(device), active.to(device)


@needs_grouped_mm
@pytest.mark.parametrize("activation,bias", [("relu", True), ("gelu", False), ("swiglu", True)])
@pytest.mark.parametrize("dropped", [True, False])
def test_grouped_mm_path_equals_the_loop_path(activation, bias, dropped):
    experts, x, gates, idx, active = _case(activation, bias)
    active = active if dropped else None
    plan = plan_dispatch(idx, active, experts.num_experts)
    fast = _run(lambda x, g: grouped_experts(experts, x, g, plan, impl="grouped_mm"), experts, x, gates)
    loop = _run(lambda x, g: grouped_experts(experts, x, g, plan, impl="loop"), experts, x, gates)
    ref = _run(lambda x, g: reference_combine(experts, x, idx, g, active), experts, x, gates)
    for a, b, c in zip(fast[:3], loop[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    for name in loop[3]:
        torch.testing.assert_close(fast[3][name], loop[3][name], atol=1e-5, rtol=1e-5, msg=name)
        for e in (experts.num_experts - 2, experts.num_experts - 1):  # no tokens: exactly zero gradient
            assert fast[3][name][e].abs().max() == 0, name


@needs_grouped_mm
def test_grouped_mm_path_with_no_active_pair():
    experts, x, gates, idx, _ = _case("gelu", True)
    none = torch.zeros_like(idx, dtype=torch.bool)
    y, gx, gg, grads = _run(
        lambda x, g: grouped_experts(experts, x, g, plan_dispatch(idx, none, 6), impl="grouped_mm"), experts, x, gates
    )
    assert y.abs().max() == 0 and gx.abs().max() == 0 and gg.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads.values())


def test_auto_is_the_loop_on_cpu_and_unknown_impl_is_rejected(monkeypatch):
    import routelab.moe.dispatch as dispatch

    experts, x, gates, idx, active = _case("relu", True)
    plan = plan_dispatch(idx, active, 6)

    def boom(*args, **kwargs):
        raise AssertionError("grouped_mm must not run on CPU unless asked")

    monkeypatch.setattr(dispatch, "grouped_mm_experts", boom)
    y = grouped_experts(experts, x, gates, plan, Workspace())
    torch.testing.assert_close(y, reference_combine(experts, x, idx, gates, active), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="allowed: 'auto', 'loop', 'grouped_mm'"):
        grouped_experts(experts, x, gates, plan, impl="bmm")


def test_plan_keeps_counts_on_the_device_until_the_loop_asks():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(idx, None, 4)
    assert "counts" not in plan.__dict__  # nothing synced yet
    assert plan.expert_counts.tolist() == [2, 2, 2, 0] and plan.counts == [2, 2, 2, 0]


# ---------------------------------------------------------------------------------------------
# CUDA only: skipped without a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_uses_grouped_mm_without_the_thread_pool(dtype, monkeypatch):
    import routelab.moe.threads as threads

    experts, x, gates, idx, active = _case("swiglu", True, E=16, T=64, D=64, H=128, device="cuda")
    experts = experts.to(dtype)
    plan = plan_dispatch(idx, active, 16)
    ran = []
    monkeypatch.setattr(threads.Workspace, "run", lambda self, *a: ran.append(a))
    out = _run(lambda x, g: grouped_experts(experts, x, g, plan, Workspace()), experts, x.to(dtype), gates)
    ref = _run(lambda x, g: reference_combine(experts, x, idx, g.to(dtype), active), experts, x.to(dtype), gates)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(out[:3], ref[:3]):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    for name in ref[3]:
        torch.testing.assert_close(out[3][name].float(), ref[3][name].float(), atol=tol, rtol=tol, msg=name)
    assert not ran and "counts" not in plan.__dict__  # no CPU threads, no host sync of the counts
