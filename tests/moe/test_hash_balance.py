"""Frequency-balanced hash tables (Roller et al. 2021, "Balanced assignment"): the greedy table by
hand, its load bound as a property, and ``ffn.router.table: balanced`` in training and resume."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab import RoutedTransformer
from routelab.config import Config, ConfigError
from routelab.moe.routers.hash import balanced_hash_table
from routelab.train import load_run, train
from routelab.train.run import load_task_data
from routelab.train.trainer import token_counts


def test_balanced_table_by_hand():
    # most frequent first, each to the least-loaded expert; unseen ids to the experts owning fewest
    counts = torch.tensor([100, 50, 50, 30, 20, 0, 0, 1])
    # loads after t0,t1,t2: e0 100, e1 50, e2 50; t3 -> e1 (80); t4 -> e2 (70); t7 -> e2 (71);
    # ids owned then e0 1, e1 2, e2 3: t5 -> e0, t6 -> e0
    assert balanced_hash_table(counts, 3).tolist() == [0, 1, 2, 1, 2, 0, 0, 2]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=80),
    num_experts=st.integers(1, 9),
)
def test_balanced_table_load_bound(counts, num_experts):
    c = torch.tensor(counts)
    table = balanced_hash_table(c, num_experts)
    assert table.shape == c.shape and 0 <= int(table.min()) and int(table.max()) < num_experts
    load = torch.zeros(num_experts, dtype=torch.long).scatter_add_(0, table, c)
    # greedy list scheduling: no expert exceeds the mean load by more than the largest count
    assert load.max().item() <= c.sum().item() / num_experts + c.max().item()


def _config(tmp_path, **router):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("    return self.value  # eeee\n" * 50)
    return Config.from_dict(
        {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                      "ffn": {"kind": "moe", "router": {"kind": "hash", **router}, "num_experts": 4, "hidden": 16}},
            "data": {"source": str(corpus), "seq_len": 32, "val_fraction": 0.2},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 2,
                      "progress": False},
        }
    )  # fmt: skip


def test_training_builds_the_balanced_table_and_resume_keeps_it(tmp_path):
    cfg = _config(tmp_path, table="balanced")
    train(cfg, tmp_path / "run", stop_after=2)
    run = load_run(tmp_path / "run", with_data=False)
    data = load_task_data(run.cfg, tmp_path / "run")
    expected = balanced_hash_table(token_counts(data, run.cfg.model.vocab_size), 4)
    for layer in run.model.layers:
        assert torch.equal(layer.ffn.router.table, expected)
    # on this text the default seeded random table puts more load on its busiest expert
    counts = token_counts(data, run.cfg.model.vocab_size)
    random_router = dataclasses.replace(run.cfg.model.ffn.router, table="random")
    random_ffn = dataclasses.replace(run.cfg.model.ffn, router=random_router)
    random_table = RoutedTransformer(dataclasses.replace(run.cfg.model, ffn=random_ffn)).layers[0].ffn.router.table
    load = lambda t: torch.zeros(4, dtype=torch.long).scatter_add_(0, t, counts)  # noqa: E731
    assert load(expected).max() < load(random_table).max()
    train(cfg, tmp_path / "run", resume=True)  # resumed from the checkpoint: same routing
    assert torch.equal(load_run(tmp_path / "run", with_data=False).model.layers[0].ffn.router.table, expected)


def test_balanced_table_needs_the_hash_router(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model.ffn.router.table'"):
        _config(tmp_path, kind="switch", table="balanced")
    with pytest.raises(ConfigError, match=r"model.ffn.router.table='sorted' is invalid.*'random', 'balanced'"):
        _config(tmp_path, table="sorted")


def test_configs_written_before_router_sections_still_load(tmp_path):
    """A run folder's config.yaml from before routers had their own section: the keys that applied
    to its router move into model.ffn.router; the others held their old defaults and had no effect."""
    old = {"kind": "moe", "router": "topk", "top_k": 3, "renormalize": None, "top_p": 0.4, "max_k": None,
           "random_eval": "mean", "slots_per_expert": 1, "seed": 0, "hash_table": "random", "num_experts": 4}
    cfg = Config.from_dict({"model": {"vocab_size": 11, "ffn": old}})
    assert cfg.model.ffn.router.kind == "topk" and cfg.model.ffn.router.top_k == 3 and cfg.model.ffn.router.renormalize
    hashed = Config.from_dict({"model": {"ffn": {**old, "router": "hash", "top_k": None, "hash_table": "balanced"}}})
    assert hashed.model.ffn.router.table == "balanced"
    with pytest.raises(ConfigError, match=r"model.ffn.top_p=0.9 does not apply to router 'switch'.*model.ffn.router"):
        Config.from_dict({"model": {"ffn": {"kind": "moe", "top_p": 0.9}}})
