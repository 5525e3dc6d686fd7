"""AdamW groups: decay on matrices only, never on embeddings, norms or biases."""

import torch

from routelab.config import ModelConfig, TrainConfig
from routelab.model import RoutedTransformer
from routelab.train.optim import build_optimizer, param_groups


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
