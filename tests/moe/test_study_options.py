"""Knobs of the MoE-quality study (compare-moe-quality): the routed scale, the router's init std,
and the router/expert gradient norms logged for MoE models (the router lr scale: tests/train/test_optim.py)."""

import math

import pytest
import torch

from routelab.config import ConfigError, ModelConfig
from routelab.model import RoutedTransformer
from routelab.moe import MoE
from routelab.train.metrics import moe_grad_norms

D, E, H = 16, 4, 24


def _moe(**kw):
    torch.manual_seed(0)
    return MoE(d_model=D, num_experts=E, hidden=H, router="switch", **kw)


def test_routed_scale_multiplies_the_output_but_not_the_losses():
    x = torch.randn(7, D)
    plain, scaled = _moe().eval(), _moe(routed_scale=8.0).eval()
    a, b = plain(x), scaled(x)
    torch.testing.assert_close(b.hidden, 8.0 * a.hidden, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)  # balance and z losses read the probabilities
    torch.testing.assert_close(scaled.gate_matrix(x), 8.0 * plain.gate_matrix(x))
    with pytest.raises(ConfigError, match="routed_scale"):
        _moe(routed_scale=0.0)


def _model(**ffn):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, max_seq_len=16,
                      ffn={"kind": "moe", "num_experts": E, **ffn})
    return RoutedTransformer(cfg)


def test_router_init_std_sets_the_routers_init_only():
    default, wide, zero = _model(), _model(router_init_std=0.5), _model(router_init_std=0.0)
    w = torch.cat([m.ffn.router.weight.flatten() for m in wide.layers])  # 2 x E x 64 = 512 draws
    assert w.std().item() == pytest.approx(0.5, rel=0.15)
    assert torch.cat([m.ffn.router.weight.flatten() for m in default.layers]).std().item() == pytest.approx(0.02, rel=0.15)
    assert all(bool((m.ffn.router.weight == 0).all()) for m in zero.layers)  # routing starts exactly uniform
    torch.testing.assert_close(wide.layers[0].ffn.experts.w_in, default.layers[0].ffn.experts.w_in)
    with pytest.raises(ConfigError, match="router_init_std"):
        _model(router_init_std=-1.0)


def test_moe_grad_norms_are_the_norms_of_router_and_expert_gradients():
    model = _model()
    assert moe_grad_norms(RoutedTransformer(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))) == {}
    ids = torch.randint(0, 40, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    norms = moe_grad_norms(model)
    router = math.sqrt(sum(float(m.ffn.router.weight.grad.pow(2).sum()) for m in model.layers))
    experts = math.sqrt(sum(float(p.grad.pow(2).sum()) for m in model.layers for p in m.ffn.experts.parameters()))
    assert norms["router_grad_norm"] == pytest.approx(router, rel=1e-5) and router > 0
    assert norms["expert_grad_norm"] == pytest.approx(experts, rel=1e-5) and experts > 0
