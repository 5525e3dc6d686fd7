"""Analytic FLOPs per token against hand-computed values."""

import pytest

from routelab import RoutedTransformer
from routelab.report.flops import dense_pairs, model_cost
from tests.conftest import tiny_config


def test_dense_model_cost_by_hand():
    # d=32, 2 layers, vocab 61, GELU hidden 128, causal LM at T=16
    model = RoutedTransformer(tiny_config())
    cost = model_cost(model, 16)
    d, h, T, V = 32, 128, 16, 61
    attn_layer = 8 * d * d + 4 * d * (T * (T + 1) / 2) / T
    assert cost.attention_flops == pytest.approx(2 * attn_layer)
    assert cost.ffn_flops == pytest.approx(2 * 4 * d * h)
    assert cost.head_flops == pytest.approx(2 * d * V)
    assert cost.attention_density == 1.0
    assert cost.total_params == cost.active_params == model.num_parameters()


def test_swiglu_and_encoder_cost():
    model = RoutedTransformer(tiny_config(head="classification", num_labels=3, ffn={"activation": "swiglu", "hidden": 64}))
    cost = model_cost(model, 10)
    assert cost.ffn_flops == pytest.approx(2 * 6 * 32 * 64)
    assert cost.attention_flops == pytest.approx(2 * (8 * 32 * 32 + 4 * 32 * 10))  # bidirectional: T keys each
    assert cost.head_flops == pytest.approx(2 * 32 * 3 / 10)  # one classification per sequence


def test_dense_pairs():
    assert dense_pairs(4, causal=True) == 10 and dense_pairs(4, causal=False) == 16


@pytest.mark.parametrize(
    "router, extra, k",
    [("switch", {}, 1), ("hash", {}, 1), ("topk", {"top_k": 2}, 2), ("topk", {"top_k": 3}, 3), ("topp", {"max_k": 2}, 2),
     ("expert_choice", {"capacity_factor": 2.0}, 2), ("gshard", {}, 2), ("base", {}, 1)],
)
def test_moe_cost_by_hand(router, extra, k):
    # d=32, E=4 GELU experts of hidden 16, every layer: router 2*d*E plus k active experts 4*d*h
    ffn = {"kind": "moe", "router": {"kind": router, **extra}, "num_experts": 4, "hidden": 16}
    causal = router != "expert_choice"  # expert choice ranks the whole batch: an encoder
    head = {} if causal else {"head": "classification", "num_labels": 2}
    model = RoutedTransformer(tiny_config(ffn=ffn, **head))
    cost = model_cost(model, 16)
    d, h, E = 32, 16, 4
    assert cost.ffn_flops == pytest.approx(2 * (2 * d * E + k * 4 * d * h))
    expert_params = 2 * E * (2 * d * h + h + d)  # per layer: in/out weights and biases of E experts
    assert cost.total_params == model.num_parameters()
    assert cost.active_params == cost.total_params - expert_params * (E - k) // E


def test_moe_every_other_layer_mixes_dense_and_moe_cost():
    ffn = {"kind": "moe", "router": "switch", "num_experts": 4, "hidden": 16, "moe_every": 2}
    cost = model_cost(RoutedTransformer(tiny_config(ffn=ffn)), 16)
    d, h, E = 32, 16, 4
    assert cost.ffn_flops == pytest.approx(4 * d * h + (2 * d * E + 4 * d * h))


@pytest.mark.parametrize(
    "attention",
    [
        {"kind": "local", "window": 8, "block_size": 8},
        {"kind": "strided", "stride": 8, "window": 8, "block_size": 8},
        {"kind": "longformer", "window": 8, "block_size": 8},
        {"kind": "bigbird", "block_size": 8, "window_blocks": 3, "num_global_blocks": 1, "num_random_blocks": 1},
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_attention_costs_less_than_dense_at_long_sequences(attention, causal):
    if causal and attention["kind"] == "bigbird":
        attention = {**attention, "num_random_blocks": 0}
    common = dict(max_seq_len=512, causal=causal, head="lm" if causal else "classification", num_labels=None if causal else 2)
    dense = model_cost(RoutedTransformer(tiny_config(**common)), 512)
    sparse = model_cost(RoutedTransformer(tiny_config(attention=attention, **common)), 512)
    assert sparse.attention_flops < 0.5 * dense.attention_flops
    assert sparse.attention_density < 0.2
    assert sparse.ffn_flops == dense.ffn_flops


def test_local_attention_pairs_by_hand():
    # causal window w: token i sees min(i, w) + 1 keys; bidirectional: min(i, w) + min(T-1-i, w) + 1
    T, w = 40, 5
    for causal, per_token in [
        (True, [min(i, w) + 1 for i in range(T)]),
        (False, [min(i, w) + min(T - 1 - i, w) + 1 for i in range(T)]),
    ]:
        common = dict(max_seq_len=T, causal=causal, head="lm" if causal else "classification", num_labels=None if causal else 2)
        model = RoutedTransformer(tiny_config(attention={"kind": "local", "window": w}, **common))
        cost = model_cost(model, T)
        d = 32
        assert cost.attention_flops == pytest.approx(2 * (8 * d * d + 4 * d * sum(per_token) / T))
