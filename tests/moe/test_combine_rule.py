"""Who combines expert outputs: the layer (token choice: dispatch, sum by gate) unless the router
says it has its own rule (soft MoE: slots) through ``Router.forward_layer`` / ``Router.gate_matrix``;
and the task router's public view of one task (``experts_of``, ``restricted_to``) that extract uses."""

import pytest
import torch

from routelab.moe import MoE
from routelab.moe.output import MoEOutput
from routelab.moe.routers import ROUTERS
from routelab.moe.routers.task import TaskRouter
from tests.moe.router_options import OPTIONS

D, E, H, V = 8, 4, 6, 37


def _layer(router, **kw):
    torch.manual_seed(0)
    return MoE(d_model=D, num_experts=E, hidden=H, router=router, vocab_size=V, **{**OPTIONS.get(router, {}), **kw})


@pytest.mark.parametrize("router", ROUTERS.names())
def test_only_the_soft_router_has_its_own_combine_rule(router):
    moe = _layer(router)
    x = torch.randn(2, 5, D)
    own = moe.router.forward_layer(moe, x, None, None)
    gates = moe.router.gate_matrix(moe, x, None)
    if router == "soft":
        assert isinstance(own, MoEOutput) and own.hidden.shape == x.shape and gates.shape == (2, 5, E)
    else:
        assert own is None and gates is None


def test_the_layer_returns_what_the_soft_router_computes():
    moe = _layer("soft", num_shared_experts=1).eval()
    x = torch.randn(3, 5, D)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 2:] = True
    out, own = moe(x, padding_mask=pad), moe.router.forward_layer(moe, x, pad, None)
    assert torch.equal(out.hidden, own.hidden) and out.stats.keys() == own.stats.keys()
    assert all(torch.equal(out.stats[k], own.stats[k]) for k in out.stats)
    assert out.hidden[1, 2:].abs().sum() == 0  # padding gets output 0
    torch.testing.assert_close(out.stats["tokens_per_expert"].sum(), torch.tensor(12.0))  # 12 real tokens' combine mass
    assert torch.equal(moe.gate_matrix(x), moe.router.gate_matrix(moe, x, None))


def test_soft_reference_path_equals_the_fast_one():
    moe = _layer("soft").eval()
    x = torch.randn(2, 6, D)
    fast = moe(x).hidden
    moe.impl = "reference"
    torch.testing.assert_close(moe(x).hidden, fast, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gates", ["equal", "learned"])
def test_task_router_restricted_to_a_task(gates):
    r = TaskRouter(D, 6, num_tasks=3, top_k=2, gates=gates, table=[[0, 5], [3, 1], [2, 4]])
    if r.gate_logits is not None:
        with torch.no_grad():
            r.gate_logits.normal_()
    assert r.experts_of(1).tolist() == [3, 1]  # table (slot) order, not sorted
    state = r.restricted_to(1)
    one = TaskRouter(D, 2, num_tasks=1, top_k=2, gates=gates)
    one.load_state_dict(state)
    assert one.table.tolist() == [[0, 1]]
    torch.testing.assert_close(one.task_gates()[0], r.task_gates()[1])
    x = torch.randn(4, D)
    here, there = r(x, task_ids=torch.ones(4, dtype=torch.long)), one(x)
    assert torch.equal(r.experts_of(1)[there.expert_idx], here.expert_idx) and torch.equal(there.gates, here.gates)
