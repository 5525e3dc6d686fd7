"""``train.init_from``: a run that starts from another run's weights (plain or upcycled), with its
tokenizer, a fresh optimizer and step 0; resumption; and the errors of a source that does not fit."""

from __future__ import annotations

import shutil

import pytest
import torch

from routelab.config import ConfigError
from routelab.io import load_state_dict
from routelab.model import RoutedTransformer
from routelab.train import RunError, evaluate, load_run, read_metrics, train
from routelab.train.checkpoint import list_checkpoints, read_checkpoint_state
from routelab.train.init_from import init_model, read_init_source, start_from
from routelab.train.trainer import micro_batch

SWIGLU = ("model.ffn.activation=swiglu",)
TOPK = ("model.ffn.kind=moe", "model.ffn.num_experts=4", "model.ffn.router.kind=topk", "model.ffn.router.top_k=2")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, lm_cfg):
    """A tiny finished dense run (4 steps)."""
    out = tmp_path_factory.mktemp("dense")
    train(lm_cfg(*SWIGLU, "train.steps=4"), out)
    return out


def first_task_loss(run_dir) -> float:
    return next(r["task_loss"] for r in read_metrics(run_dir) if r.get("step") == 1 and "split" not in r)


def source_loss_on_first_batch(source_dir, cfg) -> float:
    """The source model's task loss on update 1's batch of ``cfg`` (the new run's first forward)."""
    run = load_run(source_dir, with_data=True)
    batch = micro_batch(cfg, run.data, 1, 0, {})
    with torch.no_grad():
        return run.model(**batch).task_loss.item()


@pytest.mark.parametrize("change", [(), TOPK], ids=["same-model", "dense-to-moe"])
def test_first_forward_equals_the_source_and_the_optimizer_is_fresh(dense_run, lm_cfg, tmp_path, change, caplog):
    cfg = lm_cfg(*SWIGLU, *change, "train.steps=2", f"train.init_from={dense_run}", "train.seed=7")
    with caplog.at_level("INFO", logger="routelab.train"):
        train(cfg, tmp_path)
    assert first_task_loss(tmp_path) == pytest.approx(source_loss_on_first_batch(dense_run, cfg), abs=1e-5)
    said = [r.getMessage() for r in caplog.records if "initialised from" in r.getMessage()]
    assert len(said) == 1 and (("upcycled" in said[0]) == bool(change)), said
    (_, ckpt), = list_checkpoints(tmp_path)
    assert read_checkpoint_state(ckpt)["step"] == 2  # step counted from 0
    steps = [v for k, v in load_state_dict(ckpt / "optimizer.safetensors").items() if k.endswith(".step")]
    assert steps and all(float(s) == 2 for s in steps)  # AdamW's step counts: 2 updates, none inherited
    assert (tmp_path / "tokenizer.json").read_bytes() == (dense_run / "tokenizer.json").read_bytes()


