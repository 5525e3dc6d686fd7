"""A run stopped with ``stop_after`` and resumed logs the same numbers as one that ran straight
through: every ``metrics.jsonl`` value but the clocks, and the summary's losses (an MoE model, so the
routing statistics and the router/expert gradient norms are compared too)."""

from __future__ import annotations

from routelab.train import read_metrics, train

MOE = "model.ffn={kind: moe, router: {kind: topk, top_k: 2}, num_experts: 4, hidden: 16}"
SETTINGS = (MOE, "model.dropout=0.1", "train.grad_accum=2", "train.steps=8", "train.eval_every=3", "train.log_every=2")
CLOCKS = {"tokens_per_s", "elapsed_s"}  # what may differ between two runs of the same computation


def _lines(run_dir) -> list[list[tuple[str, object]]]:
    """The metrics lines without their clocks, keys in the order written."""
    return [[(k, v) for k, v in r.items() if k not in CLOCKS] for r in read_metrics(run_dir)]


def test_stopped_and_resumed_run_logs_what_a_straight_run_logs(lm_cfg, tmp_path):
    cfg = lm_cfg(*SETTINGS)
    straight = train(cfg, tmp_path / "straight")
    half = train(cfg, tmp_path / "resumed", stop_after=5)  # checkpoints at step 5 (straight logs nothing there)
    assert half["steps"] == 5 and not half["completed"]
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    # the first invocation also logged and evaluated where it stopped (step 5); the rest is the same
    stop_lines = [line for line in _lines(tmp_path / "resumed") if dict(line)["step"] == 5]
    assert [dict(line).get("split") for line in stop_lines] == [None, "val"]
    assert [line for line in _lines(tmp_path / "resumed") if dict(line)["step"] != 5] == _lines(tmp_path / "straight")
    assert any("router_grad_norm" in dict(line) for line in _lines(tmp_path / "straight"))
    for key in ("steps", "completed", "final_train_loss", "val_loss", "val_bpb", "train_tokens", "skipped_steps"):
        assert resumed[key] == straight[key], key
