"""Shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this imports as ``common``)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, rows) -> None:
    """Write the measured rows as JSON, creating the folder, and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path}")


def training_env(use: bool) -> str:
    """Run under the process settings ``routelab train`` chooses (OpenMP's wait, glibc's allocator:
    ``routelab.threads.wait_defaults_for``), re-executing this script once to set them, so a
    benchmark measures what training gets; ``use=False`` keeps the environment as it is.
    Returns the settings in effect, for the report's first line."""
    import os
    import sys

    from routelab.threads import ALLOCATOR_VAR, OPENMP_WAIT_VARS, wait_defaults_for

    extra = wait_defaults_for("train") if use else {}
    if extra:
        os.environ.update(extra)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    shown = [f"{k}={os.environ[k]}" for k in (*OPENMP_WAIT_VARS, ALLOCATOR_VAR) if k in os.environ]
    return ", ".join(shown) or "the runtimes' defaults"
