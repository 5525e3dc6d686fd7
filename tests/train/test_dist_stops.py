"""A distributed run stopped from outside, in real processes on loopback (gloo, ``routelab train
--nproc 2``): a process that stops answering (SIGSTOP) ends an expert-parallel run once
``train.dist_timeout`` has passed, processes whose launcher was killed (SIGKILL) end with it, and an
interrupted run (SIGINT, SIGTERM) ends with one line and resumes from its checkpoint. Then the checks
that refuse a bad ``--nproc`` or expert split before any process starts."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from routelab.cli import main
from routelab.config import Config
from routelab.errors import ConfigError
from routelab.io import load_state_dict
from routelab.moe.parallel import expert_groups
from routelab.train.checkpoint import MODEL_FILE, newest_intact_checkpoint
from routelab.train.run import preflight
from tests.train.test_dist_failures import _config, _logged_steps, _stderr, _wait_until
from tests.train.test_distributed import MOE, ROOT, _env

DIST_TIMEOUT = 8  # seconds; every collective, the expert-parallel all-to-alls included, gives up after it


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's processes (its children whose environment holds RANK)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher:  # field 4: the parent's pid
                env = dict(v.split(b"=", 1) for v in (stat.parent / "environ").read_bytes().split(b"\0") if b"=" in v)
                if b"RANK" in env:
                    found[int(env[b"RANK"])] = int(stat.parent.name)
    return found


def _alive(pid: int) -> bool:
    """Running, stopped or sleeping; not ended (gone, or a zombie waiting for whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _launched(out: Path, *args: str) -> Iterator[tuple[subprocess.Popen, dict[int, int]]]:
    """``routelab train ... --nproc 2`` in the background once it has logged 3 steps, with its processes'
    pids; the launcher and its processes are killed at the end if still there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "routelab", "train", *args, "--nproc", "2", "--out", str(out), "--no-sample"],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=ROOT, start_new_session=True)
    workers: dict[int, int] = {}
    try:
        _wait_until(lambda: len(_logged_steps(out)) >= 3, proc, out, "3 logged steps")
        workers.update(_workers(proc.pid))
        assert sorted(workers) == [0, 1], workers
        yield proc, workers
    finally:
        for pid in [proc.pid, *workers.values()]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _errors(out: Path) -> list[str]:
    return [line for line in _stderr(out).splitlines() if "error" in line.lower()]


def test_a_stopped_process_ends_an_expert_parallel_run_after_dist_timeout(tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0 waits in a collective, often an all-to-all of the
    expert-parallel group, for train.dist_timeout, says so and exits; the launcher then ends rank 1
    (continued, so that its SIGTERM acts at once). Before, the groups of expert parallelism waited
    torch's default 30 minutes."""
    cfg, out = _config(tmp_path, steps=5000, checkpoint_every=0, dist_timeout=DIST_TIMEOUT), tmp_path / "run"
    with _launched(out, str(cfg), *MOE, "--set", "train.expert_parallel=2") as (proc, workers):
        os.kill(workers[1], signal.SIGSTOP)
        status = proc.wait(timeout=DIST_TIMEOUT + 25)  # a hang fails here
        stopped_at = _logged_steps(out)[-1]
        assert not any(_alive(pid) for pid in workers.values())
    assert status == 1, _stderr(out)
    assert _errors(out) == [
        _errors(out)[0],
        "routelab: error: process 0 of 2 exited with status 1; its error is above",
    ], _stderr(out)
    assert _errors(out)[0].startswith("routelab: error: rank 0: another process did not answer within train.dist_timeout (")
    assert "Traceback" not in _stderr(out) and stopped_at < 5000


def test_the_processes_end_with_a_killed_launcher(tmp_path):
    """The launcher SIGKILLed (it can pass nothing on): its processes, in sessions of their own, end
    too, instead of training on unseen."""
    cfg, out = _config(tmp_path, steps=5000, checkpoint_every=0), tmp_path / "run"
    with _launched(out, str(cfg)) as (proc, workers):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers.values() if _alive(pid)], f"still training after 15 s:\n{_stderr(out)}"


