"""train.precision: bf16/fp16 autocast training with float32 master weights, exact resumption
(the fp16 loss scaler's state included), overflowed fp16 steps skipped while the scale backs off,
float32 checkpoints, and evaluate/generate in a chosen dtype."""

from __future__ import annotations

import json

import pytest
import torch

from routelab.config import ConfigError
from routelab.data import load_lm_data
from routelab.generate import SamplingConfig, generate
from routelab.io import load_state_dict
from routelab.model import RoutedTransformer
from routelab.train import evaluate, load_run, read_metrics, train
from routelab.train.trainer import train_step

MOE = ["model.ffn.kind=moe", "model.ffn.num_experts=4", "model.ffn.router=topk", "model.ffn.top_k=2"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, lm_cfg):
    out = tmp_path_factory.mktemp("bf16") / "run"
    train(lm_cfg("train.precision=bf16", *MOE), out)
    return out


def test_bf16_training_learns_and_writes_float32_weights(bf16_run):
    losses = [r["loss"] for r in read_metrics(bf16_run) if "split" not in r]
    assert losses[-1] < losses[0] - 0.5  # 12 steps at lr 3e-3 on a repetitive text
    weights = load_state_dict(bf16_run / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # master weights, whatever the precision
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert summary["precision"] == "bf16"


def test_evaluation_uses_the_training_precision_unless_told(bf16_run):
    run = load_run(bf16_run, with_data=True)
    seen = []
    hook = run.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    own = evaluate(run.model, run.data, run.cfg, "val", max_batches=2)
    fp32 = evaluate(run.model, run.data, run.cfg, "val", max_batches=2, precision="fp32")
    hook.remove()
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32
    assert own["loss"] != fp32["loss"] and abs(own["loss"] - fp32["loss"]) < 0.02 * fp32["loss"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_bitwise_identical_in_mixed_precision(lm_cfg, tmp_path, precision):
    cfg = lm_cfg(f"train.precision={precision}", "train.steps=6", "train.checkpoint_every=3", "model.dropout=0.1", *MOE)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_after=3)
    train(cfg, tmp_path / "resumed", resume=True)
    a = load_state_dict(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_state_dict(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    scales = [r.get("loss_scale") for r in read_metrics(tmp_path / "resumed") if "split" not in r]
    assert (None not in scales) == (precision == "fp16")  # fp16 logs its loss scale each line


def _state(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], json.dumps(
        {k: v for k, v in optimizer.state_dict()["state"].items()}, default=lambda t: t.tolist()
    )


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(lm_cfg, tmp_path):
    cfg = lm_cfg("train.precision=fp16")
    data = load_lm_data(cfg.data, None)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    torch.manual_seed(0)
    model = RoutedTransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # loss * 2^60: fp16 activation gradients overflow
    before = _state(model, optimizer)
    result = train_step(model, optimizer, cfg, data, 1, {}, device, scaler=scaler)
    assert result["skipped"] and result["overflow"] and result["loss_scale"] == 2.0**59
    after = _state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]  # no update at all
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    result = train_step(model, optimizer, cfg, data, 2, {}, device, scaler=scaler)
    assert not result["skipped"] and result["loss_scale"] == 2.0**10
    assert any(not torch.equal(a, p) for a, p in zip(before[0], model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_a_run_that_keeps_overflowing_stops_with_one_line(lm_cfg, tmp_path, monkeypatch):
    import routelab.train.trainer as trainer

    monkeypatch.setattr(trainer, "grad_scaler", lambda device, p: torch.amp.GradScaler("cpu", init_scale=2.0**120, enabled=True))
    monkeypatch.setattr(trainer, "MAX_CONSECUTIVE_SKIPS", 2)
    with pytest.raises(trainer.NonFiniteError, match="use train.precision=bf16"):
        train(lm_cfg("train.precision=fp16"), tmp_path / "run")


def test_a_bf16_run_is_a_different_run_of_the_same_config(lm_cfg):
    """fp32 is left out of the fingerprint (runs from before train.precision keep theirs: see
    test_single_task_fingerprint_has_no_multitask_keys); another precision computes something else."""
    from routelab.train.run import config_sha256

    assert config_sha256(lm_cfg("train.precision=bf16")) != config_sha256(lm_cfg())


def test_precision_choices_and_refusals(lm_cfg):
    with pytest.raises(ConfigError, match="train.precision.*'fp32', 'bf16', 'fp16'"):
        lm_cfg("train.precision=fp8")
    with pytest.raises(ConfigError, match="train.precision='fp16' is invalid.*expert_parallel"):
        lm_cfg("train.precision=fp16", "train.expert_parallel=2", *MOE)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_generate_in_low_precision_keeps_a_low_precision_cache(bf16_run, precision, monkeypatch):
    run = load_run(bf16_run)
    caches = []
    new_cache = run.model.new_cache
    monkeypatch.setattr(run.model, "new_cache", lambda: caches.append(new_cache()) or caches[-1])
    ids = torch.tensor([run.tokenizer.encode("the quick")])
    out = generate(run.model, ids, SamplingConfig(max_new_tokens=6, temperature=0.0), precision=precision)
    assert out.shape == (1, ids.shape[1] + 6) and torch.equal(out[:, : ids.shape[1]], ids)
    assert caches[0][0].k.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ref = generate(run.model, ids, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert (out == ref).float().mean() > 0.5  # a trained model's greedy choices mostly survive rounding
    assert run.model.training is False and next(run.model.parameters()).dtype == torch.float32
