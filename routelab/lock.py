"""One writer per folder: an exclusive, advisory lock held for a run's (or a comparison's) life.

Two ``routelab train --out DIR`` started together, or a ``--resume`` started while another process
trains in DIR, would otherwise both write the same checkpoints, metrics and model. The writer holds
``DIR/.routelab.lock`` with ``flock(LOCK_EX | LOCK_NB)``; the file records who holds it (pid, host,
command, start time), so a second writer refuses in one line naming the holder.

A lock dies with its process, however it ends (an exception, Ctrl-C, SIGKILL, the out-of-memory
killer): the kernel drops a dead process's ``flock``, so a lock file left behind by a dead process is
stale by construction and the next writer takes it over. The holder removes the file on release;
a writer that locked a file which was removed meanwhile (its inode is no longer the path's) retries
on the new file, so two writers never hold two different files of one path. Where ``fcntl`` does
not exist (Windows), the file is created with ``O_EXCL`` instead and a file whose holder is on this
host and no longer alive (``os.kill(pid, 0)``) is stale and replaced.

A child process can be told that its parent holds the lock (``HELD_ENV``: the launcher of a
``--nproc`` run holds it while torch's launcher starts, restarts and stops its processes).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".routelab.lock"
HELD_ENV = "ROUTELAB_LOCK_HELD"  # "<folder>" whose lock this process's launcher holds for it


class FolderBusyError(ValueError):
    """Another live process holds the folder's lock; the message names it."""


def holder_record(what: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": what,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe_holder(path: Path) -> str:
    """``pid 4242 on host-a (routelab train, since 2026-12-07T10:00:00+00:00)`` from a lock file."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


def _alive_here(record: dict) -> bool:
    """Whether the holder named in ``record`` may still run (another host: assume so)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, KeyError, ValueError, TypeError):
        return True
    return True


class FolderLock:
    """The exclusive lock on ``folder`` (created if missing). ``acquire`` raises ``FolderBusyError``
    naming the holder when another live process has it; ``release`` is safe to call at any time."""

    def __init__(self, folder: str | Path, what: str = "routelab") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._token: str | None = None  # O_EXCL fallback: the record we wrote

    @property
    def held(self) -> bool:
        return self._fd is not None or self._token is not None

    def acquire(self) -> FolderLock:
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        (self._acquire_flock if fcntl is not None else self._acquire_exclusive)()
        return self

    def _busy(self) -> FolderBusyError:
        return FolderBusyError(
            f"folder {str(self.folder)!r} is in use by {describe_holder(self.path)}; wait for it to finish, stop it,"
            " or choose another --out"
        )

    def _acquire_flock(self) -> None:
        for _ in range(100):  # a holder may release (and remove the file) between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy() from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder removed on release: try the path's new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder_record(self.what)) + "\n").encode())
            self._fd = fd
            return
        raise self._busy()

    def _acquire_exclusive(self) -> None:
        record = holder_record(self.what)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    held = {}
                if isinstance(held, dict) and held and not _alive_here(held):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its holder died without releasing
                    continue
                raise self._busy() from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._token = json.dumps(record)
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()  # while still locked: a waiting writer then retries on a new file
            os.close(self._fd)
            self._fd = None
        elif self._token is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.dumps(json.loads(self.path.read_text(encoding="utf-8"))) == self._token:
                    self.path.unlink()
            self._token = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_by_launcher(folder: str | Path) -> bool:
    """Whether this process's launcher told it (``HELD_ENV``) that it holds ``folder``'s lock."""
    held = os.environ.get(HELD_ENV)
    return bool(held) and Path(held).resolve() == Path(folder).resolve()


@contextlib.contextmanager
def locked(folder: str | Path, what: str | None = None, enabled: bool = True) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s lock for the block (nothing when not ``enabled`` or already held by the launcher)."""
    if not enabled or held_by_launcher(folder):
        yield None
        return
    lock = FolderLock(folder, what or f"routelab {' '.join(sys.argv[1:2]) or 'python'}")
    with lock:
        yield lock

