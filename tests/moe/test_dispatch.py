"""The fast sorted path against the every-expert reference; capacity on hand cases."""

import pytest
import torch

from routelab.moe.dispatch import apply_capacity, capacity, grouped_experts, plan_dispatch
from routelab.moe.experts import Experts, reference_combine
from routelab.moe.threads import Workspace, _expert_tasks, _row_tasks


def _run(fn, experts, x, gates):
    x = x.detach().clone().requires_grad_(True)
    gates = gates.detach().clone().requires_grad_(True)
    y = fn(x, gates)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * gy).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    for p in experts.parameters():
        p.grad = None
    return y.detach(), x.grad, gates.grad, grads


@pytest.mark.parametrize(
    "activation,bias,D,H",
    [
        ("relu", True, 6, 4),
        ("gelu", True, 6, 4),
        ("swiglu", True, 6, 4),
        ("relu", False, 6, 4),
        ("swiglu", False, 6, 4),
        ("relu", True, 4, 7),
        ("gelu", True, 4, 7),
        ("swiglu", True, 4, 7),
    ],
)  # H < D and H >= D take different gate-scaling branches in backward
def test_grouped_experts_match_reference_forward_and_gradients(activation, bias, D, H):
    T, K, E = 13, 3, 5
    experts = Experts(E, D, H, activation, bias)
    if bias:  # non-zero biases so their gradients and the gate gradient's bias term are exercised
        with torch.no_grad():
            for b in (experts.b_in, experts.b_gate, experts.b_out):
                if b is not None:
                    b.normal_()
    x = torch.randn(T, D)
    idx = torch.randint(0, E - 1, (T, K))  # expert E-1 never chosen: its gradient must be exactly 0
    gates = torch.rand(T, K)
    active = torch.rand(T, K) > 0.3
    active[0] = False  # a token with no expert at all
    plan = plan_dispatch(idx, active, E)
    fast = _run(lambda x, g: grouped_experts(experts, x, g, plan), experts, x, gates)
    ref = _run(lambda x, g: reference_combine(experts, x, idx, g, active), experts, x, gates)
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in ref[3]:
        torch.testing.assert_close(fast[3][name], ref[3][name], atol=1e-5, rtol=1e-5, msg=name)
        assert fast[3][name][E - 1].abs().max() == 0, name
    assert fast[0][0].abs().max() == 0 and fast[2][~active].abs().max() == 0


def test_grouped_experts_with_all_slots_active_and_with_none():
    E, D, H = 3, 4, 5
    experts = Experts(E, D, H, "gelu")
    x, idx, gates = torch.randn(7, D), torch.randint(0, E, (7, 2)), torch.rand(7, 2)
    y = grouped_experts(experts, x, gates, plan_dispatch(idx, None, E))
    torch.testing.assert_close(y, reference_combine(experts, x, idx, gates, None), atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    none = torch.zeros(7, 2, dtype=torch.bool)
    y = grouped_experts(experts, xg, gates, plan_dispatch(idx, none, E))
    y.sum().backward()
    assert y.abs().max() == 0 and xg.grad.abs().max() == 0 and experts.w_in.grad.abs().max() == 0


def test_plan_sorts_pairs_by_expert_stably():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(idx, None, 4)
    assert plan.counts == [2, 2, 2, 0]
    assert plan.token.tolist() == [0, 1, 1, 2, 0, 2]  # expert 0: tokens 0, 1; expert 1: 1, 2; expert 2: 0, 2
    flat = idx.reshape(-1)
    assert flat[plan.order].tolist() == [0, 0, 1, 1, 2, 2]
    assert (plan.order[plan.inv.reshape(-1)] == torch.arange(6)).all()


def test_capacity_formula():
    assert capacity(1.0, 10, 1, 4) == 3  # ceil(2.5)
    assert capacity(1.25, 8, 2, 4) == 5
    assert capacity(100.0, 4, 1, 2) == 200  # larger than the token count is fine


def test_capacity_drops_by_position_first_choices_before_second():
    # tokens 0, 1 prefer expert 1; tokens 2, 3 prefer expert 0; capacity 2 per expert
    idx = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    keep = apply_capacity(idx, None, 2, 2)
    assert keep.tolist() == [[True, False]] * 4  # all second choices dropped, not token 2/3's first
    # top-1, all to expert 0, capacity 3: the first three tokens stay
    keep = apply_capacity(torch.zeros(6, 1, dtype=torch.long), None, 3, 2)
    assert keep.squeeze(1).tolist() == [True, True, True, False, False, False]


def test_capacity_drops_by_priority_and_skips_inactive():
    idx = torch.zeros(6, 1, dtype=torch.long)
    prob = torch.tensor([[0.1], [0.9], [0.3], [0.8], [0.5], [0.95]])
    keep = apply_capacity(idx, None, 3, 2, priority=prob)
    assert keep.squeeze(1).tolist() == [False, True, False, True, False, True]
    active = torch.tensor([[False], [True], [True], [True], [True], [True]])
    keep = apply_capacity(idx, active, 2, 2)  # an inactive slot takes no room
    assert keep.squeeze(1).tolist() == [False, True, True, False, False, False]


@pytest.mark.parametrize("threads", [1, 3])
def test_workspace_threads_and_buffer_reuse_match_reference(threads):
    T, K, E, D, H = 23, 2, 4, 6, 5
    experts = Experts(E, D, H, "swiglu")
    x, idx, gates = torch.randn(T, D), torch.randint(0, E, (T, K)), torch.rand(T, K)
    ws = Workspace(min_macs=0)  # helper threads even for this tiny problem
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 3 threads: rows and experts are cut into 3 task lists
    try:
        plan = plan_dispatch(idx, None, E)
        ref = _run(lambda x, g: reference_combine(experts, x, idx, g, None), experts, x, gates)
        for _ in range(2):  # the second step reuses the workspace buffer
            fast = _run(lambda x, g: grouped_experts(experts, x, g, plan, ws), experts, x, gates)
            for a, b in zip(fast[:3], ref[:3]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            for name in ref[3]:
                torch.testing.assert_close(fast[3][name], ref[3][name], atol=1e-5, rtol=1e-5, msg=name)
        with torch.inference_mode():
            torch.testing.assert_close(grouped_experts(experts, x, gates, plan, ws), ref[0], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def test_task_lists_cover_every_row_once():
    counts = [5, 0, 7, 1, 3]
    for parts in (1, 2, 3, 4):
        rows = sorted(r for part in _row_tasks(counts, parts) for _, s, t in part for r in range(s, t))
        assert rows == list(range(16))
        whole = [e for part in _expert_tasks(counts, parts) for e, _, _ in part]
        assert sorted(whole) == [0, 2, 3, 4]


def test_layer_with_workspace_can_be_copied_and_pickled():
    import copy
    import pickle

    from routelab.moe import MoE

    moe = MoE(d_model=4, num_experts=3, hidden=5, router="topk", top_k=2)
    x = torch.randn(7, 4)
    moe(x).hidden.sum().backward()  # creates the helper threads and the buffer
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        torch.testing.assert_close(clone(x).hidden, moe(x).hidden)
