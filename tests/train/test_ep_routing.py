"""Routing choices that depend on the processes, in real training runs (gloo over loopback): the
balance loss over the global batch, device-limited routing, and the communication counters."""

from __future__ import annotations

import json

import pytest
import yaml

from routelab.io import load_state_dict
from routelab.train import read_metrics
from tests.train.test_distributed import _assert_same_params, _routelab, write_tiny


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path)


def _ffn(**extra) -> list[str]:
    ffn = {"kind": "moe", "router": {"kind": "topk", "top_k": 2}, "num_experts": 4, "hidden": 16, "balance_loss_weight": 0.5, **extra}
    return ["--set", f"model.ffn={json.dumps(ffn)}"]


def _train(tiny, out, *args) -> None:
    ran = _routelab("train", str(tiny), *args, "--out", str(out), "--no-sample")
    assert ran.returncode == 0, ran.stderr[-3000:]


def _max_diff(a, b) -> float:
    x, y = load_state_dict(a / "model" / "model.safetensors"), load_state_dict(b / "model" / "model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_global_balance_scope_trains_what_one_process_trains(tiny, tmp_path):
    """With a strong balance loss and DeepSeek-V3's bias balancing, two expert-parallel processes
    equal one process on the same global batch only when both balance over the global batch; per
    rank, they train another model."""
    bias = {"bias_balancing": True, "bias_update_rate": 0.05}
    _train(tiny, tmp_path / "one", *_ffn(**bias))
    _train(tiny, tmp_path / "global", *_ffn(balance_scope="global", **bias), "--nproc", "2", "--set", "train.expert_parallel=2")
    _train(tiny, tmp_path / "local", *_ffn(**bias), "--nproc", "2", "--set", "train.expert_parallel=2")
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "global" / "model" / "model.safetensors")
    assert _max_diff(tmp_path / "one", tmp_path / "local") > 1e-4
    one = [r for r in read_metrics(tmp_path / "one") if "split" not in r]
    glob = [r for r in read_metrics(tmp_path / "global") if "split" not in r]
    key = "routing/layers.0.ffn/balance_loss"
    assert [round(r[key], 5) for r in glob] == [round(r[key], 5) for r in one]  # every rank logs the global value


def test_device_limited_routing_and_the_communication_counters(tiny, tmp_path):
    """max_ranks_per_token=1 with two processes: no token reaches more than one rank, the model is the
    one a single process trains with the same two expert groups, and the counters say what moved."""
    _train(tiny, tmp_path / "one", *_ffn(balance_loss_weight=0.0, max_ranks_per_token=1, expert_groups=2))
    _train(tiny, tmp_path / "ep", *_ffn(balance_loss_weight=0.0, max_ranks_per_token=1), "--nproc", "2",
           "--set", "train.expert_parallel=2")
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "ep" / "model" / "model.safetensors")
    saved = yaml.safe_load((tmp_path / "ep" / "config.yaml").read_text())
    assert saved["model"]["ffn"]["expert_groups"] == 2  # resolved from train.expert_parallel, kept with the run
    lines = [r for r in read_metrics(tmp_path / "ep") if "split" not in r]
    for layer in ("layers.0.ffn", "layers.1.ffn"):
        assert all(r[f"routing/{layer}/max_ranks_per_token"] == 1.0 for r in lines)
        assert all(r[f"routing/{layer}/ranks_per_token"] == 1.0 for r in lines)
        # top-2 of 4 experts within one rank's 2 experts: both pairs of a token go to one rank, and the
        # token travels there once: tokens sent = the non-local share of a rank's 4 rows x 32 tokens
        for r in lines:
            assert abs(r[f"routing/{layer}/a2a_sent_tokens"] - (1 - r[f"routing/{layer}/local_fraction"]) * 4 * 32) < 1e-6
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    comm = summary["communication"]
    assert comm["max_ranks_per_token"] == 1.0 and 0 < comm["a2a_share"] < 1 and comm["a2a_sent_bytes_per_step"] > 0
    assert "communication" not in json.loads((tmp_path / "one" / "summary.json").read_text())
