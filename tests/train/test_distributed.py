"""Data-parallel training in real processes on loopback (gloo, torchrun --standalone): N processes
train the model one process trains on the same global batches, checkpoints move between world
sizes, and a failing rank ends the run with one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from routelab.config import Config
from routelab.io import load_state_dict
from routelab.train import read_metrics, train

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "dropout": 0.0},
    "data": {"source": "SOURCE", "seq_len": 32, "val_fraction": 0.2},
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "eval_every": 3, "eval_batches": 3, "log_every": 1,
              "checkpoint_every": 2, "progress": False, "device": "cpu", "threads": 1, "dist_timeout": 60},
}


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path)


def write_tiny(tmp_path: Path) -> Path:
    """The tiny LM config (and its corpus) in ``tmp_path``."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(TINY).replace("SOURCE", str(corpus)))))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    return env


def _routelab(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelab", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def _assert_same_params(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = load_state_dict(a), load_state_dict(b)
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] - y[k]).abs().max() <= atol, k


@pytest.mark.parametrize("nproc", [2, 4])
def test_n_processes_train_what_one_process_trains(tiny, tmp_path, nproc):
    """Each rank takes its rows of the same global batch; DDP averages the gradients: the result
    equals one process on the whole batch, to float summation order."""
    one = train(Config.load(tiny), tmp_path / "one")
    ran = _routelab("train", str(tiny), "--nproc", str(nproc), "--out", str(tmp_path / "many"), "--no-sample")
    assert ran.returncode == 0, ran.stderr
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "many" / "model" / "model.safetensors")
    many = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert many["world_size"] == nproc and many["train_tokens"] == one["train_tokens"]
    assert abs(many["val_loss"] - one["val_loss"]) < 1e-5  # the evaluation is split between ranks, then summed
    lines = [r for r in read_metrics(tmp_path / "many") if "split" not in r]
    assert [r["step"] for r in lines] == list(range(1, 7))  # rank 0 alone writes metrics.jsonl
    assert ran.stderr.count("validation: loss") == 2  # rank 0 alone logs: evaluations at steps 3 and 6, once each...
    assert ran.stdout.count('"world_size"') == 1  # ...and prints the summary


def test_a_checkpoint_moves_between_world_sizes(tiny, tmp_path):
    """Stopped after 4 of 6 steps in 2 processes, resumed in 1: the same model as 6 steps in 1."""
    straight = tmp_path / "straight"
    train(Config.load(tiny), straight)
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(f"""
        from routelab.config import Config
        from routelab.train import train
        train(Config.load({str(tiny)!r}), {str(tmp_path / "moved")!r}, stop_after=4)
    """))
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert ran.returncode == 0, ran.stderr
    summary = train(Config.load(tiny), tmp_path / "moved", resume=True)
    assert summary["steps"] == 6 and summary["world_size"] == 1
    _assert_same_params(straight / "model" / "model.safetensors", tmp_path / "moved" / "model" / "model.safetensors")


def test_a_failing_rank_ends_the_run_with_one_line_naming_it(tiny, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from routelab.cli import main
        from routelab.train import trainer
        real = trainer.train_step
        def failing(model, optimizer, cfg, data, step, *a, **k):
            if step == 3 and os.environ["RANK"] == "1":
                raise ValueError("a disk filled up on this node")
            return real(model, optimizer, cfg, data, step, *a, **k)
        trainer.train_step = failing
        sys.exit(main(["train", {str(tiny)!r}, "--out", {str(tmp_path / "run")!r}, "--no-sample"]))
    """))
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                         capture_output=True, text=True, env=_env(), timeout=120)  # a hang would hit this timeout
    assert ran.returncode != 0
    errors = [line for line in ran.stderr.splitlines() if line.startswith("routelab: error:")]
    assert errors == ["routelab: error: rank 1: a disk filled up on this node"], ran.stderr
    assert "Traceback" not in "\n".join(line for line in ran.stderr.splitlines() if "routelab" in line)


def test_a_batch_the_processes_cannot_share_is_refused(tiny, tmp_path):
    ran = _routelab("train", str(tiny), "--nproc", "3", "--out", str(tmp_path / "run"))
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1] == (
        "routelab: error: train.batch_size=8 is invalid with --nproc 3; allowed: a multiple of 3"
    )


MOE = ["--set", "model.ffn={kind: moe, router: {kind: topk, top_k: 2}, num_experts: 4, hidden: 16, balance_loss_weight: 0}"]


@pytest.mark.parametrize("nproc, ep", [(2, 2), (4, 2)])
def test_expert_parallel_training_equals_one_process(tiny, tmp_path, nproc, ep):
    """Experts spread over groups of ``ep`` processes, replicated across the groups: expert gradients
    reduced over replicas only and divided by the world size, router and dense ones by DDP. With the
    balance loss off (it is per rank: each sees its share of the batch), the parameters equal one
    process's on the same global batches."""
    one = _routelab("train", str(tiny), *MOE, "--out", str(tmp_path / "one"), "--no-sample")
    assert one.returncode == 0, one.stderr
    many = _routelab("train", str(tiny), *MOE, "--nproc", str(nproc), "--set", f"train.expert_parallel={ep}",
                     "--out", str(tmp_path / "ep"), "--no-sample")
    assert many.returncode == 0, many.stderr
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "ep" / "model" / "model.safetensors")
    assert f"experts spread over groups of {ep}" in many.stderr


def test_an_expert_parallel_checkpoint_resumes_in_one_process_and_back(tiny, tmp_path):
    straight = _routelab("train", str(tiny), *MOE, "--out", str(tmp_path / "straight"), "--no-sample")
    assert straight.returncode == 0, straight.stderr
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from routelab.config import Config
        from routelab.train import train
        cfg = Config.load({str(tiny)!r}, [sys.argv[1], "train.expert_parallel=2"])
        train(cfg, {str(tmp_path / "moved")!r}, stop_after=2)
    """))
    ffn = MOE[1]
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), ffn],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert ran.returncode == 0, ran.stderr
    # steps 1-2 in two processes with expert parallelism (above), 3-4 in one process, then 5-6 in two processes with expert parallelism again
    summary = train(Config.load(tiny, [ffn]), tmp_path / "moved", resume=True, stop_after=4)
    assert summary["steps"] == 4
    back = _routelab("train", str(tiny), *MOE, "--nproc", "2", "--set", "train.expert_parallel=2", "--resume",
                     "--out", str(tmp_path / "moved"), "--no-sample")
    assert back.returncode == 0, back.stderr
    _assert_same_params(tmp_path / "straight" / "model" / "model.safetensors", tmp_path / "moved" / "model" / "model.safetensors")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.expert_parallel=2"], "train.expert_parallel=2 spreads experts over processes, but this is one process"),
        (["--nproc", "2", "--set", "train.expert_parallel=3"], "train.expert_parallel=3 is invalid with 2 processes"),
        (["--nproc", "2", "--set", "train.expert_parallel=2", "--set", "model.ffn.num_experts=3"],
         "train.expert_parallel=2 is invalid: it must divide model.ffn.num_experts=3"),
    ],
)
def test_bad_expert_parallel_settings_fail_before_training(tiny, tmp_path, args, message):
    """(Routers that rank the whole batch are refused too: tests/moe/test_parallel.py.)"""
    ran = _routelab("train", str(tiny), *MOE, *args, "--out", str(tmp_path / "run"), "--no-sample")
    assert ran.returncode == 2
    errors = [line for line in ran.stderr.splitlines() if line.startswith("routelab: error:")]
    assert len(errors) >= 1 and "Traceback" not in ran.stderr
    assert message in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()
