"""Multi-task runs (data.tasks): per-task heads and gradients, task sampling, exact resume, per-task
evaluation, and the refusals of bad task lists. Tiny: an LM task on a text file and a classification
task on a JSONL file, both byte-level (d_model 32, 2 layers, seq_len 32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from routelab.config import Config, ConfigError, apply_overrides
from routelab.data import draw_tasks, task_probabilities
from routelab.io import load_state_dict
from routelab.model import RoutedTransformer
from routelab.train import evaluate, read_metrics, train
from routelab.train.run import load_task_data, resolve_config
from routelab.train.trainer import task_batches


def multi_config(data_dir, overrides=(), tasks=None) -> Config:
    tasks = tasks if tasks is not None else [
        {"name": "text", "source": str(data_dir / "tiny.txt"), "head": "lm"},
        {"name": "letters", "source": str(data_dir / "cls.jsonl"), "head": "classification", "loss_weight": 0.5},
    ]
    base = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
        "data": {"seq_len": 32, "val_fraction": 0.1, "tasks": tasks},
        "train": {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "log_every": 1, "eval_every": 0,
                  "eval_batches": 4, "checkpoint_every": 0, "progress": False, "device": "cpu"},
    }
    return Config.from_dict(apply_overrides(base, list(overrides)))


def built(cfg: Config):
    data = load_task_data(cfg, None)
    cfg = resolve_config(cfg, data)
    torch.manual_seed(0)
    return cfg, data, RoutedTransformer(cfg.model)


def test_config_derives_heads_and_causality(data_dir):
    cfg = multi_config(data_dir)
    assert cfg.model.task_names == ["text", "letters"]
    assert cfg.model.task_heads == ["lm", "classification"]
    assert cfg.model.causal  # an LM task: one causal body
    enc = multi_config(data_dir, tasks=[{"name": "a", "source": str(data_dir / "cls.jsonl"), "head": "classification"},
                                        {"name": "b", "source": "stdlib-packages"}])
    assert enc.model.causal is False and enc.model.task_heads == ["classification", "classification"]
    assert Config.from_dict(cfg.to_dict()).model == cfg.model  # config.yaml round trip


def test_heads_get_only_their_tasks_gradients(data_dir):
    cfg, data, model = built(multi_config(data_dir, ["model.tie_embeddings=false"]))
    assert set(model.heads) == {"text", "letters"} and not hasattr(model, "head")
    perms: dict = {}
    for task in (0, 1):
        model.zero_grad(set_to_none=True)
        index = next(i for i in range(50) if task_batches(cfg, data, i, perms)[0][0] == task)
        (_, _, batch), = task_batches(cfg, data, index, perms)
        assert (batch["task_ids"] == task).all()
        model(**batch).loss.backward()
        mine, other = model.heads[data.names[task]], model.heads[data.names[1 - task]]
        assert mine.weight.grad is not None and mine.weight.grad.abs().sum() > 0
        assert other.weight.grad is None
        assert model.layers[0].attn_norm.weight.grad.abs().sum() > 0  # the shared body learns from both


def test_single_task_model_keeps_its_state_dict_names():
    from routelab.config import ModelConfig

    names = set(RoutedTransformer(ModelConfig(vocab_size=50, head="classification", num_labels=3)).state_dict())
    assert "head.weight" in names and not any(n.startswith("heads.") for n in names)


def test_temperature_formula_by_hand():
    p = task_probabilities([100, 400], temperature=2.0)
    assert p == pytest.approx([10 / 30, 20 / 30])  # sqrt(100) : sqrt(400)
    assert task_probabilities([100, 400], 1.0) == pytest.approx([0.2, 0.8])
    assert task_probabilities([100, 400], 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)
    assert task_probabilities([1, 1], weights=[1.0, 3.0]) == pytest.approx([0.25, 0.75])


def test_sampling_proportions_match_the_weights(data_dir):
    tasks = [{"name": "text", "source": str(data_dir / "tiny.txt"), "head": "lm", "sampling_weight": 1.0},
             {"name": "letters", "source": str(data_dir / "cls.jsonl"), "head": "classification", "sampling_weight": 3.0}]
    cfg = multi_config(data_dir, tasks=tasks)
    data = load_task_data(cfg, None)
    perms: dict = {}
    drawn = [task_batches(cfg, data, i, perms)[0][0] for i in range(2000)]
    assert np.mean(drawn) == pytest.approx(0.75, abs=0.03)  # 3 sigma = 0.029
    # a pure function of (seed, index): a fresh cache, asked out of order, gives the same draws
    again: dict = {}
    assert [task_batches(cfg, data, i, again)[0][0] for i in (1500, 7, 1999)] == [drawn[1500], drawn[7], drawn[1999]]
    assert draw_tasks(np.array([0.25, 0.75]), 0, 5, 3).tolist() == draw_tasks(np.array([0.25, 0.75]), 0, 5, 3).tolist()


def test_batch_mixing_splits_rows_by_task(data_dir):
    cfg = multi_config(data_dir, ["data.task_mixing=batch"])
    data = load_task_data(cfg, None)
    parts = task_batches(cfg, data, 3, {})
    assert sum(b["input_ids"].shape[0] for _, _, b in parts) == 8
    assert sum(share for _, share, _ in parts) == pytest.approx(1.0)
    for task, _, b in parts:
        assert (b["task_ids"] == task).all()


@pytest.mark.parametrize("mixing", ["step", "batch"])
def test_multitask_resume_is_bitwise_identical(data_dir, tmp_path, mixing):
    over = ["model.dropout=0.1", "train.grad_accum=2", "train.eval_every=5", "train.checkpoint_every=4",
            f"data.task_mixing={mixing}"]
    cfg = multi_config(data_dir, over)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_after=6)
    train(cfg, tmp_path / "resumed", resume=True)
    a = load_state_dict(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_state_dict(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"text", "letters"}
    assert {"val_loss", "val_bpb"} <= set(summary["tasks"]["text"]) and "val_accuracy" in summary["tasks"]["letters"]
    evals = [r for r in read_metrics(tmp_path / "resumed") if r.get("split") == "val"]
    assert all("val/text/loss" in r and "val/letters/accuracy" in r for r in evals)
    trains = [r for r in read_metrics(tmp_path / "resumed") if "split" not in r]
    assert all(any(k.startswith("train/") and k.endswith("/loss") for k in r) for r in trains)


def test_per_task_eval_equals_each_task_alone(data_dir):
    """Each task's numbers equal a single-task model holding the same body and that task's head."""
    tasks = [{"name": "text", "source": str(data_dir / "tiny.txt"), "head": "lm"},
             {"name": "letters", "source": str(data_dir / "cls.jsonl"), "head": "classification"}]
    cfg, data, model = built(multi_config(data_dir, ["model.causal=false", "model.tie_embeddings=false"], tasks=[tasks[1]]))
    result = evaluate(model, data, cfg, "val", max_batches=0)
    single = Config.from_dict(apply_overrides(
        {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "head": "classification",
                   "causal": False, "tie_embeddings": False},
         "data": {"source": str(data_dir / "cls.jsonl"), "task": "classification", "seq_len": 32, "val_fraction": 0.1},
         "train": {"batch_size": 8, "device": "cpu"}}, []))
    single = resolve_config(single, data.tasks[0])
    alone = RoutedTransformer(single.model)
    state = {k.replace("heads.letters.", "head."): v for k, v in model.state_dict().items()}
    alone.load_state_dict(state)
    expected = evaluate(alone, data.tasks[0], single, "val", max_batches=0)
    assert result["tasks"]["letters"] == expected
    # and with an LM task beside it (a causal body): the LM task alone
    cfg, data, model = built(multi_config(data_dir, ["model.tie_embeddings=false"], tasks=tasks))
    result = evaluate(model, data, cfg, "val", max_batches=2)
    lm = Config.from_dict({"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "tie_embeddings": False},
                           "data": {"source": str(data_dir / "tiny.txt"), "seq_len": 32, "val_fraction": 0.1},
                           "train": {"batch_size": 8, "device": "cpu"}})
    lm = resolve_config(lm, data.tasks[0])
    alone = RoutedTransformer(lm.model)
    alone.load_state_dict({k.replace("heads.text.", "head."): v for k, v in model.state_dict().items() if not k.startswith("heads.letters")})
    assert result["tasks"]["text"] == evaluate(alone, data.tasks[0], lm, "val", max_batches=2)
    assert result["loss"] == pytest.approx((result["tasks"]["text"]["loss"] + result["tasks"]["letters"]["loss"]) / 2)


def test_causal_classification_reads_the_last_real_token(data_dir):
    cfg, data, model = built(multi_config(data_dir))
    model.eval()
    (_, _, batch), = task_batches(cfg, data, next(i for i in range(50) if task_batches(cfg, data, i, {})[0][0] == 1), {})
    out = model(**batch)
    mask = batch["attention_mask"]
    row = int(mask.sum(-1).argmin())  # a padded row: padding after the last real token changes nothing
    longer = {k: v[row : row + 1] for k, v in batch.items()}
    padded = {**longer, "input_ids": torch.cat([longer["input_ids"], longer["input_ids"][:, :1]], 1)[:, :32],
              "attention_mask": torch.cat([longer["attention_mask"], torch.zeros(1, 1, dtype=mask.dtype)], 1)[:, :32]}
    assert torch.allclose(model(**padded).logits, out.logits[row : row + 1], atol=1e-5)


@pytest.mark.parametrize(
    "tasks, match",
    [
        ([{"name": "a", "source": "stdlib"}, {"name": "a", "source": "stdlib-packages"}], "distinct names"),
        ([{"name": "a", "source": "stdlib-packages", "head": "lm"}], "head matching source"),
        ([{"name": "a", "source": "stdlib", "loss_weight": 0}], "loss_weight"),
        ([{"name": "a", "source": "stdlib", "sampling_weight": -1.0}], "sampling_weight"),
        ([{"name": "a", "source": "stdlib", "sampling_weight": 0.0}, {"name": "b", "source": "stdlib", "sampling_weight": 0.0}],
         "sampling_weight"),
        ([{"name": "a", "source": "stdlib", "sampling_weight": 1.0}, {"name": "b", "source": "stdlib"}], "every task, or none"),
        ([{"name": "a", "source": "x.jsonl"}], "head"),
        ([{"name": "a", "source": "stdlib"}, {"name": "b", "source": "listops"}], "ListOps"),
        ([], "at least one task"),
        ([{"name": "a", "source": "stdlib", "data": {"tokenizer": "bpe"}}], "tokenizer"),
    ],
)
def test_bad_task_lists_are_one_clear_error(data_dir, tasks, match):
    with pytest.raises(ConfigError, match=match) as e:
        multi_config(data_dir, tasks=tasks)
    assert "\n" not in str(e.value)


def test_lm_task_with_encoder_body_is_refused(data_dir):
    with pytest.raises(ConfigError, match="model.causal"):
        multi_config(data_dir, ["model.causal=false"])


def test_cli_exit_2_on_bad_tasks(data_dir, tmp_path):
    from routelab.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  tasks:\n    - {name: a, source: stdlib}\n    - {name: a, source: stdlib-packages}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2


def test_ffn_gets_per_token_task_ids_only_in_multitask_calls():
    """The contract task-aware routers rely on: ``task_ids`` (B, T) reaches every FFN as a keyword,
    and a single-task call passes no ``task_ids`` at all."""
    from routelab.config import ModelConfig

    def recording(model):
        seen = []
        for layer in model.layers:
            inner = layer.ffn.forward
            layer.ffn.forward = lambda *a, _f=inner, **kw: (seen.append(kw.get("task_ids", "absent")), _f(*a, **kw))[1]
        return seen

    multi = RoutedTransformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4, task_names=["a", "b"], tie_embeddings=False))
    seen = recording(multi)
    x = torch.randint(0, 50, (3, 7))
    multi(x, task_ids=torch.tensor([1, 1, 1]))
    assert len(seen) == 2 and all(t.shape == (3, 7) and (t == 1).all() for t in seen)
    mixed = multi(x, task_ids=torch.tensor([0, 1, 1])).logits  # same head shapes: each row through its own head
    for row, task in enumerate([0, 1, 1]):
        alone = multi(x[row : row + 1], task_ids=torch.tensor([task])).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-6, rtol=0)
    cls = RoutedTransformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4, task_names=["a", "b"],
                                        task_heads=["lm", "classification"], task_num_labels=[None, 3]))
    with pytest.raises(ValueError, match="mixes tasks whose heads differ"):
        cls(x, task_ids=torch.tensor([0, 1, 1]))
    single = RoutedTransformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    seen = recording(single)
    single(x)
    assert seen == ["absent", "absent"]
    assert multi.cfg.num_tasks == 2 and single.cfg.num_tasks == 1


def test_single_task_fingerprint_has_no_multitask_keys():
    """Runs finished before multi-task keys existed keep their config_sha256."""
    import hashlib

    from routelab.train.run import DISPLAY_ONLY, _flatten, config_sha256

    cfg = Config()
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in DISPLAY_ONLY}
    old = {k: v for k, v in flat.items() if ("task" not in k.split(".")[-1] or k == "data.task") and k != "train.precision"}
    assert config_sha256(cfg) == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
