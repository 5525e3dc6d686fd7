"""One writer per run folder (``routelab.lock``): a second run, resume, comparison or import into a folder
another live process writes is refused in one line naming the holder; a dead holder's lock is stale
and taken over, whether it died cleanly or by SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import routelab.lock as lock_module
from routelab.cli import main
from routelab.lock import LOCK_FILE, FolderBusyError, FolderLock
from tests.test_cli_failures import refused, snapshot
from tests.test_outputs import world  # noqa: F401  (the module fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path / "run", "routelab train"):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(FolderBusyError, match=rf"in use by pid {os.getpid()} on .*\(routelab train, since "):
            FolderLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released: removed
    FolderLock(tmp_path / "run").acquire().release()  # free again


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock and sleeps; returns once it holds it."""
    code = f"from routelab.lock import FolderLock; import time; FolderLock({str(folder)!r}, 'holder').acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_held_by_another_process_dies_with_it(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(FolderBusyError, match=rf"pid {proc.pid} .*\(holder"):
            FolderLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind by the killed holder: stale
    with FolderLock(tmp_path / "run", "next"):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["command"] == "next"


def test_without_flock_a_dead_holders_lock_is_stale(tmp_path, monkeypatch):
    """Where fcntl is missing (Windows): the lock file is made with O_EXCL; a record naming a process
    of this host that no longer runs is stale, one that runs (or of another host) holds."""
    monkeypatch.setattr(lock_module, "fcntl", None)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    for pid, host, busy in [(int(dead), socket.gethostname(), False), (os.getpid(), socket.gethostname(), True),
                            (int(dead), "another-host", True)]:
        (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "command": "x", "started": "t"}))
        if busy:
            with pytest.raises(FolderBusyError, match=f"pid {pid} on {host}"):
                FolderLock(run).acquire()
        else:
            lock = FolderLock(run).acquire()
            assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
            lock.release()
            assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("extra", [[], ["--resume"], ["--nproc", "2"]])
def test_training_into_a_folder_another_process_writes_isrefused(world, tmp_path, capsys, extra):  # noqa: F811
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    proc = _holder(run)
    try:
        before = snapshot(run)
        args = ["train", str(world / "tiny.yaml"), "--out", str(run), "--no-sample", "--set", "train.steps=9", *extra]
        refused(args, capsys, rf"folder '.*run' is in use by pid {proc.pid} on .*\(holder, since")
        assert snapshot(run) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(["train", str(world / "tiny.yaml"), "--out", str(run), "--no-sample", "--set", "train.steps=9", "--resume"]) == 0


def test_import_force_does_not_replace_a_run_in_training(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "imported"
    assert main(["import", "hf", str(world / "models" / "llama"), "--out", str(out)]) == 0
    with FolderLock(out, "routelab train"):
        before = snapshot(out)
        refused(["import", "hf", str(world / "models" / "llama"), "--out", str(out), "--force"], capsys,
                 r"folder '.*imported' is in use by pid .*routelab train")
        assert snapshot(out) == before


def test_a_second_training_started_while_one_trains_isrefused(world, tmp_path):  # noqa: F811
    """Real ``routelab train`` processes: while one trains in a folder, another into it exits 2 naming it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sys.executable, "-m", "routelab", "train", str(world / "tiny.yaml"), "--out", str(tmp_path / "run"), "--no-sample",
            "--set", "train.steps=1000000", "--set", "train.checkpoint_every=1000000"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").is_file():  # it holds the lock before it writes anything
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert second.returncode == 2, second.stderr
        assert re.search(rf"routelab: error: folder '.*run' is in use by pid {first.pid} .*routelab train", second.stderr)
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
        first.wait()
