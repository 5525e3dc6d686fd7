"""Task-conditioned learned attention routers (``model.attention.task_conditioned``): a zero-initialised
per-task vector added to the input of synthesizer's router MLP (moba, block_topp and kmeans route by
hard choices, which give such a vector no gradient: refused). Zero-init starts as the unconditioned
model; a non-zero vector moves the routes of its task only; cached decoding, training and the
refusals of bad configs."""

from __future__ import annotations

import pytest
import torch

from routelab import RoutedTransformer
from routelab.config import Config, ConfigError, apply_overrides
from routelab.io import load_state_dict
from routelab.train import train
from tests.conftest import tiny_config

TASKS = ["a", "b", "c"]
KINDS = {
    "synthesizer": dict(kind="synthesizer"),
    "synthesizer-factorized": dict(kind="synthesizer", variant="factorized", mix_dot=True),
}


def _model(attention, conditioned=True, task_names=TASKS, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(task_names=task_names, attention={**attention, "task_conditioned": conditioned})
    return RoutedTransformer(cfg)


def _set_vectors(model, scale=3.0):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            emb = layer.attn.task_embedding
            emb.copy_(scale * torch.randn(emb.shape, generator=g))


def _routes(attn, x, task_ids=None):
    """The synthesised attention weights the router chose for x (B, T, D)."""
    kw = {"task_ids": task_ids} if task_ids is not None else {}
    return attn(x, return_routes=True, **kw)[1].weights


@pytest.mark.parametrize("name", list(KINDS))
def test_zero_init_equals_the_unconditioned_model(name):
    plain = _model(KINDS[name], conditioned=False).eval()
    cond = _model(KINDS[name]).eval()
    missing = cond.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("attn.task_embedding") for k in missing)
    assert all(layer.attn.task_embedding.abs().sum() == 0 for layer in cond.layers)
    x = torch.randint(0, 61, (2, 23))
    tasks = torch.tensor([1, 2])
    ref = plain(x, task_ids=tasks).logits  # the unconditioned model ignores task ids in attention
    torch.testing.assert_close(plain(x).logits, ref, atol=0, rtol=0)  # tied task heads
    torch.testing.assert_close(cond(x, task_ids=tasks).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_task_vector_moves_only_its_tasks_routes(name):
    model = _model(KINDS[name]).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 24, 32)
    base = _routes(attn, x)  # zero vectors: the unconditioned routes
    with torch.no_grad():
        attn.task_embedding[1] = 4.0 * torch.randn(attn.task_embedding.shape[1:], generator=torch.Generator().manual_seed(2))
    tasks = torch.tensor([[0] * 24, [1] * 24])
    moved = _routes(attn, x, tasks)
    assert torch.equal(moved[0], base[0])  # task 0 (zero vector): unchanged
    assert (moved[1] - base[1]).abs().max() > 1e-5  # task 1's synthesised weights change (small init: small logits)
    assert torch.equal(_routes(attn, x), _routes(attn, x, torch.zeros(2, 24, dtype=torch.long)))  # None = task 0
    with pytest.raises(ValueError, match="task ids must lie in 0..2"):
        _routes(attn, x, torch.full((2, 24), 3))


@pytest.mark.parametrize("name", ["synthesizer", "synthesizer-factorized"])
def test_unconditioned_single_task_path_is_unchanged(name):
    """A single-task model: same outputs, no task_embedding parameter."""
    torch.manual_seed(0)
    model = RoutedTransformer(tiny_config(attention=KINDS[name])).eval()
    assert all(getattr(layer.attn, "task_embedding", None) is None for layer in model.layers)
    assert not any("task_embedding" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", ["synthesizer", "synthesizer-factorized"])
def test_cached_decoding_with_task_ids_equals_full_forward(name):
    model = _model(KINDS[name]).eval()
    _set_vectors(model)
    x = torch.randint(0, 61, (2, 30))
    tasks = torch.tensor([2, 1])
    full = model(x, task_ids=tasks).logits
    assert not torch.allclose(full, model(x, task_ids=torch.tensor([0, 0])).logits)  # the task matters
    cache = model.new_cache()
    steps = [model(x[:, :7], cache=cache, task_ids=tasks).logits]
    steps += [model(x[:, t : t + 1], cache=cache, task_ids=tasks).logits for t in range(7, 20)]
    steps += [model(x[:, 20:26], cache=cache, task_ids=tasks).logits]
    steps += [model(x[:, t : t + 1], cache=cache, task_ids=tasks).logits for t in range(26, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_vector_gets_a_gradient():
    model = _model(KINDS["synthesizer"]).train()
    _set_vectors(model, 0.5)
    x = torch.randint(0, 61, (2, 24))
    model(x, labels=x, task_ids=torch.tensor([0, 2])).loss.backward()
    grad = model.layers[0].attn.task_embedding.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0  # task 1 had no tokens


def test_training_a_tiny_multitask_model_moves_the_synthesizer_vectors(tmp_path):
    (tmp_path / "one.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    (tmp_path / "two.txt").write_text("pack my box with five dozen liquor jugs! " * 60)
    base = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
        "data": {"seq_len": 32, "val_fraction": 0.1, "tasks": [
            {"name": "one", "source": str(tmp_path / "one.txt"), "head": "lm"},
            {"name": "two", "source": str(tmp_path / "two.txt"), "head": "lm"},
        ]},
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                  "eval_batches": 1, "checkpoint_every": 0, "progress": False, "device": "cpu"},
    }
    over = ["model.attention.kind=synthesizer", "model.attention.task_conditioned=true"]
    cfg = Config.from_dict(apply_overrides(base, over))
    train(cfg, tmp_path / "run")
    state = load_state_dict(tmp_path / "run" / "model" / "model.safetensors")
    emb = state["layers.0.attn.task_embedding"]
    assert emb.shape == (2, 32) and emb.abs().sum() > 0  # zero-init: only a gradient moves it


@pytest.mark.parametrize(
    ("names", "attention", "match"),
    [
        (None, dict(kind="synthesizer"), r"needs a multi-task model \(model.task_names / data.tasks\)"),
        (TASKS, dict(kind="dense"), r"invalid for attention kind 'dense'.*allowed with: synthesizer$"),
        (TASKS, dict(kind="moba", block_size=4), r"invalid for attention kind 'moba'.*hard choices"),
        (TASKS, dict(kind="block_topp", block_size=4), r"invalid for attention kind 'block_topp'"),
        (TASKS, dict(kind="kmeans", num_clusters=3), r"invalid for attention kind 'kmeans'"),
        (TASKS, dict(kind="synthesizer", variant="random"), r"invalid for synthesizer variant 'random'"),
    ],
)
def test_bad_configs_give_one_line(names, attention, match):
    with pytest.raises(ConfigError, match=match) as e:
        RoutedTransformer(tiny_config(task_names=names, attention={**attention, "task_conditioned": True}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "attention",
    [dict(kind="kmeans", num_clusters=3, local_heads=1, window=3), dict(kind="local", window=5, block_size=4),
     dict(kind="synthesizer", variant="random"), dict(kind="moba", block_size=4, top_k=2)],
)
def test_unconditioned_kinds_ignore_task_ids(attention):
    """A multi-task model whose attention is not conditioned: task ids reach it and change nothing."""
    model = _model(attention, conditioned=False).eval()
    x = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(model(x, task_ids=torch.tensor([2, 1])).logits, model(x).logits, atol=0, rtol=0)
