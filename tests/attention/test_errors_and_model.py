"""Clear errors for bad options, the block's combine option, routes through the model block."""

import pytest
import torch

from routelab import Config, RoutedTransformer
from routelab.config import ConfigError
from routelab.model import Block
from tests.attention.helpers import HD, H, build, model_config
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "attention, pattern",
    [
        (dict(kind="local", window=0), r"model.attention.window=0 is invalid; allowed: a number > 0"),
        (dict(kind="local", block_size=-4), r"model.attention.block_size=-4 is invalid; allowed: a number > 0"),
        (dict(kind="longformer", window=-1), r"model.attention.window=-1 is invalid"),
        (dict(kind="bigbird", block_size=0), r"model.attention.block_size=0 is invalid"),
        (dict(kind="bigbird", window_blocks=2), r"model.attention.window_blocks=2 is invalid; allowed: an odd number"),
        (dict(kind="moba", block_size=0), r"model.attention.block_size=0 is invalid"),
        (dict(kind="block_topp", top_p=1.5), r"model.attention.top_p=1.5 is invalid; allowed: 0 < top_p <= 1"),
        (dict(kind="kmeans", num_clusters=0), r"model.attention.num_clusters=0 is invalid"),
        (dict(kind="local", windw=3), r"unknown key 'model.attention.windw'; did you mean 'window'"),
        (
            dict(kind="sliding"),
            r"unknown attention kind 'sliding'.*known kinds: bigbird, block_topp, dense, fixed, kmeans, local",
        ),
    ],
)
def test_bad_options_are_clear_config_errors(attention, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config.from_dict({"model": {"attention": attention}})


@pytest.mark.parametrize(
    "attention, pattern",
    [
        (dict(kind="moba", router_query="mean"), r"router_query='mean' is invalid for a causal model"),
        (dict(kind="block_topp", router_query="mean"), r"router_query='mean' is invalid for a causal model"),
        (dict(kind="kmeans", assignment="balanced"), r"assignment='balanced' is invalid for a causal model"),
    ],
)
def test_bidirectional_only_options_are_refused_in_causal_models(attention, pattern):
    build(attention, causal=False)  # fine for an encoder
    with pytest.raises(ConfigError, match=pattern):
        build(attention, causal=True)


def test_synthesizer_refuses_sequences_longer_than_its_positions():
    attn = build(dict(kind="synthesizer", max_seq_len=16), causal=True)
    attn(torch.randn(1, 16, H * HD))
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds the synthesizer's max_seq_len=16"):
        attn(torch.randn(1, 17, H * HD))


@pytest.mark.parametrize("kind", ["local", "bigbird", "synthesizer", "kmeans", "moba"])
def test_every_kind_trains_in_a_model_with_concat_combine(kind):
    extra = {"local": dict(window=4, block_size=4), "bigbird": dict(block_size=4), "moba": dict(block_size=4)}
    cfg = tiny_config(attention=dict(kind=kind, combine="concat", **extra.get(kind, {})))
    model = RoutedTransformer(cfg)
    x = torch.randint(0, 61, (2, 23))
    out = model(x, labels=x)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].combine.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["local", "strided", "kmeans", "moba"])
def test_attention_dropout_uses_the_autograd_paths(kind):
    """Dropout on attention probabilities (one part: SDPA; merged parts: explicit math)."""
    extra = {"local": dict(window=4, block_size=4), "strided": dict(stride=4, block_size=4), "moba": dict(block_size=4)}
    model = RoutedTransformer(tiny_config(attention=dict(kind=kind, dropout=0.1, **extra.get(kind, {}))))
    x = torch.randint(0, 61, (2, 23))
    model(x, labels=x).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)  # no dropout in eval


def test_concat_combine_is_a_linear_map_of_x_and_a():
    block = Block(model_config(dict(kind="local", window=3, combine="concat"), causal=True), 0).eval()
    x = torch.randn(1, 6, H * HD)
    a = block.attn(block.attn_norm(x))
    expected = x + a + block.combine.proj(torch.cat([x, a], -1))
    y, _ = block(x)
    torch.testing.assert_close(y - block.ffn(block.ffn_norm(expected)).hidden, expected, atol=1e-6, rtol=0)


def test_block_returns_routes_when_asked():
    block = Block(model_config(dict(kind="moba", block_size=4), causal=True), 0)
    y, ffn_out, routes = block(torch.randn(2, 17, H * HD), return_routes=True)
    assert routes.blocks.shape[:3] == (2, H, 5) and "mean_blocks" in routes.stats
    assert len(block(torch.randn(2, 17, H * HD))) == 2  # the default contract is unchanged


@pytest.mark.parametrize(
    "attention",
    [
        dict(kind="bigbird", block_size=4),
        dict(kind="kmeans", num_clusters=3, local_heads=1),
        dict(kind="moba", block_size=4, top_k=2),
        dict(kind="synthesizer"),
    ],
    ids=lambda a: a["kind"],
)
def test_report_hooks_weights_follow_the_routes_and_pairs_count_per_head(attention):
    """``attention_weights`` (inspection) and ``attended_pairs`` (FLOP reports) of routelab.report."""
    attn = build(attention, causal=True).eval()
    if hasattr(attn, "attention_weights"):  # learned kinds; fixed patterns are inspected via mask()
        w = attn.attention_weights(torch.randn(1, 24, H * HD))  # (1, H, T, T)
        assert w.shape == (1, H, 24, 24) and not torch.triu(w, 1).any()
        torch.testing.assert_close(w.sum(-1), torch.ones(1, H, 24))
    pairs = attn.attended_pairs(24)
    assert 24 <= pairs <= 24 * 25 / 2
    if attention["kind"] == "bigbird":  # per head, from its own mask
        assert pairs == float(attn.mask(24).sum()) / H
    if attention["kind"] == "moba":  # 6 blocks of 4: own (causal) + min(2, past) chosen blocks
        assert pairs == 6 * 10 + (0 + 1 + 2 + 2 + 2 + 2) * 16
    if attention["kind"] == "kmeans":  # local head (window >= T: 300 causal pairs), 2 heads of groups of ceil(64/3)
        assert pairs == (300 + 2 * 24 * 23 / 2) / 3
