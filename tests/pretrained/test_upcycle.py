"""Upcycling: dense FFN -> MoE experts, dense -> sparse attention, longer learned positions.

The function at step 0 is pinned where the papers' recipes promise it (gates summing to 1: the
upcycled model *is* the dense one) and where they do not (switch: the gate scales the dense output).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from routelab.config import ModelConfig
from routelab.errors import ConfigError
from routelab.model import RoutedTransformer
from routelab.moe.layer import MoE
from routelab.pretrained import upcycle, upcycle_into, upcycle_with_conversion
from routelab.registry import ATTENTION, ROUTERS

V, T = 64, 16


def dense_model(**kw) -> RoutedTransformer:
    """A tiny trained-looking dense model: SwiGLU FFN with biases, random (not zero) biases and norms."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=T, ffn={"kind": "dense", "activation": "swiglu"}, **kw)
    torch.manual_seed(0)
    model = RoutedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # a trained model's biases and norm gains are not 0 / 1
    return model.eval()


def moe_cfg(dense: RoutedTransformer, router, **ffn) -> ModelConfig:
    return dataclasses.replace(dense.cfg, ffn={"kind": "moe", "activation": "swiglu", "num_experts": 4, "router": router, **ffn})


def ids(batch: int = 2, n: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "router, ffn",
    [
        ({"kind": "topk", "top_k": 1}, {}),
        ({"kind": "topk", "top_k": 2}, {}),
        ({"kind": "topk", "top_k": 2}, {"num_shared_experts": 2}),  # shared copies share the output
        ({"kind": "topk", "top_k": 2}, {"moe_every": 2}),  # layer 0 stays dense (copied), layer 1 MoE
        ("hash", {}),
        ({"kind": "topp", "renormalize": True}, {}),
        ("gshard", {}),  # eval: both experts, renormalised
    ],
)
def test_upcycled_moe_equals_the_dense_model_at_step_0(router, ffn):
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(dense, router, **ffn))
    x = ids()
    assert any(isinstance(m, MoE) for m in moe.modules())
    torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=1e-5, rtol=0)


def test_noise_breaks_the_copies_and_is_seeded():
    dense = dense_model()
    cfg = moe_cfg(dense, {"kind": "topk", "top_k": 2})
    a, b = upcycle(dense, cfg, noise=0.01, seed=3), upcycle(dense, cfg, noise=0.01, seed=3)
    x = ids()
    assert (a(x).logits - dense(x).logits).abs().max() > 1e-3
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=0, rtol=0)
    w = a.layers[0].ffn.experts.w_in
    assert not torch.equal(w[0], w[1])  # each expert its own noise
    torch.testing.assert_close(a.layers[0].ffn.experts.b_in[0], dense.layers[0].ffn.w_in.bias, atol=0, rtol=0)  # biases exact


def test_experts_are_copies_of_the_dense_ffn_and_routers_are_fresh():
    dense = dense_model()
    moe, done = upcycle_with_conversion(dense, moe_cfg(dense, "switch"))
    experts, ffn = moe.layers[1].ffn.experts, dense.layers[1].ffn
    for e in range(4):
        torch.testing.assert_close(experts.w_in[e], ffn.w_in.weight.t(), atol=0, rtol=0)
        torch.testing.assert_close(experts.w_gate[e], ffn.w_gate.weight.t(), atol=0, rtol=0)
        torch.testing.assert_close(experts.w_out[e], ffn.w_out.weight.t(), atol=0, rtol=0)
        torch.testing.assert_close(experts.b_out[e], ffn.w_out.bias, atol=0, rtol=0)
    assert done.moe_layers == 2 and not done.dropped
    assert sorted(done.fresh) == ["layers.0.ffn.router.weight", "layers.1.ffn.router.weight"]
    assert "model.ffn.kind ('dense' -> 'moe')" in done.describe()


@pytest.mark.parametrize("router", [{"kind": "switch"}, {"kind": "topk", "top_k": 2, "renormalize": False}])
def test_without_renormalised_gates_the_gate_sum_scales_the_dense_ffn(router):
    """Switch (and top-k with raw probabilities) at step 0: y = (sum of the token's gates) * FFN(x)."""
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(dense, router))
    layer, ffn = moe.layers[0].ffn, dense.layers[0].ffn
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(2))
    gate_sum = layer.gate_matrix(x).sum(-1, keepdim=True)  # (2, T, 1)
    assert (gate_sum < 0.99).all()  # a fresh router: gates well below 1
    torch.testing.assert_close(layer(x).hidden, gate_sum * ffn(x).hidden, atol=1e-5, rtol=1e-5)


def encoder(**kw) -> RoutedTransformer:
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=T, head="classification", num_labels=3, **kw)
    torch.manual_seed(0)
    return RoutedTransformer(cfg)


@pytest.mark.parametrize("router", ROUTERS.names())
def test_every_router_trains_after_upcycling(router):
    by_task = {"task_names": ["only"]} if ROUTERS.get(router).module_class.needs_task_ids else {}  # the task router: one task
    dense = encoder(**by_task)  # an encoder, so whole-batch routers (expert choice, soft) are allowed
    moe = upcycle(dense, dataclasses.replace(dense.cfg, ffn={"kind": "moe", "num_experts": 4, "router": router}))
    moe.train()
    x, y = ids(), torch.tensor([0, 2])
    out = moe(x, labels=y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in moe.named_parameters() if ".experts." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "attention",
    [
        {"kind": "local", "window": T},  # the window covers the sequence
        {"kind": "longformer", "window": T, "global_tokens": [0]},
        {"kind": "bigbird", "block_size": 8, "window_blocks": 3, "num_random_blocks": 1},  # 2 blocks, all near
        {"kind": "moba", "block_size": 8, "top_k": 2},  # every block chosen
    ],
)
def test_sparse_attention_equals_dense_where_its_pattern_covers_the_sequence(attention):
    dense = dense_model()
    sparse, done = upcycle_with_conversion(dense, dataclasses.replace(dense.cfg, attention=attention))
    assert not done.dropped and not done.fresh  # q/k/v/o kept; these kinds add no parameters
    x = ids()
    torch.testing.assert_close(sparse(x).logits, dense(x).logits, atol=1e-5, rtol=0)


