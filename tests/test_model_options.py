"""The options added for imported models work from scratch too: post-norm, grouped-query attention,
token types, attention biases; each trains a step and survives save/load; defaults keep old names."""

from __future__ import annotations

import pytest
import torch

from routelab import ModelConfig, RoutedTransformer
from routelab.errors import ConfigError
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "options",
    [
        dict(norm_position="post", embed_norm=True, positions="learned", type_vocab_size=2, head="classification", num_labels=3),
        dict(n_kv_heads=2, attn_bias="none", norm="rmsnorm"),
        dict(n_kv_heads=1, attn_bias="qkv", attention={"kind": "local", "window": 4}),
        dict(n_kv_heads=2, attention={"kind": "kmeans", "num_clusters": 2, "window": 4}),
        dict(n_kv_heads=2, attention={"kind": "block_topp", "block_size": 4}),
    ],
)
def test_new_options_train_a_step_and_save_load(tmp_path, options):
    model = RoutedTransformer(tiny_config(**options))
    x = torch.randint(0, 61, (2, 12))
    labels = torch.randint(0, 3, (2,)) if model.cfg.head == "classification" else x
    kwargs = {"token_type_ids": (torch.arange(12) >= 6).long().expand(2, -1)} if model.cfg.type_vocab_size else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model(x, labels=labels, **kwargs).loss
    before.backward()
    opt.step()
    assert all(p.grad is not None for n, p in model.named_parameters() if "centroids" not in n)
    model.save_pretrained(tmp_path)
    back = RoutedTransformer.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x, **kwargs).logits, model(x, **kwargs).logits)


def test_defaults_keep_the_state_dict_names_and_shapes():
    sd = RoutedTransformer(tiny_config()).state_dict()
    assert "norm.weight" in sd and "layers.0.attn.o_proj.bias" in sd
    assert sd["layers.0.attn.k_proj.weight"].shape == (32, 32)
    assert not any(k.startswith(("type_emb", "embed_norm")) for k in sd)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    """n_kv_heads=2 of 4: the same as n_heads=4 whose k/v heads are the grouped ones repeated."""
    gqa = RoutedTransformer(tiny_config(n_kv_heads=2)).eval()
    mha = RoutedTransformer(tiny_config()).eval()
    state = dict(gqa.state_dict())
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            for kind, shape in (("weight", (2, 8, 32)), ("bias", (2, 8))):
                key = f"layers.{i}.attn.{name}.{kind}"
                state[key] = state[key].reshape(shape).repeat_interleave(2, dim=0).reshape(-1, *shape[2:])
    mha.load_state_dict(state)
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        assert torch.allclose(gqa(x).logits, mha(x).logits, atol=1e-6)


def test_post_norm_has_no_final_norm_and_normalises_each_block():
    model = RoutedTransformer(tiny_config(norm_position="post", positions="learned")).eval()
    assert model.norm is None
    out = model(torch.randint(0, 61, (1, 9)))
    h = out.hidden
    assert torch.allclose(h.mean(-1), torch.zeros(1, 9), atol=1e-5)  # LayerNorm output (weight 1, bias 0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_kv_heads=3), "model.n_kv_heads=3 is invalid; allowed: null .* divisor of model.n_heads=4"),
        (dict(type_vocab_size=-1), "model.type_vocab_size=-1"),
        (dict(norm_position="middle"), "norm_position='middle' is invalid"),
        (dict(attn_bias="o"), "attn_bias='o' is invalid"),
    ],
)
def test_bad_values_are_named(bad, match):
    from routelab.config import model_config_from_dict

    with pytest.raises(ConfigError, match=match):
        model_config_from_dict(dict(vocab_size=61, d_model=32, n_heads=4, **bad))


def test_synthesizer_refuses_gqa():
    with pytest.raises(ConfigError, match="model.n_kv_heads=2 is invalid.*synthesizer"):
        RoutedTransformer(ModelConfig(vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, attention={"kind": "synthesizer"}))


def test_token_types_without_a_table_are_refused():
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        RoutedTransformer(tiny_config())(torch.zeros(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3, dtype=torch.long))