@pytest.mark.parametrize(
    "sig, status, line",
    [
        (signal.SIGINT, 130, "routelab: interrupted; a training run continues from its last checkpoint with --resume"),
        (signal.SIGTERM, 143, "routelab: stopped by SIGTERM; a training run continues from its last checkpoint with --resume"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_an_interrupted_run_ends_with_one_line_and_resumes(tmp_path, sig, status, line):
    """The signal to the launcher (SIGINT also to its processes, as Ctrl-C in a terminal may): it
    stops them and says so in one line; the newest checkpoint is intact and the run resumes from it."""
    cfg, out = _config(tmp_path, steps=5000, checkpoint_every=10), tmp_path / "run"
    with _launched(out, str(cfg)) as (proc, workers):
        _wait_until(lambda: any((out / "checkpoints").glob("step_*/state.json")), proc, out, "checkpoint")
        for pid in [proc.pid, *(workers.values() if sig == signal.SIGINT else ())]:
            os.kill(pid, sig)
        assert proc.wait(timeout=30) == status, _stderr(out)
        assert not any(_alive(pid) for pid in workers.values())
    lines = _stderr(out).splitlines()
    assert lines[-1] == line and "Traceback" not in _stderr(out) and _errors(out) == [], _stderr(out)
    assert sum("interrupted" in x or "stopped by" in x for x in lines) == 1, _stderr(out)
    ckpt, damaged = newest_intact_checkpoint(out)
    assert ckpt is not None and not damaged
    assert load_state_dict(ckpt / MODEL_FILE)
    step = int(ckpt.name.removeprefix("step_"))
    resumed = subprocess.run([sys.executable, "-m", "routelab", "train", str(cfg), "--resume", "--out", str(out), "--no-sample",
                              "--set", f"train.steps={step + 2}"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {step})" in resumed.stderr and _logged_steps(out)[-2:] == [step + 1, step + 2]


# -- the pieces, in one process ------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -2])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_nproc_below_one_is_refused(tmp_path, capsys, command, n):
    config = str(_config(tmp_path)) if command == "train" else "compare-lm"
    assert main([command, config, "--nproc", str(n), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"routelab: error: --nproc {n} is invalid; allowed: 1 or more (the number of processes on this machine)"]
    assert not (tmp_path / "run").exists()


def test_an_expert_split_that_does_not_divide_the_experts_is_refused_before_processes_start(tmp_path, capsys):
    sets = [MOE[1], "train.expert_parallel=2", "model.ffn.num_experts=3"]
    with pytest.raises(ConfigError, match=r"^train.expert_parallel=2 is invalid: it must divide model.ffn.num_experts=3$"):
        preflight(Config.load(_config(tmp_path), sets), 2)
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", str(_config(tmp_path)), *args, "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["routelab: error: train.expert_parallel=2 is invalid: it must divide model.ffn.num_experts=3"], err


def test_expert_parallel_groups_carry_the_timeout():
    """Their collectives give up after ``timeout_s`` (train.dist_timeout), not torch's default 30 minutes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=9))
    try:
        groups = expert_groups(1, 0, 1, timeout_s=7)
        assert groups.group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "then, ended_by",
    [
        ("time.sleep(30)", signal.SIGTERM),  # its launcher is not its parent: it ended (the watching thread)
        ("os.kill(os.getpid(), signal.SIGINT); time.sleep(30)", signal.SIGINT),  # Ctrl-C: at once, without a word
    ],
    ids=["launcher-gone", "SIGINT"],
)
def test_a_launched_process_ends_with_its_launcher_and_quietly_on_sigint(then, ended_by):
    code = ("import os, signal, time\nfrom routelab.train.distributed import end_with_launcher\n"
            f"end_with_launcher({'os.getpid()' if ended_by == signal.SIGTERM else 'None'})\n{then}\n")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=25)
    assert ran.returncode == -ended_by and ran.stderr == ""
