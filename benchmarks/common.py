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
