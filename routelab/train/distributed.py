"""Data parallelism on ``torch.distributed``: process groups from ``torchrun``, a rank's share of
each global batch, and the few collectives the trainer needs.

One run = one model trained by ``world_size`` processes started by torch's own launcher
(``torchrun``, or ``routelab train --nproc N`` which calls it). ``train.batch_size`` is the *global*
micro-batch: rank r computes rows ``r * b .. (r + 1) * b - 1`` of it (b = batch_size / world_size),
so N processes train on exactly the batches one process would, and a checkpoint resumes on any
number of processes. Dense parameters are replicated with ``DistributedDataParallel``, which
averages gradients: the mean of the ranks' mean losses over equal shares is the global mean loss.

The backend follows the device (gloo on CPU, NCCL on CUDA) unless ``train.dist_backend`` says
otherwise; ``train.dist_timeout`` bounds every collective, so a rank that hangs ends the run
instead of hanging it too. A rank that dies (an exception, or a signal such as the out-of-memory
killer's SIGKILL) is seen by the launcher, which stops the others; their collectives fail first, with
the backend's "connection closed" error, which ``collective_failure`` recognises so that they wait
quietly for the launcher to stop them, and its report names the process that failed first.
Relaunched by ``torchrun --max-restarts``, the processes see ``restart_count() > 0``. The processes
end with their launcher, even one killed with SIGKILL, and end at once and silently on SIGINT, which the
launcher forwards on Ctrl-C and reports itself (``end_with_launcher``).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from routelab.errors import ConfigError

T = TypeVar("T")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set by torchrun
RESTART_VAR = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun: how often it has restarted the processes
LOST_PEER_STATUS = 3  # exit status of a process that stopped because another one ended (not the cause)
LAUNCHER_VAR = "ROUTELAB_LAUNCHER_PID"  # set by ``routelab train --nproc``: the process its processes end with
LAUNCHER_POLL_S = 1.0  # how often a process checks that its launcher is still there where the kernel cannot tell it
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal the kernel sends a process when its parent ends


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: one process is ``DistContext()`` (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and progress."""
        return self.rank == 0

    def share(self, global_rows: int, what: str = "train.batch_size") -> slice:
        """This rank's rows of a global batch of ``global_rows`` (which the world size must divide)."""
        if global_rows % self.world_size:
            raise ConfigError(
                f"{what}={global_rows} is invalid with {self.world_size} processes; allowed: a multiple of the"
                " number of processes (it is the global batch, split evenly between them)"
            )
        b = global_rows // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives (no-ops in one process) ------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        return [v / self.world_size for v in self.sum(values, device)]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is True on one (so all ranks take the same branch)."""
        return bool(self.sum([float(flag)], device)[0]) if self.enabled else flag

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only and tell the others how it went: its result is rank 0's, an
        error it raised is raised on rank 0 as is and on the others as ``RankZeroError`` (so no rank
        waits for a rank that already failed)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001  (re-raised below, after telling the others)
                error = e
        if self.enabled:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and not self.is_main:
                raise RankZeroError(box[0])
        if error is not None:
            raise error
        return result


class RankZeroError(RuntimeError):
    """Raised on the other ranks when rank 0 failed a step it does alone (rank 0 reports the cause)."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How often ``torchrun --max-restarts`` (or ``routelab train --max-restarts``) has started this
    run's processes again after a failure: 0 on the first attempt and without a launcher."""
    return int(os.environ.get(RESTART_VAR) or 0)


@dataclass(frozen=True)
class CollectiveFailure:
    """A collective that failed because of another process, not of this one."""

    detail: str  # the backend's words, e.g. 'Connection closed by peer [127.0.0.1]:15576'
    timed_out: bool  # no answer within train.dist_timeout (a process hung) rather than a closed connection (it ended)


