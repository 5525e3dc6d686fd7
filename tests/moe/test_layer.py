"""The MoE layer: fast path vs reference for every router, gradients, capacity, padding,
balancing, statistics and refusals."""

import pytest
import torch

from routelab.config import ConfigError
from routelab.moe import MoE
from routelab.moe.routers import ROUTERS
from tests.moe.router_options import OPTIONS

D, E, H, V = 8, 4, 6, 37
WHOLE_BATCH = [n for n in ROUTERS.names() if ROUTERS.get(n).module_class.whole_batch]


def _layer(router, **kw):
    torch.manual_seed(0)
    opts = {**OPTIONS.get(router, {}), **kw}
    return MoE(d_model=D, num_experts=E, hidden=H, router=router, vocab_size=V, **opts)


def _forward_backward(moe, x, ids, pad=None, seed=1):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same random routing decisions (gshard, random, jitter) for both paths
    out = moe(x, token_ids=ids, padding_mask=pad)
    gy = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(5))
    ((out.hidden * gy).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    moe.zero_grad(set_to_none=True)
    return out, x.grad, grads


@pytest.mark.parametrize("router", ROUTERS.names())
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_matches_reference_forward_and_gradients(router, training):
    moe = _layer(router, jitter=0.1 if router == "switch" else 0.0).train(training)
    moe._workspace.min_macs = 0 if training else moe._workspace.min_macs  # also run the helper threads
    x, ids = torch.randn(2, 7, D), torch.randint(0, V, (2, 7))
    moe.impl = "sorted"
    fast, gx_fast, g_fast = _forward_backward(moe, x, ids)
    moe.impl = "reference"
    ref, gx_ref, g_ref = _forward_backward(moe, x, ids)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], atol=1e-5, rtol=1e-5, msg=n)
    # gradients reach the experts for every router, and the router weights for learned ones
    assert g_fast["experts.w_in"].abs().sum() > 0 and g_fast["experts.w_out"].abs().sum() > 0
    if ROUTERS.get(router).module_class.learned:
        assert g_fast["router.weight"].abs().sum() > 0
    else:
        assert not any(n.startswith("router.") for n in g_fast)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_parameter_names_and_shapes(activation):
    moe = _layer("switch", activation=activation, num_shared_experts=1)
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes["router.weight"] == (E, D)
    assert shapes["experts.w_in"] == (E, D, H) and shapes["experts.b_in"] == (E, H)
    assert shapes["experts.w_out"] == (E, H, D) and shapes["experts.b_out"] == (E, D)
    assert ("experts.w_gate" in shapes) == ("experts.b_gate" in shapes) == (activation == "swiglu")
    assert shapes["shared.w_in.weight"] == (H, D)
    assert "experts.b_in" not in dict(_layer("switch", bias=False).named_parameters())


def test_output_is_gate_times_chosen_expert():
    moe = _layer("switch").eval()
    x = torch.randn(5, D)
    out = moe(x)
    r = moe.router(x)
    all_out = moe.experts.forward_all(x)  # (E, T, D)
    idx = r.expert_idx.squeeze(1)
    expected = r.gates * all_out[idx, torch.arange(5)]
    torch.testing.assert_close(out.hidden, expected, atol=1e-6, rtol=1e-5)


def test_random_router_eval_is_the_mean_of_all_experts():
    moe = _layer("random").eval()
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(
        moe(x).hidden, moe.experts.forward_all(x.reshape(-1, D)).mean(0).view(2, 3, D), atol=1e-6, rtol=1e-5
    )
    moe.train()
    torch.manual_seed(0)
    a = moe(x).hidden
    b = moe(x).hidden
    assert not torch.allclose(a, b)


def test_shared_experts_add_to_every_token():
    moe = _layer("switch", num_shared_experts=2).eval()
    x = torch.randn(6, D)
    moe_no_shared = _layer("switch").eval()
    moe_no_shared.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared.")})
    torch.testing.assert_close(moe(x).hidden, moe_no_shared(x).hidden + moe.shared(x), atol=1e-6, rtol=1e-5)
    assert moe.shared.w_in.weight.shape == (2 * H, D)


# -- capacity ----------------------------------------------------------------------------------


