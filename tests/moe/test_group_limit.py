"""Device-limited routing (DeepSeek-V2, sec. 2.1.3): each token chooses its experts among its M best
groups of consecutive experts; against a per-token reference, and its settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.config import Config
from routelab.errors import ConfigError
from routelab.moe import MoE


def reference_choice(scores: torch.Tensor, groups: int, per_token: int, k: int) -> list[set[int]]:
    """Per token, slowly: the groups ranked by their best expert's score, the k best experts of the
    ``per_token`` best groups."""
    E = scores.shape[1]
    size = E // groups
    out = []
    for row in scores.tolist():
        best = sorted(range(groups), key=lambda g: -max(row[g * size : (g + 1) * size]))[:per_token]
        allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return out


CASES = [  # (router, k, groups of the 8 experts, groups per token); fewer allowed experts than k is refused (below)
    (router, k, groups, m)
    for router, k in [("topk", 2), ("topk", 3), ("gshard", 2), ("switch", 1)]
    for groups, m in [(4, 1), (4, 2), (2, 1), (8, 3)]
    if m * (8 // groups) >= k
]


@pytest.mark.parametrize("router, k, groups, per_token", CASES)
def test_tokens_choose_among_their_best_groups(router, k, groups, per_token):
    E, D, T = 8, 6, 40
    opts = {"top_k": k} if router == "topk" else {}
    moe = MoE(d_model=D, num_experts=E, hidden=4, router=router, expert_groups=groups, max_ranks_per_token=per_token,
              bias_balancing=True, **opts).eval()
    with torch.no_grad():
        moe.selection_bias.normal_()  # the group scores use the selection scores, bias included
    x = torch.randn(T, D)
    r = moe.router(x, selection_bias=moe.selection_bias)
    scores = moe.router.logits(x) + moe.selection_bias
    assert [set(row) for row in r.expert_idx.tolist()] == reference_choice(scores, groups, per_token, k)
    probs = moe.router.logits(x).softmax(-1)  # gates: the experts' probabilities over all experts
    gates = probs.gather(1, r.expert_idx)
    if router != "switch":
        gates = gates / gates.sum(-1, keepdim=True)
    torch.testing.assert_close(r.gates, gates)
    unlimited = MoE(d_model=D, num_experts=E, hidden=4, router=router, bias_balancing=True, **opts).eval()
    unlimited.load_state_dict(moe.state_dict())
    free = unlimited.router(x, selection_bias=moe.selection_bias).expert_idx
    if per_token < k:  # (k experts always lie in at most k groups: a limit of k or more changes nothing)
        assert not torch.equal(free.sort(1).values, r.expert_idx.sort(1).values)  # the limit changed some choices


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 30), st.integers(0, 10**6))
def test_no_token_reaches_more_than_m_groups(groups, size, per_token, T, seed):
    per_token = min(per_token, groups)
    E = groups * size
    k = min(per_token * size, 3)
    g = torch.Generator().manual_seed(seed)
    moe = MoE(d_model=5, num_experts=E, hidden=3, router="topk", top_k=k, expert_groups=groups, max_ranks_per_token=per_token)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g))
    idx = moe.router(torch.randn(T, 5, generator=g)).expert_idx  # (T, k)
    reached = [len({e // size for e in row}) for row in idx.tolist()]
    assert max(reached) <= per_token
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct experts, none from a masked group


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"router": "hash", "expert_groups": 2, "max_ranks_per_token": 1}, "max_ranks_per_token is not supported by router 'hash'"),
        ({"router": "topk", "top_k": 3, "expert_groups": 4, "max_ranks_per_token": 1},
         "max_ranks_per_token=1 is invalid for 4 groups of 2 experts and router 'topk' choosing 3; allowed: 2 <="),
        ({"router": "topk", "expert_groups": 2, "max_ranks_per_token": 3}, "allowed: 1 <= max_ranks_per_token <= 2"),
        ({"router": "topk", "expert_groups": 3, "max_ranks_per_token": 1}, "expert_groups=3 is invalid; allowed: a divisor of num_experts=8"),
        ({"router": "topk", "max_ranks_per_token": 1}, "max_ranks_per_token needs expert_groups"),
    ],
)
def test_impossible_limits_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoE(d_model=4, num_experts=8, hidden=4, vocab_size=10, **kwargs)


def test_config_takes_the_groups_from_expert_parallelism():
    ffn = {"kind": "moe", "num_experts": 8, "router": {"kind": "topk", "top_k": 2}, "max_ranks_per_token": 1}
    cfg = Config.from_dict({"model": {"ffn": ffn}, "train": {"expert_parallel": 4}})
    assert cfg.model.ffn.expert_groups == 4
    with pytest.raises(ConfigError, match="model.ffn.expert_groups=None is invalid; allowed: the number of expert groups"):
        Config.from_dict({"model": {"ffn": ffn}})
    with pytest.raises(ConfigError, match="model.ffn.expert_groups=2 is invalid; allowed: a multiple of train.expert_parallel=4"):
        Config.from_dict({"model": {"ffn": {**ffn, "expert_groups": 2}}, "train": {"expert_parallel": 4}})
    with pytest.raises(ConfigError, match="model.ffn.max_ranks_per_token=1 is invalid; allowed: null, or an integer >= 1 with a router"):
        Config.from_dict({"model": {"ffn": {**ffn, "router": "hash", "expert_groups": 2}}})
