"""Start a command in N processes on this machine (``routelab train ... --nproc N``), through torch's
own launcher (``torch.distributed.run``, i.e. torchrun --standalone), and report how they ended in
routelab's words: one line naming the process that failed first, or that the run was interrupted.

The command line (``routelab.cli``) calls ``launch_local``; the processes it starts run the same
command without the launcher's options (``without_launch_options``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from routelab.errors import ConfigError
from routelab.lock import HELD_ENV
from routelab.train.distributed import LAUNCHER_VAR, LOST_PEER_STATUS, launched

log = logging.getLogger(__name__)


@contextlib.contextmanager
def launcher_holds(folder: Path):
    """Tell the processes started in this block that this process holds ``folder``'s lock."""
    os.environ[HELD_ENV] = str(folder.resolve())
    try:
        yield
    finally:
        os.environ.pop(HELD_ENV, None)


def process_rank() -> int:
    """This process's rank in a ``torchrun`` launch (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


LAUNCH_OPTIONS = ("--nproc", "--max-restarts")  # the launcher's; its processes get the rest of the command line


def without_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` and ``--max-restarts K`` / ``--max-restarts=K``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def describe_exit(rank: int, nproc: int, exitcode: int) -> str:
    """``process 1 of 2 was killed by signal SIGKILL (9), ...`` (exit codes below 0 are signals, as in
    ``subprocess``) or ``process 1 of 2 exited with status 2; its error is above``."""
    if exitcode >= 0:
        return f"process {rank} of {nproc} exited with status {exitcode}; its error is above"
    try:
        name = f"{signal.Signals(-exitcode).name} ({-exitcode})"
    except ValueError:
        name = str(-exitcode)
    why = ", e.g. by the out-of-memory killer" if -exitcode == signal.SIGKILL else ""
    return f"process {rank} of {nproc} was killed by signal {name}{why}"


def first_failure(exitcodes: Mapping[int, int]) -> int:
    """The rank whose failure ended a run, given each failed rank's exit code: not one that stopped
    because another ended (``LOST_PEER_STATUS``) or that the launcher stopped (SIGTERM) unless no other
    failed; the lowest such rank (rank 0 reports a step it does alone, the others follow it)."""
    def consequence(code: int) -> int:
        return {LOST_PEER_STATUS: 2, -signal.SIGTERM: 1}.get(code, 0)

    return min(exitcodes, key=lambda rank: (consequence(exitcodes[rank]), rank))


class _LauncherLog(logging.Filter):
    """Sits on two of torch's launcher loggers while ``launch_local`` runs: drops the line it logs for
    each failed attempt (the final report names the failed process in routelab's words), turns a
    restart (``--max-restarts``) into one warning naming what failed, and continues (SIGCONT) each
    process the launcher says it is stopping: one that was stopped (SIGSTOP) would otherwise act on the
    launcher's SIGTERM only when it kills it, 30 seconds later."""

    def __init__(self, nproc: int) -> None:
        super().__init__()
        self.nproc, self.failure = nproc, None

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Sending process") and record.args:  # its SIGTERM (or the interrupting signal) follows
            with contextlib.suppress(OSError, TypeError):  # it ended meanwhile
                os.killpg(record.args[0], signal.SIGCONT)  # each process leads a session and group of its own
            return False
        if msg.startswith("failed (exitcode") and len(record.args or ()) >= 2:
            self.failure = describe_exit(record.args[1], self.nproc, record.args[0])  # local rank = rank on one machine
            return False
        if "will restart worker group" in msg and len(record.args or ()) >= 4:
            remaining, total = record.args[2], record.args[3]
            what = (self.failure or "a process failed").removesuffix("; its error is above")
            print(f"routelab: warning: {what}; restarting the {self.nproc} processes (restart {total - remaining + 1} of"
                  f" {total}), from the newest checkpoint", file=sys.stderr)
            return False
        return record.levelno >= logging.ERROR


# the signals torch's launcher handles (TORCHELASTIC_SIGNALS_TO_HANDLE): it stops the processes and raises SignalException
LAUNCHER_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def launch_local(nproc: int, batch_size: int, argv: list[str], max_restarts: int = 0) -> int:
    """``routelab train ... --nproc N``: the same command in N processes on this machine, started by
    torch's launcher (``torch.distributed.run``, i.e. torchrun --standalone); returns the exit status.
    A failed process is reported in one line (after its own error line, if it printed one); the
    others, whose collectives fail when it ends, stop without a line of their own
    (``routelab.cli.lost_peer``). With ``max_restarts`` K > 0 the launcher starts all N again after a
    failure, up to K times (each resumes from the newest checkpoint: see ``routelab.cli.cmd_train``).
    Unless ``OMP_NUM_THREADS`` is set, each process gets an equal share of this machine's cores
    (``train.threads`` still overrides it).

    Interrupted (Ctrl-C, SIGINT) or stopped (SIGTERM, SIGHUP, SIGQUIT), torch's launcher passes the
    signal on to the processes, which end at once (``routelab.train.distributed.end_with_launcher``),
    and this returns ``interrupted``'s status after one line."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if batch_size % nproc:
        raise ConfigError(f"train.batch_size={batch_size} is invalid with --nproc {nproc}; allowed: a multiple of {nproc}")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # we report failures ourselves; no launcher banners
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 (with a banner); share the cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    launcher = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "-m", "routelab", *argv]
    )
    log.info("starting %d processes with torch.distributed.run (torchrun --standalone)", nproc)
    report = _LauncherLog(nproc)
    watched = [logging.getLogger(f"torch.distributed.elastic.{m}.api") for m in ("multiprocessing", "agent.server")]
    levels = [logger.level for logger in watched]
    watched[0].setLevel(logging.WARNING)  # its line before it stops a process is a WARNING
    watched[1].setLevel(logging.INFO)  # its restart line is INFO
    for logger in watched:
        logger.addFilter(report)
    handlers = {s: signal.getsignal(s) for s in LAUNCHER_SIGNALS}  # torch's launcher sets its own and leaves them
    os.environ[LAUNCHER_VAR] = str(os.getpid())  # the processes end with this one (end_with_launcher)
    try:
        torchrun(launcher)
    except SignalException as e:  # the launcher has stopped the processes with the same signal
        return interrupted(e.sigval)
    except ChildFailedError as e:
        exitcodes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        rank = first_failure(exitcodes)
        line = describe_exit(rank, nproc, exitcodes[rank])
        if exitcodes[rank] < 0:
            line += "; the other processes were stopped"
        if max_restarts:
            line += f"; no restarts left (--max-restarts {max_restarts})"
        print(f"routelab: error: {line}", file=sys.stderr)
        return 2 if exitcodes[rank] == 2 else 1
    finally:
        os.environ.pop(LAUNCHER_VAR, None)
        for sig, handler in handlers.items():
            if handler is not None:  # None: not set from Python
                signal.signal(sig, handler)
        for logger, level in zip(watched, levels):
            logger.removeFilter(report)
            logger.setLevel(level)
    return 0


def interrupted(sig: int = signal.SIGINT) -> int:
    """A run interrupted or stopped from outside: one line, and the status a shell gives a process
    that the signal ended, 128 + its number (Ctrl-C's SIGINT 130, SIGTERM 143)."""
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    print(f"routelab: {how}; a training run continues from its last checkpoint with --resume", file=sys.stderr)
    return 128 + int(sig)