def _all_to_expert0(moe, strengths):
    """Router weight making every token prefer expert 0 with logit = its first coordinate."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.zeros(len(strengths), D)
    x[:, 0] = torch.tensor(strengths)
    return x


def test_capacity_drops_exact_number_by_position():
    moe = _layer("switch", capacity_factor=1.0).eval()  # capacity ceil(1 * 8 * 1 / 4) = 2
    x = _all_to_expert0(moe, [1.0, 5, 2, 4, 3, 6, 7, 8])
    out = moe(x)
    zero = out.hidden.abs().sum(-1) == 0
    assert zero.tolist() == [False, False] + [True] * 6  # the first two tokens stay
    assert out.stats["tokens_per_expert"].tolist() == [2, 0, 0, 0]
    assert float(out.stats["dropped_fraction"]) == 6 / 8 and float(out.stats["unrouted_fraction"]) == 6 / 8
    assert int(out.stats["unused_experts"]) == 3


def test_capacity_drop_policy_probability_keeps_the_most_confident():
    moe = _layer("switch", capacity_factor=1.0, drop_policy="probability").eval()
    x = _all_to_expert0(moe, [1.0, 5, 2, 4, 3, 6, 7, 8])
    kept = (moe(x).hidden.abs().sum(-1) > 0).nonzero().squeeze(1).tolist()
    assert kept == [6, 7]


def test_dropless_drops_nothing_and_huge_capacity_works():
    for cf in (None, 1000.0):
        moe = _layer("topk", capacity_factor=cf).eval()
        x = _all_to_expert0(moe, [3.0] * 10)
        out = moe(x)
        assert float(out.stats["dropped_fraction"]) == 0.0
        assert out.stats["tokens_per_expert"][0] == 10 and out.stats["tokens_per_expert"].sum() == 20
        assert (out.hidden.abs().sum(-1) > 0).all()


def test_causal_capacity_only_drops_for_earlier_positions():
    # in a causal layer, position priority is (position, choice, row): a token is displaced only by
    # tokens at earlier (or equal) positions, so changing later tokens never changes earlier outputs
    moe = _layer("topk", capacity_factor=0.5, causal=True).eval()
    x = torch.randn(2, 8, D)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, D) * 3
    torch.testing.assert_close(moe(x).hidden[:, :5], moe(y).hidden[:, :5])
    assert float(moe(x).stats["dropped_fraction"]) > 0


# -- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "base", "soft", "hash"])
def test_padding_is_not_routed_and_does_not_affect_losses(router):
    moe = _layer(router, capacity_factor=1.5 if router in ("switch", "topk") else None).train()
    x, ids = torch.randn(2, 6, D), torch.randint(0, V, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 5:] = True
    x_junk = x.clone()
    x_junk[pad] = 100.0  # whatever sits at padding must not matter
    out = moe(x_junk, token_ids=ids, padding_mask=pad)
    assert (out.hidden[pad] == 0).all()
    if router in ("switch", "topk", "hash"):
        assert out.stats["tokens_per_expert"].sum() <= 9 * {"topk": 2}.get(router, 1)
    if router != "soft":  # exactly as if only the 9 real tokens had been given
        alone = moe(x[~pad].unsqueeze(0), token_ids=ids[~pad].unsqueeze(0))
        torch.testing.assert_close(out.hidden[~pad], alone.hidden[0])
        torch.testing.assert_close(out.aux_loss, alone.aux_loss)
        torch.testing.assert_close(out.stats["tokens_per_expert"], alone.stats["tokens_per_expert"])
    if router == "soft":  # each sequence is its own soft-MoE group: row 0's real tokens alone
        alone = moe(x[0:1, :4])
        torch.testing.assert_close(out.hidden[0, :4], alone.hidden[0], atol=1e-6, rtol=1e-5)


def test_all_padding_gives_zero_output_and_loss():
    moe = _layer("topk").train()
    out = moe(torch.randn(1, 3, D), padding_mask=torch.ones(1, 3, dtype=torch.bool))
    assert out.hidden.abs().max() == 0 and float(out.aux_loss) == 0


# -- balancing ---------------------------------------------------------------------------------


def test_aux_loss_is_weighted_balance_plus_z_loss():
    moe = _layer("topk", balance_loss_weight=0.3, z_loss_weight=0.2).train()
    x = torch.randn(10, D)
    out = moe(x)
    expected = 0.3 * out.stats["balance_loss"] + 0.2 * out.stats["z_loss"]
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    off = _layer("topk", balance_loss_weight=0.0, z_loss_weight=0.0)(x)
    assert float(off.aux_loss) == 0.0


def test_bias_balancing_reduces_imbalance_on_skewed_input():
    moe = _layer("switch", bias_balancing=True, bias_update_rate=0.05).train()
    x = torch.randn(256, D)
    with torch.no_grad():
        moe.router.weight[0] += 2 * x.mean(0) / x.mean(0).norm() ** 2  # expert 0 favoured
    x = x + x.mean(0) * 0  # same skewed batch every step
    first = moe(x).stats
    for _ in range(60):
        last = moe(x).stats
    imbalance = lambda s: float(s["max_load"] / s["mean_load"])  # noqa: E731
    assert imbalance(first) > 1.5
    assert imbalance(last) < 0.7 * imbalance(first)
    assert moe.selection_bias[0] < 0  # the favoured expert is pushed down
    # the gates still come from the unbiased probabilities; eval does not update the bias
    bias = moe.selection_bias.clone()
    moe.eval()(x)
    assert torch.equal(bias, moe.selection_bias)


def test_stats_are_detached_and_complete():
    out = _layer("topk").train()(torch.randn(2, 5, D))
    for key in (
        "tokens_per_expert",
        "dropped_fraction",
        "unrouted_fraction",
        "router_entropy",
        "max_load",
        "mean_load",
        "unused_experts",
    ):
        assert key in out.stats
        assert not out.stats[key].requires_grad
    assert out.stats["tokens_per_expert"].shape == (E,) and out.stats["tokens_per_expert"].sum() == 20


# -- refusals ----------------------------------------------------------------------------------


def test_hash_without_token_ids_is_refused():
    with pytest.raises(ValueError, match="needs token_ids"):
        _layer("hash")(torch.randn(3, D))


@pytest.mark.parametrize("router", WHOLE_BATCH)
def test_whole_batch_routers_are_refused_in_a_causal_layer(router):
    with pytest.raises(ConfigError, match="refused in a causal model"):
        _layer(router, causal=True)


def test_top_k_larger_than_num_experts_is_refused():
    with pytest.raises(ConfigError, match=r"top_k=5 is invalid; allowed: 1 <= top_k <= num_experts=4"):
        _layer("topk", top_k=5)


def test_unknown_router_and_option_are_refused_with_known_names():
    with pytest.raises(ConfigError, match="known kinds: " + ", ".join(ROUTERS.names())):
        _layer("top1")
    with pytest.raises(ConfigError, match=r"unknown key 'router.top_p'; did you mean 'kind'\?|unknown key 'router.top_p'"):
        _layer("switch", top_p=0.3)
    with pytest.raises(ConfigError, match="bias_balancing"):
        _layer("hash", bias_balancing=True)
    with pytest.raises(ConfigError, match="bounds each expert's tokens itself"):
        _layer("expert_choice", capacity_factor=2.0)


def test_soft_moe_matches_the_paper_formula():
    moe = _layer("soft").eval()  # E = 4 experts, S = 2 slots each
    x = torch.randn(1, 5, D)
    phi = moe.router.weight  # (E*S, D)
    logits = x[0] @ phi.t()  # (T, E*S)
    dispatch, combine = logits.softmax(0), logits.softmax(1)
    slots = dispatch.t() @ x[0]  # (E*S, D)
    ex = moe.experts
    outs = []
    for i in range(E):
        s = slots[2 * i : 2 * i + 2]
        h = torch.nn.functional.gelu(s @ ex.w_in[i] + ex.b_in[i])
        outs.append(h @ ex.w_out[i] + ex.b_out[i])
    expected = combine @ torch.cat(outs)  # (T, D)
    torch.testing.assert_close(moe(x).hidden[0], expected, atol=1e-5, rtol=1e-5)


def test_jitter_only_in_training():
    moe = _layer("switch", jitter=0.5)
    x = torch.randn(64, D)
    moe.eval()
    torch.testing.assert_close(moe(x).hidden, moe(x).hidden)
    moe.train()
    a, b = moe(x).stats["tokens_per_expert"], moe(x).stats["tokens_per_expert"]
    assert not torch.equal(a, b)  # noisy router inputs move some tokens


@pytest.mark.parametrize("router", ["switch", "topk", "soft", "hash"])
def test_gate_matrix_reproduces_the_forward_combination(router):
    moe = _layer(router, capacity_factor=1.0 if router == "switch" else None).eval()
    x, ids = torch.randn(1, 9, D), torch.randint(0, V, (1, 9))
    g = moe.gate_matrix(x, token_ids=ids)
    assert g.shape == (1, 9, E)
    if router == "soft":
        torch.testing.assert_close(g.sum(-1), torch.ones(1, 9))
        return
    per_expert = moe.experts.forward_all(x[0])  # (E, T, D)
    expected = torch.einsum("te,etd->td", g[0], per_expert)
    torch.testing.assert_close(moe(x, token_ids=ids).hidden[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_each_expert_is_the_one_feed_forward(activation, bias):
    """Expert e of the stacked weights computes exactly ``FeedForward`` holding its slices: one FFN
    implementation for dense FFNs, shared experts and experts (so a dense FFN can seed experts)."""
    from routelab.ffn.dense import FeedForward
    from routelab.moe.experts import Experts

    experts = Experts(3, D, H, activation, bias)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    x = torch.randn(5, D)
    every = experts.forward_all(x)  # (E, T, D)
    for e in range(3):
        ffn = FeedForward(D, H, activation, bias)
        with torch.no_grad():
            ffn.w_in.weight.copy_(experts.w_in[e].t())
            ffn.w_out.weight.copy_(experts.w_out[e].t())
            if activation == "swiglu":
                ffn.w_gate.weight.copy_(experts.w_gate[e].t())
            if bias:
                ffn.w_in.bias.copy_(experts.b_in[e])
                ffn.w_out.bias.copy_(experts.b_out[e])
                if activation == "swiglu":
                    ffn.w_gate.bias.copy_(experts.b_gate[e])
        torch.testing.assert_close(every[e], ffn(x), atol=1e-5, rtol=1e-5)
