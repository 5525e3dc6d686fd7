"""Each router on hand-computed cases: which expert, which gate, which token goes nowhere."""

import itertools
import math

import pytest
import torch

from routelab.config import ConfigError
from routelab.moe.routers import ROUTERS, Router, build_router
from routelab.moe.routers.base import BaseRouter, auction_assignment
from routelab.moe.routers.expert_choice import ExpertChoiceRouter
from routelab.moe.routers.gshard import GShardRouter
from routelab.moe.routers.hash import HashRouter
from routelab.moe.routers.random import RandomRouter
from routelab.moe.routers.soft import SoftRouter
from routelab.moe.routers.switch import SwitchRouter
from routelab.moe.routers.topk import TopKRouter
from routelab.moe.routers.topp import TopPRouter


def _set(router, weight):
    with torch.no_grad():
        router.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return router


def _softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


W3 = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]  # logits of x = (a, b): (a, b, -a-b)


def test_switch_takes_top1_and_gates_with_its_probability():
    r = _set(SwitchRouter(2, 3), W3)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -2.0]])
    out = r(x)
    assert out.expert_idx.squeeze(1).tolist() == [0, 1, 2]
    expected = [_softmax([2, 0, -2])[0], _softmax([0, 1, -1])[1], _softmax([-1, -2, 3])[2]]
    torch.testing.assert_close(out.gates.squeeze(1), torch.tensor(expected))
    assert out.active is None and out.balance


def test_topk_renormalises_or_keeps_raw_probabilities():
    x = torch.tensor([[2.0, 1.0]])  # logits (2, 1, -3)
    p = _softmax([2, 1, -3])
    out = _set(TopKRouter(2, 3, top_k=2), W3)(x)
    assert out.expert_idx.tolist() == [[0, 1]]
    torch.testing.assert_close(out.gates, torch.tensor([[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]]))
    raw = _set(TopKRouter(2, 3, top_k=2, renormalize=False), W3)(x)
    torch.testing.assert_close(raw.gates, torch.tensor([[p[0], p[1]]]))


def test_gshard_top2_gates_sum_to_one_and_eval_uses_both():
    r = _set(GShardRouter(2, 3), W3).eval()
    out = r(torch.tensor([[2.0, 1.0]]))
    p = _softmax([2, 1, -3])
    torch.testing.assert_close(out.gates, torch.tensor([[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]]))
    assert out.active is None


def test_gshard_random_routing_uses_second_expert_with_probability_2_g2():
    r = GShardRouter(2, 3).train()
    with torch.no_grad():  # logits (log 3, 0, -inf-ish): g1 = 3/4, g2 = 1/4 -> second used with p = 1/2
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-30.0, 0.0]]))
    x = torch.tensor([[math.log(3.0), 0.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    out = r(x)
    torch.testing.assert_close(out.gates[0], torch.tensor([0.75, 0.25]))
    assert out.active[:, 0].all()
    assert abs(out.active[:, 1].float().mean().item() - 0.5) < 0.03
    with torch.no_grad():  # g2 >= 1/2 (equal top-2): 2 * g2 >= 1, always used
        r.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [-30.0, 0.0]]))
    assert r(x).active[:, 1].all()


def test_topp_takes_the_fewest_experts_covering_p():
    r = TopPRouter(4, 4, top_p=0.7)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    out = r(probs.log())  # logits = log p
    chosen = [sorted(out.expert_idx[t][out.active[t]].tolist()) for t in range(2)]
    assert chosen == [[0, 1], [1]]  # 0.5 < 0.7 <= 0.8; 0.9 >= 0.7 alone
    torch.testing.assert_close(out.gates[0, :2], torch.tensor([0.5, 0.3]))  # raw probabilities
    assert (out.gates[~out.active] == 0).all()
    capped = TopPRouter(4, 4, top_p=0.99, max_k=2)
    with torch.no_grad():
        capped.weight.copy_(torch.eye(4))
    assert capped(probs.log()).active.sum(1).tolist() == [2, 2]