def test_a_narrow_window_changes_the_function():
    dense = dense_model()
    local = upcycle(dense, dataclasses.replace(dense.cfg, attention={"kind": "local", "window": 2}))
    x = ids()
    assert (local(x).logits - dense(x).logits).abs().max() > 1e-4


def test_learned_positions_are_tiled_to_a_longer_max_seq_len():
    dense = dense_model(positions="learned")
    long, done = upcycle_with_conversion(dense, dataclasses.replace(dense.cfg, max_seq_len=40, attention={"kind": "local", "window": T}))
    old, new = dense.pos_emb.weight, long.pos_emb.weight
    assert new.shape == (40, 32) and done.extended == ["16 -> 40"]
    torch.testing.assert_close(new[:T], old, atol=0, rtol=0)  # positions < old max keep their vectors
    torch.testing.assert_close(new[T : 2 * T], old, atol=0, rtol=0)  # then the table again (Longformer)
    torch.testing.assert_close(new[2 * T :], old[: 40 - 2 * T], atol=0, rtol=0)
    x = ids()
    torch.testing.assert_close(long(x).logits, dense(x).logits, atol=1e-5, rtol=0)
    assert long(ids(1, 40)).logits.shape == (1, 40, V)  # and the longer sequence runs


def test_rope_models_extend_freely():
    dense = dense_model()
    long, done = upcycle_with_conversion(dense, dataclasses.replace(dense.cfg, max_seq_len=64))
    assert not (done.fresh or done.extended or done.dropped)  # nothing in the state dict depends on the length
    assert not done.plain_load and done.changes == ["model.max_seq_len (16 -> 64)"]
    torch.testing.assert_close(long(ids()).logits, dense(ids()).logits, atol=0, rtol=0)


def test_moe_to_the_same_moe_is_a_plain_load():
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(dense, "topk"), seed=5)
    again, done = upcycle_with_conversion(moe, moe.cfg, seed=6)
    assert done.plain_load
    for (n, a), (_, b) in zip(moe.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(d_model=64), r"model\.d_model is 32 in the source but 64 in the target"),
        (dict(n_layers=3), r"model\.n_layers is 2 in the source but 3"),
        (dict(vocab_size=65), r"model\.vocab_size is 64 in the source but 65"),
        (dict(norm="rmsnorm"), r"model\.norm is 'layernorm'"),
        (dict(ffn={"kind": "moe", "activation": "swiglu", "hidden": 48}), r"FFN width is 88 in the source but 48.*model\.ffn\.hidden=88"),
        (dict(ffn={"kind": "moe", "activation": "gelu"}), r"model\.ffn\.activation is 'swiglu' in the source but 'gelu'"),
        (dict(attention={"kind": "dense", "combine": "concat"}), r"model\.attention\.combine"),
    ],
)
def test_what_cannot_map_is_refused_in_one_line(change, message):
    dense = dense_model()
    with pytest.raises(ConfigError, match=message) as e:
        upcycle(dense, dataclasses.replace(dense.cfg, **change))
    assert "\n" not in str(e.value) and "what may change" in str(e.value)


def test_an_moe_cannot_become_dense_again():
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(dense, "topk"))
    with pytest.raises(ConfigError, match=r"'moe' -> 'dense'"):
        upcycle(moe, dense.cfg)
    every_other = dataclasses.replace(moe.cfg, ffn={**dataclasses.asdict(moe.cfg.ffn), "moe_every": 2})
    with pytest.raises(ConfigError, match=r"layer 0's FFN is an MoE in the source but dense"):
        upcycle(moe, every_other)
    more = dataclasses.replace(moe.cfg, ffn={**dataclasses.asdict(moe.cfg.ffn), "num_experts": 8})
    with pytest.raises(ConfigError, match=r"layers\.0\.ffn\.\S+ is \(4, 32.*\) in the source but \(8, 32.*\) in the target"):
        upcycle(moe, more)


@pytest.mark.parametrize("kind", ATTENTION.names())
def test_every_attention_kind_keeps_the_projections_it_has_and_trains(kind):
    dense = dense_model()
    model, done = upcycle_with_conversion(dense, dataclasses.replace(dense.cfg, attention={"kind": kind}))
    assert not [n for n in done.fresh if re.search(r"\.(q|k|v|o)_proj\.", n)]  # no projection starts afresh
    assert set(done.dropped) <= {n for n in dense.state_dict() if ".attn." in n}  # kinds without k (kmeans) or q/k (synthesizer)
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()


def test_noise_comes_from_the_given_generator():
    """``upcycle_into`` draws its noise from the generator it is given (the trainer seeds it by train.seed)."""
    dense = dense_model()
    cfg = moe_cfg(dense, "topk")
    a, b = RoutedTransformer(cfg), RoutedTransformer(cfg)
    upcycle_into(a, dense.cfg, dense.state_dict(), 0.01, torch.Generator().manual_seed(1))
    upcycle_into(b, dense.cfg, dense.state_dict(), 0.01, torch.Generator().manual_seed(2))
    assert not torch.equal(a.layers[0].ffn.experts.w_in, b.layers[0].ffn.experts.w_in)
    with pytest.raises(ConfigError, match="noise=-1"):
        upcycle_into(a, dense.cfg, dense.state_dict(), -1)