# gloo raises a plain RuntimeError '[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ...';
# NCCL and the c10d store raise torch.distributed.DistError subclasses
_BACKEND_ERROR = re.compile(r"gloo|nccl|connection (closed|reset) by peer|broken pipe", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def collective_failure(error: BaseException) -> CollectiveFailure | None:
    """What went wrong if ``error`` is a collective (all-reduce, broadcast...) that another process
    broke by ending (killed, or failed with its own error) or by hanging; None for any other error."""
    message = str(error)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _BACKEND_ERROR.search(message))):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", message.strip()).split(". ")[0].splitlines()[0]  # no source location, first sentence
    return CollectiveFailure(detail[:200], bool(_TIMEOUT.search(message)))


def init_distributed(backend: str, timeout_s: float, device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` described in the environment; ``DistContext()`` without one.

    ``backend`` 'auto' is NCCL for a CUDA device and gloo otherwise. Each rank on CUDA uses the GPU
    of its ``LOCAL_RANK``.
    """
    if not launched():
        return DistContext()
    missing = [v for v in LAUNCH_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE > 1 but {', '.join(missing)} unset: start distributed runs with torchrun or --nproc")
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"train.dist_backend='nccl' needs a CUDA device, but train.device is {str(device)!r}; use gloo")
    if not dist.is_initialized():
        end_with_launcher()
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _store_of_this_attempt(ctx, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
    return ctx


def _store_of_this_attempt(ctx: DistContext, timeout: datetime.timedelta) -> dist.Store | None:
    """After a restart on one machine, the launcher's key-value store with this attempt's keys apart.

    torchrun's agent keeps one store across restarts (``TORCHELASTIC_USE_AGENT_STORE``) and the
    default process group writes the same keys in it each attempt, so a restarted process may read a
    dead one's address and fail to connect (torch 2.13; pytorch issue 135712). On one machine, one
    agent counts the restarts for every process, so the count scopes the keys; across machines the
    counts may differ: there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt its own store.
    None: let ``init_process_group`` build the store from the environment as usual.
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1"
    if not restart_count() or not shared:
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"routelab/restart_{restart_count()}", agent)


def end_with_launcher(launcher: int | None = None) -> None:
    """Make this process of a distributed run end when its launcher ends, and at once on SIGINT.

    torch's launcher (torchrun, or ``routelab train --nproc``, which runs it in its own process) starts
    each process in a session of its own and stops them itself when it is interrupted or stopped; a
    launcher killed with SIGKILL stops nothing, and its processes would train on unseen. So this
    process gets SIGTERM, which ends it, when its parent ``launcher`` (default: ``LAUNCHER_VAR``, else
    the parent now) ends: from the kernel on Linux (``prctl(PR_SET_PDEATHSIG)``), and from a daemon
    thread that checks every ``LAUNCHER_POLL_S`` seconds where that is missing (macOS) or came late.
    SIGINT, which the launcher forwards on Ctrl-C and reports in one line, ends the process at once
    without a word, even inside a collective (Python's KeyboardInterrupt would wait for it to return,
    and could surface as a traceback anywhere). Either way a checkpoint being written stays a hidden
    temporary folder (checkpoints are renamed into place complete; ``prune_checkpoints`` removes it).
    Changes the process's SIGINT handler: call it from the main thread of a launched process."""
    launcher = launcher or int(os.environ.get(LAUNCHER_VAR) or os.getppid())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent()  # where it is missing, the thread below still watches
    threading.Thread(target=_stop_without, args=(launcher,), name="routelab-launcher-watch", daemon=True).start()


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to send this process SIGTERM when its parent
    ends; the setting survives ``exec``. With ``parent`` (the pid it should have), a parent that ended
    before the request took effect ends this process at once. False where the kernel cannot do it.
    Safe in a ``subprocess`` ``preexec_fn``: it only calls into the C library."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this C library
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return True


def _stop_without(launcher: int) -> None:
    """SIGTERM to this process once its parent is no longer ``launcher`` (it ended: the process was
    handed to init or a subreaper), as the kernel's parent-death signal does."""
    while os.getppid() == launcher:
        time.sleep(LAUNCHER_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """On CUDA, each local rank takes its own GPU (``cuda:LOCAL_RANK``) unless one is named."""
    if device.type == "cuda" and device.index is None and ctx.enabled:
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
