"""A process of a distributed run killed mid-step (SIGKILL, as the out-of-memory killer sends), in real
processes on loopback (gloo, ``routelab train --nproc 2``): the run ends at once with one line naming
the process and the signal, and no traceback from the processes that survived it; with
``--max-restarts`` the launcher starts them all again and the run resumes from its newest checkpoint
(or starts again without one) to the model an uninterrupted run trains."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from routelab.cli import describe_exit, first_failure, main, without_launch_options
from routelab.io import load_state_dict
from routelab.train import read_metrics
from routelab.train.distributed import LOST_PEER_STATUS, collective_failure, restart_count
from tests.train.test_distributed import ROOT, TINY, _env

STEPS = 300  # a few seconds of training: a kill after the first checkpoint (step 10) lands well before the end


def _config(tmp_path: Path, **train) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    cfg = json.loads(json.dumps(TINY).replace("SOURCE", str(corpus)))
    cfg["train"].update({"steps": STEPS, "eval_every": 100, **train})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def _training(out: Path, *args: str) -> Iterator[subprocess.Popen]:
    """``routelab train ... --nproc 2`` in the background (stderr to ``out``.stderr); killed if the test fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "routelab", "train", *args, "--nproc", "2", "--out", str(out), "--no-sample"],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=ROOT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stderr(out: Path) -> str:
    return Path(f"{out}.stderr").read_text()


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, out: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}:\n{_stderr(out)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{_stderr(out)}"
        time.sleep(0.02)


def _kill_rank(launcher: int, rank: int) -> None:
    """SIGKILL the worker of ``rank``: a child of the launcher (torch.distributed.run starts them) whose
    environment holds RANK=rank. Fails if there is none (the run ended before the kill)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:  # field 4: the parent's pid
                continue
            if f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                os.kill(int(stat.parent.name), signal.SIGKILL)  # ProcessLookupError (a failure) if it just ended
                return
    pytest.fail(f"no process of rank {rank} under the launcher (pid {launcher}) to kill")


def _logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "split" not in r] if (out / "metrics.jsonl").is_file() else []


@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_process_ends_the_run_with_one_line_naming_it(tmp_path, rank):
    """Its peers' collectives fail ('Connection closed by peer'): they wait for the launcher to stop
    them without a word, and the launcher names the killed one. No hang, no traceback."""
    cfg, out = _config(tmp_path, steps=5000, checkpoint_every=0), tmp_path / "run"
    with _training(out, str(cfg)) as proc:
        _wait_until(lambda: len(_logged_steps(out)) >= 3, proc, out, "3 logged steps")
        _kill_rank(proc.pid, rank)
        status = proc.wait(timeout=60 + 60)  # train.dist_timeout + a margin: a hang fails here
    stderr = _stderr(out)
    assert status == 1, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"routelab: error: process {rank} of 2 was killed by signal SIGKILL (9), e.g. by the out-of-memory"
                      " killer; the other processes were stopped"], stderr
    assert "Traceback" not in stderr
    assert _logged_steps(out)[-1] < 5000 and not (out / "model").exists()  # it was stopped mid-run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The model of the restart tests' config trained in 2 processes without a failure."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "run"
    with _training(out, str(_config(tmp))) as proc:
        assert proc.wait(timeout=300) == 0, _stderr(out)
    return out / "model" / "model.safetensors"


@pytest.mark.parametrize("checkpointed", [True, False], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_max_restarts_resumes_from_the_newest_checkpoint(tmp_path, uninterrupted, checkpointed):
    """rank 1 SIGKILLed mid-run under --max-restarts 1: the launcher says so and starts both processes
    again; they resume from the newest checkpoint (or, before the first, start again in the same
    folder) and end with the model of the uninterrupted run, bitwise, and each step logged once."""
    cfg, out = _config(tmp_path, checkpoint_every=10 if checkpointed else 0), tmp_path / "run"
    with _training(out, str(cfg), "--max-restarts", "1") as proc:
        if checkpointed:
            _wait_until(lambda: any((out / "checkpoints").glob("step_*/state.json")), proc, out, "checkpoint")
        else:
            _wait_until(lambda: len(_logged_steps(out)) >= 3, proc, out, "3 logged steps")
        _kill_rank(proc.pid, 1)
        status = proc.wait(timeout=300)
    stderr = _stderr(out)
    assert status == 0, stderr
    assert ("routelab: warning: process 1 of 2 was killed by signal SIGKILL (9), e.g. by the out-of-memory killer;"
            " restarting the 2 processes (restart 1 of 1), from the newest checkpoint") in stderr
    if checkpointed:
        assert f"routelab: restart 1 after a failure: resuming from the newest intact checkpoint in {out}" in stderr
        resumed = [line for line in stderr.splitlines() if line.startswith("routelab: resuming from")]
        assert len(resumed) == 1 and int(resumed[0].split("(step ")[1].split(")")[0]) < STEPS, stderr
    else:
        assert "routelab: restart 1 after a failure: no checkpoint yet, starting again" in stderr
        assert "resuming from" not in stderr
    assert "Traceback" not in stderr and "routelab: error" not in stderr
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    a, b = load_state_dict(uninterrupted), load_state_dict(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


# -- the pieces, without processes ------------------------------------------------------------


def test_exit_descriptions_name_the_signal():
    assert describe_exit(1, 2, -9) == "process 1 of 2 was killed by signal SIGKILL (9), e.g. by the out-of-memory killer"
    assert describe_exit(3, 4, -11) == "process 3 of 4 was killed by signal SIGSEGV (11)"
    assert describe_exit(0, 2, -200) == "process 0 of 2 was killed by signal 200"
    assert describe_exit(0, 2, 2) == "process 0 of 2 exited with status 2; its error is above"


@pytest.mark.parametrize(
    "exitcodes, first",
    [
        ({0: -15, 1: -9}, 1),  # killed; the launcher stopped the other (SIGTERM)
        ({0: LOST_PEER_STATUS, 1: -9}, 1),  # killed; the other noticed first
        ({0: -9, 1: LOST_PEER_STATUS, 2: -15, 3: -15}, 0),
        ({0: -15, 1: 2}, 1),  # rank 1's own error (its line is above)
        ({0: 2, 1: 2}, 0),  # rank 0 failed a step it does alone; the others follow it with status 2
        ({0: 1, 1: -9}, 0),  # rank 0 timed out (status 1) waiting for rank 1, which hung: the launcher killed it
        ({0: LOST_PEER_STATUS, 1: -15}, 1),  # stopped from outside (SIGTERM): the one that did not merely follow
    ],
)
def test_the_report_names_the_process_that_failed_first(exitcodes, first):
    assert first_failure(exitcodes) == first


def test_collective_failures_are_told_from_other_errors():
    closed = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
                          " [127.0.0.1]:15576. This is typically caused by a remote worker crashing. Check the logs")
    failure = collective_failure(closed)
    assert failure is not None and failure.detail == "Connection closed by peer [127.0.0.1]:15576" and not failure.timed_out
    timeout = RuntimeError("[/__w/.../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 10000ms for send operation to complete")
    assert collective_failure(timeout).timed_out
    assert collective_failure(torch.distributed.DistNetworkError("Broken pipe")) is not None
    assert collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x5)")) is None
    assert collective_failure(KeyError("gloo")) is None


def test_launch_options_stay_with_the_launcher(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--max-restarts K" in capsys.readouterr().out
    argv = ["cfg.yaml", "--nproc", "2", "--max-restarts=3", "--set", "train.steps=5", "--max-restarts", "1", "--nproc=4"]
    assert without_launch_options(argv) == ["cfg.yaml", "--set", "train.steps=5"]
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2


@pytest.mark.parametrize("args", [["--max-restarts", "1"], ["--nproc", "1", "--max-restarts", "1"]])
def test_max_restarts_without_processes_to_restart_is_refused(tmp_path, capsys, args):
    assert main(["train", str(_config(tmp_path)), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("routelab: error: --max-restarts 1 needs --nproc N with N > 1"), err
    assert not (tmp_path / "run").exists()
