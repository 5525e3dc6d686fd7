"""A run folder written by the trainer before it was split into setup/step/export (commit dae0d57,
``tests/fixtures/old_run_dae0d57``: a tiny MoE LM stopped after its step-4 checkpoint of 8) resumes
with today's code and continues as an uninterrupted 8-step run of today's code does: the same
``metrics.jsonl`` values for steps 5-8 (clocks aside) and the same final weights.

On the CPU that wrote the fixture (one thread: the config sets ``train.threads: 1``) all of it is
bitwise equal. Another CPU's kernels may round the last bits differently (AVX2 against AVX-512), so
values are compared to a relative 1e-5: a checkpoint missing a part (the optimizer's moments, the RNG)
moves the losses by far more (``test_resuming_without_the_old_optimizer_state_differs``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from routelab.cli import main
from routelab.io import load_state_dict
from routelab.train import read_metrics
from routelab.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, list_checkpoints
from tests.train.test_resume_metrics import CLOCKS

RTOL = 1e-5

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "old_run_dae0d57"
OLD_CKPT = Path("run") / "checkpoints" / "step_0000004"
TRAIN = ["train", "config.yaml", "--no-sample"]  # data.source is corpus.txt, relative to the working directory


def _copy_fixture(dest: Path) -> Path:
    shutil.copytree(FIXTURE, dest, dirs_exist_ok=True)
    return dest


def _lines(run_dir: Path, steps: range) -> list[dict]:
    """The metrics records of ``steps`` without their clocks."""
    return [{k: v for k, v in r.items() if k not in CLOCKS} for r in read_metrics(run_dir) if r["step"] in steps]


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=1e-6, msg=f"parameter {name} differs")


def assert_close_lines(old: list[dict], new: list[dict]) -> None:
    """Metrics records equal key by key (``old``'s keys: today's records add some), numbers to RTOL."""
    assert len(old) == len(new)
    for a, b in zip(old, new):
        for k, v in a.items():
            if isinstance(v, float):
                assert math.isclose(v, b[k], rel_tol=RTOL, abs_tol=1e-7), (k, a, b)
            else:
                assert v == b[k], (k, a, b)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Today's code, 8 steps in one go from scratch on the fixture's config (checkpoints at 4 and 8)."""
    work = _copy_fixture(tmp_path_factory.mktemp("straight"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert main([*TRAIN, "--out", "straight"]) == 0
    return work / "straight"


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture as the working directory; returns its run folder."""
    monkeypatch.chdir(_copy_fixture(tmp_path))
    return tmp_path / "run"


def test_old_steps_are_what_todays_code_computes(straight):
    """The premise of the comparison below: the old code's step-4 checkpoint (weights, AdamW moments)
    is the one today's code writes at step 4, and its steps 1-4 logged the same."""
    assert [s for s, _ in list_checkpoints(FIXTURE / "run")] == [4]
    ours = straight / "checkpoints" / "step_0000004"
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        assert_close_params(load_state_dict(FIXTURE / OLD_CKPT / name), load_state_dict(ours / name))
    old_lines = _lines(FIXTURE / "run", range(1, 5))
    assert len(old_lines) == 6  # 4 steps and the evaluations at 2 and 4
    assert_close_lines(old_lines, _lines(straight, range(1, 5)))


def test_old_checkpoint_resumes_as_an_uninterrupted_run(straight, old_run):
    old_ckpt = old_run.parent / OLD_CKPT
    before = {name: (old_ckpt / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)}
    assert main([*TRAIN, "--out", "run", "--resume"]) == 0
    assert_close_lines(_lines(straight, range(5, 9)), _lines(old_run, range(5, 9)))
    steps = [r["step"] for r in read_metrics(old_run) if "split" not in r]
    assert steps == list(range(1, 9))  # none twice, none missing
    assert_close_params(_final_weights(straight), _final_weights(old_run))
    # train.keep_checkpoints (2) keeps the old checkpoint beside the new one, and resuming only read it
    assert [s for s, _ in list_checkpoints(old_run)] == [4, 8]
    assert {name: (old_ckpt / name).read_bytes() for name in before} == before


def test_resuming_without_the_old_optimizer_state_differs(straight, old_run, monkeypatch):
    """Guards the test above: AdamW restarted with fresh moments (the weights and RNG still loaded)
    logs the same step-5 loss (computed before step 5's update) but losses from step 6 on that differ
    by over ten times the tolerance above (measured: about 1e-3 relative)."""
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, state_dict: None)
    assert main([*TRAIN, "--out", "run", "--resume"]) == 0
    resumed, ref = ({r["step"]: r["loss"] for r in read_metrics(d) if "split" not in r} for d in (old_run, straight))
    assert math.isclose(resumed[5], ref[5], rel_tol=RTOL)
    assert all(abs(resumed[s] - ref[s]) > 10 * RTOL * abs(ref[s]) for s in (6, 7, 8)), (resumed, ref)
