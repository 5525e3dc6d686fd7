"""Routing losses as pure functions: hand examples and the uniform-routing minimum."""

import math

import torch

from routelab.moe import losses


def test_load_balancing_loss_hand_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    idx = torch.tensor([[0], [1], [0], [2]])
    # f = (2/4, 1/4, 1/4); P = column means = (0.375, 0.3125, 0.3125)
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.3125 + 0.25 * 0.3125)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx)), expected, rel_tol=1e-6)
    assert math.isclose(expected, 1.03125)


def test_load_balancing_loss_top2_counts_every_choice_and_respects_selected():
    probs = torch.full((2, 4), 0.25)
    idx = torch.tensor([[0, 1], [0, 2]])  # expert 0 twice, 1 and 2 once: f = (1/2, 1/4, 1/4, 0)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx)), 4 * 0.25, rel_tol=1e-6)
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.1, 0.3, 0.2]])
    sel = torch.tensor([[True, False], [True, True]])  # f over the 3 selected choices: (2/3, 0, 1/3, 0)
    expected = 4 * (2 / 3 * 0.4 + 1 / 3 * 0.25)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx, sel)), expected, rel_tol=1e-6)


def test_load_balancing_loss_is_one_for_uniform_and_e_for_collapse():
    E, T = 4, 8
    uniform = losses.load_balancing_loss(torch.full((T, E), 1 / E), torch.arange(T).remainder(E).unsqueeze(1))
    assert math.isclose(float(uniform), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    assert math.isclose(
        float(losses.load_balancing_loss(collapsed, torch.zeros(T, 1, dtype=torch.long))), E, rel_tol=1e-6
    )


def test_load_balancing_loss_minimum_is_uniform_when_probabilities_follow_dispatch():
    # with P = f the loss is E * sum f_i^2 >= 1, equality only at f uniform (Cauchy-Schwarz)
    g = torch.Generator().manual_seed(0)
    E, T = 4, 240
    for _ in range(20):
        f = torch.rand(E, generator=g) + 0.05
        counts = torch.round(f / f.sum() * T).long()
        counts[-1] = T - counts[:-1].sum()
        idx = torch.repeat_interleave(torch.arange(E), counts).unsqueeze(1)
        probs = torch.zeros(T, E).scatter(1, idx, 1.0)
        loss = float(losses.load_balancing_loss(probs, idx))
        assert loss >= 1.0 - 1e-6
        if counts.max() - counts.min() > 1:
            assert loss > 1.0 + 1e-3


def test_load_balancing_loss_gradient_flows_to_probs_only():
    logits = torch.randn(5, 3, requires_grad=True)
    probs = logits.softmax(-1)
    losses.load_balancing_loss(probs, probs.argmax(-1, keepdim=True)).backward()
    assert logits.grad.abs().sum() > 0


def test_router_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = log 2, log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert math.isclose(float(losses.router_z_loss(logits)), expected, rel_tol=1e-6)


def test_router_entropy():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert math.isclose(float(losses.router_entropy(probs)), math.log(2) / 2, rel_tol=1e-6)


def test_router_entropy_weighted_mean_skips_zero_weight_rows():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    w = torch.tensor([1.0, 1.0, 0.0])  # the last row is padding
    assert math.isclose(float(losses.router_entropy(probs, w)), math.log(2) / 2, rel_tol=1e-6)
    assert float(losses.router_entropy(probs, torch.zeros(3))) == 0.0  # no real token: 0, not nan
