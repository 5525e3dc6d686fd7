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
