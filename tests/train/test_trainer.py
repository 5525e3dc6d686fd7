"""End-to-end training runs on tiny data: exact resumption, run-folder rules, learning, outputs."""

import json
import math
import shutil

import pytest
import torch

from routelab.config import ConfigError
from routelab.data import DataError, load_lm_data
from routelab.io import load_state_dict
from routelab.train import RunError, evaluate, load_run, read_metrics, train
from routelab.train import checkpoint as checkpoint_mod
from routelab.train.checkpoint import list_checkpoints

# dropout > 0 everywhere so resumption is only exact if the RNG state is restored; eval every 5
# steps (evaluation must not disturb training); gradient accumulation on.
RESUME = (
    "model.dropout=0.1",
    "model.attention.dropout=0.1",
    "train.grad_accum=2",
    "train.eval_every=5",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=2",
)


def final_params(run_dir) -> dict[str, torch.Tensor]:
    return load_state_dict(run_dir / "model" / "model.safetensors")


def assert_same_params(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"parameter {name} differs"


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "split" not in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, lm_cfg):
    """The reference: 12 steps in one go."""
    out = tmp_path_factory.mktemp("straight")
    train(lm_cfg(*RESUME), out)
    return out


def test_resume_is_bitwise_identical(straight, lm_cfg, tmp_path):
    cfg = lm_cfg(*RESUME)
    half = train(cfg, tmp_path, stop_after=6)
    assert half["steps"] == 6 and not half["completed"]
    assert not (tmp_path / "model").exists()  # no final export for an unfinished run
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    with (tmp_path / "metrics.jsonl").open("a") as f:  # a killed run logged past its checkpoint
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    summary = train(cfg, tmp_path, resume=True)
    assert summary["steps"] == 12 and summary["completed"]
    assert_same_params(final_params(straight), final_params(tmp_path))
    assert train_steps(tmp_path) == list(range(1, 13))  # no duplicates, none missing
    evals = [r["step"] for r in read_metrics(tmp_path) if r.get("split") == "val"]
    assert evals == [5, 6, 10, 12]  # 6 = the end of the first invocation
    assert summary["train_tokens"] == 12 * 2 * 8 * 32


def test_resume_without_rng_restore_differs(straight, lm_cfg, tmp_path, monkeypatch):
    """Guards the test above: with dropout on, skipping the RNG restore changes the result."""
    cfg = lm_cfg(*RESUME)
    train(cfg, tmp_path, stop_after=6)
    monkeypatch.setattr(checkpoint_mod, "restore_rng", lambda *a, **k: None)
    train(cfg, tmp_path, resume=True)
    a, b = final_params(straight), final_params(tmp_path)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_incomplete_checkpoint_is_ignored(straight, lm_cfg, tmp_path):
    cfg = lm_cfg(*RESUME)
    train(cfg, tmp_path, stop_after=6)
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "step_0000006", ckpts / "step_0000008")
    (ckpts / "step_0000008" / "state.json").unlink()  # killed before state.json was written
    train(cfg, tmp_path, resume=True)
    assert_same_params(final_params(straight), final_params(tmp_path))
    assert train_steps(tmp_path) == list(range(1, 13))


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(lm_cfg, tmp_path):
    cfg = lm_cfg("train.steps=3")
    with pytest.raises(RunError, match="no complete checkpoint"):
        train(cfg, tmp_path / "empty", resume=True)
    train(cfg, tmp_path / "run", stop_after=2)
    with pytest.raises(RunError, match="--resume"):
        train(cfg, tmp_path / "run")
    train(cfg, tmp_path / "run", resume=True)  # finish it
    with pytest.raises(RunError, match="--resume"):
        train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    summary = train(cfg, tmp_path / "run", resume=True)  # nothing left to do: re-exports, logs nothing
    assert summary["steps"] == 3 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_fresh_run_clears_leftovers_of_a_run_without_checkpoint(lm_cfg, tmp_path):
    """A run that died before its first checkpoint left its config, tokenizer and metrics."""
    lm_cfg("train.steps=7").save(tmp_path / "config.yaml")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 0.0}) + "\n")
    train(lm_cfg("train.steps=2"), tmp_path)
    assert train_steps(tmp_path) == [1, 2]


def test_config_mismatch_on_resume(lm_cfg, tmp_path):
    train(lm_cfg("train.steps=4"), tmp_path, stop_after=2)
    with pytest.raises(RunError, match=r"train\.lr.*model\.d_model|model\.d_model.*train\.lr"):
        train(lm_cfg("train.steps=4", "train.lr=0.01", "model.d_model=64"), tmp_path, resume=True)
    with pytest.raises(RunError, match="train.steps=1 is below"):
        train(lm_cfg("train.steps=1"), tmp_path, resume=True)
    summary = train(lm_cfg("train.steps=5"), tmp_path, resume=True)  # only train.steps changed: fine
    assert summary["steps"] == 5 and train_steps(tmp_path) == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, lm_cfg):
    out = tmp_path_factory.mktemp("lm_run")
    cfg = lm_cfg("train.steps=60", "train.eval_every=20", "train.log_every=5")
    return cfg, out, train(cfg, out)


