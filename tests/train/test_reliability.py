"""A run is never lost: damaged checkpoints are detected and skipped, finished exports survive until
replaced, files respect the umask, non-finite losses stop or skip cleanly, progress is logged."""

import json
import logging
import os
import stat

import pytest

from routelab.io import DamagedFileError, load_state_dict
from routelab.model import RoutedTransformer
from routelab.train import RunError, load_run, read_metrics, train
from routelab.train import trainer as trainer_mod
from routelab.train.checkpoint import list_checkpoints
from routelab.train.trainer import NonFiniteError, progress_line
from tests.train.test_trainer import RESUME, assert_same_params, final_params, train_steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory, lm_cfg):
    out = tmp_path_factory.mktemp("straight")
    train(lm_cfg(*RESUME), out)
    return out


def _flip_last_byte(path):
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))


DAMAGE = {
    "truncated-model": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
    "flipped-optimizer": lambda c: _flip_last_byte(c / "optimizer.safetensors"),
    "garbled-state": lambda c: (c / "state.json").write_text('{"format": 1, "step": '),
    "missing-model": lambda c: (c / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(straight, lm_cfg, tmp_path, caplog, damage):
    cfg = lm_cfg(*RESUME)
    train(cfg, tmp_path, stop_after=6)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    DAMAGE[damage](tmp_path / "checkpoints" / "step_0000006")
    with caplog.at_level(logging.WARNING, logger="routelab.train"):
        summary = train(cfg, tmp_path, resume=True)
    assert summary["completed"]
    assert_same_params(final_params(straight), final_params(tmp_path))  # steps 5..12 redone exactly
    assert train_steps(tmp_path) == list(range(1, 13))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_0000006" in warning and "step_0000004" in warning
    assert (tmp_path / "checkpoints" / "step_0000006.damaged").is_dir()  # kept for the user, not deleted


def test_no_intact_checkpoint_names_the_damaged_file(lm_cfg, tmp_path):
    cfg = lm_cfg("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    train(cfg, tmp_path, stop_after=2)
    _flip_last_byte(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors")
    with pytest.raises(RunError, match=r"no intact checkpoint.*step_0000002/model.safetensors.*SHA-256"):
        train(cfg, tmp_path, resume=True)
    # eval/generate read the same checkpoint: one error naming the file, not a safetensors traceback
    with pytest.raises(DamagedFileError, match=r"step_0000002/model.safetensors"):
        load_run(tmp_path)


def test_a_finished_run_survives_a_failed_or_interrupted_resume(lm_cfg, tmp_path):
    train(lm_cfg("train.steps=4", "train.checkpoint_every=2"), tmp_path)
    model_bytes = (tmp_path / "model" / "model.safetensors").read_bytes()
    summary_text = (tmp_path / "summary.json").read_text()
    for ckpt in list_checkpoints(tmp_path):  # every checkpoint damaged: the resume must fail...
        (ckpt[1] / "state.json").write_text("{")
    with pytest.raises(RunError, match="no intact checkpoint"):
        train(lm_cfg("train.steps=8", "train.checkpoint_every=2"), tmp_path, resume=True)
    # ...and leave the finished export as it was
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == model_bytes
    assert (tmp_path / "summary.json").read_text() == summary_text


def test_an_interrupted_resume_keeps_the_previous_export(lm_cfg, tmp_path):
    train(lm_cfg("train.steps=4", "train.checkpoint_every=2"), tmp_path)
    before = (tmp_path / "summary.json").read_text()
    train(lm_cfg("train.steps=8", "train.checkpoint_every=2"), tmp_path, resume=True, stop_after=6)  # "killed" at 6
    assert (tmp_path / "summary.json").read_text() != before  # an unfinished summary...
    assert not json.loads((tmp_path / "summary.json").read_text())["completed"]
    assert RoutedTransformer.from_pretrained(tmp_path / "model")  # ...but the step-4 model is still whole
    summary = train(lm_cfg("train.steps=8", "train.checkpoint_every=2"), tmp_path, resume=True)
    assert summary["completed"] and summary["steps"] == 8


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_respect_the_umask(lm_cfg, tmp_path, umask):
    old = os.umask(umask)
    try:
        train(lm_cfg("train.steps=2"), tmp_path / "run")
    finally:
        os.umask(old)
    run = tmp_path / "run"
    ckpt = list_checkpoints(run)[-1][1]
    for path in [run / "summary.json", run / "config.yaml", run / "model" / "model.safetensors",
                 run / "model" / "config.json", ckpt / "model.safetensors", ckpt / "state.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for path in [run / "model", ckpt]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the loss of the given steps NaN, as an overflow would."""
    bad: set[int] = set()
    real_batch, real_forward = trainer_mod.micro_batch, RoutedTransformer.forward
    current = {}

    def batch(cfg, data, step, micro, perms, ctx=None):
        current["step"] = step
        return real_batch(cfg, data, step, micro, perms, ctx)

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and current.get("step") in bad and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "micro_batch", batch)
    monkeypatch.setattr(RoutedTransformer, "forward", forward)
    return bad


def test_nan_loss_stops_with_the_step_and_what_to_try(lm_cfg, tmp_path, nan_at_step):
    nan_at_step.add(3)
    with pytest.raises(NonFiniteError, match=r"loss is nan .* at step 3.*train\.lr.*skip_nonfinite=true.*step_0000002 with --resume"):
        train(lm_cfg("train.steps=5", "train.checkpoint_every=2"), tmp_path)
    # the advice works: resume from step 2 skipping such steps
    nan_at_step.clear()
    summary = train(lm_cfg("train.steps=5", "train.checkpoint_every=2", "train.skip_nonfinite=true"), tmp_path, resume=True)
    assert summary["completed"] and summary["skipped_steps"] == 0


def test_skip_nonfinite_drops_the_update_and_counts_it(lm_cfg, tmp_path, nan_at_step):
    nan_at_step.add(3)
    cfg = lm_cfg("train.steps=3", "train.skip_nonfinite=true")
    summary = train(cfg, tmp_path / "skip", stop_after=3)
    assert summary["skipped_steps"] == 1 and summary["final_train_loss"] is not None
    lines = [r for r in read_metrics(tmp_path / "skip") if "split" not in r]
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1]
    nan_at_step.clear()
    train(lm_cfg("train.steps=3"), tmp_path / "two", stop_after=2)  # the same run, stopped before step 3
    a = load_state_dict(list_checkpoints(tmp_path / "skip")[-1][1] / "model.safetensors")
    b = load_state_dict(list_checkpoints(tmp_path / "two")[-1][1] / "model.safetensors")
    assert_same_params(a, b)  # step 3 changed nothing


def test_skip_nonfinite_gives_up_when_every_step_is_nonfinite(lm_cfg, tmp_path, nan_at_step):
    nan_at_step.update(range(1, 100))
    with pytest.raises(NonFiniteError, match="in a row"):
        train(lm_cfg("train.steps=40", "train.skip_nonfinite=true"), tmp_path)


def test_progress_lines_without_a_terminal(lm_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="routelab.train"):
        train(lm_cfg("train.steps=4", "train.log_every=2", "train.progress=true"), tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split("  ")[0] for m in messages if m.startswith("step ") and "tok/s" in m] == ["step 2/4", "step 4/4"]
    assert any("validation: loss" in m for m in messages)


def test_progress_line_formats_the_eta(lm_cfg):
    cfg = lm_cfg("train.steps=300")
    assert progress_line(100, 300, 1.23456, 20518.2, 0.5, cfg, 50.0) == "step 100/300  loss 1.2346  20,518 tok/s  ETA 1m40s"
    assert progress_line(1, 30001, 1.0, 1.0, 0.5, cfg, 0.0).endswith("ETA 4h10m")
    budget = lm_cfg("train.steps=300", "train.max_seconds=60")
    assert progress_line(100, 300, 1.0, 1.0, 0.5, budget, 50.0).endswith("ETA 10s")  # the time budget ends first
