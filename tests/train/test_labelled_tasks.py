"""Training on the token-classification and stdlib tasks: a few steps train and evaluate, resumption
of a token-classification run is bitwise exact, ``routelab eval`` reads the runs back, and bad input
is one error line at the command line."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from routelab.cli import main
from routelab.train import evaluate, load_run, read_metrics, train

from .conftest import tiny_config
from .test_trainer import RESUME, assert_same_params, final_params, train_steps

WORDS = {"kw": ["if", "for", "while", "def"], "name": ["x", "y", "total", "items"], "num": ["1", "42", "7"], "op": ["+", "=", "("]}


@pytest.fixture(scope="module")
def tags_file(tmp_path_factory):
    """``tags.jsonl``: 200 rows of 2..6 words, each labelled with the class it was drawn from."""
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        labels = [rng.choice(sorted(WORDS)) for _ in range(rng.randint(2, 6))]
        rows.append({"tokens": [rng.choice(WORDS[y]) for y in labels], "labels": labels})
    path = tmp_path_factory.mktemp("tags") / "tags.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tok_cfg(source, *overrides):
    return tiny_config(source, "token_classification", list(overrides))


def test_token_file_run_learns_and_evaluates(tags_file, tmp_path):
    summary = train(tok_cfg(tags_file, "train.steps=30"), tmp_path)
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_accuracy"] > 0.6  # 4 classes: chance 0.25
    run = load_run(tmp_path, with_data=True)
    result = evaluate(run.model, run.data, run.cfg, "val", max_batches=0)
    words_in_val = sum(sum(y != -100 for y in labels) for _, labels in run.data.val)
    assert result["tokens"] == words_in_val and result["examples"] == len(run.data.val)  # one scored token per word


def test_token_resume_is_bitwise_identical(tags_file, tmp_path):
    cfg = tok_cfg(tags_file, *RESUME)
    straight = train(cfg, tmp_path / "straight")
    half = train(cfg, tmp_path / "resumed", stop_after=6)
    assert half["steps"] == 6 and not half["completed"]
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed["completed"] and resumed["val_loss"] == straight["val_loss"]
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
    assert train_steps(tmp_path / "resumed") == list(range(1, 13))


@pytest.mark.parametrize(
    ("source", "task", "overrides"),
    [
        ("stdlib-tokens", "token_classification", ["data.max_bytes=120000"]),
        ("stdlib-packages", "classification", ["data.val_fraction=0.1"]),
    ],
)
def test_stdlib_tasks_train_and_evaluate(source, task, overrides, tmp_path):
    cfg = tiny_config(source, task, ["train.steps=6", "train.eval_every=3", *overrides])
    summary = train(cfg, tmp_path)
    assert summary["completed"] and 0.0 <= summary["val_accuracy"] <= 1.0
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("split") == "val"] == [3, 6]
    run = load_run(tmp_path, with_data=True)
    test = evaluate(run.model, run.data, run.cfg, "test", max_batches=2)
    assert 0.0 <= test["accuracy"] <= 1.0 and test["loss"] > 0


def test_cli_eval_and_bad_input(tags_file, tmp_path, capsys):
    cfg = tok_cfg(tags_file, "train.steps=3").to_dict()
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "tok.yaml"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"loss", "accuracy", "examples", "tokens"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "b"], "labels": ["x"]}) + "\n")
    for overrides, message in [
        (["data.source=" + str(bad)], "has 2 words but 1 labels"),
        (["model.head=classification"], "data.task"),
        (["data.source=stdlib-packages"], "is a 'classification' task"),
    ]:
        code = main(["train", str(tmp_path / "tok.yaml"), "--out", str(tmp_path / "bad_run"), *[a for o in overrides for a in ("--set", o)]])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("routelab: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
