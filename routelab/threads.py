"""CPU process settings the ``routelab`` command chooses for training: how idle OpenMP threads wait,
how the C library's allocator keeps large blocks, and the line a training run logs about its threads.

- OpenMP: when another busy process shares the cores, OpenMP threads that spin while they wait for
  work slow training several-fold. A short spin (libgomp) or none (other runtimes) avoids it.
- Allocator: glibc serves each block over its mmap threshold (at most 32 MiB) with a fresh ``mmap``
  and returns it to the system on ``free``, so every step's gradients and optimizer temporaries of
  a large parameter (an MoE layer's stacked experts: 64 x 512 x 256 floats are 32 MiB) are zeroed
  page by page again, step after step: a page fault per 4 KiB. Serving every block from the heap
  and keeping freed memory in the process (``glibc.malloc.mmap_max=0``, a trim threshold of 4 GiB)
  lets the next step reuse the pages.

The README's "CPU threads" section has the measurements. OpenMP reads its variables once, when it
loads with torch, that is when the routelab package is imported, and glibc reads
``GLIBC_TUNABLES`` when the process starts: before any code of this module runs. So the
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
ALLOCATOR_VAR = "GLIBC_TUNABLES"
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"  # heap only, trim above 4 GiB


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


def c_library() -> str:
    """``glibc`` when this process runs on the GNU C library, else ``other`` (musl, macOS, Windows)."""
    import platform

    return "glibc" if platform.libc_ver()[0] == "glibc" else "other"


def allocator_defaults(environ: Mapping[str, str], libc: str) -> dict[str, str]:
    """The variable ``run()`` adds for the allocator: ``GLIBC_TUNABLES`` keeping freed memory in the
    process (see the module docstring), on glibc only, and only when the user chose nothing about
    glibc's allocator: no ``GLIBC_TUNABLES`` and none of its older ``MALLOC_*_`` variables (e.g.
    ``MALLOC_MMAP_THRESHOLD_``)."""
    if libc != "glibc" or ALLOCATOR_VAR in environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in environ):
        return {}
    return {ALLOCATOR_VAR: KEEP_FREED_MEMORY}


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
    """What ``run()`` adds to the environment for a command that trains (``OPENMP_COMMANDS``): the
    ``openmp_wait_defaults`` and ``allocator_defaults`` of this process; {} for other commands."""
    if command not in OPENMP_COMMANDS:
        return {}
    return {**openmp_wait_defaults(os.environ, openmp_runtime()), **allocator_defaults(os.environ, c_library())}


def describe_wait_defaults(extra: Mapping[str, str]) -> list[str]:
    """The lines ``run()`` logs once it set ``extra``: what it chose, and why (one per setting)."""
    lines = []
    waits = {k: v for k, v in extra.items() if k in OPENMP_WAIT_VARS}
    if waits:
        lines.append(
            f"{', '.join(f'{k}={v}' for k, v in waits.items())}: idle OpenMP threads soon sleep instead of spinning,"
            " so another busy process does not slow training several-fold (set OMP_WAIT_POLICY or GOMP_SPINCOUNT"
            " yourself to choose)"
        )
    if ALLOCATOR_VAR in extra:
        lines.append(
            f"{ALLOCATOR_VAR}={extra[ALLOCATOR_VAR]}: freed memory stays in the process, so large tensors do not"
            f" fault in fresh pages every step (set {ALLOCATOR_VAR} yourself to choose)"
        )
    return lines


def reexec() -> None:
    """Run this process again (same interpreter and arguments), so that OpenMP, already loaded with torch,
    reads the environment anew; returns only where it cannot (torch not loaded yet, not POSIX, or
    ``execv`` failed: the command goes on with OpenMP's own default)."""
    if "torch" in sys.modules and os.name == "posix" and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