def test_lm_training_lowers_the_loss(lm_run):
    _, out, summary = lm_run
    lines = [r for r in read_metrics(out) if "split" not in r]
    assert lines[0]["loss"] > 4.0  # about ln(260) = 5.56 at the start
    assert summary["final_train_loss"] < 0.6 * lines[0]["loss"]
    assert summary["val_bpb"] < 0.6 * math.log2(260)


def test_summary_and_metrics_contents(lm_run):
    cfg, out, summary = lm_run
    for key in (
        "steps",
        "final_train_loss",
        "val_loss",
        "val_bpb",
        "tokens_per_s",
        "wall_time_s",
        "num_parameters",
        "peak_rss_mb",
    ):
        assert summary[key] is not None, key
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 60 and summary["peak_rss_mb"] > 10 and summary["tokens_per_s"] > 0
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "checkpoints",
        "model",
        "summary.json",
    }
    records = read_metrics(out)
    train_lines = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_lines] == list(range(5, 61, 5))
    for key in ("loss", "task_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert key in train_lines[0], key
    assert train_lines[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    evals = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    data = load_lm_data(cfg.data)
    for r in evals:
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) * data.val_tokens / data.val_bytes)
    assert summary["val_loss"] == evals[-1]["loss"] and summary["val_bpb"] == evals[-1]["bpb"]


def test_load_run_and_evaluate_reproduce_the_summary(lm_run):
    _, out, summary = lm_run
    cfg, model, tokenizer, data = load_run(out, with_data=True)
    assert cfg.model.vocab_size == tokenizer.vocab_size == 260  # resolved from the tokenizer
    assert not model.training
    assert evaluate(model, data, cfg)["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_classification_learns(cls_cfg, tmp_path):
    cfg = cls_cfg(
        "train.steps=50", "train.batch_size=16", "train.eval_batches=0", "train.log_every=10", "train.grad_clip=0"
    )
    summary = train(cfg, tmp_path)
    assert summary["val_accuracy"] >= 0.9
    lines = [r for r in read_metrics(tmp_path) if "split" not in r]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_labels"] == 2


def test_load_run_falls_back_to_the_newest_checkpoint(lm_cfg, tmp_path):
    train(lm_cfg("train.steps=6"), tmp_path, stop_after=3)
    _, model, _, data = load_run(tmp_path)
    assert data is None
    saved = load_state_dict(tmp_path / "checkpoints" / "step_0000003" / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_data_mismatches_and_task_without_its_data(lm_cfg, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=100 is smaller"):
        train(lm_cfg("model.vocab_size=100"), tmp_path / "a")
    cfg = lm_cfg("model.head=token_classification", "data.task=token_classification")  # a .txt file has no labels
    with pytest.raises(DataError, match=r"token classification reads \.jsonl files"):
        train(cfg, tmp_path / "b")
    with pytest.raises(DataError, match="is a 'token_classification' task, not 'lm'"):
        train(lm_cfg("data.source=stdlib-tokens"), tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused by preflight, before the run folder


def test_word_vectors_fill_frozen_embeddings(lm_cfg, tmp_path):
    vec = [round(0.01 * i, 2) for i in range(32)]
    path = tmp_path / "vectors.txt"
    path.write_text("2 32\n" + "q " + " ".join(map(str, vec)) + "\n" + "notatoken " + " ".join(["1"] * 32) + "\n")
    cfg = lm_cfg("train.steps=3", f"model.embeddings_path={path}", "model.freeze_embeddings=true")
    train(cfg, tmp_path / "run")
    weights = final_params(tmp_path / "run")["tok_emb.weight"]
    assert torch.equal(weights[ord("q")], torch.tensor(vec))  # loaded, and frozen during training


def test_max_seconds_ends_the_run_as_finished(lm_cfg, tmp_path):
    summary = train(lm_cfg("train.max_seconds=1e-6"), tmp_path / "timed")
    assert summary["steps"] == 1 and summary["completed"] is True and summary["stopped_by"] == "max_seconds"
    assert (tmp_path / "timed" / "model" / "model.safetensors").is_file()
    assert train(lm_cfg(), tmp_path / "full")["stopped_by"] == "steps"


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional package)."""

    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_metrics_lines(lm_cfg, tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.instances.clear()
    train(lm_cfg("train.tensorboard=true", "train.steps=4", "train.eval_every=2"), tmp_path / "tb")
    (w,) = FakeWriter.instances
    assert w.log_dir == str(tmp_path / "tb" / "tensorboard") and w.closed
    records = read_metrics(tmp_path / "tb")
    losses = {(s, v) for t, v, s in w.scalars if t == "train/loss"}
    assert losses == {(r["step"], r["loss"]) for r in records if "split" not in r}
    val = {(s, v) for t, v, s in w.scalars if t == "val/loss"}
    assert val == {(r["step"], r["loss"]) for r in records if r.get("split") == "val"} and len(val) == 2


def test_tensorboard_without_the_package_is_a_clear_error(lm_cfg, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(lm_cfg("train.tensorboard=true"), tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # refused before the run folder is touched
