"""Every failure a user can cause at the command line: exit status 2, exactly one line on stderr
naming what was wrong, no traceback, and no file of a finished run removed or changed.

Each case copies a finished tiny run, damages or points at it as a user might, runs one command,
and checks the run folder byte for byte afterwards (files the case damaged on purpose included).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from routelab.cli import main

TINY = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "SOURCE", "seq_len": 32, "val_fraction": 0.2},
    "train": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_batches": 2, "progress": False, "log_every": 2,
              "checkpoint_every": 3},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished LM run (checkpoints at steps 3 and 6, model/, summary.json) and its config."""
    return train_finished(tmp_path_factory.mktemp("finished"))


def train_finished(root: Path) -> Path:
    """``root/tiny.yaml`` (TINY on a small corpus) trained to the end into ``root/run``; returns ``root``."""
    corpus = root / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 60)
    (root / "tiny.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(TINY).replace("SOURCE", str(corpus)))))
    assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "run"), "--no-sample"]) == 0
    return root


def refused(argv: list[str], capsys, message: str) -> str:
    """Run ``routelab argv``: exit 2, exactly one error line matching ``message``, no traceback; the line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("routelab: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, lines[0]), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:64])


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _no_model(run: Path) -> None:  # an unfinished run: only checkpoints
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()


# name -> (prepare the copied run folder, arguments with RUN / CFG / TMP placeholders, expected message)
CASES: dict[str, tuple[Callable[[Path], None] | None, list[str], str]] = {
    "eval-unknown-device": (None, ["eval", "RUN", "--device", "tpu"], r"--device='tpu' is invalid .*allowed: 'auto', 'cpu'"),
    "generate-unknown-device": (None, ["generate", "RUN", "--prompt", "def ", "--device", "tpu"], r"--device='tpu' is invalid"),
    "inspect-unknown-device": (None, ["inspect", "RUN", "--out", "TMP/inspect", "--device", "gpu0"], r"--device='gpu0' is invalid"),
    "import-check-unknown-device": (None, ["import", "hf", "TMP", "--out", "TMP/imported", "--check", "--device", "tpu"],
                                    r"--device='tpu' is invalid"),
    "resume-all-checkpoints-damaged": (
        lambda r: [_truncate(_ckpt(r, s) / "model.safetensors") for s in (3, 6)],
        ["train", "CFG", "--out", "RUN", "--resume", "--set", "train.steps=9", "--no-sample"],
        r"no intact checkpoint.*step_0000006/model.safetensors",
    ),
    "eval-damaged-checkpoint": (
        lambda r: (_no_model(r), _truncate(_ckpt(r, 6) / "model.safetensors")),
        ["eval", "RUN"], r"step_0000006/model.safetensors' is damaged",
    ),
    "generate-damaged-checkpoint": (
        lambda r: (_no_model(r), (_ckpt(r, 6) / "model.safetensors").write_bytes(b"\0" * 200)),
        ["generate", "RUN", "--prompt", "def "], r"step_0000006/model.safetensors' is damaged",
    ),
    "eval-damaged-final-model": (
        lambda r: _truncate(r / "model" / "model.safetensors"), ["eval", "RUN"], r"model/model.safetensors' is damaged",
    ),
    "malformed-state-json": (
        lambda r: (_no_model(r), (_ckpt(r, 6) / "state.json").write_text("{not json")),
        ["eval", "RUN"], r"step_0000006/state.json' is damaged.*not valid JSON",
    ),
    "malformed-model-config-json": (
        lambda r: (r / "model" / "config.json").write_text("{"), ["eval", "RUN"], r"model/config.json' is damaged.*not valid JSON",
    ),
    "malformed-run-config-yaml": (
        lambda r: (r / "config.yaml").write_text("model: {d_modle: 3}\n"), ["eval", "RUN"], r"config.yaml.*did you mean 'd_model'",
    ),
    "config-json-does-not-match-weights": (
        lambda r: _edit_json(r / "model" / "config.json", n_layers=3), ["eval", "RUN"], r"do not match.*config.json.*missing",
    ),
    "huge-size-in-config-json": (
        lambda r: _edit_json(r / "model" / "config.json", vocab_size=10**12),
        ["generate", "RUN", "--prompt", "a"], r"tok_emb.weight is \(\d+, 32\) in the file but \(1000000000000, 32\)",
    ),
    "inspect-empty-text": (None, ["inspect", "RUN", "--text", ""], r"--text is empty"),
    "inspect-example-out-of-range": (None, ["inspect", "RUN", "--example", "100000"], r"--example 100000 is out of range"),
    "inspect-example-negative": (None, ["inspect", "RUN", "--example", "-1"], r"--example -1 is out of range"),
    "inspect-out-is-a-file": (None, ["inspect", "RUN", "--text", "a", "--out", "TMP/file"], r"existing file"),
    "train-out-is-a-file": (None, ["train", "CFG", "--out", "TMP/file"], r"'.*/file' is an existing file"),
    "train-out-under-a-file": (None, ["train", "CFG", "--out", "TMP/file/run"], r"cannot create.*is a file"),
    "compare-out-is-a-file": (None, ["compare", "compare-lm", "--out", "TMP/file"], r"existing file"),
    "data-listops-out-is-a-file": (None, ["data", "listops", "--out", "TMP/file"], r"existing file"),
    "fresh-train-over-finished-run": (None, ["train", "CFG", "--out", "RUN"], r"already holds.*--resume"),
    "nan-loss": (
        None, ["train", "CFG", "--out", "TMP/nan", "--set", "model.init_std=1e30", "--no-sample"],
        r"at step 1\. Try a lower train.lr.*skip_nonfinite=true",
    ),
    "compare-budget-through-set": (
        None, ["compare", "compare-lm", "--out", "TMP/cmp", "--set", "train.steps=5"], r"train.steps.*--steps",
    ),
    "corpus-split-shorter-than-seq-len": (
        None, ["train", "CFG", "--out", "TMP/short", "--set", "data.val_fraction=0.01"],
        r"the validation split of data.source='.*corpus.txt' has \d+ tokens, fewer than data.seq_len \+ 1 = 33",
    ),
    "binary-corpus": (
        lambda r: (r.parent / "blob.txt").write_bytes(b"\x7fELF\x00\x01" * 100),
        ["train", "CFG", "--out", "TMP/bin", "--set", "data.source=TMP/blob.txt"], r"blob.txt' looks binary",
    ),
    "listops-lengths-out-of-reach": (
        None, ["data", "listops", "--out", "TMP/lo", "--set", "listops_min_len=5000", "--set", "listops_max_len=6000"],
        r"listops lengths 5000\.\.6000 are out of reach.*lower listops_min_len to <= \d+",
    ),
    "upcycle-not-a-run-folder": (
        lambda r: (r.parent / "notrun").mkdir(), ["upcycle", "TMP/notrun", "--out", "TMP/up"], r"is not a run folder \(config.yaml\) nor a saved model folder",
    ),
    "upcycle-incompatible-size": (
        None, ["upcycle", "RUN", "--out", "TMP/up", "--set", "model.d_model=64"],
        r"model\.d_model is 32 in the source but 64 in the target; what may change: model\.ffn",
    ),
    "upcycle-moe-experts-narrower": (
        None, ["upcycle", "RUN", "--out", "TMP/up", "--set", "model.ffn.kind=moe", "--set", "model.ffn.hidden=16"],
        r"FFN width is 128 in the source but 16 in the target.*model\.ffn\.hidden=128",
    ),
    "upcycle-out-is-the-run": (None, ["upcycle", "RUN", "--out", "RUN"], r"--out .* is the source folder"),
    "train-init-from-not-a-run": (
        None, ["train", "CFG", "--out", "TMP/new", "--init-from", "TMP/file", "--no-sample"],
        r"train\.init_from: '.*/file' is not a run folder",
    ),
    "train-init-from-other-size": (
        None, ["train", "CFG", "--out", "TMP/new", "--init-from", "RUN", "--set", "model.n_layers=2", "--no-sample"],
        r"train\.init_from=.*model\.n_layers is 1 in the source but 2 in the target",
    ),
    "compare-unknown-reference": (
        None, ["compare", "compare-lm", "--out", "TMP/cmp", "--reference", "nope"], r"compare\.reference='nope' is invalid.*variant names",
    ),
    "train-init-from-checked-with-the-config": (  # --init-from is set before validation, like --set
        None, ["train", "multitask-tiny", "--out", "TMP/new", "--init-from", "RUN", "--no-sample"],
        r"train\.init_from=.* is invalid.*null in a multi-task run",
    ),
    "export-not-a-run": (None, ["export", "TMP", "--out", "TMP/m"], r"is not a routelab run folder: config.yaml is missing"),
    "export-no-checkpoint": (
        lambda r: shutil.rmtree(r / "checkpoints"), ["export", "RUN", "--out", "TMP/m"],
        r"holds no complete checkpoint.*its model/ folder is already a saved model",
    ),
    "export-unknown-step": (None, ["export", "RUN", "--out", "TMP/m", "--checkpoint", "4"], r"no checkpoint at step 4; its checkpoints: 3, 6"),
    "export-bad-step": (None, ["export", "RUN", "--out", "TMP/m", "--checkpoint", "newest"], r"--checkpoint 'newest' is invalid"),
    "export-damaged-checkpoint": (
        lambda r: _truncate(_ckpt(r, 6) / "model.safetensors"), ["export", "RUN", "--out", "TMP/m"],
        r"step_0000006/model.safetensors' is damaged",
    ),
    "export-out-is-the-run": (None, ["export", "RUN", "--out", "RUN"], r"--out .* contains the checkpoint"),
    "export-out-is-a-file": (None, ["export", "RUN", "--out", "TMP/file"], r"existing file"),
    "tensorboard-missing": (
        None, ["train", "CFG", "--out", "TMP/tb", "--set", "train.tensorboard=true"], r"pip install tensorboard",
    ),
}
if importlib.util.find_spec("tensorboard") is not None:  # only testable where the package is absent
    del CASES["tensorboard-missing"]


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_and_keeps_the_run(finished, tmp_path, capsys, name):
    prepare, args, message = CASES[name]
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    if prepare is not None:
        prepare(run)
    (tmp_path / "file").write_text("not a folder")
    before = snapshot(run)
    subs = {"RUN": str(run), "CFG": str(finished / "tiny.yaml")}
    refused([subs.get(a, a.replace("TMP", str(tmp_path))) for a in args], capsys, message)
    assert snapshot(run) == before  # nothing of the run was removed or changed
    assert (tmp_path / "file").read_text() == "not a folder"


def test_generate_beyond_max_seq_len_says_so(finished, capsys):
    assert main(["generate", str(finished / "run"), "--prompt", "def ", "--max-new-tokens", "100", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "generating at most 28 of the 100 new tokens" in captured.err and "max_seq_len=32" in captured.err
    assert len(captured.out.rstrip("\n")) <= 32  # byte tokenizer: the prompt + 28 new bytes at most


def test_messages_the_run_emits_reach_stderr(finished, tmp_path, capsys):
    """Resuming and evaluation messages are logged, and shown by the CLI without a terminal."""
    shutil.copytree(finished / "run", tmp_path / "run")
    args = ["train", str(finished / "tiny.yaml"), "--out", str(tmp_path / "run"), "--resume", "--no-sample",
            "--set", "train.steps=8", "--set", "train.progress=true"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "routelab: resuming from" in err and "(step 6)" in err
    assert "routelab: step 8/8  loss" in err and "routelab: step 8 validation: loss" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", [["eval", "RUN"], ["generate", "RUN", "--prompt", "def "]])
def test_cuda_device_without_a_gpu_is_one_line(finished, capsys, command):
    argv = [str(finished / "run") if a == "RUN" else a for a in command]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("routelab: error:") == 1 and "Traceback" not in err
    assert "--device='cuda' but CUDA is not available" in err


def test_eval_and_generate_on_device_cpu(finished, capsys):
    run = str(finished / "run")
    assert main(["eval", run]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["eval", run, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == default  # the run's own device (auto) is the CPU here
    args = ["generate", run, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]
    assert main([*args, "--device", "cpu"]) == 0
    cpu = capsys.readouterr().out
    assert main(args) == 0
    assert cpu.startswith("def ") and capsys.readouterr().out == cpu


def test_eval_and_generate_take_a_dtype(finished, capsys):
    run = str(finished / "run")
    assert main(["eval", run, "--split", "val"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(["eval", run, "--split", "val", "--dtype", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["loss"] != fp32["loss"] and abs(bf16["loss"] / fp32["loss"] - 1) < 0.02  # rounded, not broken
    assert main(["generate", run, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    with pytest.raises(SystemExit) as e:
        main(["eval", run, "--dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
