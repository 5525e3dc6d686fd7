"""AdamW groups: decay on matrices only, never on embeddings, norms or biases; the routers' own lr scale."""

import pytest
import torch

from routelab.config import ConfigError, ModelConfig, TrainConfig
from routelab.model import RoutedTransformer
from routelab.train.optim import build_optimizer, param_groups
from routelab.train.schedule import lr_at


def names_in(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_decay_groups():
    model = RoutedTransformer(
        ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, positions="learned")
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = names_in(model, decay["params"])
    not_decayed = names_in(model, no_decay["params"])
    assert "tok_emb.weight" in not_decayed and "pos_emb.weight" in not_decayed
    assert all("norm" not in n for n in decayed)
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert any(n.endswith("bias") for n in not_decayed)
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))  # each once (tied head)


def test_frozen_embeddings_left_out_and_betas():
    model = RoutedTransformer(
        ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, freeze_embeddings=True)
    )
    opt = build_optimizer(model, TrainConfig(beta1=0.8, beta2=0.9))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not model.tok_emb.weight for p in params)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert all(p.requires_grad for p in params) and isinstance(opt, torch.optim.AdamW)


def test_router_lr_scale_gives_the_routers_their_own_group_and_step_size(lm_cfg):
    from routelab.data import load_lm_data
    from routelab.train.trainer import train_step

    torch.manual_seed(0)
    model = RoutedTransformer(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, ffn={"kind": "moe", "num_experts": 4}))
    assert len(param_groups(model, 0.1)) == 2  # scale 1: the groups (and old checkpoints) as before
    groups = param_groups(model, 0.1, router_lr_scale=10.0)
    routers = {id(m.ffn.router.weight) for m in model.layers}
    assert {id(p) for p in groups[2]["params"]} == routers and groups[2]["lr_scale"] == 10.0
    assert all(id(p) not in routers for g in groups[:2] for p in g["params"])
    cfg = lm_cfg("model.ffn.kind=moe", "model.ffn.num_experts=4", "train.router_lr_scale=10", "train.warmup_steps=0")
    data = load_lm_data(cfg.data, None)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    model = RoutedTransformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    train_step(model, opt, cfg, data, 1, {}, torch.device("cpu"))
    lr = lr_at(1, cfg.train)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, lr, 10 * lr])
    with pytest.raises(ConfigError, match="router_lr_scale"):
        TrainConfig(router_lr_scale=0.0)