def test_upcycled_initial_eval_loss_equals_the_dense_models(dense_run, lm_cfg):
    cfg, source = start_from(lm_cfg(*SWIGLU, *TOPK, f"train.init_from={dense_run}"))
    model = RoutedTransformer(cfg.model)
    done = init_model(model, source, cfg)
    assert done.moe_layers == 2
    run = load_run(dense_run, with_data=True)
    ours = evaluate(model.eval(), run.data, cfg, "val", max_batches=2)
    theirs = evaluate(run.model, run.data, cfg, "val", max_batches=2)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_resume_continues_without_reading_the_source_again(dense_run, lm_cfg, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(dense_run, source)
    cfg = lm_cfg(*SWIGLU, *TOPK, "train.steps=4", f"train.init_from={source}", "train.checkpoint_every=2")
    straight = tmp_path / "straight"
    train(cfg, straight)
    half = tmp_path / "half"
    train(cfg, half, stop_after=2)
    shutil.rmtree(source)  # a resumed run reads its checkpoint, not its source
    summary = train(cfg, half, resume=True)
    assert summary["steps"] == 4 and summary["completed"]
    a, b = (load_state_dict(d / "model" / "model.safetensors") for d in (straight, half))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_folder_is_a_source_too(dense_run, lm_cfg, tmp_path):
    cfg = lm_cfg(*SWIGLU, "train.steps=1", f"train.init_from={dense_run / 'model'}")
    train(cfg, tmp_path)
    assert first_task_loss(tmp_path) == pytest.approx(source_loss_on_first_batch(dense_run, cfg), abs=1e-5)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (("model.d_model=64",), ConfigError, r"train\.init_from=.*model\.d_model is 32 in the source but 64"),
        (("model.ffn.hidden=48",), ConfigError, r"FFN width is 88 in the source but 48"),
        (("data.tokenizer=bpe",), ConfigError, r"holds a 'byte' tokenizer but data\.tokenizer='bpe'.*set data\.tokenizer=byte"),
    ],
)
def test_a_source_that_does_not_fit_is_one_line_before_any_data(dense_run, lm_cfg, tmp_path, overrides, error, message):
    cfg = lm_cfg(*SWIGLU, *overrides, f"train.init_from={dense_run}")
    with pytest.raises(error, match=message) as e:
        train(cfg, tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_folder_that_is_no_source_is_refused(lm_cfg, tmp_path):
    (tmp_path / "source").mkdir()
    with pytest.raises(RunError, match=r"is not a run folder \(config.yaml\) nor a saved model folder"):
        train(lm_cfg(f"train.init_from={tmp_path / 'source'}"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"--out '.*source/run' is inside train.init_from"):  # never inside the source
        train(lm_cfg(f"train.init_from={tmp_path / 'source'}"), tmp_path / "source" / "run")
    with pytest.raises(RunError, match="does not exist"):
        read_init_source(tmp_path / "missing")


def test_processes_start_from_the_same_weights_as_one_process(tmp_path):
    """``--nproc 2`` with an upcycling ``init_from``: every rank loads the source, rank 0 alone writes,
    and the two processes train what one process trains."""
    from routelab.config import Config
    from tests.train.test_distributed import _assert_same_params, _routelab, write_tiny

    config = write_tiny(tmp_path)
    dense = tmp_path / "dense"
    train(Config.load(config, ["train.steps=2"]), dense)
    change = [f"train.init_from={dense}", "train.steps=2", *TOPK, "model.ffn.balance_loss_weight=0"]  # (a per-rank loss)
    train(Config.load(config, change), tmp_path / "one")
    args = [a for c in change for a in ("--set", c)]
    done = _routelab("train", str(config), "--out", str(tmp_path / "two"), "--nproc", "2", "--no-sample", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("initialised from") == 1  # rank 0 logs; both ranks loaded
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors")


def test_init_noise_perturbs_the_expert_copies(dense_run, lm_cfg):
    models = []
    for noise in (0.0, 0.01):
        cfg, source = start_from(lm_cfg(*SWIGLU, *TOPK, f"train.init_from={dense_run}", f"train.init_noise={noise}"))
        models.append(RoutedTransformer(cfg.model))
        init_model(models[-1], source, cfg)
    (exact, noisy) = (m.layers[0].ffn.experts.w_in for m in models)
    assert torch.equal(exact[0], exact[1]) and not torch.equal(noisy[0], noisy[1])
    assert (noisy - exact).std().item() == pytest.approx(0.01, rel=0.1)


def test_an_unfinished_run_starts_from_its_newest_checkpoint(dense_run, lm_cfg, tmp_path):
    source = tmp_path / "unfinished"
    shutil.copytree(dense_run, source)
    shutil.rmtree(source / "model")
    (source / "summary.json").unlink()
    cfg = lm_cfg(*SWIGLU, "train.steps=1", f"train.init_from={source}")
    train(cfg, tmp_path / "run")
    assert first_task_loss(tmp_path / "run") == pytest.approx(source_loss_on_first_batch(dense_run, cfg), abs=1e-5)
