"""metrics.jsonl helpers and evaluation numbers (bits per byte from a known loss)."""

import json
import math

import pytest
import torch

from routelab.config import Config, ModelConfig
from routelab.data import ByteTokenizer, LMData
from routelab.model import RoutedTransformer
from routelab.train.evaluation import bits_per_byte, evaluate
from routelab.train.metrics import MetricsLog, flatten_routing, mean_records, to_jsonable


def test_flatten_routing_tensors_to_floats_and_lists():
    routing = {
        "layers.0.ffn": {"entropy": torch.tensor(0.5), "tokens_per_expert": torch.tensor([3, 1]), "dropped": 0.25},
        "layers.1.ffn": {"entropy": 1.0},
    }
    flat = flatten_routing(routing)
    assert flat == {
        "routing/layers.0.ffn/entropy": 0.5,
        "routing/layers.0.ffn/tokens_per_expert": [3.0, 1.0],
        "routing/layers.0.ffn/dropped": 0.25,
        "routing/layers.1.ffn/entropy": 1.0,
    }
    assert to_jsonable(torch.tensor([7.0])) == [7.0]  # a 1-element vector stays a list
    json.dumps(flat)


def test_mean_records_over_micro_batches():
    recs = [{"a": 1.0, "v": [1.0, 3.0]}, {"a": 3.0, "v": [3.0, 5.0]}]
    assert mean_records(recs) == {"a": 2.0, "v": [2.0, 4.0]}


def test_truncate_after_drops_later_and_partial_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": float(step)})
    log.write({"step": 2, "split": "val", "loss": 0.5})
    log.write({"step": 4, "split": "val", "loss": float("nan")})  # NaN is written as a string
    with log.path.open("a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    assert log.truncate_after(2) == 4
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in lines] == [(1, None), (2, None), (2, "val")]


def uniform_lm() -> RoutedTransformer:
    """A model whose logits are all zero: the loss is exactly ln(vocab)."""
    model = RoutedTransformer(ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_bpb_from_a_known_loss():
    cfg = Config.from_dict({"data": {"seq_len": 32}, "model": {"max_seq_len": 32}, "train": {"batch_size": 4}})
    val = torch.arange(200) % 256
    # pretend every token spans 2 bytes: bpb = ln(260) / ln 2 * (200 / 400) = log2(260) / 2
    data = LMData(
        torch.arange(100) % 256, val, ByteTokenizer(), val_bytes=400, val_tokens=200, train_names=["a"], val_names=["b"]
    )
    model = uniform_lm()
    model.train()
    result = evaluate(model, data, cfg, "val", max_batches=0)
    assert result["loss"] == pytest.approx(math.log(260), rel=1e-6)
    assert result["bpb"] == pytest.approx(math.log2(260) / 2, rel=1e-6)
    assert result["tokens"] == 6 * 31  # 200 // 32 = 6 windows, 31 predictions each
    assert model.training  # train mode restored
    assert bits_per_byte(math.log(2), 10, 5) == pytest.approx(2.0)
    assert "bpb" not in evaluate(model, data, cfg, "train", max_batches=1)


class RandomInEval(RoutedTransformer):
    """Draws from the global RNG in every forward pass (as a stochastic router might)."""

    def forward(self, *args, **kwargs):
        torch.rand(1)
        return super().forward(*args, **kwargs)


def test_evaluate_does_not_move_the_rng():
    cfg = Config.from_dict({"data": {"seq_len": 32}, "model": {"max_seq_len": 32}, "train": {"batch_size": 4}})
    data = LMData(torch.arange(100) % 256, torch.arange(100) % 256, ByteTokenizer(), 100, 100, ["a"], ["b"])
    model = RandomInEval(ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    evaluate(model, data, cfg, "val")
    assert torch.equal(torch.rand(3), expected)
