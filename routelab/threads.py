"""CPU threads: how idle OpenMP threads wait, and the line a training run logs about its threads.

When another busy process shares the cores, OpenMP threads that spin while they wait for work slow
training several-fold. A short spin (libgomp) or none (other runtimes) avoids it; the README's "CPU
threads" section has the measurements. OpenMP reads these variables once, when it loads with torch,
that is when the routelab package is imported: before any code of this module runs. So the
``routelab`` command (``routelab.cli.run``) sets them and, for ``train``, re-executes itself once
(``reexec``); ``main(argv)``, the library's way to run a command, sets nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # libgomp; Intel and LLVM OpenMP
OPENMP_COMMANDS = ("train", "compare")  # the commands that train (compare: in child processes)


def openmp_runtime() -> str:
    """``libgomp`` when this process has GNU OpenMP loaded (torch's Linux wheels), else ``other``."""
    try:
        return "libgomp" if "libgomp" in Path("/proc/self/maps").read_text() else "other"
    except OSError:  # no /proc (macOS, Windows)
        return "other"


def openmp_wait_defaults(environ: Mapping[str, str], runtime: str) -> dict[str, str]:
    """The variables ``run()`` adds to the environment: ``GOMP_SPINCOUNT=1000`` for libgomp, the
    portable ``OMP_WAIT_POLICY=PASSIVE`` for any other runtime; nothing when the user already chose
    how idle OpenMP threads wait (any of ``OPENMP_WAIT_VARS`` set, to any value)."""
    if any(v in environ for v in OPENMP_WAIT_VARS):
        return {}
    return {"GOMP_SPINCOUNT": "1000"} if runtime == "libgomp" else {"OMP_WAIT_POLICY": "PASSIVE"}


def describe_threads(config_threads: int | None) -> str:
    """``CPU threads: 2 (torch's default; train.threads sets it), GOMP_SPINCOUNT=1000``."""
    import torch

    if config_threads:
        n, why = config_threads, "train.threads"
    elif "OMP_NUM_THREADS" in os.environ:
        n, why = torch.get_num_threads(), "from OMP_NUM_THREADS"
    else:
        n, why = torch.get_num_threads(), "torch's default; train.threads sets it"
    waits = ", ".join(f"{v}={os.environ[v]}" for v in OPENMP_WAIT_VARS if v in os.environ) or "OpenMP's default wait"
    return f"CPU threads: {n} ({why}), {waits}"


def wait_defaults_for(command: str) -> dict[str, str]:
    """``openmp_wait_defaults`` for this process, for a command that trains (``OPENMP_COMMANDS``); {} otherwise."""
    return openmp_wait_defaults(os.environ, openmp_runtime()) if command in OPENMP_COMMANDS else {}


def describe_wait_defaults(extra: Mapping[str, str]) -> str:
    """The line ``run()`` logs once it set ``extra``: what it chose, and why."""
    return (
        f"{', '.join(f'{k}={v}' for k, v in extra.items())}: idle OpenMP threads soon sleep instead of spinning, so"
        " another busy process does not slow training several-fold (set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself"
        " to choose)"
    )


def reexec() -> None:
    """Run this process again (same interpreter and arguments), so that OpenMP, already loaded with torch,
    reads the environment anew; returns only where it cannot (torch not loaded yet, not POSIX, or
    ``execv`` failed: the command goes on with OpenMP's own default)."""
    if "torch" in sys.modules and os.name == "posix" and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
