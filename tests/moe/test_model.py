"""``ffn.kind: moe`` inside RoutedTransformer: losses, statistics, moe_every, hash ids,
causality, caching, save/load, presets and config errors."""

import dataclasses

import pytest
import torch

from routelab import Config, ConfigError, RoutedTransformer
from routelab.ffn import DenseFFN
from routelab.moe import MoEFFN, MoEFFNConfig
from routelab.presets import CONFIGS_DIR
from tests.conftest import tiny_config

CONFIGS = CONFIGS_DIR


def _model(**ffn):
    return RoutedTransformer(tiny_config(ffn={"kind": "moe", "num_experts": 4, **ffn}))


def test_model_loss_includes_the_layers_aux_losses_and_reports_routing():
    model = _model(router="topk", balance_loss_weight=0.1).train()
    x = torch.randint(0, 61, (2, 9))
    out = model(x, labels=x)
    assert set(out.routing) == {"layers.0.ffn", "layers.1.ffn"}
    assert out.aux_loss.item() > 0.1 * 0.9 * 2  # two layers, each balance loss >= ~1 times 0.1
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)
    layer0 = out.routing["layers.0.ffn"]
    assert layer0["tokens_per_expert"].sum() == 2 * 9 * 2
    out.loss.backward()
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_moe_every_k_th_layer_and_dense_elsewhere():
    model = RoutedTransformer(tiny_config(n_layers=4, ffn={"kind": "moe", "moe_every": 2, "hidden": 24}))
    kinds = [type(layer.ffn) for layer in model.layers]
    assert kinds == [DenseFFN, MoEFFN, DenseFFN, MoEFFN]
    assert model.layers[0].ffn.w_in.out_features == 24 and model.layers[1].ffn.experts.w_in.shape == (8, 32, 24)
    out = model(torch.randint(0, 61, (1, 5)))
    assert set(out.routing) == {"layers.1.ffn", "layers.3.ffn"}


def test_expert_init_follows_model_init_std():
    model = _model()
    w_in = model.layers[0].ffn.experts.w_in
    assert abs(w_in.std().item() - 0.02) < 0.003
    assert model.layers[0].ffn.experts.w_out.std().item() < 0.02 / 1.5  # GPT-2 scaled residual init
    assert model.layers[0].ffn.router.weight.std().item() == pytest.approx(0.02, abs=0.005)


def test_hash_model_routes_by_input_ids():
    model = _model(router="hash").eval()
    x = torch.randint(0, 61, (2, 7))
    out = model(x)
    table = model.layers[0].ffn.router.table
    assert torch.equal(
        out.routing["layers.0.ffn"]["tokens_per_expert"], torch.bincount(table[x.reshape(-1)], minlength=4).float()
    )
    assert float(out.aux_loss) == 0.0


@pytest.mark.parametrize(
    "ffn",
    [{"router": "switch", "capacity_factor": 1.0}, {"router": "topk", "capacity_factor": 0.75}, {"router": "hash"}],
)
def test_causal_lm_with_moe_never_sees_the_future(ffn):
    model = _model(**ffn).eval()
    x = torch.randint(0, 61, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 61, (2, 6))
    torch.testing.assert_close(model(x).logits[:, :10], model(y).logits[:, :10], atol=1e-6, rtol=0)


def test_cached_generation_equals_full_forward_for_dropless_moe():
    model = _model(router="topk").eval()
    x = torch.randint(0, 61, (2, 12))
    full = model(x).logits
    cache = model.new_cache()
    steps = [model(x[:, :5], cache=cache).logits] + [model(x[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_save_and_load_keep_routing_state(tmp_path):
    model = _model(router="switch", bias_balancing=True).train()
    model(torch.randint(0, 61, (2, 8)))  # moves the selection bias
    model.eval()
    x = torch.randint(0, 61, (1, 8))
    model.save_pretrained(tmp_path)
    loaded = RoutedTransformer.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.layers[0].ffn.selection_bias, model.layers[0].ffn.selection_bias)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_whole_batch_routers_refused_in_lm_allowed_in_encoder():
    for router in ("expert_choice", "soft"):
        with pytest.raises(ConfigError, match="refused in a causal model"):
            _model(router=router)
        enc = RoutedTransformer(tiny_config(head="classification", num_labels=3, ffn={"kind": "moe", "router": router}))
        enc(torch.randint(0, 61, (2, 6)), attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.ffn.router.top_k=9 is invalid; allowed: 1 <= top_k <= num_experts=8"):
        RoutedTransformer(tiny_config(ffn={"kind": "moe", "router": {"kind": "topk", "top_k": 9}}))
    with pytest.raises(ConfigError, match=r"unknown key 'model.ffn.router.top_k'"):
        tiny_config(ffn={"kind": "moe", "router": {"kind": "switch", "top_k": 2}})
    with pytest.raises(ConfigError, match=r"model.ffn.router.kind: unknown router kind 'hsah' \(did you mean 'hash'\?\)"):
        tiny_config(ffn={"kind": "moe", "router": "hsah"})
    with pytest.raises(ConfigError, match="unknown key 'model.ffn.num_expert'; did you mean 'num_experts'"):
        tiny_config(ffn={"kind": "moe", "num_expert": 4})
    with pytest.raises(ConfigError, match="model.ffn.capacity_factor=0"):
        tiny_config(ffn={"kind": "moe", "capacity_factor": 0})
    with pytest.raises(ConfigError, match="model.ffn.bias_balancing"):
        tiny_config(ffn={"kind": "moe", "router": "hash", "bias_balancing": True})


@pytest.mark.parametrize("name", ["lm-moe-switch-tiny", "lm-moe-hash-tiny", "lm-moe-topk-tiny"])
def test_presets_load_and_match_dense_active_flops(name):
    dense = Config.load(CONFIGS / "lm-tiny.yaml").model
    cfg = Config.load(CONFIGS / f"{name}.yaml").model
    assert isinstance(cfg.ffn, MoEFFNConfig)
    k = RoutedTransformer(dataclasses.replace(cfg, vocab_size=256)).layers[0].ffn.router.experts_per_token(256)
    assert k * cfg.ffn_hidden == dense.ffn_hidden  # same active FFN FLOPs per token
    assert cfg.ffn.activation == dense.ffn.activation and cfg.d_model == dense.d_model