def test_hash_table_is_deterministic_and_balanced():
    a, b, c = (
        HashRouter(4, 5, vocab_size=103, seed=0),
        HashRouter(4, 5, vocab_size=103, seed=0),
        HashRouter(4, 5, vocab_size=103, seed=1),
    )
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    counts = torch.bincount(a.table, minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    ids = torch.tensor([3, 7, 3, 102])
    out = a(torch.randn(4, 4), token_ids=ids)
    assert out.expert_idx.squeeze(1).tolist() == a.table[ids].tolist() and (out.gates == 1).all()
    with pytest.raises(ValueError, match="token_ids"):
        a(torch.randn(4, 4))
    with pytest.raises(ValueError, match="0..102"):
        a(torch.randn(1, 4), token_ids=torch.tensor([103]))


def test_random_router_differs_between_steps_and_is_deterministic_in_eval():
    r = RandomRouter(4, 8).train()
    x = torch.randn(64, 4)
    first, second = r(x).expert_idx, r(x).expert_idx
    assert not torch.equal(first, second)
    assert torch.bincount(first.reshape(-1), minlength=8).min() > 0  # uniform-ish: all experts used
    r.eval()
    mean = r(x)
    assert mean.expert_idx.shape == (64, 8) and torch.allclose(mean.gates, torch.full((64, 8), 1 / 8))
    seeded = RandomRouter(4, 8, eval_mode="seeded", seed=3).eval()
    assert torch.equal(seeded(x).expert_idx, seeded(x).expert_idx)


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    r = ExpertChoiceRouter(3, 3, capacity_factor=1.0)
    with torch.no_grad():
        r.weight.copy_(torch.eye(3))
    x = torch.randn(6, 3) * 3
    out = r(x)
    probs = x.softmax(-1)
    C = 2  # ceil(1.0 * 6 / 3)
    assert out.active.sum(0).tolist() == [C] * 3
    for e in range(3):
        assert set(out.active[:, e].nonzero().squeeze(1).tolist()) == set(probs[:, e].topk(C).indices.tolist())
    torch.testing.assert_close(out.gates, probs * out.active)
    # all tokens prefer expert 0 strongly except their scores for 1 and 2 tie: some token gets none
    x = torch.tensor([[5.0, 0, 0], [4.0, 0, 0], [3.0, 0, 0], [0.0, 0, 0]])
    out = ExpertChoiceRouter(3, 3, capacity_factor=0.75)
    with torch.no_grad():
        out.weight.copy_(torch.eye(3))
    act = out(x).active  # C = 1: expert 0 takes token 0; experts 1 and 2 both take token 3 (highest p_1, p_2)
    assert act.sum(1).tolist() == [1, 0, 0, 2]


def _best_balanced(scores, cap):
    T, E = scores.shape
    slots = [e for e in range(E) for _ in range(cap)]
    return max(sum(scores[t, a[t]].item() for t in range(T)) for a in set(itertools.permutations(slots)))


def test_auction_assignment_is_exactly_balanced_and_optimal_on_small_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randn(6, 3, generator=g)
        a = auction_assignment(scores)
        assert torch.bincount(a, minlength=3).tolist() == [2, 2, 2]
        got = scores[torch.arange(6), a].sum().item()
        assert got >= _best_balanced(scores, 2) - 6 * 1e-4
    skewed = torch.randn(256, 8, generator=g)
    skewed[:, 0] += 5.0  # everyone prefers expert 0: still 32 each
    assert torch.bincount(auction_assignment(skewed), minlength=8).tolist() == [32] * 8
    assert torch.bincount(auction_assignment(torch.randn(10, 4, generator=g)), minlength=4).tolist() == [3, 3, 2, 2]


def test_base_router_balanced_in_training_greedy_in_eval_sigmoid_gate():
    r = BaseRouter(2, 2)
    _set(r, [[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.2]])  # all prefer expert 0
    train = r.train()(x)
    assert torch.bincount(train.expert_idx.squeeze(1), minlength=2).tolist() == [2, 2]
    # optimum: tokens with the largest (logit0 - logit1) go to 0: tokens 0 and 1
    assert train.expert_idx.squeeze(1).tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(train.gates.squeeze(1), torch.sigmoid(torch.tensor([3.0, 2.0, 0.0, 0.2])))
    assert r.eval()(x).expert_idx.squeeze(1).tolist() == [0, 0, 0, 0]


def test_soft_router_dispatch_sums_to_one_over_real_tokens():
    r = SoftRouter(4, 3, slots_per_expert=2)
    assert r.weight.shape == (6, 4)
    x = torch.randn(2, 5, 4)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    out = r(x, padding_mask=pad)
    torch.testing.assert_close(out.dispatch.sum(1), torch.ones(2, 6))
    assert (out.dispatch[1, 3:] == 0).all()
    torch.testing.assert_close(out.combine.sum(-1), torch.ones(2, 5))


def test_unknown_router_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown router kind 'swich' \(did you mean 'switch'\?\); known kinds: base, expert_choice"):
        build_router("swich", 4, 4)


def test_router_options_are_validated():
    with pytest.raises(ConfigError, match=r"router.top_k=5 is invalid; allowed: 1 <= top_k <= num_experts=4"):
        TopKRouter(4, 4, top_k=5)
    with pytest.raises(ConfigError, match=r"unknown key 'router.top_k'.*known keys: kind"):
        GShardRouter(4, 4, top_k=3)  # top-2 by definition: no option
    with pytest.raises(ConfigError, match="top_p"):
        TopPRouter(4, 4, top_p=0.0)
    with pytest.raises(ConfigError, match="vocab_size"):
        HashRouter(4, 4)
    with pytest.raises(ConfigError, match=r"router.max_k=5 is invalid; allowed: 1 <= max_k <= num_experts=4"):
        TopPRouter(4, 4, max_k=5)


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_router_is_one_registered_class_with_its_own_options(name):
    """What a router must bring, checked for any router added later: its options dataclass (a
    section of its own, kind = its name), the flags the layer reads, and its experts per token."""
    entry = ROUTERS.get(name)
    cls, options = entry.module_class, entry.config_class()
    assert issubclass(cls, Router) and cls.kind == name and options.kind == name
    router = cls(8, 4, options, vocab_size=11)
    assert router.options is options
    k = router.experts_per_token(16)
    assert 0 < k <= 4
    for flag in ("learned", "needs_token_ids", "whole_batch", "supports_selection_bias", "own_capacity", "soft"):
        assert isinstance(getattr(cls, flag), bool)
    assert hasattr(router, "weight") == cls.learned
