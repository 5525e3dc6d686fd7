"""Checkpoint files: optimizer and RNG states round-trip exactly; pruning; incomplete folders."""

import json
import random

import numpy as np
import torch

from routelab.config import ModelConfig, TrainConfig
from routelab.model import RoutedTransformer
from routelab.train.checkpoint import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from routelab.train.optim import build_optimizer


def tiny_model(seed: int = 0) -> RoutedTransformer:
    torch.manual_seed(seed)
    return RoutedTransformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))


def trained_pair(steps: int = 3):
    model = tiny_model()
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0))
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 16))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_round_trip_model_optimizer_and_rng(tmp_path):
    model, opt = trained_pair()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 3, model, opt, {"bookkeeping": {"tokens_seen": 96}}, keep=2)
    expected = (torch.rand(4), random.random(), np.random.rand())  # the draws after the save point

    model2 = tiny_model(seed=1)
    opt2 = build_optimizer(model2, TrainConfig(lr=1e-2, warmup_steps=0))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["bookkeeping"]["tokens_seen"] == 96
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]

    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert model2.head.weight is model2.tok_emb.weight  # tying survives loading
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for idx in s1["state"]:
        for name, value in s1["state"][idx].items():
            assert torch.equal(value, s2["state"][idx][name]), (idx, name)
    # no pickles: the optimizer file is safetensors and the state is plain JSON
    assert json.loads((path / STATE_FILE).read_text())["format"] == 1
    assert (path / OPTIMIZER_FILE).read_bytes()[8:9] == b"{"  # safetensors: u64 header size, then JSON


def test_keep_newest_and_ignore_incomplete(tmp_path):
    model, opt = trained_pair(1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]

    root = tmp_path / CHECKPOINTS_DIR
    (root / "step_0000009").mkdir()  # killed mid-write: files but no state.json
    (root / "step_0000009" / "model.safetensors").write_bytes(b"garbage")
    (root / ".step_0000010.abc.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000003"

    save_checkpoint(tmp_path, 4, model, opt, {}, keep=2)  # pruning removes the leftovers too
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000004"]


def test_rewriting_an_existing_step_replaces_it(tmp_path):
    model, opt = trained_pair(1)
    save_checkpoint(tmp_path, 5, model, opt, {"bookkeeping": {"v": 1}}, keep=2)
    save_checkpoint(tmp_path, 5, model, opt, {"bookkeeping": {"v": 2}}, keep=2)
    ((step, path),) = list_checkpoints(tmp_path)
    assert step == 5 and json.loads((path / STATE_FILE).read_text())["bookkeeping"]["v"] == 2
