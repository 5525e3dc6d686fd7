"""``routelab extract``: one task's model of a task-level MoE written as a run folder that eval and
generate read, equal to the multi-task model on that task."""

import json

import torch

from routelab.cli import main
from routelab.config import Config
from routelab.train.run import load_run

TASKS = ["prose", "code"]


def _multi_task_run(tmp_path, router="task"):
    """A two-task run (two LM tasks on two corpora, a task-level MoE), trained for two steps."""
    from routelab.train import train

    tmp_path.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, text in zip(TASKS, ("The cat sat on the mat. " * 80, "def add(a, b):\n    return a + b\n" * 60)):
        sources[name] = tmp_path / f"{name}.txt"
        sources[name].write_text(text)
    cfg = Config.from_dict({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                  "ffn": {"kind": "moe", "num_experts": 4, "router": {"kind": router, "top_k": 2}}},
        "data": {"seq_len": 32, "val_fraction": 0.2,
                 "tasks": [{"name": n, "source": str(sources[n]), "head": "lm"} for n in TASKS]},
        "train": {"steps": 2, "batch_size": 2, "eval_batches": 2, "progress": False, "warmup_steps": 1},
    })
    run = tmp_path / "multi"
    train(cfg, run)
    return run


def test_extract_writes_a_run_that_eval_and_generate_read(tmp_path, capsys):
    run = _multi_task_run(tmp_path)
    out = tmp_path / "code_only"
    assert main(["extract", str(run), "--task", "code", "--out", str(out)]) == 0
    assert "extracted task 'code'" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model", "tokenizer.json"]
    multi, small = load_run(run).model, load_run(out).model
    assert small.cfg.task_names == ["code"] and small.cfg.ffn.num_experts == 2
    x = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(small(x).logits, multi(x, task_ids=torch.tensor([1, 1])).logits, atol=1e-5, rtol=0)
    assert main(["eval", str(out)]) == 0
    assert "loss" in json.loads(capsys.readouterr().out)
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_extract_failures_are_one_line(tmp_path, capsys):
    run = _multi_task_run(tmp_path)
    topk = _multi_task_run(tmp_path / "topk", router="topk")
    capsys.readouterr()  # the training runs' own lines
    assert main(["extract", str(run), "--task", "poetry", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'poetry'; the model's tasks are: prose, code" in err and "\n" not in err
    assert main(["extract", str(topk), "--task", "code", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "route by task" in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
